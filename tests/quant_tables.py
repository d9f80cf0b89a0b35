"""Tensor tables of real architectures at Q4_K_M, without weights, by llama-quant.cpp's rules.

`q4_k_m_info(MISTRAL_7B)` is what `localmix.gguffile.inspect` would return for a Q4_K_M file of
Mistral 7B; `write_f16_gguf` writes a tiny model of the same structure that llama.cpp can
quantize, so a test can check these rules against llama-quantize itself.

Shapes come from the published configs: Mistral 7B and Mixtral (config.json); Mistral Small 3.2
(llama, tekken vocabulary, head_dim 128 below hidden/heads); Ministral 3 3B / 8B / 14B
(mistral3: 26 / 34 / 40 layers, hidden 3072 / 4096 / 5120, FFN 9216 / 14336 / 16384, 32 heads,
8 KV heads, head_dim 128, the 3B ties its output to the embeddings); Mistral Small 4 (mistral4:
transformers' Mistral4Config, whose defaults are mistralai/Mistral-Small-4-119B-2603: 36 layers,
hidden 4096, MLA with q_lora_rank 1024, kv_lora_rank 256, 64 + 64 q/k head dims and 128 V,
128 routed experts of 2048, 4 used, 1 shared, no leading dense layer).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from localmix.build.synth import ggufs as synthgguf
from localmix.build.synth.ggufs import Mla
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
    arch: str = "llama"  # general.architecture: llama or mistral3 (same tensors)
    head_dim: int = 0  # 0: n_embd // n_head
    tied: bool = False  # no output.weight: llama.cpp reuses token_embd

    @property
    def n_rot(self) -> int:
        return self.head_dim or self.n_embd // self.n_head


MISTRAL_7B = Arch("Mistral 7B")
MIXTRAL_8X7B = Arch("Mixtral 8x7B", n_expert=8, n_expert_used=2)
_TEKKEN = {"n_vocab": 131072, "head_dim": 128}
MISTRAL_SMALL_3_2 = Arch(
    "Mistral Small 3.2 24B", n_layer=40, n_embd=5120, n_ff=32768, context_length=131072, **_TEKKEN
)
# The models that need several machines. Mistral Large 2 (2407 and 2411 alike): its config.json /
# params.json; Devstral 2 123B: the same body with the tekken vocabulary (its Q4_K_M, 69.75 GiB and
# 125.03 B parameters in llama-bench, is exactly this table); Mixtral 8x22B: its config.json.
MISTRAL_LARGE_2 = Arch(
    "Mistral Large 2 123B", n_layer=88, n_embd=12288, n_ff=28672, n_head=96, n_vocab=32768,
    context_length=131072, head_dim=128,
)  # fmt: skip
DEVSTRAL_2 = replace(MISTRAL_LARGE_2, name="Devstral 2 123B", context_length=262144, **_TEKKEN)
MIXTRAL_8X22B = Arch(
    "Mixtral 8x22B", n_layer=56, n_embd=6144, n_ff=16384, n_head=48, n_vocab=32768,
    n_expert=8, n_expert_used=2, context_length=65536,
)  # fmt: skip
MINISTRAL_3_3B = Arch(
    "Ministral 3 3B", n_layer=26, n_embd=3072, n_ff=9216, context_length=262144,
    arch="mistral3", tied=True, **_TEKKEN,
)  # fmt: skip
MINISTRAL_3_8B = Arch(
    "Ministral 3 8B", n_layer=34, n_embd=4096, n_ff=14336, context_length=262144,
    arch="mistral3", **_TEKKEN,
)  # fmt: skip
MINISTRAL_3_14B = Arch(
    "Ministral 3 14B", n_layer=40, n_embd=5120, n_ff=16384, context_length=262144,
    arch="mistral3", **_TEKKEN,
)  # fmt: skip


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama-quant.cpp: the layers that get more bits (first and last eighth, every third)."""
    return (
        i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2
    )


