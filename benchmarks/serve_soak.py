"""A soak of `localmix serve`: 500 short requests from concurrent clients, a share of them
abandoned midway, and checks that nothing went wrong beyond what was expected and that memory
stayed flat.

The server runs as its own process on 127.0.0.1 (`python -m localmix serve MODEL --port P -np 4`)
with the synthetic 125M Mistral Q4_K_M the other benchmarks use. --clients clients (asyncio +
httpx) send --requests requests in all, each one drawn at random: OpenAI chat or completions or
Ollama chat, streamed or not, 4 to 32 tokens, sampled or greedy, some with stop strings. About
--cancel of the streamed ones are abandoned after their first few pieces (the client closes the
connection), and about half that share of the others give up after a short timeout: their
generations must stop and free their sequences. Expected outcomes are 200 answers and those
abandonments; anything else (an error status, a broken stream, a server exit) is a failure.

Memory: the server's resident set size (VmRSS) is sampled after every 25 requests; after the
first 100 (warm-up: caches, allocator pools) it must not grow by more than --rss-growth MiB. At
the end /api/ps must show no request in progress. Bounded: each request has a timeout and the
whole soak --max-seconds.

    python benchmarks/serve_soak.py [--requests 500] [--clients 8] [--cancel 0.3] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # this checkout's localmix

from engine_vs_llama_bench import make_model
from llamacpp_tools import REPO
from serve_vs_llama_server import HOST, free_port

WARMUP = 100
SAMPLE_EVERY = 25
REQUEST_TIMEOUT_S = 60.0


@dataclass
class Soak:
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    rss: list[tuple[int, int]] = field(default_factory=list)  # (requests done, KiB)
    done: int = 0


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def start_server(model: Path, threads: int, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable, "-m", "localmix", "serve", str(model), "--host", HOST, "--port", str(port),
        "-t", str(threads), "-c", "512", "-np", "4", "--queue", "256",
    ]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def request(rng: random.Random, model: str, i: int) -> tuple[str, dict, bool]:
    """(route, body, streamed) for request i."""
    tokens = rng.randint(4, 32)
    greedy = rng.random() < 0.5
    text = f"Request {i}: tell me about the number {rng.randint(0, 10**6)}."
    stream = rng.random() < 0.6
    kind = rng.choice(("chat", "completions", "ollama"))
    sampling = {"temperature": 0} if greedy else {"temperature": 0.8, "seed": rng.randint(0, 99)}
    stop = [rng.choice(("the", "\n", "."))] if rng.random() < 0.3 else []
    if kind == "ollama":
        options = {**sampling, "num_predict": tokens, "stop": stop}
        body = {"model": model, "messages": [{"role": "user", "content": text}],
                "stream": stream, "options": options}  # fmt: skip
        return "/api/chat", body, stream
    body = {"model": model, "max_tokens": tokens, "stream": stream, "stop": stop, **sampling}
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": text}]
        return "/v1/chat/completions", body, stream
    body["prompt"] = text
    return "/v1/completions", body, stream


async def one(client: object, url: str, route: str, body: dict, stream: bool, rng: random.Random,
              cancel: float) -> str:  # fmt: skip
    """Send one request; returns its outcome ("ok", "abandoned", "gave up") or raises."""
    import httpx

    if not stream:
        timeout = 0.05 if rng.random() < cancel / 2 else REQUEST_TIMEOUT_S
        try:
            response = await client.post(url + route, json=body, timeout=timeout)  # type: ignore[attr-defined]
        except httpx.TimeoutException:
            if timeout < REQUEST_TIMEOUT_S:
                return "gave up"
            raise
        if response.status_code != 200:
            raise RuntimeError(f"{route}: {response.status_code} {response.text[:200]}")
        json.loads(response.text)
        return "ok"
    leave_after = rng.randint(1, 3) if rng.random() < cancel else None
    pieces = 0
    async with client.stream("POST", url + route, json=body) as response:  # type: ignore[attr-defined]
        if response.status_code != 200:
            raise RuntimeError(
                f"{route}: {response.status_code} {(await response.aread())[:200]!r}"
            )
        async for line in response.aiter_lines():
            if not line.strip() or line == "data: [DONE]":
                continue
            data = json.loads(line.removeprefix("data: "))
            if "error" in data:
                raise RuntimeError(f"{route}: error in the stream: {data['error']}")
            pieces += 1
            if leave_after is not None and pieces >= leave_after:
                return "abandoned"  # leaving the block closes the connection mid-stream
    return "ok"


async def soak(args: argparse.Namespace, model: Path) -> Soak:
    import httpx

    port = free_port()
    url = f"http://{HOST}:{port}"
    server = start_server(model, args.threads, port)
    result = Soak()
    rng = random.Random(args.seed)
    jobs = [request(rng, str(model), i) for i in range(args.requests)]
    deadline = time.monotonic() + args.max_seconds
    try:
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
            while True:  # until the model answers
                if server.poll() is not None:
                    raise RuntimeError("the server exited: " + server.stderr.read().decode()[-500:])  # type: ignore[union-attr]
                try:
                    if (await client.get(url + "/api/tags")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.2)
            queue: asyncio.Queue[tuple[str, dict, bool]] = asyncio.Queue()
            for job in jobs:
                queue.put_nowait(job)

            async def worker(seed: int) -> None:
                own = random.Random(seed)
                while not queue.empty() and time.monotonic() < deadline:
                    route, body, stream = queue.get_nowait()
                    try:
                        outcome = await one(client, url, route, body, stream, own, args.cancel)
                    except Exception as e:  # anything unexpected is a finding, not a crash
                        outcome = "failed"
                        result.failures.append(f"{type(e).__name__}: {e}"[:300])
                    result.outcomes[outcome] += 1
                    result.done += 1
                    if result.done % SAMPLE_EVERY == 0:
                        result.rss.append((result.done, rss_kib(server.pid)))

            await asyncio.gather(*(worker(args.seed * 1000 + c) for c in range(args.clients)))
            await asyncio.sleep(1.0)  # abandoned generations end at the next decode step
            ps = (await client.get(url + "/api/ps")).json()["models"]
            busy = sum(m.get("requests", 0) for m in ps)
            if busy:
                result.failures.append(f"/api/ps still shows {busy} requests in progress")
        if server.poll() is not None:
            result.failures.append(f"the server exited with {server.returncode}")
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    return result


def report(result: Soak, args: argparse.Namespace) -> bool:
    print(f"{result.done} of {args.requests} requests: " + ", ".join(
        f"{n} {what}" for what, n in result.outcomes.most_common()))  # fmt: skip
    for failure in result.failures[:10]:
        print("  failure:", failure)
    after = [kib for done, kib in result.rss if done >= WARMUP]
    growth = (max(after) - after[0]) / 1024 if len(after) > 1 else 0.0
    print("server RSS (MiB) every", SAMPLE_EVERY, "requests:",
          " ".join(f"{kib / 1024:.0f}" for _, kib in result.rss))  # fmt: skip
    print(f"growth after the first {WARMUP} requests: {growth:.1f} MiB (limit {args.rss_growth})")
    ok = not result.failures and result.done == args.requests and growth <= args.rss_growth
    print("soak:", "passed" if ok else "FAILED")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--cancel", type=float, default=0.3, help="share of streams abandoned")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rss-growth", type=float, default=32.0, help="MiB allowed after warm-up")
    parser.add_argument("--max-seconds", type=float, default=900.0)
    args = parser.parse_args()
    model = make_model("mistral")
    return 0 if report(asyncio.run(soak(args, model)), args) else 1


if __name__ == "__main__":
    sys.exit(main())
