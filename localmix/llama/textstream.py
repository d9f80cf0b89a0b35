"""Token pieces (bytes) → text chunks: never a split UTF-8 character, never a stop string."""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextStream:
    """Feed token pieces; get text that is safe to show. With stop strings, text that could be the
    start of one is held back until the next piece settles it."""

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._pending = ""
        self.stopped = False

    def feed(self, piece: bytes) -> str:
        """Text that became final with this piece; sets `stopped` when a stop string completed."""
        text = self._decoder.decode(piece)
        if not self._stop:
            return text
        # _pending is at most _hold characters, so this searches only the tail.
        pending = self._pending + text
        hits = [i for i in (pending.find(s) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            self._pending = ""
            return pending[: min(hits)]
        keep = self._partial_stop(pending)
        self._pending = pending[len(pending) - keep :]
        return pending[: len(pending) - keep]

    def flush(self) -> str:
        """What is left at the end (an incomplete character becomes U+FFFD)."""
        if self.stopped:
            return ""
        text = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return text

    def _partial_stop(self, text: str) -> int:
        """Length of the longest tail of text that begins some stop string."""
        for size in range(min(self._hold, len(text)), 0, -1):
            tail = text[-size:]
            if any(s.startswith(tail) for s in self._stop):
                return size
        return 0
