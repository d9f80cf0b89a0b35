"""serve, Ollama's API, through the real `ollama` client against a server on 127.0.0.1: chat and
generate streamed (NDJSON) and not, options, keep_alive, loading and unloading, two models at
once, eviction by model count and by memory, /api/ps, /api/show, /api/tags and errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from localmix.serve.client import running
from localmix.serve.ollama import keep_alive_seconds
from localmix.serve.server import Server

from .scripted_gguf import write_scripted_gguf
from .served import BOS, eventually, make_store, scripted_chat_gguf, serving, shared_home  # noqa: F401 (autouse fixture)

HI = [{"role": "user", "content": "Hi"}]
GREEDY: dict[str, Any] = {"temperature": 0, "repeat_penalty": 1.0}


@pytest.fixture(scope="module")
def home(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_mistral_gguf_f16: Path,
    tiny_mixtral_gguf_f16: Path,
) -> Path:
    scripted = scripted_chat_gguf(tmp_path_factory.mktemp("scripted") / "scripted.gguf")
    models = {"tiny": tiny_mistral_gguf_f16, "tiny-mixtral": tiny_mixtral_gguf_f16}
    return make_store(tmp_path_factory.mktemp("serve-home"), {**models, "scripted": scripted})


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[Server]:
    with serving(home, parallel=2, queue=4) as started:
        yield started


@pytest.fixture()
def client(server: Server) -> ollama.Client:
    return ollama.Client(host=server.url)


def loaded(client: ollama.Client) -> set[str]:
    return {m.model for m in client.ps().models}


def test_chat_streamed_and_not_is_the_same_reply(client: ollama.Client) -> None:
    options = {**GREEDY, "num_predict": 12}
    whole = client.chat(model="tiny", messages=HI, options=options)
    parts = list(client.chat(model="tiny", messages=HI, options=options, stream=True))
    assert (
        whole.message.content and "".join(p.message.content for p in parts) == whole.message.content
    )
    assert whole.done and whole.done_reason == "length" and whole.eval_count == 12
    assert whole.prompt_eval_count and whole.prompt_eval_count > 0
    assert whole.total_duration and whole.total_duration >= whole.prompt_eval_duration
    *pieces, last = parts
    assert not any(p.done for p in pieces) and last.done and last.eval_count == 12
    assert whole.model == "tiny" and whole.message.role == "assistant"


def test_the_scripted_reply_and_stop_strings(client: ollama.Client) -> None:
    reply = client.chat(model="scripted", messages=HI, options=GREEDY)
    assert (reply.message.content, reply.done_reason) == ("Hello world!", "stop")
    stopped = client.chat(model="scripted", messages=HI, options={**GREEDY, "stop": ["world"]})
    assert stopped.message.content == "Hello "
    short = client.chat(model="scripted", messages=HI, options={**GREEDY, "num_predict": 2})
    assert (short.message.content, short.done_reason) == ("Hello world", "length")


def test_generate_through_the_chat_format_or_raw(client: ollama.Client) -> None:
    templated = client.generate(model="scripted", prompt="Hi", options=GREEDY)
    assert templated.response == "Hello world!"
    raw = client.generate(model="scripted", prompt="[INST] Hi [/INST]", raw=True, options=GREEDY)
    assert raw.response == " Hello world!"  # a raw completion keeps the first piece's space
    assert raw.context[0] == BOS and raw.context[-3:] == [22557, 1526, 28808]
    assert templated.context == raw.context  # v1 writes [INST] as text: the same tokens
    streamed = list(client.generate(model="scripted", prompt="Hi", options=GREEDY, stream=True))
    assert "".join(p.response for p in streamed) == "Hello world!" and streamed[-1].done


def test_a_system_prompt_is_part_of_the_prompt(client: ollama.Client) -> None:
    plain = client.generate(model="scripted", prompt="Hi", options=GREEDY)
    told = client.generate(model="scripted", prompt="Hi", system="Be brief.", options=GREEDY)
    assert told.prompt_eval_count > plain.prompt_eval_count


def test_seeded_sampling_repeats(client: ollama.Client) -> None:
    options = {"temperature": 1.5, "top_p": 1.0, "num_predict": 16}
    first = client.chat(model="tiny", messages=HI, options={**options, "seed": 5})
    again = client.chat(model="tiny", messages=HI, options={**options, "seed": 5})
    assert first.message.content == again.message.content


def test_empty_requests_load_and_keep_alive_zero_unloads(client: ollama.Client) -> None:
    client.generate(model="scripted", keep_alive=0)
    assert "scripted:F32" not in loaded(client)
    load = client.generate(model="scripted")
    assert load.done and load.done_reason == "load" and "scripted:F32" in loaded(client)
    unload = client.generate(model="scripted", keep_alive=0)
    assert unload.done_reason == "unload"
    assert eventually(lambda: "scripted:F32" not in loaded(client))
    assert client.chat(model="scripted", messages=[]).done_reason == "load"
    assert "scripted:F32" in loaded(client)


def test_keep_alive_unloads_after_its_time(client: ollama.Client) -> None:
    client.chat(model="tiny", messages=HI, options={"num_predict": 1}, keep_alive="1s")
    (entry,) = [m for m in client.ps().models if m.model == "tiny:F16"]
    assert entry.expires_at is not None and entry.size > 0 and entry.size_vram == 0
    assert eventually(lambda: "tiny:F16" not in loaded(client), timeout=5)
    client.chat(model="tiny", messages=HI, options={"num_predict": 1}, keep_alive=-1)
    (entry,) = [m for m in client.ps().models if m.model == "tiny:F16"]
    assert entry.expires_at.year > 2200  # forever


def test_two_models_are_served_at_once(client: ollama.Client, server: Server) -> None:
    a = client.chat(model="tiny", messages=HI, options={"num_predict": 3})
    b = client.chat(model="tiny-mixtral", messages=HI, options={"num_predict": 3})
    assert a.model == "tiny" and b.model == "tiny-mixtral"
    assert {"tiny:F16", "tiny-mixtral:F16"} <= loaded(client)
    names = {m.name: m for m in running(server.url)}  # what `localmix ps` shows
    assert {"tiny:F16", "tiny-mixtral:F16"} <= set(names)
    assert names["tiny:F16"].context_length == 512 and names["tiny:F16"].parallel == 2


def test_show_and_tags(client: ollama.Client) -> None:
    shown = client.show("tiny")
    assert shown.details.family == "llama" and shown.details.quantization_level == "F16"
    assert shown.modelinfo["llama.context_length"] == 2048 and shown.template == "v1"
    tags = {m.model for m in client.list().models}
    assert {"tiny:F16", "tiny-mixtral:F16", "scripted:F32"} <= tags


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_another_familys_model_gets_its_own_gguf_template(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Only Mistral formats are localmix's own: a GGUF with a ChatML template is prompted with it."""
    path = tmp_path_factory.mktemp("chatml") / "chatml.gguf"
    write_scripted_gguf(path, {BOS: 22557}, chat_template=CHATML)
    with serving(tmp_path_factory.mktemp("chatml-home"), named={"chatml": path}) as started:
        reply = httpx.post(
            started.url + "/v1/chat/completions", timeout=30,
            json={"model": "chatml", "messages": HI, "max_tokens": 1, "return_token_ids": True},
        )  # fmt: skip
        model = started.registry.find_loaded("chatml")
        prompt = reply.json()["prompt_token_ids"]
        text = model.engine.detokenize(prompt)
    assert model.profile.format.name == "gguf-template" and prompt[0] == BOS
    assert text.strip() == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant"


