"""`localmix chat`, the command users run, against llama.cpp's llama-bench: generation speed through
the whole CLI (a fresh process, the chat template, the session, the text stream, the --json output).

Each pair runs the real CLI as a subprocess,

    python -m localmix chat MODEL "Write a long story." --format v1 --json -n 256 -t T [mode]

in three modes (greedy: --temperature 0 --repeat-penalty 1; greedy with the default repeat penalty:
--temperature 0; default sampling with a fixed --seed), and llama-bench -p 0 -n 256 -r 1 -t T
back to back, swapping which goes first. The verdict per mode is the median of the per-pair ratios
with a 95% bootstrap interval (pairing.py). The model is the synthetic 125M Mistral Q4_K_M the other
benchmarks use (made once, cached); llama-bench is built from the llama.cpp source that the pinned
llama-cpp-python vendors (llamacpp_tools.py).

What is compared: the CLI's own reported generation rate (--json stats.gen_tps: tokens after the
first, over the time from the first pick to the last, so each interval holds one llama_decode plus
everything localmix does per token) against llama-bench's tg t/s (256 llama_decode calls after
a warmup). The chat prompt puts the reply at positions 13..268 where llama-bench's tg256 uses
0..255, and attention over the longer history costs a little more per token, so llama-bench also
runs again at that depth (-d <prompt tokens>, a separate process): the "depth-matched" ratio
compares the same positions.
The CLI must generate all 256 tokens (random weights could pick end-of-sequence; the fixed seed and
greedy picks are checked not to): every run's token count is reported, and a short one fails.

The process's wall time per generated token is reported beside, for both tools (llama-bench's
run at depth 0): it adds interpreter start, imports and model load (llama-bench: model load and a
warmup token), which a 256-token reply does not amortise; "startup" is the CLI's wall time outside
its time to first token and generation.

    python benchmarks/chat_vs_llama_bench.py [--rounds 8] [--threads 1,2] [--seed 7]

Targets: greedy (with or without the repeat penalty) >= 0.97x, sampled >= 0.95x of llama-bench.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # this checkout's localmix

from engine_vs_llama_bench import make_model
from llamacpp_tools import REPO, bench_repack_args, pinned_version, tool
from pairing import mean_std, paired

PROMPT = "Write a long story."
N_GEN = 256
MODES = {
    "greedy": ("--temperature", "0", "--repeat-penalty", "1"),
    "greedy + repeat penalty": ("--temperature", "0"),
    "sampled": (),  # defaults; --seed is added
}
TARGETS = {"greedy": 0.97, "greedy + repeat penalty": 0.97, "sampled": 0.95}


@dataclass
class Runs:
    """One mode at one thread count: per pair, each tool's t/s, wall times and token counts."""

    cli_tps: list[float] = field(default_factory=list)
    bench_tps: list[float] = field(default_factory=list)
    bench_depth_tps: list[float] = field(default_factory=list)
    cli_wall: list[float] = field(default_factory=list)  # seconds, whole process
    bench_wall: list[float] = field(default_factory=list)
    cli_tokens: list[int] = field(default_factory=list)
    cli_startup: list[float] = field(default_factory=list)  # wall - ttft - generation


def run_cli(model: Path, threads: int, mode: str, seed: int) -> tuple[dict, float]:
    """One `localmix chat` process: (its --json stats, its wall seconds)."""
    args = [*MODES[mode], *(("--seed", str(seed)) if mode == "sampled" else ())]
    cmd = [
        sys.executable, "-m", "localmix", "chat", str(model), PROMPT, "--format", "v1", "--json",
        "-n", str(N_GEN), "-t", str(threads), *args,
    ]  # fmt: skip
    # the localmix of this checkout, whatever is installed; no stdin (chat would read a pipe)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH")))),
    }
    start = time.perf_counter()
    done = subprocess.run(
        cmd, capture_output=True, text=True, check=True, env=env, stdin=subprocess.DEVNULL
    )
    wall = time.perf_counter() - start
    return json.loads(done.stdout)["stats"], wall


