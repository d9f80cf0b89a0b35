"""Lazy readers over a checkpoint directory: Hugging Face (config.json + model*.safetensors, with or
without model.safetensors.index.json) or Mistral-native (params.json + consolidated*.safetensors).

Only the safetensors headers are read up front; tensor data is read on demand, a block of rows at
a time, with plain reads rather than a long-lived mmap: every page of a mapping that a conversion
touches would stay in the process's resident set until the mapping closes, so a whole model's
worth of pages would count against memory even though each is used once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localmix.errors import CheckpointError

if TYPE_CHECKING:
    import numpy as np

# safetensors dtype -> (numpy dtype, bytes per element); BF16 is read as uint16 and widened
DTYPES = {"F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2), "F64": ("<f8", 8)}
HF_INDEX = "model.safetensors.index.json"
_MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TensorEntry:
    """One tensor in one safetensors file: where its bytes are, what they hold."""

    name: str
    dtype: str  # safetensors name: F32, F16, BF16, F64
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset in file
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n

    @property
    def n_rows(self) -> int:
        return self.shape[0] if self.shape else 1

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the tensor along its first axis, as float32."""
        import numpy as np

        np_dtype, width = DTYPES[self.dtype]
        row = self.n_elements // max(self.n_rows, 1) if self.shape else 1
        count = (stop - start) * row
        raw = np.empty(count, dtype=np_dtype)
        with open(self.file, "rb") as f:
            f.seek(self.offset + start * row * width)
            got = f.readinto(memoryview(raw).cast("B"))
        if got != count * width:
            raise CheckpointError(
                f"{self.file}: truncated while reading {self.name}",
                hint="the file is incomplete; download or copy it again",
            )
        if self.dtype == "BF16":
            # bfloat16 is the top half of a float32: widening is exact
            values = (raw.astype(np.uint32) << np.uint32(16)).view(np.float32)
        else:
            values = raw.astype(np.float32, copy=False)
        return values.reshape((stop - start, *self.shape[1:]) if self.shape else ())

    def read(self) -> np.ndarray:
        """The whole tensor as float32."""
        return self.read_rows(0, self.n_rows)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory: its layout, hyper-parameters and the tensors its files hold."""

    directory: Path
    layout: str  # "hf" or "mistral"
    config: dict[str, Any]  # config.json or params.json
    config_file: Path
    tensors: dict[str, TensorEntry]

    @property
    def architecture(self) -> str:
        """HF: the config's architectures[0]; Mistral-native: "mistral", "mixtral", "ministral3"
        (Llama 4 query scaling, as llama.cpp's converter tells them apart) or "mistral4" (MoE with
        latent attention: Mistral Small 4, Large 3)."""
        if self.layout == "mistral":
            return native_architecture(self.config)
        archs = self.config.get("architectures") or []
        if not archs or not isinstance(archs, list):
            raise CheckpointError(
                f"{self.config_file}: no 'architectures' entry",
                hint="a Hugging Face config.json names its model class there",
            )
        return str(archs[0])


def native_architecture(params: dict[str, Any]) -> str:
    """The family of a Mistral-native params.json."""
    if params.get("moe"):
        return "mistral4" if params.get("kv_lora_rank") or params.get("q_lora_rank") else "mixtral"
    return "ministral3" if params.get("llama_4_scaling") else "mistral"


def open_checkpoint(directory: Path) -> Checkpoint:
    """Read a checkpoint directory's hyper-parameters and tensor headers; CheckpointError if not one."""
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"{directory}: no such directory", hint="give a checkpoint directory")
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory", hint="give a checkpoint directory")
    if not any(directory.iterdir()):
        raise CheckpointError(f"{directory}: the directory is empty", hint=_LAYOUT_HINT)
    if (directory / "config.json").is_file():
        layout, config_file = "hf", directory / "config.json"
    elif (directory / "params.json").is_file():
        layout, config_file = "mistral", directory / "params.json"
    else:
        raise CheckpointError(
            f"{directory}: neither config.json nor params.json", hint=_LAYOUT_HINT
        )
    config = _read_json(config_file)
    files = _weight_files(directory, layout)
    tensors: dict[str, TensorEntry] = {}
    for file in files:
        for entry in read_header(file):
            tensors[entry.name] = entry
    _check_index(directory, tensors)
    return Checkpoint(directory, layout, config, config_file, tensors)


