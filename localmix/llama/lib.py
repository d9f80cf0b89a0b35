"""The one room for ctypes that llama-cpp-python 0.3.36 does not bind.

ggml's backend-device API (devices, their memory and buffer types), llama_model_params'
devices, tensor_split and tensor_buft_overrides, the CPU backend's thread pools and a lean logits getter for the decode
loop. Nothing ctypes leaves this module: callers get records, plain values and opaque handles.
"""

from __future__ import annotations

import ctypes
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from localmix.errors import UsageError

CPU_BUFFER_TYPE = "CPU"

# enum ggml_backend_dev_type (ggml-backend.h), in declaration order.
_DEVICE_KINDS = ("cpu", "gpu", "igpu", "accel", "meta")


@dataclass(frozen=True)
class BackendDevice:
    """One ggml backend device as the loaded llama.cpp build sees it."""

    name: str  # "CPU", "CUDA0", "Metal", "Vulkan0", ...
    description: str
    kind: str  # "cpu" | "gpu" | "igpu" | "accel" | "meta"
    backend: str  # the registry that owns it: "CPU", "CUDA", "Metal", ...
    free_bytes: int
    total_bytes: int
    buffer_type: str  # the name tensor overrides use for this device


class _Override(ctypes.Structure):
    """struct llama_model_tensor_buft_override { const char * pattern; ggml_backend_buffer_type_t buft; }"""

    _fields_ = (("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p))


@dataclass(frozen=True)
class OverrideKeepalive:
    """The C array behind model_params.tensor_buft_overrides; keep it until the model is loaded."""

    array: Any
    patterns: tuple[bytes, ...]
    overrides: tuple[tuple[str, str], ...]


class _ThreadpoolParams(ctypes.Structure):
    """struct ggml_threadpool_params (ggml.h); GGML_MAX_N_THREADS is 512."""

    _fields_ = (
        ("cpumask", ctypes.c_bool * 512),
        ("n_threads", ctypes.c_int),
        ("prio", ctypes.c_int),
        ("poll", ctypes.c_uint32),
        ("strict_cpu", ctypes.c_bool),
        ("paused", ctypes.c_bool),
    )


def _declare(lib: ctypes.CDLL, name: str, restype: Any, *argtypes: Any) -> None:
    function = getattr(lib, name)
    function.restype = restype
    function.argtypes = list(argtypes)


@functools.lru_cache(maxsize=1)
def _ggml() -> ctypes.CDLL:
    """libggml as libllama reaches it (backend.ggml_library: the same device registry)."""
    from localmix.llama.backend import ggml_library, llama

    llama_cpp = llama()  # through backend, the one importer of llama_cpp (C++ runtime first)
    lib = ggml_library()
    p, c = ctypes.c_void_p, ctypes.c_char_p
    size = ctypes.c_size_t
    _declare(lib, "ggml_backend_dev_count", size)
    _declare(lib, "ggml_backend_dev_get", p, size)
    _declare(lib, "ggml_backend_dev_by_name", p, c)
    _declare(lib, "ggml_backend_dev_name", c, p)
    _declare(lib, "ggml_backend_dev_description", c, p)
    _declare(lib, "ggml_backend_dev_memory", None, p, ctypes.POINTER(size), ctypes.POINTER(size))
    _declare(lib, "ggml_backend_dev_type", ctypes.c_int, p)
    _declare(lib, "ggml_backend_dev_buffer_type", p, p)
    _declare(lib, "ggml_backend_dev_backend_reg", p, p)
    _declare(lib, "ggml_backend_reg_count", size)
    _declare(lib, "ggml_backend_reg_get", p, size)
    _declare(lib, "ggml_backend_reg_name", c, p)
    _declare(lib, "ggml_backend_buft_name", c, p)
    _declare(lib, "ggml_backend_cpu_buffer_type", p)
    _declare(lib, "ggml_backend_load_all_from_path", None, c)
    _declare(lib, "ggml_backend_reg_by_name", p, c)
    _declare(lib, "ggml_backend_reg_get_proc_address", p, p, c)
    _declare(
        lib, "ggml_threadpool_params_init", None, ctypes.POINTER(_ThreadpoolParams), ctypes.c_int
    )
    if lib.ggml_backend_dev_count() == 0:
        # A GGML_BACKEND_DL build registers nothing until its backend libraries are loaded.
        lib_dir = llama_cpp.llama_cpp._base_path
        lib.ggml_backend_load_all_from_path(str(lib_dir).encode())
    return lib


def _text(value: bytes | None) -> str:
    return value.decode(errors="replace") if value else ""


def backends() -> tuple[str, ...]:
    """Names of the backends compiled into (or loaded by) this llama.cpp build: CPU, CUDA, Metal..."""
    lib = _ggml()
    return tuple(
        _text(lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i)))
        for i in range(lib.ggml_backend_reg_count())
    )


