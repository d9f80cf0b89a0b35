"""What llama.cpp's own server test suite found when run against `localmix serve`, each pinned:
lone surrogates, fields that were silently ignored, max_tokens 0, duplicate model entries,
preflights, and seeded replies that changed once their prompt was cached."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from localmix.serve.server import Server

from .served import make_store, serving, shared_home  # noqa: F401 (autouse fixture)

HI = [{"role": "user", "content": "Hi"}]
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, small_mistral_q4_k_m: Path) -> Path:
    store = tmp_path_factory.mktemp("findings-home")
    return make_store(store, {"a": small_mistral_q4_k_m, "b": small_mistral_q4_k_m,
                              "c": small_mistral_q4_k_m})  # fmt: skip


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[Server]:
    # `localmix serve a b c`: three names of one file, given at start
    with serving(home, named={"a": "a", "b": "b", "c": "c"}, parallel=2) as running:  # type: ignore[dict-item]
        yield running


def post(server: Server, route: str, raw: bytes) -> httpx.Response:
    return httpx.post(server.url + route, content=raw, headers=JSON, timeout=60)


SURROGATE = [
    ("/v1/chat/completions", b'{"model":"a","messages":[{"role":"user","content":"\\ud800"}]}',
     "messages.0.content"),
    ("/v1/completions", b'{"model":"a","prompt":"x\\udc00y"}', "prompt"),
    ("/api/chat", b'{"model":"a","messages":[{"role":"user","content":"\\ud800"}]}',
     "messages.0.content"),
    ("/api/generate", b'{"model":"a","prompt":"\\ud800","stream":false}', "prompt"),
]  # fmt: skip


@pytest.mark.parametrize(("route", "raw", "field"), SURROGATE)
def test_a_lone_surrogate_is_a_400_in_the_apis_shape(
    server: Server, route: str, raw: bytes, field: str
) -> None:
    response = post(server, route, raw)
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    message = body["error"]["message"] if route.startswith("/v1") else body["error"]
    assert field in message and "surrogate" in message
    if route.startswith("/v1"):
        assert body["error"]["param"] == field


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"logit_bias": {"99999": -100}}, "logit_bias"),  # no such token
        ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs
        ({"tool_choice": "required"}, "tool_choice"),  # without tools
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_what_is_not_honoured_is_refused_and_runs_nothing(
    server: Server, extra: dict[str, Any], field: str
) -> None:
    loads, finished = server.registry.loads, _finished(server)
    response = httpx.post(
        server.url + "/v1/chat/completions", json={"model": "a", "messages": HI, **extra},
        timeout=60,
    )  # fmt: skip
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field
    assert (server.registry.loads, _finished(server)) == (loads, finished)


def _finished(server: Server) -> int:
    return sum(sum(m.worker.finished.values()) for m in server.registry.running())


def test_accepted_fields_that_change_nothing(server: Server) -> None:
    body = {"model": "a", "messages": HI, "max_tokens": 2, "user": "u", "logit_bias": {},
            "tool_choice": "none", "metadata": {"k": "v"}}  # fmt: skip
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text


def test_one_entry_per_name_in_the_model_lists(server: Server) -> None:
    ids = [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]
    assert sorted(ids) == ["a", "b", "c"]
    tags = [m["name"] for m in httpx.get(server.url + "/api/tags").json()["models"]]
    assert sorted(tags) == ["a", "b", "c"]


def test_a_preflight_is_answered_not_405(server: Server) -> None:
    response = httpx.options(
        server.url + "/v1/chat/completions",
        headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"},
    )
    assert response.status_code == 204


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/api/chat"])
def test_a_seeded_q4_k_m_reply_is_the_same_first_time_and_after(server: Server, route: str) -> None:
    """The first request reads its whole prompt, the next ones find it cached: same reply."""
    sampling = {"temperature": 1.5, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": 5}
    prompts = [f"Tell me about the number {i}, please, in detail" for i in range(6)]
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        if route.startswith("/v1"):
            body = {"model": "b", "messages": messages, "max_tokens": 8, **sampling}
        else:
            body = {"model": "b", "messages": messages, "stream": False,
                    "options": {**sampling, "num_predict": 8}}  # fmt: skip
        replies = []
        for _ in range(3):
            response = httpx.post(server.url + route, json=body, timeout=60)
            assert response.status_code == 200, response.text
            data = response.json()
            replies.append(
                data["choices"][0]["message"]["content"] if "choices" in data
                else data["message"]["content"]
            )  # fmt: skip
        assert replies[0] == replies[1] == replies[2], prompt
