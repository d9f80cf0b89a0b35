"""The tool calls in a reply, read from its token ids as it streams, never from its text.

Mistral models call tools in one of two syntaxes, split on control tokens of the model's own
vocabulary (a user who types "[TOOL_CALLS]" writes text tokens, which stay text):

- "list" (v2, v3, v3-tekken, v7): `[TOOL_CALLS]` then one JSON array of
  `{"name": ..., "arguments": {...}, "id": ...}` for every call of the turn. The id comes after
  the arguments, so a call is handed out whole once the array is complete.
- "args" (v11, v13, v15): per call `[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}` (v11's [CALL_ID]
  part optional, absent from v13). A call starts as soon as [ARGS] ends its name, and its
  arguments stream as they are generated.

Text before the first [TOOL_CALLS] is the reply's content (v7+ may write some). Ids are the
model's own where they are Mistral's 9 alphanumerics, else new ones of that shape.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from localmix.chat.tools import is_mistral_id, new_call_id
from localmix.llama.records import Chunk

SYNTAX = {"v2": "list", "v3": "list", "v3-tekken": "list", "v7": "list",
          "v11": "args", "v13": "args", "v15": "args"}  # fmt: skip


@dataclass(frozen=True)
class CallStart:
    """Call `index` of the reply begins: its id and whole function name."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class CallArgs:
    """A fragment of call `index`'s JSON arguments (fragments concatenate to the whole)."""

    index: int
    text: str


Event = str | CallStart | CallArgs  # str: content text


@dataclass
class Call:
    """A call as read so far."""

    id: str
    name: str
    arguments: str = ""


@dataclass
class CallParser:
    """Feed each answer Chunk (thinking already split off); get content text and call events.

    ids: the vocabulary's control-token ids, by text ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]");
    a token the vocabulary lacks is left out. finish() at the end of the reply hands out what
    is still held (a "list" syntax's calls; a cut-off list becomes content text).
    """

    syntax: str
    ids: dict[str, int]
    make_id: Callable[[], str] = new_call_id
    calls: list[Call] = field(default_factory=list)
    _state: str = "content"  # content, name, call_id, args, list
    _name: list[str] = field(default_factory=list)
    _call_id: list[str] = field(default_factory=list)
    _list: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.syntax not in ("list", "args"):
            raise ValueError(f"unknown tool-call syntax {self.syntax!r}")
        self._calls_id = self.ids.get("[TOOL_CALLS]")
        self._args_id = self.ids.get("[ARGS]")
        self._call_id_id = self.ids.get("[CALL_ID]")

    @property
    def called(self) -> bool:
        return bool(self.calls) or self._state != "content"

    def feed(self, chunk: Chunk) -> list[Event]:
        token = chunk.token
        if token >= 0 and token == self._calls_id:
            out = self._end_call()
            self._state = "list" if self.syntax == "list" else "name"
            self._name.clear()
            self._call_id.clear()
            return out
        if self.syntax == "args" and self._state in ("name", "call_id"):
            if token >= 0 and token == self._call_id_id:
                self._state = "call_id"
                return []
            if token >= 0 and token == self._args_id:
                return [self._start()]
            (self._name if self._state == "name" else self._call_id).append(chunk.text)
            return []
        if self._state == "list":
            self._list.append(chunk.text)
            return []
        if self._state == "args":
            self.calls[-1].arguments += chunk.text
            return [CallArgs(len(self.calls) - 1, chunk.text)] if chunk.text else []
        return [chunk.text] if chunk.text else []

    def _start(self) -> CallStart:
        given = "".join(self._call_id).strip()
        call = Call(given if is_mistral_id(given) else self.make_id(), "".join(self._name).strip())
        self.calls.append(call)
        self._state = "args"
        return CallStart(len(self.calls) - 1, call.id, call.name)

    def _end_call(self) -> list[Event]:
        if self._state in ("name", "call_id"):  # [TOOL_CALLS] again before [ARGS]: no call
            self._state = "content"
        return []

    def finish(self) -> list[Event]:
        """What the end of the reply settles: a "list" syntax's calls, or held text."""
        if self._state == "list":
            return self._parse_list()
        if self._state in ("name", "call_id"):  # cut off before [ARGS]: not a call
            self._state = "content"
            text = "".join(self._name) + "".join(self._call_id)
            return [text] if text else []
        return []

    def _parse_list(self) -> list[Event]:
        raw = "".join(self._list)
        self._state = "content"
        try:
            items = json.loads(raw)
        except ValueError:
            return [raw] if raw else []  # cut off (max_tokens) or unconstrained: text
        if isinstance(items, dict):
            items = [items]
        if not isinstance(items, list) or not all(_is_call(i) for i in items):
            return [raw]
        out: list[Event] = []
        for item in items:
            given = item.get("id")
            call_id = given if is_mistral_id(given) else self.make_id()
            args = json.dumps(item.get("arguments", {}), ensure_ascii=False)
            self.calls.append(Call(call_id, item["name"], args))
            index = len(self.calls) - 1
            out += [CallStart(index, call_id, item["name"]), CallArgs(index, args)]
        return out


def _is_call(item: object) -> bool:
    return (
        isinstance(item, dict)
        and isinstance(item.get("name"), str)
        and isinstance(item.get("arguments", {}), dict)
    )
