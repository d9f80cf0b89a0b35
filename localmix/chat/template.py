"""Chat formats: a conversation → the exact prompt token ids the model was trained on.

Mistral formats follow mistral-common's `encode_chat_completion` token for token (its
InstructTokenizerV1/V2/V3/V7 and request normalizer); the text pieces go through the engine's own
tokenizer, the markers are looked up as control tokens of the model's vocabulary. A GGUF of another
family brings its own `tokenizer.chat_template`, rendered in a sandboxed jinja environment the way
Hugging Face's `apply_chat_template` renders it.

Prefix stability (what lets a chat reuse its KV cache): v1 merges the system prompt into the first
user message and v7 keeps it as its own block, so a conversation's prompt only grows at the end.
v2, v3 and v3-tekken merge it into the *last* user message (mistral-common, and those models' own
HF templates), so with a system prompt every new turn rewrites earlier tokens. We keep the
reference's tokens; `MistralFormat.prefix_stable` says which formats append only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from localmix.errors import InvalidGGUF, UsageError

ROLES = ("system", "user", "assistant")

# mistral-common joins aggregated system prompts and merged same-role messages with this.
_JOIN = "\n\n"


@dataclass(frozen=True)
class Message:
    """One message of a conversation; role is "system", "user" or "assistant"."""

    role: str
    content: str


class Tokenize(Protocol):
    """The engine's tokenizer: text → token ids (special=True parses control-token text)."""

    def __call__(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]: ...


@dataclass(frozen=True)
class MistralFormat:
    """A mistral-common tokenizer version, reduced to what plain chat needs."""

    name: str
    description: str
    control_inst: bool  # [INST]/[/INST] are control tokens (v2+), not text (v1)
    system: str  # where the system prompt goes: "first_user", "last_user" or "message"
    strip_reply: bool  # assistant text is rstrip(" ")-ed before encoding (v2+)

    @property
    def prefix_stable(self) -> bool:
        """True when adding a turn only appends tokens, so the KV cache of the last turn is reused."""
        return self.system != "last_user"


@dataclass(frozen=True)
class TemplateFormat:
    """A non-Mistral model's own jinja chat template (GGUF `tokenizer.chat_template`)."""

    template: str
    bos_token: str = ""
    eos_token: str = ""
    add_bos: bool = False  # the GGUF's tokenizer.ggml.add_bos_token
    name: str = "gguf-template"
    description: str = "the model's own chat template"
    prefix_stable: bool = False  # unknown: a template may rewrite earlier turns


ChatFormat = MistralFormat | TemplateFormat

FORMATS: dict[str, MistralFormat] = {
    f.name: f
    for f in (
        MistralFormat(
            "v1",
            "Mistral 7B v0.1/v0.2, Mixtral 8x7B (tokenizer.model.v1): [INST] as text",
            control_inst=False,
            system="first_user",
            strip_reply=False,
        ),
        MistralFormat(
            "v2",
            "control tokens [INST]/[/INST] (tokenizer.model.v2)",
            control_inst=True,
            system="last_user",
            strip_reply=True,
        ),
        MistralFormat(
            "v3",
            "Mistral 7B v0.3, Mixtral 8x22B (tokenizer.model.v3)",
            control_inst=True,
            system="last_user",
            strip_reply=True,
        ),
        MistralFormat(
            "v3-tekken",
            "Mistral Nemo (tekken_240718): v3 rules on the tekken tokenizer",
            control_inst=True,
            system="last_user",
            strip_reply=True,
        ),
        MistralFormat(
            "v7",
            "[SYSTEM_PROMPT] ... [/SYSTEM_PROMPT] (sentencepiece v7 or tekken)",
            control_inst=True,
            system="message",
            strip_reply=True,
        ),
    )
}


def get(name: str) -> MistralFormat:
    """The Mistral chat format called `name` ("v1", "v2", "v3", "v3-tekken", "v7")."""
    try:
        return FORMATS[name]
    except KeyError:
        known = ", ".join(FORMATS)
        raise UsageError(f"unknown chat format {name!r}", hint=f"use one of: {known}") from None


