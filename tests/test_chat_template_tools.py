"""chat.template with tools: prompts token for token equal to mistral-common's.

A table of tool conversations, each written once with symbolic call ids ("A", "B") and sent the
way clients send them (Mistral ids, OpenAI `call_…`, UUIDs, llama.cpp's 32 characters, no ids
at all as Ollama), is encoded by localmix on each version's real tokenizer converted to a GGUF
(tests/test_chat_template.py's fixture) and compared with mistral-common's encoding of the same
conversation, ids mapped as localmix maps them. Then what either refuses: a UsageError that
names the field, and mistral-common refusing it too where it does.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from localmix.chat import template
from localmix.chat.template import Message, TemplateFormat, Think
from localmix.chat.tools import (
    Tool,
    ToolCall,
    is_mistral_id,
    mistral_id,
    new_call_id,
    pair_results,
)
from localmix.errors import UsageError
from tests.test_chat_template import (  # noqa: F401 - format_gguf is a fixture
    TOKENIZERS,
    _reference_tokenize,
    _tokenizer_file,
    format_gguf,
    reference_content,
)

WEATHER = Tool(
    "get_weather",
    "Get the weather in a city",
    {
        "type": "object",
        "properties": {"city": {"type": "string", "description": "e.g. Paris"}},
        "required": ["city"],
    },
)
TIME = Tool("get_time", "Local time; ünïcode déscription", {"type": "object"}, strict=True)
BARE = Tool("ping")  # default parameters, no description
TOOLS = (WEATHER, TIME)

FORMATS = [f for f in TOKENIZERS if f != "v1"]
References = Callable[[str], tuple[Any, Any]]  # fmt -> (raw tokenizer, MistralTokenizer)
TEKKEN_V13 = {"v13", "v15"}
BEFORE_V7 = {"v2", "v3", "v3-tekken"}


def call(sym: str, name: str, arguments: str) -> ToolCall:
    return ToolCall(name, arguments, sym)


def result(sym: str, content: str | tuple[str, ...]) -> Message:
    return Message("tool", content, tool_call_id=sym)


@dataclass(frozen=True)
class Row:
    """A conversation with symbolic call ids; refused: the formats that refuse it (both sides);
    only: the formats it is for; ordered: its id-less results can be paired by order and name."""

    name: str
    messages: tuple[Message, ...]
    tools: tuple[Tool, ...] = TOOLS
    refused: frozenset[str] = frozenset()
    only: frozenset[str] | None = None
    ordered: bool = True


def _asst(*calls: ToolCall, content: Any = "") -> Message:
    return Message("assistant", content, tool_calls=calls)


PARIS = call("A", "get_weather", '{"city": "Paris"}')
LYON = call("B", "get_weather", '{"city":"Lyon"}')  # compact: re-serialised
TOKYO = call("B", "get_time", '{"tz": "Asia/Tokyo"}')
Q = Message("user", "Weather in Paris?")

ROWS = [
    Row("single call", (Q, _asst(PARIS), result("A", '{"temp": 21}'))),
    Row(
        "single call, answered, next turn",
        (
            Q,
            _asst(PARIS),
            result("A", '{"temp": 21}'),
            Message("assistant", "It is 21 °C.  "),
            Message("user", "Thanks! And tomorrow?"),
        ),
    ),
    Row(
        "parallel calls, next turn",
        (
            Message("user", "Paris and Lyon?"),
            _asst(PARIS, LYON),
            result("A", '{"temp": 21}'),
            result("B", "sunny"),
            Message("assistant", "Paris 21, Lyon sunny."),
            Message("user", "And Nice?"),
        ),
        ordered=False,  # one function twice: pairing by order is the only pairing
    ),
    Row(
        "parallel calls, results out of order",
        (
            Message("user", "Weather and time?"),
            _asst(PARIS, TOKYO),
            result("B", "09:00"),
            result("A", "{}"),
        ),
        refused=frozenset({"v2"}),  # v2: one result per turn after the last user message
    ),
    Row(
        "parallel calls, results in order, last turn",
        (Q, _asst(PARIS, LYON), result("A", "21"), result("B", '"ok"')),
        refused=frozenset({"v2"}),
    ),
    Row(
        "text result",
        (Q, _asst(PARIS), result("A", "Sunny, 21 degrees.\nWind: none")),
    ),
    Row(
        "JSON results: spacing, unicode, scalars, empty, parts",
        (
            Message("user", "a"),
            _asst(PARIS),
            result("A", '{ "temp" : 21.50, "sky": "ensoleillé", "n": [1,2] }'),
            Message("user", "b"),
            _asst(call("B", "get_time", "")),  # empty arguments: {}
            result("B", ""),
            Message("user", "c"),
            _asst(call("C", "get_time", '{"tz":"Europe/Zürich","x":1e3}')),
            result("C", ("part one ", '{"k": 1}')),
            Message("user", "d"),
            _asst(call("D", "get_weather", "not json")),  # kept as text
            result("D", "  42 "),
        ),
    ),
    Row(
        "system prompt",
        (
            Message("system", "You are a weather bot."),
            Q,
            _asst(PARIS),
            result("A", '{"temp": 21}'),
            Message("assistant", "21 °C"),
            Message("user", "Thanks"),
        ),
    ),
    Row(
        "tools offered on a later turn",
        (
            Message("system", "Be brief."),
            Message("user", "Hi"),
            Message("assistant", "Hello!"),
            Q,
            _asst(PARIS),
            result("A", '{"temp": 21}'),
        ),
    ),
    Row(
        "a second round of calls",
        (
            Q,
            _asst(PARIS),
            result("A", '{"temp": 21}'),
            _asst(call("B", "get_weather", '{"city": "Lyon"}')),
            result("B", '{"temp": 18}'),
            Message("assistant", "Paris 21, Lyon 18."),
            Message("user", "Thanks"),
        ),
    ),
    Row(
        "thinking and calls",
        (
            Q,
            _asst(PARIS, content=(Think("I need the weather."),)),
            result("A", '{"temp": 21}'),
            Message("assistant", (Think("Got it."), "21 °C in Paris.")),
            Message("user", "And Lyon?"),
            _asst(LYON, content=(Think("Again."), "Checking Lyon.")),
            result("B", '{"temp": 18}'),
        ),
        only=frozenset(TEKKEN_V13),
    ),
    Row(
        "text before calls",
        (Q, _asst(PARIS, content="Let me check.  "), result("A", '{"temp": 21}')),
        refused=frozenset(BEFORE_V7),
    ),
    Row(
        "text and calls in adjacent assistant messages",
        (Q, Message("assistant", "Let me check."), _asst(PARIS), result("A", "21")),
        refused=frozenset(BEFORE_V7),
    ),
    Row(
        "tools of every shape, no calls",
        (Message("system", "S"), Message("user", "What can you do?")),
        tools=(WEATHER, TIME, BARE),
    ),
]

STYLES = ["mistral", "openai", "uuid", "llama", "none"]


def foreign(style: str, sym: str) -> str | None:
    """The id a client of `style` sends for the call `sym`."""
    return {
        "mistral": f"{sym}bc12XYZ9",  # valid: kept as it is
        "openai": f"call_{sym}x7Yq2mN4pQ8rT0vW",
        "uuid": str(uuid.uuid5(uuid.NAMESPACE_DNS, sym)),
        "llama": (sym * 32)[:1] + "q0Wb7ZkR3mT9xV2cL8nP4sD6fG1hJ5a",
        "none": None,
    }[style]


def as_sent(row: Row, style: str) -> tuple[list[Message], dict[str, str]]:
    """The row's messages as a client of `style` sends them, and the Mistral id of each
    symbolic call as localmix must map it (an id-less call: its place among the calls)."""
    out: list[Message] = []
    ids: dict[str, str] = {}
    for m in row.messages:
        if m.tool_calls:
            calls = []
            for c in m.tool_calls:
                sent = foreign(style, c.id or "")
                ids[c.id or ""] = mistral_id(sent, position=str(len(ids)))
                calls.append(replace(c, id=sent))
            m = replace(m, tool_calls=tuple(calls))
        elif m.role == "tool":
            named = next(
                c.name for n in row.messages for c in n.tool_calls if c.id == m.tool_call_id
            )
            # Ollama answers by tool_name, OpenAI clients by id alone
            m = replace(
                m,
                tool_call_id=foreign(style, m.tool_call_id or ""),
                name=named if style == "none" else None,
            )
        out.append(m)
    return out, ids


def reference_request(
    row: Row, ids: dict[str, str], effort: str | None = None, tools: tuple[Tool, ...] | None = None
) -> Any:
    """mistral-common's ChatCompletionRequest of the row, each call id its Mistral id (`ids`:
    symbolic id -> Mistral id), a result without a name named by its call (localmix fills the
    name a client leaves out)."""
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        SystemMessage,
        ToolMessage,
        UserMessage,
    )
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall
    from mistral_common.protocol.instruct.tool_calls import Tool as MTool
    from mistral_common.protocol.instruct.tool_calls import ToolCall as MCall

    content = reference_content

    names = {c.id: c.name for m in row.messages for c in m.tool_calls}
    messages: list[Any] = []
    for m in row.messages:
        if m.role == "system":
            messages.append(SystemMessage(content=content(m)))
        elif m.role == "user":
            messages.append(UserMessage(content=content(m)))
        elif m.role == "assistant":
            calls = [
                MCall(id=ids[c.id or ""], function=FunctionCall(name=c.name, arguments=c.arguments))
                for c in m.tool_calls
            ]
            messages.append(AssistantMessage(content=content(m) or None, tool_calls=calls or None))
        else:
            messages.append(
                ToolMessage(
                    content=content(m),
                    tool_call_id=ids[m.tool_call_id or ""],
                    name=m.name if m.name is not None else names.get(m.tool_call_id),
                )
            )
    listed = row.tools if tools is None else tools
    return ChatCompletionRequest(
        messages=messages,
        tools=[
            MTool(
                function=Function(
                    name=t.name,
                    description=t.description,
                    parameters=dict(t.parameters),
                    strict=t.strict,
                )
            )
            for t in listed
        ]
        or None,
        reasoning_effort=effort,
    )


def _format_name(fmt: str) -> str:
    return "v7" if fmt == "v7-tekken" else fmt


def _check_rows(
    fmt: str, reference: Any, tokenize: template.Tokenize, decode: Callable[[list[int]], str]
) -> int:
    """Every row in every id style: equal tokens, or both sides refusing where the row says.
    Returns how many encodings were compared."""
    name = _format_name(fmt)
    efforts = [None, *template.get(name).efforts]
    compared = 0
    for n, row in enumerate(ROWS):
        if row.only is not None and fmt not in row.only:
            continue
        for style in STYLES:
            if style == "none" and not row.ordered:
                continue
            sent, ids = as_sent(row, style)
            effort = efforts[n % len(efforts)]
            where = f"{fmt} / {row.name} / {style}"
            request = reference_request(row, ids, effort)
            if fmt in row.refused:
                with pytest.raises(Exception) as refused:
                    reference.encode_chat_completion(request)
                assert not isinstance(refused.value, AssertionError), where
                with pytest.raises(UsageError, match=r"messages\[\d+\]"):
                    template.encode(name, sent, tokenize, tools=row.tools, reasoning_effort=effort)
                continue
            expected = reference.encode_chat_completion(request).tokens
            got = template.encode(name, sent, tokenize, tools=row.tools, reasoning_effort=effort)
            assert got == expected, (where, decode(got), decode(expected))
            # the comparison is about tools: the reference did encode them, and the ids
            text = decode(expected)
            assert "[AVAILABLE_TOOLS]" in text, where
            shown = name not in ("v2", "v13", "v15") and any(m.tool_calls for m in row.messages)
            assert all(i in text for i in ids.values()) or not shown, where
            compared += 1
    return compared


def _decoder(reference: Any) -> Callable[[list[int]], str]:
    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

    raw = reference.instruct_tokenizer.tokenizer
    return lambda ids: raw.decode(ids, special_token_policy=SpecialTokenPolicy.KEEP)


def test_tool_conversations_match_mistral_common(format_gguf: tuple[str, Path, Path]) -> None:  # noqa: F811
    """On llama.cpp's tokenizer of the real vocabulary: every row on every version from v2;
    v1 refuses tools and keeps its plain prompt."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from localmix.llama.engine import Engine
    from localmix.llama.records import EngineConfig

    fmt, tok_file, gguf_path = format_gguf
    reference = MistralTokenizer.from_file(str(tok_file))
    with Engine(EngineConfig(gguf_path, n_ctx=256, n_threads=1)) as engine:
        if fmt == "v1":  # refused, never dropped (mistral-common drops them without a word)
            request = reference_request(Row("x", (U,)), {})
            assert template.encode("v1", [U], engine.tokenize) == (
                reference.encode_chat_completion(request).tokens
            )
            with pytest.raises(UsageError, match=r"^tools: the v1 chat format") as e:
                template.encode("v1", [U], engine.tokenize, tools=TOOLS)
            assert e.value.hint and "v3" in e.value.hint
            return
        compared = _check_rows(fmt, reference, engine.tokenize, _decoder(reference))
    assert compared >= 40


