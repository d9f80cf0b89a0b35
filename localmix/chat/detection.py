"""Which Mistral chat format a GGUF speaks, from its metadata: the tokenizer model, the control
tokens of its vocabulary, its chat template (jinja, or the name of one of llama.cpp's built-ins).
The name is not evidence: fine-tunes rename, and converters name a model after its folder."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from localmix.chat.template import Tokenize, has_control_token


def detect(metadata: Mapping[str, Any], tokenize: Tokenize | None = None) -> str | None:
    """The Mistral chat format a GGUF's metadata points to, or None for another family.

    Reads tokenizer.ggml.model / .pre, the vocabulary size, tokenizer.chat_template and the name;
    `tokenize` (the engine's) lets it probe for control tokens when the token list is not in
    `metadata` (llama.cpp's key/value view leaves arrays out).
    """
    template = metadata.get("tokenizer.chat_template")
    template = template if isinstance(template, str) else None
    has = _token_probe(metadata, tokenize)
    model = metadata.get("tokenizer.ggml.model")
    if model == "gpt2" and metadata.get("tokenizer.ggml.pre") == "tekken":
        return _detect_tekken(template, has)
    if template in _LLAMA_CPP_NAMES:
        return _LLAMA_CPP_NAMES[template]
    if template is not None and "[INST]" not in template:
        return None  # a fine-tune with its own format (ChatML, ...)
    if template is not None and "<<SYS>>" in template:
        return None  # Llama 2 chat: [INST] with a <<SYS>> block, not Mistral's rules
    system_in_template = template is not None and "[SYSTEM_PROMPT]" in template
    if model != "llama":
        return None
    if system_in_template or (has is not None and has("[SYSTEM_PROMPT]")):
        return "v7"
    # v2 and v3 differ only in tool calls, which plain chat never encodes
    if has is not None and has("[INST]"):
        return "v3"
    if has is None and _vocab_size(metadata) == _V3_VOCAB:
        return "v3"  # no token list to look at: Mistral's control-token vocabulary has 32768
    if template is not None or _is_v1_vocab(metadata, tokenize):
        return "v1"
    return None


def _detect_tekken(template: str | None, has: Callable[[str], bool] | None) -> str | None:
    """Tekken vocabularies by version. Their control tokens tell the newer ones apart: v15 added
    [MODEL_SETTINGS], v13 (Magistral 2507+, Ministral 3) [THINK], v11 (Small 3.2) [ARGS] /
    [CALL_ID]; each version's mistral-common template names its own markers. Every tekken
    vocabulary carries [SYSTEM_PROMPT], so v7 versus v3 (Nemo) is the template's to say."""
    text = template or ""
    if template is not None and template not in _LLAMA_CPP_NAMES and "[INST]" not in template:
        return None  # a fine-tune of a tekken model with its own format (ChatML, ...)
    if "[MODEL_SETTINGS]" in text or (has is not None and has("[MODEL_SETTINGS]")):
        return "v15"
    if "[THINK]" in text or (has is not None and has("[THINK]")):
        return "v13"
    if "[ARGS]" in text:
        return "v11" if "[CALL_ID]" in text else "v13"  # v13 dropped call ids
    if has is not None and has("[ARGS]"):
        return "v11"
    if template in _LLAMA_CPP_NAMES:
        return _LLAMA_CPP_NAMES[template]
    return "v7" if "[SYSTEM_PROMPT]" in text else "v3-tekken"


# Converters of Mistral-native checkpoints (ours, llama.cpp's) store the name of one of llama.cpp's
# built-in templates instead of a jinja template.
_LLAMA_CPP_NAMES = {
    "mistral-v1": "v1",
    "mistral-v3": "v3",
    "mistral-v3-tekken": "v3-tekken",
    "mistral-v7": "v7",
    "mistral-v7-tekken": "v7",
}


_V3_VOCAB = 32768


def _token_probe(
    metadata: Mapping[str, Any], tokenize: Tokenize | None
) -> Callable[[str], bool] | None:
    """A test for "is this piece a token of the vocabulary", or None when nothing can tell."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, (list, tuple)):
        vocab = set(tokens)
        return lambda piece: piece in vocab
    pieces = getattr(tokens, "pieces", None)  # gguffile.TokenList: the marker pieces it holds
    if isinstance(pieces, dict):
        return lambda piece: piece in pieces
    if tokenize is not None:
        return lambda piece: has_control_token(tokenize, piece)
    return None


def _vocab_size(metadata: Mapping[str, Any]) -> int | None:
    tokens = metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, (list, tuple)):
        return len(tokens)
    if isinstance(tokens, str) and (m := re.fullmatch(r"\[(\d+) items\]", tokens)):
        return int(m.group(1))  # gguffile.inspect's stand-in for a long array
    arch = metadata.get("general.architecture")
    size = metadata.get(f"{arch}.vocab_size")
    return int(size) if isinstance(size, (int, str)) and str(size).isdigit() else None


# Mistral's v1 sentencepiece vocabulary (tokenizer.model.v1, 32000 pieces) writes "[INST]" as
# these pieces at these ids; Llama 2's vocabulary, the same size, uses other ids. The model's name
# is not evidence: fine-tunes rename, and llama.cpp's converter names a model after its folder.
_V1_INST = (("▁[", 733), ("INST", 16289), ("]", 28793))
_V1_VOCAB = 32000


def _is_v1_vocab(metadata: Mapping[str, Any], tokenize: Tokenize | None) -> bool:
    """True for Mistral's v1 tokenizer, recognised by its pieces' ids."""
    if _vocab_size(metadata) not in (None, _V1_VOCAB):
        return False
    tokens = metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, (list, tuple)):
        return all(i < len(tokens) and tokens[i] == p for p, i in _V1_INST)
    pieces = getattr(tokens, "pieces", None)  # gguffile.TokenList
    if isinstance(pieces, dict):
        return all(pieces.get(p) == i for p, i in _V1_INST)
    if tokenize is not None:
        return tokenize("[INST]", add_bos=False, special=False) == [i for _, i in _V1_INST]
    return False
