"""llama.cpp's RPC backend: `localmix worker` processes on loopback ports, clients that place
layers on them through the load door (in child processes, tests/rpc_client.py: a process
cannot forget a worker it joined, and a worker that dies aborts it), the probe that turns a bad
endpoint into an error instead of llama.cpp's abort, and the plug-in built from the pinned
sdist's vendored source (once per session, into a session cache)."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from localmix.errors import UsageError, WorkerError
from localmix.llama import rpc

ROOT = Path(__file__).resolve().parent.parent


# -- processes ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _same_cache(rpc_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCALMIX_CACHE", str(rpc_cache))


def _env(cache: Path) -> dict[str, str]:
    from tests.conftest import rpc_env

    return rpc_env(cache)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ready(
    endpoint: str, process: subprocess.Popen[str] | None = None, timeout: float = 120.0
) -> None:
    """Wait until a worker answers a probe (and so serves no other client)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"worker exited {process.returncode}: {process.stderr.read()}")  # type: ignore[union-attr]
        with contextlib.suppress(WorkerError):
            rpc.probe(endpoint, timeout=1.0)
            return
        time.sleep(0.1)
    raise AssertionError(f"no worker at {endpoint} after {timeout} s")


@contextlib.contextmanager
def worker(cache: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`localmix worker` on a free loopback port (1 thread); stopped at the end."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "localmix", "worker", "--port", str(port), "--threads", "1", *args],
        env=_env(cache), cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        # Ctrl-C as a terminal sends it (a shell's background job would ignore it)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    endpoint = f"127.0.0.1:{port}"
    try:
        _ready(endpoint, process)
        yield endpoint, process
    finally:
        if process.poll() is None:
            process.kill()
        if process.stdout is not None and not process.stdout.closed:
            process.communicate(timeout=30)


@pytest.fixture(scope="module")
def two_workers(rpc_cache: Path) -> Iterator[tuple[str, str]]:
    with worker(rpc_cache, "--no-cache") as (a, _), worker(rpc_cache, "--no-cache") as (b, _):
        yield a, b


def client(
    cache: Path, model: Path, settings: dict[str, object], n_tokens: int = 16
) -> tuple[dict[str, object], subprocess.CompletedProcess[str]]:
    """tests/rpc_client.py in a child: its last JSON line, and the process."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.rpc_client", str(model), json.dumps(settings), str(n_tokens)],
        env=_env(cache), cwd=ROOT, text=True, capture_output=True, timeout=300,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"client rc {done.returncode}: {done.stderr[-2000:]}"
    return json.loads(lines[-1]), done


# -- greedy output over RPC equals the local run ------------------------------------------------

LAYOUTS = {
    # all layers and the output on the two workers: RPC0 then RPC1
    "all-remote": {},
    # layer 0 stays on this CPU, layer 1 and the output go to the workers
    "mixed": {"n_gpu_layers": 2},
}


@pytest.fixture(scope="module")
def local_runs() -> dict[Path, dict[str, object]]:
    """Each model's local run, made once."""
    return {}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("arch", ["mistral", "mixtral"])
def test_greedy_tokens_over_rpc_equal_the_local_run(
    arch: str,
    layout: str,
    request: pytest.FixtureRequest,
    rpc_cache: Path,
    two_workers: tuple[str, str],
    local_runs: dict[Path, dict[str, object]],
) -> None:
    model = request.getfixturevalue(f"tiny_{arch}_gguf_f16")
    if model not in local_runs:
        # the local run with repacking off: a worker's CPU never repacks weights
        local_runs[model] = client(rpc_cache, model, {})[0]
    local = local_runs[model]
    found, done = client(
        rpc_cache, model, {"rpc": list(two_workers), "verbose": True, **LAYOUTS[layout]}
    )
    assert found["tokens"] == local["tokens"] and len(local["tokens"]) == 16  # type: ignore[arg-type]
    assert found["logits"] == local["logits"]  # every position's logits, bit for bit
    assert found["devices"] == ["CPU", "RPC0", "RPC1"]
    # where llama.cpp put the weights: a buffer on each worker (named by its endpoint), and in
    # the mixed layout the CPU holds a layer besides the token embeddings
    log = done.stderr
    for endpoint in two_workers:
        assert f"[{endpoint}] model buffer size" in log, log[-3000:]
    offloaded = "offloaded 3/3 layers" if layout == "all-remote" else "offloaded 2/3 layers"
    assert offloaded in log


def test_a_worker_this_process_uses_is_not_probed_again(
    rpc_cache: Path, two_workers: tuple[str, str], tiny_mistral_gguf_f16: Path
) -> None:
    # the same worker twice (by name and by address) and an engine loaded twice in one process:
    # llama.cpp's connection is held, so a second probe would time out on our own connection
    a, _ = two_workers
    port = a.rpartition(":")[2]
    code = (
        "import sys; from tests.rpc_client import greedy; from pathlib import Path; "
        f"s = {{'rpc': ['{a}', 'localhost:{port}']}}; m = Path(sys.argv[1]); "
        "print(greedy(m, s, 4)['tokens'] == greedy(m, s, 4)['tokens'])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tiny_mistral_gguf_f16)], env=_env(rpc_cache), cwd=ROOT,
        text=True, capture_output=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "True"


# -- the probe -----------------------------------------------------------------------------------


def test_the_probe_reads_a_workers_protocol_and_memory(two_workers: tuple[str, str]) -> None:
    a, _ = two_workers
    found = rpc.probe("localhost:" + a.rpartition(":")[2])
    assert found.endpoint == a  # the IPv4 address llama.cpp names the devices by
    assert found.version == ".".join(map(str, rpc.PROTOCOL))  # the same llama.cpp
    assert len(found.total_bytes) == 1 and 0 < found.free_bytes[0] <= found.total_bytes[0]


@contextlib.contextmanager
def listener(kind: str) -> Iterator[str]:
    """A loopback port that is not a worker: closed, a web server, an SSH server, one that
    hangs up, one that never answers, one that answers the handshake with protocol 5.0.0."""
    if kind == "refused":
        yield f"127.0.0.1:{_free_port()}"
        return
    if kind == "http":
        server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            server.server_close()
        return
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)  # "silent": the kernel accepts into the backlog, nobody reads
    answers = {
        "ssh": b"SSH-2.0-OpenSSH_9.2p1\r\n",  # speaks first, then waits
        "v5": struct.pack("<Q4B", 28, 5, 0, 0, 0) + bytes(24),  # a HELLO of protocol 5.0.0
    }

    def answer() -> None:
        conn, _ = sock.accept()
        with conn:
            if kind in answers:
                conn.sendall(answers[kind])
                conn.recv(64)  # until the probe hangs up

    if kind != "silent":
        threading.Thread(target=answer, daemon=True).start()
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("kind", "said"),
    [
        ("refused", "nothing listens at"),
        # a web server waits for a request line that the handshake never sends
        ("http", "did not answer llama.cpp's RPC handshake"),
        ("ssh", "answered like an SSH server"),
        ("closes", "is not a llama.cpp RPC worker"),  # hung up, or reset
        ("silent", "did not answer llama.cpp's RPC handshake"),
        ("v5", "speaks llama.cpp RPC protocol 5.0.0"),
    ],
)
def test_a_bad_endpoint_is_one_clear_error(kind: str, said: str) -> None:
    with listener(kind) as endpoint, pytest.raises(WorkerError) as caught:
        rpc.probe(endpoint, timeout=1.0)
    assert said in caught.value.message and caught.value.hint


