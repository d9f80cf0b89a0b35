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

Tools (v2 and later; v1 has no tool tokens and refuses them): the [AVAILABLE_TOOLS] block, the
assistant's tool calls and the tool results, each in its version's syntax (`_TOOL_RULES`), with
mistral-common's checks (validator, normalizer) refused as UsageErrors that name the field. Call
ids are mapped to Mistral's nine alphanumerics (chat/tools.py), the same for a call and its result.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from localmix.chat.images import ImageConfig, ImageIds, image_first, image_tokens
from localmix.chat.tools import Tool, ToolCall, check_name, mistral_id, pair_results
from localmix.errors import InvalidGGUF, UsageError

ROLES = ("system", "user", "assistant", "tool")

# mistral-common joins aggregated system prompts and merged same-role messages with this.
_JOIN = "\n\n"


@dataclass(frozen=True)
class Think:
    """A thinking part of a message (mistral-common's ThinkChunk); closed=False: the reply ended
    (was interrupted) before [/THINK]."""

    text: str
    closed: bool = True


@dataclass(frozen=True)
class Picture:
    """An image in a user message (mistral-common's ImageChunk): its size in pixels, which is
    all its prompt tokens depend on (chat/images.py), and `key`, which names its pixels for
    whoever encodes them (the engine's vision tower)."""

    width: int
    height: int
    key: str = ""


# A message's content: plain text, or text, thinking and image parts in order.
Content = str | tuple[str | Think | Picture, ...]


