"""Grammars for constrained decoding: JSON output (a schema, or any object) and Mistral tool calls,
as Lark text for llguidance (localmix/llama/constraint.py compiles and applies them).

Pure functions: no model, no llama.cpp. Control tokens are referenced by id (`<[9]>`), looked up
by the caller's `special("[TOOL_CALLS]") -> id` (chat.template.control_token on the engine's
tokenizer). Control tokens can only be written through such a reference: free text (`content`)
never contains one, so a model cannot type "[TOOL_CALLS]" as text under any of these grammars.

What the model may write, per chat format (mistral-common's tokenizers; its GrammarFactory is
the reference for v11+, which it alone covers):

    v2                     [TOOL_CALLS] [{"name": N, "arguments": {..}}, ...]
    v3, v3-tekken, v7      [TOOL_CALLS] [{"name": N, "arguments": {..}, "id": "a1B2c3D4e"}, ...]
    v11                    ([TOOL_CALLS]N[CALL_ID]a1B2c3D4e[ARGS]{..})+   [CALL_ID]id optional
    v13, v15               ([TOOL_CALLS]N[ARGS]{..})+

N is one of the request's tool names; the arguments follow that tool's parameters schema when
it is strict, else any JSON object. tool_choice: "auto" is text, or calls (v7+: text then calls;
v2/v3 allow one or the other, as their tokenizers refuse both in one message), "none" text only,
"required" calls only, a named function calls of that one only; parallel_tool_calls=False allows
one call. Reasoning models (v13/v15, think=True) may write [THINK]...[/THINK] first.

Where this differs from mistral-common's GrammarFactory (1.13): tool names are always the
request's (it accepts any name when no tool is strict); "required" allows no text before the
calls (its think grammar does); v11 accepts the [CALL_ID] the model was trained to write (its
grammar forbids it); JSON output may follow thinking on v13 too (it allows that on v15 only);
a json_schema with strict false is enforced, only its keywords llguidance cannot enforce being
ignored (it falls back to any object or array); json_object means an object. JSON is written
the way json.dumps writes it, which is also how mistral-common re-encodes tool-call arguments
into the next prompt: ", " and ": " between items, no other whitespace.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from localmix.chat.tools import Tool
from localmix.errors import UsageError

__all__ = [
    "ANY_OBJECT",
    "FORMATS",
    "JsonOutput",
    "Named",
    "Tool",
    "chat_grammar",
    "json_grammar",
    "ollama_format",
    "response_format",
    "tool_choice_from_openai",
]

Special = Callable[[str], int]

# json.dumps' separators: what Mistral models see in their training data and prompts
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CALL_ID_PATTERN = "[a-zA-Z0-9]{9}"  # mistral-common's tool call ids (v3 to v11)
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # mistral-common's function names
SAFE_WS = r"SAFE_WS: /[ \t\r\n]{1,8}/"  # mistral-common's: bounded, so no whitespace loop

# format -> how its tool calls are written
_ARRAY = "array"  # [TOOL_CALLS] then a JSON array of calls
_NAMED = "named"  # per call: [TOOL_CALLS]name[ARGS]{arguments}
FORMATS: dict[str, dict[str, Any]] = {
    "v2": {"calls": _ARRAY, "ids": False, "text_then_calls": False},
    "v3": {"calls": _ARRAY, "ids": True, "text_then_calls": False},
    "v3-tekken": {"calls": _ARRAY, "ids": True, "text_then_calls": False},
    "v7": {"calls": _ARRAY, "ids": True, "text_then_calls": True},
    "v11": {"calls": _NAMED, "call_id": True, "text_then_calls": True},
    "v13": {"calls": _NAMED, "call_id": False, "text_then_calls": True, "think": True},
    "v15": {"calls": _NAMED, "call_id": False, "text_then_calls": True, "think": True},
}


@dataclass(frozen=True)
class Named:
    """tool_choice naming one function: the model must call it (and only it)."""

    name: str


ToolChoice = str | Named  # "auto", "none", "required" or a Named function


@dataclass(frozen=True)
class JsonOutput:
    """The reply must be JSON following `schema`. strict: keywords llguidance cannot enforce
    (uniqueItems, contains, not, ...) are an error; otherwise they are ignored."""

    schema: Mapping[str, Any] | bool
    strict: bool = True


ANY_OBJECT = JsonOutput({"type": "object"})


# -- request fields ------------------------------------------------------------------------------


def tool_choice_from_openai(value: Any) -> ToolChoice:
    """OpenAI's `tool_choice`: "auto" (also for None), "none", "required" ("any", Mistral's
    older name, too), or a function: {"type": "function", "function": {"name": ...}} (chat
    completions) or {"type": "function", "name": ...} (the Responses API)."""
    if value is None:
        return "auto"
    if isinstance(value, str):
        if value == "any":
            return "required"
        if value in ("auto", "none", "required"):
            return value
        raise UsageError(
            f"tool_choice {value!r} is not supported", hint="use auto, none, required or a function"
        )
    if isinstance(value, Mapping):
        function = value.get("function", value)
        if value.get("type") == "function" and isinstance(function, Mapping):
            name = function.get("name")
            if isinstance(name, str):
                return Named(name)
    raise UsageError(
        "tool_choice must be auto, none, required or {type: function, function: {name}}"
    )


def response_format(
    value: Mapping[str, Any] | None, field: str = "response_format"
) -> JsonOutput | None:
    """OpenAI's `response_format`: {"type": "text"} (None: no constraint), {"type":
    "json_object"} or {"type": "json_schema", "json_schema": {"schema": ..., "strict": ...}}.
    field: the request's name for it, in errors."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise UsageError(f"{field} must be an object")
    kind = value.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return ANY_OBJECT
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, Mapping):
            raise UsageError(f"{field} json_schema needs a json_schema object")
        schema = spec.get("schema", {})
        if not isinstance(schema, (Mapping, bool)):
            raise UsageError(f"{field}: schema is a JSON schema object")
        return JsonOutput(schema, strict=bool(spec.get("strict") or False))
    raise UsageError(
        f"{field} type {kind!r} is not supported", hint="use text, json_object or json_schema"
    )


