"""mistral-vibe, Mistral's coding agent (the real one from PyPI: tests/vibe_env.py), run headless
against a real `localmix serve`. A scripted v13 model answers vibe's first request, which carries
vibe's system prompt and tool schemas, with a call of vibe's own read_file tool; vibe runs the
tool and sends the file back; the model answers that second request with a fixed text."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from . import vibe_env
from .scripted_gguf import write_scripted_replies
from .served import make_store, serving, shared_home  # noqa: F401 (autouse fixture)
from .tekken_files import tekken_file

pytestmark = pytest.mark.slow

INST_END, TOOL_RESULTS_END = 4, 8  # [/INST] ends the first prompt, [/TOOL_RESULTS] the second
TOOL_CALLS, ARGS = 9, 32
# read_file's schema (vibe 3.0.2): {"path": string, "offset"?: int, "limit"?: int|null}; the
# server's grammar holds the call to it, so the scripted arguments must follow it.
CALL: list[str | int] = [TOOL_CALLS, "read_file", ARGS, '{"path": "notes.txt"}']
ANSWER = "The notes say hello."  # no token of the call: each token has one successor
SECRET = "localmix-secret-42\n"
# vibe's system prompt and its ten tool schemas come to about 7,800 tokens (7,777 in the first
# prompt, 7,859 with the call and its result); the model and the server get twice that.
CTX = 16384


@pytest.fixture(scope="module")
def vibe() -> Path:
    """The vibe executable: built once into the user cache (minutes); skips only with no cache
    and no way to download."""
    return vibe_env.vibe()


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, list[int]]]:
    """The scripted model and the token ids of its two replies."""
    tmp = tmp_path_factory.mktemp("vibe-model")
    model = tmp / "devstral.gguf"
    replies = {INST_END: CALL, TOOL_RESULTS_END: [ANSWER]}
    ids = write_scripted_replies(model, replies, tekken=tekken_file("v13", tmp), n_ctx=CTX)
    return model, ids


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, script: tuple[Path, Any]) -> Path:
    # "devstral" on the llamacpp provider was vibe's built-in local model; the store serves that name
    store = tmp_path_factory.mktemp("vibe-home")
    return make_store(store, {"devstral": script[0]}, {"devstral": "v13"})


def test_vibe_calls_read_file_and_answers_through_localmix_serve(
    vibe: Path, home: Path, script: tuple[Path, dict[int, list[int]]], tmp_path: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text(SECRET)
    export = tmp_path / "export"
    with serving(home, ctx=CTX, parallel=1) as server, _refused_port() as dead:
        vibe_home = _vibe_home(tmp_path / "user", server.url)
        done = subprocess.run(
            [str(vibe), "-p", "What is in notes.txt?", "--output", "json", "--workdir", str(work),
             "--trust", "--max-turns", "4", "--time-limit", "120", "--output-dir", str(export)],
            env=_env(tmp_path / "user", vibe_home, dead), cwd=work, capture_output=True,
            text=True, timeout=240, check=False,
        )  # fmt: skip
    assert done.returncode == 0, f"vibe exited {done.returncode}:\n{done.stderr[-3000:]}"
    entries: list[dict[str, Any]] = json.loads(done.stdout)

    # the call reached vibe whole and vibe ran its tool on the file: the content is the file's
    reads = [e for e in entries if e.get("title") == "file_system.read_file"]
    assert len(reads) == 1, [(e["type"], e.get("title") or e.get("content")) for e in entries]
    read = reads[0]
    assert read["detail"]["input"]["filePath"] == "notes.txt"
    assert read["state"]["status"] == "completed", read["state"]
    assert read["state"]["output"]["content"] == SECRET
    # the scripted model says ANSWER only after a prompt that ends in [/TOOL_RESULTS]: vibe's
    # second request carried the result back as a tool message, and the answer reached vibe
    final = entries[-1]
    assert final.get("role") == "assistant", final
    assert final["content"] == [{"type": "text", "text": ANSWER}]

    # the server's view, as vibe recorded it: two requests, and completion tokens counted for
    # exactly the scripted call and answer
    report = json.loads((export / "export.json").read_text())
    assert report["outcome"] == "finished" and report["steps"] == 2, report
    ids = script[1]
    assert report["usage"]["output_tokens"] == len(ids[INST_END]) + len(ids[TOOL_RESULTS_END])


def _vibe_home(user: Path, url: str) -> Path:
    """VIBE_HOME with a config that points vibe's llamacpp provider at the test server and turns
    off what would reach the internet (telemetry, update checks)."""
    vibe_home = user / ".vibe"
    vibe_home.mkdir(parents=True)
    (vibe_home / "config.toml").write_text(
        f"""active_model = "local"
enable_telemetry = false
enable_update_checks = false
enable_auto_update = false
# a server error fails the run in seconds instead of minutes of retries
api_retry_max_elapsed_time = 5

[[providers]]
name = "llamacpp"
api_base = {json.dumps(url + "/v1")}
api_key_env_var = ""

[[models]]
name = "devstral"
provider = "llamacpp"
alias = "local"
"""
    )
    return vibe_home


def _env(user: Path, vibe_home: Path, dead_port: int) -> dict[str, str]:
    """A bare environment: nothing of the suite's (PYTHONPATH, the 3.11 venv, a D-Bus session),
    every home in tmp, and a proxy that refuses connections for anything but loopback."""
    proxy = f"http://127.0.0.1:{dead_port}"
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(user),
        "VIBE_HOME": str(vibe_home),
        "XDG_CONFIG_HOME": str(user / ".config"),
        "XDG_CACHE_HOME": str(user / ".cache"),
        "XDG_DATA_HOME": str(user / ".local" / "share"),
        "XDG_STATE_HOME": str(user / ".local" / "state"),
        "TERM": "dumb",
        "PYTHON_KEYRING_BACKEND": "keyring.backends.null.Keyring",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env[name] = env[name.lower()] = proxy
    return env


@contextlib.contextmanager
def _refused_port() -> Iterator[int]:
    """A loopback port that is bound but not listening, so a connection to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]
