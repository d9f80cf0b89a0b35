"""Concurrent commands on one model, in real processes: the check for a model and its write happen
under the model's lock. No sleeps: each step waits for what the other process says it is doing."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from localmix.models import store

ROOT = Path(__file__).resolve().parents[1]
# spawn: a child starts clean instead of inheriting a forked copy of llama.cpp's state
_MP = multiprocessing.get_context("spawn")
_TIMEOUT_S = 60


def _quantize_child(home: str, said: Any, go: Any | None) -> None:
    """Quantize m to Q4_K_M; says "waiting" when it has to wait for the lock, "working" at the
    first tensor (then, if given, waits for `go`), and ("done", tensors seen, created) at the end."""
    os.environ["LOCALMIX_HOME"] = home
    from localmix.build import quantize
    from localmix.progress import Progress

    tensors = 0

    def progress(event: Progress) -> None:
        nonlocal tensors
        if event.unit != "tensors":
            return  # the start of the stage, before any tensor
        tensors += 1
        if tensors == 1:
            said.put("working")
            if go is not None:
                go.wait(_TIMEOUT_S)

    manifest = quantize.quantize_model(
        "m", "Q4_K_M", threads=1, progress=progress, on_wait=lambda: said.put("waiting")
    )
    said.put(("done", tensors, manifest.created))


@pytest.fixture
def f16_model(localmix_home: Path, tiny_mistral_gguf_f16: Path) -> Path:
    from localmix.models import pull

    return pull.import_gguf(tiny_mistral_gguf_f16, name="m", copy=True).file


def _start(home: Path, said: Any, go: Any | None = None) -> Any:
    child = _MP.Process(target=_quantize_child, args=(str(home), said, go))
    child.start()
    return child


@pytest.mark.slow
def test_two_quantizes_of_one_model_do_the_work_once(localmix_home: Path, f16_model: Path) -> None:
    said = _MP.Queue()
    with store.lock("m"):  # both children start while the model is busy: both must wait
        children = [_start(localmix_home, said), _start(localmix_home, said)]
        assert [said.get(timeout=_TIMEOUT_S) for _ in children] == ["waiting", "waiting"]
    messages = [said.get(timeout=_TIMEOUT_S) for _ in range(3)]  # one "working", two "done"
    for child in children:
        child.join(_TIMEOUT_S)
        assert child.exitcode == 0
    done = sorted(m for m in messages if m != "working")
    assert messages.count("working") == 1
    assert done[0][1] == 0 and done[1][1] > 0  # the second found the first one's result
    assert done[0][2] == done[1][2]  # the same registration
    assert [m.ref for m in store.list_models()] == ["m:F16", "m:Q4_K_M"]


@pytest.mark.slow
def test_rm_racing_a_quantize_leaves_nothing_registered(
    localmix_home: Path, f16_model: Path
) -> None:
    said, go = _MP.Queue(), _MP.Event()
    child = _start(localmix_home, said, go)
    assert said.get(timeout=_TIMEOUT_S) == "working"  # the quantize holds the lock, mid-work
    rm = subprocess.Popen(
        [sys.executable, "-m", "localmix", "rm", "m"],
        env={**os.environ, "LOCALMIX_HOME": str(localmix_home)},
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert rm.stderr is not None
    first = rm.stderr.readline()
    assert first.startswith("waiting"), first + rm.stderr.read()  # rm waits for the quantize
    go.set()
    rest = rm.stderr.read()
    assert rm.wait(_TIMEOUT_S) == 0, rest
    assert "removed m:Q4_K_M" in rest and "removed m:F16" in rest
    assert store.list_models() == []
    assert not (localmix_home / "models" / "m").exists()
    child.join(_TIMEOUT_S)
    assert child.exitcode == 0 and said.get(timeout=_TIMEOUT_S)[0] == "done"
