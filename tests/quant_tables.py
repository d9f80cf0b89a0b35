"""Tensor tables of real architectures at Q4_K_M, without weights, by llama-quant.cpp's rules.

`q4_k_m_info(MISTRAL_7B)` is what `localmix.gguffile.inspect` would return for a Q4_K_M file of
Mistral 7B; `write_f16_gguf` writes a tiny model of the same structure that llama.cpp can
quantize, so a test can check these rules against llama-quantize itself.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from localmix.gguffile import GGUFInfo, TensorInfo


@dataclass(frozen=True)
class Arch:
    name: str
    n_layer: int = 32
    n_embd: int = 4096
    n_ff: int = 14336
    n_head: int = 32
    n_head_kv: int = 8
    n_vocab: int = 32000
    n_expert: int = 0
    n_expert_used: int = 0
    context_length: int = 32768


MISTRAL_7B = Arch("Mistral 7B")
MIXTRAL_8X7B = Arch("Mixtral 8x7B", n_expert=8, n_expert_used=2)


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama-quant.cpp: the layers that get more bits (first and last eighth, every third)."""
    return (
        i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2
    )


def q4_k_m_types(arch: Arch) -> dict[str, str]:
    """Tensor name -> ggml type that llama-quantize Q4_K_M picks for a llama-architecture model."""
    moe = arch.n_expert == 8  # the rules single out 8-expert models
    types = {"token_embd.weight": "Q4_K", "output_norm.weight": "F32", "output.weight": "Q6_K"}
    for i in range(arch.n_layer):
        more = use_more_bits(i, arch.n_layer)
        b = f"blk.{i}."
        types |= {
            b + "attn_norm.weight": "F32",
            b + "ffn_norm.weight": "F32",
            b + "attn_q.weight": "Q4_K",
            b + "attn_k.weight": "Q8_0" if moe else "Q4_K",
            b + "attn_v.weight": "Q8_0" if moe else ("Q6_K" if more else "Q4_K"),
            b + "attn_output.weight": "Q5_K" if moe else "Q4_K",
        }
        down = "Q6_K" if more else "Q4_K"
        if arch.n_expert:
            types |= {
                b + "ffn_gate_inp.weight": "F32",  # the router is never quantized
                b + "ffn_gate_exps.weight": "Q4_K",
                b + "ffn_up_exps.weight": "Q4_K",
                b + "ffn_down_exps.weight": down,
            }
        else:
            types |= {b + "ffn_gate.weight": "Q4_K", b + "ffn_up.weight": "Q4_K"}
            types[b + "ffn_down.weight"] = down
    return types


def shapes(arch: Arch) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape in GGUF order (fastest-varying dimension first)."""
    e, f, v = arch.n_embd, arch.n_ff, arch.n_vocab
    kv = e // arch.n_head * arch.n_head_kv
    out: dict[str, tuple[int, ...]] = {"token_embd.weight": (e, v)}
    for i in range(arch.n_layer):
        b = f"blk.{i}."
        out |= {
            b + "attn_norm.weight": (e,),
            b + "attn_q.weight": (e, e),
            b + "attn_k.weight": (e, kv),
            b + "attn_v.weight": (e, kv),
            b + "attn_output.weight": (e, e),
            b + "ffn_norm.weight": (e,),
        }
        if arch.n_expert:
            x = arch.n_expert
            out |= {
                b + "ffn_gate_inp.weight": (e, x),
                b + "ffn_gate_exps.weight": (e, f, x),
                b + "ffn_up_exps.weight": (e, f, x),
                b + "ffn_down_exps.weight": (f, e, x),
            }
        else:
            out |= {b + "ffn_gate.weight": (e, f), b + "ffn_up.weight": (e, f)}
            out[b + "ffn_down.weight"] = (f, e)
    out |= {"output_norm.weight": (e,), "output.weight": (e, v)}
    return out


def tensor(name: str, type_name: str, shape: tuple[int, ...]) -> TensorInfo:
    import gguf

    n = 1
    for dim in shape:
        n *= dim
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return TensorInfo(name, type_name, shape, n_elements=n, n_bytes=n // block * size)


def metadata(arch: Arch) -> dict[str, object]:
    meta: dict[str, object] = {
        "general.architecture": "llama",
        "general.name": arch.name,
        "llama.block_count": arch.n_layer,
        "llama.context_length": arch.context_length,
        "llama.embedding_length": arch.n_embd,
        "llama.feed_forward_length": arch.n_ff,
        "llama.attention.head_count": arch.n_head,
        "llama.attention.head_count_kv": arch.n_head_kv,
        "llama.rope.dimension_count": arch.n_embd // arch.n_head,
    }
    if arch.n_expert:
        meta |= {"llama.expert_count": arch.n_expert, "llama.expert_used_count": 2}
    return meta


def q4_k_m_info(arch: Arch) -> GGUFInfo:
    """What inspect() would say about a Q4_K_M GGUF of this architecture (no file behind it)."""
    types = q4_k_m_types(arch)
    tensors = tuple(tensor(n, types[n], s) for n, s in shapes(arch).items())
    path = Path(f"{arch.name}.Q4_K_M.gguf")
    return GGUFInfo(
        path=path,
        files=(path,),
        file_size=sum(t.n_bytes for t in tensors),
        architecture="llama",
        name=arch.name,
        metadata=metadata(arch),
        tensors=tensors,
    )


def tiny(arch: Arch, n_layer: int = 8) -> Arch:
    """The same structure, small enough to write and quantize in a second (dims % 256 == 0)."""
    return replace(arch, n_layer=n_layer, n_embd=256, n_ff=256, n_head=4, n_head_kv=1, n_vocab=264)


def add_hparams(writer: Any, arch: Arch, name: str) -> None:
    """The llama architecture's hyper-parameters of arch, on a gguf.GGUFWriter."""
    writer.add_name(name)
    writer.add_block_count(arch.n_layer)
    writer.add_context_length(arch.context_length)
    writer.add_embedding_length(arch.n_embd)
    writer.add_feed_forward_length(arch.n_ff)
    writer.add_head_count(arch.n_head)
    writer.add_head_count_kv(arch.n_head_kv)
    writer.add_rope_dimension_count(arch.n_embd // arch.n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    if arch.n_expert:
        writer.add_expert_count(arch.n_expert)
        writer.add_expert_used_count(arch.n_expert_used)


def write_f16_gguf(arch: Arch, path: Path, seed: int = 0) -> Path:
    """A random-weight GGUF of this architecture: F16 matrices, F32 norms and router."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, "llama")
    add_hparams(writer, arch, arch.name)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"t{i}" for i in range(arch.n_vocab - len(tokens))]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, shape in shapes(arch).items():
        f32 = len(shape) == 1 or "ffn_gate_inp" in name
        data = rng.standard_normal(tuple(reversed(shape))) * 0.02
        writer.add_tensor(name, data.astype(np.float32 if f32 else np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