@dataclass(frozen=True)
class Message:
    """One message of a conversation; role is "system", "user", "assistant" or "tool".

    An assistant message may hold tool_calls (its content then may be ""); a "tool" message is a
    call's result: tool_call_id names the call (None: the next unanswered call, of `name` when
    given, as Ollama answers), name the function."""

    role: str
    content: Content
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.tool_calls, tuple):
            object.__setattr__(self, "tool_calls", tuple(self.tool_calls))

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
        return self if self.thinking is None else replace(self, content=self.text)

    def to_json(self) -> dict[str, Any]:
        """A JSON object: content is a string, or a list of strings, {"thinking", "closed"} and
        {"image", "width", "height"}; tool_calls ([{"name", "arguments", "id"}]), tool_call_id
        and name only when set."""
        if isinstance(self.content, str):
            out: dict[str, Any] = {"role": self.role, "content": self.content}
        else:
            out = {"role": self.role, "content": [_part_json(p) for p in self.content]}
        if self.tool_calls:
            out["tool_calls"] = [
                {"name": c.name, "arguments": c.arguments, **({"id": c.id} if c.id else {})}
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out

    @classmethod
    def from_json(cls, data: Any) -> Message:
        """The inverse of to_json; ValueError for anything else."""
        if not isinstance(data, dict) or not isinstance(data.get("role"), str):
            raise ValueError("a message needs a role")
        calls = []
        for call in data.get("tool_calls") or []:
            if not (
                isinstance(call, dict)
                and isinstance(call.get("name"), str)
                and isinstance(call.get("arguments"), str)
                and isinstance(call.get("id"), (str, type(None)))
            ):
                raise ValueError("a tool call is {name, arguments, id}")
            calls.append(ToolCall(call["name"], call["arguments"], call.get("id")))
        extra: dict[str, Any] = {"tool_calls": tuple(calls)}
        for key in ("tool_call_id", "name"):
            if not isinstance(data.get(key), (str, type(None))):
                raise ValueError(f"a message's {key} is a string")
            extra[key] = data.get(key)
        content = data.get("content")
        if isinstance(content, str):
            return cls(data["role"], content, **extra)
        if not isinstance(content, list):
            raise ValueError("a message's content is a string or a list")
        return cls(data["role"], tuple(_part_from_json(p) for p in content), **extra)


def _part_json(part: str | Think | Picture) -> Any:
    if isinstance(part, str):
        return part
    if isinstance(part, Think):
        return {"thinking": part.text, "closed": part.closed}
    return {"image": part.key, "width": part.width, "height": part.height}


def _part_from_json(part: Any) -> str | Think | Picture:
    if isinstance(part, str):
        return part
    if isinstance(part, dict) and isinstance(part.get("thinking"), str):
        return Think(part["thinking"], bool(part.get("closed", True)))
    if (
        isinstance(part, dict)
        and isinstance(part.get("image"), str)
        and all(isinstance(part.get(k), int) and part[k] > 0 for k in ("width", "height"))
    ):
        return Picture(part["width"], part["height"], part["image"])
    raise ValueError("a content part is a string, {thinking, closed} or {image, width, height}")


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
    tool_rules: str = "v1"  # the mistral-common version whose tool encoding applies (_TOOL_RULES)

    @property
    def prefix_stable(self) -> bool:
        """True when adding a turn only appends tokens, so the KV cache of the last turn is reused."""
        return self.system != "last_user"

    @property
    def settings(self) -> bool:
        """Whether prompts carry [MODEL_SETTINGS] (v15)."""
        return bool(self.efforts)

    @property
    def has_tools(self) -> bool:
        """Whether the format encodes tools, tool calls and tool results (v2+)."""
        return self.tool_rules != "v1"

    def tools_since(self, version: str) -> bool:
        """Whether the format follows `version`'s tool rules or a later one's."""
        return _TOOL_RULES.index(self.tool_rules) >= _TOOL_RULES.index(version)


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

# mistral-common's tool encodings, oldest first (v3-tekken follows v3, v15 follows v13):
#   v2  [AVAILABLE_TOOLS] before the last user turn; calls `[TOOL_CALLS][{"name", "arguments"}]`;
#       results `[TOOL_RESULTS][{"name", "content"}]`; both dropped before the last user turn
#   v3  calls carry "id"; results `{"content", "call_id"}`, all kept
#   v7  an assistant turn may hold text and calls; results `id[TOOL_CONTENT]content`
#   v11 calls `[TOOL_CALLS]name[CALL_ID]id[ARGS]args` each; ids pair up; results in call order
#   v13 [AVAILABLE_TOOLS] before the first user turn; calls `[TOOL_CALLS]name[ARGS]args`;
#       results `[TOOL_RESULTS]content[/TOOL_RESULTS]`, no ids in the prompt
_TOOL_RULES = ("v1", "v2", "v3", "v7", "v11", "v13")

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
            tool_rules="v2",
        ),
        MistralFormat(
            "v3",
            "Mistral 7B v0.3, Mixtral 8x22B (tokenizer.model.v3)",
            control_inst=True,
            system="last_user",
            strip_reply=True,
            tool_rules="v3",
        ),
        MistralFormat(
            "v3-tekken",
            "Mistral Nemo (tekken_240718): v3 rules on the tekken tokenizer",
            control_inst=True,
            system="last_user",
            strip_reply=True,
            tool_rules="v3",
        ),
        MistralFormat(
            "v7",
            "[SYSTEM_PROMPT] ... [/SYSTEM_PROMPT] (sentencepiece v7 or tekken)",
            tool_rules="v7",
            **_V7_RULES,
        ),
        MistralFormat(
            "v11",
            "Mistral Small 3.2 (tekken v11): v7 rules, [ARGS] tool calls",
            tool_rules="v11",
            **_V7_RULES,
        ),
        MistralFormat(
            "v13",
            "Magistral, Ministral 3, Devstral Small 2 (tekken v13): [THINK] ... [/THINK]",
            think=True,
            system_think=True,
            tool_rules="v13",
            **_V7_RULES,
        ),
        MistralFormat(
            "v15",
            "Mistral Small 4 (tekken v15): [MODEL_SETTINGS] reasoning_effort none / high",
            think=True,
            chunk_join="",
            efforts=("none", "high"),
            tool_rules="v13",
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
    tools: Sequence[Tool] = (),
    reasoning_effort: str | None = None,
    images: ImageConfig | None = None,
) -> list[int]:
    """Prompt token ids for `messages`, ready for the assistant's reply (BOS included).

    tools: the functions the model may call ([AVAILABLE_TOOLS]; a GGUF template gets them as
    `tools`). reasoning_effort: the v15 model setting ("none", "high"); None is the model's
    default. images: a vision model's image settings (its Picture parts become [IMG] grids);
    None: the model sees no images. UsageError for what mistral-common refuses, naming the
    field ("messages[3].…")."""
    fmt = get(chat_format) if isinstance(chat_format, str) else chat_format
    for m in messages:
        if m.role not in ROLES:
            raise UsageError(f"unknown message role {m.role!r}", hint=f"use one of {ROLES}")
    if reasoning_effort is not None and reasoning_effort not in fmt_efforts(fmt):
        known = ", ".join(fmt_efforts(fmt)) or "none: this format has no reasoning effort"
        raise UsageError(f"unknown reasoning effort {reasoning_effort!r}", hint=f"use {known}")
    if isinstance(fmt, TemplateFormat):
        if any(not isinstance(m.content, str) and any(isinstance(p, Picture) for p in m.content)
               for m in messages):  # fmt: skip
            raise UsageError("images need a Mistral chat format", hint="give the model's --format")
        return _encode_template(fmt, [m.without_thinking() for m in messages], tokenize, tools)
    return _encode_mistral(fmt, messages, tokenize, reasoning_effort, tools, images)


