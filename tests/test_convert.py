"""localmix.build.convert: checkpoints (HF and Mistral-native; v1, v3, tekken) -> GGUF, read back with
gguf's own GGUFReader and, for the tokenizer, compared with mistral-common through llama.cpp."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from localmix import gguffile
from localmix.build.convert import convert
from localmix.build.convert import output as convert_output
from localmix.build.convert.llama import undo_hf_permute
from localmix.build.synth import checkpoints as synth
from localmix.errors import CheckpointError, LocalmixError, OutputError, UsageError
from localmix.progress import Progress
from tests import reference_forward as ref

TINY = synth.SIZES["tiny"]


def _reader(path: Path):
    import gguf

    return gguf.GGUFReader(path)


def _field(reader, key: str):
    field = reader.get_field(key)
    assert field is not None, key
    return field.contents()


def _tensors(reader) -> dict:
    return {t.name: t for t in reader.tensors}


@dataclass(frozen=True)
class Case:
    arch: str
    layout: str
    tokenizer: str

    @property
    def id(self) -> str:
        return f"{self.arch}-{self.layout}-{self.tokenizer}"


CASES = [
    Case("mistral", "hf", "v1"),
    Case("mistral", "hf", "v3"),
    Case("mistral", "hf", "tekken"),
    Case("mistral", "mistral", "v1"),
    Case("mistral", "mistral", "v3"),
    Case("mistral", "mistral", "tekken"),
    Case("mixtral", "hf", "v1"),
    Case("mixtral", "mistral", "v3"),
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Case], tuple[Path, Any]]:
    """(f16 GGUF, its gguffile.inspect record) per case, built on first use. (gguf's GGUFReader
    takes a minute over tekken's 131k tokens and 269k merges; the header reader takes a second.)"""
    made: dict[Case, tuple[Path, Any]] = {}

    def get(case: Case) -> tuple[Path, Any]:
        if case not in made:
            root = tmp_path_factory.mktemp(case.id)
            ckpt = synth.checkpoint(
                root / "ckpt", arch=case.arch, layout=case.layout, tokenizer=case.tokenizer
            )
            path = convert(ckpt, root / "model.gguf", outtype="f16")
            made[case] = (path, gguffile.inspect(path))
        return made[case]

    return get


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_convert_writes_llama_metadata(case: Case, converted) -> None:
    _, info = converted(case)
    meta = info.metadata
    vocab = synth.TOKENIZERS[case.tokenizer].vocab_size
    expected = {
        "general.architecture": "llama",
        "general.file_type": 1,  # MOSTLY_F16
        "llama.block_count": TINY.n_layers,
        "llama.context_length": TINY.context,
        "llama.embedding_length": TINY.dim,
        "llama.feed_forward_length": TINY.ffn // 2 if case.arch == "mixtral" else TINY.ffn,
        "llama.attention.head_count": TINY.n_heads,
        "llama.attention.head_count_kv": TINY.n_kv_heads,
        "llama.rope.dimension_count": TINY.dim // TINY.n_heads,
        "llama.rope.freq_base": synth.TOKENIZERS[case.tokenizer].rope_theta,
        "llama.attention.layer_norm_rms_epsilon": pytest.approx(1e-5),
        "llama.vocab_size": vocab,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.model": "gpt2" if case.tokenizer == "tekken" else "llama",
        "tokenizer.ggml.tokens": f"[{vocab} items]",
    }
    if case.arch == "mixtral":
        expected |= {"llama.expert_count": 8, "llama.expert_used_count": 2}
    for key, value in expected.items():
        assert meta.get(key) == value, key
    assert meta["tokenizer.chat_template"]
    if case.tokenizer == "tekken":
        assert meta["tokenizer.ggml.pre"] == "tekken"
        assert meta["tokenizer.ggml.merges"] == "[269443 items]"
    if case.layout == "mistral":  # llama.cpp's names for its built-in Mistral templates
        assert meta["tokenizer.chat_template"].startswith("mistral-")
    if case.arch == "mistral":
        assert "llama.expert_count" not in meta


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_convert_tensor_names_shapes_and_types(case: Case, converted) -> None:
    tensors = {t.name: t for t in converted(case)[1].tensors}
    d, hd, vocab = TINY.dim, TINY.dim // TINY.n_heads, synth.TOKENIZERS[case.tokenizer].vocab_size
    expected = {
        "token_embd.weight": (d, vocab),
        "output_norm.weight": (d,),
        "output.weight": (d, vocab),
    }
    for i in range(TINY.n_layers):
        b = f"blk.{i}."
        expected |= {
            b + "attn_norm.weight": (d,),
            b + "attn_q.weight": (d, TINY.n_heads * hd),
            b + "attn_k.weight": (d, TINY.n_kv_heads * hd),
            b + "attn_v.weight": (d, TINY.n_kv_heads * hd),
            b + "attn_output.weight": (TINY.n_heads * hd, d),
            b + "ffn_norm.weight": (d,),
        }
        if case.arch == "mixtral":
            f = TINY.ffn // 2
            expected |= {
                b + "ffn_gate_inp.weight": (d, 8),
                b + "ffn_gate_exps.weight": (d, f, 8),
                b + "ffn_down_exps.weight": (f, d, 8),
                b + "ffn_up_exps.weight": (d, f, 8),
            }
        else:
            f = TINY.ffn
            expected |= {
                b + "ffn_gate.weight": (d, f),
                b + "ffn_down.weight": (f, d),
                b + "ffn_up.weight": (d, f),
            }
    # GGUF lists dimensions fastest-first (ggml order)
    assert {n: t.shape for n, t in tensors.items()} == expected
    for name, t in tensors.items():
        f32 = len(t.shape) == 1 or "ffn_gate_inp" in name
        assert t.type_name == ("F32" if f32 else "F16"), name


@pytest.mark.parametrize(
    ("outtype", "weight_type"), [("f32", "F32"), ("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0")]
)
def test_convert_outtype_rules_follow_llama_cpp(
    outtype: str, weight_type: str, tiny_mixtral_ckpt: Path, tmp_path: Path
) -> None:

    r = _reader(convert(tiny_mixtral_ckpt, tmp_path / "m.gguf", outtype=outtype))
    assert _field(r, "general.file_type") == int(convert_output.file_type(outtype))
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["token_embd.weight"] == weight_type
    assert types["output.weight"] == weight_type
    assert types["blk.0.ffn_gate_exps.weight"] == weight_type
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert types["output_norm.weight"] == "F32"
    assert types["blk.1.ffn_gate_inp.weight"] == "F32"  # the router never quantizes
    assert len(types) == 3 + TINY.n_layers * 10


def test_convert_f32_holds_the_checkpoint_values(
    tiny_mistral_ckpt: Path, tiny_mistral_gguf_f32: Path
) -> None:
    w = ref.load(tiny_mistral_ckpt)[1]
    t = _tensors(_reader(tiny_mistral_gguf_f32))
    np.testing.assert_array_equal(t["token_embd.weight"].data, w["model.embed_tokens.weight"])
    np.testing.assert_array_equal(
        t["blk.1.ffn_down.weight"].data, w["model.layers.1.mlp.down_proj.weight"]
    )
    np.testing.assert_array_equal(t["output.weight"].data, w["lm_head.weight"])
    # q/k come back in Meta's interleaved order
    hf_q = w["model.layers.0.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(
        t["blk.0.attn_q.weight"].data, undo_hf_permute(hf_q, TINY.n_heads)
    )


def test_convert_native_and_hf_layouts_give_the_same_tensors(tmp_path: Path) -> None:
    hf = convert(
        synth.checkpoint(tmp_path / "hf", arch="mixtral", seed=5),
        tmp_path / "hf.gguf",
        outtype="f32",
    )
    native_ckpt = synth.checkpoint(tmp_path / "n", arch="mixtral", layout="mistral", seed=5)
    native = convert(native_ckpt, tmp_path / "n.gguf", outtype="f32")
    a, b = _tensors(_reader(hf)), _tensors(_reader(native))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name].data, b[name].data, err_msg=name)


