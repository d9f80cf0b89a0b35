"""llama.cpp's process-wide state: the one place `llama_cpp` is first imported (after the C++
runtime is made global, see cxx_runtime_global), the backend, initialised once, and the log,
silent unless an engine asks for it, keeping recent error lines so a NULL from C can be explained
in one line."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from collections import deque
from typing import Any

_LOG_ERROR, _LOG_CONT = 4, 5  # enum ggml_log_level (ggml.h)

# One C++ runtime symbol that libllama calls and that CUDA builds of ggml also export: the
# canary for "the global namespace resolves the C++ runtime to the real libstdc++".
CXX_CANARY = "_ZNSo9_M_insertIlEERSoT_"  # std::ostream::_M_insert<long>(long)


@functools.lru_cache(maxsize=1)
def cxx_runtime_global() -> str | None:
    """Load the C++ runtime (libstdc++) into the global symbol namespace; returns its path, or
    None where there is nothing to do (macOS and Windows use other runtimes and loaders).

    Why (measured on an H200 with CUDA 13, llama-cpp-python 0.3.36 built as the README says):
    - A CUDA build's libggml-cuda.so carries and exports its own copy of libstdc++ (2,605 std::
      symbols, 522 of them codecvt/locale internals), and libllama.so lists libggml-cuda.so among
      its dependencies ahead of libstdc++.so.6.
    - llama-cpp-python loads libllama with RTLD_LOCAL, so libllama's C++ calls are bound by
      searching its own dependency list: `operator<<(int)` and `_M_insert<unsigned long>` bind
      to the copy inside libggml-cuda.
    - A library resolves its own calls through the list of whoever loaded it first. In a short
      script libllama loads libstdc++, so libstdc++ also binds to the copy: one runtime, and it
      works. In the CLI numpy, sentencepiece and OpenCV load libstdc++ first, so libstdc++ uses
      itself while libllama uses the copy: two runtimes share one stream, and
      llama_model::print_info crashes (SIGSEGV) on every model load.
    Symbols in the global namespace are searched before any library's own list, so once
    libstdc++ is global every C++ call (libllama's, libggml-cuda's own) binds to the real
    runtime, whatever was imported before. It must happen before libllama is loaded: data
    relocations (std::cout, vtables) bind at load time."""
    if not sys.platform.startswith(("linux", "freebsd")):
        return None
    name = ctypes.util.find_library("stdc++") or "libstdc++.so.6"
    try:
        ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return None  # no libstdc++ (a libc++ system): llama.cpp then links what it links
    return loaded_from(CXX_CANARY)


def loaded_from(symbol: str) -> str | None:
    """The file that the global namespace resolves `symbol` to (dladdr), or None if it does not."""
    if not sys.platform.startswith(("linux", "freebsd")):
        return None

    class _DlInfo(ctypes.Structure):
        _fields_ = (
            ("dli_fname", ctypes.c_char_p),
            ("dli_fbase", ctypes.c_void_p),
            ("dli_sname", ctypes.c_char_p),
            ("dli_saddr", ctypes.c_void_p),
        )

    process = ctypes.CDLL(None)  # dlopen(NULL): the global namespace
    try:
        address = ctypes.c_void_p.in_dll(process, symbol)
    except ValueError:
        return None
    info = _DlInfo()
    dladdr = process.dladdr
    dladdr.argtypes = (ctypes.c_void_p, ctypes.POINTER(_DlInfo))
    if not dladdr(ctypes.addressof(address), ctypes.byref(info)) or not info.dli_fname:
        return None
    return info.dli_fname.decode(errors="replace")


def llama_cpp_module() -> Any:
    """The llama_cpp package, imported the one way localmix imports it: C++ runtime first."""
    cxx_runtime_global()  # cached; after a foreign import it still helps the lazy bindings
    import llama_cpp

    return llama_cpp


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

    def install_mtmd(self, lib: Any, mtmd: Any) -> None:
        """Route libmtmd's log here too: it logs every image's steps, at debug level."""
        self.install(lib)
        mtmd.mtmd_log_set(self._callback, None)

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
    llama_cpp = llama_cpp_module()
    if not _READY:
        llama_cpp.llama_backend_init()
        _READY.append(llama_cpp)
    return llama_cpp


def mtmd() -> Any:
    """llama-cpp-python's libmtmd bindings (images, audio), after llama() is ready; their log
    routed to LOG."""
    lib = llama()
    import llama_cpp.mtmd_cpp as bindings

    LOG.install_mtmd(lib, bindings)
    return bindings


def ggml_library() -> Any:
    """The handle that reaches libllama's own libggml: libllama's, whose symbol lookup walks its
    dependencies (libggml.so.0, libggml-base.so.0), so ggml_* calls use the device registry that
    llama.cpp loads models with.

    Not llama_cpp._ggml.libggml: that loads lib/libggml.so, which the wheel installs as a copy
    of libggml.so.0 (another inode, not a symlink), so the loader maps it a second time with a
    second registry: a backend registered there (RPC servers) is never seen by llama.cpp."""
    return llama().llama_cpp._lib
