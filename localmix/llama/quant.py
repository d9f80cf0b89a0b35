"""llama_model_quantize through llama-cpp-python, with llama.cpp's per-tensor log turned into progress."""

from __future__ import annotations

import ctypes
import re
from collections.abc import Callable
from pathlib import Path

# llama.cpp logs "[  12/ 291] blk.0.attn_q.weight - [...], type = f16, converting to q4_K .."
_LOG_LEVEL_ERROR = 4  # enum ggml_log_level (ggml.h)
_TENSOR_LINE = re.compile(rb"\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")


def model_quantize(
    src: Path,
    dst: Path,
    ftype: int,
    threads: int,
    *,
    allow_requantize: bool = False,
    on_tensor: Callable[[int, int, str], None] | None = None,
    on_error: Callable[[str], None] | None = None,
) -> int:
    """Run llama_model_quantize(src -> dst); returns llama.cpp's status (0 = success).

    on_tensor(index, total, name) is called as llama.cpp starts each tensor; on_error gets
    llama.cpp's error lines, so a failure can be explained in one line.
    """
    from localmix.llama.backend import llama

    llama_cpp = llama()

    def log(level: int, text: bytes | None, _user: ctypes.c_void_p) -> None:
        if not text:
            return
        match = _TENSOR_LINE.match(text)
        if match and on_tensor:
            on_tensor(int(match[1]), int(match[2]), match[3].decode(errors="replace"))
        elif level == _LOG_LEVEL_ERROR and on_error:
            on_error(text.decode(errors="replace").strip())

    callback = llama_cpp.llama_log_callback(log)
    old_callback = llama_cpp.llama_log_callback()
    old_user = ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(old_callback), ctypes.byref(old_user))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    params.allow_requantize = allow_requantize
    llama_cpp.llama_log_set(callback, None)
    try:
        return int(
            llama_cpp.llama_model_quantize(
                str(src).encode(), str(dst).encode(), ctypes.byref(params)
            )
        )
    finally:
        llama_cpp.llama_log_set(old_callback, old_user)
