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
_STRING, _ARRAY = 8, 9


class _Cursor:
    """A little-endian reader over a memory map that reports truncation as InvalidGGUF."""

    def __init__(self, data: Any, path: Path) -> None:
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise InvalidGGUF(
                f"{self.path}: truncated or damaged GGUF header",
                hint="the download or conversion was cut short; fetch or convert it again",
            )
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def scalar(self, kind: int) -> Any:
        fmt = _SCALARS.get(kind)
        if fmt is None:
            raise InvalidGGUF(f"{self.path}: damaged GGUF header (value type {kind})")
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.scalar(10)).decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            return self.scalar(kind)
        item_kind, count = self.scalar(4), self.scalar(10)
        if count <= _MAX_ARRAY:
            return [self.value(item_kind) for _ in range(count)]
        # Token lists are long (131k strings for tekken): skip them without building values.
        if item_kind == _STRING:
            for _ in range(count):
                self.take(self.scalar(10))
        elif item_kind in _SCALARS:
            self.take(struct.calcsize("<" + _SCALARS[item_kind]) * count)
        else:
            for _ in range(count):
                self.value(item_kind)
        return f"[{count} items]"


def _check_magic(path: Path) -> None:
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except FileNotFoundError as exc:
        raise InvalidGGUF(f"{path}: no such file") from exc
    except IsADirectoryError as exc:
        raise InvalidGGUF(f"{path}: is a directory, not a GGUF file") from exc
    except OSError as exc:
        raise InvalidGGUF(f"{path}: cannot read: {exc.strerror}") from exc
    if head != GGUF_MAGIC:
        raise InvalidGGUF(
            f"{path}: not a GGUF file (it does not start with 'GGUF')",
            hint="convert a checkpoint with `localmix convert`, or pull a GGUF with `localmix pull`",
        )


def _read_one(path: Path) -> tuple[dict[str, Any], list[TensorInfo], int]:
    import mmap

    import gguf

    _check_magic(path)
    size = path.stat().st_size
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        cursor = _Cursor(data, path)
        cursor.take(4)
        version = cursor.scalar(4)
        if version not in (2, 3):
            raise InvalidGGUF(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = cursor.scalar(10), cursor.scalar(10)
        if n_tensors > 1_000_000 or n_kv > 1_000_000:
            raise InvalidGGUF(f"{path}: damaged GGUF header (implausible counts)")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cursor.string()
            metadata[key] = cursor.value(cursor.scalar(4))
        raw = []
        for _ in range(n_tensors):
            name = cursor.string()
            dims = tuple(cursor.scalar(10) for _ in range(cursor.scalar(4)))
            raw.append((name, dims, cursor.scalar(4), cursor.scalar(10)))
        alignment = int(metadata.get("general.alignment", 32) or 32)
        data_start = -(-cursor.pos // alignment) * alignment
    tensors = []
    for name, dims, type_id, offset in raw:
        try:
            qtype = gguf.GGMLQuantizationType(type_id)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError) as exc:
            raise InvalidGGUF(f"{path}: tensor {name} has unknown type {type_id}") from exc
        n_elements = 1
        for d in dims:
            n_elements *= d
        n_bytes = n_elements // block * type_size
        end = data_start + offset + n_bytes
        if end > size:
            raise InvalidGGUF(
                f"{path}: truncated: tensor {name} ends at byte {end} but the file has {size}",
                hint="the download or conversion was cut short; fetch or convert it again",
            )
        tensors.append(TensorInfo(name, qtype.name, dims, n_elements, n_bytes))
    return metadata, tensors, size


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
