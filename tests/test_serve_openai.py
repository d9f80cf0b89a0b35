"""serve, OpenAI's API, through the real `openai` client against a server on 127.0.0.1: chat and
completions, streamed and not, stop strings, seeds, concurrent requests sharing one model through
continuous batching, cancellation, and bad requests with OpenAI's error bodies."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from localmix.serve.server import Server

from .served import (  # noqa: F401 (autouse fixture)
    BANG,
    BOS,
    HELLO,
    LOOP,
    eventually,
    make_store,
    scripted_chat_gguf,
    serving,
    shared_home,
)

HI = [{"role": "user", "content": "Hi"}]
GREEDY: dict[str, Any] = {"temperature": 0, "extra_body": {"repeat_penalty": 1.0}}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, tiny_mistral_gguf_f16: Path) -> Path:
    scripted = scripted_chat_gguf(tmp_path_factory.mktemp("scripted") / "scripted.gguf")
    store = tmp_path_factory.mktemp("serve-home")
    # the tiny model also under the name `localmix pull mistral` gives the catalog's model
    models = {"tiny": tiny_mistral_gguf_f16, "mistral:v0.3": tiny_mistral_gguf_f16}
    return make_store(store, {**models, "scripted": scripted})


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[Server]:
    with serving(home, parallel=4, queue=8) as running:
        yield running


@pytest.fixture()
def client(server: Server) -> Any:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def chat_text(client: Any, model: str = "tiny", **kwargs: Any) -> tuple[str, Any]:
    """(reply text, the whole response) of a non-streamed chat request."""
    response = client.chat.completions.create(model=model, **{"messages": HI, **kwargs})
    return response.choices[0].message.content, response


def stream_text(client: Any, model: str = "tiny", **kwargs: Any) -> tuple[str, list[Any]]:
    """(reply text, every chunk) of a streamed chat request."""
    chunks = list(
        client.chat.completions.create(model=model, stream=True, **{"messages": HI, **kwargs})
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_a_reply_streamed_and_not_is_the_same(client: Any) -> None:
    whole, response = chat_text(client, max_tokens=12, **GREEDY)
    streamed, chunks = stream_text(client, max_tokens=12, **GREEDY)
    assert whole and streamed == whole
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 12
    assert response.usage.total_tokens == response.usage.prompt_tokens + 12
    assert chunks[0].choices[0].delta.role == "assistant"
    last = chunks[-1]
    assert last.choices[0].finish_reason == "length" and last.usage.completion_tokens == 12
    assert last.usage.prompt_tokens == response.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert {c.id for c in chunks} == {chunks[0].id} and response.object == "chat.completion"


def test_the_scripted_reply_ends_at_end_of_generation(client: Any) -> None:
    text, response = chat_text(client, "scripted", **GREEDY)
    assert text == "Hello world!"
    assert response.choices[0].finish_reason == "stop" and response.usage.completion_tokens == 3


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_end_the_reply_before_them(client: Any, stream: bool) -> None:
    ask = stream_text if stream else chat_text
    text, _ = ask(client, "scripted", stop=["world"], **GREEDY)
    assert text == "Hello "
    text, _ = ask(client, "scripted", stop="!", **GREEDY)
    assert text == "Hello world"
    text, _ = ask(client, "scripted", stop=["nowhere", "lo w"], **GREEDY)
    assert text == "Hel"


def test_include_usage_sends_openais_usage_chunk_last(client: Any) -> None:
    _, chunks = stream_text(client, max_tokens=4, stream_options={"include_usage": True}, **GREEDY)
    *rest, finish, usage = chunks
    assert usage.choices == [] and usage.usage.completion_tokens == 4
    assert finish.choices[0].finish_reason == "length" and finish.usage is None
    assert all(c.usage is None for c in rest)


def test_completions_take_text_or_token_ids(client: Any) -> None:
    by_text = client.completions.create(model="scripted", prompt="x", max_tokens=4, **GREEDY)
    assert by_text.object == "text_completion" and by_text.usage.completion_tokens <= 4
    loop = client.completions.create(
        model="scripted", prompt=[BOS, LOOP[0]], max_tokens=6, **GREEDY
    )
    assert loop.choices[0].finish_reason == "length" and loop.usage.prompt_tokens == 2
    streamed = client.completions.create(
        model="scripted", prompt=[BOS, LOOP[0]], max_tokens=6, stream=True, **GREEDY
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == loop.choices[0].text


def test_chat_logprobs_streamed_and_not(client: Any) -> None:
    _, whole = chat_text(client, max_tokens=8, logprobs=True, top_logprobs=3, **GREEDY)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the pick is the most likely
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    _, chunks = stream_text(client, max_tokens=8, logprobs=True, top_logprobs=3, **GREEDY)
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]  # fmt: skip
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [
        (e.token, round(e.logprob, 4)) for e in content
    ]
    _, plain = chat_text(client, max_tokens=2, **GREEDY)
    assert plain.choices[0].logprobs is None


def test_scripted_logprobs_are_certain(client: Any) -> None:
    _, whole = chat_text(client, "scripted", logprobs=True, **GREEDY)
    content = whole.choices[0].logprobs.content
    assert [e.token for e in content] == [" Hello", " world", "!"]
    assert all(e.logprob == pytest.approx(0.0, abs=1e-3) and e.top_logprobs == [] for e in content)


def test_logit_bias_changes_the_reply(client: Any) -> None:
    text, _ = chat_text(client, "scripted", **GREEDY)
    assert text == "Hello world!"
    gen = {"temperature": 0, "extra_body": {"repeat_penalty": 1.0, "ignore_eos": True}}
    banned, _ = chat_text(client, "scripted", max_tokens=3, logit_bias={str(HELLO): -100}, **gen)
    assert not banned.startswith("Hello")
    forced, _ = chat_text(client, "scripted", max_tokens=3, logit_bias={str(BANG): 100}, **gen)
    assert forced == "!!!"


def test_completion_logprobs_in_the_legacy_shape(client: Any) -> None:
    got = client.completions.create(
        model="scripted", prompt=[BOS, LOOP[0]], max_tokens=4, logprobs=2, **GREEDY
    )
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == got.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    assert all(len(top) == 2 and max(top.values()) == pytest.approx(p, abs=1e-3)
               for top, p in zip(lp.top_logprobs, lp.token_logprobs, strict=True))  # fmt: skip
    streamed = client.completions.create(
        model="scripted", prompt=[BOS, LOOP[0]], max_tokens=4, logprobs=2, stream=True, **GREEDY
    )
    pieces = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    assert [t for p in pieces for t in p.tokens] == lp.tokens
    assert [o for p in pieces for o in p.text_offset] == lp.text_offset


def test_token_ids_come_back_when_asked(client: Any) -> None:
    response = client.chat.completions.create(
        model="scripted", messages=HI, temperature=0, extra_body={"return_token_ids": True}
    )
    extra = response.model_extra
    assert extra["prompt_token_ids"][0] == BOS and len(extra["prompt_token_ids"]) == (
        response.usage.prompt_tokens
    )
    assert response.choices[0].model_extra["token_ids"] == [22557, 1526, 28808]


def test_a_seed_makes_sampling_reproducible(client: Any) -> None:
    sampled = {"temperature": 1.5, "top_p": 1.0, "max_tokens": 16}
    first, _ = chat_text(client, seed=11, **sampled)
    again, _ = chat_text(client, seed=11, **sampled)
    other, _ = chat_text(client, seed=12, **sampled)
    assert first == again != other


def test_concurrent_requests_get_the_replies_they_get_alone(client: Any) -> None:
    asks = [f"Question number {i}, about {'x' * i}" for i in range(6)]
    alone = [
        chat_text(client, messages=[{"role": "user", "content": q}], max_tokens=10, **GREEDY)[0]
        for q in asks
    ]
    together: dict[int, str] = {}

    def ask(i: int) -> None:
        messages = [{"role": "user", "content": asks[i]}]
        together[i] = stream_text(client, messages=messages, max_tokens=10, **GREEDY)[0]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [together[i] for i in range(len(asks))] == alone


def test_a_new_request_joins_one_that_is_generating(client: Any, server: Server) -> None:
    long = client.completions.create(
        model="scripted", prompt=[BOS, LOOP[0]], max_tokens=400, stream=True, **GREEDY
    )
    seen = 0
    for _ in long:
        seen += 1
        if seen == 3:
            short, _ = chat_text(client, "scripted", **GREEDY)  # answered while long goes on
            assert short == "Hello world!"
            worker = server.registry.find_loaded("scripted").worker
            assert worker.state().active == 1  # the long one, still generating
    assert seen >= 400


def test_a_client_that_leaves_stops_its_generation_and_frees_its_cells(
    client: Any, server: Server
) -> None:
    prompt = [BOS, LOOP[0], LOOP[1], LOOP[0], LOOP[1], LOOP[0]]
    chat_text(client, "scripted", max_tokens=1)  # loaded
    worker = server.registry.find_loaded("scripted").worker
    before = worker.finished["interrupted"]
    stream = client.completions.create(
        model="scripted", prompt=prompt, max_tokens=500, stream=True, **GREEDY
    )
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    assert eventually(lambda: worker.finished["interrupted"] == before + 1)
    assert eventually(lambda: worker.state().active == 0)
    state = worker.state()
    for kv, cells in zip(state.kv, state.cells, strict=True):
        assert kv[: len(prompt)] != tuple(prompt)  # nobody holds it
        assert cells == len(kv)  # llama.cpp agrees


def test_the_names_that_pulled_a_model_address_it(
    client: Any, server: Server, tiny_mistral_gguf_f16: Path
) -> None:
    expected, _ = chat_text(client, "tiny", max_tokens=4, **GREEDY)
    for name in ("mistral", "mistral:latest", "mistral:v0.3", "mistral:v0.3:F16"):
        assert chat_text(client, name, max_tokens=4, **GREEDY)[0] == expected, name
    # two names of one file: one loaded copy
    loaded = [m for m in server.registry.running() if m.key == tiny_mistral_gguf_f16.resolve()]
    assert len(loaded) == 1


def test_models_lists_the_store(client: Any) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"tiny:F16", "scripted:F32"} <= ids
    assert client.models.retrieve("tiny:F16").owned_by == "localmix"


# -- bad requests ------------------------------------------------------------------------------

BAD = [
    # (body, status, OpenAI error code, text in the message)
    (b"{not json", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "JSON object"),
    ({"model": "tiny"}, 400, None, "messages"),
    ({"model": "tiny", "messages": HI, "temperature": 3}, 400, None, "temperature"),
    ({"model": "tiny", "messages": HI, "max_tokens": -1}, 400, None, "max_tokens"),
    ({"model": "tiny", "messages": HI, "n": 2}, 400, None, "n must be 1"),
    ({"model": "tiny", "messages": HI, "logprobs": 3}, 400, None, "true or false"),
    ({"model": "tiny", "messages": HI, "logprobs": True, "top_logprobs": 21}, 400, None,
     "top_logprobs"),
    ({"model": "tiny", "messages": HI, "presence_penalty": 0.5}, 400, None, "presence_penalty"),
    ({"model": "tiny", "messages": HI, "tools": [{"type": "function"}]}, 400, None, "tools"),
    ({"model": "tiny", "messages": [{"role": "tool", "content": "x"}]}, 400, None, "role"),
    ({"model": "tiny", "messages": []}, 400, None, "empty"),
    ({"model": "tiny", "messages": HI, "stop": ["a"] * 17}, 400, None, "stop"),
    ({"model": "tiny", "messages": HI, "max_tokens": 0}, 400, None, "max_tokens"),
    ({"model": "tiny", "messages": HI, "max_completion_tokens": 0}, 400, None,
     "max_completion_tokens"),
    ({"model": "tiny", "messages": HI, "logit_bias": {"hello": -100}}, 400, None, "logit_bias"),
    ({"model": "tiny", "messages": HI, "logit_bias": {"32000": 1}}, 400, None, "token id"),
    ({"model": "tiny", "messages": HI, "logit_bias": {"5": 101}}, 400, None, "[-100, 100]"),
    ({"model": "tiny", "messages": HI, "logit_bias": {"5": "x"}}, 400, None, "logit_bias.5"),
    ({"model": "tiny", "messages": HI, "top_logprobs": 2}, 400, None, "top_logprobs"),
    ({"model": "tiny", "messages": HI, "tool_choice": "auto"}, 400, None, "tool_choice"),
    ({"model": "tiny", "messages": HI, "functions": [{"name": "f"}]}, 400, None, "functions"),
    ({"model": "tiny", "messages": HI, "function_call": "auto"}, 400, None, "function_call"),
    ({"model": "tiny", "messages": HI, "mirostat": 2}, 400, None, "mirostat"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}', 400, None,
     "messages.0.content"),
    ({"model": "nope", "messages": HI}, 404, "model_not_found", "nope"),
    ({"model": "/etc/passwd", "messages": HI}, 404, "model_not_found", "not in the store"),
    (
        {"model": "tiny", "messages": [{"role": "user", "content": "word " * 600}]},
        400, "context_length_exceeded", "context holds",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("body", "status", "code", "text"), BAD)
def test_bad_requests_get_openais_error_body(
    server: Server, body: Any, status: int, code: str | None, text: str
) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(
        server.url + "/v1/chat/completions", content=raw,
        headers={"content-type": "application/json"}, timeout=30,
    )  # fmt: skip
    assert response.status_code == status
    error = response.json()["error"]
    assert text in error["message"] and error["code"] == code
    assert error["type"] == "invalid_request_error"
    if isinstance(body, dict) and text in body and text != "messages":
        assert error["param"] == text  # the field the client got wrong


def test_a_client_cannot_open_files_by_path(client: Any, tiny_mistral_gguf_f16: Path) -> None:
    """Only names from the store or given at start: never a file an HTTP client points at."""
    for name in (str(tiny_mistral_gguf_f16), "model.F16.gguf"):
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=name, messages=HI, max_tokens=1)


def test_the_openai_client_raises_its_own_errors(client: Any) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=HI)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=HI, temperature=9)


def test_a_body_over_the_limit_is_413(server: Server) -> None:
    from localmix.serve.app import MAX_BODY

    response = httpx.post(
        server.url + "/v1/completions", content=b" " * (MAX_BODY + 1),
        headers={"content-type": "application/json"}, timeout=30,
    )  # fmt: skip
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


# -- a busy server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def busy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One sequence, one place in the queue, a context of 16k tokens: a reply that loops takes
    seconds, long enough to see requests wait and be refused."""
    scripted = scripted_chat_gguf(tmp_path_factory.mktemp("long") / "long.gguf", n_ctx=16384)
    home = tmp_path_factory.mktemp("busy-home")  # the model is named at start, by its path
    with serving(home, ctx=16384, named={"long": scripted}, parallel=1, queue=1) as running:
        yield running