@pytest.mark.parametrize("heads", [TINY.n_heads, TINY.n_kv_heads, 1, 8])
def test_convert_undo_permute_inverts_hf_permute(heads: int) -> None:
    w = np.random.default_rng(heads).standard_normal((heads * 16, 24)).astype(np.float32)
    np.testing.assert_array_equal(undo_hf_permute(synth.hf_permute(w, heads), heads), w)
    # and it pairs rows (i, i + half) of each head into neighbours
    undone = undo_hf_permute(w, heads)
    np.testing.assert_array_equal(undone[1], w[8])


def test_convert_mixtral_stacks_experts(
    tiny_mixtral_ckpt: Path, tiny_mixtral_gguf_f32: Path
) -> None:
    w = ref.load(tiny_mixtral_ckpt)[1]
    t = _tensors(_reader(tiny_mixtral_gguf_f32))
    for gguf_name, part in (
        ("ffn_gate_exps", "w1"),
        ("ffn_down_exps", "w2"),
        ("ffn_up_exps", "w3"),
    ):
        stacked = np.stack(
            [w[f"model.layers.1.block_sparse_moe.experts.{e}.{part}.weight"] for e in range(8)]
        )
        np.testing.assert_array_equal(t[f"blk.1.{gguf_name}.weight"].data, stacked)
    np.testing.assert_array_equal(
        t["blk.0.ffn_gate_inp.weight"].data, w["model.layers.0.block_sparse_moe.gate.weight"]
    )


