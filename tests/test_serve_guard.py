"""The server's guard against a browser-shaped attacker (serve/guard.py), over real HTTP: foreign
Host and Origin headers, simple (no-preflight) content types, preflights, API keys present,
absent and wrong. An attack request runs no generation: the model it names is never loaded."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from localmix.errors import UsageError
from localmix.serve import guard
from localmix.serve.server import Server

from .served import make_store, scripted_chat_gguf, serving, shared_home  # noqa: F401 (autouse fixture)

KEY = "test-key-0123456789abcdef"
CHAT = {"model": "scripted", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
GENERATE = {"model": "scripted", "prompt": "Hi", "stream": False, "options": {"num_predict": 4}}
RESPONSES = {"model": "scripted", "input": "Hi", "max_output_tokens": 4}
ROUTES = (("/v1/chat/completions", CHAT), ("/v1/responses", RESPONSES),
          ("/api/generate", GENERATE), ("/api/chat", CHAT))  # fmt: skip


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    scripted = scripted_chat_gguf(tmp_path_factory.mktemp("scripted") / "scripted.gguf")
    return make_store(tmp_path_factory.mktemp("guard-home"), {"scripted": scripted})


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[Server]:
    with serving(home, keep_alive=0) as running:
        yield running


@pytest.fixture(scope="module")
def used(home: Path) -> Iterator[Server]:
    """A second server for requests that are let in (the first one must never load a model)."""
    with serving(home) as running:
        yield running


@pytest.fixture(scope="module")
def keyed(home: Path) -> Iterator[Server]:
    policy = guard.Policy(keys=(KEY, "second-key-abcdefgh"), origins=("https://ui.example",))
    with serving(home, policy=policy, keep_alive=0) as running:
        yield running


def post(server: Server, path: str, body: Any, **headers: str) -> httpx.Response:
    data = json.dumps(body)
    return httpx.post(server.url + path, content=data, headers=headers, timeout=30)


def never_loaded(server: Server) -> bool:
    """No model was loaded (so nothing generated) since the server started, or since its last
    legitimate request in the tests that make one after the attacks."""
    return server.registry.loads == 0


@pytest.mark.parametrize(("path", "body"), ROUTES)
def test_dns_rebinding_gets_403_and_no_generation(server: Server, path: str, body: Any) -> None:
    response = post(
        server, path, body, Host="evil.example.com", **{"Content-Type": "application/json"}
    )
    assert response.status_code == 403
    assert "host" in json.dumps(response.json()).lower()
    assert (
        httpx.get(server.url + "/api/tags", headers={"Host": "evil.example.com"}).status_code == 403
    )
    assert (
        httpx.get(
            server.url + "/v1/models", headers={"Host": "rebind.attacker.test:11434"}
        ).status_code
        == 403
    )
    assert never_loaded(server)


def test_local_host_names_are_served(server: Server) -> None:
    port = server.port
    for host in ("localhost", f"localhost:{port}", f"127.0.0.1:{port}", "[::1]", "app.localhost"):
        assert httpx.get(server.url + "/api/tags", headers={"Host": host}).status_code == 200, host


@pytest.mark.parametrize(("path", "body"), ROUTES)
@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
def test_a_foreign_page_gets_403_before_any_work(
    server: Server, path: str, body: Any, content_type: str
) -> None:
    """What a page on another site can send without a preflight: refused, nothing loaded."""
    response = post(server, path, body, Origin="http://evil.example.com",
                    **{"Content-Type": content_type})  # fmt: skip
    assert response.status_code == 403
    assert "access-control-allow-origin" not in response.headers
    error = response.json()["error"]
    if path.startswith("/v1"):
        assert error["type"] == "invalid_request_error" and "evil.example.com" in error["message"]
    else:
        assert isinstance(error, str) and "--allow-origin" in error
    assert never_loaded(server)


def test_a_sandboxed_page_null_origin_is_refused(server: Server) -> None:
    response = post(server, "/api/generate", GENERATE, Origin="null",
                    **{"Content-Type": "text/plain"})  # fmt: skip
    assert response.status_code == 403 and never_loaded(server)


def test_a_local_web_ui_works_with_cors(used: Server) -> None:
    origin = "http://localhost:3000"
    preflight = httpx.options(
        used.url + "/v1/chat/completions",
        headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"},
    )  # fmt: skip
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == origin
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "content-type" in preflight.headers["access-control-allow-headers"].lower()
    response = post(used, "/v1/chat/completions", CHAT, Origin=origin,
                    **{"Content-Type": "application/json"})  # fmt: skip
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == origin
    assert response.json()["choices"][0]["message"]["content"]


def test_a_browser_must_send_json(used: Server) -> None:
    """An allowed page with a simple content type, and a request with browser markers but no
    Origin: 415, nothing run. curl's default form type without browser markers is served."""
    local = post(used, "/api/generate", GENERATE, Origin="http://127.0.0.1:8080",
                 **{"Content-Type": "text/plain"})  # fmt: skip
    assert local.status_code == 415 and "application/json" in local.json()["error"]
    marked = post(used, "/api/generate", GENERATE, **{"Sec-Fetch-Site": "cross-site",
                  "Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert marked.status_code == 415
    curl = post(used, "/api/generate", GENERATE,
                **{"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert curl.status_code == 200, curl.text


def test_options_is_answered_everywhere(server: Server) -> None:
    for path in ("/v1/models", "/api/tags", "/api/chat", "/"):
        response = httpx.options(server.url + path)
        assert response.status_code == 204 and "POST" in response.headers["allow"]
    foreign = httpx.options(server.url + "/api/chat", headers={
        "Origin": "https://evil.example.com", "Access-Control-Request-Method": "POST"})  # fmt: skip
    assert foreign.status_code == 403


def test_keys_absent_wrong_and_right(keyed: Server) -> None:
    for path, body in ROUTES:
        for headers in ({}, {"Authorization": "Bearer wrong-key-0000000000"},
                        {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):  # fmt: skip
            response = post(keyed, path, body, **headers, **{"Content-Type": "application/json"})
            assert response.status_code == 401, (path, headers)
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert KEY not in response.text
            error = response.json()["error"]
            if path.startswith("/v1"):
                assert (
                    error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
                )
            else:
                assert "API key" in error
    assert httpx.get(keyed.url + "/api/tags").status_code == 401
    assert httpx.get(keyed.url + "/v1/models").status_code == 401
    assert httpx.get(keyed.url + "/").status_code == 200  # the health check stays open
    assert not keyed.registry.running()
    for headers in ({"Authorization": f"Bearer {KEY}"}, {"X-Api-Key": "second-key-abcdefgh"}):
        assert httpx.get(keyed.url + "/api/tags", headers=headers).status_code == 200


def test_the_openai_client_sends_its_key(keyed: Server) -> None:
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0)
    reply = client.chat.completions.create(
        model="scripted", messages=CHAT["messages"], max_tokens=4
    )
    assert reply.choices[0].message.content
    wrong = openai.OpenAI(base_url=keyed.url + "/v1", api_key="not-the-key-000", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_an_added_origin_is_allowed_and_a_preflight_needs_no_key(keyed: Server) -> None:
    preflight = httpx.options(keyed.url + "/v1/chat/completions", headers={
        "Origin": "https://ui.example", "Access-Control-Request-Method": "POST"})  # fmt: skip
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "https://ui.example"
    response = post(keyed, "/v1/models", {}, Origin="https://other.example")
    assert response.status_code == 403


def test_the_policy_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(guard.ENV_KEYS, raising=False)
    with pytest.raises(UsageError, match="API key"):
        guard.policy(loopback=False)
    assert guard.policy(loopback=False, unsafe_no_auth=True).keys == ()
    monkeypatch.setenv(guard.ENV_KEYS, "env-key-aaaaaaaa, env-key-bbbbbbbb")
    monkeypatch.setenv(guard.ENV_ORIGINS, "http://ui.lan:3000")
    monkeypatch.setenv(guard.ENV_HOSTS, "box.lan")
    made = guard.policy(loopback=False, api_keys=["flag-key-cccccccc"])
    assert made.keys == ("flag-key-cccccccc", "env-key-aaaaaaaa", "env-key-bbbbbbbb")
    assert made.origins == ("http://ui.lan:3000",) and made.hosts == ("box.lan",)
    assert "env-key" not in repr(made) and "flag-key" not in repr(made)
    with pytest.raises(UsageError, match="at least 8"):
        guard.policy(loopback=True, api_keys=["short"])
    with pytest.raises(UsageError, match="not an origin"):
        guard.policy(loopback=True, origins=["evil"])


def test_host_names_and_origins_as_the_guard_reads_them() -> None:
    gate = guard.Guard(lambda *a: None, guard.Policy(hosts=("*.corp.example", "box.lan")))  # type: ignore[arg-type,return-value]
    allowed = ["localhost", "LOCALHOST:11434", "127.0.0.1:1", "[::1]:11434", "a.localhost",
               "10.0.0.5", "box.lan", "x.corp.example"]  # fmt: skip
    for host in allowed:
        assert gate.host_allowed(host), host
    for host in ("evil.com", "localhost.evil.com", "corp.example.evil", "box.lan.evil"):
        assert not gate.host_allowed(host), host
    for origin in ("http://localhost", "https://127.0.0.1:8443", "http://[::1]:3000",
                   "http://chat.localhost", "vscode-webview://abc", "app://obsidian.md"):  # fmt: skip
        assert gate.origin_allowed(origin), origin
    for origin in (
        "http://evil.com",
        "http://localhost.evil.com",
        "null",
        "http://127.0.0.2.nip.io",
    ):
        assert not gate.origin_allowed(origin), origin