def q4_k_m_types(arch: Arch) -> dict[str, str]:
    """Tensor name -> ggml type that llama-quantize Q4_K_M picks for a llama-architecture model."""
    moe = arch.n_expert == 8  # the rules single out 8-expert models
    types = {"token_embd.weight": "Q4_K", "output_norm.weight": "F32", "output.weight": "Q6_K"}
    if arch.tied:  # the shared tensor gets the output's type
        types["token_embd.weight"] = types.pop("output.weight")
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
    q, kv = arch.n_rot * arch.n_head, arch.n_rot * arch.n_head_kv
    out: dict[str, tuple[int, ...]] = {"token_embd.weight": (e, v)}
    for i in range(arch.n_layer):
        b = f"blk.{i}."
        out |= {
            b + "attn_norm.weight": (e,),
            b + "attn_q.weight": (e, q),
            b + "attn_k.weight": (e, kv),
            b + "attn_v.weight": (e, kv),
            b + "attn_output.weight": (q, e),
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
    out["output_norm.weight"] = (e,)
    if not arch.tied:
        out["output.weight"] = (e, v)
    return out


def tensor(name: str, type_name: str, shape: tuple[int, ...]) -> TensorInfo:
    import gguf

    n = 1
    for dim in shape:
        n *= dim
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return TensorInfo(name, type_name, shape, n_elements=n, n_bytes=n // block * size)


def metadata(arch: Arch) -> dict[str, object]:
    a = arch.arch
    meta: dict[str, object] = {
        "general.architecture": a,
        "general.name": arch.name,
        f"{a}.block_count": arch.n_layer,
        f"{a}.context_length": arch.context_length,
        f"{a}.embedding_length": arch.n_embd,
        f"{a}.feed_forward_length": arch.n_ff,
        f"{a}.attention.head_count": arch.n_head,
        f"{a}.attention.head_count_kv": arch.n_head_kv,
        f"{a}.rope.dimension_count": arch.n_rot,
    }
    if arch.head_dim:
        meta |= {f"{a}.attention.key_length": arch.head_dim}
        meta |= {f"{a}.attention.value_length": arch.head_dim}
    if arch.n_expert:
        meta |= {f"{a}.expert_count": arch.n_expert, f"{a}.expert_used_count": 2}
    return meta


def q4_k_m_info(arch: Arch) -> GGUFInfo:
    """What inspect() would say about a Q4_K_M GGUF of this architecture (no file behind it)."""
    return _info(arch.name, arch.arch, metadata(arch), shapes(arch), q4_k_m_types(arch))


def _info(
    name: str,
    architecture: str,
    meta: dict[str, object],
    shape_of: dict[str, tuple[int, ...]],
    types: dict[str, str],
) -> GGUFInfo:
    tensors = tuple(tensor(n, types[n], s) for n, s in shape_of.items())
    path = Path(f"{name}.Q4_K_M.gguf")
    return GGUFInfo(
        path=path,
        files=(path,),
        file_size=sum(t.n_bytes for t in tensors),
        architecture=architecture,
        name=name,
        metadata=meta,
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
    writer.add_rope_dimension_count(arch.n_rot)
    if arch.head_dim:
        writer.add_key_length(arch.head_dim)
        writer.add_value_length(arch.head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    if arch.n_expert:
        writer.add_expert_count(arch.n_expert)
        writer.add_expert_used_count(arch.n_expert_used)


def write_f16_gguf(arch: Arch, path: Path, seed: int = 0) -> Path:
    """A random-weight GGUF of this architecture: F16 matrices, F32 norms and router."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, arch.arch)
    add_hparams(writer, arch, arch.name)
    fake_vocab(arch.n_vocab)(writer)
    for name, shape in shapes(arch).items():
        f32 = len(shape) == 1 or "ffn_gate_inp" in name
        data = rng.standard_normal(tuple(reversed(shape))) * 0.02
        writer.add_tensor(name, data.astype(np.float32 if f32 else np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def fake_vocab(n_vocab: int) -> Any:
    """A writer of a small sentencepiece-style vocabulary (enough for llama-quantize)."""

    def add(writer: Any) -> None:
        tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
        tokens += [f"t{i}" for i in range(n_vocab - len(tokens))]
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores([0.0] * len(tokens))
        writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259))
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)

    return add


# ---- mistral4: multi-head latent attention and routed + shared experts -----------------------

SMALL_4 = synthgguf.SMALL_4
# The same structure small enough to quantize in a second: rows of 256 where K-quants apply, 32
# where llama.cpp falls back (attn_k_b, attn_output), a leading dense layer, 8 layers so the
# ffn_down rule varies.
TINY_MLA = Mla(
    n_layer=8, n_embd=256, n_head=2, q_lora_rank=256, kv_lora_rank=256, qk_rope_dim=32,
    qk_nope_dim=32, v_head_dim=64, n_expert=4, n_expert_used=2, n_shared=1, n_ff_exp=256,
    n_ff=256, n_dense_lead=1, n_vocab=264, context=4096,
)  # fmt: skip
_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}  # llama-quant.cpp tensor_type_fallback


def mla_q4_k_m_types(spec: Mla) -> dict[str, str]:
    """Tensor name -> ggml type that llama-quantize Q4_K_M picks for a mistral4 model."""
    types: dict[str, str] = {}
    for name, shape in spec.tensors():
        if len(shape) == 1 or "ffn_gate_inp" in name:
            types[name] = "F32"
            continue
        want = "Q6_K" if name == "output.weight" else "Q4_K"
        if "ffn_down" in name:  # dense, routed and shared alike, by layer
            layer = int(name.split(".")[1])
            want = "Q6_K" if use_more_bits(layer, spec.n_layer) else "Q4_K"
        if shape[0] % 256:
            want = _FALLBACK[want] if shape[0] % 32 == 0 else "F16"
        types[name] = want
    return types


def mla_info(spec: Mla, name: str) -> GGUFInfo:
    """What inspect() would say about a Q4_K_M mistral4 GGUF of this structure."""
    meta: dict[str, object] = {"general.architecture": synthgguf.ARCH, "general.name": name}
    meta |= spec.metadata()
    return _info(name, synthgguf.ARCH, meta, dict(spec.tensors()), mla_q4_k_m_types(spec))


def write_f16_mla(spec: Mla, path: Path) -> Path:
    """A random-weight F16 mistral4 GGUF with a small vocabulary, for llama-quantize."""
    return synthgguf.write(path, spec, embeddings="f16", vocab=fake_vocab(spec.n_vocab))
