"""mistral-vibe, Mistral's coding agent from PyPI, for the end-to-end test against `localmix serve`.

vibe needs Python >= 3.12 and the suite runs on 3.11, so vibe gets its own interpreter: CPython
built from Debian's verified source tarball (deb.debian.org is reachable wherever PyPI is, and
python.org may not be), then a venv with the pinned vibe and its exact pins from PyPI. Both are
built on first use and kept in the user cache, beside llama.cpp's reference tools, under the same
file lock and logged runs (benchmarks/llamacpp_tools.py), so a second call costs nothing. With no
cache and no way to download, the test skips; any other failure fails it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .llamacpp_reference import _tools

# The newest mistral-vibe whose pins all resolve to wheels on CPython 3.13: 3.0.3 pins
# certifi==2026.10.19, a release PyPI does not list (it has 2026.10.18 and 2026.10.19.post1).
VIBE = "3.0.2"
PYTHON = "3.13.5"
PYTHON_SOURCE = (
    "http://deb.debian.org/debian/pool/main/p/python3.13/python3.13_3.13.5.orig.tar.xz",
    "93e583f243454e6e9e4588ca2c2662206ad961659863277afcdb96801647d640",
)
# pip (https) and vibe's own deps need these; a build that silently lacks one is a failed build.
REQUIRED_MODULES = "ssl, ctypes, sqlite3, lzma, bz2, zlib"
# pip's words when it cannot reach an index: the machine is offline, not the install broken.
OFFLINE = ("Failed to establish a new connection", "Temporary failure in name resolution",
           "Network is unreachable", "No address associated with hostname")  # fmt: skip


def vibe() -> Path:
    """The `vibe` executable of a venv with mistral-vibe==VIBE (built if needed)."""
    root = _cache() / f"mistral-vibe-{VIBE}-py{PYTHON}"
    exe = root / "venv" / "bin" / "vibe"
    if (root / ".installed").is_file():
        return exe
    python = interpreter()
    tools = _tools()
    with tools._locked(root / ".lock"):
        if (root / ".installed").is_file():  # another process installed it
            return exe
        _install(python, root)
    return exe


def interpreter() -> Path:
    """python3.13 of CPython PYTHON built from Debian's source (built if needed)."""
    root = _cache() / f"cpython-{PYTHON}"
    python = root / "prefix" / "bin" / "python3.13"
    if (root / ".built").is_file():
        return python
    tools = _tools()
    with tools._locked(root / ".lock"):
        if not (root / ".built").is_file():
            _build_python(root)
    return python


def _cache() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("localmix", appauthor=False))


def _env() -> dict[str, str]:
    """This process's environment without what points a Python at the suite's 3.11 venv."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    return {k: v for k, v in os.environ.items() if k not in drop}


def _nice() -> list[str]:
    # The build shares a small machine with benchmarks: it yields to them.
    return ["nice", "-n", "10"] if shutil.which("nice") else []


def _build_python(root: Path) -> None:
    log = root / "build.log"
    archive = _download(root)
    for stale in ("src", "prefix"):
        shutil.rmtree(root / stale, ignore_errors=True)
    src = _unpack(archive, root)
    run, env, nice = _tools()._run, _env(), _nice()
    # No --enable-optimizations: PGO triples the build time and vibe is I/O-bound.
    run(["./configure", f"--prefix={root / 'prefix'}", "--without-ensurepip",
         "--disable-test-modules"], log, cwd=src, env=env)  # fmt: skip
    run([*nice, "make", f"-j{os.cpu_count() or 2}"], log, cwd=src, env=env)
    run([*nice, "make", "install"], log, cwd=src, env=env)
    python = root / "prefix" / "bin" / "python3.13"
    run([str(python), "-c", f"import {REQUIRED_MODULES}"], log, env=env)
    shutil.rmtree(src)  # ~500 MB of objects; the prefix is all that is used
    (root / ".built").touch()


def _download(root: Path) -> Path:
    """The source tarball, fetched once and checked against its sha256."""
    url, sha256 = PYTHON_SOURCE
    archive = root / Path(url).name
    if archive.is_file() and _sha256(archive) == sha256:
        return archive
    part = archive.with_suffix(".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as reply, part.open("wb") as out:
            shutil.copyfileobj(reply, out)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
        part.unlink(missing_ok=True)
        pytest.skip(f"no cached CPython {PYTHON} for mistral-vibe and {url} unreachable: {error}")
    if (got := _sha256(part)) != sha256:
        part.unlink()
        raise RuntimeError(f"{url}: sha256 {got}, expected {sha256}")
    part.rename(archive)
    return archive


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _unpack(archive: Path, root: Path) -> Path:
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 refuses unsafe members
                tar.extractall(tmp, filter="data")
            else:
                tar.extractall(tmp)  # older Pythons: the archive's sha256 was checked
        (top,) = Path(tmp).iterdir()
        src = root / "src"
        top.rename(src)
    return src


def _install(python: Path, root: Path) -> None:
    log = root / "install.log"
    venv = root / "venv"
    shutil.rmtree(venv, ignore_errors=True)
    run, env = _tools()._run, _env()
    run([str(python), "-m", "venv", str(venv)], log, env=env)
    # Wheels only: an sdist of vibe would build its Rust parts with cargo, from the network.
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--only-binary", ":all:"]
    try:
        run([*_nice(), *pip, f"mistral-vibe=={VIBE}"], log, env=env)
    except RuntimeError:
        if any(words in log.read_text(errors="replace") for words in OFFLINE):
            pytest.skip(f"mistral-vibe {VIBE} is not cached and PyPI is unreachable (log {log})")
        raise
    run([str(venv / "bin" / "vibe"), "--version"], log, env=env)
    (root / ".installed").touch()
