"""localmix's Engine against llama.cpp's own llama-bench, on the same Q4_K_M GGUFs and threads.

llama-bench is built from the llama.cpp source that the pinned llama-cpp-python vendors
(llamacpp_tools.py). Each round runs llama-bench (pp512 and tg128, 2 repetitions) and the engine
(2 of each test) back to back, swapping which goes first; the verdict is the median of the
per-round ratios (pairing.py), with its 95% bootstrap interval. Short rounds pair well: on a
shared machine the speed of these cache-sized models drifts by tens of percent within minutes. Measured: pp512 (Engine.process of
512 random tokens) and tg128 (128 decodes through Engine.stream: greedy, and llama.cpp's default
sampler chain via Sampling()).

llama-bench's tg does not sample. With sampling each token also pays llama.cpp's own sampler
chain (llama_sampler_sample: fill 32k candidates, top-k, ...). Every round measures that C cost
in a bare ctypes decode loop (sampler_cost), and a last row compares against llama-bench's time
per token plus it: what any front end on llama.cpp's sampler, llama-cli included, can reach.

    python benchmarks/engine_vs_llama_bench.py [--rounds 30] [--threads N] [--models mistral,mixtral]

Targets: tg greedy >= 0.97x, tg with default sampling >= 0.95x, pp >= 0.98x of llama-bench.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llamacpp_tools import bench_repack_args, pinned_version, tool
from pairing import mean_std, paired

from localmix import settings
from localmix.llama.engine import Engine, EngineConfig, Sampling, Stats
from localmix.llama.sampler import sampler_chain

N_PROMPT, N_GEN, REPS = 512, 128, 2
TARGETS = {"pp512": 0.98, "tg128 greedy": 0.97, "tg128 sampling": 0.95}
MODELS = {"mistral": ("mistral", "125m"), "mixtral": ("mixtral", "small")}


@dataclass
class Samples:
    """Per-round mean t/s of each tool and test, and the sampler's C cost per call (seconds)."""

    bench: dict[str, list[float]] = field(default_factory=dict)
    engine: dict[str, list[float]] = field(default_factory=dict)
    sampler_s: list[float] = field(default_factory=list)


def models_dir() -> Path:
    import platformdirs

    path = Path(platformdirs.user_cache_dir("localmix", appauthor=False)) / "bench-models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def make_model(name: str, tokenizer: str = "v1") -> Path:
    """A synthetic checkpoint → f16 GGUF → Q4_K_M GGUF, made once and reused. tokenizer: the
    vocabulary (v1: 32,000 pieces; tekken: 131,072, as Nemo and Small 3.x have)."""
    arch, size = MODELS[name]
    vocab = "" if tokenizer == "v1" else f"-{tokenizer}"
    out = models_dir() / f"synth-{arch}-{size}{vocab}-Q4_K_M.gguf"
    if out.is_file():
        return out
    from localmix.build.convert import convert
    from localmix.build.quantize import quantize
    from localmix.build.synth import checkpoints as synth

    with tempfile.TemporaryDirectory(dir=models_dir()) as tmp:
        checkpoint = synth.checkpoint(Path(tmp) / "ckpt", arch=arch, size=size, tokenizer=tokenizer)
        f16 = convert(checkpoint, Path(tmp) / "model-f16.gguf", outtype="f16")
        quantize(f16, out, "Q4_K_M")
    return out


