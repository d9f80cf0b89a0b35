"""llama_model_quantize through llama-cpp-python, with llama.cpp's per-tensor log turned into progress."""

from __future__ import annotations

import ctypes
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from localmix.build.imatrix.files import Imatrix

# llama.cpp logs "[  12/ 291] blk.0.attn_q.weight - [...], type = f16, converting to q4_K .."
_LOG_LEVEL_ERROR = 4  # enum ggml_log_level (ggml.h)
_TENSOR_LINE = re.compile(rb"\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")
_KV_INT, _KV_STR = 0, 3  # enum llama_model_kv_override_type


def _imatrix_params(params: Any, imatrix: Imatrix, llama_cpp: Any) -> list[Any]:
    """Point params at the importance values and at the metadata llama-quantize records with
    them (the same keys and values, so the output matches llama-quantize's byte for byte).
    Returns what must stay alive until llama_model_quantize returns."""
    entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix.values) + 1))()
    names = []
    for index, (name, values) in enumerate(imatrix.values.items()):
        names.append(name.encode())
        entries[index].name = names[-1]
        entries[index].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[index].size = values.size
    params.imatrix = entries  # the zeroed last entry (name NULL) ends the list
    metadata: list[tuple[str, int | str]] = [("quantize.imatrix.file", str(imatrix.path))]
    if imatrix.datasets:
        metadata.append(("quantize.imatrix.dataset", imatrix.datasets[0]))
    metadata.append(("quantize.imatrix.entries_count", len(imatrix.values)))
    if imatrix.chunks > 0:
        metadata.append(("quantize.imatrix.chunks_count", imatrix.chunks))
    overrides = (llama_cpp.llama_model_kv_override * (len(metadata) + 1))()
    for index, (key, value) in enumerate(metadata):
        slot = overrides[index]
        slot.key = key.encode()
        if isinstance(value, int):
            slot.tag, slot.value.val_i64 = _KV_INT, value
        else:
            slot.tag, slot.value.val_str = _KV_STR, value.encode()[:127]
    params.kv_overrides = overrides  # the zeroed last entry (empty key) ends the list
    return [entries, names, overrides, imatrix]


def model_quantize(
    src: Path,
    dst: Path,
    ftype: int,
    threads: int,
    *,
    allow_requantize: bool = False,
    imatrix: Imatrix | None = None,
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
    keepalive = _imatrix_params(params, imatrix, llama_cpp) if imatrix is not None else []
    llama_cpp.llama_log_set(callback, None)
    try:
        return int(
            llama_cpp.llama_model_quantize(
                str(src).encode(), str(dst).encode(), ctypes.byref(params)
            )
        )
    finally:
        llama_cpp.llama_log_set(old_callback, old_user)
        del keepalive
