"""Random-weight Mistral / Mixtral GGUFs written directly with gguf-py, for benchmarks only.

A stand-in for localmix.synth + localmix.convert while those are not importable: same tensor names
and shapes as a converted checkpoint, Mistral's v1 vocabulary, f16 weights. Speed depends on shapes
and quant types, not on the values.
"""

from __future__ import annotations

import os
from pathlib import Path

# (n_embd, n_layer, n_head, n_head_kv, n_ff, n_expert)
SHAPES = {
    ("mistral", "125m"): (768, 12, 12, 4, 2048, 0),
    ("mixtral", "small"): (512, 8, 8, 4, 1024, 8),
}


def write_gguf(path: Path, *, arch: str, size: str, seed: int = 0) -> Path:
    import gguf
    import mistral_common
    import numpy as np
    import sentencepiece

    n_embd, n_layer, n_head, n_kv, n_ff, n_expert = SHAPES[(arch, size)]
    model = Path(os.path.dirname(mistral_common.__file__)) / "data" / "tokenizer.model.v1"
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    n_vocab = sp.vocab_size()
    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32).astype(np.float16) * np.float16(
            1 / np.sqrt(shape[-1])
        )

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"synthetic-{arch}-{size}")
    w.add_context_length(4096)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(1e6)
    w.add_file_type(1)
    if n_expert:
        w.add_expert_count(n_expert)
        w.add_expert_used_count(2)
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i).encode() for i in range(n_vocab)])
    w.add_token_scores([sp.get_score(i) for i in range(n_vocab)])
    types = [
        2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
        for i in range(n_vocab)
    ]
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    ones = np.ones(n_embd, dtype=np.float32)
    head = n_embd // n_head
    w.add_tensor("token_embd.weight", weight(n_vocab, n_embd))
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", weight(n_vocab, n_embd))
    for b in range(n_layer):
        w.add_tensor(f"blk.{b}.attn_norm.weight", ones)
        w.add_tensor(f"blk.{b}.attn_q.weight", weight(n_embd, n_embd))
        w.add_tensor(f"blk.{b}.attn_k.weight", weight(n_kv * head, n_embd))
        w.add_tensor(f"blk.{b}.attn_v.weight", weight(n_kv * head, n_embd))
        w.add_tensor(f"blk.{b}.attn_output.weight", weight(n_embd, n_embd))
        w.add_tensor(f"blk.{b}.ffn_norm.weight", ones)
        if n_expert:
            w.add_tensor(
                f"blk.{b}.ffn_gate_inp.weight", weight(n_expert, n_embd).astype(np.float32)
            )
            w.add_tensor(f"blk.{b}.ffn_gate_exps.weight", weight(n_expert, n_ff, n_embd))
            w.add_tensor(f"blk.{b}.ffn_up_exps.weight", weight(n_expert, n_ff, n_embd))
            w.add_tensor(f"blk.{b}.ffn_down_exps.weight", weight(n_expert, n_embd, n_ff))
        else:
            w.add_tensor(f"blk.{b}.ffn_gate.weight", weight(n_ff, n_embd))
            w.add_tensor(f"blk.{b}.ffn_up.weight", weight(n_ff, n_embd))
            w.add_tensor(f"blk.{b}.ffn_down.weight", weight(n_embd, n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