def text_format(value: Mapping[str, Any] | None) -> JsonOutput | None:
    """The Responses API's `text.format`: response_format's types, with a json_schema's name,
    schema and strict beside its type ({"type": "json_schema", "name": ..., "schema": ...})."""
    if isinstance(value, Mapping) and value.get("type") == "json_schema":
        value = {"type": "json_schema", "json_schema": value}
    return response_format(value, "text.format")


def ollama_format(value: Any) -> JsonOutput | None:
    """Ollama's `format`: "" or None (no constraint), "json" (any object) or a JSON schema,
    enforced the way Ollama does: keywords it cannot enforce are ignored."""
    if value in (None, ""):
        return None
    if value == "json":
        return ANY_OBJECT
    if isinstance(value, Mapping):
        return JsonOutput(value, strict=False)
    raise UsageError('format must be "json" or a JSON schema object')


# -- grammars ------------------------------------------------------------------------------------


def json_grammar(output: JsonOutput, *, think: tuple[int, int] | None = None) -> str:
    """A grammar for a reply that is the JSON value alone, after a [THINK]...[/THINK] block
    when think gives those two tokens' ids (the block is optional)."""
    parts: list[tuple[str, str]] = []
    lines = [f"start: {'think? ' if think else ''}json_value", _json_rule(output, parts)]
    if think:
        lines += _think_rules(think)
    lines.append(SAFE_WS)
    return _checked("\n".join(lines) + "\n", parts)


