"""A tap on llama.cpp's compute graph: the scheduler's eval callback (llama_context_params.cb_eval),
narrowed to the matrix products whose inputs a caller wants to see, such as the activations an
importance matrix is made of.

ggml calls the callback with ask=True for every graph node it is about to compute ("do you want
this node?"), then, for each node answered yes, with ask=False once that node has been computed.
struct ggml_tensor is read through ctypes in the layout of the vendored ggml.h; check_layout()
proves that layout against libggml's own accessors before a tap is first made.
"""

from __future__ import annotations

import ctypes
import functools
from typing import TYPE_CHECKING, Any

from localmix.errors import EngineError
from localmix.llama.records import MatMul, MatMulTap

if TYPE_CHECKING:
    import numpy

# ggml.h of the vendored llama.cpp: GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_OP_PARAMS, GGML_MAX_NAME.
_DIMS, _SRCS, _OP_PARAMS, _NAME = 4, 10, 64, 64
_F32, _I32 = 0, 26  # enum ggml_type
_MUL_MAT, _MUL_MAT_ID = 29, 30  # enum ggml_op
OPS = {_MUL_MAT: "MUL_MAT", _MUL_MAT_ID: "MUL_MAT_ID"}  # the products a tap sees
# sizeof(struct ggml_object) in ggml.c: ggml_tensor_overhead() is that plus sizeof(ggml_tensor).
_OBJECT_SIZE = 32


class _Tensor(ctypes.Structure):
    """struct ggml_tensor (ggml.h), field for field."""

    _fields_ = (
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * _DIMS),
        ("nb", ctypes.c_size_t * _DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * _SRCS),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * _NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    )


class _InitParams(ctypes.Structure):
    """struct ggml_init_params (ggml.h)."""

    _fields_ = (
        ("mem_size", ctypes.c_size_t),
        ("mem_buffer", ctypes.c_void_p),
        ("no_alloc", ctypes.c_bool),
    )


_OP_OFFSET = _Tensor.op.offset
# typedef bool (*ggml_backend_sched_eval_callback)(struct ggml_tensor * t, bool ask, void * user_data)
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_bool, ctypes.c_void_p)


@functools.lru_cache(maxsize=1)
def _api() -> ctypes.CDLL:
    """libggml with the tensor functions this module calls declared."""
    from localmix.llama.lib import _declare, _ggml  # the package's one libggml handle

    lib = _ggml()
    p, size, i64, kind = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64, ctypes.c_int
    _declare(lib, "ggml_backend_buffer_is_host", ctypes.c_bool, p)
    _declare(lib, "ggml_backend_tensor_get", None, p, p, size, size)
    _declare(lib, "ggml_nbytes", size, p)
    _declare(lib, "ggml_op_name", ctypes.c_char_p, kind)
    _declare(lib, "ggml_tensor_overhead", size)
    _declare(lib, "ggml_init", p, _InitParams)
    _declare(lib, "ggml_free", None, p)
    _declare(lib, "ggml_new_tensor_2d", p, p, kind, i64, i64)
    _declare(lib, "ggml_new_tensor_3d", p, p, kind, i64, i64, i64)
    _declare(lib, "ggml_mul_mat_id", p, p, p, p, p)
    _declare(lib, "ggml_set_name", p, p, ctypes.c_char_p)
    _declare(lib, "ggml_get_name", ctypes.c_char_p, p)
    _declare(lib, "ggml_get_data", p, p)
    _declare(lib, "ggml_backend_alloc_ctx_tensors_from_buft", p, p, p)
    _declare(lib, "ggml_backend_buffer_free", None, p)
    _declare(lib, "ggml_backend_cpu_buffer_type", p)
    return lib


@functools.lru_cache(maxsize=1)
def check_layout() -> None:
    """EngineError unless this build's struct ggml_tensor is the one a tap reads (once)."""
    verify_layout(_Tensor)


