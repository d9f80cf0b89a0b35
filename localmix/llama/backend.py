"""llama.cpp's process-wide state: the backend, initialised once, and the log, silent unless an
engine asks for it, keeping recent error lines so a NULL from C can be explained in one line."""

from __future__ import annotations

import sys
from collections import deque
from typing import Any

_LOG_ERROR, _LOG_CONT = 4, 5  # enum ggml_log_level (ggml.h)


class LlamaLog:
    """The receiver of llama.cpp's log callback."""

    def __init__(self) -> None:
        self.verbose = False
        self.errors: deque[str] = deque(maxlen=8)
        self._level = 0
        self._callback: Any = None  # the ctypes callback must outlive every C call that logs

    def install(self, lib: Any) -> None:
        """Route llama.cpp's log here (again: quantize swaps it for its own while it runs)."""
        if self._callback is None:
            self._callback = lib.llama_log_callback(self._receive)
        lib.llama_log_set(self._callback, None)

    def last_error(self, default: str) -> str:
        return self.errors[-1] if self.errors else default

    def _receive(self, level: int, text: bytes | None, _user: Any) -> None:
        if not text:
            return
        self._level = self._level if level == _LOG_CONT else level
        message = text.decode("utf-8", errors="replace")
        if self.verbose:
            sys.stderr.write(message)  # opted in: llama.cpp's own log, passed through
        if self._level == _LOG_ERROR and message.strip():
            self.errors.append(message.strip())


LOG = LlamaLog()
_READY: list[Any] = []


def llama() -> Any:
    """The llama_cpp module, its backend initialised (once per process)."""
    import llama_cpp

    if not _READY:
        llama_cpp.llama_backend_init()
        _READY.append(llama_cpp)
    return llama_cpp
