"""kill -9 and Ctrl-C (SIGINT) in the middle of pull, convert and quantize, in real processes:
afterwards no half model is listed, SIGINT exits 130 with a line saying so, and the next run of the
same operation succeeds and leaves nothing behind (a pull resumes from the bytes on disk)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import test_pull
from tests.test_pull import ROOT, Env, MiB, gguf_repo

env = test_pull.env  # the fixture with a real Hub server on 127.0.0.1
SIGNALS = [signal.SIGKILL, signal.SIGINT]


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small Mixtral checkpoint: converting and quantizing it takes long enough to interrupt."""
    from localmix.build.synth import checkpoints as synth

    return synth.checkpoint(tmp_path_factory.mktemp("small") / "ckpt", arch="mixtral", size="small")


@pytest.fixture(scope="module")
def small_f32(tmp_path_factory: pytest.TempPathFactory, small_ckpt: Path) -> Path:
    from localmix.build.convert import convert

    work = tmp_path_factory.mktemp("small-f32")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOCALMIX_HOME", str(work / "home"))
        return convert(small_ckpt, work / "small.F32.gguf", outtype="f32")


def _partials(folder: Path) -> list[Path]:
    """Partial outputs of convert / quantize in a folder (empty ones are not yet work)."""
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.name.endswith(".partial") and p.stat().st_size]


def _interrupt(env: Env, args: list[str], sig: signal.Signals, started: Callable[[], bool]) -> str:
    """Run `localmix ARGS`, send `sig` once `started()` says it is mid-work; its stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "localmix", *args],
        env=env.vars(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    deadline = time.monotonic() + 60
    while not started():  # polls what the child writes: no guess of how long it takes
        assert proc.poll() is None, "it finished before it could be interrupted"
        assert time.monotonic() < deadline, "it never started working"
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err
        assert "interrupted" in err and "Traceback" not in err, err
        assert _partials(env.home / "tmp") == []  # Ctrl-C cleans up at once
    else:
        assert proc.returncode == -signal.SIGKILL
    return err


def _run(env: Env, *args: str) -> None:
    result = env.cli(*args)
    assert result.returncode == 0, result.stderr


def _no_leftovers(env: Env) -> None:
    tmp = env.home / "tmp"
    assert not tmp.is_dir() or list(tmp.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_interrupted_pull(env: Env, tmp_path: Path, sig: signal.Signals) -> None:
    name = "i.Q4_K_M.gguf"
    repo = gguf_repo(tmp_path, "i", {name: 6 * MiB})
    size = (repo / name).stat().st_size
    env.hub.add_repo("org/i-GGUF", repo)
    env.hub.fault(name, rate=4 * MiB)  # ~1.5 s for the file
    _interrupt(env, ["pull", "hf.co/org/i-GGUF"], sig, lambda: env.hub.bytes_served(name) > MiB)
    assert env.listed() == []
    time.sleep(0.2)  # let the server count what it sent before the socket closed
    served = env.hub.bytes_served(name)

    env.hub.clear_faults()
    _run(env, "pull", "hf.co/org/i-GGUF")
    assert [m["quant"] for m in env.listed()] == ["Q4_K_M"]
    assert env.hub.bytes_served(name) < size + served  # resumed, not restarted
    assert not [p for p in env.blobs("org/i-GGUF") if p.name.endswith(".incomplete")]
    _no_leftovers(env)


@pytest.mark.slow
@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_interrupted_convert(
    env: Env, tmp_path: Path, small_ckpt: Path, sig: signal.Signals
) -> None:
    out = tmp_path / "out" / "small.F32.gguf"
    args = ["convert", str(small_ckpt), "-o", str(out), "--outtype", "f32"]
    _interrupt(env, args, sig, lambda: bool(_partials(env.home / "tmp")))
    assert not out.exists()

    _run(env, *args)
    assert out.is_file() and list(out.parent.iterdir()) == [out]
    _no_leftovers(env)


@pytest.mark.slow
@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_interrupted_quantize(env: Env, small_f32: Path, sig: signal.Signals) -> None:
    _run(env, "import", str(small_f32), "--name", "m", "--copy")
    args = ["quantize", "m", "-q", "Q4_K_M", "--threads", "1"]
    _interrupt(env, args, sig, lambda: bool(_partials(env.home / "tmp")))
    assert [m["quant"] for m in env.listed()] == ["F32"]  # no half model

    _run(env, *args)
    assert [m["quant"] for m in env.listed()] == ["F32", "Q4_K_M"]
    _no_leftovers(env)