def fmt_efforts(fmt: ChatFormat) -> tuple[str, ...]:
    """The reasoning_effort values a format encodes (empty but for v15)."""
    return fmt.efforts if isinstance(fmt, MistralFormat) else ()


# --- Mistral formats -------------------------------------------------------------------------


def _aggregate(contents: Sequence[Content], chunk_join: str) -> Content:
    """mistral-common's chunk aggregation: text of separate messages joined by "\\n\\n", adjacent
    text parts of one message by chunk_join, empty text skipped; plain text if no Think or
    Picture is left."""
    parts: list[str | Think | Picture] = []
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
            if isinstance(part, (Think, Picture)):
                flush()
                parts.append(part)
            elif part:
                text.append(("" if not text else _JOIN if new_message else chunk_join) + part)
                new_message = False
    if not parts:
        return "".join(text)
    flush()
    return tuple(parts)


def _json_text(text: str) -> str:
    """mistral-common's JSON normalisation of call arguments (and v1-v3 tool results): "" is
    "{}", JSON is re-serialised (json.loads, json.dumps), anything else is kept."""
    if not text:
        return "{}"
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except json.JSONDecodeError:
        return text


def _json_value(text: str) -> Any:
    """The parsed JSON of text, or text itself when it is not JSON (mistral-common's parse)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _normalize(
    fmt: MistralFormat, messages: Sequence[Message]
) -> tuple[list[Message], list[int], str | None]:
    """mistral-common's request normalizer: merge same-role runs (tool results stay one each),
    pull out the system prompt (v1-v3), normalise call arguments and (v1-v3) tool results, put
    each turn's results in its calls' order (v11+). Returns the messages, the index in
    `messages` of each one's first source message (-1: added), and the system prompt."""
    groups: list[list[int]] = []
    for k, m in enumerate(messages):
        if groups and messages[groups[-1][0]].role == m.role:
            groups[-1].append(k)
        else:
            groups.append([k])
    out: list[Message] = []
    origins: list[int] = []
    system_parts: list[str] = []
    latest_call_ids: list[str] = []  # mistral-common's: the calls since the last tool results
    for group in groups:
        role = messages[group[0]].role
        if role == "tool":
            results = [(_tool_result(fmt, messages[k]), k) for k in group]
            if fmt.tools_since("v11"):
                call_order = {call_id: n for n, call_id in enumerate(latest_call_ids)}
                last_seen = {m.tool_call_id: n for n, (m, _) in enumerate(results)}
                results.sort(
                    key=lambda r: (
                        call_order.get(r[0].tool_call_id or "null", float("inf")),
                        last_seen[r[0].tool_call_id],
                    )
                )
            latest_call_ids.clear()
            out.extend(m for m, _ in results)
            origins.extend(k for _, k in results)
        elif role == "assistant":
            members = [messages[k] for k in group]
            calls = tuple(
                replace(c, arguments=_json_text(c.arguments)) for m in members for c in m.tool_calls
            )
            content = _aggregate([m.content for m in members], fmt.chunk_join)
            if calls and content and not fmt.tools_since("v7"):
                first_call = next(k for k in group if messages[k].tool_calls)
                raise UsageError(
                    f"messages[{first_call}].tool_calls: the {fmt.name} chat format has no text "
                    f"and tool calls in one assistant turn (messages[{group[0]}] to "
                    f"messages[{group[-1]}] make one turn)",
                    hint="send the text and the calls as separate turns, or drop the text",
                )
            out.append(Message(role, content, tool_calls=calls))
            origins.append(group[0])
            latest_call_ids.extend(c.id or "null" for c in calls)
        elif role == "user":
            out.append(
                Message(role, _aggregate([messages[k].content for k in group], fmt.chunk_join))
            )
            origins.append(group[0])
        elif fmt.system == "message":
            # v7+ keep every system message where it stands, unmerged
            for k in group:
                out.append(Message(role, _aggregate([messages[k].content], fmt.chunk_join)))
                origins.append(k)
        else:
            merged = (_aggregate([messages[k].content], fmt.chunk_join) for k in group)
            system_parts.extend(text for text in merged if isinstance(text, str) and text)
    if fmt.system != "message" and (not out or out[0].role != "user"):
        out.insert(0, Message("user", ""))  # v1-v3 always open with a user turn
        origins.insert(0, -1)
    elif not out:
        out.append(Message("user", ""))
        origins.append(-1)
    return out, origins, (_JOIN.join(system_parts) if system_parts else None)