def test_ollama_names_with_latest_resolve(client: ollama.Client) -> None:
    assert client.chat(model="scripted:latest", messages=HI, options=GREEDY).message.content


def test_logprobs_streamed_and_not(client: ollama.Client) -> None:
    options = {**GREEDY, "num_predict": 6}
    whole = client.chat(model="tiny", messages=HI, options=options, logprobs=True, top_logprobs=2)
    assert whole.logprobs is not None and len(whole.logprobs) == whole.eval_count == 6
    for entry in whole.logprobs:
        assert entry.logprob <= 0 and entry.top_logprobs is not None
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token
    parts = client.chat(
        model="tiny", messages=HI, options=options, logprobs=True, top_logprobs=2, stream=True
    )
    streamed = [e for p in parts for e in p.logprobs or []]
    assert [e.token for e in streamed] == [e.token for e in whole.logprobs]
    made = client.generate(model="scripted", prompt="x", raw=True, options=GREEDY, logprobs=True)
    assert made.logprobs is not None
    assert len(made.logprobs) == made.eval_count
    plain = client.chat(model="tiny", messages=HI, options=options)
    assert plain.logprobs is None


BAD = [
    # (route, body, status, text in the error)
    ("/api/chat", {"model": "nope", "messages": HI}, 404, "nope"),
    ("/api/generate", {"model": "nope", "prompt": "x"}, 404, "nope"),
    ("/api/generate", {"model": "nope", "keep_alive": 0}, 404, "nope"),
    ("/api/show", {"model": "nope"}, 404, "nope"),
    ("/api/chat", {"model": "tiny", "messages": "Hi"}, 400, "messages"),
    ("/api/chat", {"model": "tiny", "messages": HI, "options": {"temperature": "hot"}}, 400,
     "temperature"),
    ("/api/chat", {"model": "tiny", "messages": HI, "keep_alive": "soon"}, 400, "soon"),
    ("/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "x",
                                                  "images": ["aGk="]}]}, 400, "images"),
    ("/api/generate", {"model": "tiny", "prompt": "x", "format": "yaml"}, 400, "format"),
    ("/api/generate", {"model": "tiny", "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/api/generate", {"prompt": "x"}, 400, "model"),
    ("/api/show", {}, 400, "model"),
    ("/api/chat", {"model": "tiny", "messages": HI, "tools": [{"type": "function"}]}, 400,
     "tools"),
    ("/api/generate", {"model": "tiny", "prompt": "x", "context": [1, 2]}, 400, "context"),
    ("/api/chat", {"model": "tiny", "messages": HI, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/api/chat", {"model": "tiny", "messages": HI, "logprobs": True, "top_logprobs": 21}, 400,
     "top_logprobs"),
    ("/api/generate", {"model": "tiny", "prompt": "x", "template": "{{ .Prompt }}"}, 400,
     "template"),
    ("/api/chat", {"model": "tiny", "messages": HI, "options": {"mirostat": 2}}, 400,
     "mirostat"),
    ("/api/chat", {"model": "tiny", "messages": HI, "options": {"typical_p": 0.5}}, 400,
     "typical_p"),
    # valid JSON, a lone surrogate: no text
    ("/api/chat", b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
     400, "messages.0.content"),
    ("/api/generate", b'{"model": "tiny", "prompt": "\\udfff"}', 400, "prompt"),
]  # fmt: skip


@pytest.mark.parametrize(("route", "body", "status", "text"), BAD)
def test_bad_requests_get_ollamas_error_body(
    server: Server, route: str, body: dict[str, Any] | bytes, status: int, text: str
) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(
        server.url + route, content=raw, headers={"content-type": "application/json"}, timeout=30
    )
    assert response.status_code == status
    assert text in response.json()["error"]


def test_the_ollama_client_raises_response_errors(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as error:
        client.chat(model="nope", messages=HI)
    assert error.value.status_code == 404


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(None, "unset"), (0, 0.0), ("0", 0.0), (300, 300.0), ("5m", 300.0), ("1h30m", 5400.0),
     ("1.5s", 1.5), ("250ms", 0.25), (-1, None), ("-1", None), ("-1m", None)],
)  # fmt: skip
def test_keep_alive_durations(value: Any, seconds: Any) -> None:
    got = keep_alive_seconds(value)
    assert (got.value if seconds == "unset" else got) == seconds  # type: ignore[union-attr]


# -- eviction ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options", [{"max_models": 1}, {"memory_budget": 1}], ids=["by count", "by memory"]
)
def test_loading_another_model_unloads_the_idle_one(home: Path, options: dict[str, int]) -> None:
    with serving(home, parallel=1, **options) as small:
        client = ollama.Client(host=small.url)
        client.chat(model="tiny", messages=HI, options={"num_predict": 2})
        assert loaded(client) == {"tiny:F16"}
        client.chat(model="scripted", messages=HI, options={"num_predict": 2})
        assert loaded(client) == {"scripted:F32"}
