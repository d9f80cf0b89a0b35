"""The serve and ps commands end to end: `localmix serve MODEL --port 0` in its own process says
where it listens, `localmix ps` asks it what it has loaded (table and --json), Ctrl-C stops it
cleanly; a port in use is one error line with a hint."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .cli_run import run_cli

LISTENING = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")


def _serve(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    return subprocess.Popen(
        [sys.executable, "-m", "localmix", "serve", *args],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def _url(process: subprocess.Popen[str], timeout: float = 120) -> tuple[str, str]:
    """The address the server says it listens on, and what it printed up to there."""
    assert process.stderr is not None
    seen, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        seen += line
        if found := LISTENING.search(seen.replace("\n", " ")):
            return found[1], seen
    process.kill()
    raise AssertionError(f"serve did not start: {seen}")


@pytest.fixture()
def served(tiny_mistral_gguf_f16: Path) -> Iterator[tuple[subprocess.Popen[str], str, str]]:
    process = _serve(str(tiny_mistral_gguf_f16), "--port", "0", "-c", "256", "-np", "2", "-t", "1")
    try:
        url, said = _url(process)
        yield process, url, said
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_serve_listens_ps_lists_and_ctrl_c_stops(
    served: tuple[subprocess.Popen[str], str, str],
    tiny_mistral_gguf_f16: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    process, url, said = served
    assert "warning" not in said and "/v1" in said and "/api" in said
    name = str(tiny_mistral_gguf_f16)
    table = run_cli(capsys, "ps", "--url", url)
    assert table.code == 0, table.err
    assert "model.F16.gguf" in table.out and "forever" in table.out and "CPU" in table.out
    listed = run_cli(capsys, "ps", "--url", url, "--json")
    (entry,) = json.loads(listed.out)
    assert entry["name"] == name and entry["context_length"] == 256 and entry["parallel"] == 2
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "stopped" in err and "Traceback" not in err and "error" not in err


@pytest.mark.slow
def test_a_port_in_use_is_said_with_a_hint(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(capsys, "serve", "--port", str(port))
    assert result.code == 1
    lines = result.err.strip().splitlines()
    assert lines[0].startswith("error: ") and "in use" in lines[0]
    assert lines[1].startswith("hint: ") and "--port" in lines[1]


@pytest.mark.slow
def test_another_host_needs_a_key_or_says_it_is_unsafe(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--host 0.0.0.0 without a key is refused before it binds; --unsafe-no-auth serves with a
    warning, a key without one (here the port is taken, so nothing is served)."""
    monkeypatch.delenv("LOCALMIX_API_KEY", raising=False)
    refused = run_cli(capsys, "serve", "--host", "0.0.0.0", "--port", "0")
    assert refused.code == 2
    error, hint = refused.err.strip().splitlines()
    assert error.startswith("error: ") and "API key" in error
    assert "LOCALMIX_API_KEY" in hint and "--unsafe-no-auth" in hint
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            capsys, "serve", "--host", "0.0.0.0", "--port", str(port), "--unsafe-no-auth"
        )
        warning, error, hint = result.err.strip().splitlines()
        assert warning.startswith("warning: serving on 0.0.0.0") and "no API key" in warning
        assert error.startswith("error: ") and "in use" in error and hint.startswith("hint: ")
        keyed = run_cli(capsys, "serve", "--host", "0.0.0.0", "--port", str(port),
                        "--api-key", "k" * 24)  # fmt: skip
        assert "warning" not in keyed.err and "in use" in keyed.err
        assert "k" * 24 not in keyed.err + keyed.out  # a key is never echoed


def test_loopback_addresses() -> None:
    from localmix.serve.server import is_loopback, url_of

    assert all(map(is_loopback, ["127.0.0.1", "127.0.0.2", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.2", "example.com"]))
    assert url_of("::1", 80) == "http://[::1]:80"
