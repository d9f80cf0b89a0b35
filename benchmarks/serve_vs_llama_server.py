"""`localmix serve` against llama.cpp's llama-server: aggregate generation speed and time to first
token with 1, 4 and 8 concurrent streaming clients.

Both servers run as their own processes on 127.0.0.1 (loopback only) with the same GGUF (the
synthetic 125M Mistral Q4_K_M the other benchmarks use, made once, cached), the same threads, 8
sequences decoded together from one unified KV cache of 8 x 512 tokens, and the same batch sizes:

    python -m localmix serve MODEL --port P -t T -c 512 -np 8
    llama-server -m MODEL --port P -t T -tb T -c 4096 -np 8 -kvu --no-webui --log-disable

llama-server is built from the llama.cpp source that the pinned llama-cpp-python vendors
(llamacpp_tools.py). The client (this process, asyncio + httpx) sends the same requests to both:
POST /v1/completions, streamed, greedy (temperature 0, repeat penalty 1), ignore_eos, a fixed
number of tokens, a different prompt per request. At each level, C clients each send --requests
requests one after another; aggregate t/s is all generated tokens over the level's wall time,
TTFT the mean time from sending a request to its first streamed text, and each server process's
CPU seconds per generated token are reported beside (from /proc; localmix's with its model
worker process). Each round runs every level
on both servers back to back (which goes first alternates); the verdict per level is the median
of the per-round ratios with a 95% bootstrap interval (pairing.py). Everything is bounded: the
requests, each request's timeout, and --max-seconds for the whole run.

    python benchmarks/serve_vs_llama_server.py [--rounds 3] [--threads 1] [--tokens 128]

Goal: localmix >= 0.9x llama-server's aggregate t/s at 1, 4 and 8 clients.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # this checkout's localmix

from engine_vs_llama_bench import make_model
from llamacpp_tools import REPO, pinned_version, repack_args, tool
from pairing import mean_std, paired

LEVELS = (1, 4, 8)
PARALLEL = 8
CTX_PER_SEQUENCE = 512
GOAL = 0.9
HOST = "127.0.0.1"
REQUEST_TIMEOUT_S = 120.0


@dataclass
class Level:
    """One level (C clients) of one server in one round."""

    tps: float  # generated tokens / wall seconds, all clients together
    ttft: float  # mean seconds to the first streamed text
    tokens: int
    cpu: float = 0.0  # the server process's CPU seconds per generated token (Linux)


@dataclass
class Results:
    ours: dict[int, list[Level]] = field(default_factory=dict)
    ref: dict[int, list[Level]] = field(default_factory=dict)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds so far of a process, its threads and its live children (serve's
    model workers), 0 where /proc is not."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(cpu_seconds(child) for child in _children(pid))


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_localmix(model: Path, threads: int, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable, "-m", "localmix", "serve", str(model), "--host", HOST, "--port", str(port),
        "-t", str(threads), "-c", str(CTX_PER_SEQUENCE), "-np", str(PARALLEL),
    ]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_llama_server(model: Path, threads: int, port: int) -> subprocess.Popen[bytes]:
    cmd = [
        str(tool("llama-server")), "-m", str(model), "--host", HOST, "--port", str(port),
        "-t", str(threads), "-tb", str(threads), "-c", str(CTX_PER_SEQUENCE * PARALLEL),
        "-np", str(PARALLEL), "-kvu", "--no-webui", "--log-disable", *repack_args(),
    ]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def wait_ready(url: str, model: str, process: subprocess.Popen[bytes]) -> None:
    """Until a one-token completion succeeds (both servers answer 503 or refuse while loading)."""
    import httpx

    deadline = time.monotonic() + 300
    async with httpx.AsyncClient(timeout=30) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{url}: the server exited with {process.returncode}")
            try:
                body = {"model": model, "prompt": "Hello", "max_tokens": 1}
                response = await client.post(url + "/v1/completions", json=body)
                if response.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} did not become ready")


async def one(client: object, url: str, model: str, prompt: str, tokens: int) -> tuple[float, int]:
    """One streamed completion: (seconds to the first text, generated tokens)."""
    body = {
        "model": model, "prompt": prompt, "max_tokens": tokens, "stream": True,
        "temperature": 0, "repeat_penalty": 1.0, "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    sent, first, pieces, counted = time.perf_counter(), None, 0, None
    async with client.stream("POST", url + "/v1/completions", json=body) as response:  # type: ignore[attr-defined]
        if response.status_code != 200:
            raise RuntimeError(f"{url}: {response.status_code} {await response.aread()!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                counted = data["usage"]["completion_tokens"]
            for choice in data.get("choices") or ():
                if choice.get("text"):
                    pieces += 1
                    if first is None:
                        first = time.perf_counter()
    if first is None:
        raise RuntimeError(f"{url}: no text streamed")
    return first - sent, counted if counted is not None else pieces


async def level(url: str, model: str, clients: int, requests: int, tokens: int, tag: int) -> Level:
    import httpx

    # A new connection per request, for both: llama-server (cpp-httplib) drops a kept-alive
    # connection now and then (measured: "Server disconnected without sending a response").
    limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:

        async def user(c: int) -> list[tuple[float, int]]:
            out = []
            for r in range(requests):
                prompt = f"Story {tag}-{c}-{r}: once upon a time, in a village by the sea,"
                out.append(await one(client, url, model, prompt, tokens))
            return out

        start = time.perf_counter()
        done = await asyncio.gather(*(user(c) for c in range(clients)))
        wall = time.perf_counter() - start
    runs = [run for per_user in done for run in per_user]
    generated = sum(n for _, n in runs)
    return Level(generated / wall, statistics.mean(t for t, _ in runs), generated)


async def measure(args: argparse.Namespace, model: Path) -> Results:
    ours_port, ref_port = free_port(), free_port()
    ours_url, ref_url = f"http://{HOST}:{ours_port}", f"http://{HOST}:{ref_port}"
    name = str(model)
    ours = start_localmix(model, args.threads, ours_port)
    ref = start_llama_server(model, args.threads, ref_port)
    results = Results()
    deadline = time.monotonic() + args.max_seconds
    try:
        await wait_ready(ours_url, name, ours)
        await wait_ready(ref_url, name, ref)
        for url in (ours_url, ref_url):  # warm both: every slot once
            await level(url, name, PARALLEL, 1, 8, tag=-1)
        for r in range(args.rounds):
            for clients in LEVELS:
                if time.monotonic() > deadline:
                    print(f"stopped at round {r + 1}: --max-seconds {args.max_seconds} reached")
                    return results
                pair = [("ours", ours_url), ("ref", ref_url)]
                pids = {"ours": ours.pid, "ref": ref.pid}
                for who, url in pair if (r + clients) % 2 == 0 else pair[::-1]:
                    before = cpu_seconds(pids[who])
                    try:
                        got = await level(url, name, clients, args.requests, args.tokens, tag=r)
                    except Exception as e:
                        alive = {k: p.poll() is None for k, p in (("ours", ours), ("ref", ref))}
                        raise RuntimeError(f"{who} ({url}), servers alive: {alive}: {e!r}") from e
                    got.cpu = (cpu_seconds(pids[who]) - before) / max(1, got.tokens)
                    if got.tokens != clients * args.requests * args.tokens:
                        raise RuntimeError(f"{who}: {got.tokens} tokens generated")
                    getattr(results, who).setdefault(clients, []).append(got)
                print(
                    f"round {r + 1} clients {clients}: localmix {results.ours[clients][-1].tps:.1f}"
                    f" t/s, llama-server {results.ref[clients][-1].tps:.1f} t/s",
                    flush=True,
                )
    finally:
        for process in (ours, ref):
            process.terminate()
        for process in (ours, ref):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    return results


def report(results: Results, args: argparse.Namespace) -> bool:
    print()
    print(
        f"localmix serve vs llama-server (llama.cpp of llama-cpp-python {pinned_version()}), "
        f"{args.threads} thread(s), {PARALLEL} sequences, {args.tokens} tokens x "
        f"{args.requests} requests per client"
    )
    head = (
        "clients | localmix t/s | llama-server t/s | t/s ratio [95% CI] | "
        "TTFT ms (localmix / llama-server) | TTFT ratio | CPU ms/token (localmix / llama-server)"
    )
    print(head)
    print("-" * len(head))
    ok = True
    for clients in LEVELS:
        ours, ref = results.ours.get(clients, []), results.ref.get(clients, [])
        if not ours or not ref:
            continue
        tps = paired([x.tps for x in ours], [x.tps for x in ref])
        ttft = paired([x.ttft for x in ours], [x.ttft for x in ref])
        ok = ok and tps.median >= GOAL
        print(
            f"{clients:7d} | {mean_std([x.tps for x in ours]):>12} | "
            f"{mean_std([x.tps for x in ref]):>16} | {tps!s:>18} | "
            f"{1000 * statistics.mean(x.ttft for x in ours):7.1f} / "
            f"{1000 * statistics.mean(x.ttft for x in ref):7.1f} | {ttft.median:10.3f} | "
            f"{1000 * statistics.mean(x.cpu for x in ours):5.2f} / "
            f"{1000 * statistics.mean(x.cpu for x in ref):5.2f}"
        )
    print(
        f"goal: aggregate t/s >= {GOAL}x llama-server at every level: {'met' if ok else 'NOT met'}"
    )
    print(
        "(TTFT ratio: localmix / llama-server, lower is better; CPU per token counts every "
        "thread of each server process, HTTP included: the measure a busy machine disturbs least)"
    )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=128, help="generated per request")
    parser.add_argument("--requests", type=int, default=2, help="per client, one after another")
    parser.add_argument("--model", default="mistral", choices=("mistral", "mixtral"))
    parser.add_argument("--max-seconds", type=float, default=1200.0)
    args = parser.parse_args()
    if not 1 <= args.tokens <= CTX_PER_SEQUENCE - 64:
        parser.error(f"--tokens must be between 1 and {CTX_PER_SEQUENCE - 64}")
    model = make_model(args.model)
    results = asyncio.run(measure(args, model))
    return 0 if report(results, args) else 1


if __name__ == "__main__":
    sys.exit(main())
