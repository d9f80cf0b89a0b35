"""Tools a model may call, the calls it makes, and Mistral's call ids (no llama.cpp here).

Mistral's tokenizers (mistral-common's validator) take call ids of exactly nine ASCII letters and
digits. Clients send back whatever ids they were given or made up: OpenAI's `call_…`, UUIDs,
llama.cpp's 32-character ids, none at all (Ollama's /api/chat answers a call by `tool_name`).
`mistral_id` maps any of them to nine alphanumerics, the same one every time, so a call and its
result keep one id across turns; `pair_results` finds the call that an id-less result answers.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import secrets
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from localmix.errors import UsageError

# mistral-common's rules: function names (tools, calls, results) and call ids (v3 to v11)
NAME_PATTERN = re.compile(r"[a-zA-Z0-9_-]{1,64}")
ID_PATTERN = re.compile(r"[a-zA-Z0-9]{9}")
ID_LENGTH = 9
_BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase


def _empty_object() -> dict[str, Any]:
    return {"type": "object", "properties": {}}


def plain_json(value: Any) -> Any:
    """value with every Mapping made a dict and every tuple a list (what json.dumps writes)."""
    if isinstance(value, Mapping):
        return {k: plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    return value


def check_name(name: object, where: str) -> str:
    """name, if it is a function name mistral-common accepts; UsageError naming `where`."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise UsageError(
            f"{where}: function name {name!r} is not 1-64 of a-z, A-Z, 0-9, _ and -",
            hint="rename the function",
        )
    return name


def _function_type(obj: Any, where: str, shape: str) -> None:
    """UsageError unless obj is a tool object of type "function" (the only kind models call)."""
    if not isinstance(obj, Mapping):
        raise UsageError(f"{where}: a tool is an object", hint=shape)
    if obj.get("type", "function") != "function":
        raise UsageError(
            f"{where}.type: tools of type {obj.get('type')!r} are not supported",
            hint='use "function"',
        )


@dataclass(frozen=True)
class Tool:
    """A function the model may call: its name, what it does, and its parameters' JSON schema.
    strict: the arguments must follow the schema (for constrained sampling; not in the prompt)."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=_empty_object)
    strict: bool = False

    @classmethod
    def from_openai(cls, obj: Any, where: str = "tools[0]") -> Tool:
        """A tool from OpenAI's (and Ollama's) `{"type": "function", "function": {...}}`.
        A missing or null parameters is {} and a missing description "", as mistral-common's
        `Tool.from_openai` reads them (so the prompt is the one it would encode)."""
        _function_type(obj, where, '{"type": "function", "function": {...}}')
        function = obj.get("function")
        if not isinstance(function, Mapping):
            raise UsageError(
                f"{where}.function: a function tool needs a function object",
                hint='{"type": "function", "function": {"name": ..., "parameters": {...}}}',
            )
        return cls.from_fields(function, f"{where}.function")

    @classmethod
    def from_responses(cls, obj: Any, where: str = "tools[0]") -> Tool:
        """A tool from OpenAI's Responses API: the function's fields beside its type,
        `{"type": "function", "name": ..., "parameters": {...}}`."""
        _function_type(obj, where, '{"type": "function", "name": ..., "parameters": {...}}')
        return cls.from_fields(obj, where)

    @classmethod
    def from_fields(cls, function: Mapping[str, Any], where: str) -> Tool:
        """A tool from a function's name, description, parameters and strict; errors name
        `where`, the path of the object holding them."""
        name = check_name(function.get("name"), f"{where}.name")
        description = function.get("description")
        if description is None:
            description = ""
        if not isinstance(description, str):
            raise UsageError(f"{where}.description: a description is a string")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {}
        if not isinstance(parameters, Mapping):
            raise UsageError(f"{where}.parameters: parameters is a JSON schema object")
        strict = function.get("strict")
        if strict is None:
            strict = False
        if not isinstance(strict, bool):
            raise UsageError(f"{where}.strict: strict is true or false")
        tool = cls(name, description, plain_json(parameters), strict)
        tool.check(where)
        return tool

    def check(self, where: str = "tools[0].function") -> None:
        """UsageError unless mistral-common accepts the tool: its name, and parameters being a
        valid JSON schema (draft 7). where: the path of the function's fields."""
        check_name(self.name, f"{where}.name")
        if not isinstance(self.parameters, Mapping):
            raise UsageError(f"{where}.parameters: parameters is a JSON schema object")
        import jsonschema  # mistral-common's own dependency; only needed here

        try:
            jsonschema.Draft7Validator.check_schema(plain_json(self.parameters))
        except jsonschema.exceptions.SchemaError as e:
            raise UsageError(
                f"{where}.parameters: not a valid JSON schema: {e.message}",
                hint="see https://json-schema.org (draft 7)",
            ) from None

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's shape of the tool (strict written only when set)."""
        function: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "parameters": plain_json(self.parameters),
        }
        if self.strict:
            function["strict"] = True
        return {"type": "function", "function": function}

    def prompt_json(self) -> dict[str, Any]:
        """The tool as mistral-common writes it into [AVAILABLE_TOOLS] (strict left out)."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": plain_json(self.parameters),
            },
        }


@dataclass(frozen=True)
class ToolCall:
    """A call the assistant made: the function's name, its arguments as JSON text (an object),
    and the call's id as the client knows it (None: it sent none)."""

    name: str
    arguments: str
    id: str | None = None

    @classmethod
    def from_openai(cls, obj: Any, where: str = "tool_calls[0]") -> ToolCall:
        """A call from OpenAI's `{"id", "type": "function", "function": {"name", "arguments"}}`;
        arguments may be JSON text (OpenAI) or an object (Ollama)."""
        if not isinstance(obj, Mapping) or not isinstance(obj.get("function"), Mapping):
            raise UsageError(f"{where}: a tool call is an object with a function object")
        function = obj["function"]
        name = function.get("name")
        if not isinstance(name, str):
            raise UsageError(f"{where}.function.name: a tool call names its function")
        arguments = function.get("arguments")
        if arguments is None:
            arguments = "{}"
        elif isinstance(arguments, Mapping):
            arguments = json.dumps(plain_json(arguments), ensure_ascii=False)
        elif not isinstance(arguments, str):
            raise UsageError(f"{where}.function.arguments: arguments is JSON text or an object")
        call_id = obj.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise UsageError(f"{where}.id: a call id is a string")
        return cls(name, arguments, call_id or None)

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's shape of the call (arguments as JSON text)."""
        out: dict[str, Any] = {"type": "function"}
        if self.id is not None:
            out["id"] = self.id
        out["function"] = {"name": self.name, "arguments": self.arguments}
        return out