def test_convert_bf16_input_widens_exactly(tmp_path: Path) -> None:
    ckpt = synth.checkpoint(tmp_path / "m", dtype="bf16", seed=2)
    w = ref.load(ckpt)[1]  # the reference widens bf16 by hand
    f32 = _tensors(_reader(convert(ckpt, tmp_path / "f32.gguf", outtype="f32")))
    np.testing.assert_array_equal(f32["token_embd.weight"].data, w["model.embed_tokens.weight"])
    bf16 = _tensors(_reader(convert(ckpt, tmp_path / "bf16.gguf", outtype="bf16")))
    from localmix.build.convert.checkpoint import read_header

    entry = next(e for e in read_header(ckpt / "model.safetensors") if e.name == "lm_head.weight")
    with open(entry.file, "rb") as f:
        f.seek(entry.offset)
        raw = f.read(entry.nbytes)
    # bf16 -> f32 -> bf16 is lossless: the GGUF holds the checkpoint's own bits
    assert bf16["output.weight"].data.tobytes() == raw


def test_convert_streams_in_blocks_with_identical_bytes(
    tiny_mixtral_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = convert(tiny_mixtral_ckpt, tmp_path / "whole.gguf", outtype="q8_0")
    monkeypatch.setattr(convert_output, "BLOCK_ELEMENTS", 1000)  # a few rows per block
    blocks = convert(tiny_mixtral_ckpt, tmp_path / "blocks.gguf", outtype="q8_0")
    assert whole.read_bytes() == blocks.read_bytes()


def test_convert_q8_0_matches_gguf_quants(tiny_mistral_ckpt: Path, tmp_path: Path) -> None:
    import gguf

    w = ref.load(tiny_mistral_ckpt)[1]
    t = _tensors(_reader(convert(tiny_mistral_ckpt, tmp_path / "q.gguf", outtype="q8_0")))
    expected = gguf.quants.quantize(w["model.embed_tokens.weight"], gguf.GGMLQuantizationType.Q8_0)
    assert t["token_embd.weight"].data.tobytes() == expected.tobytes()


def test_convert_sharded_checkpoint_equals_single_file(tmp_path: Path) -> None:
    one = synth.checkpoint(tmp_path / "one", seed=7, max_shard_bytes=0)
    sharded = synth.checkpoint(tmp_path / "sharded", seed=7, max_shard_bytes=2_000_000)
    assert (sharded / "model.safetensors.index.json").is_file()
    a = _tensors(_reader(convert(one, tmp_path / "a.gguf", outtype="f16")))
    b = _tensors(_reader(convert(sharded, tmp_path / "b.gguf", outtype="f16")))
    assert a.keys() == b.keys()
    assert all(a[n].data.tobytes() == b[n].data.tobytes() for n in a)


def test_convert_reports_progress(tiny_mistral_ckpt: Path, tmp_path: Path) -> None:
    events: list[Progress] = []
    convert(tiny_mistral_ckpt, tmp_path / "m.gguf", outtype="f16", progress=events.append)
    start, tensors = events[0], events[1:]
    assert start == Progress("convert", subject="F16")  # the stage starts, then each tensor
    total = tensors[0].total
    assert total == 3 + TINY.n_layers * 9
    assert {(e.stage, e.unit, e.total) for e in tensors} == {("convert", "tensors", total)}
    assert [e.done for e in tensors] == list(range(total + 1))
    assert tensors[0].subject == "token_embd.weight"


def test_convert_interrupted_leaves_nothing(
    tiny_mistral_ckpt: Path, tmp_path: Path, localmix_home: Path
) -> None:
    def stop(event: Progress) -> None:
        if event.done == 5:
            raise KeyboardInterrupt

    out = tmp_path / "m.gguf"
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_mistral_ckpt, out, progress=stop)
    assert not out.exists()
    assert not any((localmix_home / "tmp").iterdir())


