"""A GGUF is validated before llama.cpp sees it: what llama.cpp would abort on or refuse is
InvalidGGUF (exit 6) with the reason. Corrupted variants of a real Q4_K_M, each through `show`
and a real load in a child process: no signal, no hang, no traceback."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from localmix import gguffile
from localmix.errors import InvalidGGUF
from tests import gguf_fuzz
from tests.cli_run import run_cli


@pytest.fixture(autouse=True)
def _no_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    """chat reads piped stdin: give it none, as a terminal-less run with </dev/null would."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))


@pytest.fixture(scope="session")
def tiny_q4_k_m(tmp_path_factory: pytest.TempPathFactory, tiny_mistral_gguf_f16: Path) -> Path:
    """The tiny Mistral quantized to Q4_K_M by llama.cpp (a real quantized file). Read-only."""
    from localmix.build.quantize import quantize

    return quantize(
        tiny_mistral_gguf_f16, tmp_path_factory.mktemp("q4km") / "tiny.Q4_K_M.gguf", "Q4_K_M"
    )


def _variant(tmp_path: Path, data: bytes, name: str = "v.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# 1, 2, 8 and 16 made llama.cpp abort ("buffer pointer must be aligned"); 0, 3, 7 it refuses.
@pytest.mark.parametrize("alignment", [0, 1, 2, 3, 7, 8, 16, 24, 2**32 - 1])
def test_an_alignment_llama_cpp_cannot_use_is_refused(
    alignment: int, tiny_q4_k_m: Path, tmp_path: Path
) -> None:
    data = tiny_q4_k_m.read_bytes()
    path = _variant(tmp_path, gguf_fuzz.relaid(data, gguf_fuzz.layout(data), alignment))
    with pytest.raises(InvalidGGUF, match="alignment"):
        gguffile.inspect(path)


@pytest.mark.parametrize("alignment", [32, 64, 4096])
def test_a_larger_power_of_two_alignment_is_fine(
    alignment: int, tiny_q4_k_m: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tiny_q4_k_m.read_bytes()
    path = _variant(tmp_path, gguf_fuzz.relaid(data, gguf_fuzz.layout(data), alignment))
    assert gguffile.inspect(path).metadata["general.alignment"] == alignment
    result = run_cli(capsys, "chat", str(path), "hi", "-n", "2", "--temp", "0", "-t", "1")
    assert result.code == 0, result.err


def test_alignment_must_be_a_uint32(tiny_q4_k_m: Path, tmp_path: Path) -> None:
    data = tiny_q4_k_m.read_bytes()
    path = _variant(tmp_path, gguf_fuzz.relaid(data, gguf_fuzz.layout(data), 32, kind=10))
    with pytest.raises(InvalidGGUF, match="not uint32"):
        gguffile.inspect(path)


def _patched(data: bytes, spot: gguf_fuzz.Field, value: int) -> bytes:
    buf = bytearray(data)
    gguf_fuzz._set(buf, spot, value)
    return bytes(buf)


@pytest.mark.parametrize(
    ("what", "value", "needle"),
    [
        ("types", 4, "unknown type 4"),  # Q4_2: removed from ggml
        ("types", 43, "unknown type 43"),  # GGML_TYPE_COUNT
        ("types", -1, "unknown type -1"),
        ("offsets", 2**40, "offset"),
        ("dims", -1, "negative dimension"),
        ("dims", 2**62, "shape"),
        ("n_dims", 5, "dimensions"),
        ("lengths", 2**63 - 1, "claims"),
        ("counts", 2**40, "claims"),
        ("value_types", 13, "value type 13"),
        (
            "value_types",
            9,
            "damaged|truncated",
        ),  # an array where a scalar was: whatever follows is damage
    ],
)
def test_damaged_fields_are_invalid_gguf(
    what: str, value: int, needle: str, tiny_q4_k_m: Path, tmp_path: Path
) -> None:
    data = tiny_q4_k_m.read_bytes()
    spot = getattr(gguf_fuzz.layout(data), what)[-1]
    path = _variant(tmp_path, _patched(data, spot, value))
    with pytest.raises(InvalidGGUF, match=needle):
        gguffile.inspect(path)


@pytest.mark.parametrize("field_name", ["n_tensors", "n_kv"])
@pytest.mark.parametrize("value", [2**63 - 1, 2**64 - 1, 10**9])
def test_absurd_counts_are_refused_before_any_loop(
    field_name: str, value: int, tiny_q4_k_m: Path, tmp_path: Path
) -> None:
    data = tiny_q4_k_m.read_bytes()
    spot = getattr(gguf_fuzz.layout(data), field_name)
    path = _variant(tmp_path, _patched(data, spot, value))
    with pytest.raises(InvalidGGUF, match="damaged"):
        gguffile.inspect(path)


def test_a_tensor_name_of_64_bytes_is_refused(tiny_q4_k_m: Path, tmp_path: Path) -> None:
    data = tiny_q4_k_m.read_bytes()
    shape = gguf_fuzz.layout(data)
    _, dims, kind, blob = shape.tensors[0]
    shape.tensors[0] = (b"x" * 64, dims, kind, blob)
    path = _variant(tmp_path, gguf_fuzz.relaid(data, shape, 32))
    with pytest.raises(InvalidGGUF, match="64 bytes or longer"):
        gguffile.inspect(path)


def test_a_file_llama_cpp_refuses_after_validation_is_invalid_gguf(
    tiny_q4_k_m: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A well-formed GGUF that lacks a tensor the architecture needs: exit 6 with the reason."""
    data = tiny_q4_k_m.read_bytes()
    shape = gguf_fuzz.layout(data)
    index = next(i for i, t in enumerate(shape.tensors) if t[0] == b"output_norm.weight")
    _, *rest = shape.tensors[index]
    shape.tensors[index] = (b"output_norm.weigh_", *rest)
    path = _variant(tmp_path, gguf_fuzz.relaid(data, shape, 32))
    gguffile.inspect(path)  # well-formed
    result = run_cli(capsys, "chat", str(path), "hi", "-n", "1", "-t", "1")
    assert result.code == 6, result.err
    assert "output_norm.weight" in result.err and "hint:" in result.err


def test_show_takes_a_path(tiny_q4_k_m: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "show", str(tiny_q4_k_m))
    assert result.code == 0, result.err
    assert "tiny.Q4_K_M.gguf:Q4_K_M" in result.out and "llama" in result.out


@pytest.mark.slow
def test_fuzzed_q4_k_m_never_crashes_hangs_or_tracebacks(tiny_q4_k_m: Path, tmp_path: Path) -> None:
    """A seeded sample (8 of each of 12 kinds of damage); benchmarks/gguf_fuzz.py runs 1,000+."""
    tally = gguf_fuzz.fuzz(tiny_q4_k_m, tmp_path / "fuzz", seed=12, count=96, timeout_s=60)
    assert tally.bad == []
    assert sum(tally.show.values()) == sum(tally.load.values()) == 96
    # every outcome is a clean exit: loaded (0) or InvalidGGUF (6)
    assert set(tally.show) <= {"exit 0", "exit 6"}, tally.show
    assert set(tally.load) <= {"exit 0", "exit 6"}, (tally.load, tally.refused)
    assert tally.load["exit 6"] >= 64  # most damage is caught (the rest still loads)


def test_relaying_at_32_keeps_the_model(tiny_q4_k_m: Path, tmp_path: Path) -> None:
    """The fuzzer's rewriter is faithful: the same tensors, the same bytes per tensor."""
    data = tiny_q4_k_m.read_bytes()
    path = _variant(tmp_path, gguf_fuzz.relaid(data, gguf_fuzz.layout(data), 32))
    assert gguffile.inspect(path).tensors == gguffile.inspect(tiny_q4_k_m).tensors
