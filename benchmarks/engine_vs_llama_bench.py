"""localmix's Engine against llama.cpp's own llama-bench, on the same Q4_K_M GGUFs and threads.

llama-bench is built from the llama.cpp source that the pinned llama-cpp-python vendors
(llamacpp_tools.py). Rounds alternate llama-bench runs and engine runs so that drift on a busy
machine hits both. Measured: pp512 (Engine.process of 512 random tokens) and tg128 (128 decodes
through Engine.stream: greedy, and llama.cpp's default sampler chain via Sampling()).

    python benchmarks/engine_vs_llama_bench.py [--rounds 3] [--threads N] [--models mistral,mixtral]

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

from llamacpp_tools import pinned_version, tool

from localmix import settings
from localmix.llama.engine import Engine, EngineConfig, Sampling, Stats

N_PROMPT, N_GEN, REPS = 512, 128, 3
TARGETS = {"pp512": 0.98, "tg128 greedy": 0.97, "tg128 sampling": 0.95}
MODELS = {"mistral": ("mistral", "125m"), "mixtral": ("mixtral", "small")}


@dataclass
class Samples:
    bench: dict[str, list[float]] = field(default_factory=dict)
    engine: dict[str, list[float]] = field(default_factory=dict)


def models_dir() -> Path:
    import platformdirs

    path = Path(platformdirs.user_cache_dir("localmix", appauthor=False)) / "bench-models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def make_model(name: str) -> Path:
    """A synthetic checkpoint → f16 GGUF → Q4_K_M GGUF, made once and reused."""
    arch, size = MODELS[name]
    out = models_dir() / f"synth-{arch}-{size}-Q4_K_M.gguf"
    if out.is_file():
        return out
    from localmix import synth
    from localmix.convert import convert
    from localmix.quantize import quantize

    with tempfile.TemporaryDirectory(dir=models_dir()) as tmp:
        checkpoint = synth.checkpoint(Path(tmp) / "ckpt", arch=arch, size=size)
        f16 = convert(checkpoint, Path(tmp) / "model-f16.gguf", outtype="f16")
        quantize(f16, out, "Q4_K_M")
    return out


def run_llama_bench(model: Path, threads: int) -> dict[str, list[float]]:
    cmd = [
        str(tool("llama-bench")), "-m", str(model), "-p", str(N_PROMPT), "-n", str(N_GEN),
        "-t", str(threads), "-r", str(REPS), "-o", "json",
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


def measure(name: str, model: Path, threads: int, rounds: int) -> Samples:
    samples = Samples()
    rng = random.Random(0)
    config = EngineConfig(model, n_ctx=N_PROMPT + N_GEN + 1, n_threads=threads)
    with Engine(config) as engine:
        engine_pp(engine, rng)  # warmup, as llama-bench does
        engine_tg(engine, Sampling.greedy())
        for r in range(rounds):
            print(f"{name}: round {r + 1}/{rounds}", file=sys.stderr)
            for test, values in run_llama_bench(model, threads).items():
                samples.bench.setdefault(test, []).extend(values)
            runs = {
                "pp512": lambda: engine_pp(engine, rng),
                "tg128 greedy": lambda: engine_tg(engine, Sampling.greedy()),
                "tg128 sampling": lambda seed=r: engine_tg(engine, Sampling(seed=seed)),
            }
            for _ in range(REPS):
                for test, run in runs.items():
                    samples.engine.setdefault(test, []).append(run())
    return samples


def report(results: dict[str, Samples], threads: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"Engine vs llama-bench (llama-cpp-python {pinned_version()}, {threads} threads)"
    )
    columns = ("model", "test", "llama-bench t/s", "engine t/s", "ratio", "median ratio", "target")
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "test") else "right")

    def cell(values: list[float]) -> str:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} ± {std:.2f}"

    for name, samples in results.items():
        for test, target in TARGETS.items():
            bench = samples.bench[test.split()[0]]
            ours = samples.engine[test]
            ratio = statistics.mean(ours) / statistics.mean(bench)
            median = statistics.median(ours) / statistics.median(bench)
            mark = "[green]ok[/]" if ratio >= target else "[red]below[/]"
            row = (cell(bench), cell(ours), f"{ratio:.3f}", f"{median:.3f}", f"≥{target} {mark}")
            table.add_row(name, test, *row)
    Console(width=120).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
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
    report(results, threads)


if __name__ == "__main__":
    main()