def test_tools_change_the_prompt_where_each_version_puts_them(references: References) -> None:
    """The block before the last user turn (v2-v11) or the first (v13+), and a conversation
    without tools keeps its old prompt: tools offered on a later turn rewrite it (v13+ only
    before the first [INST])."""
    for fmt in FORMATS:
        raw, reference = references(fmt)
        tokenize = _reference_tokenize(raw)
        name = _format_name(fmt)
        convo = [Message("user", "Hi"), Message("assistant", "Hello!"), Message("user", "Weather?")]
        plain = template.encode(name, convo, tokenize)
        offered = template.encode(name, convo, tokenize, tools=TOOLS)
        assert (
            offered
            == reference.encode_chat_completion(
                reference_request(Row("x", tuple(convo)), {})
            ).tokens
        )
        block = raw.get_special_token("[AVAILABLE_TOOLS]")
        at = offered.index(block)
        first_inst = offered.index(raw.get_special_token("[INST]"))
        assert (at < first_inst) is (name in TEKKEN_V13), fmt
        assert offered[:at] == plain[:at] and offered != plain


# --- refusals ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> References:
    """fmt -> (mistral-common's raw tokenizer, MistralTokenizer) of fmt's tokenizer file, each
    loaded once (a tekken file takes a second)."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    tmp = tmp_path_factory.mktemp("tokenizers")
    loaded: dict[str, tuple[Any, Any]] = {}

    def get(fmt: str) -> tuple[Any, Any]:
        if fmt not in loaded:
            reference = MistralTokenizer.from_file(str(_tokenizer_file(fmt, tmp)))
            loaded[fmt] = (reference.instruct_tokenizer.tokenizer, reference)
        return loaded[fmt]

    return get


A, B = "aaaaaaaa1", "bbbbbbbb2"
PA = ToolCall("get_weather", '{"city": "Paris"}', A)
PB = ToolCall("get_weather", '{"city": "Lyon"}', B)
U = Message("user", "Weather?")

# (name, formats, messages, tools, the field the error names, mistral-common refuses it too)
REFUSALS = [
    ("v1 with tools", ["v1"], [U], TOOLS, r"^tools: the v1 chat format \(Mixtral 8x7B v0\.1\) has no tool tokens", False),
    ("v1 tool calls", ["v1"], [U, _asst(PA), result(A, "x")], (), r"^messages\[1\]\.tool_calls: the v1", True),
    ("v1 tool result", ["v1"], [U, Message("assistant", "x"), result(A, "x")], (), r"^messages\[2\]\.role: the v1", True),
    ("text and calls", ["v2", "v3", "v3-tekken"], [U, _asst(PA, content="Checking"), result(A, "1")], TOOLS, r"^messages\[1\]\.content:", True),
    ("text, then calls", ["v2", "v3"], [U, Message("assistant", "Hm"), _asst(PA), result(A, "1")], TOOLS, r"^messages\[2\]\.tool_calls:", True),
    ("unpaired id", ["v11", "v13", "v15"], [U, _asst(PA), result("zzzzzzzz9", "1")], TOOLS, r"^messages\[2\]\.tool_call_id: 'zzzzzzzz9' answers no call", True),
    ("duplicate result ids", ["v11", "v13", "v15"], [U, _asst(PA, PB), result(A, "1"), result(A, "2")], TOOLS, r"^messages\[3\]\.tool_call_id: .* the same call as messages\[2\]", True),
    ("duplicate call ids", ["v11", "v13", "v15"], [U, _asst(PA, replace(PB, id=A)), result(A, "1"), result(A, "2")], TOOLS, r"^messages\[1\]\.tool_calls\[1\]\.id: duplicate", True),
    ("bad tool name", FORMATS, [U], (Tool("get weather"),), r"^tools\[0\]\.function\.name:", True),
    ("bad call name", FORMATS, [U, _asst(replace(PA, name="get.weather")), result(A, "1")], TOOLS, r"^messages\[1\]\.tool_calls\[0\]\.function\.name:", True),
    ("bad result name", FORMATS, [U, _asst(PA), replace(result(A, "1"), name="a b")], TOOLS, r"^messages\[2\]\.name:", True),
    ("bad schema", FORMATS, [U], (Tool("f", parameters={"type": 5}),), r"^tools\[0\]\.function\.parameters:", True),
    ("result after a user message", FORMATS, [U, result(A, "1")], TOOLS, r"^messages\[1\]\.role: a tool result must follow", True),
    ("result after plain text", ["v11", "v13"], [U, Message("assistant", "x"), result(A, "1")], TOOLS, r"^messages\[2\]\.role:", True),
    ("unanswered call, next assistant", FORMATS, [U, _asst(PA, PB), result(A, "1"), Message("assistant", "x"), Message("user", "y")], TOOLS, r"^messages\[1\]\.tool_calls: 2 calls but 1 tool results", True),
    ("calls in the first message", FORMATS, [_asst(PA), result(A, "1"), Message("assistant", "x"), U], TOOLS, r"^messages\[0\]\.tool_calls: a conversation cannot open", True),
    ("more results than calls", ["v11", "v13"], [U, _asst(PA), result(A, "1"), result(B, "2")], TOOLS, r"^messages\[3\]", True),
    ("id-less result, no such call", FORMATS, [U, _asst(PA), replace(result(A, "1"), tool_call_id=None, name="get_time")], TOOLS, r"^messages\[2\]\.tool_call_id: missing, and no unanswered call of 'get_time'", None),
    ("v2: two results after the last user", ["v2"], [U, _asst(PA, PB), result(A, "1"), result(B, "2")], TOOLS, r"^messages\[3\]: the v2 chat format takes one tool result", True),
]  # fmt: skip


@pytest.mark.parametrize(
    ("formats", "messages", "tools", "field", "reference_refuses"),
    [pytest.param(*r[1:], id=r[0]) for r in REFUSALS],
)
def test_refusals_name_the_field(
    formats: list[str],
    messages: list[Message],
    tools: tuple[Tool, ...],
    field: str,
    reference_refuses: bool | None,
    references: References,
) -> None:
    """UsageError naming the field; mistral-common refuses the same conversation (its ids as
    given: valid Mistral ids), but for v1's tools, which it drops without a word (None: a
    conversation it cannot be given: an id-less result)."""
    for fmt in formats:
        raw, reference = references(fmt)
        with pytest.raises(UsageError, match=field):
            template.encode(_format_name(fmt), messages, _reference_tokenize(raw), tools=tools)
        if reference_refuses is None:
            continue
        request = reference_request(Row("x", tuple(messages), tools=tools), _SameIds())
        try:
            reference.encode_chat_completion(request)
        except Exception as e:  # mistral-common's exceptions, ValueError, ...
            assert reference_refuses, (fmt, e)
        else:
            assert not reference_refuses, fmt


class _SameIds(dict):  # type: ignore[type-arg]
    """Ids as written (valid Mistral ids already)."""

    def __missing__(self, key: str) -> str:
        return key


# --- tools.py ---------------------------------------------------------------------------------


def test_new_call_ids_are_mistral_ids() -> None:
    rng = random.Random(0)
    ids = {new_call_id(rng) for _ in range(200)} | {new_call_id() for _ in range(200)}
    assert len(ids) == 400 and all(is_mistral_id(i) for i in ids)
    assert new_call_id(random.Random(1)) == new_call_id(random.Random(1))


@pytest.mark.parametrize(
    "foreign_id",
    [
        "call_abc123def456",
        "call_1",
        str(uuid.uuid4()),
        "a" * 32,
        "abc-123-DEF",
        "null",
        "ünï",
        "x" * 500,
    ],
)
def test_mistral_id_maps_any_id_to_nine_alphanumerics_the_same_every_time(foreign_id: str) -> None:
    mapped = mistral_id(foreign_id)
    assert is_mistral_id(mapped) and mapped == mistral_id(foreign_id) != foreign_id
    assert mapped != mistral_id(foreign_id + "x")


def test_mistral_id_keeps_valid_ids_and_places_missing_ones() -> None:
    assert mistral_id("abcDEF123") == "abcDEF123"
    assert mistral_id(None, position="0") == mistral_id("", position="0")
    assert mistral_id(None, position="0") != mistral_id(None, position="1")
    assert all(is_mistral_id(mistral_id(None, position=str(n))) for n in range(50))
    assert not is_mistral_id("abcDEF12") and not is_mistral_id("abcDEF12_")


def test_pair_results_by_id_then_order_and_name() -> None:
    calls = [ToolCall("w", "{}", "i1"), ToolCall("t", "{}", "i2"), ToolCall("w", "{}", "i3")]
    assert pair_results(calls, [(None, None), (None, None), (None, None)]) == [0, 1, 2]
    assert pair_results(calls, [(None, "t"), (None, "w"), (None, "w")]) == [1, 0, 2]
    assert pair_results(calls, [("i3", None), (None, "w"), (None, None)]) == [2, 0, 1]
    assert pair_results(calls, [("nope", None), (None, "x"), (None, "w")]) == [None, None, 0]
    assert pair_results(calls, [(None, "t"), (None, "t")]) == [1, None]


def test_ollama_results_without_ids_get_their_calls_ids(references: References) -> None:
    """Calls and results without ids (Ollama) on v11: [CALL_ID] and result ids agree."""
    raw, _ = references("v11")
    tokenize = _reference_tokenize(raw)
    msgs = [
        U,
        _asst(ToolCall("get_weather", "{}"), ToolCall("get_time", "{}")),
        Message("tool", "t", name="get_time"),
        Message("tool", "w", name="get_weather"),
    ]
    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

    text = raw.decode(
        template.encode("v11", msgs, tokenize, tools=TOOLS),
        special_token_policy=SpecialTokenPolicy.KEEP,
    )
    first, second = mistral_id(None, position="0"), mistral_id(None, position="1")
    assert (
        f"get_weather[CALL_ID]{first}[ARGS]" in text and f"get_time[CALL_ID]{second}[ARGS]" in text
    )
    # results in call order (mistral-common's v11+ normalizer), each with its call's id
    assert text.endswith(
        f"[TOOL_RESULTS]{first}[TOOL_CONTENT]w[/TOOL_RESULTS][TOOL_RESULTS]{second}[TOOL_CONTENT]t[/TOOL_RESULTS]"
    )


def test_tool_from_openai() -> None:
    tool = Tool.from_openai({"type": "function", "function": {"name": "f", "strict": True}})
    assert tool == Tool("f", "", {}, strict=True)  # mistral-common's defaults for a bare function
    full = {
        "type": "function",
        "function": {"name": "g", "description": "d", "parameters": WEATHER.parameters},
    }
    assert Tool.from_openai(full).to_openai() == full
    for bad, field in [
        ("x", r"tools\[2\]"),
        ({"type": "retrieval"}, r"tools\[2\]\.type"),
        ({"type": "function"}, r"tools\[2\]\.function"),
        ({"type": "function", "function": {"name": "a b"}}, r"tools\[2\]\.function\.name"),
        ({"type": "function", "function": {"name": "x" * 65}}, r"tools\[2\]\.function\.name"),
        ({"type": "function", "function": {"name": "f", "parameters": []}}, r"\.parameters"),
        (
            {"type": "function", "function": {"name": "f", "parameters": {"type": 3}}},
            r"\.parameters",
        ),
        ({"type": "function", "function": {"name": "f", "strict": "yes"}}, r"\.strict"),
        ({"type": "function", "function": {"name": "f", "description": 3}}, r"\.description"),
    ]:
        with pytest.raises(UsageError, match=field):
            Tool.from_openai(bad, where="tools[2]")


def test_tool_call_from_openai_and_ollama() -> None:
    openai = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
    assert ToolCall.from_openai(openai) == ToolCall("f", '{"a":1}', "call_1")
    assert ToolCall.from_openai(openai).to_openai() == openai
    ollama = {"function": {"name": "f", "arguments": {"a": "é"}}}
    assert ToolCall.from_openai(ollama) == ToolCall("f", '{"a": "é"}', None)
    with pytest.raises(UsageError, match=r"tool_calls\[0\]"):
        ToolCall.from_openai({"function": {"name": "f", "arguments": 3}})


def test_messages_round_trip_json_with_tool_fields() -> None:
    msgs = [
        Message(
            "assistant",
            (Think("t"), "x"),
            tool_calls=(ToolCall("f", "{}", "abcDEF123"), ToolCall("g", "[]")),
        ),
        Message("tool", "ok", tool_call_id="abcDEF123", name="f"),
        Message("user", "plain"),
    ]
    for m in msgs:
        assert Message.from_json(m.to_json()) == m
    assert "tool_calls" not in msgs[2].to_json() and "name" not in msgs[2].to_json()
    assert Message.from_json({"role": "user", "content": "old file"}) == Message("user", "old file")
    assert Message("assistant", "", tool_calls=[ToolCall("f", "{}")]).tool_calls == (
        ToolCall("f", "{}"),
    )
    with pytest.raises(ValueError):
        Message.from_json({"role": "assistant", "content": "", "tool_calls": [{"name": 1}]})


def test_gguf_template_gets_tools_and_hugging_face_shaped_calls() -> None:
    jinja = TemplateFormat(
        "{% if tools %}TOOLS={{ tools | map(attribute='function') | map(attribute='name') | join(',') }};{% endif %}"
        "{% for m in messages %}{{ m.role }}:{{ m.content }}"
        "{% for c in m.tool_calls or [] %}[{{ c.id }} {{ c.function.name }} {{ c.function.arguments.city }}]{% endfor %}"
        "{% if m.tool_call_id %}<{{ m.tool_call_id }} {{ m.name }}>{% endif %};{% endfor %}"
    )
    msgs = [U, _asst(PA), replace(result(A, "21"), name="get_weather")]
    assert template.render(jinja, msgs, TOOLS) == (
        "TOOLS=get_weather,get_time;user:Weather?;assistant:[aaaaaaaa1 get_weather Paris];"
        "tool:21<aaaaaaaa1 get_weather>;"
    )
    assert template.render(jinja, msgs[:1]) == "user:Weather?;"  # no tools: None, as HF passes


def test_prefix_stable_formats_only_append_when_a_tool_round_is_added(
    references: References,
) -> None:
    """A round of calls and results appends to the prompt of v7+ (v13+ with tools from the
    start): the KV cache of the turn before is reused."""
    for fmt in ("v7", "v11", "v13", "v15"):
        raw, _ = references(fmt)
        tokenize = _reference_tokenize(raw)
        turn1 = [U]
        turn2 = [*turn1, _asst(PA), result(A, '{"temp": 21}')]
        turn3 = [*turn2, Message("assistant", "21 °C"), Message("user", "Lyon?")]
        first, second, third = (
            template.encode(fmt, t, tokenize, tools=TOOLS) for t in (turn1, turn2, turn3)
        )
        assert second[: len(first)] == first, fmt  # the results' turn: still the last user's
        stable = fmt in TEKKEN_V13  # v7/v11 move the block to the new last user turn
        assert (third[: len(second)] == second) is stable, fmt