def _tool_result(fmt: MistralFormat, m: Message) -> Message:
    """A tool message's text as the normalizer leaves it: JSON re-serialised for v1-v3."""
    text = _aggregate([m.content], fmt.chunk_join)
    assert isinstance(text, str)  # _check_parts refused thinking in tool messages
    if not fmt.tools_since("v7"):
        text = _json_text(text)
    return Message("tool", text, tool_call_id=m.tool_call_id, name=m.name)


def _check_parts(
    fmt: MistralFormat, messages: Sequence[Message], images: ImageConfig | None
) -> None:
    """Think parts where mistral-common accepts them: assistant messages from v13, system
    messages in v13 only, never in a user message; Picture parts in user messages only, for a
    model that sees images."""
    for i, m in enumerate(messages):
        if isinstance(m.content, str) or all(isinstance(p, str) for p in m.content):
            continue
        if any(isinstance(p, Picture) for p in m.content):
            _check_pictures(fmt, m, i, images)
        if not any(isinstance(p, Think) for p in m.content):
            continue
        allowed = {"assistant": fmt.think, "system": fmt.system_think}.get(m.role, False)
        if not allowed:
            raise UsageError(
                f"the {fmt.name} chat format has no thinking in a {m.role} message",
                hint="drop the thinking (a reasoning model's format is v13 or v15)",
            )


def _check_pictures(fmt: MistralFormat, m: Message, i: int, images: ImageConfig | None) -> None:
    if m.role != "user":
        raise UsageError(f"messages[{i}]: only user messages can hold images")
    if images is None or not fmt.control_inst:
        raise UsageError(
            f"messages[{i}]: this model does not see images",
            hint="use a vision model (Mistral Small 3.2, Ministral 3, Magistral) with its mmproj",
        )


_V1_TOOLS = "the v1 chat format (Mixtral 8x7B v0.1) has no tool tokens"
_V1_HINT = (
    "drop the tools, or use a model that calls tools: Mistral 7B v0.3 (v3), Mistral Nemo "
    "(v3-tekken), Mistral Small 3.2 (v11) and later"
)


def _check_tools(fmt: MistralFormat, tools: Sequence[Tool], messages: Sequence[Message]) -> None:
    """Tools where the format has them (never v1: refused, not dropped) and as mistral-common's
    validator takes them."""
    if not fmt.has_tools:
        if tools:
            raise UsageError(f"tools: {_V1_TOOLS}", hint=_V1_HINT)
        for i, m in enumerate(messages):
            if m.tool_calls:
                raise UsageError(f"messages[{i}].tool_calls: {_V1_TOOLS}", hint=_V1_HINT)
            if m.role == "tool":
                raise UsageError(f"messages[{i}].role: {_V1_TOOLS}", hint=_V1_HINT)
    for n, tool in enumerate(tools):
        if not isinstance(tool, Tool):
            raise UsageError(
                f"tools[{n}]: not a Tool", hint="Tool.from_openai reads OpenAI's shape"
            )
        tool.check(f"tools[{n}].function")