def test_a_busy_worker_is_an_error_not_a_hang(two_workers: tuple[str, str]) -> None:
    # a worker serves one client at a time: while another holds it, the probe gets no answer
    _, b = two_workers
    host, _, port = b.rpartition(":")
    with socket.create_connection((host, int(port))) as holder:
        holder.sendall(struct.pack("<BQ", 14, 24) + bytes(24))
        reply = b""
        while len(reply) < 8 + 28:  # the size, then HELLO's reply: TCP may split them
            piece = holder.recv(64)
            assert piece, f"the worker hung up after {len(reply)} bytes"
            reply += piece
        assert len(reply) == 8 + 28
        with pytest.raises(WorkerError, match="busy"):
            rpc.probe(b, timeout=1.0)
    _ready(b, timeout=10.0)  # free again once that client left


def test_an_unresolvable_worker_is_an_error() -> None:
    with pytest.raises(WorkerError, match="cannot resolve"):
        rpc.probe("no-such-host.invalid:50052", timeout=1.0)


@pytest.mark.parametrize("kind", ["refused", "closes", "v5"])
def test_a_client_given_a_bad_worker_gets_an_error_not_a_signal(
    kind: str, rpc_cache: Path, tiny_mistral_gguf_f16: Path
) -> None:
    # llama.cpp's own add_server aborts the process (SIGABRT) on each of these
    with listener(kind) as endpoint:
        found, done = client(rpc_cache, tiny_mistral_gguf_f16, {"rpc": [endpoint]})
    assert done.returncode == 3, done.stderr[-2000:]
    assert endpoint in str(found["error"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:50052", rpc.Endpoint("127.0.0.1", 50052)),
        (" Worker-2.LAN:1 ", rpc.Endpoint("worker-2.lan", 1)),
    ],
)
def test_endpoints_parse(text: str, expected: rpc.Endpoint) -> None:
    assert rpc.parse_endpoint(text) == expected


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("[::1]:50052", "IPv4 only"),
        ("::1", "IPv4 only"),
        ("worker", "not HOST:PORT"),
        (":50052", "not HOST:PORT"),
        ("a b:50052", "not HOST:PORT"),
        ("worker:0", "from 1 to 65535"),
        ("worker:70000", "from 1 to 65535"),
        ("worker:http", "from 1 to 65535"),
    ],
)
def test_a_malformed_endpoint_is_a_usage_error(text: str, said: str) -> None:
    with pytest.raises(UsageError, match=said):
        rpc.parse_endpoint(text)


