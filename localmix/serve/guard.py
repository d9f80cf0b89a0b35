"""Who may call the server: the checks every request passes before any route reads its body.

A server on 127.0.0.1 is reachable from every web page the machine's browser opens, so:
- Host: on a loopback server only this machine's own names are served (localhost, *.localhost,
  IP addresses, the machine's host name, and names the user adds). A page whose domain re-resolves
  to 127.0.0.1 (DNS rebinding) still sends its own name as Host, and gets 403: Ollama's fix for
  CVE-2024-28224.
- Origin: a browser names the page behind every cross-site request. Only local pages (localhost,
  127.0.0.1, [::1] on any port, *.localhost) and the desktop and editor schemes Ollama also allows
  (app, file, tauri, vscode-webview, vscode-file) may call, plus the origins the user adds; any
  other gets 403 before any work. Allowed origins get CORS headers and preflight answers.
- Content type: a request from a browser (it carries Origin, Sec-Fetch-* or Referer) must send
  application/json to the JSON routes, so no form or text/plain "simple request" slips past
  CORS; curl and the API clients, which send neither, are served as before.
- API keys: with keys set, every route but / needs `Authorization: Bearer KEY` (OpenAI's clients
  send it; X-Api-Key too), compared in constant time. A server bound beyond loopback needs a key
  unless the user says --unsafe-no-auth.
Errors come in the shape of the API the path belongs to (OpenAI's under /v1, Ollama's under /api).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from localmix import settings
from localmix.errors import UsageError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOCAL_NAMES = ("localhost", "127.0.0.1", "0.0.0.0", "::1")
APP_SCHEMES = ("app", "file", "tauri", "vscode-webview", "vscode-file")
BROWSER_HEADERS = (b"origin", b"sec-fetch-site", b"sec-fetch-mode", b"referer")
ALLOW_HEADERS = "Authorization, Content-Type, X-Api-Key, X-Requested-With, OpenAI-Organization, "
ALLOW_HEADERS += "OpenAI-Project, X-Stainless-Lang, X-Stainless-Package-Version, X-Stainless-OS, "
ALLOW_HEADERS += "X-Stainless-Arch, X-Stainless-Runtime, X-Stainless-Runtime-Version"
ENV_KEYS, ENV_ORIGINS, ENV_HOSTS = "LOCALMIX_API_KEY", "LOCALMIX_ORIGINS", "LOCALMIX_HOSTS"


@dataclass(frozen=True)
class Policy:
    """What the guard lets in. hosts and origins add to the local defaults ("*" allows all);
    keys empty: no key needed. loopback: the server listens on this machine only."""

    loopback: bool = True
    hosts: tuple[str, ...] = ()
    origins: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()

    def __repr__(self) -> str:  # never show a key, in a log or a traceback
        return (
            f"Policy(loopback={self.loopback}, hosts={self.hosts}, origins={self.origins}, "
            f"keys={len(self.keys)})"
        )


def policy(
    *,
    loopback: bool,
    api_keys: Sequence[str] = (),
    origins: Sequence[str] = (),
    hosts: Sequence[str] = (),
    unsafe_no_auth: bool = False,
) -> Policy:
    """The policy from the flags and LOCALMIX_API_KEY / LOCALMIX_ORIGINS / LOCALMIX_HOSTS
    (comma lists, added to the flags). UsageError for a server beyond loopback without a key
    (unless unsafe_no_auth), and for origins that are not scheme://host[:port]."""
    keys = tuple(k.strip() for k in api_keys if k.strip()) + settings.listed(ENV_KEYS)
    if any(len(k) < 8 for k in keys):
        raise UsageError("an API key must be at least 8 characters", hint="use a long random key")
    if not loopback and not keys and not unsafe_no_auth:
        raise UsageError(
            "serving beyond this machine without an API key lets anyone who reaches it use the "
            "models",
            hint=f"set {ENV_KEYS} (or --api-key), or pass --unsafe-no-auth if the network is yours",
        )
    allowed = tuple(origins) + settings.listed(ENV_ORIGINS)
    for origin in allowed:
        if origin != "*" and not _origin_parts(origin.rstrip("/"))[1]:
            raise UsageError(
                f"{origin!r} is not an origin", hint="write it like http://localhost:3000 or *"
            )
    names = tuple(h.strip().lower() for h in (*hosts, *settings.listed(ENV_HOSTS)))
    return Policy(loopback=loopback, hosts=names, origins=allowed, keys=keys)


def _origin_parts(origin: str) -> tuple[str, str]:
    """(scheme, host) of an Origin header's value; ("", "") when it is not one."""
    try:
        parts = urlsplit(origin)
        return parts.scheme.lower(), (parts.hostname or "").lower()
    except ValueError:
        return "", ""


