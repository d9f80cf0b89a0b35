"""Importance matrices: both file formats, llama-quantize's normalisation, and the lowest-bit quant
types through real llama_model_quantize, loaded and run by the engine afterwards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from localmix import gguffile
from localmix.build.imatrix import files as imatrix
from localmix.build.quantize import quant_type, quantize
from localmix.errors import UsageError
from localmix.llama.engine import Engine, EngineConfig, Sampling

from .cli_run import run_cli
from .imatrix_files import matrix_weights, write_gguf_imatrix, write_legacy_imatrix


def test_both_formats_read_to_the_same_values(tiny_mistral_gguf_f16: Path, tmp_path: Path) -> None:
    ours = imatrix.load(write_gguf_imatrix(tiny_mistral_gguf_f16, tmp_path / "m.gguf"))
    legacy = imatrix.load(write_legacy_imatrix(tiny_mistral_gguf_f16, tmp_path / "m.dat"))
    assert set(ours.values) == set(legacy.values) == set(matrix_weights(tiny_mistral_gguf_f16))
    for name, values in ours.values.items():
        assert values.dtype == np.float32
        np.testing.assert_array_equal(values, legacy.values[name])
    assert (ours.chunks, ours.datasets) == (legacy.chunks, legacy.datasets) == (10, ("tests",))


def test_each_expert_is_averaged_over_its_own_tokens(tmp_path: Path) -> None:
    """llama-quantize divides an expert's sums by its count; an expert that saw no token gets 1."""
    import gguf

    path = tmp_path / "moe.gguf"
    writer = gguf.GGUFWriter(path, arch="imatrix")
    writer.add_array("imatrix.datasets", ["d"])
    writer.add_uint32("imatrix.chunk_count", 1)
    writer.add_uint32("imatrix.chunk_size", 512)
    sums = np.array([[3, 6, 9, 12], [5, 5, 5, 5]], dtype=np.float32)
    writer.add_tensor("blk.0.ffn_up_exps.weight.in_sum2", sums)
    writer.add_tensor("blk.0.ffn_up_exps.weight.counts", np.array([[3], [0]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    values = imatrix.load(path).values["blk.0.ffn_up_exps.weight"]
    assert values.tolist() == [1, 2, 3, 4, 1, 1, 1, 1]


@pytest.mark.parametrize(
    "content",
    [b"", b"GGUF", b"\x00\x00\x00\x00", b"not an importance matrix at all"],
    ids=["empty", "truncated-gguf", "no-entries", "text"],
)
def test_a_file_that_is_no_imatrix_is_a_usage_error(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "bad.dat"
    path.write_bytes(content)
    with pytest.raises(UsageError) as caught:
        imatrix.load(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_a_gguf_imatrix_without_its_metadata_is_refused(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "bare.gguf"
    writer = gguf.GGUFWriter(path, arch="imatrix")
    writer.add_tensor("output.weight.in_sum2", np.ones(4, dtype=np.float32))
    writer.add_tensor("output.weight.counts", np.ones(1, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UsageError, match="metadata"):
        imatrix.load(path)


def test_the_lowest_bit_types_need_one() -> None:
    with pytest.raises(UsageError) as caught:
        quant_type("iq2_xs")
    assert "--imatrix" in (caught.value.hint or "")
    assert quant_type("iq2_xs", imatrix=True).name == "IQ2_XS"
    assert quant_type("q4_k_m").name == "Q4_K_M"


@pytest.mark.parametrize("arch", ["mistral", "mixtral"])
def test_quantized_with_an_imatrix_the_model_runs(
    arch: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    f16: Path = request.getfixturevalue(f"tiny_{arch}_gguf_f16")
    matrix = write_gguf_imatrix(f16, tmp_path / "imatrix.gguf")
    out = quantize(f16, tmp_path / "model.IQ2_XS.gguf", "IQ2_XS", imatrix=matrix)
    meta = gguffile.inspect(out).metadata
    assert meta["quantize.imatrix.file"] == str(matrix)
    assert meta["quantize.imatrix.entries_count"] == len(matrix_weights(f16))
    assert meta["quantize.imatrix.chunks_count"] == 10
    assert meta["quantize.imatrix.dataset"] == "tests"
    with Engine(EngineConfig(out, n_ctx=128, n_threads=2)) as engine:
        *_, stats = engine.stream([1, 1014, 4419], sampling=Sampling.greedy(), max_tokens=4)
    assert stats.prompt_tokens == 3


def test_cli_quantize_takes_an_imatrix(
    tiny_mistral_gguf_f16: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    matrix = write_legacy_imatrix(tiny_mistral_gguf_f16, tmp_path / "imatrix.dat")
    out = tmp_path / "out.gguf"
    src = str(tiny_mistral_gguf_f16)
    done = run_cli(capsys, "quantize", src, "-q", "IQ1_S", "--imatrix", str(matrix), "-o", str(out))
    assert done.code == 0, done.err
    assert gguffile.inspect(out).metadata["quantize.imatrix.file"] == str(matrix)
    bad = tmp_path / "bad.dat"
    bad.write_bytes(b"nope")
    target = tmp_path / "x.gguf"
    failed = run_cli(
        capsys, "quantize", src, "-q", "IQ1_S", "--imatrix", str(bad), "-o", str(target)
    )
    assert failed.code == 2 and "Traceback" not in failed.err
    assert failed.err.strip().splitlines()[0].startswith("error:")
    assert not target.exists()


def test_an_imatrix_of_another_model_fails_clearly_and_writes_nothing(
    tiny_mistral_gguf_f16: Path, tiny_mixtral_gguf_f16: Path, tmp_path: Path
) -> None:
    from localmix.errors import EngineError

    matrix = write_gguf_imatrix(tiny_mixtral_gguf_f16, tmp_path / "mixtral-imatrix.gguf")
    out = tmp_path / "out.gguf"
    with pytest.raises(EngineError) as caught:
        quantize(tiny_mistral_gguf_f16, out, "IQ2_XS", imatrix=matrix)
    assert "mixtral-imatrix.gguf" in (caught.value.hint or "")
    assert not out.exists() and list(tmp_path.iterdir()) == [matrix]