def chat_grammar(
    fmt: str | None,
    special: Special | None = None,
    *,
    tools: Sequence[Tool] = (),
    tool_choice: ToolChoice = "auto",
    parallel_tool_calls: bool = True,
    output: JsonOutput | None = None,
    think: bool = False,
) -> str | None:
    """The grammar of a chat reply in format fmt ("v2" ... "v15"; None or "v1" for a model with
    no tool-call tokens): tool calls as tool_choice allows, text or JSON output, thinking first
    for a reasoning model (think, v13/v15). None when nothing constrains the reply (text, no
    tools, tool_choice auto). With output and tools, tool_choice auto means the JSON reply or
    tool calls (no free text: it would escape the schema); with "none", JSON only."""
    rules = FORMATS.get(fmt or "")
    choice = tool_choice
    if isinstance(choice, str) and choice not in ("auto", "none", "required"):
        raise UsageError(f"tool_choice {choice!r} is not supported")
    if choice == "none":
        tools = ()
    elif isinstance(choice, Named):
        if choice.name not in {t.name for t in tools}:
            known = ", ".join(t.name for t in tools) or "none"
            raise UsageError(f"tool_choice names {choice.name}, which is not a tool ({known})")
        tools = [t for t in tools if t.name == choice.name]
    elif choice == "required" and not tools:
        raise UsageError("tool_choice required needs tools")
    if len({t.name for t in tools}) != len(tools):
        raise UsageError("two tools have the same name")
    if tools and rules is None:
        raise UsageError(
            f"the {fmt or 'model'}'s chat format has no tool calls",
            hint="tools need a Mistral format v2 or later",
        )
    calls_only = choice == "required" or isinstance(choice, Named)
    if output is not None and calls_only:
        raise UsageError(
            "a JSON response_format with tools needs tool_choice auto or none",
            hint="a reply that must call a tool has no text to format",
        )
    think_ids = _think_ids(fmt, special, think)
    if not tools and output is None:
        if choice != "none":
            return None  # plain text: nothing to constrain
        return _grammar(["body: content"], think_ids, [])
    if output is not None and not tools:
        return json_grammar(output, think=think_ids)

    assert rules is not None and special is not None
    parts: list[tuple[str, str]] = []
    lines = _tool_call_rules(rules, special, tools, parallel_tool_calls, parts)
    if output is not None:
        lines = ["body: json_value | fcalls", _json_rule(output, parts), *lines]
    elif calls_only:
        lines = ["body: fcalls", *lines]
    elif rules["text_then_calls"]:
        lines = ["body: content | content? fcalls", *lines]
    else:  # v2, v3: a message is text or tool calls, not both
        lines = ["body: content | fcalls", *lines]
    return _grammar(lines, think_ids, parts)


def _grammar(lines: list[str], think: tuple[int, int] | None, parts: list[tuple[str, str]]) -> str:
    start = "start: think? body" if think else "start: body"
    out = [start, *lines, "content: /(.|\\n)+/"]
    if think:
        out += _think_rules(think)
    out.append(SAFE_WS)
    return _checked("\n".join(out) + "\n", parts)


def _checked(grammar: str, parts: list[tuple[str, str]]) -> str:
    """The grammar, once llguidance accepts it; else UsageError naming the part it refuses
    (each JSON value is checked alone only then: one check of the whole is the cheaper)."""
    from llguidance import LLMatcher

    error = LLMatcher.validate_grammar(LLMatcher.grammar_from_lark(grammar))
    if not error:
        return grammar
    for what, lark in parts:
        alone = LLMatcher.validate_grammar(LLMatcher.grammar_from_lark(f"start: {lark}\n"))
        if alone:
            raise _schema_error(what, alone)
    from localmix.llama.constraint import grammar_error

    raise UsageError(f"the grammar is not valid: {grammar_error(error)}")


def _think_ids(fmt: str | None, special: Special | None, think: bool) -> tuple[int, int] | None:
    if not think:
        return None
    if not FORMATS.get(fmt or "", {}).get("think") or special is None:
        raise UsageError(f"thinking needs a reasoning model's chat format (v13, v15), not {fmt}")
    return special("[THINK]"), special("[/THINK]")


def _think_rules(think: tuple[int, int]) -> list[str]:
    begin, end = think
    return [f"think: <[{begin}]> think_text? <[{end}]>", "think_text: /(.|\\n)+/"]


def _json_rule(output: JsonOutput, parts: list[tuple[str, str]]) -> str:
    what = "the JSON schema"
    lark = json_value(output.schema, strict=output.strict, what=what, check=False)
    parts.append((what, lark))
    return f"json_value: SAFE_WS? {lark}"


