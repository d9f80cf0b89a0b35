"""serve with tools, through the real `openai` and `ollama` clients: scripted models that call a
tool in their version's syntax (streamed and not, whatever the chunking), random-weight models
whose calls the grammar keeps valid for every tool_choice, the history sent back with foreign
ids, and the refusals."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest

from localmix.serve.server import Server

from .scripted_gguf import write_scripted_reply
from .served import make_store, serving, shared_home  # noqa: F401 (autouse fixture)
from .tekken_files import random_model, shipped, tekken_file

ASK = [{"role": "user", "content": "Weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "strict": True, "parameters": {
    "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"],
    "additionalProperties": False}}}  # fmt: skip
STRICT = {**WEATHER, "function": {**WEATHER["function"], "strict": True}}
GREEDY: dict[str, Any] = {"temperature": 0, "extra_body": {"repeat_penalty": 1.0}}
INST_END = 4  # [/INST], the last token of every Mistral prompt here
CALL_ID = 33  # [CALL_ID] in tekken v11
V11_ID = "a1B2c3D4e"  # the scripted v11 model's own call id
SCRIPTED = ["calls-v13", "calls-v11"]  # the "args" syntax without and with [CALL_ID]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("tools")
    v13 = write_scripted_reply(
        tmp / "v13.gguf",
        ["Let me check.", 9, "get_weather", 32, '{"city": "Paris"}'],
        after=INST_END, tekken=tekken_file("v13", tmp),
    )  # fmt: skip
    assert v13[0] != 9
    # v11 writes the call's id between its name and arguments: the model's own id is kept
    write_scripted_reply(
        tmp / "v11.gguf",
        ["Let me check.", 9, "get_weather", CALL_ID, V11_ID, 32, '{"city": "Paris"}'],
        after=INST_END, tekken=tekken_file("v11", tmp / "v11"),
    )  # fmt: skip
    random_v7 = random_model(
        tmp_path_factory.mktemp("v7"), shipped("mistral_instruct_tokenizer_241114.model.v7"), "v3"
    )
    models = {"calls-v13": tmp / "v13.gguf", "calls-v11": tmp / "v11.gguf", "random-v7": random_v7}
    formats = {"calls-v13": "v13", "calls-v11": "v11", "random-v7": "v7"}
    return make_store(tmp_path_factory.mktemp("tools-home"), models, formats)


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[Server]:
    with serving(home, ctx=1024, parallel=2, queue=4) as running:
        yield running


@pytest.fixture()
def client(server: Server) -> Any:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("model", SCRIPTED)
def test_a_scripted_call_not_streamed(client: Any, model: str) -> None:
    reply = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER],
                                           **GREEDY)  # fmt: skip
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert len(call.id) == 9 and call.id.isalnum()
    if model == "calls-v11":
        assert call.id == V11_ID


@pytest.mark.parametrize("model", SCRIPTED)
def test_a_scripted_call_streamed_in_openais_shape(client: Any, model: str) -> None:
    chunks = list(client.chat.completions.create(
        model=model, messages=ASK, tools=[WEATHER], stream=True,
        stream_options={"include_usage": True}, **GREEDY,
    ))  # fmt: skip
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    content = "".join(d.content or "" for d in deltas)
    calls = [t for d in deltas for t in d.tool_calls or []]
    assert content == "Let me check."
    first = calls[0]
    assert first.index == 0 and first.id and first.type == "function"
    assert first.function.name == "get_weather"  # the whole name in the first chunk
    assert all(t.index == 0 and t.function.name is None for t in calls[1:])
    assert json.loads("".join(t.function.arguments or "" for t in calls)) == {"city": "Paris"}
    assert len(calls) > 2  # the arguments stream in fragments
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_the_call_goes_back_with_its_result(client: Any) -> None:
    first = client.chat.completions.create(model="calls-v13", messages=ASK, tools=[WEATHER],
                                           **GREEDY)  # fmt: skip
    call = first.choices[0].message.tool_calls[0]
    for call_id in (call.id, "call_7f3a9c2e1b", "4f1c2d3e-aaaa-bbbb-cccc-1234567890ab"):
        history = [*ASK,
                   {"role": "assistant", "content": "Let me check.", "tool_calls": [
                       {"id": call_id, "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                   {"role": "tool", "tool_call_id": call_id, "content": '{"temp": 21}'}]  # fmt: skip
        again = client.chat.completions.create(
            model="calls-v13", messages=history, tools=[WEATHER], max_tokens=4, **GREEDY
        )
        assert again.usage.prompt_tokens > first.usage.prompt_tokens


def test_tool_choice_none_answers_in_text(client: Any) -> None:
    reply = client.chat.completions.create(model="calls-v13", messages=ASK, tools=[WEATHER],
                                           tool_choice="none", max_tokens=8, **GREEDY)  # fmt: skip
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].message.content.startswith("Let me check.")


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("choice", ["required", "named", "auto"])
def test_random_weights_call_validly(client: Any, choice: str, seed: int) -> None:
    tool_choice: Any = {
        "required": "required",
        "auto": "auto",
        "named": {"type": "function", "function": {"name": "get_time"}},
    }[choice]
    reply = client.chat.completions.create(
        model="random-v7", messages=ASK, tools=[STRICT, TIME], tool_choice=tool_choice,
        parallel_tool_calls=False, seed=seed, max_tokens=200,
    )  # fmt: skip
    message = reply.choices[0].message
    if choice == "auto" and not message.tool_calls:
        return  # text is allowed
    assert reply.choices[0].finish_reason == "tool_calls", message
    (call,) = message.tool_calls  # parallel_tool_calls false: one call
    args = json.loads(call.function.arguments)
    if choice == "named":
        assert call.function.name == "get_time" and args["tz"] in ("UTC", "CET")
    else:
        assert call.function.name in ("get_weather", "get_time")
        if call.function.name == "get_weather":  # strict: its schema holds
            assert isinstance(args["city"], str) and len(args["city"]) <= 12


@pytest.mark.parametrize("seed", range(3))
def test_json_schema_response_format_validates(client: Any, seed: int) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer"},
              "unit": {"enum": ["C", "F"]}}, "required": ["answer", "unit"],
              "additionalProperties": False}  # fmt: skip
    reply = client.chat.completions.create(
        model="random-v7", messages=ASK, seed=seed, max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema,
                                                                "strict": True}},
    )  # fmt: skip
    data = json.loads(reply.choices[0].message.content)
    assert isinstance(data["answer"], int) and data["unit"] in ("C", "F")


def test_ollama_tool_calls_and_capabilities(server: Server) -> None:
    client = ollama.Client(host=server.url)
    options = {"temperature": 0, "repeat_penalty": 1.0}
    reply = client.chat(model="calls-v13", messages=ASK, tools=[WEATHER], options=options)
    assert reply.message.content == "Let me check."
    (call,) = reply.message.tool_calls or []
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    parts = list(client.chat(model="calls-v13", messages=ASK, tools=[WEATHER], options=options,
                             stream=True))  # fmt: skip
    streamed = [c for p in parts for c in p.message.tool_calls or []]
    assert [(c.function.name, c.function.arguments) for c in streamed] == [
        ("get_weather", {"city": "Paris"})
    ]
    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "21 C"}]  # fmt: skip
    assert client.chat(model="calls-v13", messages=history, tools=[WEATHER],
                       options={**options, "num_predict": 2}).done  # fmt: skip
    assert "tools" in client.show("calls-v13").capabilities
    assert "thinking" in client.show("calls-v13").capabilities


BAD = [
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0]"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"messages": [*ASK, {"role": "tool", "tool_call_id": "abc123DEF", "content": "x"}]},
     "messages"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "field"), BAD)
def test_bad_tool_requests_are_400s_naming_the_field(
    client: Any, extra: dict[str, Any], field: str
) -> None:
    body = {"model": "calls-v13", "messages": ASK, **extra}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**body)
    assert field in str(caught.value)