_LAYOUT_HINT = (
    "expected a Hugging Face checkpoint (config.json, *.safetensors, tokenizer) or a "
    "Mistral-native one (params.json, consolidated.safetensors, tokenizer.model.v* or tekken.json)"
)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path}: not valid JSON ({exc})", hint="the file is damaged"
        ) from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object", hint="the file is damaged")
    return value


def _weight_files(directory: Path, layout: str) -> list[Path]:
    index = directory / HF_INDEX
    if layout == "hf" and index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no weight_map", hint="the file is damaged")
        files = [directory / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise CheckpointError(
                    f"{file}: missing (listed in {HF_INDEX})",
                    hint="download the missing shard, or the whole checkpoint again",
                )
        return files
    pattern = "model*.safetensors" if layout == "hf" else "consolidated*.safetensors"
    files = sorted(directory.glob(pattern))
    if files:
        return files
    others = [p.name for p in directory.iterdir() if p.suffix in (".bin", ".pth", ".pt", ".ckpt")]
    if others:
        raise CheckpointError(
            f"{directory}: only PyTorch pickles ({', '.join(sorted(others)[:3])}), no {pattern}",
            hint="localmix converts safetensors checkpoints; most repos on the Hub publish them",
        )
    raise CheckpointError(f"{directory}: no {pattern} files", hint=_LAYOUT_HINT)


def _check_index(directory: Path, tensors: dict[str, TensorEntry]) -> None:
    index = directory / HF_INDEX
    if not index.is_file() or not (directory / "config.json").is_file():
        return
    for name, file in _read_json(index)["weight_map"].items():
        entry = tensors.get(name)
        if entry is None or entry.file.name != file:
            raise CheckpointError(
                f"{directory / file}: has no tensor {name} (listed in {HF_INDEX})",
                hint="the shard does not match the index; download the checkpoint again",
            )


def read_header(path: Path) -> Iterator[TensorEntry]:
    """The tensors of one .safetensors file, validated against the file's size."""
    import numpy as np

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated (no safetensors header)", hint=_DAMAGED)
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER:
            raise CheckpointError(
                f"{path}: not a safetensors file (header size {n})", hint=_DAMAGED
            )
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated (header cut short)", hint=_DAMAGED)
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path}: malformed safetensors header", hint=_DAMAGED) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: malformed safetensors header", hint=_DAMAGED)
    base = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed entry for {name}", hint=_DAMAGED) from None
        if dtype not in DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name} has dtype {dtype}, which localmix cannot convert",
                hint="localmix converts F32, F16 and BF16 weights; for an FP8 release pull its "
                "BF16 repo, or a ready GGUF (localmix pull hf.co/ORG/REPO-GGUF:Q4_K_M)",
            )
        if end - start != DTYPES[dtype][1] * int(np.prod(shape, dtype=np.int64)):
            raise CheckpointError(
                f"{path}: tensor {name} size disagrees with its shape", hint=_DAMAGED
            )
        if base + end > size:
            raise CheckpointError(
                f"{path}: truncated ({size} bytes, header promises {base + end})", hint=_DAMAGED
            )
        yield TensorEntry(name, dtype, shape, path, base + start, end - start)


_DAMAGED = "the file is incomplete or damaged; download or copy it again"


def file_size(path: Path) -> int:
    """Bytes in a file, 0 when it is missing."""
    try:
        return os.stat(path).st_size
    except OSError:
        return 0
