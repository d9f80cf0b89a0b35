"""`localmix imatrix`: importance matrices computed through llama.cpp's eval callback, checked
against the numpy reference forward pass (and llama.cpp's own llama-imatrix where it is built),
written in llama-imatrix's GGUF format, read back and used by quantize. (Bad input: the imatrix
rows of tests/test_bad_input.py.)"""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

import numpy as np
import pytest

from localmix import corpus, gguffile
from localmix.build.imatrix import compute as calibration
from localmix.build.imatrix import files as imatrix
from localmix.build.quantize import quantize
from localmix.errors import EngineError
from localmix.llama.engine import Engine, EngineConfig
from localmix.llama.records import MatMul
from localmix.load import LoadSettings
from localmix.models import pull, store
from localmix.progress import Progress
from tests import llamacpp_reference
from tests import reference_forward as ref

from .cli_run import run_cli
from .imatrix_files import matrix_weights

CHUNK, CHUNKS = 128, 2
# llama.cpp in full f32 (no f16 KV cache, no flash attention), as the parity test runs it: the
# inputs then agree with numpy's to float32 rounding.
EXACT = LoadSettings(threads=2, type_k="f32", type_v="f32", flash_attn="off")


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The start of the default text: enough for a few chunks, fast to tokenize."""
    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text(corpus.default().text[:12_000], encoding="utf-8")
    return path


def chunk_tokens(model: Path, text: Path) -> list[list[int]]:
    """The chunks llama-imatrix runs: the text tokenized once, each chunk starting with BOS."""
    with Engine(EngineConfig(model, n_ctx=256, n_threads=2)) as engine:
        body = text.read_text(encoding="utf-8").removesuffix("\n")
        tokens = engine.tokenize(body, add_bos=True, special=False)
        bos = engine.bos_id
    return [[bos, *tokens[i * CHUNK + 1 : (i + 1) * CHUNK]] for i in range(CHUNKS)]


def reference(ckpt: Path, chunks: list[list[int]]) -> tuple[dict[str, np.ndarray], ...]:
    """Per weight, the float64 sums of squared inputs (experts x columns) and the rows summed,
    from the numpy forward pass of the checkpoint."""
    hp, weights = ref.load(ckpt)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}

    def record(name: str, rows: np.ndarray, expert: int | None) -> None:
        matrices = hp.n_experts if expert is not None else 1
        total = sums.setdefault(name, np.zeros((matrices, rows.shape[1])))
        seen = counts.setdefault(name, np.zeros(matrices))
        total[expert or 0] += np.square(rows, dtype=np.float64).sum(axis=0)
        seen[expert or 0] += len(rows)

    for tokens in chunks:
        trace: dict = {}
        ref.forward(hp, weights, tokens, trace=trace, record=record)
        if hp.n_experts:
            assert trace["router_margin"] > 1e-5, "routing near-tie: pick another text"
    return sums, counts


def read_raw(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """in_sum2 (matrices x columns) and counts per weight, and the metadata, as stored."""
    import gguf

    reader = gguf.GGUFReader(path)
    tensors = {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors}
    counts = {n[: -len(".counts")]: v.reshape(-1) for n, v in tensors.items() if n.endswith("ts")}
    sums = {
        n[: -len(".in_sum2")]: v.reshape(counts[n[: -len(".in_sum2")]].size, -1)
        for n, v in tensors.items()
        if n.endswith(".in_sum2")
    }
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return sums, counts, meta


@pytest.mark.parametrize("arch", ["mistral", "mixtral"])
def test_values_equal_the_numpy_forward_pass(
    arch: str, text: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    model: Path = request.getfixturevalue(f"tiny_{arch}_gguf_f32")
    ckpt: Path = request.getfixturevalue(f"tiny_{arch}_ckpt")
    result = calibration.compute(
        model, text=text, out=tmp_path / "m.gguf", chunk_size=CHUNK, chunks=CHUNKS, settings=EXACT
    )
    assert (result.chunks, result.tokens) == (CHUNKS, CHUNKS * CHUNK)
    sums, counts, meta = read_raw(result.path)
    want_sums, want_counts = reference(ckpt, chunk_tokens(model, text))
    # every block weight, the output weight left out, as llama-imatrix leaves it out
    assert set(sums) == set(want_sums) == set(matrix_weights(model)) - {"output.weight"}
    for name, expected in want_sums.items():
        np.testing.assert_array_equal(counts[name], want_counts[name], err_msg=name)
        np.testing.assert_allclose(sums[name], expected, rtol=2e-4, atol=1e-6, err_msg=name)
    if arch == "mixtral":  # routed per expert: 8 rows of sums, counts that differ per expert
        assert sums["blk.0.ffn_down_exps.weight"].shape[0] == 8
        assert len(set(counts["blk.1.ffn_up_exps.weight"].tolist())) > 1
    assert meta["general.type"] == "imatrix"
    assert meta["imatrix.chunk_count"] == CHUNKS and meta["imatrix.chunk_size"] == CHUNK
    assert meta["imatrix.datasets"] == [str(text)]
    assert "general.architecture" not in meta  # llama-imatrix's files name none


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mistral", "mixtral"])
def test_the_file_equals_llama_imatrix_output(
    arch: str, text: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    model: Path = request.getfixturevalue(f"tiny_{arch}_gguf_f16")
    theirs = tmp_path / "theirs.gguf"
    llama_imatrix = llamacpp_reference.tool("llama-imatrix")  # built here on a fresh machine
    command = [str(llama_imatrix), "-m", str(model), "-f", str(text), "-o", str(theirs)]
    command += ["-c", str(CHUNK), "--chunks", str(CHUNKS), "-t", "2", "--no-ppl"]
    command += llamacpp_reference.repack_args()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    ours = calibration.compute(
        model, text=text, out=tmp_path / "ours.gguf", chunk_size=CHUNK, chunks=CHUNKS
    ).path
    our_sums, our_counts, our_meta = read_raw(ours)
    sums, counts, meta = read_raw(theirs)
    assert our_meta == meta
    assert set(our_sums) == set(sums)
    for name in sums:
        np.testing.assert_array_equal(our_counts[name], counts[name], err_msg=name)
        np.testing.assert_allclose(our_sums[name], sums[name], rtol=1e-4, err_msg=name)
    assert ours.stat().st_size == theirs.stat().st_size  # same tensors, shapes, order, padding


def test_the_file_loads_and_quantizes_an_iq_type(
    tiny_mixtral_gguf_f16: Path, text: Path, tmp_path: Path
) -> None:
    made = calibration.compute(
        tiny_mixtral_gguf_f16, text=text, out=tmp_path / "m.gguf", chunk_size=CHUNK, chunks=1
    )
    loaded = imatrix.load(made.path)
    assert len(loaded.values) == made.entries and loaded.chunks == 1
    assert loaded.datasets == (str(text),)
    assert all(np.isfinite(v).all() and (v >= 0).all() for v in loaded.values.values())
    out = quantize(tiny_mixtral_gguf_f16, tmp_path / "q.gguf", "IQ2_XS", imatrix=made.path)
    meta = gguffile.inspect(out).metadata
    assert meta["quantize.imatrix.entries_count"] == made.entries
    assert meta["quantize.imatrix.chunks_count"] == 1
    assert gguffile.inspect(out).quant == "IQ2_XS"


def _register(model: Path, name: str = "m") -> None:
    pull.import_gguf(model, name=name, copy=True)


def test_a_store_model_gets_an_imatrix_quant_in_one_command(
    tiny_mistral_gguf_f16: Path, text: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _register(tiny_mistral_gguf_f16)
    args = ("-f", str(text), "-c", str(CHUNK), "--chunks", "1")
    made = run_cli(capsys, "imatrix", "m", *args, "--json")
    assert made.code == 0, made.err
    path = store.imatrix_path("m")
    assert path.is_file() and str(path) in made.out
    before = path.stat().st_mtime_ns
    done = run_cli(capsys, "quantize", "m", "-q", "IQ2_XS", "--imatrix", "auto")
    assert done.code == 0, done.err
    assert path.stat().st_mtime_ns == before  # already there: used, not computed again
    quant = store.get("m:IQ2_XS")
    assert gguffile.inspect(quant.file).metadata["quantize.imatrix.file"] == str(path)
    gone = run_cli(capsys, "rm", "m")
    assert gone.code == 0, gone.err
    assert not path.exists() and not path.parent.exists()


def test_auto_computes_a_missing_imatrix_beside_the_file(
    tiny_mistral_gguf_f16: Path, text: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model.F16.gguf"
    model.write_bytes(tiny_mistral_gguf_f16.read_bytes())
    events: list[Progress] = []
    path = calibration.ensure(model, events.append, text=text, chunk_size=CHUNK, chunks=1)
    assert path == tmp_path / "model.F16.imatrix.gguf" and path.is_file()
    assert events == [
        Progress("imatrix", subject="model.F16.gguf"),  # the start, then each chunk
        Progress("imatrix", subject="model.F16.gguf", done=1, total=1, unit="chunks"),
    ]
    assert calibration.ensure(model, events.append) == path and len(events) == 2  # reused
    out = quantize(model, tmp_path / "q.gguf", "IQ1_S", imatrix="auto")
    assert gguffile.inspect(out).metadata["quantize.imatrix.file"] == str(path)


class _Failing:
    """A tap that raises on the first product it is given."""

    def wants(self, product: MatMul) -> bool:
        return product.op == "MUL_MAT" and product.input_shape[1] >= 16

    def take(self, product: MatMul, inputs: np.ndarray, expert_ids: np.ndarray | None) -> None:
        raise KeyboardInterrupt


def test_an_exception_in_the_tap_reaches_the_caller(tiny_mistral_gguf_f16: Path) -> None:
    config = EngineConfig(tiny_mistral_gguf_f16, n_ctx=256, n_threads=2, tap=_Failing())
    with Engine(config) as engine:
        with pytest.raises(KeyboardInterrupt):
            engine.process([1, *range(1000, 1100)], every_output=True)
        assert engine.kv_tokens == ()  # the cache holds what the engine says it holds
        engine.process([1, 1000])  # and it goes on (2 tokens: no product this tap wants)
        assert engine.kv_tokens == (1, 1000)


def _swapped(first: str, second: str) -> type[ctypes.Structure]:
    from localmix.llama.tap import _Tensor

    fields = list(_Tensor._fields_)
    i, j = (next(k for k, f in enumerate(fields) if f[0] == n) for n in (first, second))
    fields[i], fields[j] = fields[j], fields[i]
    return type("Wrong", (ctypes.Structure,), {"_fields_": fields})


def test_the_ggml_tensor_layout_is_checked_against_libggml() -> None:
    from localmix.llama import tap

    tap.check_layout()  # the layout localmix reads is this build's
    for wrong in (_swapped("ne", "nb"), _swapped("data", "view_offs"), _swapped("op", "flags")):
        with pytest.raises(EngineError, match="ggml_tensor"):
            tap.verify_layout(wrong)
    shorter = [(n, t) for n, t in tap._Tensor._fields_ if n != "padding"]
    with pytest.raises(EngineError, match="sizeof"):
        tap.verify_layout(type("Short", (ctypes.Structure,), {"_fields_": shorter}))


def test_the_scheduler_prefix_is_not_part_of_a_weight_name() -> None:
    from localmix.llama.tap import weight_name

    assert weight_name("CUDA0#blk.0.attn_k.weight#0") == "blk.0.attn_k.weight"
    assert weight_name("blk.3.ffn_up_exps.weight") == "blk.3.ffn_up_exps.weight"
