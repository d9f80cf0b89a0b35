"""Importance matrices (llama-imatrix output) for the lowest-bit quant types: read, normalised the way
llama-quantize normalises them, and checked, so a bad file is one clear error before llama.cpp runs;
and written in llama-imatrix's GGUF format (what `localmix imatrix`, localmix.build.imatrix.compute, computes).

Two formats exist: GGUF (`<tensor>.in_sum2` and `<tensor>.counts` F32 tensors per weight, one
row per expert, plus `imatrix.datasets` / `imatrix.chunk_count` / `imatrix.chunk_size`) and the
legacy binary `.dat` (per entry: name, call count, sums; then an optional chunk count and dataset).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from localmix import disk
from localmix.errors import UsageError

if TYPE_CHECKING:
    import numpy

_GGUF_MAGIC = b"GGUF"
_SUMS, _COUNTS = ".in_sum2", ".counts"


@dataclass(frozen=True)
class Imatrix:
    """Per-weight importance values (mean squared activations of each input column)."""

    path: Path
    values: dict[str, numpy.ndarray]  # tensor name -> float32, experts one after another
    datasets: tuple[str, ...]
    chunks: int  # chunks of text it was computed on (0 if the file does not say)


@dataclass(frozen=True)
class Entry:
    """One weight's raw data as llama-imatrix keeps it: per matrix (one per expert, else one),
    the sum over its input rows of each column's square, and how many rows were summed."""

    sums: numpy.ndarray  # float32 (matrices, columns)
    counts: numpy.ndarray  # float32 (matrices,)


def save(
    path: Path,
    entries: Mapping[str, Entry],
    *,
    datasets: Sequence[str],
    chunk_count: int,
    chunk_size: int,
) -> Path:
    """Write llama-imatrix's GGUF format, as it writes it: general.type imatrix, the imatrix.*
    keys, then per weight in name order `<name>.in_sum2` (columns x matrices) and `<name>.counts`
    (1 x matrices). The file appears complete or not at all (a temporary file renamed)."""
    import gguf
    import numpy as np

    class Writer(gguf.GGUFWriter):
        def add_architecture(self) -> None:
            pass  # an imatrix file names no architecture

    path = Path(path)
    with disk.staged(path) as partial:
        writer = Writer(partial, arch="")
        writer.add_type("imatrix")
        writer.add_array("imatrix.datasets", list(datasets))
        writer.add_uint32("imatrix.chunk_count", chunk_count)
        writer.add_uint32("imatrix.chunk_size", chunk_size)
        for name in sorted(entries):
            entry = entries[name]
            sums = np.asarray(entry.sums, dtype=np.float32)
            counts = np.asarray(entry.counts, dtype=np.float32).reshape(-1, 1)
            if len(counts) == 1:  # ggml drops trailing dimensions of 1 when it writes a tensor
                sums, counts = sums.reshape(-1), counts.reshape(-1)
            writer.add_tensor(name + _SUMS, sums)
            writer.add_tensor(name + _COUNTS, counts)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def load(path: Path) -> Imatrix:
    """Read an imatrix file of either format; UsageError for anything that is not one."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise UsageError(
            f"{path}: cannot read the importance matrix ({exc.strerror})",
            hint="give llama-imatrix's output file (.gguf or .dat) with --imatrix",
        ) from exc
    try:
        return _load_gguf(path) if magic == _GGUF_MAGIC else _load_legacy(path)
    except UsageError:
        raise
    except (ValueError, KeyError, IndexError, struct.error) as exc:
        raise UsageError(f"{path}: not a readable importance matrix ({exc})") from exc


def _bad(path: Path, why: str) -> UsageError:
    return UsageError(
        f"{path}: not a usable importance matrix: {why}",
        hint="make one with llama.cpp's llama-imatrix, or take the imatrix file published "
        "beside a model's GGUFs",
    )


def _load_gguf(path: Path) -> Imatrix:
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    fields = reader.fields
    needed = ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")
    if not all(key in fields for key in needed):
        raise _bad(path, "its imatrix.* metadata is missing (llama-quantize refuses it too)")
    datasets = tuple(str(v) for v in fields["imatrix.datasets"].contents())
    chunks = int(fields["imatrix.chunk_count"].contents())
    values: dict[str, numpy.ndarray] = {}
    for name, tensor in tensors.items():
        if not name.endswith(_SUMS):
            continue
        weight = name[: -len(_SUMS)]
        counts = tensors.get(weight + _COUNTS)
        if counts is None:
            raise _bad(path, f"{weight} has sums but no counts")
        sums = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
        count = np.rint(np.asarray(counts.data, dtype=np.float32).reshape(-1))
        rows = sums.reshape(count.size, -1)
        # Per expert: the mean over the tokens it saw; an expert that saw none weighs 1.
        mean = np.divide(rows, count[:, None], out=np.ones_like(rows), where=count[:, None] > 0)
        values[weight] = np.ascontiguousarray(mean.reshape(-1), dtype=np.float32)
    if not values:
        raise _bad(path, "it holds no importance values")
    return Imatrix(path, values, datasets, chunks)


def _load_legacy(path: Path) -> Imatrix:
    import numpy as np

    data = path.read_bytes()
    pos = 0

    def take(fmt: str) -> tuple[int, ...]:
        nonlocal pos
        out = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return out

    (n_entries,) = take("<i")
    if n_entries < 1 or n_entries > 1_000_000:
        raise _bad(path, "neither GGUF nor a legacy .dat file")
    values: dict[str, numpy.ndarray] = {}
    for _ in range(n_entries):
        (size,) = take("<i")
        name = data[pos : pos + size].decode("utf-8")
        pos += size
        ncall, nval = take("<ii")
        if nval < 1 or pos + 4 * nval > len(data):
            raise _bad(path, f"entry {name!r} is truncated")
        sums = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        values[name] = sums / ncall if ncall > 0 else sums
    chunks, datasets = 0, ()
    if pos + 4 <= len(data):  # optional tail: chunk count, then the dataset's name
        (chunks,) = take("<i")
        if pos + 4 <= len(data):
            (size,) = take("<i")
            if size > 0:
                datasets = (data[pos : pos + size].decode("utf-8", errors="replace"),)
    return Imatrix(path, values, datasets, chunks)