def _host_name(header: str) -> str:
    """The name in a Host header, without its port or IPv6 brackets, lowercased."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _local(name: str) -> bool:
    return name in LOCAL_NAMES or name.endswith(".localhost") or name == "localhost"


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """name against user patterns: exact, "*" (anything), "*.example.com" or ".example.com"."""
    for pattern in patterns:
        if pattern == "*" or pattern == name:
            return True
        suffix = pattern[1:] if pattern.startswith("*.") else pattern
        if suffix.startswith(".") and name.endswith(suffix):
            return True
    return False


class Guard:
    """The ASGI middleware that enforces a Policy on every HTTP request."""

    def __init__(self, app: ASGIApp, policy: Policy) -> None:
        import socket

        self.app = app
        self.policy = policy
        self.own_names = {socket.gethostname().lower(), socket.getfqdn().lower()}
        self.keys = tuple(k.encode() for k in policy.keys)

    def host_allowed(self, header: str | None) -> bool:
        if header is None or not self.policy.loopback:
            return True  # no Host (not a browser), or a server meant to be reached by name
        name = _host_name(header)
        return (
            _is_ip(name)
            or _local(name)
            or name in self.own_names
            or _matches(name, self.policy.hosts)
        )

    def origin_allowed(self, origin: str) -> bool:
        if origin in self.policy.origins or "*" in self.policy.origins:
            return True
        if origin.rstrip("/") in (o.rstrip("/") for o in self.policy.origins):
            return True
        scheme, host = _origin_parts(origin)
        if scheme in APP_SCHEMES:
            return True
        return scheme in ("http", "https") and _local(host)

    def key_given(self, headers: dict[bytes, bytes]) -> bool:
        given = headers.get(b"authorization", b"")
        token = given[7:].strip() if given[:7].lower() == b"bearer " else b""
        token = token or headers.get(b"x-api-key", b"").strip()
        matched = False
        for key in self.keys:  # every key compared, in constant time
            matched |= hmac.compare_digest(token, key)
        return matched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[bytes, bytes] = {}
        for name, value in scope.get("headers", ()):
            headers.setdefault(name.lower(), value)
        path, method = scope.get("path", "/"), scope.get("method", "GET")
        host = headers.get(b"host")
        if not self.host_allowed(host.decode("latin-1") if host is not None else None):
            await _refuse(send, path, 403, "this server answers only to its own host names",
                          f"serve with --allow-host NAME (or {ENV_HOSTS}) to add one")  # fmt: skip
            return
        origin = headers.get(b"origin", b"").decode("latin-1").strip()
        if origin and not self.origin_allowed(origin):
            await _refuse(send, path, 403, f"requests from {origin[:100]} are not allowed",
                          f"serve with --allow-origin {origin[:100]} (or {ENV_ORIGINS})")  # fmt: skip
            return
        cors = _cors_headers(origin) if origin else []
        if method == "OPTIONS":
            await _preflight(send, cors)
            return
        if self.keys and path != "/" and not self.key_given(headers):
            await _refuse(send, path, 401, "a valid API key is needed",
                          "send it as Authorization: Bearer KEY", cors)  # fmt: skip
            return
        if method == "POST" and any(h in headers for h in BROWSER_HEADERS):
            kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if kind != b"application/json":
                await _refuse(send, path, 415, "the body must be sent as application/json",
                              "set Content-Type: application/json", cors)  # fmt: skip
                return
        if not cors:
            await self.app(scope, receive, send)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *cors]
            await send(message)

        await self.app(scope, receive, send_with_cors)


def _cors_headers(origin: str) -> list[tuple[bytes, bytes]]:
    return [
        (b"access-control-allow-origin", origin.encode("latin-1")),
        (b"vary", b"Origin"),
    ]


async def _preflight(send: Send, cors: list[tuple[bytes, bytes]]) -> None:
    """A CORS preflight (or a bare OPTIONS): 204 with what the routes accept."""
    headers = [
        (b"allow", b"GET, HEAD, POST, DELETE, OPTIONS"),
        (b"content-length", b"0"),
        *cors,
    ]
    if cors:
        headers += [
            (b"access-control-allow-methods", b"GET, HEAD, POST, DELETE, OPTIONS"),
            (b"access-control-allow-headers", ALLOW_HEADERS.encode()),
            (b"access-control-max-age", b"600"),
        ]
    await send({"type": "http.response.start", "status": 204, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


def error_body(path: str, status: int, message: str, hint: str | None = None) -> dict[str, Any]:
    """An error in the shape of the API that path belongs to (OpenAI's under /v1, else Ollama's
    {"error": text})."""
    text = message + (f" ({hint})" if hint else "")
    if path.startswith("/v1"):
        codes = {401: "invalid_api_key", 403: "forbidden", 415: "unsupported_media_type"}
        kind = "invalid_request_error" if status < 500 else "server_error"
        error = {"message": text, "type": kind, "param": None, "code": codes.get(status)}
        return {"error": error}
    return {"error": text}


async def _refuse(
    send: Send,
    path: str,
    status: int,
    message: str,
    hint: str | None = None,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps(error_body(path, status, message, hint)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *(extra or []),
    ]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="localmix"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
