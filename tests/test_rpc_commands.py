"""--rpc (and LOCALMIX_RPC) on every command that loads a model: bench (llama-bench's -rpc, its
column and records), eval, serve (a worker killed mid-request is an error for that request,
and the server goes on), and doctor (the build's RPC backend, each worker's probe). Every client
is a `localmix` child process on loopback workers (tests/test_rpc.py's `worker`): a process that
joined a worker cannot forget it."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from localmix.bench.result import BenchResult
from tests.conftest import ROOT, rpc_env
from tests.test_rpc import _free_port, _ready, worker


@pytest.fixture(scope="module")
def one_worker(rpc_cache: Path) -> Iterator[str]:
    with worker(rpc_cache, "--no-cache") as (endpoint, _):
        yield endpoint


def _localmix(
    cache: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "localmix", *args], env={**rpc_env(cache), **(env or {})},
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


# -- bench -------------------------------------------------------------------------------------

BENCH = ("-p", "16", "-n", "4", "-r", "1", "--no-warmup", "-t", "1", "--repack", "0")


def test_bench_over_a_worker_shows_it_in_its_table_json_and_history(
    rpc_cache: Path, one_worker: str, tiny_mistral_gguf_f16: Path, tmp_path: Path
) -> None:
    home = {"LOCALMIX_HOME": str(tmp_path / "home")}
    done = _localmix(rpc_cache, "bench", str(tiny_mistral_gguf_f16), *BENCH, "-rpc", one_worker,
                     env=home)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    header, *rows = [line.split() for line in done.stdout.splitlines() if line.strip()]
    assert "rpc" in header and "backend" in header
    for row in rows:  # pp16 and tg4, each on the worker
        assert one_worker in row and "RPC" in row
    history = (tmp_path / "home" / "bench" / "history.jsonl").read_text().splitlines()
    saved = [BenchResult.from_json(json.loads(line)) for line in history]
    assert [(r.test, r.rpc_servers, r.backends) for r in saved] == [
        ("pp16", one_worker, "RPC"),
        ("tg4", one_worker, "RPC"),
    ]
    # llama-bench's json, the workers after its own keys; LOCALMIX_RPC instead of the flag
    done = _localmix(rpc_cache, "bench", str(tiny_mistral_gguf_f16), *BENCH, "-o", "json",
                     "--no-save", env={**home, "LOCALMIX_RPC": one_worker})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    records = json.loads(done.stdout)
    assert [(r["rpc_servers"], r["backends"]) for r in records] == [(one_worker, "RPC")] * 2
    assert list(records[0])[-3:] == ["samples_ns", "samples_ts", "rpc_servers"]


def test_bench_rows_without_rpc_keep_llama_benchs_columns() -> None:
    from localmix.bench import report
    from localmix.bench.run import with_rpc

    base = {
        "model_filename": "m.gguf", "model_type": "llama ?B F16", "model_size": 1,
        "model_n_params": 1, "n_batch": 2048, "n_ubatch": 512, "n_threads": 1, "type_k": "f16",
        "type_v": "f16", "n_gpu_layers": -1, "flash_attn": "auto", "n_prompt": 16, "n_gen": 0,
        "n_depth": 0, "test_time": "t", "samples_ns": (1000,),
    }  # fmt: skip
    local = BenchResult(**base)  # type: ignore[arg-type]
    remote = BenchResult(**base, rpc_servers="127.0.0.1:50052", backends="RPC")  # type: ignore[arg-type]
    assert "rpc" not in report.to_markdown([local]).splitlines()[0].split()
    assert "rpc" in report.to_markdown([local, remote]).splitlines()[0].split()
    assert "rpc_servers" not in report.to_json([local]) and "rpc_servers" not in local.to_json()
    assert json.loads(report.to_jsonl([remote]))["rpc_servers"] == "127.0.0.1:50052"
    assert (with_rpc("CPU", ("h:1",)), with_rpc("CUDA", ("h:1",)), with_rpc("CUDA", ())) == (
        "RPC",
        "CUDA,RPC",
        "CUDA",
    )


# -- chat: the flag over the variable ---------------------------------------------------------


def test_chat_reads_localmix_rpc_and_the_flag_wins_over_it(
    rpc_cache: Path, one_worker: str, tiny_mistral_gguf_f16: Path
) -> None:
    dead = f"127.0.0.1:{_free_port()}"
    args = ["chat", str(tiny_mistral_gguf_f16), "Say hello", "--temperature", "0"]
    args += ["--max-tokens", "4", "--no-repack", "--threads", "1", "--ctx", "512"]
    refused = _localmix(rpc_cache, *args, env={"LOCALMIX_RPC": dead})
    assert refused.returncode == 7 and f"nothing listens at {dead}" in refused.stderr
    done = _localmix(rpc_cache, *args, "--rpc", one_worker, env={"LOCALMIX_RPC": dead})
    assert done.returncode == 0 and done.stdout.strip(), done.stderr[-2000:]


# -- eval --------------------------------------------------------------------------------------


def test_eval_over_a_worker_scores_as_the_local_run(
    rpc_cache: Path, one_worker: str, tiny_mistral_gguf_f16: Path, tiny_mistral_gguf_f32: Path
) -> None:
    args = ["eval", str(tiny_mistral_gguf_f16), "--against", str(tiny_mistral_gguf_f32)]
    args += ["--ctx", "256", "--chunks", "1", "-t", "1", "--no-repack", "--json"]
    local = _localmix(rpc_cache, *args)
    assert local.returncode == 0, local.stderr[-2000:]
    # both models (the model and its reference) on the one worker, named by LOCALMIX_RPC
    remote = _localmix(rpc_cache, *args, env={"LOCALMIX_RPC": one_worker})
    assert remote.returncode == 0, remote.stderr[-2000:]
    found, expected = json.loads(remote.stdout), json.loads(local.stdout)
    assert found["scores"] == expected["scores"]  # the same logits, bit for bit
    assert found["scores"]["n_tokens"] > 0


# -- doctor ------------------------------------------------------------------------------------


def test_doctor_says_the_build_has_rpc_and_lists_each_worker_or_its_error(
    rpc_cache: Path, one_worker: str
) -> None:
    dead = f"127.0.0.1:{_free_port()}"
    done = _localmix(rpc_cache, "doctor", "--json", "--rpc", f"{one_worker},{dead}")
    assert done.returncode == 7, done.stderr[-2000:]  # after saying everything
    rpc = json.loads(done.stdout)["rpc"]
    assert rpc["backend"] == "plug-in" and Path(rpc["path"]).is_relative_to(rpc_cache)
    good, bad = rpc["workers"]
    assert good["endpoint"] == one_worker and good["version"] and good["free_bytes"][0] > 0
    assert bad["endpoint"] == dead and "nothing listens" in bad["error"] and bad["hint"]
    text = _localmix(rpc_cache, "doctor", env={"LOCALMIX_RPC": one_worker, "COLUMNS": "200"})
    assert text.returncode == 0, text.stderr[-2000:]
    assert "the plug-in built from the pinned" in text.stdout
    assert "RPC WORKER" in text.stdout and one_worker in text.stdout


def test_doctor_without_an_rpc_build_says_how_to_get_one(tmp_path: Path, rpc_cache: Path) -> None:
    done = _localmix(rpc_cache, "doctor", "--json", env={"LOCALMIX_CACHE": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    rpc = json.loads(done.stdout)["rpc"]
    assert (rpc["backend"], rpc["path"], rpc["workers"]) == ("none", None, [])
    assert 'CMAKE_ARGS="-DGGML_RPC=on"' in rpc["summary"] and "builds it" in rpc["summary"]
    assert not list(tmp_path.iterdir())  # doctor builds nothing


# -- serve -------------------------------------------------------------------------------------


def _post(url: str, body: dict[str, object], timeout: float = 120) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.mark.slow
def test_serve_answers_an_error_when_its_worker_dies_and_serves_on_a_new_one(
    rpc_cache: Path, tiny_mistral_gguf_f16: Path
) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with worker(rpc_cache, "--no-cache") as (endpoint, rpc_worker):
        server = subprocess.Popen(
            [sys.executable, "-m", "localmix", "serve", "--port", str(port), "--rpc", endpoint,
             "--threads", "1", "--ctx", "4096", "--no-repack", str(tiny_mistral_gguf_f16)],
            env=rpc_env(rpc_cache), cwd=ROOT, text=True, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            assert server.stderr is not None
            said = ""
            while "listening on" not in said:
                line = server.stderr.readline()
                assert line, said
                said += line
            assert "one model is loaded at a time" in said
            body = {"model": str(tiny_mistral_gguf_f16), "prompt": "Once upon a time",
                    "max_tokens": 8, "temperature": 0}  # fmt: skip
            status, first = _post(f"{url}/v1/completions", body)
            assert status == 200, first
            # a long request; the worker under it dies: that request is an error
            long = {**body, "max_tokens": 4000, "ignore_eos": True}  # generating when it dies
            answers: list[tuple[int, dict]] = []
            asking = threading.Thread(
                target=lambda: answers.append(_post(f"{url}/v1/completions", long))
            )
            asking.start()
            time.sleep(1.0)
            rpc_worker.kill()
            asking.join(timeout=120)
            assert answers and answers[0][0] >= 500, answers
            assert "died" in json.dumps(answers[0][1]), answers
        finally:
            if server.poll() is not None:
                raise AssertionError(f"serve exited {server.returncode}: {server.stderr.read()}")
    # a new worker on the same port: the next request loads the model on it afresh
    port_of = int(endpoint.rpartition(":")[2])
    replacement = subprocess.Popen(
        [sys.executable, "-m", "localmix", "worker", "--port", str(port_of), "--threads", "1",
         "--no-cache"],
        env=rpc_env(rpc_cache), cwd=ROOT, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        _ready(endpoint, replacement)
        status, again = _post(f"{url}/v1/completions", body)
        assert status == 200, again
        assert again["choices"][0]["text"] == first["choices"][0]["text"]
    finally:
        for process in (server, replacement):
            process.kill()
            process.communicate(timeout=30)