def devices() -> tuple[BackendDevice, ...]:
    """Every backend device with its free and total memory (bytes), as ggml reports them."""
    lib = _ggml()
    found = []
    for index in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(index)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        kind = lib.ggml_backend_dev_type(dev)
        buft = lib.ggml_backend_dev_buffer_type(dev)
        reg = lib.ggml_backend_dev_backend_reg(dev)
        found.append(
            BackendDevice(
                name=_text(lib.ggml_backend_dev_name(dev)),
                description=_text(lib.ggml_backend_dev_description(dev)),
                kind=_DEVICE_KINDS[kind] if 0 <= kind < len(_DEVICE_KINDS) else str(kind),
                backend=_text(lib.ggml_backend_reg_name(reg)) if reg else "",
                free_bytes=int(free.value),
                total_bytes=int(total.value),
                buffer_type=_text(lib.ggml_backend_buft_name(buft)) if buft else "",
            )
        )
    return tuple(found)


def local_offload_devices() -> tuple[str, ...]:
    """The local devices llama.cpp offloads to when it chooses (llama_prepare_model_devices): the
    GPUs, else the integrated GPUs of the first backend that has one; never a remote (RPC) one."""
    local = [d for d in devices() if d.backend != "RPC"]
    gpus = [d.name for d in local if d.kind == "gpu"]
    if gpus:
        return tuple(gpus)
    igpus = [d for d in local if d.kind == "igpu"]
    return tuple(d.name for d in igpus if d.backend == igpus[0].backend)


def _buffer_types() -> dict[str, int]:
    """Buffer type name -> ggml_backend_buffer_type_t, as llama.cpp's --override-tensor builds it."""
    lib = _ggml()
    table: dict[str, int] = {}
    for index in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(index)
        buft = lib.ggml_backend_dev_buffer_type(dev)
        if buft:
            table[_text(lib.ggml_backend_buft_name(buft))] = buft
            table.setdefault(_text(lib.ggml_backend_dev_name(dev)), buft)
    # llama.cpp compares against this exact pointer to pick CPU extra buffer types (repacking).
    table[CPU_BUFFER_TYPE] = lib.ggml_backend_cpu_buffer_type()
    return table


def extra_buffer_types() -> tuple[str, ...]:
    """The CPU's extra buffer types, in llama.cpp's order of preference for a weight: "AMX"
    (where the build has AMX kernels and the OS grants AMX), "CPU_REPACK", ... Weights go to the
    first that takes them unless model_params.use_extra_bufts is off (llama.cpp's --no-repack)."""
    lib = _ggml()
    reg = lib.ggml_backend_reg_by_name(b"CPU")
    cpu = next(
        (
            lib.ggml_backend_dev_get(i)
            for i in range(lib.ggml_backend_dev_count())
            if lib.ggml_backend_dev_type(lib.ggml_backend_dev_get(i)) == 0
        ),
        None,
    )
    address = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
    if not (reg and cpu and address):
        return ()
    p = ctypes.c_void_p
    get = ctypes.CFUNCTYPE(ctypes.POINTER(p), p)(address)
    array = get(cpu)
    names: list[str] = []
    index = 0
    while array and array[index]:  # NULL-terminated
        names.append(_text(lib.ggml_backend_buft_name(array[index])))
        index += 1
    return tuple(names)


