"""ProgressView: the one renderer of the Progress records that every long job emits (pull,
convert, quantize, imatrix, eval, demo), keyed on the record's stage and unit, never on who sent it.

- download, verify: a byte bar per file (sizes, speed, ETA);
- retry: a yellow line above the bars (the download resumes);
- resolve, wait, register, and any stage reused: a dim line; register and done first end the bars
  shown, so the line follows the work it comes after;
- every other stage: a steps bar. A record without a unit starts it, named for the stage and its
  subject; records with a unit (tensors, chunks, tests) fill it, the detail column naming what is
  worked on. A bar that never gets a count (load, tokenize, synth) is marked done when the next
  one starts.

One rich display at a time (bytes or steps), switched as the stages change. Off a terminal each bar
is one line as it starts (render's LoggedProgress); on an error the bars are hidden, so the error
line stands alone.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from localmix.progress import Progress

if TYPE_CHECKING:
    from types import TracebackType

    from rich.progress import Progress as Display
    from rich.progress import TaskID

Kind = Literal["bytes", "steps"]

# What a bar or a line says, by stage; {} is the record's subject.
_LABELS = {
    "resolve": "resolving {}",
    "wait": "waiting: another localmix process is working on {}",
    "download": "↓ {}",
    "verify": "sha256 {}",
    "synth": "writing a random-weight {} checkpoint",
    "convert": "converting to {}",
    "quantize": "quantizing to {}",
    "imatrix": "computing the importance matrix of {}",
    "register": "registering {}",
    "load": "loading {}",
    "tokenize": "tokenizing the text",
    "eval": "scoring {}",
    "bench": "benchmarking {}",
}
_BYTE_STAGES = ("download", "verify")
_LINE_STAGES = ("resolve", "wait", "register", "done")


def label(event: Progress) -> str:
    """`quantizing to Q4_K_M`, `loading mistral:Q8_0 (note)`: the stage's words for its subject,
    and the record's detail in parentheses."""
    words = _LABELS.get(event.stage, "{}").format(event.subject) if event.subject else event.stage
    return f"{words} ({event.detail})" if event.detail else words


@dataclass
class _Bar:
    """A steps bar: its task, the subject it was started for, and whether it is settled (it has a
    count, or was marked done when the next bar started)."""

    task: TaskID
    subject: str
    settled: bool = False


class ProgressView:
    """An OnProgress listener that draws on stderr; use it as a context manager around the job."""

    def __init__(self, transient: bool = False) -> None:
        self._transient = transient  # bars vanish when their display ends (eval, demo)
        self._stack = contextlib.ExitStack()
        self._display: Display | None = None
        self._kind: Kind | None = None
        self._files: dict[tuple[str, str], TaskID] = {}  # byte bars by (stage, file)
        self._bars: dict[str, _Bar] = {}  # the steps bar each stage fills now

    def __enter__(self) -> ProgressView:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self._settle()
        # the error reaches the display's own context (render), which hides the bars
        self._stack.__exit__(exc_type, exc, tb)
        self._display, self._kind = None, None

    def close(self) -> None:
        """End the display shown (its bars stay as they finished, or vanish when transient); the
        next record opens another. Call it before printing on stdout: a live display on a terminal
        would take those lines over to stderr."""
        self._settle()
        self._stack.close()
        self._display, self._kind = None, None

    def say(self, text: str) -> None:
        """A line of rich markup above the live bars, or alone when none is shown."""
        from localmix.cli.render import err_console

        (self._display.console if self._display else err_console()).print(text, highlight=False)

    def __call__(self, event: Progress) -> None:
        if event.stage == "retry":
            self._retry(event)
        elif event.stage in _BYTE_STAGES:
            self._bytes(event)
        elif event.reused:
            self._line(f"reusing {event.subject}")
        elif event.stage in _LINE_STAGES:
            if event.stage in ("register", "done"):
                self.close()  # after the bars of the work it ends, not above them
            if event.stage != "done":
                self._line(label(event))
        elif event.unit:
            self._count(event)
        else:
            self._start(event)

    def _line(self, text: str) -> None:
        from rich.markup import escape

        self.say(f"[dim]{escape(text)}[/]")

    def _retry(self, event: Progress) -> None:
        from rich.markup import escape

        from localmix.cli.render import human_size

        at = human_size(event.done)
        self.say(f"[yellow]{escape(event.subject)}: {escape(event.detail)} at {at}; resuming[/]")

    def _open(self, kind: Kind) -> Display:
        from localmix.cli import render

        if self._display is None or self._kind != kind:
            self.close()
            opener = render.progress if kind == "bytes" else render.steps
            self._display = self._stack.enter_context(opener(self._transient))
            self._kind = kind
            self._files.clear()
            self._bars.clear()
        return self._display

    def _bytes(self, event: Progress) -> None:
        display = self._open("bytes")
        key = (event.stage, event.subject)
        if key not in self._files:
            self._files[key] = display.add_task(label(event), total=event.total)
        display.update(self._files[key], completed=event.done, total=event.total)

    def _start(self, event: Progress) -> None:
        display = self._open("steps")
        self._settle()
        task = display.add_task(label(event), total=None, detail="")
        self._bars[event.stage] = _Bar(task, event.subject)

    def _count(self, event: Progress) -> None:
        if event.stage not in self._bars or self._kind != "steps":
            # a count with no start announced: a bar named for the stage alone
            self._start(Progress(event.stage))
        display = self._open("steps")
        bar = self._bars[event.stage]
        bar.settled = True
        # what is worked on (a tensor, a test) when it is not what the bar was started for
        what = event.subject if event.subject != bar.subject else ""
        detail = " ".join(part for part in (what, event.detail) if part) or event.unit
        display.update(bar.task, completed=event.done, total=event.total, detail=detail)

    def _settle(self) -> None:
        """Mark the bars that never got a count done: their step ended when the next began."""
        if self._display is None:
            return
        for bar in self._bars.values():
            if not bar.settled:
                self._display.update(bar.task, total=1, completed=1)
                bar.settled = True
