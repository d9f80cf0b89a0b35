"""The GGUF side of a conversion: output types, llama.cpp's per-tensor type rules, and a streaming
writer that holds one block of rows in memory at a time, never a whole model (or tensor)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from localmix.errors import UsageError
from localmix.progress import OnProgress, Progress

if TYPE_CHECKING:
    import gguf
    import numpy as np

# outtype -> (GGMLQuantizationType name, LlamaFileType name)
OUTTYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
}
# rows per block: about 4M elements (16 MiB as float32) whatever the row length
BLOCK_ELEMENTS = 4 * 2**20


@dataclass(frozen=True)
class OutputTensor:
    """One GGUF tensor to write: its name, element shape (numpy order), type, and a generator of
    float32 blocks of whole rows that, concatenated, are the tensor."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    blocks: Callable[[], Iterator[np.ndarray]]

    @property
    def nbytes(self) -> int:
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        n = 1
        for dim in self.shape:
            n *= dim
        return n // block * size


def check_outtype(outtype: str) -> str:
    """The outtype in lower case; UsageError for one that convert cannot write."""
    key = outtype.lower()
    if key not in OUTTYPES:
        raise UsageError(
            f"unknown outtype {outtype!r}",
            hint=f"choose one of: {', '.join(OUTTYPES)} (quantize further with `localmix quantize`)",
        )
    return key


def file_type(outtype: str) -> gguf.LlamaFileType:
    import gguf

    return gguf.LlamaFileType[OUTTYPES[outtype][1]]


def tensor_type(name: str, shape: tuple[int, ...], outtype: str) -> gguf.GGMLQuantizationType:
    """llama.cpp's convert_hf_to_gguf rule for a llama-architecture tensor's output type."""
    import gguf

    q = gguf.GGMLQuantizationType
    # 1-D tensors and norms stay F32 (most of ggml handles them only as F32); so do the MoE
    # router (ffn_gate_inp) and anything that is not a weight
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return q.F32
    if ".ffn_gate_inp." in name or not name.endswith(".weight"):
        return q.F32
    qtype = q[OUTTYPES[outtype][0]]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        return q.F16  # llama.cpp falls back to F16 when rows don't split into blocks
    return qtype


def row_blocks(n_rows: int, row_elements: int) -> Iterator[tuple[int, int]]:
    """[start, stop) row ranges of about BLOCK_ELEMENTS elements each."""
    step = max(1, BLOCK_ELEMENTS // max(row_elements, 1))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


def stream(
    writer: gguf.GGUFWriter,
    path: Path,
    tensors: list[OutputTensor],
    progress: OnProgress | None = None,
) -> None:
    """Write header, metadata and tensor infos through `writer`, then each tensor's data block by
    block into the same file, padded to the writer's alignment the way GGUFWriter pads.

    progress hears a tensor start (done: tensors already written) and the last one end (done ==
    total)."""
    import gguf

    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    assert writer.fout is not None and len(writer.fout) == 1
    fout = writer.fout[0]
    try:
        for index, tensor in enumerate(tensors):
            if progress:
                progress(_tensor(tensor.name, index, len(tensors)))
            writer.write_padding(fout, fout.tell())
            written = 0
            for block in tensor.blocks():
                data = gguf.quants.quantize(block, tensor.qtype)
                data.tofile(fout)
                written += data.nbytes
                del data, block
            if written != tensor.nbytes:
                raise AssertionError(
                    f"{tensor.name}: wrote {written} bytes, planned {tensor.nbytes}"
                )
            writer.write_padding(fout, written)
        fout.flush()
        os.fsync(fout.fileno())
    finally:
        writer.close()
    if progress and tensors:
        progress(_tensor(tensors[-1].name, len(tensors), len(tensors)))


def _tensor(name: str, done: int, total: int) -> Progress:
    return Progress("convert", subject=name, done=done, total=total, unit="tensors")
