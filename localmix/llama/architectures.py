"""The model architectures the vendored llama.cpp loads (its LLM_ARCH_NAMES), as data.

A GGUF whose general.architecture is not here passes every header check and then fails at load
("unknown model architecture"): import refuses it first. tests/test_architectures.py checks this
list against llama-arch.cpp of the pinned llama-cpp-python's source when that file is present.
Left out: "clip" (llama.cpp's placeholder for llama-quantize only) and "(unknown)".
"""

from __future__ import annotations

from dataclasses import dataclass

KNOWN: frozenset[str] = frozenset((
    "llama", "llama4", "deci", "falcon", "grok", "gpt2", "gptj", "gptneox", "mpt", "baichuan",
    "starcoder", "refact", "bert", "modern-bert", "nomic-bert", "nomic-bert-moe", "neo-bert",
    "jina-bert-v2", "jina-bert-v3", "eurobert", "bloom", "stablelm", "qwen", "qwen2", "qwen2moe",
    "qwen2vl", "qwen3", "qwen3moe", "qwen3next", "qwen3vl", "qwen3vlmoe", "qwen35", "qwen35moe",
    "qwen4exp", "phi2", "phi3", "phimoe", "plamo", "plamo2", "plamo3", "codeshell", "orion",
    "internlm2", "minicpm", "minicpm3", "gemma", "gemma2", "gemma3", "gemma3n", "gemma4",
    "gemma4-assistant", "gemma-embedding", "starcoder2", "mamba", "mamba2", "maple", "jamba",
    "falcon-h1", "xverse", "command-r", "cohere2", "cohere2moe", "dbrx", "olmo", "olmo2", "olmoe",
    "muse-glimmer", "openelm", "arctic", "deepseek", "deepseek2", "deepseek2-ocr", "deepseek32",
    "deepseek4", "chatglm", "glm4", "glm4moe", "glm-dsa", "bitnet", "t5", "t5encoder", "jais",
    "jais2", "nemotron", "nemotron_h", "nemotron_h_moe", "exaone", "exaone4", "exaone-moe",
    "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7", "granite", "granitemoe", "granitehybrid",
    "graniteswitch", "granite_swa", "chameleon", "wavtokenizer-dec", "plm", "bailingmoe",
    "bailingmoe2", "bailingmoe3", "dots1", "dots3note", "arcee", "afmoe", "laguna", "ernie4_5",
    "ernie4_5-moe", "hunyuan-moe", "hunyuan-dense", "hunyuan_vl", "hy_v3", "hy_v4", "smollm3",
    "gpt-oss", "lfm2", "lfm2moe", "dream", "smallthinker", "llada", "llada-moe", "seed_oss",
    "grovemoe", "apertus", "minimax-01", "hrm_text", "minimax-m2", "minimax-m3", "cogvlm", "rnd1",
    "pangu-embedded", "mistral3", "eagle3", "dflash", "mistral4", "paddleocr", "mimo2", "step35",
    "spark2_5", "llama-embed", "maincoder", "kimi-linear", "kimi-k3", "glm5-next", "talkie",
    "mellum", "nanbeige", "qwen3tts", "pockettts",
))  # fmt: skip


@dataclass(frozen=True)
class Family:
    """What llama.cpp needs to load one Mistral architecture, beyond the keys every model has
    (block_count, context_length, embedding_length, head counts, rms epsilon, rope base)."""

    arch: str
    models: str
    keys: tuple[str, ...]  # architecture-scoped keys its loader reads (or must have to be right)
    layer_tensors: tuple[str, ...]  # tensors of a repeating block (MoE layers for mistral4)


_DENSE = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
_LLAMA_KEYS = ("feed_forward_length", "rope.dimension_count", "attention.key_length")
_YARN_KEYS = (
    "rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length",
    "rope.scaling.yarn_beta_fast", "rope.scaling.yarn_beta_slow",
    "rope.scaling.yarn_log_multiplier",
)  # fmt: skip
_MLA_KEYS = (
    "attention.q_lora_rank", "attention.kv_lora_rank", "attention.key_length",
    "attention.value_length", "attention.key_length_mla", "attention.value_length_mla",
    "rope.dimension_count", "expert_count", "expert_used_count", "expert_shared_count",
    "expert_feed_forward_length", "expert_gating_func", "expert_weights_norm",
    "leading_dense_block_count", "rope.scaling.type", "rope.scaling.yarn_log_multiplier",
    "attention.temperature_scale", "attention.temperature_length",
)  # fmt: skip
_MLA_MOE = (
    "attn_q_a", "attn_q_a_norm", "attn_q_b", "attn_kv_a_mqa", "attn_kv_a_norm", "attn_k_b",
    "attn_v_b", "attn_output", "ffn_gate_inp", "ffn_gate_up_exps", "ffn_down_exps",
    "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp",
)  # fmt: skip

# From the vendored llama.cpp: src/models/llama.cpp, mistral3.cpp, deepseek2.cpp (which mistral4
# reuses, with its own graph); gguf-py 0.19.0 (pinned) has MODEL_ARCH.MISTRAL3 and MISTRAL4.
MISTRAL_FAMILY: dict[str, Family] = {
    "llama": Family(
        "llama",
        "Mistral 7B, Mixtral, Mistral Small 3.x (Mistral-native), Devstral, Magistral",
        _LLAMA_KEYS,
        _DENSE,
    ),
    "mistral3": Family(
        "mistral3",
        "Ministral 3 3B / 8B / 14B, Devstral Small 2, Mistral 3 multimodal releases (HF)",
        (*_LLAMA_KEYS, *_YARN_KEYS, "attention.temperature_scale"),
        _DENSE,
    ),
    "mistral4": Family("mistral4", "Mistral Small 4 (119B, 6.5B active)", _MLA_KEYS, _MLA_MOE),
}
