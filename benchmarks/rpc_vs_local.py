"""`localmix bench` with every layer on one loopback `localmix worker` against the same local run
(and, with --llama-bench, against llama.cpp's `llama-bench -rpc` on the same worker and split).

pp512 and tg128 on the 125M synthetic Mistral (Q4_K_M, engine_vs_llama_bench.make_model), the
same threads for the client and the worker, weight repacking off everywhere (a worker's CPU
never repacks). Each client is a fresh `localmix bench` process (a process cannot leave a
worker it joined); each round runs the tools back to back, rotating which goes first, and the
verdict is the median of per-round ratios with its 95% bootstrap interval (pairing.py).

What the ratios say: over loopback a layer split costs about one synchronous round trip per
token per worker, which shows in tg far more than in pp (one trip per 512-token batch).
llama-bench -rpc needs llama.cpp's tools built with -DGGML_RPC=ON: --llama-bench builds them
once into their own folder of the user cache (`tools-rpc`, beside llamacpp_tools.py's `tools`;
several minutes on 2 cores), then reuses them.

    python benchmarks/rpc_vs_local.py [--rounds 8] [--reps 2] [--threads 1] [--llama-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_vs_llama_bench import make_model
from llamacpp_tools import _NO_AMX_FLAGS, _build, pinned_version
from pairing import mean_std, paired

REPO = Path(__file__).resolve().parent.parent
TESTS = ("pp512", "tg128")


def rpc_llama_bench() -> Path:
    """llama-bench built with the RPC backend, from the pinned sdist (its own build folder)."""
    return _build("tools-rpc", ("llama-bench",), ("-DGGML_RPC=ON", *_NO_AMX_FLAGS), None) / (
        "llama-bench"
    )


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "LOCALMIX_RPC": ""}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_worker(threads: int) -> tuple[str, subprocess.Popen[bytes]]:
    """`localmix worker` on a free loopback port, ready when a probe answers."""
    from localmix.errors import WorkerError
    from localmix.llama import rpc

    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "localmix", "worker", "--port", str(port), "--threads",
         str(threads), "--no-cache"],
        env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    endpoint = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"localmix worker exited {process.returncode}")
        try:
            rpc.probe(endpoint, timeout=1.0)
            return endpoint, process
        except WorkerError:
            time.sleep(0.2)
    raise SystemExit(f"no worker at {endpoint}")


def _wait_free(endpoint: str) -> None:
    """Until the worker has let the last client go (it serves one at a time)."""
    from localmix.errors import WorkerError
    from localmix.llama import rpc

    for _ in range(100):
        try:
            rpc.probe(endpoint, timeout=1.0)
            return
        except WorkerError:
            time.sleep(0.1)


def _rows(stdout: str) -> dict[str, list[float]]:
    rows = json.loads(stdout)
    return {
        (f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"): r["samples_ts"]
        for r in rows
    }


def localmix_bench(model: Path, threads: int, reps: int, rpc: str | None) -> dict[str, list[float]]:
    cmd = [sys.executable, "-m", "localmix", "bench", str(model), "-p", "512", "-n", "128",
           "-t", str(threads), "-r", str(reps), "--repack", "0", "-o", "json", "--no-save"]  # fmt: skip
    if rpc:
        cmd += ["-rpc", rpc]
    done = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, check=True)
    return _rows(done.stdout)


def llama_bench(model: Path, threads: int, reps: int, rpc: str) -> dict[str, list[float]]:
    cmd = [str(rpc_llama_bench()), "-m", str(model), "-p", "512", "-n", "128", "-t", str(threads),
           "-r", str(reps), "--repack", "0", "-o", "json", "-rpc", rpc, "-ngl", "99"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return _rows(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--llama-bench", action="store_true", help="also llama-bench -rpc")
    args = parser.parse_args()
    model = make_model("mistral")
    if args.llama_bench:
        rpc_llama_bench()  # built before anything is timed
    endpoint, worker = start_worker(args.threads)
    tools = {
        "local": lambda: localmix_bench(model, args.threads, args.reps, None),
        "rpc": lambda: localmix_bench(model, args.threads, args.reps, endpoint),
    }
    if args.llama_bench:
        tools["llama-bench -rpc"] = lambda: llama_bench(model, args.threads, args.reps, endpoint)
    samples: dict[str, dict[str, list[float]]] = {n: {t: [] for t in TESTS} for n in tools}
    try:
        for index in range(args.rounds):
            names = list(tools)
            names = names[index % len(names) :] + names[: index % len(names)]
            for name in names:
                _wait_free(endpoint)
                for test, values in tools[name]().items():
                    samples[name][test].append(statistics.mean(values))
            said = "  ".join(f"{n} {samples[n]['tg128'][-1]:.1f}" for n in tools)
            print(f"round {index + 1}/{args.rounds} tg128 t/s: {said}", file=sys.stderr)
    finally:
        worker.kill()
        worker.wait()
    print(f"llama-cpp-python {pinned_version()}; {model.name}; {args.threads} thread(s) each")
    print(f"{args.rounds} rounds x {args.reps} repetitions, rotating; ratio: median of per-round")
    print("ratios [95% bootstrap interval]")
    print(f"{'test':<6} {'local t/s':>14} {'rpc t/s':>14} {'rpc / local':>22}", end="")
    print(f" {'llama-bench -rpc t/s':>21} {'rpc / llama-bench':>22}" if args.llama_bench else "")
    for test in TESTS:
        local, remote = samples["local"][test], samples["rpc"][test]
        line = f"{test:<6} {mean_std(local):>14} {mean_std(remote):>14} "
        line += f"{paired(remote, local)!s:>22}"
        if args.llama_bench:
            theirs = samples["llama-bench -rpc"][test]
            line += f" {mean_std(theirs):>21} {paired(remote, theirs)!s:>22}"
        print(line)
    tg_local, tg_remote = (statistics.median(samples[n]["tg128"]) for n in ("local", "rpc"))
    extra_ms = 1000 / tg_remote - 1000 / tg_local
    print(f"cost of the worker per generated token: {extra_ms:.3f} ms (median tg128 rates)")


if __name__ == "__main__":
    main()