def cpu_features() -> dict[str, str]:
    """The CPU backend's compiled features (ggml_backend_get_features): {"AVX2": "1", ...}.
    AMX_INT8 there means the build carries ggml's AMX kernels."""

    class _Feature(ctypes.Structure):
        _fields_ = (("name", ctypes.c_char_p), ("value", ctypes.c_char_p))

    lib = _ggml()
    reg = lib.ggml_backend_reg_by_name(b"CPU")
    address = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_get_features") if reg else 0
    if not address:
        return {}
    get = ctypes.CFUNCTYPE(ctypes.POINTER(_Feature), ctypes.c_void_p)(address)
    table = get(reg)
    found: dict[str, str] = {}
    index = 0
    while table and table[index].name:  # ends with a {NULL, NULL} entry
        found[_text(table[index].name)] = _text(table[index].value)
        index += 1
    return found


def buffer_type_names() -> tuple[str, ...]:
    """The names apply_tensor_overrides accepts."""
    return tuple(sorted(_buffer_types()))


def apply_tensor_overrides(
    model_params: Any, overrides: Sequence[tuple[str, str]]
) -> OverrideKeepalive | None:
    """Point model_params.tensor_buft_overrides at a NULL-terminated array built from
    (regex on tensor name, buffer type name) pairs; returns what must stay alive until the
    model is loaded (None when there is nothing to override)."""
    if not overrides:
        model_params.tensor_buft_overrides = None
        return None
    from localmix.llama.backend import llama

    limit = int(llama().llama_max_tensor_buft_overrides())
    if len(overrides) >= limit:
        raise UsageError(
            f"at most {limit - 1} tensor overrides are supported, got {len(overrides)}"
        )
    table = _buffer_types()
    array = (_Override * (len(overrides) + 1))()
    patterns = []
    for index, (pattern, buffer_type) in enumerate(overrides):
        if buffer_type not in table:
            known = ", ".join(sorted(table))
            raise UsageError(
                f"unknown buffer type {buffer_type!r} for tensor override {pattern!r}",
                hint=f"this llama.cpp build has: {known}",
            )
        try:
            re.compile(pattern)
        except re.error as exc:
            raise UsageError(f"tensor override {pattern!r} is not a valid regex: {exc}") from exc
        encoded = pattern.encode()
        patterns.append(encoded)
        array[index].pattern = encoded
        array[index].buft = table[buffer_type]
    # The last element stays zeroed: pattern NULL ends the list.
    # 0.3.36 declares the field as c_void_p, so it takes the array's address.
    model_params.tensor_buft_overrides = ctypes.cast(array, ctypes.c_void_p)
    return OverrideKeepalive(array=array, patterns=tuple(patterns), overrides=tuple(overrides))


@dataclass(frozen=True)
class DevicesKeepalive:
    """The C arrays behind model_params.devices and tensor_split; keep them until the model is
    loaded."""

    devices: Any
    split: Any


def apply_devices(
    model_params: Any, names: Sequence[str] | None, split: Sequence[float] = ()
) -> DevicesKeepalive:
    """Point model_params.devices at a NULL-terminated array of the named devices (llama.cpp's
    --device: the devices that take the offloaded layers, in order; None leaves llama.cpp's
    choice) and tensor_split at each one's share of them (--tensor-split; none: by free
    memory)."""
    from localmix.llama.backend import llama

    lib = _ggml()
    array = None
    if names is not None:
        array = _device_array(lib, names)
        # 0.3.36 declares devices as c_void_p, so it takes the array's address; an empty list
        # (NULL alone) means no device: every layer on the CPU
        model_params.devices = ctypes.cast(array, ctypes.c_void_p)
    shares = None
    if split:
        limit = int(llama().llama_max_devices())
        if len(split) > limit:
            raise UsageError(f"a tensor split has at most {limit} parts, not {len(split)}")
        shares = (ctypes.c_float * limit)(*split)
        model_params.tensor_split = shares
    return DevicesKeepalive(devices=array, split=shares)


