"""Realistic-size Q4_K_M GGUFs for the GPU check: Mistral 7B and Mixtral 8x7B shapes, random data.

Tensor names, shapes and types are llama-quantize's Q4_K_M choices for the llama architecture
(tests/quant_tables.py, which tests check against llama-quantize itself). The quantized blocks are
random but valid: random quants and scales, with each block's f16 scale fields set small so
weights come out near N(0, 0.02) in size and activations stay finite. Norms are 1.0, the router
is small random f32. The tokenizer keys come from a tiny model localmix converts itself (Mistral's
v1 tokenizer), so `localmix chat --format v1` works on these files. Data is written from one
reusable buffer per type, so memory stays small and a 26 GB Mixtral takes seconds on tmpfs.

    python benchmarks/gpu_models.py OUT_DIR [--which 7b,mixtral] [--scale full|tiny]

prints one JSON line per model: name, path, bytes, seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.quant_tables import (  # noqa: E402
    MISTRAL_7B,
    MIXTRAL_8X7B,
    Arch,
    add_hparams,
    q4_k_m_types,
    shapes,
)

FTYPE_Q4_K_M = 15  # enum llama_ftype
BUFFER_BYTES = 32 << 20
# where each block keeps its f16 scale(s), and a size that makes weights about 0.02 in magnitude
# (ggml-common.h: block_q4_K / q5_K = {d, dmin, scales, [qh,] qs}, block_q6_K = {ql, qh,
# scales, d}, block_q8_0 = {d, qs})
SCALES: dict[str, tuple[tuple[int, ...], float]] = {
    "Q4_K": ((0, 2), 1e-4),
    "Q5_K": ((0, 2), 5e-5),
    "Q6_K": ((208,), 1e-5),
    "Q8_0": ((0,), 3e-4),
}
# localmix synth's "125m" Mistral (the CPU benchmarks' model), for chat speed on a quiet machine
MISTRAL_125M = Arch("Mistral 125M", n_layer=12, n_embd=768, n_ff=2048, n_head=12, n_head_kv=4,
                    context_length=8192)  # fmt: skip
MODELS = {"7b": MISTRAL_7B, "mixtral": MIXTRAL_8X7B, "125m": MISTRAL_125M}


def tiny(arch: Arch) -> Arch:
    """The same structure scaled down for a CPU rehearsal (the v1 vocabulary stays)."""
    return replace(arch, n_layer=4, n_embd=256, n_ff=512, n_head=4, n_head_kv=1)


def block_buffer(type_name: str, seed: int, limit: int = BUFFER_BYTES) -> bytes:
    """Up to `limit` bytes (whole blocks) of random valid blocks of a ggml type."""
    import gguf
    import numpy as np

    block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][1]
    n_blocks = max(1, min(limit, BUFFER_BYTES) // block_bytes)
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    offsets, scale = SCALES[type_name]
    values = (scale * rng.uniform(0.5, 1.5, size=n_blocks)).astype(np.float16).view(np.uint8)
    for offset in offsets:
        blocks[:, offset : offset + 2] = values.reshape(n_blocks, 2)
    return blocks.tobytes()


def template_gguf(work: Path) -> Path:
    """A tiny Mistral GGUF with the v1 tokenizer, made by localmix's own synth and convert."""
    from localmix.build.convert import convert
    from localmix.build.synth import checkpoints as synth

    ckpt = synth.checkpoint(work / "tiny-ckpt", arch="mistral", size="tiny", seed=0)
    return convert(ckpt, work / "tiny-v1.gguf", outtype="f32")


def _copy_tokenizer(writer: Any, template: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(template)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub_type=sub)


def write_model(arch: Arch, path: Path, template: Path, seed: int = 0) -> int:
    """Write arch as a Q4_K_M GGUF at path; returns its size in bytes."""
    import gguf
    import numpy as np

    types = q4_k_m_types(arch)
    table = shapes(arch)
    writer = gguf.GGUFWriter(path, "llama")
    add_hparams(writer, arch, arch.name + " (random weights)")
    writer.add_rope_freq_base(1e6 if arch.n_expert else 1e4)
    writer.add_file_type(FTYPE_Q4_K_M)
    _copy_tokenizer(writer, template)
    rng = np.random.default_rng(seed)
    plain: dict[str, np.ndarray] = {}
    for name, shape in table.items():
        kind = gguf.GGMLQuantizationType[types[name]]
        n = int(np.prod(shape))
        if kind == gguf.GGMLQuantizationType.F32:
            values = np.ones(n, np.float32) if len(shape) == 1 else rng.normal(0, 0.02, n)
            plain[name] = values.astype(np.float32).reshape(tuple(reversed(shape)))
            writer.add_tensor_info(name, plain[name].shape, np.dtype(np.float32), n * 4)
            continue
        block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
        # numpy order, the innermost dimension in bytes: gguf turns it back into elements
        byte_shape = (*reversed(shape[1:]), shape[0] // block * block_bytes)
        writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), n // block * block_bytes, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    out = writer.fout[0]
    buffers: dict[str, bytes] = {}
    align = writer.data_alignment
    for index, (name, shape) in enumerate(table.items()):
        out.write(b"\0" * (-out.tell() % align))
        if name in plain:
            out.write(plain[name].tobytes())
            continue
        type_name = types[name]
        kind = gguf.GGMLQuantizationType[type_name]
        block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
        left = int(np.prod(shape)) // block * block_bytes
        if type_name not in buffers:
            largest = max(
                int(np.prod(s)) // block * block_bytes
                for n, s in table.items()
                if types[n] == type_name
            )
            buffers[type_name] = block_buffer(type_name, seed + index, largest)
        buffer = buffers[type_name]
        view = memoryview(buffer)
        while left:
            step = min(left, len(view))
            out.write(view[:step])
            left -= step
    out.write(b"\0" * (-out.tell() % align))
    writer.close()
    return path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--which", default="7b,mixtral,125m")
    parser.add_argument("--scale", choices=("full", "tiny"), default="full")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    template = args.out / "template" / "tiny-v1.gguf"
    template = template if template.is_file() else template_gguf(args.out / "template")
    for key in args.which.split(","):
        arch = MODELS[key] if args.scale == "full" else tiny(MODELS[key])
        path = args.out / f"{key}.gguf"
        start = time.perf_counter()
        if not path.is_file():  # a complete file from an earlier run is the same file: reuse it
            partial = path.with_suffix(".partial")
            write_model(arch, partial, template)
            partial.rename(path)
        size = path.stat().st_size
        line = {"name": key, "path": str(path), "bytes": size}
        print(json.dumps(line | {"seconds": round(time.perf_counter() - start, 2)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
