"""A tiny Llama-architecture GGUF with Mistral's v1 vocabulary (or a tekken one) whose greedy
output is scripted.

All attention and feed-forward weights are zero, so the residual stream is the token's embedding.
Each scripted token gets a one-hot embedding, and the output row of its successor points along it:
after token a the model's most likely next token is successors[a], by a wide margin. This makes
stream() produce exact, chosen token sequences (byte tokens of multi-byte characters, stop strings,
end of sequence) on real llama.cpp.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

N_EMBD = 64
N_HEAD = 4
N_FF = 64
N_LAYER = 1
# sentencepiece piece types -> llama.cpp token types (1 normal, 2 unknown, 3 control, 6 byte)
_UNKNOWN, _CONTROL, _BYTE, _NORMAL = 2, 3, 6, 1


def v1_tokenizer_path() -> Path:
    import mistral_common

    return Path(os.path.dirname(mistral_common.__file__)) / "data" / "tokenizer.model.v1"


def v3_tokenizer_path() -> Path:
    """Mistral 7B v0.3's sentencepiece model ([TOOL_CALLS] and friends as control tokens)."""
    return v1_tokenizer_path().with_name("mistral_instruct_tokenizer_240323.model.v3")


def write_scripted_gguf(
    path: Path,
    successors: dict[int, int],
    *,
    n_ctx: int = 512,
    tekken: Path | None = None,
    spm: Path | None = None,
    chat_template: str | None = None,
) -> Path:
    """Write the model; successors maps token -> the token greedy decoding emits after it.
    tekken: a tekken.json whose vocabulary replaces Mistral's v1 sentencepiece one; spm: another
    sentencepiece model (v3's, with tool-call control tokens).
    chat_template: a jinja template to store as tokenizer.chat_template."""
    import gguf
    import numpy as np

    if len(successors) > N_EMBD:
        raise ValueError(f"at most {N_EMBD} scripted tokens")
    vocab = _tekken_vocab(tekken) if tekken is not None else _spm_vocab(spm or v1_tokenizer_path())
    tokens, scores, types, tokenizer_keys = vocab
    n_vocab = len(tokens)

    rng = np.random.default_rng(0)
    embd = rng.normal(0, 0.01, (n_vocab, N_EMBD)).astype(np.float32)
    output = np.zeros((n_vocab, N_EMBD), dtype=np.float32)
    for dim, (token, after) in enumerate(successors.items()):
        embd[token] = 0.0
        embd[token, dim] = 1.0
        output[after, dim] = 10.0  # logit ~80 after RMS norm; every other logit stays near 0

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("scripted")
    writer.add_context_length(n_ctx)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(0)  # all F32
    tokenizer_keys(writer)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    zeros = np.zeros
    writer.add_tensor("token_embd.weight", embd)
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    writer.add_tensor("output.weight", output)
    for b in range(N_LAYER):
        writer.add_tensor(f"blk.{b}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"blk.{b}.{name}.weight", zeros((N_EMBD, N_EMBD), np.float32))
        writer.add_tensor(f"blk.{b}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(f"blk.{b}.ffn_gate.weight", zeros((N_FF, N_EMBD), np.float32))
        writer.add_tensor(f"blk.{b}.ffn_up.weight", zeros((N_FF, N_EMBD), np.float32))
        writer.add_tensor(f"blk.{b}.ffn_down.weight", zeros((N_EMBD, N_FF), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


Vocab = tuple[list[bytes], list[float], list[int], Callable[[Any], None]]


def _spm_vocab(model: Path) -> Vocab:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode())
        scores.append(sp.get_score(i))
        types.append(
            _UNKNOWN
            if sp.is_unknown(i)
            else _CONTROL
            if sp.is_control(i)
            else _BYTE
            if sp.is_byte(i)
            else _NORMAL
        )
    return tokens, scores, types, lambda w: w.add_tokenizer_model("llama")


def _tekken_vocab(tekken: Path) -> Vocab:
    """A tekken.json's vocabulary as llama.cpp's converter writes it (gguf's MistralVocab)."""
    import tempfile

    import gguf

    with tempfile.TemporaryDirectory() as folder:
        shutil.copyfile(tekken, Path(folder) / "tekken.json")
        vocab = gguf.MistralVocab(Path(folder))
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(int(kind))
        merges = vocab.extract_vocab_merges_from_model()

    def keys(writer: Any) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("tekken")
        writer.add_token_merges(merges)

    return tokens, scores, types, keys


def write_scripted_reply(
    path: Path,
    reply: list[str | int],
    *,
    after: int,
    tekken: Path | None = None,
    spm: Path | None = None,
    eos: int = 2,
) -> list[int]:
    """A scripted model whose greedy answer to a prompt ending in token `after` is `reply` (text
    parts in the model's own vocabulary, ints as token ids), then `eos`; returns the reply's ids.
    ValueError when a token repeats: a scripted model follows each token with one successor."""
    return write_scripted_replies(path, {after: reply}, tekken=tekken, spm=spm, eos=eos)[after]


def write_scripted_replies(
    path: Path,
    replies: dict[int, list[str | int]],
    *,
    tekken: Path | None = None,
    spm: Path | None = None,
    eos: int = 2,
    n_ctx: int = 512,
) -> dict[int, list[int]]:
    """write_scripted_reply with one reply per last prompt token (a turn's prompt ends in
    [/INST], the turn after a tool call in [/TOOL_RESULTS], ...); returns each reply's ids.
    ValueError when a token appears twice in all the chains together."""
    from localmix.llama.engine import Engine, EngineConfig

    write_scripted_gguf(path, {}, tekken=tekken, spm=spm)
    chains: dict[int, list[int]] = {}
    with Engine(EngineConfig(path, vocab_only=True)) as engine:
        for after, reply in replies.items():
            ids: list[int] = []
            for part in reply:
                ids += [part] if isinstance(part, int) else engine.tokenize(part, special=False)
            chains[after] = ids
    # eos ends every chain and has no successor, so it alone may appear in more than one
    tokens = [t for after, ids in chains.items() for t in (after, *ids)]
    if len(set(tokens)) != len(tokens) or eos in tokens:
        raise ValueError(f"a token repeats in the replies: {chains}")
    successors = {
        a: b for after, ids in chains.items() for a, b in itertools.pairwise([after, *ids, eos])
    }
    write_scripted_gguf(path, successors, n_ctx=n_ctx, tekken=tekken, spm=spm)
    return chains
