"""llama.cpp's RPC backend as a library to load (llama/rpc.py loads it): the wheel's own
libggml-rpc where llama-cpp-python was built with -DGGML_RPC=on, else a GGML_BACKEND_DL plug-in
compiled here from the vendored ggml-rpc of the same llama-cpp-python's sdist against the wheel's
libggml-base (one g++ call, seconds), once per llama-cpp-python version and ggml commit, into the
user cache: staged in a temporary folder, renamed into place, under a lock against two builders.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from localmix.errors import EngineError
from localmix.llama.rpc import PROTOCOL

PLUGIN = "libggml-rpc.so"
_SUPPORTED_PLATFORMS = ("linux",)  # where the build (GNU ld's version script) is known to work


def reinstall_hint() -> str:
    """How to install a llama-cpp-python whose build has the RPC backend."""
    from localmix.llama.hardware import _REBUILD

    return f"install llama-cpp-python with its RPC backend: {_REBUILD.format(flag='RPC')}"


def ggml_commit() -> str:
    """The ggml commit llama.cpp was built from ("0c1e570-dirty")."""
    from localmix.llama.lib import _declare, _ggml

    lib = _ggml()
    _declare(lib, "ggml_commit", ctypes.c_char_p)
    return (lib.ggml_commit() or b"unknown").decode(errors="replace")


def _lib_dir() -> Path:
    from localmix.llama.backend import llama

    return Path(llama().llama_cpp._base_path)


def _plugin_path() -> tuple[str, Path]:
    """The plug-in's cache key (llama-cpp-python version and ggml commit) and where it lives."""
    from localmix import settings
    from localmix.llama.backend import llama

    version = str(llama().__version__)
    key = re.sub(r"[^A-Za-z0-9._-]", "_", f"{version}-{ggml_commit()}")
    return version, settings.cache_dir() / "llama.cpp-rpc" / key / PLUGIN


def available() -> tuple[str, Path | None]:
    """Whether this install has the RPC backend, without building it: ("wheel", its
    libggml-rpc), ("plug-in", the one built into the cache), or ("none", None)."""
    shipped = _lib_dir() / PLUGIN
    if shipped.is_file():
        return "wheel", shipped
    _, built = _plugin_path()
    return ("plug-in", built) if built.is_file() else ("none", None)


def plugin() -> Path:
    """The RPC backend to load into llama.cpp: the wheel's own libggml-rpc if it has one, else
    the plug-in built for this llama.cpp under the cache (built first if missing, once, under a
    lock; EngineError with how to install an RPC build where it cannot be built)."""
    shipped = _lib_dir() / PLUGIN
    if shipped.is_file():
        return shipped
    from localmix import disk

    version, built = _plugin_path()
    if built.is_file():
        return built
    root = disk.ensure_dir(built.parent.parent)
    key = built.parent.name
    with disk.file_lock(root / f"{key}.lock"):
        if not built.is_file():  # another process may have built it while this one waited
            _build(version, built)
    return built