def test_a_full_queue_is_503_and_a_queued_client_that_leaves_frees_its_place(
    busy: Server,
) -> None:
    client = openai.OpenAI(base_url=busy.url + "/v1", api_key="unused", max_retries=0)
    running = client.completions.create(
        model="long", prompt=[BOS, LOOP[0]], max_tokens=16000, stream=True, **GREEDY
    )
    next(iter(running))
    worker = busy.registry.find_loaded("long").worker
    # a second request waits for the one sequence; the client gives up before it gets it
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=1.0).completions.create(
            model="long", prompt=[BOS, LOOP[0]], max_tokens=5, **GREEDY
        )
    assert eventually(lambda: worker.load == 1)  # its place in the queue is free again
    waiting = threading.Thread(
        target=lambda: client.with_options(timeout=30).completions.create(
            model="long", prompt=[BOS], max_tokens=1
        )
    )
    waiting.start()
    assert eventually(lambda: worker.load == 2)
    with pytest.raises(openai.InternalServerError) as refused:
        client.completions.create(model="long", prompt=[BOS], max_tokens=1)
    assert refused.value.status_code == 503
    assert refused.value.body["code"] == "server_busy"
    running.close()  # the long one stops; the waiting one gets the sequence
    waiting.join()
    assert worker.finished["interrupted"] >= 1
    assert eventually(lambda: worker.load == 0)
