"""llama.cpp itself, as the reference the differential tests compare with: its tools, its libraries
built without AMX kernels and its source, from the sdist of the pinned llama-cpp-python
(benchmarks/llamacpp_tools.py). Built on first use and kept in the user cache, so only a fresh
machine pays the build (a few minutes on 2 cores); a failed build fails the test that needed it,
never skips it."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _tools() -> ModuleType:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import llamacpp_tools
    finally:
        sys.path.pop(0)
    return llamacpp_tools


def tool(name: str) -> Path:
    """The path of llama-perplexity, llama-imatrix, llama-bench, ... (built if needed)."""
    return _tools().tool(name)


def libraries() -> Path:
    """The folder of libllama and libggml built without AMX kernels, for LLAMA_CPP_LIB_PATH."""
    return _tools().build(tools=("llama",))


def repack_args() -> list[str]:
    """A common-args tool's flag for localmix's weight-repacking setting (like with like)."""
    return _tools().repack_args()


def source() -> Path:
    """The vendored llama.cpp source tree of the pinned sdist (unpacked if needed)."""
    return _tools().source()
