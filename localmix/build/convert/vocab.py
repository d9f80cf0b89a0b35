"""Tokenizers -> GGUF vocab, as llama.cpp's converter does it: a sentencepiece tokenizer.model (with
tokenizer_config.json's added tokens, special ids and chat template), a tokenizer.json through
gguf's LlamaHfVocab, or mistral-common's own files (tokenizer.model.v*, tekken.json) through gguf's
MistralVocab."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localmix.build.convert.checkpoint import Checkpoint
from localmix.errors import CheckpointError

if TYPE_CHECKING:
    import gguf

# sentencepiece token types, as gguf.TokenType numbers
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def add_vocab(w: gguf.GGUFWriter, ckpt: Checkpoint, vocab_size: int) -> None:
    """Write the tokenizer of `ckpt` into `w`; CheckpointError if there is none."""
    d = ckpt.directory
    try:
        if ckpt.layout == "mistral" or (
            (d / "tekken.json").is_file() and not (d / "tokenizer.json").is_file()
        ):
            add_mistral_vocab(w, d, vocab_size)
            return
        _space_prefix(w, d)
        if (d / "tokenizer.model").is_file():
            _sentencepiece(w, d, vocab_size)
        elif (d / "tokenizer.json").is_file():
            try:
                _llama_hf(w, d)
            except TypeError:  # a BPE tokenizer.json (Mistral Nemo ships tekken.json beside it)
                if not (d / "tekken.json").is_file():
                    raise CheckpointError(
                        f"{d / 'tokenizer.json'}: a BPE tokenizer localmix cannot convert",
                        hint="add the repo's tekken.json or tokenizer.model",
                    ) from None
                add_mistral_vocab(w, d, vocab_size)
        else:
            raise CheckpointError(
                f"{d}: no tokenizer (tokenizer.model, tokenizer.json or tekken.json)",
                hint="copy the tokenizer files of the checkpoint's repo into the directory",
            )
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(
            f"{d}: cannot read the tokenizer ({exc})", hint="the tokenizer file is damaged"
        ) from None


def _space_prefix(w: gguf.GGUFWriter, d: Path) -> None:
    config = _tokenizer_config(d)
    if (value := config.get("add_prefix_space")) is not None:
        w.add_add_space_prefix(bool(value))


def _tokenizer_config(d: Path) -> dict[str, Any]:
    path = d / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path}: not valid JSON ({exc})", hint="the file is damaged"
        ) from None
    return value if isinstance(value, dict) else {}


def _sentencepiece(w: gguf.GGUFWriter, d: Path, vocab_size: int) -> None:
    import gguf
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(d / "tokenizer.model"))
    # the config's vocab_size wins: ids past the tokenizer are padding, past the config dropped
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [_UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        types[i] = _piece_type(sp, i)
    _added_tokens(d, tokens, scores, types)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    gguf.SpecialVocab(d, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)


def _piece_type(sp: Any, i: int) -> int:
    if sp.IsUnknown(i):
        return _UNKNOWN
    if sp.IsControl(i):
        return _CONTROL
    if sp.IsUnused(i):
        return _UNUSED
    if sp.IsByte(i):
        return _BYTE
    return _NORMAL


def _added_tokens(d: Path, tokens: list[bytes], scores: list[float], types: list[int]) -> None:
    """added_tokens.json and tokenizer_config.json's added_tokens_decoder override pieces."""
    n = len(tokens)
    added = d / "added_tokens.json"
    if added.is_file():
        for text, i in json.loads(added.read_text(encoding="utf-8")).items():
            if i < n:
                tokens[i], scores[i], types[i] = text.encode("utf-8"), -1000.0, _USER_DEFINED
    for key, data in _tokenizer_config(d).get("added_tokens_decoder", {}).items():
        i, text = int(key), data["content"]
        if i >= n:
            continue
        if data.get("special") or _looks_special(text):
            types[i] = _CONTROL
        else:
            text = text.replace("\u2581", " ")  # sentencepiece's space marker, pre-normalized
            types[i] = _USER_DEFINED
        scores[i] = -1000.0
        tokens[i] = text.encode("utf-8")


def _looks_special(text: str) -> bool:
    """llama.cpp's heuristic for added tokens that are control tokens in all but name."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def _llama_hf(w: gguf.GGUFWriter, d: Path) -> None:
    import gguf

    vocab = gguf.LlamaHfVocab(d)
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    gguf.SpecialVocab(d, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)


def add_mistral_vocab(w: gguf.GGUFWriter, d: Path, vocab_size: int) -> None:
    """mistral-common's tokenizer file in folder d (tekken.json, tokenizer.model.v*) into w."""
    import gguf

    try:
        vocab = gguf.MistralVocab(d)
    except ValueError:
        raise CheckpointError(
            f"{d}: no tokenizer (tokenizer.model.v*, tokenizer.model or tekken.json)",
            hint="copy the tokenizer file of the checkpoint's repo into the directory",
        ) from None
    if vocab.vocab_size != vocab_size:
        raise CheckpointError(
            f"{vocab.fname_tokenizer}: {vocab.vocab_size} tokens, but the model has {vocab_size}",
            hint="the tokenizer belongs to a different model",
        )
    tekken = vocab.tokenizer_type == gguf.MistralTokenizerType.tekken
    w.add_tokenizer_model(vocab.gguf_tokenizer_model)
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    if tekken:
        w.add_tokenizer_pre("tekken")
        w.add_token_merges(vocab.extract_vocab_merges_from_model())
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    w.add_unk_token_id(vocab.unk_id)
    w.add_pad_token_id(vocab.pad_id)
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if template := _builtin_template(str(vocab.tokenizer.version), tekken):
        w.add_chat_template(template)


def _builtin_template(version: str, tekken: bool) -> str | None:
    """The name of llama.cpp's built-in chat template for a mistral-common tokenizer version."""
    version = version.rsplit(".", 1)[-1]  # "TokenizerVersion.v3" or "v3"
    if version == "v1":
        return "mistral-v1"
    if version in ("v3", "v7"):
        return f"mistral-{version}" + ("-tekken" if tekken else "")
    return None