def verify_layout(struct: type[ctypes.Structure]) -> None:
    """Build a MUL_MAT_ID node with libggml and read it back through `struct`: every field a tap
    reads (type, buffer, ne, nb, op, src, data, name) must agree with ggml's own accessors, and
    the struct's size with ggml_tensor_overhead(). EngineError where they differ."""
    lib = _api()
    for op, name in OPS.items():
        if lib.ggml_op_name(op) != name.encode():
            _layout_error(f"op {op} is {lib.ggml_op_name(op)!r}, not {name}")
    if lib.ggml_tensor_overhead() != _OBJECT_SIZE + ctypes.sizeof(struct):
        _layout_error(f"sizeof(ggml_tensor) is not {ctypes.sizeof(struct)}")
    ctx = lib.ggml_init(_InitParams(16 * lib.ggml_tensor_overhead(), None, True))
    if not ctx:
        raise EngineError("ggml could not make a small context")
    buffer = None
    try:
        # 5 columns, 6 rows, 3 experts; 2 of them used per token, 4 tokens
        experts = lib.ggml_new_tensor_3d(ctx, _F32, 5, 6, 3)
        inputs = lib.ggml_new_tensor_3d(ctx, _F32, 5, 2, 4)
        ids = lib.ggml_new_tensor_2d(ctx, _I32, 2, 4)
        product = lib.ggml_mul_mat_id(ctx, experts, inputs, ids)
        lib.ggml_set_name(experts, b"blk.0.ffn_up_exps.weight")
        buffer = lib.ggml_backend_alloc_ctx_tensors_from_buft(
            ctx, lib.ggml_backend_cpu_buffer_type()
        )
        if not buffer:
            raise EngineError("ggml could not allocate a small CPU buffer")
        seen: Any = struct.from_address(product)
        src: Any = struct.from_address(experts)
        index: Any = struct.from_address(ids)
        expected = {
            "op": (seen.op, _MUL_MAT_ID),
            "src": (tuple(seen.src[:3]), (experts, inputs, ids)),
            "name": (src.name, lib.ggml_get_name(experts)),
            "type": ((src.type, index.type), (_F32, _I32)),
            "ne": (tuple(src.ne), (5, 6, 3, 1)),
            "nb": (tuple(src.nb), (4, 20, 120, 360)),
            "nbytes": (lib.ggml_nbytes(experts), 360),
            "data": (src.data, lib.ggml_get_data(experts)),
            "buffer": (src.buffer, buffer),
        }
        for field, (got, want) in expected.items():
            if got != want:
                _layout_error(f"{field} reads {got!r}, ggml says {want!r}")
    finally:
        if buffer:
            lib.ggml_backend_buffer_free(buffer)
        lib.ggml_free(ctx)


def _layout_error(detail: str) -> None:
    raise EngineError(
        f"this llama.cpp build's ggml_tensor is not the one localmix reads ({detail})",
        hint="install the llama-cpp-python version localmix pins",
    )


def weight_name(name: str) -> str:
    """A weight's own name: the scheduler names its copy on another backend "CUDA0#NAME#0"."""
    if "#" not in name:
        return name
    return name.split("#", 2)[1]


class Tap:
    """The C callback around a MatMulTap. Keep the Tap as long as the context that calls it;
    an exception in the tap stops the graph and is kept in `error` for the engine to raise."""

    def __init__(self, tap: MatMulTap) -> None:
        check_layout()
        self._tap = tap
        self._lib = _api()
        self.error: BaseException | None = None
        self.callback = _CALLBACK(self._call)

    def _call(self, node: int, ask: bool, _user: int | None) -> bool:
        if self.error is not None:
            return False  # no more Python for the rest of this graph: it is thrown away
        try:
            if ask:
                # Most nodes are not products: one int read, nothing built.
                if ctypes.c_int.from_address(node + _OP_OFFSET).value not in OPS:
                    return False
                return bool(self._tap.wants(self._product(node)))
            self._take(node)
            return True
        except BaseException as exc:  # Ctrl-C included: C cannot unwind a Python exception
            self.error = exc
            return False

    def raise_error(self) -> None:
        """Raise what the tap raised during the last graph, once."""
        error, self.error = self.error, None
        if error is not None:
            raise error

    def _product(self, node: int) -> MatMul:
        tensor = _Tensor.from_address(node)
        weight = _Tensor.from_address(tensor.src[0])
        inputs = _Tensor.from_address(tensor.src[1])
        return MatMul(
            op=OPS[tensor.op],
            weight=weight_name(weight.name.decode(errors="replace")),
            weight_shape=tuple(weight.ne),
            input_shape=tuple(inputs.ne),
            input_f32=inputs.type == _F32,
        )

    def _take(self, node: int) -> None:
        product = self._product(node)
        tensor = _Tensor.from_address(node)
        inputs = self._read(tensor.src[1], "float32")
        ids = self._read(tensor.src[2], "int32", copy=True) if product.op == "MUL_MAT_ID" else None
        self._tap.take(product, inputs, ids)

    def _read(self, address: int, dtype: str, *, copy: bool = False) -> numpy.ndarray:
        """A tensor's values as a numpy array shaped (ne3, ne2, ne1, ne0) for 4 dimensions, fewer
        for ids: a view of host memory (valid during the callback) or a copy from the device."""
        import numpy as np

        tensor = _Tensor.from_address(address)
        want = _F32 if dtype == "float32" else _I32
        if tensor.type != want or tensor.nb[0] != 4:
            raise EngineError(
                f"{tensor.name.decode(errors='replace')}: not contiguous {dtype} rows"
            )
        size = self._lib.ggml_nbytes(address)
        host = bool(tensor.buffer) and self._lib.ggml_backend_buffer_is_host(tensor.buffer)
        if host and not copy:
            raw = np.frombuffer((ctypes.c_char * size).from_address(tensor.data), dtype=np.uint8)
        else:
            raw = np.empty(size, dtype=np.uint8)
            self._lib.ggml_backend_tensor_get(address, raw.ctypes.data, 0, size)
        dims = 4 if dtype == "float32" else 2
        shape = tuple(int(tensor.ne[i]) for i in reversed(range(dims)))
        strides = tuple(int(tensor.nb[i]) for i in reversed(range(dims)))
        return np.lib.stride_tricks.as_strided(
            raw.view(dtype), shape=shape, strides=strides, writeable=False
        )
