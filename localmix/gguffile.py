"""Reading a GGUF file's header: metadata and tensor table, validated, no weights loaded.

`show`, `import`, `quantize` (input check) and the offload plan all start here.
"""

from __future__ import annotations

import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localmix.errors import InvalidGGUF

GGUF_MAGIC = b"GGUF"
# Arrays longer than this (token lists, scores) are summarised by their length in `metadata`.
_MAX_ARRAY = 64
# Pieces whose presence and ids tell Mistral's tokenizer versions apart: control tokens of v2+
# and tekken, and the v1 sentencepiece pieces that "[INST]" is written with.
# The pieces chat/detection.py looks for: Mistral's control tokens by version, v1's "[INST]" pieces.
MARKER_PIECES = (
    *("[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[SYSTEM_PROMPT]", "▁[", "INST", "]"),
    *("[ARGS]", "[CALL_ID]", "[THINK]", "[/THINK]", "[MODEL_SETTINGS]"),
)
_SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the table; shape in GGUF order (fastest-varying dimension first)."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    n_elements: int
    n_bytes: int


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF file (all shards of a split one) says about the model."""

    path: Path
    files: tuple[Path, ...]
    file_size: int  # bytes, all shards
    architecture: str
    name: str
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...] = field(repr=False)

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    def key(self, suffix: str, default: Any = None) -> Any:
        """An architecture-scoped key: key("context_length") reads `<arch>.context_length`."""
        return self.metadata.get(f"{self.architecture}.{suffix}", default)

    @property
    def context_length(self) -> int:
        return int(self.key("context_length", 0) or 0)

    @property
    def block_count(self) -> int:
        return int(self.key("block_count", 0) or 0)

    @property
    def expert_count(self) -> int:
        return int(self.key("expert_count", 0) or 0)

    @property
    def chat_template(self) -> str | None:
        value = self.metadata.get("tokenizer.chat_template")
        return value if isinstance(value, str) else None

    @property
    def quant(self) -> str:
        """The file type as llama.cpp names it (Q4_K_M, F16, ...), else the dominant tensor type."""
        file_type = self.metadata.get("general.file_type")
        if isinstance(file_type, int):
            import gguf

            try:
                return (
                    gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").replace("ALL_", "")
                )
            except ValueError:
                pass
        counts = self.type_histogram()
        return max(counts, key=lambda k: counts[k]) if counts else "unknown"

    def type_histogram(self) -> dict[str, int]:
        """Tensor count per ggml type."""
        return dict(Counter(t.type_name for t in self.tensors).most_common())


# GGUF value types -> struct format (strings = 8, arrays = 9 are handled apart).
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY, _UINT32 = 8, 9, 4

# llama.cpp's own limits (ggml/src/gguf.cpp, ggml/include/ggml.h, ggml/src/ggml-impl.h).
DEFAULT_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT
TENSOR_ALIGNMENT = 32  # a mapped tensor's address must be a multiple of this (GGML_ASSERT)
MAX_ARRAY_ELEMENTS = 1024**3  # GGUF_MAX_ARRAY_ELEMENTS
MAX_NAME = 64  # GGML_MAX_NAME, counting the terminating NUL
MAX_DIMS = 4  # GGML_MAX_DIMS
_INT64_MAX = 2**63 - 1
# The smallest encodings: a key/value (length, 1-byte key, type, 1-byte value) and a tensor info
# (length, 1-byte name, n_dims, one dim, type, offset). Counts above what the file could hold
# are damage, and are refused before any loop runs over them.
_MIN_KV_BYTES, _MIN_TENSOR_BYTES = 8 + 1 + 4 + 1, 8 + 1 + 4 + 8 + 4 + 8
_Q2_0 = (42, "Q2_0", 64, 18)  # ggml.h GGML_TYPE_Q2_0 (newer than the gguf package)
_TOKENS = "tokenizer.ggml.tokens"
_REFETCH = "the download or conversion was cut short or damaged; fetch or convert it again"


def _damaged(path: Path, reason: str) -> InvalidGGUF:
    return InvalidGGUF(f"{path}: damaged GGUF: {reason}", hint=_REFETCH)


class _Cursor:
    """A little-endian reader over a memory map that reports truncation as InvalidGGUF."""

    def __init__(self, data: Any, path: Path) -> None:
        self.data, self.pos, self.path = data, 0, path

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise InvalidGGUF(
                f"{self.path}: truncated or damaged GGUF header "
                f"(needs {n} bytes at byte {self.pos}, the file has {len(self.data)})",
                hint=_REFETCH,
            )
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def scalar(self, kind: int) -> Any:
        fmt = _SCALARS.get(kind)
        if fmt is None:
            raise _damaged(self.path, f"unknown value type {kind}")
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def raw_string(self, what: str) -> bytes:
        length = self.scalar(10)
        if length > self.remaining:
            raise _damaged(
                self.path, f"{what} claims {length} bytes, only {self.remaining} are left"
            )
        return self.take(length)

    def string(self, what: str) -> str:
        return self.raw_string(what).decode("utf-8", errors="replace")

    def value(self, kind: int, key: str) -> Any:
        if kind == _STRING:
            return self.string(f"the value of {key}")
        if kind != _ARRAY:
            return self.scalar(kind)
        item_kind, count = self.scalar(4), self.scalar(10)
        if item_kind not in _SCALARS and item_kind != _STRING:
            # llama.cpp has no arrays of arrays
            raise _damaged(self.path, f"{key} is an array of unknown type {item_kind}")
        item_size = 8 if item_kind == _STRING else struct.calcsize("<" + _SCALARS[item_kind])
        if count > MAX_ARRAY_ELEMENTS or count * item_size > self.remaining:
            raise _damaged(self.path, f"{key} claims {count} items, more than the file holds")
        if item_kind == _STRING and key == _TOKENS:
            return self._tokens(count)
        if count <= _MAX_ARRAY:
            return [self.value(item_kind, key) for _ in range(count)]
        # Long arrays (scores, merges) are skipped without building values.
        if item_kind == _STRING:
            for _ in range(count):
                self.raw_string(f"an item of {key}")
        else:
            self.take(item_size * count)
        return f"[{count} items]"

    def _tokens(self, count: int) -> TokenList:
        """The vocabulary, checked: llama.cpp asserts (aborts) when two tokens are the same text;
        it renames an empty one [EMPTY_i] (llama-vocab.cpp)."""
        seen: dict[bytes, int] = {}
        for i in range(count):
            word = self.raw_string(f"token {i}") or f"[EMPTY_{i}]".encode()
            if word in seen:
                raise _damaged(self.path, f"token {i} repeats token {seen[word]} ({word[:20]!r})")
            seen[word] = i
        kept = {p: seen[b] for p in MARKER_PIECES if (b := p.encode()) in seen}
        return TokenList(f"[{count} items]", kept)


class TokenList(str):
    """The token list in `metadata`: its length as "[N items]", plus the ids of MARKER_PIECES
    that the vocabulary holds (chat/template.py recognises Mistral's vocabularies by them)."""

    pieces: dict[str, int]

    def __new__(cls, text: str, pieces: dict[str, int]) -> TokenList:
        made = super().__new__(cls, text)
        made.pieces = pieces
        return made


def _check_magic(path: Path) -> None:
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except FileNotFoundError as exc:
        raise InvalidGGUF(
            f"{path}: no such file", hint="check the path, or `localmix list` for stored models"
        ) from exc
    except IsADirectoryError as exc:
        raise InvalidGGUF(
            f"{path}: is a directory, not a GGUF file", hint="give the path of a .gguf file"
        ) from exc
    except OSError as exc:
        raise InvalidGGUF(
            f"{path}: cannot read: {exc.strerror}", hint="check the file's permissions"
        ) from exc
    if head != GGUF_MAGIC:
        raise InvalidGGUF(
            f"{path}: not a GGUF file (it does not start with 'GGUF')",
            hint="convert a checkpoint with `localmix convert`, or pull a GGUF with `localmix pull`",
        )


def _check_version(path: Path, version: int) -> None:
    if version & 0xFFFF == 0:
        raise InvalidGGUF(f"{path}: GGUF version {version:#x} is big-endian or damaged")
    if version not in (2, 3):
        raise InvalidGGUF(f"{path}: GGUF version {version} is not supported (2 and 3 are)")


def _read_counts(cursor: _Cursor) -> tuple[int, int]:
    n_tensors, n_kv = cursor.scalar(11), cursor.scalar(11)
    if not 0 <= n_kv <= cursor.remaining // _MIN_KV_BYTES:
        raise _damaged(cursor.path, f"{n_kv} key/values in a {len(cursor.data)}-byte file")
    if not 0 <= n_tensors <= cursor.remaining // _MIN_TENSOR_BYTES:
        raise _damaged(cursor.path, f"{n_tensors} tensors in a {len(cursor.data)}-byte file")
    return n_tensors, n_kv


def _read_metadata(cursor: _Cursor, n_kv: int) -> tuple[dict[str, Any], int]:
    """The key/values and general.alignment, checked as llama.cpp's gguf_init checks them."""
    metadata: dict[str, Any] = {}
    alignment = DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key = cursor.string("a key")
        if not key:
            raise _damaged(cursor.path, "an empty key")
        if key in metadata:
            raise _damaged(cursor.path, f"duplicate key {key!r}")
        kind = cursor.scalar(4)
        metadata[key] = cursor.value(kind, key)
        if key == "general.alignment":
            if kind != _UINT32:
                raise _damaged(cursor.path, f"general.alignment has value type {kind}, not uint32")
            alignment = metadata[key]
    if alignment <= 0 or alignment & (alignment - 1):
        raise _damaged(cursor.path, f"general.alignment {alignment} is not a power of 2")
    return metadata, alignment


def _read_tensor_info(cursor: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    """One entry of the tensor table: name, shape (GGUF order), type id, data offset."""
    name = cursor.string("a tensor name")
    if len(name.encode("utf-8", errors="surrogateescape")) >= MAX_NAME:
        raise _damaged(cursor.path, f"tensor name {name[:40]!r}... is {MAX_NAME} bytes or longer")
    n_dims = cursor.scalar(4)
    if n_dims > MAX_DIMS:
        raise _damaged(cursor.path, f"tensor {name} has {n_dims} dimensions (at most {MAX_DIMS})")
    dims = tuple(cursor.scalar(11) for _ in range(n_dims))
    if any(d < 0 for d in dims):
        raise _damaged(cursor.path, f"tensor {name} has a negative dimension {dims}")
    n_elements = 1
    for d in dims:
        n_elements *= d
    if n_elements > _INT64_MAX:
        raise _damaged(cursor.path, f"tensor {name} has an impossible shape {dims}")
    return name, dims, cursor.scalar(5), cursor.scalar(10)


def _type_sizes(type_id: int) -> tuple[str, int, int] | None:
    """(name, block size in elements, block size in bytes) of a ggml type a GGUF may hold."""
    import gguf

    if type_id == _Q2_0[0]:  # newer than the gguf package
        return _Q2_0[1:]
    try:
        qtype = gguf.GGMLQuantizationType(type_id)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        return None
    return qtype.name, block, type_size


def _read_one(path: Path) -> tuple[dict[str, Any], list[TensorInfo], int]:
    import mmap

    _check_magic(path)
    size = path.stat().st_size
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        cursor = _Cursor(data, path)
        cursor.take(4)
        _check_version(path, cursor.scalar(4))
        n_tensors, n_kv = _read_counts(cursor)
        metadata, alignment = _read_metadata(cursor, n_kv)
        raw = [_read_tensor_info(cursor) for _ in range(n_tensors)]
        data_start = -(-cursor.pos // alignment) * alignment
    return metadata, _tensor_table(path, raw, data_start, alignment, size), size


def _tensor_table(
    path: Path,
    raw: list[tuple[str, tuple[int, ...], int, int]],
    data_start: int,
    alignment: int,
    size: int,
) -> list[TensorInfo]:
    """The tensor table checked against llama.cpp's rules: known types, whole blocks per row,
    data packed in order at `alignment`, every tensor inside the file and mappable."""
    if raw and data_start > size:
        raise InvalidGGUF(
            f"{path}: truncated: the tensor data would start past the end", hint=_REFETCH
        )
    tensors: list[TensorInfo] = []
    seen: set[str] = set()
    expected = 0  # gguf_init requires each offset to be the padded end of the one before
    for name, dims, type_id, offset in raw:
        if name in seen:
            raise _damaged(path, f"duplicate tensor name {name!r}")
        seen.add(name)
        sizes = _type_sizes(type_id)
        if sizes is None:
            raise InvalidGGUF(f"{path}: tensor {name} has unknown type {type_id}", hint=_REFETCH)
        type_name, block, type_size = sizes
        row = dims[0] if dims else 1
        if row % block:
            raise _damaged(
                path, f"tensor {name} ({type_name}) has rows of {row}, not whole blocks of {block}"
            )
        n_elements = 1
        for d in dims:
            n_elements *= d
        n_bytes = n_elements // block * type_size
        if offset != expected:
            raise _damaged(path, f"tensor {name} starts at offset {offset}, expected {expected}")
        expected += -(-n_bytes // alignment) * alignment
        start = data_start + offset
        if start % TENSOR_ALIGNMENT:
            # ggml maps the file and asserts that tensor data sits at 32-byte boundaries
            raise InvalidGGUF(
                f"{path}: tensor {name} data at byte {start} is not {TENSOR_ALIGNMENT}-byte "
                f"aligned (general.alignment {alignment}), which llama.cpp cannot map",
                hint=f"rewrite the file with general.alignment {DEFAULT_ALIGNMENT} or more",
            )
        if start + n_bytes > size:
            raise InvalidGGUF(
                f"{path}: truncated: tensor {name} ends at byte {start + n_bytes} "
                f"but the file has {size}",
                hint=_REFETCH,
            )
        tensors.append(TensorInfo(name, type_name, dims, n_elements, n_bytes))
    return tensors


def shards(path: Path) -> list[Path]:
    """All files of a split GGUF given its first shard (or [path] for a single file)."""
    match = _SPLIT_RE.match(path.name)
    if not match:
        return [path]
    count = int(match["count"])
    return [
        path.with_name(f"{match['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)
    ]


def inspect(path: Path | str) -> GGUFInfo:
    """Read and validate a GGUF header (every shard of a split GGUF); InvalidGGUF if damaged."""
    path = Path(path)
    files = shards(path)
    metadata: dict[str, Any] = {}
    tensors: list[TensorInfo] = []
    total = 0
    for index, file in enumerate(files):
        meta, part, size = _read_one(file)
        if index == 0:
            metadata = meta
        tensors.extend(part)
        total += size
    architecture = metadata.get("general.architecture")
    if not isinstance(architecture, str):
        raise InvalidGGUF(f"{path}: GGUF without general.architecture", hint="not a model file")
    return GGUFInfo(
        path=path,
        files=tuple(files),
        file_size=total,
        architecture=architecture,
        name=str(metadata.get("general.name", path.stem)),
        metadata=metadata,
        tensors=tuple(tensors),
    )