def encode(
    chat_format: str | ChatFormat, messages: Sequence[Message], tokenize: Tokenize
) -> list[int]:
    """Prompt token ids for `messages`, ready for the assistant's reply (BOS included)."""
    fmt = get(chat_format) if isinstance(chat_format, str) else chat_format
    for m in messages:
        if m.role not in ROLES:
            raise UsageError(f"unknown message role {m.role!r}", hint=f"use one of {ROLES}")
    if isinstance(fmt, TemplateFormat):
        return _encode_template(fmt, messages, tokenize)
    return _encode_mistral(fmt, messages, tokenize)


# --- Mistral formats -------------------------------------------------------------------------


def _normalize(fmt: MistralFormat, messages: Sequence[Message]) -> tuple[list[Message], str | None]:
    """mistral-common's request normalizer: merge same-role runs, pull out the system prompt."""
    groups: list[list[Message]] = []
    for m in messages:
        if groups and groups[-1][0].role == m.role:
            groups[-1].append(m)
        else:
            groups.append([m])
    out: list[Message] = []
    system_parts: list[str] = []
    for group in groups:
        role = group[0].role
        if role != "system":
            # empty contents are skipped, not joined (mistral-common's chunk aggregation)
            out.append(Message(role, _JOIN.join(m.content for m in group if m.content)))
        elif fmt.system == "message":
            out.extend(group)  # v7 keeps every system message where it stands, unmerged
        else:
            system_parts.extend(m.content for m in group if m.content)
    if fmt.system != "message" and (not out or out[0].role != "user"):
        out.insert(0, Message("user", ""))  # v1-v3 always open with a user turn
    elif not out:
        out.append(Message("user", ""))
    return out, (_JOIN.join(system_parts) if system_parts else None)


def _encode_mistral(
    fmt: MistralFormat, messages: Sequence[Message], tokenize: Tokenize
) -> list[int]:
    msgs, system = _normalize(fmt, messages)
    user_idx = [i for i, m in enumerate(msgs) if m.role == "user"]
    first_user, last_user = (user_idx[0], user_idx[-1]) if user_idx else (-1, -1)
    special = _SpecialIds(tokenize)

    def text(s: str) -> list[int]:
        return tokenize(s, add_bos=False, special=False)

    tokens = [special["<s>"]]
    for i, m in enumerate(msgs):
        if m.role == "user":
            content = m.content
            where = {"first_user": first_user, "last_user": last_user}.get(fmt.system)
            if system and i == where:
                content = system + _JOIN + content
            if fmt.control_inst:
                tokens += [special["[INST]"], *text(content), special["[/INST]"]]
            else:
                tokens += text(f"[INST] {content} [/INST]")
        elif m.role == "assistant":
            content = m.content.rstrip(" ") if fmt.strip_reply else m.content
            if not m.content:
                raise UsageError("an assistant message is empty", hint="drop it or give it text")
            tokens += [*text(content), special["</s>"]]
        else:
            tokens += [special["[SYSTEM_PROMPT]"], *text(m.content), special["[/SYSTEM_PROMPT]"]]
    return tokens


class _SpecialIds:
    """Control-token ids looked up by their text in the model's vocabulary, once each."""

    def __init__(self, tokenize: Tokenize) -> None:
        self._tokenize = tokenize
        self._ids: dict[str, int] = {}

    def __getitem__(self, piece: str) -> int:
        if piece not in self._ids:
            self._ids[piece] = control_token(self._tokenize, piece)
        return self._ids[piece]


def control_token(tokenize: Tokenize, piece: str) -> int:
    """The id of control token `piece`; InvalidGGUF when the vocabulary has no such token."""
    ids = tokenize(piece, add_bos=False, special=True)
    if len(ids) != 1 or ids == tokenize(piece, add_bos=False, special=False):
        raise InvalidGGUF(
            f"the model's vocabulary has no control token {piece}",
            hint="pick the chat format that matches the model's tokenizer (--format)",
        )
    return ids[0]