def test_an_endpoint_list_is_comma_separated_each_once() -> None:
    found = rpc.parse_endpoints(["a:1,b:2", "a:1"])
    assert found == (rpc.Endpoint("a", 1), rpc.Endpoint("b", 2))
    with pytest.raises(UsageError, match="at most 16"):
        rpc.parse_endpoints(",".join(f"h:{p}" for p in range(1, 18)))


# -- the load door ---------------------------------------------------------------------------------


def test_the_door_sends_every_layer_to_the_workers_unless_told(tiny_mistral_gguf_f16: Path) -> None:
    from localmix import load

    target = load.locate(tiny_mistral_gguf_f16)
    config, plan = load.configure(target, load.LoadSettings(rpc=("LocalHost:50052",)))
    assert (config.rpc, config.n_gpu_layers, plan) == (("localhost:50052",), -1, None)
    config, _ = load.configure(target, load.LoadSettings(rpc=("h:1",), n_gpu_layers=1))
    assert config.n_gpu_layers == 1
    with pytest.raises(UsageError, match="does not place layers on RPC workers"):
        load.configure(target, load.LoadSettings(rpc=("h:1",), vram_budget="1G"))


def test_the_rpc_backend_joins_llama_cpps_own_registry(rpc_cache: Path) -> None:
    # through libllama's handle: llama-cpp-python's _ggml.libggml is a second copy of libggml,
    # whose registry llama.cpp never reads (llama_supports_rpc stayed False there)
    code = (
        "from localmix.llama import rpc, lib; from localmix.llama.backend import llama; "
        "rpc.load(); rpc.load(); print(llama().llama_supports_rpc(), 'RPC' in lib.backends())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=_env(rpc_cache), cwd=ROOT, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert done.stdout.split() == ["True", "True"], done.stderr[-2000:]


# -- the worker command ----------------------------------------------------------------------------


def test_the_worker_says_what_it_serves_and_stops_on_ctrl_c(rpc_cache: Path) -> None:
    with worker(rpc_cache) as (endpoint, process):
        assert process.stderr is not None
        said = []  # what it says once it listens (the probe may see it listen a moment earlier)
        while not said or "Ctrl-C stops it" not in said[-1]:
            said.append(process.stderr.readline())
            assert said[-1], said
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
        err = "".join(said) + err
    assert process.returncode == 130, err
    assert f"serving at {endpoint}" in err and "CPU:" in err and "free of" in err
    assert f"tensor cache: {rpc_cache / 'rpc'}" in err
    assert "interrupted" in err and "Traceback" not in err + out


def test_a_worker_on_a_port_in_use_is_a_clear_error(rpc_cache: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "localmix", "worker", "--port", str(port)],
            env=_env(rpc_cache), cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert done.returncode == 2
    assert f"port {port} on 127.0.0.1 is in use" in done.stderr and "hint:" in done.stderr


def test_a_worker_beyond_loopback_warns_and_says_how_to_tunnel(rpc_cache: Path) -> None:
    # 192.0.2.1 (TEST-NET-1) is no address of this machine: warned, then refused, never served
    done = subprocess.run(
        [sys.executable, "-m", "localmix", "worker", "--host", "192.0.2.1", "--port", "50052"],
        env=_env(rpc_cache), cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    err = " ".join(done.stderr.split())
    assert "no authentication" in err and "ssh -N -L 50052:127.0.0.1:50052" in err
    assert done.returncode == 2 and "192.0.2.1 is not an address of this machine" in err


@pytest.mark.slow
def test_a_worker_killed_mid_generation_aborts_the_client_today(
    rpc_cache: Path, tiny_mistral_gguf_f16: Path
) -> None:
    """What happens now, written down: llama.cpp 0.3.36 aborts the client process (SIGABRT)
    when a worker dies under it ("Remote RPC server crashed"). The next phase runs RPC engines
    in a child process so that this becomes an error for the reply, not a dead CLI."""
    with worker(rpc_cache, "--no-cache") as (endpoint, process):
        settings = {"rpc": [endpoint], "ctx": 4096}
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.rpc_client", str(tiny_mistral_gguf_f16),
             json.dumps(settings), "4000"],
            env=_env(rpc_cache), cwd=ROOT, text=True, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        assert child.stdout is not None
        for _ in range(3):  # generating on the worker
            assert json.loads(child.stdout.readline())["token"] >= 0
        process.kill()
        out, err = child.communicate(timeout=120)
    assert child.returncode == -signal.SIGABRT, (child.returncode, err[-2000:])
    assert "Remote RPC server crashed" in err
    assert '"tokens"' not in out


# -- chat --rpc ------------------------------------------------------------------------------------


def _chat(cache: Path, model: Path, *more: str) -> subprocess.CompletedProcess[str]:
    args = ["chat", str(model), "Say hello", "--temperature", "0", "--max-tokens", "12"]
    args += ["--no-repack", "--threads", "1", "--ctx", "512", *more]
    return subprocess.run(
        [sys.executable, "-m", "localmix", *args], env=_env(cache), cwd=ROOT,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.slow
def test_chat_over_two_workers_gives_the_local_reply(
    rpc_cache: Path, tiny_mixtral_gguf_f16: Path
) -> None:
    local = _chat(rpc_cache, tiny_mixtral_gguf_f16)
    assert local.returncode == 0 and local.stdout.strip(), local.stderr
    with worker(rpc_cache, "--no-cache") as (a, pa), worker(rpc_cache, "--no-cache") as (b, pb):
        remote = _chat(rpc_cache, tiny_mixtral_gguf_f16, "--rpc", f"{a},{b}")
        logs = []
        for process in (pa, pb):
            process.kill()
            logs.append(process.communicate(timeout=30)[0])
    assert remote.returncode == 0, remote.stderr
    assert remote.stdout == local.stdout
    # each worker had the test's probe, the chat's probe and then llama.cpp's connection
    assert all(log.count("Accepted client connection") >= 3 for log in logs), logs


def test_chat_with_an_unreachable_worker_is_an_error_line(
    rpc_cache: Path, tiny_mistral_gguf_f16: Path
) -> None:
    port = _free_port()
    done = _chat(rpc_cache, tiny_mistral_gguf_f16, "--rpc", f"127.0.0.1:{port}")
    assert done.returncode == 7, done.stderr
    assert f"error: nothing listens at 127.0.0.1:{port}" in done.stderr
    assert "hint: start `localmix worker" in done.stderr and "Traceback" not in done.stderr


# -- the worker's tensor cache -----------------------------------------------------------------


@pytest.fixture(scope="module")
def small_mistral_f16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 256-wide Mistral in F16: its output matrix (16 MB) is over the 10 MiB from which
    llama.cpp's client offers a worker a tensor's hash before its bytes."""
    from tests.conftest import _small_ckpt, _tiny_gguf

    return _tiny_gguf(tmp_path_factory, _small_ckpt(tmp_path_factory), "f16")


@pytest.mark.slow
def test_a_cached_worker_is_sent_a_large_tensor_once(
    rpc_cache: Path, small_mistral_f16: Path
) -> None:
    import shutil

    shutil.rmtree(rpc_cache / "rpc", ignore_errors=True)
    local = client(rpc_cache, small_mistral_f16, {}, n_tokens=4)[0]
    with worker(rpc_cache) as (endpoint, process):  # --cache is the default
        first = client(rpc_cache, small_mistral_f16, {"rpc": [endpoint]}, n_tokens=4)[0]
        second = client(rpc_cache, small_mistral_f16, {"rpc": [endpoint]}, n_tokens=4)[0]
        process.kill()
        log = process.communicate(timeout=30)[1]
    assert first["tokens"] == second["tokens"] == local["tokens"]
    assert first["logits"] == second["logits"] == local["logits"]
    # the first load sent it and the worker kept it; the second sent its hash alone
    assert log.count("saved to") == 1, log[-3000:]
    assert len(list((rpc_cache / "rpc").iterdir())) == 1


# -- where the plug-in cannot be built -----------------------------------------------------------


def _worker_without(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    cache = tmp_path / "fresh-cache"  # no plug-in yet
    return subprocess.run(
        [sys.executable, "-m", "localmix", "worker", "--port", str(_free_port())],
        env={**_env(cache), **env}, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("missing", "env", "said"),
    [
        ("compiler", {"PATH": "", "CXX": ""}, "building one needs a C++ compiler"),
        # offline: no index, no links, so pip cannot fetch the sdist
        ("source", {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1"}, "pip could not fetch"),
    ],
)
def test_without_an_rpc_build_the_error_says_how_to_install_one(
    missing: str, env: dict[str, str], said: str, tmp_path: Path
) -> None:
    done = _worker_without(tmp_path, **env)
    assert done.returncode == 13, done.stderr
    err = " ".join(done.stderr.split())
    assert said in err and "Traceback" not in err
    assert 'CMAKE_ARGS="-DGGML_RPC=on" pip install --force-reinstall --no-cache-dir' in err
    # nothing half-built: no plug-in, no staging folder
    built = tmp_path / "fresh-cache" / "llama.cpp-rpc"
    assert not [p for p in built.rglob("*") if not p.name.endswith(".lock")]


def test_a_stopped_worker_drops_the_cache_files_it_may_not_have_finished(tmp_path: Path) -> None:
    # llama.cpp writes a cache file in place and trusts its name (the content's hash) forever
    old, recent = tmp_path / "00000000000000aa", tmp_path / "00000000000000bb"
    old.write_bytes(b"whole")
    recent.write_bytes(b"cut sh")
    os.utime(old, (1000.0, 1000.0))
    os.utime(recent, (1999.5, 1999.5))
    assert rpc.drop_unfinished(tmp_path, now=2000.0) == 1
    assert [p.name for p in tmp_path.iterdir()] == [old.name]
