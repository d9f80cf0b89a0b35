"""The one progress record every long job emits (pull, download, convert, quantize, imatrix, eval,
bench within the demo), so one renderer in cli/ shows them all without guessing at field names.

A job calls `on_progress(Progress(...))`; it never prints. The fields mean the same everywhere:

- `stage`: what the job is doing, from STAGES (a renderer keys its bars by it);
- `subject`: what the stage works on (a file, a tensor, a model, a test), "" when nothing;
- `done` of `total` in `unit`: a record without a unit says the stage starts (on `subject`), one
  with a unit counts its work (total None: not known yet);
- `detail`: one line for people (a retry's reason, a stage's note);
- `reused`: the stage found its result already made and skipped the work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Unit = Literal["", "bytes", "tensors", "chunks", "tests"]

# Stages with a count (bars): download, verify (sha256), convert and quantize (tensors), imatrix
# and eval (chunks), bench (tests; the demo's short bench, and eval's speed test). Stages without
# one are steps a job announces: resolve, wait (for a lock), synth, register, load, tokenize,
# done; retry says a download resumes, at `done` bytes, for the reason in `detail`.
STAGES = (
    "resolve",
    "wait",
    "download",
    "verify",
    "retry",
    "synth",
    "convert",
    "quantize",
    "imatrix",
    "register",
    "load",
    "tokenize",
    "eval",
    "bench",
    "done",
)


@dataclass(frozen=True)
class Progress:
    """One progress report of a long job; see the module docstring for what each field means."""

    stage: str
    subject: str = ""
    done: int = 0
    total: int | None = None
    unit: Unit = ""
    detail: str = ""
    reused: bool = False

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"unknown progress stage {self.stage!r}")


OnProgress = Callable[[Progress], None]


def ignore(_: Progress) -> None:
    """The listener for a caller that shows nothing."""