def test_convert_tokenizer_matches_mistral_common(converted) -> None:
    """llama.cpp, reading the converted vocab, splits text as mistral-common does."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from localmix.llama.engine import Engine, EngineConfig

    text = "Hello world! Ünïcödé, code: def f(x): return x**2  # ok\n\tTabs and 123456 numbers."
    for case in (
        Case("mistral", "hf", "v1"),
        Case("mistral", "mistral", "v3"),
        Case("mistral", "mistral", "tekken"),
    ):
        gguf_path, _ = converted(case)
        tok_file = synth._data_dir() / synth.TOKENIZERS[case.tokenizer].file
        mc = MistralTokenizer.from_file(str(tok_file)).instruct_tokenizer.tokenizer
        expected = mc.encode(text, bos=True, eos=False)
        with Engine(EngineConfig(model_path=gguf_path, n_ctx=64, n_threads=1)) as engine:
            assert engine.tokenize(text, add_bos=True, special=False) == expected, case.id


# ---- bad input -----------------------------------------------------------------------------------


def _copy(ckpt: Path, work: Path) -> Path:
    return Path(shutil.copytree(ckpt, work / "ckpt"))


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _truncate(path: Path, keep: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(keep)


def _header_says_more(c: Path, w: Path) -> Path:
    d = _copy(c, w)
    _truncate(d / "model.safetensors", (d / "model.safetensors").stat().st_size - 10)
    return d


def _header_cut(c: Path, w: Path) -> Path:
    d = _copy(c, w)
    _truncate(d / "model.safetensors", 100)
    return d


def _garbage_safetensors(c: Path, w: Path) -> Path:
    d = _copy(c, w)
    (d / "model.safetensors").write_bytes(b"this is not a safetensors file at all")
    return d


def _extra_tensor(c: Path, w: Path) -> Path:
    d = _copy(c, w)
    synth.write_safetensors(
        d / "model-extra.safetensors",
        [("model.layers.0.mystery.weight", (4,))],
        "f32",
        lambda n: np.ones(4, np.float32),
    )
    return d


def _int8_tensor(c: Path, w: Path) -> Path:
    d = _copy(c, w)
    header = b'{"model.norm.weight":{"dtype":"I8","shape":[64],"data_offsets":[0,64]}}'
    header += b" " * (-len(header) % 8)
    (d / "model-q.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(64))
    return d


def _no_tokenizer(c: Path, w: Path) -> Path:
    d = _copy(c, w)
    for p in d.iterdir():
        if p.name.startswith(("tokenizer", "tekken")):
            p.unlink()
    return d


def _pickle_only(c: Path, w: Path) -> Path:
    d = _copy(c, w)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    return d


def _index_missing_tensor(c: Path, w: Path) -> Path:
    d = _copy(c, w)
    (d / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    "model.extra.weight": "model.safetensors",
                    "model.norm.weight": "model.safetensors",
                }
            }
        )
    )
    return d


def _native_without_tokenizer(c: Path, w: Path) -> Path:
    d = synth.checkpoint(w / "native", layout="mistral")
    (d / "tokenizer.model.v1").unlink()
    return d


@dataclass(frozen=True)
class Bad:
    id: str
    make: Callable[[Path, Path], Path]  # (tiny checkpoint, work dir) -> source dir
    error: type[LocalmixError]
    needle: str


BAD = [
    Bad("missing dir", lambda c, w: w / "nope", CheckpointError, "nope"),
    Bad(
        "a file, not a dir",
        lambda c, w: Path(shutil.copy(c / "config.json", w / "cfg")),
        CheckpointError,
        "not a directory",
    ),
    Bad(
        "empty dir",
        lambda c, w: Path(os.makedirs(w / "empty") or w / "empty"),
        CheckpointError,
        "empty",
    ),
    Bad(
        "no config",
        lambda c, w: (_copy(c, w) / "config.json").unlink() or w / "ckpt",
        CheckpointError,
        "config.json",
    ),
    Bad(
        "config not JSON",
        lambda c, w: (_copy(c, w) / "config.json").write_text("{") and w / "ckpt",
        CheckpointError,
        "config.json",
    ),
    Bad(
        "unsupported architecture",
        lambda c, w: (
            _edit_json(_copy(c, w) / "config.json", architectures=["GPT2LMHeadModel"]) or w / "ckpt"
        ),
        CheckpointError,
        "GPT2LMHeadModel",
    ),
    Bad(
        "config missing a key",
        lambda c, w: _edit_json(_copy(c, w) / "config.json", rms_norm_eps=None) or w / "ckpt",
        CheckpointError,
        "rms_norm_eps",
    ),
    Bad("truncated safetensors", _header_says_more, CheckpointError, "truncated"),
    Bad("safetensors header cut", _header_cut, CheckpointError, "model.safetensors"),
    Bad("not a safetensors file", _garbage_safetensors, CheckpointError, "model.safetensors"),
    Bad(
        "missing shard",
        lambda c, w: _missing_shard(c, w),
        CheckpointError,
        "model-00002-of-00003",
    ),
    Bad(
        "index names an absent tensor", _index_missing_tensor, CheckpointError, "model.extra.weight"
    ),
    Bad(
        "shape mismatch",
        lambda c, w: _edit_json(_copy(c, w) / "config.json", intermediate_size=512) or w / "ckpt",
        CheckpointError,
        "shape",
    ),
    Bad("unexpected tensor", _extra_tensor, CheckpointError, "model.layers.0.mystery.weight"),
    Bad("unsupported dtype", _int8_tensor, CheckpointError, "I8"),
    Bad("no tokenizer", _no_tokenizer, CheckpointError, "tokenizer"),
    Bad("native without tokenizer", _native_without_tokenizer, CheckpointError, "tokenizer"),
    Bad("pytorch pickles only", _pickle_only, CheckpointError, "pytorch_model.bin"),
]


def _missing_shard(c: Path, w: Path) -> Path:
    d = synth.checkpoint(w / "sharded", max_shard_bytes=2_000_000)
    shards = sorted(d.glob("model-*.safetensors"))
    shards[1].unlink()
    return d


@pytest.mark.parametrize("bad", BAD, ids=lambda b: b.id)
def test_convert_bad_checkpoint_is_a_clear_error(
    bad: Bad, tiny_mistral_ckpt: Path, tmp_path: Path, localmix_home: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    src = bad.make(tiny_mistral_ckpt, work)
    out = tmp_path / "out" / "model.gguf"
    with pytest.raises(bad.error) as caught:
        convert(src, out)
    assert bad.needle.lower() in caught.value.message.lower()
    assert "\n" not in caught.value.message
    assert not out.exists()
    assert not (localmix_home / "tmp").exists() or not any((localmix_home / "tmp").iterdir())


def test_convert_unknown_outtype_is_usage_error(tiny_mistral_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="q4"):
        convert(tiny_mistral_ckpt, tmp_path / "m.gguf", outtype="q4")


def test_convert_unwritable_output_is_output_error(tiny_mistral_ckpt: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(OutputError, match="blocker"):
        convert(tiny_mistral_ckpt, blocker / "m.gguf")
    with pytest.raises(OutputError, match="directory"):
        convert(tiny_mistral_ckpt, tmp_path)


def test_convert_overwrites_existing_output_atomically(
    tiny_mistral_ckpt: Path, tmp_path: Path
) -> None:
    out = tmp_path / "m.gguf"
    out.write_text("old")
    convert(tiny_mistral_ckpt, out, outtype="f16")
    assert out.read_bytes()[:4] == b"GGUF"