def _tool_call_rules(
    rules: Mapping[str, Any],
    special: Special,
    tools: Sequence[Tool],
    parallel: bool,
    parts: list[tuple[str, str]],
) -> list[str]:
    calls = special("[TOOL_CALLS]")
    # each tool's arguments are a JSON value of their own (their "$ref"s point into their own
    # schema), so the v2-v7 array is spelt out here, the way json.dumps writes it
    arguments = []
    for tool in tools:
        what = f"tool {tool.name}'s parameters"
        arguments.append(json_value(_arguments(tool), strict=True, what=what, check=False))
        parts.append((what, arguments[-1]))
    alternatives = " | ".join(f"call_{i}" for i in range(len(tools)))
    if rules["calls"] == _ARRAY:
        lines = [
            f'fcalls: <[{calls}]> SAFE_WS? "[" call ' + ('(", " call)* "]"' if parallel else '"]"'),
            f"call: {alternatives}",
        ]
        for i, tool in enumerate(tools):
            head = _lark_string('{"name": "' + tool.name + '", "arguments": ')
            if rules["ids"]:
                tail = " ".join(
                    (_lark_string(', "id": "'), f"/{CALL_ID_PATTERN}/", _lark_string('"}'))
                )
            else:
                tail = _lark_string("}")
            lines.append(f"call_{i}: {head} {arguments[i]} {tail}")
        return lines
    args = special("[ARGS]")
    call_id = f"(<[{special('[CALL_ID]')}]> /{CALL_ID_PATTERN}/)? " if rules["call_id"] else ""
    lines = ["fcalls: call+" if parallel else "fcalls: call", f"call: {alternatives}"]
    for i, tool in enumerate(tools):
        lines.append(
            f'call_{i}: <[{calls}]> SAFE_WS? "{tool.name}" {call_id}<[{args}]> SAFE_WS? '
            f"{arguments[i]} SAFE_WS?"
        )
    return lines


def _lark_string(text: str) -> str:
    """A Lark string literal of text (JSON's escapes are Lark's)."""
    return json.dumps(text, ensure_ascii=False)


def _arguments(tool: Tool) -> Mapping[str, Any]:
    """The schema a tool's arguments follow: its parameters if strict, else any object."""
    if tool.strict and tool.parameters:
        return tool.parameters
    return {"type": "object"}


def json_value(
    schema: Mapping[str, Any] | bool,
    *,
    strict: bool = True,
    what: str = "the JSON schema",
    check: bool = True,
) -> str:
    """The Lark for one JSON value following schema: `%json {...}` with localmix's JSON options
    (json.dumps' separators; strict False ignores keywords llguidance cannot enforce).
    UsageError, naming `what`, for a schema that is not JSON or (check) llguidance refuses."""
    from llguidance import LLMatcher

    if schema is True:
        schema = {}
    if not isinstance(schema, Mapping):
        raise UsageError(f"{what} must be a JSON schema object, not {json.dumps(schema)}")
    options = {**JSON_OPTIONS, "lenient": not strict}
    try:
        text = json.dumps({**schema, "x-guidance": options}, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{what} is not JSON: {exc}") from None
    lark = f"%json {text}"
    if not check:
        return lark
    error = LLMatcher.validate_grammar(LLMatcher.grammar_from_lark(f"start: {lark}\n"))
    if error:
        raise _schema_error(what, error)
    return lark


def _schema_error(what: str, error: str) -> UsageError:
    from localmix.llama.constraint import grammar_error

    reason = grammar_error(error).removeprefix("failed to compile JSON schema: ")
    unsupported = re.match(r"Unimplemented keys: \[(.*)\]", reason)
    if unsupported:
        keys = ", ".join(k.strip().strip('"') for k in unsupported.group(1).split(","))
        return UsageError(
            f"{what} uses JSON Schema keywords that cannot be enforced: {keys}",
            hint="remove them, or send the schema with strict false to have them ignored",
        )
    return UsageError(f"{what} is not a valid JSON schema: {reason}")
