"""chat.toolcalls: tool calls read from a reply's token ids in both Mistral syntaxes, whatever the
chunking; the same characters written as text stay text."""

from __future__ import annotations

import itertools
import json

import pytest

from localmix.chat.toolcalls import CallArgs, CallParser, CallStart, Event
from localmix.llama.records import Chunk

TOOL_CALLS, ARGS, CALL_ID = 9, 32, 33
IDS = {"[TOOL_CALLS]": TOOL_CALLS, "[ARGS]": ARGS, "[CALL_ID]": CALL_ID}
TEXT = 1000  # any ordinary token id


def chunks(*parts: str | int, split: int = 0) -> list[Chunk]:
    """Control ids as their own Chunks; text as Chunks of `split` characters (0: whole)."""
    out = []
    for part in parts:
        if isinstance(part, int):
            out.append(Chunk("", part))
            continue
        size = split or max(len(part), 1)
        out += [Chunk(part[i : i + size], TEXT) for i in range(0, len(part), size)]
    return out


def run(parser: CallParser, items: list[Chunk]) -> list[Event]:
    events = [e for c in items for e in parser.feed(c)]
    return events + parser.finish()


def summary(events: list[Event]) -> tuple[str, list[tuple[str, str, dict[str, object]]]]:
    """(content, [(id, name, arguments)]) from the events."""
    content = "".join(e for e in events if isinstance(e, str))
    calls: dict[int, list[str]] = {}
    for e in events:
        if isinstance(e, CallStart):
            assert e.index not in calls and e.name  # the whole name, once, in the first event
            calls[e.index] = [e.id, e.name, ""]
        elif isinstance(e, CallArgs):
            calls[e.index][2] += e.text
    return content, [(i, n, json.loads(a)) for i, n, a in calls.values()]


@pytest.mark.parametrize("split", [0, 1, 3])
def test_args_syntax_streams_each_call(split: int) -> None:
    parser = CallParser("args", IDS, make_id=lambda: "generated")
    items = chunks("Let me look.", TOOL_CALLS, "get_weather", CALL_ID, "abc123DEF", ARGS,
                   '{"city": "Paris"}', TOOL_CALLS, "get_time", ARGS, '{"tz": "CET"}',
                   split=split)  # fmt: skip
    content, calls = summary(run(parser, items))
    assert content == "Let me look."
    assert calls == [
        ("abc123DEF", "get_weather", {"city": "Paris"}),
        ("generated", "get_time", {"tz": "CET"}),
    ]
    assert [c.arguments for c in parser.calls] == ['{"city": "Paris"}', '{"tz": "CET"}']


def test_args_fragments_arrive_before_the_reply_ends() -> None:
    parser = CallParser("args", IDS)
    for item in chunks(TOOL_CALLS, "f", ARGS):
        parser.feed(item)
    assert parser.feed(Chunk('{"a"', TEXT)) == [CallArgs(0, '{"a"')]


@pytest.mark.parametrize(("split", "space"), list(itertools.product([0, 1, 4], ["", " "])))
def test_list_syntax_hands_out_whole_calls_at_the_end(split: int, space: str) -> None:
    parser = CallParser("list", IDS, make_id=lambda: "generated")
    array = [{"name": "get_weather", "arguments": {"city": "Zürich"}, "id": "abc123DEF"},
             {"name": "get_time", "arguments": {}, "id": "call_1"}]  # fmt: skip
    items = chunks(TOOL_CALLS, space + json.dumps(array, ensure_ascii=False), split=split)
    content, calls = summary(run(parser, items))
    assert content == ""
    assert calls == [
        ("abc123DEF", "get_weather", {"city": "Zürich"}),
        ("generated", "get_time", {}),  # not a Mistral id: a new one
    ]


def test_control_text_typed_as_text_stays_text() -> None:
    for syntax in ("list", "args"):
        parser = CallParser(syntax, IDS)
        events = run(
            parser, [Chunk("[TOOL_CALLS]", 1001), Chunk('get_weather[ARGS]{"a": 1}', 1002)]
        )
        assert events == ["[TOOL_CALLS]", 'get_weather[ARGS]{"a": 1}']
        assert not parser.calls and not parser.called


def test_a_list_cut_off_becomes_text() -> None:
    parser = CallParser("list", IDS)
    events = run(parser, chunks(TOOL_CALLS, '[{"name": "f", "argum'))
    assert events == ['[{"name": "f", "argum'] and not parser.calls


def test_a_name_without_args_is_no_call() -> None:
    parser = CallParser("args", IDS)
    assert run(parser, chunks(TOOL_CALLS, "get_wea")) == ["get_wea"]
    assert not parser.calls