def has_control_token(tokenize: Tokenize, piece: str) -> bool:
    """Whether `piece` is a single control token of the vocabulary."""
    try:
        control_token(tokenize, piece)
    except InvalidGGUF:
        return False
    return True


# --- detection -------------------------------------------------------------------------------


def detect(metadata: Mapping[str, Any], tokenize: Tokenize | None = None) -> str | None:
    """The Mistral chat format a GGUF's metadata points to, or None for another family.

    Reads tokenizer.ggml.model / .pre, the vocabulary size, tokenizer.chat_template and the name;
    `tokenize` (the engine's) lets it probe for control tokens when the token list is not in
    `metadata` (llama.cpp's key/value view leaves arrays out).
    """
    template = metadata.get("tokenizer.chat_template")
    template = template if isinstance(template, str) else None
    if template in _LLAMA_CPP_NAMES:
        return _LLAMA_CPP_NAMES[template]
    if template is not None and "[INST]" not in template:
        return None  # a fine-tune with its own format (ChatML, ...)
    if template is not None and "<<SYS>>" in template:
        return None  # Llama 2 chat: [INST] with a <<SYS>> block, not Mistral's rules
    has = _token_probe(metadata, tokenize)
    model = metadata.get("tokenizer.ggml.model")
    system_in_template = template is not None and "[SYSTEM_PROMPT]" in template
    if model == "gpt2" and metadata.get("tokenizer.ggml.pre") == "tekken":
        # every tekken vocabulary carries [SYSTEM_PROMPT]; only the template tells v7 apart
        return "v7" if system_in_template else "v3-tekken"
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


def for_model(
    metadata: Mapping[str, Any],
    tokenize: Tokenize | None = None,
    *,
    bos_token: str = "<s>",
    eos_token: str = "</s>",
    name: str | None = None,
) -> ChatFormat:
    """The chat format for a model: `name` if given, else detect(), else the GGUF's own template."""
    if name:
        return get(name)
    found = detect(metadata, tokenize)
    if found:
        return FORMATS[found]
    template = metadata.get("tokenizer.chat_template")
    if isinstance(template, str) and re.fullmatch(r"[\w.-]+", template):
        raise InvalidGGUF(
            f"the model names llama.cpp's built-in chat template {template!r}, not a jinja one",
            hint=f"name its chat format with --format ({', '.join(FORMATS)})",
        )
    if isinstance(template, str) and template.strip():
        add_bos = str(metadata.get("tokenizer.ggml.add_bos_token", "")).lower() == "true"
        return TemplateFormat(template, bos_token=bos_token, eos_token=eos_token, add_bos=add_bos)
    raise InvalidGGUF(
        "the model has no chat template and is not a known Mistral tokenizer",
        hint=f"name its chat format with --format ({', '.join(FORMATS)})",
    )


# --- GGUF jinja templates --------------------------------------------------------------------


def _encode_template(
    fmt: TemplateFormat, messages: Sequence[Message], tokenize: Tokenize
) -> list[int]:
    """Render, then tokenize with control tokens parsed; like llama.cpp's server, one BOS is
    prepended when the vocabulary asks for it and the template did not write it."""
    tokens = tokenize(render(fmt, messages), add_bos=False, special=True)
    bos = tokenize("", add_bos=True, special=True) if fmt.add_bos else []
    if bos and tokens[: len(bos)] != bos:
        tokens = bos + tokens
    return tokens


def render(fmt: TemplateFormat, messages: Sequence[Message]) -> str:
    """The template's text for `messages` with the generation prompt added (as HF renders it),
    in a sandbox bounded in time and size (InvalidGGUF when the template misbehaves)."""
    from localmix.chat import sandbox

    return sandbox.render(
        fmt.template,
        {
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "bos_token": fmt.bos_token,
            "eos_token": fmt.eos_token,
            "add_generation_prompt": True,
        },
    )
