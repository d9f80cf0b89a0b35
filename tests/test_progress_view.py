"""The one progress renderer (cli/progress_view.py): a byte bar per file, a steps bar per stage
filled by its tensors, chunks or tests, retry lines in yellow, step lines, bars hidden on an
error; and every Progress any module emits names a known stage."""

from __future__ import annotations

import ast
import io
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from localmix.cli import render
from localmix.cli.progress_view import ProgressView, label
from localmix.progress import STAGES, Progress

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    console = Console(
        file=out,
        force_terminal=terminal,
        color_system="standard" if terminal else None,
        width=160,
        highlight=False,
    )
    return console, out


@pytest.fixture
def screen(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """stderr as a terminal: live bars drawn into a buffer."""
    console, out = _console(terminal=True)
    monkeypatch.setitem(render._consoles, "err", console)
    yield out


@pytest.fixture
def log(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """stderr off a terminal (a pipe, a CI log): one line per bar."""
    console, out = _console(terminal=False)
    monkeypatch.setitem(render._consoles, "err", console)
    yield out


def _download(file: str, size: int) -> list[Progress]:
    steps = (0, size // 2, size)
    return [Progress("download", subject=file, done=n, total=size, unit="bytes") for n in steps]


def _tensors(stage: str, subject: str, names: list[str]) -> list[Progress]:
    start = Progress(stage, subject=subject)
    n = len(names)
    return [start] + [
        Progress(stage, subject=name, done=i, total=n, unit="tensors")
        for i, name in enumerate(names, start=1)
    ]


def _pull() -> list[Progress]:
    """What a pull of a checkpoint emits, in order, with a dropped connection."""
    return [
        Progress("resolve", subject="org/m@main"),
        *_download("config.json", 1000),
        *_download("model.safetensors", 4 * MiB)[:2],
        Progress(
            "retry",
            subject="model.safetensors",
            done=MiB,
            total=4 * MiB,
            unit="bytes",
            detail="peer closed connection",
        ),
        *_download("model.safetensors", 4 * MiB)[1:],
        Progress("verify", subject="model.safetensors", total=4 * MiB, unit="bytes"),
        Progress("verify", subject="model.safetensors", done=4 * MiB, total=4 * MiB, unit="bytes"),
        *_tensors("convert", "F16", ["token_embd.weight", "blk.0.attn_q.weight", "output.weight"]),
        *_tensors("quantize", "Q4_K_M", ["token_embd.weight", "blk.0.attn_q.weight"]),
        Progress("register", subject="m:Q4_K_M"),
        Progress("done", subject="m:Q4_K_M"),
    ]


def _show(events: list[Progress], transient: bool = False) -> None:
    with ProgressView(transient=transient) as view:
        for event in events:
            view(event)


def test_off_a_terminal_each_bar_and_step_is_one_line_in_order(log: io.StringIO) -> None:
    _show(_pull())
    assert log.getvalue().splitlines() == [
        "resolving org/m@main",
        "↓ config.json",
        "↓ model.safetensors",  # one bar per file, however many records it gets
        "model.safetensors: peer closed connection at 1.0 MiB; resuming",
        "sha256 model.safetensors",
        "converting to F16",  # one steps bar per stage, however many tensors
        "quantizing to Q4_K_M",
        "registering m:Q4_K_M",
    ]


def test_on_a_terminal_bytes_have_sizes_and_speed_and_tensors_a_count(
    screen: io.StringIO,
) -> None:
    _show(_pull())
    raw = screen.getvalue()
    text = _ANSI.sub("", raw)
    assert "↓ model.safetensors" in text and "4.0/4.0 MiB" in text and "/s" in text
    assert "sha256 model.safetensors" in text
    assert re.search(r"converting to F16 .* 3/3 output\.weight", text), text
    assert re.search(r"quantizing to Q4_K_M .* 2/2 blk\.0\.attn_q\.weight", text), text
    # the retry line in yellow (ANSI 33), above the bars
    assert "\x1b[33mmodel.safetensors: peer closed connection at 1.0 MiB; resuming" in raw
    # registering comes after the bars it follows
    assert text.rindex("registering m:Q4_K_M") > text.rindex("quantizing to Q4_K_M")


def test_chunks_and_steps_without_a_count(screen: io.StringIO) -> None:
    events = [
        Progress("load", subject="m:F16"),
        Progress("load", subject="m:Q4_K_M"),
        Progress("tokenize", subject="m:F16"),
        Progress("eval", subject="m:Q4_K_M"),
        *[Progress("eval", subject="m:Q4_K_M", done=i, total=2, unit="chunks") for i in range(3)],
        Progress("bench", subject="m:Q4_K_M", detail="tg64"),
    ]
    _show(events)
    text = _ANSI.sub("", screen.getvalue())
    # a step that gets no count is done when the next starts; the chunks say what they count
    assert re.search(r"loading m:F16 .* 1/1", text), text
    assert re.search(r"scoring m:Q4_K_M .* 2/2 chunks", text), text
    assert "benchmarking m:Q4_K_M (tg64)" in text


def test_a_reused_stage_is_a_line(log: io.StringIO) -> None:
    _show([Progress("register", subject="tiny-mistral:Q4_K_M", reused=True)])
    assert log.getvalue() == "reusing tiny-mistral:Q4_K_M\n"


def test_tests_show_which_test_runs(screen: io.StringIO) -> None:
    _show(
        [
            Progress("bench", subject="m:Q4_K_M"),
            Progress("bench", subject="pp256", done=0, total=2, unit="tests", detail="run"),
        ]
    )
    assert re.search(r"benchmarking m:Q4_K_M .* 0/2 pp256 run", _ANSI.sub("", screen.getvalue()))


def test_the_bars_are_hidden_on_an_error(screen: io.StringIO) -> None:
    view = ProgressView()
    with pytest.raises(RuntimeError), view:
        view(_tensors("convert", "F16", ["a.weight"])[0])
        live = view._display.live  # type: ignore[union-attr]
        raise RuntimeError("boom")
    assert live.transient  # erased when it stopped: the error line stands alone


def test_labels_name_the_subject_and_the_detail() -> None:
    assert label(Progress("quantize", subject="Q8_0", detail="making m:Q8_0")) == (
        "quantizing to Q8_0 (making m:Q8_0)"
    )
    assert label(Progress("convert")) == "convert"  # no subject: the stage's name


def test_an_unknown_stage_is_refused() -> None:
    with pytest.raises(ValueError, match="calibrate"):
        Progress("calibrate")


def _emitted_stages() -> set[tuple[str, str]]:
    """(file, stage) of every `Progress("stage", ...)` written in localmix."""
    found = set()
    for path in (ROOT / "localmix").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "Progress"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                found.add((str(path.relative_to(ROOT)), str(node.args[0].value)))
    return found


def test_every_emitter_names_known_stages() -> None:
    found = _emitted_stages()
    files = {file for file, _ in found}
    for emitter in (
        "localmix/models/pull.py",
        "localmix/models/hub.py",
        "localmix/build/convert/output.py",
        "localmix/build/quantize.py",
        "localmix/build/imatrix/compute.py",
        "localmix/quality/evaluate.py",
        "localmix/quality/quants.py",
        "localmix/build/synth/builtin.py",
        "localmix/demo.py",
    ):
        assert emitter in files
    assert {stage for _, stage in found} <= set(STAGES)
