"""Tiny random-weight GGUFs written directly, for an architecture that localmix runs but does not
convert: mistral4 (Mistral Small 4: multi-head latent attention and a 128-expert MoE with one
shared expert; llama.cpp loads it through its deepseek2 code, llama-model.cpp / models/mistral4).

The keys and tensors are the ones llama.cpp's loader reads for mistral4 (deepseek2.cpp
load_arch_hparams / load_arch_tensors), written through gguf-py 0.19.0, whose MODEL_ARCH has
MISTRAL4 and its tensor list. The tokenizer is a real one: mistral-common's tekken file.

    write(Path("tiny-mistral4.gguf"), TINY_MISTRAL4)
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import gguf
    import numpy as np

ARCH = "mistral4"
TEKKEN_FILE = "tekken_240718.json"  # in mistral_common/data
TEKKEN_VOCAB = 131072


@dataclass(frozen=True)
class Mla:
    """The hyper-parameters of a mistral4 model (transformers' Mistral4Config names in comments)."""

    n_layer: int  # num_hidden_layers
    n_embd: int  # hidden_size
    n_head: int  # num_attention_heads
    q_lora_rank: int
    kv_lora_rank: int
    qk_rope_dim: int  # qk_rope_head_dim: the rotated part of each q/k head
    qk_nope_dim: int  # qk_nope_head_dim
    v_head_dim: int
    n_expert: int  # n_routed_experts
    n_expert_used: int  # num_experts_per_tok
    n_shared: int  # n_shared_experts
    n_ff_exp: int  # moe_intermediate_size
    n_ff: int  # intermediate_size: the leading dense layers' MLP
    n_dense_lead: int  # first_k_dense_replace
    n_vocab: int
    context: int  # max_position_embeddings
    rope_theta: float = 10000.0
    yarn_factor: float = 128.0
    yarn_orig_ctx: int = 8192
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    mscale_all_dim: float = 1.0
    attn_temp_scale: float = 0.1  # llama_4_scaling_beta
    norm_eps: float = 1e-6

    @property
    def head_k(self) -> int:
        """One head's q/k width after decompression (key_length_mla)."""
        return self.qk_nope_dim + self.qk_rope_dim

    def tensors(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """(GGUF name, shape in ggml order: fastest-varying dimension first) in file order."""
        e, h = self.n_embd, self.n_head
        yield "token_embd.weight", (e, self.n_vocab)
        for i in range(self.n_layer):
            b = f"blk.{i}."
            yield b + "attn_norm.weight", (e,)
            yield b + "attn_q_a_norm.weight", (self.q_lora_rank,)
            yield b + "attn_kv_a_norm.weight", (self.kv_lora_rank,)
            yield b + "attn_q_a.weight", (e, self.q_lora_rank)
            yield b + "attn_q_b.weight", (self.q_lora_rank, h * self.head_k)
            yield b + "attn_kv_a_mqa.weight", (e, self.kv_lora_rank + self.qk_rope_dim)
            # kv_b split for the absorbed form, k_b transposed (convert_hf_to_gguf DeepseekV2)
            yield b + "attn_k_b.weight", (self.qk_nope_dim, self.kv_lora_rank, h)
            yield b + "attn_v_b.weight", (self.kv_lora_rank, self.v_head_dim, h)
            yield b + "attn_output.weight", (h * self.v_head_dim, e)
            yield b + "ffn_norm.weight", (e,)
            if i < self.n_dense_lead:
                yield b + "ffn_gate.weight", (e, self.n_ff)
                yield b + "ffn_down.weight", (self.n_ff, e)
                yield b + "ffn_up.weight", (e, self.n_ff)
                continue
            shared = self.n_ff_exp * self.n_shared
            yield b + "ffn_gate_inp.weight", (e, self.n_expert)
            # gate and up stacked in one tensor, as the Hugging Face checkpoint stores them
            yield b + "ffn_gate_up_exps.weight", (e, 2 * self.n_ff_exp, self.n_expert)
            yield b + "ffn_down_exps.weight", (self.n_ff_exp, e, self.n_expert)
            yield b + "ffn_gate_shexp.weight", (e, shared)
            yield b + "ffn_down_shexp.weight", (shared, e)
            yield b + "ffn_up_shexp.weight", (e, shared)
        yield "output_norm.weight", (e,)
        yield "output.weight", (e, self.n_vocab)

    def metadata(self) -> dict[str, object]:
        """The architecture's keys as inspect() reports them (no tokenizer, no general.*)."""
        a = ARCH
        return {
            f"{a}.block_count": self.n_layer,
            f"{a}.context_length": self.context,
            f"{a}.embedding_length": self.n_embd,
            f"{a}.feed_forward_length": self.n_ff,
            f"{a}.attention.head_count": self.n_head,
            # MLA runs as MQA over the compressed row: one KV head of kv_lora_rank + rope dims
            f"{a}.attention.head_count_kv": 1,
            f"{a}.attention.key_length": self.kv_lora_rank + self.qk_rope_dim,
            f"{a}.attention.value_length": self.kv_lora_rank,
            f"{a}.attention.key_length_mla": self.head_k,
            f"{a}.attention.value_length_mla": self.v_head_dim,
            f"{a}.attention.q_lora_rank": self.q_lora_rank,
            f"{a}.attention.kv_lora_rank": self.kv_lora_rank,
            f"{a}.attention.layer_norm_rms_epsilon": self.norm_eps,
            f"{a}.leading_dense_block_count": self.n_dense_lead,
            f"{a}.expert_count": self.n_expert,
            f"{a}.expert_used_count": self.n_expert_used,
            f"{a}.expert_shared_count": self.n_shared,
            f"{a}.expert_feed_forward_length": self.n_ff_exp,
            f"{a}.rope.dimension_count": self.qk_rope_dim,
        }

    def add_hparams(self, w: gguf.GGUFWriter) -> None:
        """Every key llama.cpp's mistral4 loader reads, as convert_hf_to_gguf.py writes them."""
        import gguf

        w.add_block_count(self.n_layer)
        w.add_context_length(self.context)
        w.add_embedding_length(self.n_embd)
        w.add_feed_forward_length(self.n_ff)
        w.add_head_count(self.n_head)
        w.add_head_count_kv(1)
        w.add_layer_norm_rms_eps(self.norm_eps)
        w.add_leading_dense_block_count(self.n_dense_lead)
        w.add_vocab_size(self.n_vocab)
        w.add_q_lora_rank(self.q_lora_rank)
        w.add_kv_lora_rank(self.kv_lora_rank)
        w.add_key_length(self.kv_lora_rank + self.qk_rope_dim)
        w.add_value_length(self.kv_lora_rank)
        w.add_key_length_mla(self.head_k)
        w.add_value_length_mla(self.v_head_dim)
        w.add_expert_feed_forward_length(self.n_ff_exp)
        w.add_expert_count(self.n_expert)
        w.add_expert_used_count(self.n_expert_used)
        w.add_expert_shared_count(self.n_shared)
        w.add_expert_weights_scale(1.0)  # routed_scaling_factor
        w.add_expert_weights_norm(True)  # norm_topk_prob
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
        w.add_rope_dimension_count(self.qk_rope_dim)
        w.add_rope_freq_base(self.rope_theta)
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(self.yarn_factor)
        w.add_rope_scaling_orig_ctx_len(self.yarn_orig_ctx)
        w.add_rope_scaling_yarn_beta_fast(self.yarn_beta_fast)
        w.add_rope_scaling_yarn_beta_slow(self.yarn_beta_slow)
        # llama.cpp divides this key by 0.1 for the deepseek2 family (TAG_DEEPSEEK2_YARN_LOG_MUL_FIX)
        w.add_rope_scaling_yarn_log_mul(0.1 * self.mscale_all_dim)
        # Llama 4 style query scaling past yarn_orig_ctx positions (Mistral's llama_4_scaling)
        w.add_attn_temperature_scale(self.attn_temp_scale)
        w.add_attn_temperature_length(self.yarn_orig_ctx)


# mistralai/Mistral-Small-4-119B-2603: transformers' Mistral4Config defaults are this checkpoint.
SMALL_4 = Mla(
    n_layer=36, n_embd=4096, n_head=32, q_lora_rank=1024, kv_lora_rank=256, qk_rope_dim=64,
    qk_nope_dim=64, v_head_dim=128, n_expert=128, n_expert_used=4, n_shared=1, n_ff_exp=2048,
    n_ff=12288, n_dense_lead=0, n_vocab=TEKKEN_VOCAB, context=1048576,
)  # fmt: skip
# The same structure at a few MB (tekken's 131k-row embeddings dominate, stored as Q8_0).
TINY_MISTRAL4 = Mla(
    n_layer=2, n_embd=32, n_head=4, q_lora_rank=32, kv_lora_rank=32, qk_rope_dim=16,
    qk_nope_dim=16, v_head_dim=16, n_expert=8, n_expert_used=2, n_shared=1, n_ff_exp=32,
    n_ff=64, n_dense_lead=0, n_vocab=TEKKEN_VOCAB, context=4096,
)  # fmt: skip


def write(
    path: Path,
    spec: Mla = TINY_MISTRAL4,
    *,
    seed: int = 0,
    embeddings: str = "q8_0",
    vocab: Callable[[gguf.GGUFWriter], None] | None = None,
    name: str = "tiny-mistral4",
) -> Path:
    """Write a random-weight mistral4 GGUF to `path`; return it.

    Norms and the router are F32, the other matrices F16; token_embd and output are `embeddings`
    ("q8_0" or "f16"). vocab writes the tokenizer (default: mistral-common's tekken file).
    """
    import gguf

    path = Path(path)
    w = gguf.GGUFWriter(path, ARCH)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    spec.add_hparams(w)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    (vocab or _tekken(spec.n_vocab))(w)
    for tensor_name, shape in spec.tensors():
        data, qtype = _tensor(seed, tensor_name, shape, embeddings)
        w.add_tensor(tensor_name, data, raw_dtype=qtype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _tensor(
    seed: int, name: str, shape: tuple[int, ...], embeddings: str
) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    """Seeded per tensor like synth's checkpoints: norms near 1, weights of std 1/sqrt(fan_in)."""
    import gguf
    import numpy as np

    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    x = rng.standard_normal(tuple(reversed(shape)), dtype=np.float32)  # numpy order
    if len(shape) == 1:
        return x * np.float32(0.1) + np.float32(1.0), None
    x *= np.float32(shape[0] ** -0.5)
    if "ffn_gate_inp" in name:
        return x, None  # the router stays F32, as llama.cpp keeps it
    if name in ("token_embd.weight", "output.weight") and embeddings == "q8_0":
        q8 = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(x, q8), q8
    return x.astype(np.float16), None


def _tekken(n_vocab: int) -> Callable[[gguf.GGUFWriter], None]:
    def add(w: gguf.GGUFWriter) -> None:
        import mistral_common

        from localmix.build.convert.vocab import add_mistral_vocab

        source = Path(mistral_common.__file__).parent / "data" / TEKKEN_FILE
        with _folder() as folder:
            shutil.copyfile(source, folder / "tekken.json")
            add_mistral_vocab(w, folder, n_vocab)

    return add


@contextlib.contextmanager
def _folder() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="localmix-tekken-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
