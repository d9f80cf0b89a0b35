"""The text that `eval` measures on and `imatrix` calibrates on: a user's file, or the default that
ships with localmix so neither needs a download.

The default is the Python Language Reference as CPython ships it in `pydoc_data.topics` (the text
`help("if")` prints), English prose with grammar and code, about 64k tokens. It is copied into the
package once (`python -m localmix.corpus > localmix/data/langref.txt`) so every machine measures the
same text whatever its Python version. Source: docs.python.org/3/reference, Python Software
Foundation; license: PSF License Version 2 (the documentation's own license).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from localmix.errors import UsageError

DEFAULT_NAME = "langref"
SOURCE = "Python Language Reference (CPython's pydoc_data.topics)"
LICENSE = "PSF-2.0"
_LIMIT = 256 * 1024  # bytes of the default: ~64k tokens, 128 chunks of 512, enough for both tools


@dataclass(frozen=True)
class Text:
    """A text to run models over, with where it came from (reports and imatrix datasets name it)."""

    name: str
    text: str
    source: str
    license: str | None = None


def default() -> Text:
    """The shipped default text."""
    from importlib.resources import files

    text = files("localmix").joinpath("data", f"{DEFAULT_NAME}.txt").read_text(encoding="utf-8")
    return Text(DEFAULT_NAME, text, SOURCE, LICENSE)


def read(path: Path | None) -> Text:
    """A user's UTF-8 text file, or the default when `path` is None; UsageError for anything else."""
    if path is None:
        return default()
    path = Path(path)
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise UsageError(f"{path} is a directory, not a text file") from None
    except FileNotFoundError:
        raise UsageError(f"no such text file: {path}") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    if b"\x00" in raw[:65536]:
        raise UsageError(
            f"{path} is not a text file (it has NUL bytes)", hint="give a UTF-8 text file"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"{path} is not UTF-8 text (byte {exc.start})", hint="convert it with iconv first"
        ) from None
    if not text.strip():
        raise UsageError(f"{path} is empty")
    return Text(path.name, text, str(path))


def build_default(limit: int = _LIMIT) -> str:
    """The default text, rebuilt from this Python's pydoc topics: whole topics in name order up to
    `limit` bytes of UTF-8."""
    from pydoc_data.topics import topics

    parts: list[str] = []
    size = 0
    for name in sorted(topics):
        body = topics[name].strip() + "\n\n"
        size += len(body.encode("utf-8"))
        if size > limit:
            break
        parts.append(body)
    return "".join(parts)


if __name__ == "__main__":
    import sys

    sys.stdout.write(build_default())