def new_call_id(rng: random.Random | None = None) -> str:
    """A fresh Mistral call id: nine letters and digits (random from `rng`, else the OS)."""
    alphabet = string.ascii_letters + string.digits
    if rng is None:
        return "".join(secrets.choice(alphabet) for _ in range(ID_LENGTH))
    return "".join(rng.choice(alphabet) for _ in range(ID_LENGTH))


def is_mistral_id(call_id: object) -> bool:
    """Whether call_id is already nine ASCII letters and digits."""
    return isinstance(call_id, str) and ID_PATTERN.fullmatch(call_id) is not None


def mistral_id(foreign: str | None, *, position: str = "") -> str:
    """The Mistral call id for an id a client sent (any string), the same every time: a valid
    nine-character id is itself; any other is nine base62 digits of its SHA-256. A missing id
    (None or "") gets one from `position` instead, a key of the call's place in the
    conversation ("3.0": message 3, call 0), so a conversation's id-less calls keep their ids
    as it grows."""
    if foreign and is_mistral_id(foreign):
        return foreign
    key = f"id:{foreign}" if foreign else f"position:{position}"
    number = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest(), "big")
    digits = []
    for _ in range(ID_LENGTH):
        number, digit = divmod(number, len(_BASE62))
        digits.append(_BASE62[digit])
    return "".join(digits)


def pair_results(
    calls: Sequence[ToolCall], results: Sequence[tuple[str | None, str | None]]
) -> list[int | None]:
    """Which of `calls` (one assistant turn's) each result answers, results given as
    (tool_call_id, name): a result with an id answers the first call with that id (ids compared
    as given: map both sides alike); one without answers the first call not yet answered with
    its name (any name when it has none), in order. None: no such call."""
    out: list[int | None] = [None] * len(results)
    taken: set[int] = set()
    for r, (result_id, _) in enumerate(results):
        if result_id:
            match = next((c for c, call in enumerate(calls) if call.id == result_id), None)
            out[r] = match
            if match is not None:
                taken.add(match)
    for r, (result_id, name) in enumerate(results):
        if result_id:
            continue
        for c, call in enumerate(calls):
            if c not in taken and (not name or call.name == name):
                out[r] = c
                taken.add(c)
                break
    return out
