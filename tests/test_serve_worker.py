"""Each loaded model runs in its own worker process: a worker killed mid-stream (SIGKILL, SIGSEGV
as a crash inside llama.cpp would) is an error for its own clients in the API's shape, naming
the model and the signal; a client of another model never notices, and the next request for the
dead one loads it afresh."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from localmix.serve.server import Server

from .served import BOS, LOOP, eventually, make_store, scripted_chat_gguf, serving, shared_home  # noqa: F401 (autouse fixture)

GREEDY: dict[str, Any] = {"temperature": 0, "extra_body": {"repeat_penalty": 1.0}}
LONG = 6000  # tokens: seconds of generation, long enough to kill it midway


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = {
        name: scripted_chat_gguf(tmp_path_factory.mktemp(name) / f"{name}.gguf", n_ctx=8192)
        for name in ("doomed", "bystander")
    }
    return make_store(tmp_path_factory.mktemp("worker-home"), models)


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[Server]:
    with serving(home, ctx=8192, parallel=2, queue=4) as running:
        yield running


def worker_pid(server: Server, name: str) -> int:
    model = server.registry.find_loaded(name)
    assert model is not None and model.worker.pid is not None
    return model.worker.pid


def openai_client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def bystander(server: Server, result: dict[str, Any]) -> threading.Thread:
    """A client of the other model, streaming all the while."""

    def run() -> None:
        try:
            stream = openai_client(server).completions.create(
                model="bystander", prompt=[BOS, LOOP[0]], max_tokens=1500, stream=True, **GREEDY
            )
            result["pieces"] = sum(1 for _ in stream)
        except Exception as error:  # what the test asserts on
            result["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV])
def test_a_worker_killed_mid_stream_fails_only_its_own_requests(
    server: Server, sig: signal.Signals
) -> None:
    client = openai_client(server)
    client.completions.create(model="bystander", prompt=[BOS], max_tokens=1)  # loaded first
    other: dict[str, Any] = {}
    thread = bystander(server, other)
    stream = client.completions.create(
        model="doomed", prompt=[BOS, LOOP[0]], max_tokens=LONG, stream=True, **GREEDY
    )
    pid = worker_pid(server, "doomed")
    with pytest.raises(openai.APIError) as died:
        for i, _ in enumerate(stream):
            if i == 20:
                os.kill(pid, sig)
    assert "doomed" in str(died.value) and sig.name in str(died.value)
    thread.join(120)
    assert other.get("error") is None and other["pieces"] >= 1500  # never noticed
    # the next request for the dead model loads it again, in a new worker
    again = client.chat.completions.create(
        model="doomed", messages=[{"role": "user", "content": "Hi"}], **GREEDY
    )
    assert again.choices[0].message.content == "Hello world!"
    assert worker_pid(server, "doomed") != pid
    assert eventually(lambda: not _alive(pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_ollamas_stream_and_a_waiting_request_get_the_error_in_their_shape(
    server: Server,
) -> None:
    """An Ollama stream ends with an {"error"} line; a request not streamed is a 500 in
    OpenAI's error body; then the model serves again."""
    openai_client(server).completions.create(model="doomed", prompt=[BOS], max_tokens=1)
    pid = worker_pid(server, "doomed")
    whole: dict[str, Any] = {}

    def not_streamed() -> None:
        whole["response"] = httpx.post(
            server.url + "/v1/completions", timeout=120,
            json={"model": "doomed", "prompt": [BOS, LOOP[0]], "max_tokens": LONG,
                  "temperature": 0},
        )  # fmt: skip

    thread = threading.Thread(target=not_streamed)
    body = {"model": "doomed", "prompt": "x", "raw": True,
            "options": {"num_predict": LONG, "temperature": 0}}  # fmt: skip
    lines = []
    with httpx.stream("POST", server.url + "/api/generate", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            lines.append(json.loads(line))
            if len(lines) == 10:
                thread.start()
                assert eventually(lambda: server.registry.find_loaded("doomed").users == 2)
                os.kill(pid, signal.SIGKILL)
    thread.join(120)
    assert "died" in lines[-1]["error"] and "SIGKILL" in lines[-1]["error"]
    refused = whole["response"]
    assert refused.status_code == 500
    error = refused.json()["error"]
    assert "doomed" in error["message"] and error["type"] == "server_error"
    done = httpx.post(server.url + "/api/generate", timeout=60,
                      json={"model": "doomed", "prompt": "x", "raw": True, "stream": False,
                            "options": {"num_predict": 2}})  # fmt: skip
    assert done.status_code == 200 and done.json()["done"] is True


def test_a_load_error_inside_the_worker_is_the_requests_error(
    server: Server, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the worker's load raises (here: a setting it reads, wrong) crosses the process
    boundary whole, hint and status included; the server goes on."""
    from localmix.models import store

    fresh = tmp_path / "fresh.gguf"
    fresh.write_bytes(Path(store.get("bystander").path).read_bytes())
    make_store(home, {"fresh": fresh})
    monkeypatch.setenv("LOCALMIX_REPACK", "sometimes")  # what the worker process inherits
    response = httpx.post(
        server.url + "/v1/completions", timeout=60, json={"model": "fresh", "prompt": "x"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert "LOCALMIX_REPACK" in error["message"] and "died" not in error["message"], error
    assert server.registry.find_loaded("fresh") is None
    monkeypatch.delenv("LOCALMIX_REPACK")
    ok = httpx.post(
        server.url + "/v1/completions", timeout=60,
        json={"model": "fresh", "prompt": "x", "max_tokens": 1},
    )  # fmt: skip
    assert ok.status_code == 200
