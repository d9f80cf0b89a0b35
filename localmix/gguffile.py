"""Reading a GGUF file's header: metadata and tensor table, validated, no weights loaded.

`show`, `import`, `quantize` (input check) and the offload plan all start here.
"""

from __future__ import annotations

import re
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


def _value(reader_field: Any) -> Any:
    """A field's value: scalars and strings as Python values, long arrays as their length."""
    import gguf

    types = reader_field.types
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.ARRAY:
        count = len(reader_field.data)
        if count > _MAX_ARRAY:
            return f"[{count} items]"
    return reader_field.contents()


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
    import gguf

    _check_magic(path)
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError, IndexError, ... on damaged headers
        raise InvalidGGUF(
            f"{path}: damaged or truncated GGUF header ({type(exc).__name__})",
            hint="download or convert the file again",
        ) from exc
    metadata = {
        name: _value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")
    }
    tensors = []
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise InvalidGGUF(
                f"{path}: truncated: tensor {tensor.name} ends at byte {end} "
                f"but the file has {size}",
                hint="the download or conversion was cut short; fetch or convert it again",
            )
        tensors.append(
            TensorInfo(
                name=tensor.name,
                type_name=tensor.tensor_type.name,
                shape=tuple(int(d) for d in tensor.shape),
                n_elements=int(tensor.n_elements),
                n_bytes=int(tensor.n_bytes),
            )
        )
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
