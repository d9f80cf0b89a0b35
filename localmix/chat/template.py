"""Chat formats: a conversation → the exact prompt token ids the model was trained on.

Mistral formats follow mistral-common's `encode_chat_completion` token for token (its
InstructTokenizerV1 … V15 and request normalizers); the text pieces go through the engine's own
tokenizer, the markers are looked up as control tokens of the model's vocabulary. A GGUF of another
family brings its own `tokenizer.chat_template`, rendered in a sandboxed jinja environment the way
Hugging Face's `apply_chat_template` renders it.

Prefix stability (what lets a chat reuse its KV cache): v1 merges the system prompt into the first
user message and v7+ keep it as its own block, so a conversation's prompt only grows at the end.
v2, v3 and v3-tekken merge it into the *last* user message (mistral-common, and those models' own
HF templates), so with a system prompt every new turn rewrites earlier tokens. We keep the
reference's tokens; `MistralFormat.prefix_stable` says which formats append only.

Reasoning (v13, v15): a message's content may hold `Think` parts, encoded [THINK]…[/THINK]
(without [/THINK] while unclosed), as mistral-common's ThinkChunk. v15 also writes the model
settings, `[MODEL_SETTINGS]{"reasoning_effort": …}[/MODEL_SETTINGS]`, before the first [INST].
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from localmix.errors import InvalidGGUF, UsageError

ROLES = ("system", "user", "assistant")

# mistral-common joins aggregated system prompts and merged same-role messages with this.
_JOIN = "\n\n"


@dataclass(frozen=True)
class Think:
    """A thinking part of a message (mistral-common's ThinkChunk); closed=False: the reply ended
    (was interrupted) before [/THINK]."""

    text: str
    closed: bool = True


# A message's content: plain text, or text and thinking parts in order.
Content = str | tuple[str | Think, ...]


@dataclass(frozen=True)
class Message:
    """One message of a conversation; role is "system", "user" or "assistant"."""

    role: str
    content: Content

    @property
    def text(self) -> str:
        """The text parts, thinking left out."""
        if isinstance(self.content, str):
            return self.content
        return "".join(p for p in self.content if isinstance(p, str))

    @property
    def thinking(self) -> str | None:
        """The thinking parts joined, or None when there are none."""
        if isinstance(self.content, str):
            return None
        parts = [p.text for p in self.content if isinstance(p, Think)]
        return "".join(parts) if parts else None

    def without_thinking(self) -> Message:
        """The message with its thinking parts dropped (its text kept)."""
        return self if self.thinking is None else Message(self.role, self.text)

    def to_json(self) -> dict[str, Any]:
        """A JSON object: content is a string, or a list of strings and {"thinking", "closed"}."""
        if isinstance(self.content, str):
            return {"role": self.role, "content": self.content}
        parts = [
            p if isinstance(p, str) else {"thinking": p.text, "closed": p.closed}
            for p in self.content
        ]
        return {"role": self.role, "content": parts}

    @classmethod
    def from_json(cls, data: Any) -> Message:
        """The inverse of to_json; ValueError for anything else."""
        if not isinstance(data, dict) or not isinstance(data.get("role"), str):
            raise ValueError("a message needs a role")
        content = data.get("content")
        if isinstance(content, str):
            return cls(data["role"], content)
        if not isinstance(content, list):
            raise ValueError("a message's content is a string or a list")
        parts: list[str | Think] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("thinking"), str):
                parts.append(Think(part["thinking"], bool(part.get("closed", True))))
            else:
                raise ValueError("a content part is a string or {thinking, closed}")
        return cls(data["role"], tuple(parts))


class Tokenize(Protocol):
    """The engine's tokenizer: text → token ids (special=True parses control-token text;
    add_bos=True puts BOS first where the vocabulary adds one, Engine.adds_bos)."""

    def __call__(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]: ...


@dataclass(frozen=True)
class MistralFormat:
    """A mistral-common tokenizer version, reduced to what plain chat needs."""

    name: str
    description: str
    control_inst: bool  # [INST]/[/INST] are control tokens (v2+), not text (v1)
    system: str  # where the system prompt goes: "first_user", "last_user" or "message"
    strip_reply: bool  # assistant text is rstrip(" ")-ed before encoding (v2+)
    think: bool = False  # Think parts are encoded [THINK]…[/THINK] (v13+)
    system_think: bool = False  # system messages may hold Think parts (v13; v15 refuses them)
    chunk_join: str = _JOIN  # joins adjacent text parts of one message ("" from v15)
    efforts: tuple[
        str, ...
    ] = ()  # reasoning_effort values of [MODEL_SETTINGS] (v15), default first

    @property
    def prefix_stable(self) -> bool:
        """True when adding a turn only appends tokens, so the KV cache of the last turn is reused."""
        return self.system != "last_user"

    @property
    def settings(self) -> bool:
        """Whether prompts carry [MODEL_SETTINGS] (v15)."""
        return bool(self.efforts)


@dataclass(frozen=True)
class TemplateFormat:
    """A non-Mistral model's own jinja chat template (GGUF `tokenizer.chat_template`)."""

    template: str
    bos_token: str = ""
    eos_token: str = ""
    name: str = "gguf-template"
    description: str = "the model's own chat template"
    prefix_stable: bool = False  # unknown: a template may rewrite earlier turns
    think: bool = False
    settings: bool = False