def _build(version: str, target: Path) -> None:
    """Compile ggml-rpc as a GGML_BACKEND_DL plug-in against the wheel's libggml-base, from the
    llama-cpp-python sdist's vendored source; staged, then renamed onto `target`."""
    from localmix import disk

    if not sys.platform.startswith(_SUPPORTED_PLATFORMS):
        raise EngineError(
            f"this llama-cpp-python has no RPC backend, and localmix builds one only on Linux "
            f"(not {sys.platform})",
            hint=reinstall_hint(),
        )
    compiler = _compiler()
    base = _lib_dir() / "libggml-base.so.0"
    if not base.is_file():
        raise EngineError(f"llama-cpp-python has no {base.name} in {base.parent} to build against")
    with tempfile.TemporaryDirectory(dir=target.parent.parent, prefix=".build-") as tmp:
        work = Path(tmp)
        source = _vendored_source(version, work)
        _check_protocol(source / "ggml" / "include" / "ggml-rpc.h")
        exports = work / "exports.map"
        exports.write_text(
            "{ global: ggml_backend_init; ggml_backend_score; ggml_backend_rpc_*; "
            "ggml_backend_is_rpc; local: *; };\n"
        )
        staged = work / PLUGIN
        rpc = source / "ggml" / "src" / "ggml-rpc"
        command = [
            compiler, "-std=c++17", "-O2", "-DNDEBUG", "-fPIC", "-fvisibility=hidden",
            f"-fmacro-prefix-map={source}/=",
            "-DGGML_BACKEND_DL", "-DGGML_BACKEND_BUILD", "-DGGML_BACKEND_SHARED",
            "-DGGML_SHARED", "-DGGML_BUILD",
            f"-I{source / 'ggml' / 'include'}", f"-I{source / 'ggml' / 'src'}", f"-I{rpc}",
            "-shared", "-o", str(staged), str(rpc / "ggml-rpc.cpp"), str(rpc / "transport.cpp"),
            str(base), f"-Wl,-rpath,{base.parent}", "-Wl,--no-undefined",
            f"-Wl,--version-script={exports}", "-pthread",
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not staged.is_file():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise EngineError(
                f"could not build llama.cpp's RPC backend with {compiler}: {last}",
                hint=reinstall_hint(),
            )
        disk.ensure_dir(target.parent)
        disk.publish(staged, target)


def _compiler() -> str:
    for name in (os.environ.get("CXX", ""), "c++", "g++", "clang++"):
        found = shutil.which(name) if name else None
        if found:
            return found
    raise EngineError(
        "this llama-cpp-python has no RPC backend, and building one needs a C++ compiler "
        "(g++ or clang++; none on PATH)",
        hint="install one (Debian/Ubuntu: apt install g++), or " + reinstall_hint(),
    )


def _vendored_source(version: str, work: Path) -> Path:
    """ggml's headers and RPC sources from the llama-cpp-python `version` sdist (through pip,
    whose cache makes later calls local), unpacked under work/src."""
    download = work / "sdist"
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--quiet", "--dest", str(download), f"llama-cpp-python=={version}",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    archives = sorted(download.glob("llama_cpp_python-*.tar.gz")) if download.is_dir() else []
    if done.returncode != 0 or not archives:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise EngineError(
            f"this llama-cpp-python has no RPC backend, and pip could not fetch the "
            f"llama-cpp-python {version} source to build one: {last}",
            hint="run it once where the package index is reachable (what it builds is kept "
            "in the cache), or " + reinstall_hint(),
        )
    source = work / "src"
    marker = "/vendor/llama.cpp/"
    with tarfile.open(archives[0], "r:gz") as tar:
        for member in tar:
            inner = member.name.partition(marker)[2]
            if not member.isfile() or not _wanted(inner):
                continue
            out = source / inner
            out.parent.mkdir(parents=True, exist_ok=True)
            reader = tar.extractfile(member)
            if reader is not None:
                with reader, open(out, "wb") as writer:
                    shutil.copyfileobj(reader, writer)
    if not (source / "ggml" / "src" / "ggml-rpc" / "ggml-rpc.cpp").is_file():
        raise EngineError(f"{archives[0].name} has no vendored ggml-rpc to build")
    return source


def _wanted(inner: str) -> bool:
    """ggml's public headers, its src/ headers and the RPC backend's sources."""
    parts = inner.split("/")
    if not inner or ".." in parts:
        return False
    return (
        inner.startswith(("ggml/include/", "ggml/src/ggml-rpc/"))
        or (len(parts) == 3 and parts[:2] == ["ggml", "src"] and inner.endswith(".h"))
    )  # fmt: skip


def _check_protocol(header: Path) -> None:
    text = header.read_text(errors="replace")
    found = tuple(
        int(m[1]) if (m := re.search(rf"RPC_PROTO_{part}_VERSION\s+(\d+)", text)) else -1
        for part in ("MAJOR", "MINOR", "PATCH")
    )
    if found != PROTOCOL:
        raise EngineError(
            f"the vendored ggml-rpc speaks protocol {'.'.join(map(str, found))}; this localmix "
            f"knows {'.'.join(map(str, PROTOCOL))}",
            hint="install the llama-cpp-python version localmix pins",
        )