def run_llama_bench(model: Path, threads: int) -> dict[str, list[float]]:
    cmd = [
        str(tool("llama-bench")), "-m", str(model), "-p", str(N_PROMPT), "-n", str(N_GEN),
        "-t", str(threads), "-r", str(REPS), "-o", "json", *bench_repack_args(),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    out: dict[str, list[float]] = {}
    for row in json.loads(done.stdout):
        test = f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"
        out[test] = [float(x) for x in row["samples_ts"]]
    return out


def engine_pp(engine: Engine, rng: random.Random) -> float:
    tokens = [engine.bos_id] + [rng.randrange(engine.n_vocab) for _ in range(N_PROMPT - 1)]
    engine.clear()
    start = time.perf_counter()
    engine.process(tokens)
    return N_PROMPT / (time.perf_counter() - start)


def engine_tg(engine: Engine, sampling: Sampling) -> float:
    """tg128 through stream(): 1 + N_GEN samples, so N_GEN decodes after the first token."""
    engine.clear()
    stats = None
    for item in engine.stream(
        [engine.bos_id], sampling=sampling, max_tokens=N_GEN + 1, ignore_eos=True
    ):
        stats = item
    assert isinstance(stats, Stats) and stats.generated_tokens == N_GEN + 1
    return stats.gen_tps


def sampler_cost(engine: Engine, reps: int = 3) -> float:
    """Seconds per token that llama.cpp's default sampler chain adds to a bare decode loop.

    Two loops of N_GEN decodes through ctypes with nothing of localmix's in between: one feeds
    llama_sampler_sample's pick back, the other a fixed sequence. Their difference is the chain's
    cost where it really runs: right after a decode that has pushed its buffers out of cache."""
    c, ctx = engine._c, engine._ctx  # the benchmark reaches in: this is a C-side measurement
    chain = sampler_chain(c, ctx, Sampling(seed=0), [engine.bos_id])
    sample = c.llama_sampler_sample

    def loop(with_sampler: bool) -> float:
        engine.clear()
        token = engine.bos_id
        start = time.perf_counter()
        for i in range(N_GEN):
            engine.decode_one(token)
            token = sample(chain, ctx, -1) if with_sampler else (i * 7919 + 13) % engine.n_vocab
        return time.perf_counter() - start

    try:
        diffs = [(loop(True) - loop(False)) / N_GEN for _ in range(reps)]
    finally:
        c.llama_sampler_free(chain)
    return max(0.0, statistics.median(diffs))


def measure(name: str, model: Path, threads: int, rounds: int) -> Samples:
    samples = Samples()
    rng = random.Random(0)
    config = EngineConfig(model, n_ctx=N_PROMPT + N_GEN + 1, n_threads=threads)
    with Engine(config) as engine:
        engine_pp(engine, rng)  # warmup, as llama-bench does
        engine_tg(engine, Sampling.greedy())

        def ours(r: int) -> None:
            runs = {
                "pp512": lambda: engine_pp(engine, rng),
                "tg128 greedy": lambda: engine_tg(engine, Sampling.greedy()),
                "tg128 sampling": lambda: engine_tg(engine, Sampling(seed=r)),
            }
            tests = list(runs)
            tests = tests[r % len(tests) :] + tests[: r % len(tests)]  # no test always goes first
            for test in tests:
                values = [runs[test]() for _ in range(REPS)]
                samples.engine.setdefault(test, []).append(statistics.mean(values))
            samples.sampler_s.append(sampler_cost(engine))

        def theirs(r: int) -> None:
            for test, values in run_llama_bench(model, threads).items():
                samples.bench.setdefault(test, []).append(statistics.mean(values))

        for r in range(rounds):
            print(f"{name}: round {r + 1}/{rounds}", file=sys.stderr)
            for step in (theirs, ours) if r % 2 == 0 else (ours, theirs):
                step(r)
    return samples


def report(results: dict[str, Samples], threads: int) -> bool:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"Engine vs llama-bench (llama-cpp-python {pinned_version()}, {threads} threads)",
        caption="ratio: median of per-round engine/llama-bench [95% bootstrap interval]",
    )
    columns = ("model", "test", "llama-bench t/s", "engine t/s", "ratio", "range", "target")
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "test") else "right")
    ok = True
    for name, samples in results.items():
        rows = [(test, samples.bench[test.split()[0]], target) for test, target in TARGETS.items()]
        # What llama.cpp itself reaches with its sampler: llama-bench's time plus the C cost.
        with_sampler = [
            1 / (1 / tps + cost)
            for tps, cost in zip(samples.bench["tg128"], samples.sampler_s, strict=True)
        ]
        rows.append(("tg128 sampling", with_sampler, TARGETS["tg128 greedy"]))
        for index, (test, ref, target) in enumerate(rows):
            ours = samples.engine[test]
            ratio = paired(ours, ref)
            good = ratio.median >= target
            ok &= good
            label = test if index < 3 else "  vs llama-bench + sampler"
            reference = mean_std(ref) if index < 3 else f"{mean_std(ref)} *"
            table.add_row(
                name,
                label,
                reference,
                mean_std(ours),
                str(ratio),
                f"{ratio.lowest:.3f}..{ratio.highest:.3f}",
                f"≥{target} " + ("[green]ok[/]" if good else "[red]below[/]"),
            )
        cost = statistics.median(samples.sampler_s) * 1e6
        table.add_row(name, "  llama.cpp sampler in a loop", f"{cost:.1f} µs/token", "", "", "", "")
    Console(width=140).print(table)
    print("* llama-bench tg128 with llama.cpp's sampler cost added per token")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--models", default="mistral,mixtral")
    args = parser.parse_args()
    threads = args.threads or settings.default_threads()
    tool("llama-bench")  # build before anything is timed
    results = {}
    for name in args.models.split(","):
        model = make_model(name)
        print(f"{name}: {model}", file=sys.stderr)
        results[name] = measure(name, model, threads, args.rounds)
    sys.exit(0 if report(results, threads) else 1)


if __name__ == "__main__":
    main()