def run_llama_bench(model: Path, threads: int, depth: int = 0) -> tuple[float, float]:
    """One llama-bench process, tg256 after `depth` tokens: (its t/s, its wall seconds)."""
    cmd = [
        str(tool("llama-bench")), "-m", str(model), "-p", "0", "-n", str(N_GEN), "-r", "1",
        "-t", str(threads), "-d", str(depth), "-o", "json", *bench_repack_args(),
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    return float(json.loads(done.stdout)[0]["avg_ts"]), wall


def measure(model: Path, threads: int, rounds: int, seed: int) -> dict[str, Runs]:
    runs = {mode: Runs() for mode in MODES}
    # the prompt's length, for the depth-matched llama-bench run (and a first check of the CLI)
    depth = run_cli(model, threads, "greedy", seed)[0]["prompt_tokens"]
    modes = list(MODES)
    pair = 0
    for index in range(rounds):
        order = modes[index % len(modes) :] + modes[: index % len(modes)]
        for mode in order:
            cli_first = pair % 2 == 1
            pair += 1
            if cli_first:
                stats, cli_wall = run_cli(model, threads, mode, seed)
            bench, bench_wall = run_llama_bench(model, threads)
            at_depth, _ = run_llama_bench(model, threads, depth)
            if not cli_first:
                stats, cli_wall = run_cli(model, threads, mode, seed)
            got = runs[mode]
            got.cli_tps.append(stats["gen_tps"])
            got.cli_tokens.append(stats["generated_tokens"])
            got.cli_wall.append(cli_wall)
            got.cli_startup.append(cli_wall - stats["ttft_s"] - stats["gen_s"])
            got.bench_tps.append(bench)
            got.bench_depth_tps.append(at_depth)
            got.bench_wall.append(bench_wall)
            print(
                f"threads {threads}, round {index + 1}/{rounds}, {mode}: localmix "
                f"{stats['gen_tps']:.2f} t/s ({stats['generated_tokens']} tokens), "
                f"llama-bench {bench:.2f} t/s (depth {depth}: {at_depth:.2f})",
                file=sys.stderr,
            )
    return runs


def own_cost(model: Path, threads: int, seed: int, reps: int = 3) -> dict[str, float]:
    """Seconds per token of localmix's own work in each mode, measured in this process: the CLI's
    reply path (Engine.stream, Session.send, chat's --json loop) with llama_decode taken out, so a
    token costs its pick on the last logits and everything around it. Unlike the paired ratios
    this is immune to other tenants. The sampler chain's C cost is measured with warm caches here;
    after a real decode it is higher (engine_vs_llama_bench.py measures that)."""
    import contextlib
    import io

    from localmix.chat.session import Session
    from localmix.cli.chat import _one_shot
    from localmix.llama.engine import Engine, EngineConfig
    from localmix.llama.records import Sampling

    samplings = {
        "greedy": Sampling(temperature=0.0, repeat_penalty=1.0),
        "greedy + repeat penalty": Sampling(temperature=0.0),
        "sampled": Sampling(seed=seed),
    }
    n = 2048
    costs: dict[str, float] = {}
    with Engine(EngineConfig(model, n_ctx=n + 64, n_threads=threads)) as engine:
        # no decode after the prompt's last token: its logits stay, every pick reads them
        real_step, first = engine._step, [True]

        def step(token: int) -> None:
            if first[0]:
                first[0] = False
                real_step(token)
            else:
                engine._kv.append(token)

        engine._step = step  # type: ignore[method-assign]
        for mode, sampling in samplings.items():
            best = float("inf")
            for _ in range(reps):
                engine.clear()
                first[0] = True
                session = Session(engine, "v1", sampling=sampling, max_tokens=n)
                with contextlib.redirect_stdout(io.StringIO()):
                    _one_shot(session, PROMPT, json_out=True, show_stats=False, show_thoughts=False)
                stats = engine.last_stats
                assert stats is not None and stats.generated_tokens > 1
                best = min(best, stats.gen_s / (stats.generated_tokens - 1))
            costs[mode] = best
    return costs


def report(results: dict[int, dict[str, Runs]], costs: dict[str, float]) -> bool:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"localmix chat vs llama-bench (llama-cpp-python {pinned_version()}, tg{N_GEN})",
        caption="ratio: median of per-pair localmix/llama-bench [95% bootstrap interval]; own work: "
        "localmix's per-token time with llama_decode taken out (share of llama-bench's token); "
        "wall: whole process, ms per generated token",
    )
    columns = (
        "threads", "mode", "tokens", "llama-bench t/s", "localmix t/s", "ratio",
        "depth-matched", "target", "own work µs/tok", "wall ms/tok (llama-bench, localmix)",
        "localmix startup s",
    )  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column == "mode" else "right")
    ok = True
    for threads, runs in results.items():
        for mode, got in runs.items():
            ratio = paired(got.cli_tps, got.bench_tps)
            depth = paired(got.cli_tps, got.bench_depth_tps)
            full = all(n == N_GEN for n in got.cli_tokens)
            good = ratio.median >= TARGETS[mode] and full
            ok &= good
            tokens = f"{min(got.cli_tokens)}" + ("" if full else " [red]SHORT[/]")
            walls = (
                f"{statistics.median(got.bench_wall) / N_GEN * 1e3:.1f}, "
                f"{statistics.median(got.cli_wall) / N_GEN * 1e3:.1f}"
            )
            table.add_row(
                str(threads), mode, tokens, mean_std(got.bench_tps), mean_std(got.cli_tps),
                str(ratio), str(depth),
                f"≥{TARGETS[mode]} " + ("[green]ok[/]" if good else "[red]below[/]"),
                f"{costs[mode] * 1e6:.1f} ({costs[mode] * statistics.median(got.bench_tps):.1%})",
                walls, f"{statistics.median(got.cli_startup):.2f}",
            )  # fmt: skip
    Console(width=200).print(table)
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="rounds of the three modes")
    parser.add_argument("--threads", default="1,2", help="comma list of thread counts")
    parser.add_argument("--seed", type=int, default=7, help="seed of the sampled mode")
    parser.add_argument("--model", type=Path, default=None, help="a GGUF instead of the 125M")
    args = parser.parse_args()
    tool("llama-bench")  # build before anything is timed
    model = args.model or make_model("mistral")
    print(f"{model.name}: {args.rounds} rounds of the three modes, each paired with llama-bench")
    results = {
        int(n): measure(model, int(n), args.rounds, args.seed) for n in args.threads.split(",")
    }
    costs = own_cost(model, 1, args.seed)
    sys.exit(0 if report(results, costs) else 1)


if __name__ == "__main__":
    main()