def _resolve_calls(fmt: MistralFormat, messages: Sequence[Message]) -> list[Message]:
    """The messages with every call id mapped to a Mistral id (an id-less call's from its place
    among the conversation's calls), every result given its call's id (paired by order and
    name when it has none) and its call's name when it has none; UsageError, naming the field,
    for what mistral-common's validator refuses: a result with no call before it, more results
    than calls, a turn's calls not all answered before the next assistant message, bad
    function names, text beside calls (v2, v3), calls in the first message; and from v11 unknown
    or duplicate ids."""
    out = list(messages)
    calls: list[ToolCall] = []  # the calls the next results answer (mapped ids)
    owner = -1  # the index of the message that made them
    answered = 0
    n_calls = 0  # calls so far in the conversation: the position of an id-less one
    i = 0
    while i < len(messages):
        m = messages[i]
        if m.role == "assistant":
            if owner >= 0 and answered < len(calls):
                raise UsageError(
                    f"messages[{owner}].tool_calls: {len(calls)} calls but {answered} tool results "
                    f"before the next assistant message (messages[{i}])",
                    hint='answer each call with a "tool" message right after the calls',
                )
            if m.tool_calls and i == 0:
                # mistral-common's validator skips the first message, so its calls' results
                # are unexpected (v11+) or miscounted (v2-v7)
                raise UsageError(
                    "messages[0].tool_calls: a conversation cannot open with tool calls",
                    hint="start with a user (or system) message",
                )
            if m.tool_calls and m.content and not fmt.tools_since("v7"):
                raise UsageError(
                    f"messages[{i}].content: the {fmt.name} chat format has no text beside tool "
                    "calls in one assistant message",
                    hint="send either the text or the calls",
                )
            calls = []
            for j, call in enumerate(m.tool_calls):
                where = f"messages[{i}].tool_calls[{j}]"
                check_name(call.name, f"{where}.function.name")
                if not isinstance(call.arguments, str):
                    raise UsageError(f"{where}.function.arguments: arguments is JSON text")
                call_id = mistral_id(call.id, position=str(n_calls))
                n_calls += 1
                if fmt.tools_since("v11") and any(c.id == call_id for c in calls):
                    raise UsageError(
                        f"{where}.id: duplicate tool call id {call.id!r} in one assistant message",
                        hint="give each call its own id",
                    )
                calls.append(replace(call, id=call_id))
            out[i] = replace(m, tool_calls=tuple(calls))
            owner, answered = (i if calls else -1), 0
            i += 1
        elif m.role == "tool":
            end = i
            while end < len(messages) and messages[end].role == "tool":
                end += 1
            if owner != i - 1:
                raise UsageError(
                    f"messages[{i}].role: a tool result must follow the assistant message whose "
                    "tool calls it answers",
                    hint='put "tool" messages right after an assistant message with tool_calls',
                )
            run = messages[i:end]
            mapped = [mistral_id(r.tool_call_id) if r.tool_call_id else None for r in run]
            pairs = pair_results(calls, [(rid, r.name) for rid, r in zip(mapped, run, strict=True)])
            seen: dict[int, int] = {}
            for k, (r, rid, c) in enumerate(zip(run, mapped, pairs, strict=True)):
                where = f"messages[{i + k}]"
                if r.name is not None:
                    check_name(r.name, f"{where}.name")
                if k >= len(calls):
                    raise UsageError(
                        f"{where}: more tool results than the {len(calls)} tool calls of "
                        f"messages[{owner}]",
                        hint="answer each call once",
                    )
                if rid is None:
                    if c is None:
                        which = f"call of {r.name!r}" if r.name else "call"
                        raise UsageError(
                            f"{where}.tool_call_id: missing, and no unanswered {which} in "
                            f"messages[{owner}] for it to answer",
                            hint="send the tool_call_id of the call it answers",
                        )
                    rid = calls[c].id
                elif fmt.tools_since("v11") and (c is None or c in seen):
                    problem = (
                        f"answers no call of messages[{owner}]"
                        if c is None
                        else f"answers the same call as messages[{i + seen[c]}]"
                    )
                    raise UsageError(
                        f"{where}.tool_call_id: {r.tool_call_id!r} {problem}",
                        hint="give each result the id of its own call",
                    )
                if c is not None:
                    seen.setdefault(c, k)
                name = r.name if r.name is not None or c is None else calls[c].name
                out[i + k] = replace(r, tool_call_id=rid, name=name)
            answered = len(run)
            i = end
        else:
            i += 1
    return out


