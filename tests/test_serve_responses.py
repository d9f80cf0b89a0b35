"""OpenAI's Responses API (/v1/responses) through the real `openai` client: text, thinking and
tool calls as output items, streamed (the SDK's own accumulator checks every event's order and
identity) and not; the prompt is the one chat completions builds for the same conversation;
previous_response_id continues a kept response; text.format and tool_choice hold even on random
weights; and the refusals, each a 400 naming its field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from localmix.serve.server import Server

from .scripted_gguf import write_scripted_gguf, write_scripted_replies, write_scripted_reply
from .served import make_store, scripted_chat_gguf, serving, shared_home  # noqa: F401
from .tekken_files import random_model, shipped, tekken_file
from .test_reasoning import ANSWER, SCRIPT, THOUGHT, THOUGHT_TOKENS, VOCAB
from .test_serve_tools import INST_END, STRICT, TIME, WEATHER

ASK = "Weather in Paris?"
TOOL_RESULTS_END = 8  # [/TOOL_RESULTS] in tekken v13: the last token of a prompt after a result
ANSWERED = "Sunny, 21 degrees"
TOOL = {"type": "function", **WEATHER["function"]}  # the Responses API's flat shape
GREEDY: dict[str, Any] = {"temperature": 0, "extra_body": {"repeat_penalty": 1.0}}


def flat(tool: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", **tool["function"]}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("responses")
    write_scripted_reply(
        tmp / "v13.gguf",
        ["Let me check.", 9, "get_weather", 32, '{"city": "Paris"}'],
        after=INST_END, tekken=tekken_file("v13", tmp),
    )  # fmt: skip
    write_scripted_replies(
        tmp / "agent.gguf",
        {INST_END: [9, "get_weather", 32, '{"city": "Paris"}'], TOOL_RESULTS_END: [ANSWERED]},
        tekken=tekken_file("v13", tmp / "agent"), n_ctx=2048,
    )  # fmt: skip
    think_tokenizer = tekken_file("v13", tmp / "think", vocab_size=VOCAB)
    write_scripted_gguf(tmp / "think.gguf", SCRIPT, tekken=think_tokenizer)
    random_v7 = random_model(
        tmp_path_factory.mktemp("v7"), shipped("mistral_instruct_tokenizer_241114.model.v7"), "v3"
    )
    models = {"calls-v13": tmp / "v13.gguf", "think": tmp / "think.gguf",
              "random-v7": random_v7, "hello": scripted_chat_gguf(tmp / "hello.gguf"),
              "agent-v13": tmp / "agent.gguf"}  # fmt: skip
    formats = {"calls-v13": "v13", "think": "v13", "random-v7": "v7", "agent-v13": "v13"}
    return make_store(tmp_path_factory.mktemp("responses-home"), models, formats)


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[Server]:
    with serving(home, ctx=2048, parallel=2, queue=4) as running:
        yield running


@pytest.fixture()
def client(server: Server) -> Any:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def chat_prompt_tokens(client: Any, model: str, messages: list[Any], **extra: Any) -> int:
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=1, **extra)
    return reply.usage.prompt_tokens


def test_text_not_streamed(client: Any) -> None:
    reply = client.responses.create(model="hello", input="Hi", **GREEDY)
    assert reply.status == "completed" and reply.object == "response"
    assert reply.id.startswith("resp_")
    (item,) = reply.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert reply.output_text == "Hello world!"
    assert reply.usage.output_tokens == 3  # Hello world ! (the end token is not counted)
    assert reply.usage.input_tokens == chat_prompt_tokens(
        client, "hello", [{"role": "user", "content": "Hi"}]
    )


def test_instructions_are_the_system_prompt(client: Any) -> None:
    reply = client.responses.create(
        model="calls-v13", instructions="Be brief.", input=[{"role": "user", "content": ASK}],
        max_output_tokens=1, **GREEDY,
    )  # fmt: skip
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": ASK}]
    assert reply.usage.input_tokens == chat_prompt_tokens(client, "calls-v13", messages)


def test_text_streamed_through_the_sdks_accumulator(client: Any) -> None:
    with client.responses.stream(model="hello", input="Hi", **GREEDY) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == "Hello world!" and len(deltas) > 1
    assert final.output_text == "Hello world!" and final.usage.output_tokens == 3
    for kind in ("output_item.added", "content_part.added", "output_text.done",
                 "content_part.done", "output_item.done"):  # fmt: skip
        assert kinds.count(f"response.{kind}") == 1, kind


def test_a_tool_call_not_streamed(client: Any) -> None:
    reply = client.responses.create(model="calls-v13", input=ASK, tools=[TOOL], **GREEDY)
    message, call = reply.output
    assert message.type == "message" and reply.output_text == "Let me check."
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    assert len(call.call_id) == 9 and call.call_id.isalnum() and call.id.startswith("fc_")


def test_a_tool_call_streamed(client: Any) -> None:
    with client.responses.stream(model="calls-v13", input=ASK, tools=[TOOL], **GREEDY) as stream:
        events = list(stream)
        final = stream.get_final_response()
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert [i.type for i in added] == ["message", "function_call"]
    assert added[1].name == "get_weather" and added[1].arguments == ""  # the whole name first
    fragments = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(fragments) > 2 and json.loads("".join(fragments)) == {"city": "Paris"}
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done.arguments == "".join(fragments)
    call = final.output[1]
    assert call.call_id == added[1].call_id and json.loads(call.arguments) == {"city": "Paris"}


def test_results_go_back_as_chat_would_send_them(client: Any) -> None:
    """function_call and function_call_output items, with any client's ids, make the prompt
    that chat completions makes of the same turns."""
    for call_id in ("call_7f3a9c2e1b", "4f1c2d3e-aaaa-bbbb-cccc-1234567890ab"):
        items = [
            {"role": "user", "content": ASK},
            {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "Let me check."}]},
            {"type": "function_call", "call_id": call_id, "name": "get_weather",
             "arguments": '{"city": "Paris"}'},
            {"type": "function_call_output", "call_id": call_id, "output": '{"temp": 21}'},
        ]  # fmt: skip
        reply = client.responses.create(
            model="calls-v13", input=items, tools=[TOOL], max_output_tokens=2, **GREEDY
        )
        messages = [
            {"role": "user", "content": ASK},
            {"role": "assistant", "content": "Let me check.", "tool_calls": [
                {"id": call_id, "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": call_id, "content": '{"temp": 21}'},
        ]  # fmt: skip
        expected = chat_prompt_tokens(client, "calls-v13", messages, tools=[WEATHER])
        assert reply.usage.input_tokens == expected


def test_previous_response_id_continues_a_kept_response(client: Any, server: Server) -> None:
    first = client.responses.create(model="calls-v13", input=ASK, tools=[TOOL], **GREEDY)
    call = first.output[1]
    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 21}'}
    again = client.responses.create(
        model="calls-v13", previous_response_id=first.id, input=[result], tools=[TOOL],
        max_output_tokens=2, **GREEDY,
    )  # fmt: skip
    whole = [{"role": "user", "content": ASK}, *[o.model_dump() for o in first.output], result]
    sent_whole = client.responses.create(
        model="calls-v13", input=whole, tools=[TOOL], max_output_tokens=2, **GREEDY
    )
    assert again.previous_response_id == first.id
    assert again.usage.input_tokens == sent_whole.usage.input_tokens > first.usage.input_tokens
    fetched = httpx.get(f"{server.url}/v1/responses/{first.id}", timeout=10).json()
    assert fetched["id"] == first.id and fetched["output"][1]["call_id"] == call.call_id
    assert httpx.delete(f"{server.url}/v1/responses/{first.id}", timeout=10).json()["deleted"]
    gone = httpx.get(f"{server.url}/v1/responses/{first.id}", timeout=10)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"


def test_store_false_keeps_nothing(client: Any) -> None:
    first = client.responses.create(model="hello", input="Hi", store=False, **GREEDY)
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="hello", input="Hi", previous_response_id=first.id)
    assert "previous_response_id" in str(caught.value)


def test_max_output_tokens_cuts_it_incomplete(client: Any) -> None:
    reply = client.responses.create(model="hello", input="Hi", max_output_tokens=2, **GREEDY)
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"
    assert reply.output_text == "Hello world" and reply.output[0].status == "incomplete"
    with client.responses.stream(
        model="hello", input="Hi", max_output_tokens=2, **GREEDY
    ) as stream:  # fmt: skip
        assert list(stream)[-1].type == "response.incomplete"


def test_thinking_is_a_reasoning_item(client: Any) -> None:
    reply = client.responses.create(model="think", input="What is 2 + 2?",
                                    reasoning={"effort": "high"}, **GREEDY)  # fmt: skip
    reasoning, message = reply.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == THOUGHT
    assert message.type == "message" and reply.output_text == ANSWER
    assert reply.usage.output_tokens_details.reasoning_tokens == THOUGHT_TOKENS
    with client.responses.stream(model="think", input="What is 2 + 2?",
                                 reasoning={"effort": "high"}, **GREEDY) as stream:  # fmt: skip
        events = list(stream)
    thought = [e.delta for e in events if e.type == "response.reasoning_text.delta"]
    assert "".join(thought) == THOUGHT
    assert stream.get_final_response().output_text == ANSWER


def test_logprobs_come_with_the_text(client: Any) -> None:
    reply = client.responses.create(model="hello", input="Hi", top_logprobs=2,
                                    include=["message.output_text.logprobs"], **GREEDY)  # fmt: skip
    entries = reply.output[0].content[0].logprobs
    assert "".join(e.token for e in entries).strip() == "Hello world!"
    assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 99}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                               "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
]  # fmt: skip


@pytest.mark.parametrize("schema", SCHEMAS)
@pytest.mark.parametrize("seed", [1, 2])
def test_text_format_holds_on_random_weights(client: Any, schema: Any, seed: int) -> None:
    reply = client.responses.create(
        model="random-v7", input="Tell me.", temperature=1.0, max_output_tokens=120,
        text={"format": {"type": "json_schema", "name": "out", "schema": schema, "strict": True}},
        extra_body={"seed": seed},
    )  # fmt: skip
    assert reply.status == "completed", reply.output_text
    jsonschema.validate(json.loads(reply.output_text), schema)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "get_time"}])
def test_tool_choice_holds_on_random_weights(client: Any, choice: Any) -> None:
    reply = client.responses.create(
        model="random-v7", input=ASK, tools=[flat(STRICT), flat(TIME)], tool_choice=choice,
        temperature=1.0, max_output_tokens=120, parallel_tool_calls=False,
        extra_body={"seed": 3},
    )  # fmt: skip
    calls = [o for o in reply.output if o.type == "function_call"]
    assert len(calls) == 1
    if isinstance(choice, dict):
        assert calls[0].name == "get_time"
    schema = {"get_weather": STRICT, "get_time": TIME}[calls[0].name]["function"]["parameters"]
    jsonschema.validate(json.loads(calls[0].arguments), schema)


BAD = [
    ({"background": True}, "background"),
    ({"truncation": "auto"}, "truncation"),
    ({"max_tool_calls": 2, "tools": [TOOL]}, "max_tool_calls"),
    ({"include": ["file_search_call.results"]}, "include"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "name": "bad name"}]}, "tools[0].name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"text": {"format": {"type": "xml"}}}, "text.format"),
    ({"text": {"verbosity": "low"}}, "text.verbosity"),
    ({"input": [{"type": "web_search_call", "id": "x"}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0]"),
    ({"input": [{"role": "robot", "content": "hi"}]}, "input[0].role"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
    ({"previous_response_id": "resp_nosuch"}, "previous_response_id"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"conversation": "conv_1"}, "conversation"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "field"), BAD)
def test_bad_requests_are_400s_naming_the_field(
    server: Server, extra: dict[str, Any], field: str
) -> None:
    body = {"model": "calls-v13", "input": ASK, **extra}
    reply = httpx.post(server.url + "/v1/responses", json=body, timeout=10)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert field in error["message"] and field.startswith(error["param"].split("[")[0])


@pytest.mark.slow
@pytest.mark.parametrize("streamed", [False, True])
def test_the_openai_agents_sdk_runs_a_tool_and_answers(server: Server, streamed: bool) -> None:
    """The OpenAI Agents SDK's default model class speaks only the Responses API: its agent loop
    calls the tool the model asked for, sends the result back, and ends with the answer."""
    import asyncio

    import agents

    ran: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        ran.append(city)
        return "sunny, 21 degrees"

    agents.set_tracing_disabled(True)  # the SDK would export traces to OpenAI otherwise
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    model = agents.OpenAIResponsesModel(model="agent-v13", openai_client=client)
    settings = agents.ModelSettings(temperature=0, extra_body={"repeat_penalty": 1.0})
    agent = agents.Agent(name="weather", instructions="Answer briefly.", tools=[get_weather],
                         model=model, model_settings=settings)  # fmt: skip

    async def run_streamed() -> Any:
        result = agents.Runner.run_streamed(agent, ASK, max_turns=3)
        async for _ in result.stream_events():
            pass
        return result

    if streamed:
        result = asyncio.run(run_streamed())
    else:
        result = agents.Runner.run_sync(agent, ASK, max_turns=3)
    assert ran == ["Paris"]
    assert result.final_output == ANSWERED