def _device_array(lib: ctypes.CDLL, names: Sequence[str]) -> Any:
    handles = []
    for name in names:
        handle = lib.ggml_backend_dev_by_name(name.encode())
        if not handle:
            known = ", ".join(d.name for d in devices())
            raise UsageError(f"no device {name!r} in this llama.cpp", hint=f"it has: {known}")
        handles.append(handle)
    return (ctypes.c_void_p * (len(handles) + 1))(*handles)  # the last one stays NULL


def system_info() -> str:
    """llama_print_system_info(): each backend with its compiled features."""
    from localmix.llama.backend import llama

    _ggml()
    return _text(llama().llama_print_system_info()).strip()


def supports_gpu_offload() -> bool:
    from localmix.llama.backend import llama

    return bool(llama().llama_supports_gpu_offload())


@dataclass(frozen=True)
class _ThreadpoolAPI:
    new: Any
    free: Any
    attach: Any


@functools.lru_cache(maxsize=1)
def _threadpool_api() -> _ThreadpoolAPI | None:
    """The CPU backend's thread-pool functions, found the way llama-bench finds them (through the
    backend registry, so a build with dynamically loaded backends works too); None without them."""
    from localmix.llama.backend import llama

    lib = _ggml()
    llama_cpp = llama()
    reg = lib.ggml_backend_reg_by_name(b"CPU")
    if not reg:
        return None
    new = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_threadpool_new")
    free = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_threadpool_free")
    if not (new and free):
        return None
    p = ctypes.c_void_p
    attach = ctypes.CFUNCTYPE(None, p, p, p)(("llama_attach_threadpool", llama_cpp.llama_cpp._lib))
    return _ThreadpoolAPI(
        new=ctypes.CFUNCTYPE(p, ctypes.POINTER(_ThreadpoolParams))(new),
        free=ctypes.CFUNCTYPE(None, p)(free),
        attach=attach,
    )


def new_threadpool(n_threads: int) -> int | None:
    """A CPU thread pool of n_threads with ggml's defaults (hybrid polling, inherited affinity and
    priority), as llama-bench and llama-cli make one; None where the build has no such API.

    Without one, ggml sets up a throwaway pool for every graph it computes: on builds without
    OpenMP (macOS among them) that is a thread start and join per decoded token."""
    api = _threadpool_api()
    if api is None:
        return None
    params = _ThreadpoolParams()
    _ggml().ggml_threadpool_params_init(ctypes.byref(params), n_threads)
    return api.new(ctypes.byref(params)) or None


def free_threadpool(pool: int) -> None:
    """Free a pool from new_threadpool, after every context that used it is freed."""
    api = _threadpool_api()
    if api is not None:
        api.free(pool)


def attach_threadpools(ctx: Any, pool: int, pool_batch: int | None = None) -> None:
    """Compute ctx's single-token graphs on pool and its batches on pool_batch (default: pool)."""
    api = _threadpool_api()
    if api is not None:
        api.attach(ctx, pool, pool_batch)


@functools.lru_cache(maxsize=1)
def logits_address() -> Any:
    """llama_get_logits_ith(ctx, i) returning the address as an int (0 for none): the binding's
    own returns a ctypes pointer, and wrapping that in an array each token costs microseconds."""
    from localmix.llama.backend import llama

    prototype = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32)
    return prototype(("llama_get_logits_ith", llama().llama_cpp._lib))