def _check_v2_results(msgs: Sequence[Message], origins: Sequence[int], last_user: int) -> None:
    """v2 takes one tool result per assistant turn after the last user message."""
    turn_has_calls, results = False, 0
    for k in range(max(last_user, 0), len(msgs)):
        m = msgs[k]
        if m.role == "assistant":
            turn_has_calls, results = bool(m.tool_calls), 0
        elif m.role == "tool":
            results += turn_has_calls
            if results > 1:
                raise UsageError(
                    f"messages[{origins[k]}]: the v2 chat format takes one tool result per "
                    "assistant turn after the last user message",
                    hint="call one tool per turn, or use a v3+ model for parallel calls",
                )
        else:
            turn_has_calls, results = False, 0


def _encode_mistral(
    fmt: MistralFormat,
    messages: Sequence[Message],
    tokenize: Tokenize,
    effort: str | None,
    tools: Sequence[Tool],
    images: ImageConfig | None = None,
) -> list[int]:
    _check_parts(fmt, messages, images)
    _check_tools(fmt, tools, messages)
    msgs, origins, system = _normalize(fmt, _resolve_calls(fmt, messages))
    user_idx = [i for i, m in enumerate(msgs) if m.role == "user"]
    first_user, last_user = (user_idx[0], user_idx[-1]) if user_idx else (-1, -1)
    if fmt.tool_rules == "v2":
        _check_v2_results(msgs, origins, last_user)
    tools_at = first_user if fmt.tools_since("v13") else last_user
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
            elif isinstance(part, Picture):
                assert images is not None  # _check_parts
                ids = ImageIds(special["[IMG]"], special["[IMG_BREAK]"], special["[IMG_END]"])
                out += image_tokens(part.width, part.height, images, ids)
            else:
                out += [special["[THINK]"], *text(part.text)]
                out += [special["[/THINK]"]] if part.closed else []
        return out

    tokens = [special["<s>"]]
    for i, m in enumerate(msgs):
        if m.role == "user":
            where = {"first_user": first_user, "last_user": last_user}.get(fmt.system)
            prefix = system + _JOIN if system and i == where else ""
            if isinstance(m.content, str):
                body = text(prefix + m.content)
            else:  # text and images: the system prompt, then each part, mistral-common's order
                ordered = image_first(m.content, _is_picture, _is_text)
                body = (text(prefix) if prefix else []) + parts(tuple(ordered))
            if tools and i == tools_at:
                listed = json.dumps([t.prompt_json() for t in tools], ensure_ascii=False)
                tokens += [special["[AVAILABLE_TOOLS]"], *text(listed)]
                tokens += [special["[/AVAILABLE_TOOLS]"]]
            if fmt.settings and i == first_user:
                tokens += _settings(fmt, effort, special, text)
            if fmt.control_inst:
                tokens += [special["[INST]"], *body, special["[/INST]"]]
            else:  # text only: _check_parts refuses images without control tokens
                tokens += text(f"[INST] {prefix}{m.text} [/INST]")
        elif m.role == "assistant":
            if not m.content and not m.tool_calls:
                raise UsageError(
                    f"messages[{origins[i]}]: an assistant message is empty",
                    hint="drop it or give it text",
                )
            if fmt.tool_rules == "v2" and m.tool_calls and i < last_user:
                continue  # v2 drops the calls (and results) before the last user message
            if m.content:
                # plain text is rstrip(" ")-ed (v2+); text beside thinking is encoded as it is
                content = (
                    m.content.rstrip(" ")
                    if fmt.strip_reply and isinstance(m.content, str)
                    else m.content
                )
                tokens += parts(content)
            if m.tool_calls:
                tokens += _encode_calls(fmt, m.tool_calls, special, text)
            tokens += [special["</s>"]]
        elif m.role == "tool":
            if fmt.tool_rules == "v2" and i < last_user:
                continue
            tokens += _encode_result(fmt, m, special, text)
        else:
            tokens += [special["[SYSTEM_PROMPT]"], *parts(m.content), special["[/SYSTEM_PROMPT]"]]
    return tokens


