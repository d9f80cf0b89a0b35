"""Saved conversations in the chats folder. The REPL writes its conversation there after every
turn (atomically: a crash mid-write leaves the previous turn's file), so a crash or a closed
terminal loses nothing; `localmix chat MODEL --resume` and the REPL's /load bring the latest back.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from localmix import settings
from localmix.errors import UsageError


def folder() -> Path:
    return settings.chats_dir()


def new_path() -> Path:
    """A file name no saved chat has yet: the time, then -2, -3 ... within one second."""
    root = folder()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = root / f"{stamp}.json", 1
    while path.exists():
        n += 1
        path = root / f"{stamp}-{n}.json"
    return path


def files() -> list[Path]:
    """The saved chats, latest first."""
    return sorted(folder().glob("*.json"), key=_mtime, reverse=True)


def latest(model: str | None = None, *, besides: Path | None = None) -> Path:
    """The chat saved last (with `model`, when given; other than `besides`); UsageError when
    there is none."""
    for path in files():
        if path == besides:
            continue
        if model is None or _model_of(path) == model:
            return path
    if model is not None:
        raise UsageError(
            f"no saved chat with {model} yet",
            hint="chat with it first (every turn is saved), or /load FILE",
        )
    raise UsageError("no saved chats yet", hint="chat first (every turn is saved), or /load FILE")


def is_autosaved(path: Path) -> bool:
    """Whether path is one of the chats folder's own files (a REPL goes on saving into it)."""
    return path.resolve().parent == folder().resolve()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _model_of(path: Path) -> str | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("model") if isinstance(data, dict) else None
