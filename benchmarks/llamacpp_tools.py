"""llama.cpp's own command-line tools (llama-bench, llama-quantize, llama-perplexity, llama-imatrix,
llama-server), built from the exact llama.cpp
source that the pinned llama-cpp-python vendors, so every comparison runs the same C code.

The sdist comes from PyPI through pip, is unpacked into the user cache directory, configured once
(Release, CPU, native, no curl: llama-cpp-python's own defaults) and built once; later calls reuse it.
A file lock keeps two benchmark scripts from building at the same time.

    python benchmarks/llamacpp_tools.py            # build (if needed) and print the tool paths
    from llamacpp_tools import tool; tool("llama-bench")
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TOOLS = ("llama-bench", "llama-quantize", "llama-perplexity", "llama-imatrix", "llama-server")
REPO = Path(__file__).resolve().parent.parent


def pinned_version() -> str:
    """The llama-cpp-python version pinned in pyproject.toml (`llama-cpp-python==X.Y.Z`)."""
    text = (REPO / "pyproject.toml").read_text()
    match = re.search(r'"llama[-_]cpp[-_]python==([0-9][^"; ]*)"', text)
    if not match:
        raise RuntimeError("pyproject.toml does not pin llama-cpp-python with ==")
    return match[1]


def cache_dir(version: str | None = None) -> Path:
    """Where the unpacked source and the build live: the user cache, never the repository."""
    import platformdirs

    base = Path(platformdirs.user_cache_dir("localmix", appauthor=False))
    return base / f"llama.cpp-{version or pinned_version()}"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(
    cmd: list[str], log: Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> None:
    with log.open("a") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        done = subprocess.run(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, check=False
        )
    if done.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        raise RuntimeError(f"{cmd[0]} failed ({done.returncode}); log {log}:\n" + "\n".join(tail))


def _source(root: Path, version: str, log: Path) -> Path:
    """The vendored llama.cpp of the llama-cpp-python sdist, downloaded and unpacked once."""
    src = root / "src"
    if (src / "CMakeLists.txt").is_file():
        return src
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        _run(
            [
                sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                "--dest", tmp, f"llama-cpp-python=={version}",
            ],
            log,
        )  # fmt: skip
        archive = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 refuses unsafe members
                tar.extractall(tmp, filter="data")
            else:
                tar.extractall(tmp)  # older Pythons: the PyPI sdist of the pinned version
        top = next(p for p in Path(tmp).iterdir() if p.is_dir())
        vendored = top / "vendor" / "llama.cpp"
        if not (vendored / "CMakeLists.txt").is_file():
            raise RuntimeError(f"{archive.name} has no vendor/llama.cpp")
        if src.exists():
            shutil.rmtree(src)
        vendored.rename(src)
    return src


def _build(name: str, targets: tuple[str, ...], flags: tuple[str, ...], jobs: int | None) -> Path:
    """Configure and build `targets` into <cache>/<name>; returns its bin directory. Each target is
    built once (a `.built-<target>` marker), so adding a tool later builds only that tool."""
    version = pinned_version()
    root = cache_dir(version)
    build_dir = root / name
    bin_dir = build_dir / "bin"

    def missing() -> tuple[str, ...]:
        legacy = (build_dir / ".built").is_file()  # first builds marked the original pair at once
        return tuple(
            t
            for t in targets
            if not (build_dir / f".built-{t}").is_file()
            and not (legacy and t in ("llama-bench", "llama-quantize", "llama"))
        )

    if not missing():
        return bin_dir
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):
        todo = missing()
        if not todo:  # another process built them
            return bin_dir
        log = root / f"{name}.log"
        src = _source(root, version, log)
        # The server is configured in only when asked for (it adds a web UI and httplib to build).
        keep = (build_dir / ".built-llama-server").is_file()
        server = "ON" if "llama-server" in todo or keep else "OFF"
        _run(
            [
                "cmake", "-S", str(src), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=OFF", f"-DLLAMA_BUILD_SERVER={server}", *flags,
                *(["-G", "Ninja"] if shutil.which("ninja") else []),
            ],
            log,
        )  # fmt: skip
        _run(
            [
                "cmake", "--build", str(build_dir), "--config", "Release", "-j",
                str(jobs or os.cpu_count() or 1), "--target", *todo,
            ],
            log,
        )  # fmt: skip
        for target in todo:
            (build_dir / f".built-{target}").touch()
    return bin_dir


# A native build on an AMX CPU compiles ggml's AMX kernels, which fault on some such hosts (the
# rule in localmix.load.weight_repack). The tools are built without them everywhere, so they run
# on any host and are the "build without AMX kernels" that localmix's tokens are compared with;
# on a CPU without AMX these flags change nothing. GCC and clang let an explicit -mno-* win over
# -march=native wherever it stands on the command line.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
_NO_AMX_FLAGS = (f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}")


def build(jobs: int | None = None, tools: tuple[str, ...] = TOOLS) -> Path:
    """Build the tools that are not built yet; returns the directory that holds them (and the
    libllama / libggml they link, for LLAMA_CPP_LIB_PATH)."""
    return _build("tools", tools, _NO_AMX_FLAGS, jobs)


def repack_args() -> list[str]:
    """The weight-repacking flag that puts a tool (llama-bench, -server, -perplexity, -imatrix)
    on localmix's setting (localmix.load.weight_repack), so every ratio compares like with like."""
    from localmix import load

    return ["--repack"] if load.weight_repack() else ["--no-repack"]


def bench_repack_args() -> list[str]:
    """llama-bench's spelling of repack_args."""
    from localmix import load

    return ["--repack", "1" if load.weight_repack() else "0"]


def libraries_without_openmp(jobs: int | None = None) -> Path:
    """libllama and libggml built with GGML_OPENMP=OFF, as macOS builds are: ggml's own thread
    pool then does all the threading. For LLAMA_CPP_LIB_PATH; returns their directory."""
    return _build(
        "build-no-openmp",
        ("llama",),
        ("-DGGML_OPENMP=OFF", "-DLLAMA_BUILD_TOOLS=OFF", *_NO_AMX_FLAGS),
        jobs,
    )


def source() -> Path:
    """The vendored llama.cpp source of the pinned sdist, downloaded and unpacked once."""
    version = pinned_version()
    root = cache_dir(version)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):
        return _source(root, version, root / "source.log")


def tool(name: str) -> Path:
    """The path of a built llama.cpp tool (one of TOOLS), building only that tool on first use."""
    if name not in TOOLS:
        raise ValueError(f"unknown tool {name!r}; one of {', '.join(TOOLS)}")
    return build(tools=(name,)) / name


if __name__ == "__main__":
    for name in TOOLS:
        print(f"{name}: {tool(name)}")