ChatFormat = MistralFormat | TemplateFormat

# v7, v11 and v13 encode plain chat alike (they differ in tool calls); v13 adds thinking, v15 the
# model settings and "" between a message's adjacent text parts.
_V7_RULES: dict[str, Any] = {"control_inst": True, "system": "message", "strip_reply": True}

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
            **_V7_RULES,
        ),
        MistralFormat(
            "v11", "Mistral Small 3.2 (tekken v11): v7 rules, [ARGS] tool calls", **_V7_RULES
        ),
        MistralFormat(
            "v13",
            "Magistral, Ministral 3, Devstral Small 2 (tekken v13): [THINK] ... [/THINK]",
            think=True,
            system_think=True,
            **_V7_RULES,
        ),
        MistralFormat(
            "v15",
            "Mistral Small 4 (tekken v15): [MODEL_SETTINGS] reasoning_effort none / high",
            think=True,
            chunk_join="",
            efforts=("none", "high"),
            **_V7_RULES,
        ),
    )
}


def get(name: str) -> MistralFormat:
    """The Mistral chat format called `name` ("v1", "v2", "v3", "v3-tekken", "v7", ...)."""
    try:
        return FORMATS[name]
    except KeyError:
        known = ", ".join(FORMATS)
        raise UsageError(f"unknown chat format {name!r}", hint=f"use one of: {known}") from None


def encode(
    chat_format: str | ChatFormat,
    messages: Sequence[Message],
    tokenize: Tokenize,
    *,
    reasoning_effort: str | None = None,
) -> list[int]:
    """Prompt token ids for `messages`, ready for the assistant's reply (BOS included).

    reasoning_effort: the v15 model setting ("none", "high"); None is the model's default."""
    fmt = get(chat_format) if isinstance(chat_format, str) else chat_format
    for m in messages:
        if m.role not in ROLES:
            raise UsageError(f"unknown message role {m.role!r}", hint=f"use one of {ROLES}")
    if reasoning_effort is not None and reasoning_effort not in fmt_efforts(fmt):
        known = ", ".join(fmt_efforts(fmt)) or "none: this format has no reasoning effort"
        raise UsageError(f"unknown reasoning effort {reasoning_effort!r}", hint=f"use {known}")
    if isinstance(fmt, TemplateFormat):
        return _encode_template(fmt, [m.without_thinking() for m in messages], tokenize)
    return _encode_mistral(fmt, messages, tokenize, reasoning_effort)


def fmt_efforts(fmt: ChatFormat) -> tuple[str, ...]:
    """The reasoning_effort values a format encodes (empty but for v15)."""
    return fmt.efforts if isinstance(fmt, MistralFormat) else ()


# --- Mistral formats -------------------------------------------------------------------------


def _aggregate(contents: Sequence[Content], chunk_join: str) -> Content:
    """mistral-common's chunk aggregation: text of separate messages joined by "\\n\\n", adjacent
    text parts of one message by chunk_join, empty text skipped; plain text if no Think is left."""
    parts: list[str | Think] = []
    text: list[str] = []

    def flush() -> None:
        if text:
            parts.append("".join(text))
            text.clear()

    for content in contents:
        new_message = bool(text)
        if not content:
            continue
        if isinstance(content, str):
            text.append((_JOIN if new_message else "") + content)
            continue
        for part in content:
            if isinstance(part, Think):
                flush()
                parts.append(part)
            elif part:
                text.append(("" if not text else _JOIN if new_message else chunk_join) + part)
                new_message = False
    if not parts:
        return "".join(text)
    flush()
    return tuple(parts)


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
            out.append(Message(role, _aggregate([m.content for m in group], fmt.chunk_join)))
        elif fmt.system == "message":
            # v7+ keep every system message where it stands, unmerged
            out.extend(Message(role, _aggregate([m.content], fmt.chunk_join)) for m in group)
        else:
            merged = (_aggregate([m.content], fmt.chunk_join) for m in group)
            system_parts.extend(text for text in merged if isinstance(text, str) and text)
    if fmt.system != "message" and (not out or out[0].role != "user"):
        out.insert(0, Message("user", ""))  # v1-v3 always open with a user turn
    elif not out:
        out.append(Message("user", ""))
    return out, (_JOIN.join(system_parts) if system_parts else None)


