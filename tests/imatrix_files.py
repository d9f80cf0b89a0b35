"""Importance-matrix files for tests, in both of llama-imatrix's formats, made for a given GGUF:
one entry per matrix weight, sized by its input width (times the experts for stacked experts)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np


def matrix_weights(model: Path) -> dict[str, int]:
    """name -> number of importance values, for every weight that multiplies activations."""
    return {name: size for name, (size, _) in _weights(model).items()}


def _weights(model: Path) -> dict[str, tuple[int, int]]:
    """name -> (values, experts): an expert-stacked weight has one row of values per expert."""
    from localmix import gguffile

    out = {}
    for t in gguffile.inspect(model).tensors:
        if t.name.endswith(".weight") and len(t.shape) >= 2 and t.name != "token_embd.weight":
            experts = t.shape[2] if len(t.shape) == 3 else 1
            out[t.name] = (t.shape[0] * experts, experts)
    return out


def write_gguf_imatrix(model: Path, out: Path, seed: int = 0, chunks: int = 10) -> Path:
    """The GGUF format: <name>.in_sum2 (sums of squares) and <name>.counts per weight."""
    import gguf

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(out, arch="imatrix")
    writer.add_array("imatrix.datasets", ["tests"])
    writer.add_uint32("imatrix.chunk_count", chunks)
    writer.add_uint32("imatrix.chunk_size", 512)
    for name, (size, experts) in _weights(model).items():
        sums = rng.uniform(0.5, 50.0, size).astype(np.float32) * 100
        counts = np.full((experts, 1), 100.0, dtype=np.float32)
        writer.add_tensor(name + ".in_sum2", sums.reshape(experts, -1))
        writer.add_tensor(name + ".counts", counts)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def write_legacy_imatrix(model: Path, out: Path, seed: int = 0, chunks: int = 10) -> Path:
    """The legacy .dat format with the same values as write_gguf_imatrix(seed) after normalising."""
    rng = np.random.default_rng(seed)
    parts = []
    weights = matrix_weights(model)
    parts.append(struct.pack("<i", len(weights)))
    for name, size in weights.items():
        sums = rng.uniform(0.5, 50.0, size).astype(np.float32) * 100
        encoded = name.encode()
        parts.append(struct.pack("<i", len(encoded)) + encoded + struct.pack("<ii", 100, size))
        parts.append(sums.astype("<f4").tobytes())
    dataset = b"tests"
    parts.append(struct.pack("<ii", chunks, len(dataset)) + dataset)
    out.write_bytes(b"".join(parts))
    return out