def _is_picture(part: object) -> bool:
    return isinstance(part, Picture)


def _is_text(part: object) -> bool:
    return isinstance(part, str)


def _encode_calls(
    fmt: MistralFormat,
    calls: Sequence[ToolCall],
    special: _SpecialIds,
    text: Callable[[str], list[int]],
) -> list[int]:
    """One assistant turn's calls (arguments already normalised), in the format's syntax."""
    if not fmt.tools_since("v11"):  # one [TOOL_CALLS] and a JSON list
        listed = []
        for c in calls:
            call: dict[str, Any] = {"name": c.name, "arguments": _json_value(c.arguments)}
            if fmt.tools_since("v3") and c.id and c.id != "null":
                call["id"] = c.id
            listed.append(call)
        return [special["[TOOL_CALLS]"], *text(json.dumps(listed, ensure_ascii=False))]
    out: list[int] = []
    for c in calls:
        arguments = json.dumps(_json_value(c.arguments), ensure_ascii=False)
        out += [special["[TOOL_CALLS]"], *text(c.name)]
        if fmt.tool_rules == "v11" and c.id and c.id != "null":
            out += [special["[CALL_ID]"], *text(c.id)]
        out += [special["[ARGS]"], *text(arguments)]
    return out


def _encode_result(
    fmt: MistralFormat, m: Message, special: _SpecialIds, text: Callable[[str], list[int]]
) -> list[int]:
    """One tool result (content normalised by _normalize) in the format's syntax."""
    assert isinstance(m.content, str)
    if fmt.tool_rules == "v2":
        body = text(
            json.dumps([{"name": m.name, "content": _json_value(m.content)}], ensure_ascii=False)
        )
    elif fmt.tool_rules == "v3":
        result = {"content": _json_value(m.content), "call_id": m.tool_call_id}
        body = text(json.dumps(result, ensure_ascii=False))
    elif fmt.tool_rules in ("v7", "v11"):
        body = [*text(m.tool_call_id or ""), special["[TOOL_CONTENT]"], *text(m.content)]
    else:
        body = text(m.content)
    return [special["[TOOL_RESULTS]"], *body, special["[/TOOL_RESULTS]"]]


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
    fmt: TemplateFormat,
    messages: Sequence[Message],
    tokenize: Tokenize,
    tools: Sequence[Tool] = (),
) -> list[int]:
    """Render, then tokenize with control tokens parsed; like llama.cpp's server, one BOS is
    prepended when the vocabulary asks for it and the template did not write it."""
    tokens = tokenize(render(fmt, messages, tools), add_bos=False, special=True)
    bos = tokenize("", add_bos=True, special=True)  # [] where the vocabulary adds none
    if bos and tokens[: len(bos)] != bos:
        tokens = bos + tokens
    return tokens


def hf_message(m: Message) -> dict[str, Any]:
    """A message in the shape Hugging Face chat templates read: an assistant's tool_calls as
    [{"id", "type": "function", "function": {"name", "arguments"}}] with the arguments an object
    (as transformers documents them; JSON text when they are not an object), a tool result's
    tool_call_id and name beside its content."""
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        calls = []
        for c in m.tool_calls:
            arguments = _json_value(c.arguments) if c.arguments else {}
            call: dict[str, Any] = {"id": c.id} if c.id is not None else {}
            call["type"] = "function"
            call["function"] = {
                "name": c.name,
                "arguments": arguments if isinstance(arguments, dict) else c.arguments,
            }
            calls.append(call)
        out["tool_calls"] = calls
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        out["name"] = m.name
    return out


def render(fmt: TemplateFormat, messages: Sequence[Message], tools: Sequence[Tool] = ()) -> str:
    """The template's text for `messages` with the generation prompt added (as HF renders it:
    `tools` is the list of OpenAI-shaped tools, or None without tools), in a sandbox bounded in
    time and size (InvalidGGUF when the template misbehaves)."""
    from localmix.chat import sandbox

    return sandbox.render(
        fmt.template,
        {
            "messages": [hf_message(m) for m in messages],
            "tools": [t.to_openai() for t in tools] if tools else None,
            "bos_token": fmt.bos_token,
            "eos_token": fmt.eos_token,
            "add_generation_prompt": True,
        },
    )