def _check_parts(fmt: MistralFormat, messages: Sequence[Message]) -> None:
    """Think parts where mistral-common accepts them: assistant messages from v13, system
    messages in v13 only, never in a user message."""
    for m in messages:
        if isinstance(m.content, str) or all(isinstance(p, str) for p in m.content):
            continue
        allowed = {"assistant": fmt.think, "system": fmt.system_think}.get(m.role, False)
        if not allowed:
            raise UsageError(
                f"the {fmt.name} chat format has no thinking in a {m.role} message",
                hint="drop the thinking (a reasoning model's format is v13 or v15)",
            )


def _encode_mistral(
    fmt: MistralFormat, messages: Sequence[Message], tokenize: Tokenize, effort: str | None
) -> list[int]:
    _check_parts(fmt, messages)
    msgs, system = _normalize(fmt, messages)
    user_idx = [i for i, m in enumerate(msgs) if m.role == "user"]
    first_user, last_user = (user_idx[0], user_idx[-1]) if user_idx else (-1, -1)
    special = _SpecialIds(tokenize)

    def text(s: str) -> list[int]:
        return tokenize(s, add_bos=False, special=False)

    def parts(content: Content) -> list[int]:
        if isinstance(content, str):
            return text(content)
        out: list[int] = []
        for part in content:
            if isinstance(part, str):
                out += text(part)
            else:
                out += [special["[THINK]"], *text(part.text)]
                out += [special["[/THINK]"]] if part.closed else []
        return out

    tokens = [special["<s>"]]
    for i, m in enumerate(msgs):
        if m.role == "user":
            content = m.text
            where = {"first_user": first_user, "last_user": last_user}.get(fmt.system)
            if system and i == where:
                content = system + _JOIN + content
            if fmt.settings and i == first_user:
                tokens += _settings(fmt, effort, special, text)
            if fmt.control_inst:
                tokens += [special["[INST]"], *text(content), special["[/INST]"]]
            else:
                tokens += text(f"[INST] {content} [/INST]")
        elif m.role == "assistant":
            if not m.content:
                raise UsageError("an assistant message is empty", hint="drop it or give it text")
            # plain text is rstrip(" ")-ed (v2+); text beside thinking is encoded as it is
            content = (
                m.content.rstrip(" ")
                if fmt.strip_reply and isinstance(m.content, str)
                else m.content
            )
            tokens += [*parts(content), special["</s>"]]
        else:
            tokens += [special["[SYSTEM_PROMPT]"], *parts(m.content), special["[/SYSTEM_PROMPT]"]]
    return tokens


def _settings(
    fmt: MistralFormat, effort: str | None, special: _SpecialIds, text: Callable[[str], list[int]]
) -> list[int]:
    """[MODEL_SETTINGS]{json}[/MODEL_SETTINGS]: mistral-common's v15 block, top-level keys sorted;
    an unset effort is the model's default (Mistral Small 4's tokenizer: "none")."""
    settings = json.dumps({"reasoning_effort": effort or fmt.efforts[0]}, ensure_ascii=False)
    return [special["[MODEL_SETTINGS]"], *text(settings), special["[/MODEL_SETTINGS]"]]


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


def detect(metadata: Mapping[str, Any], tokenize: Tokenize | None = None) -> str | None:
    """The Mistral chat format a GGUF's metadata points to, or None for another family
    (chat/detection.py reads the tokenizer, its control tokens and the chat template)."""
    from localmix.chat import detection

    return detection.detect(metadata, tokenize)


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
        return TemplateFormat(template, bos_token=bos_token, eos_token=eos_token)
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
    bos = tokenize("", add_bos=True, special=True)  # [] where the vocabulary adds none
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
