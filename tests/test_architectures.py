"""localmix's list of llama.cpp architectures matches the vendored llama.cpp's LLM_ARCH_NAMES, and
import refuses a GGUF of an architecture outside it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from localmix.llama.architectures import KNOWN
from tests.cli_run import run_cli


def _llama_arch_cpp() -> Path:
    """llama-arch.cpp of the llama.cpp that the pinned llama-cpp-python vendors: under
    LLAMA_CPP_SOURCE if set, else the pinned sdist's, unpacked on first use (the user cache)."""
    given = os.environ.get("LLAMA_CPP_SOURCE")
    if given:
        return Path(given) / "src" / "llama-arch.cpp"
    from tests import llamacpp_reference

    return llamacpp_reference.source() / "src" / "llama-arch.cpp"


# In LLM_ARCH_NAMES but not loadable models: llama-quantize's placeholder and the fallback name.
NOT_MODELS = {"clip", "(unknown)"}


def _vendored_names(source: str) -> set[str]:
    block = source[source.index("LLM_ARCH_NAMES = {") :]
    block = block[: block.index("};")]
    return set(re.findall(r'\{\s*LLM_ARCH_\w+,\s*"([^"]+)"\s*\}', block))


def test_list_matches_the_vendored_llama_cpp() -> None:
    vendored = _vendored_names(_llama_arch_cpp().read_text(encoding="utf-8"))
    assert "llama" in vendored
    assert vendored - NOT_MODELS == KNOWN


def test_list_holds_what_localmix_makes() -> None:
    assert "llama" in KNOWN  # Mistral and Mixtral GGUFs are 'llama'
    assert not KNOWN & NOT_MODELS


def renamed_architecture(src: Path, dest: Path, new: bytes = b"llamz") -> Path:
    """A copy of src whose general.architecture value is `new` (same length as 'llama')."""
    data = bytearray(src.read_bytes())
    key = data.index(b"general.architecture")
    at = data.index(b"llama", key)
    data[at : at + len(new)] = new
    dest.write_bytes(bytes(data))
    return dest


def test_import_refuses_an_unknown_architecture(
    tmp_path: Path,
    tiny_mistral_gguf_f16: Path,
    localmix_home: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = renamed_architecture(tiny_mistral_gguf_f16, tmp_path / "odd.gguf")
    result = run_cli(capsys, "import", str(path))
    assert result.code == 6, result.err
    assert "'llamz' is not one this llama.cpp loads" in result.err
    assert "hint:" in result.err
    assert not (localmix_home / "manifests").exists() or not any(
        (localmix_home / "manifests").rglob("*.json")
    )
