"""`localmix bench` against llama.cpp's llama-bench: pp512 and tg128, same GGUF and threads.

The model is a ~125M-parameter synthetic Mistral (localmix.synth → convert → quantize Q4_K_M),
made once and cached. llama-bench is built from the llama.cpp source that the pinned
llama-cpp-python vendors (llamacpp_tools.py). Rounds alternate the two tools, and swap which goes
first, so drift on a busy machine hits both alike; each round runs -r repetitions after a warmup.
`ratio` is localmix / llama-bench of the mean t/s over all rounds; `paired` the median over rounds
of the same ratio within a round, which slow drift affects less. Target: within ±3%.

    python benchmarks/bench_vs_llama_bench.py [--threads 1,2] [--rounds 4] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llamacpp_tools import pinned_version, tool

from localmix import settings
from localmix.bench.params import BenchParams
from localmix.bench.run import run

TESTS = ("pp512", "tg128")
TARGET = 0.03


def model_path() -> Path:
    """The 125M synthetic Mistral at Q4_K_M, through localmix's own synth, convert and quantize."""
    import platformdirs

    from localmix import synth
    from localmix.convert import convert
    from localmix.quantize import quantize

    folder = Path(platformdirs.user_cache_dir("localmix", appauthor=False)) / "bench-models"
    out = folder / "synth-mistral-125m-Q4_K_M.gguf"
    if out.is_file():
        return out
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        ckpt = synth.checkpoint(Path(tmp) / "ckpt", arch="mistral", size="125m")
        f16 = convert(ckpt, Path(tmp) / "model-f16.gguf", outtype="f16")
        quantize(f16, out, "Q4_K_M")
    return out


def llama_bench(model: Path, threads: int, reps: int) -> dict[str, list[float]]:
    cmd = [
        str(tool("llama-bench")), "-m", str(model), "-p", "512", "-n", "128",
        "-t", str(threads), "-r", str(reps), "-o", "json",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return {
        _test(row["n_prompt"], row["n_gen"]): row["samples_ts"] for row in json.loads(done.stdout)
    }


def localmix_bench(model: Path, threads: int, reps: int) -> dict[str, list[float]]:
    params = BenchParams(n_prompt=(512,), n_gen=(128,), n_threads=(threads,), repetitions=reps)
    return {_test(r.n_prompt, r.n_gen): list(r.samples_ts) for r in run([model], params)}


def _test(n_prompt: int, n_gen: int) -> str:
    return f"pp{n_prompt}" if n_prompt else f"tg{n_gen}"


Samples = dict[str, dict[str, list[list[float]]]]  # tool -> test -> one list of t/s per round


def measure(model: Path, threads: int, rounds: int, reps: int) -> Samples:
    """Samples of both tools, alternating them round by round (and which one goes first)."""
    tools = {"llama-bench": llama_bench, "localmix": localmix_bench}
    samples: Samples = {name: {t: [] for t in TESTS} for name in tools}
    for index in range(rounds):
        order = list(tools) if index % 2 == 0 else list(reversed(tools))
        for name in order:
            for test, values in tools[name](model, threads, reps).items():
                samples[name][test].append(values)
        means = "  ".join(
            f"{test} {statistics.mean(samples[name][test][-1]):.2f}"
            for name in tools
            for test in TESTS
        )
        print(
            f"threads {threads}, round {index + 1}/{rounds} (llama-bench, localmix): {means}",
            file=sys.stderr,
        )
    return samples


def paired_ratio(ours: list[list[float]], ref: list[list[float]]) -> float:
    """Median over rounds of localmix / llama-bench: robust to drift between rounds."""
    return statistics.median(
        statistics.mean(a) / statistics.mean(b) for a, b in zip(ours, ref, strict=True)
    )


def cell(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):9.2f} ± {std:6.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default=None, help="comma list (default: physical cores)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--model", type=Path, default=None, help="a GGUF (default: synthetic)")
    parser.add_argument(
        "--same-libs",
        action="store_true",
        help="run localmix on llama-bench's own libllama / libggml (LLAMA_CPP_LIB_PATH), so any "
        "difference left is the harness, not the build",
    )
    args = parser.parse_args()
    if args.same_libs:  # before anything imports llama_cpp
        os.environ["LLAMA_CPP_LIB_PATH"] = str(tool("llama-bench").parent)
    threads = [int(t) for t in (args.threads or str(settings.default_threads())).split(",")]
    tool("llama-bench")  # build before anything is timed
    model = args.model or model_path()
    libs = "llama-bench's libraries" if args.same_libs else "its own build"
    print(f"model: {model.name}; llama-cpp-python {pinned_version()} on {libs}")
    print(f"{args.rounds} rounds x {args.reps} repetitions per tool, alternating")
    print(
        f"{'threads':>7}  {'test':<6} {'llama-bench t/s':>18} {'localmix t/s':>18} "
        f"{'ratio':>6} {'paired':>6}  target ±3%"
    )
    worst = 0.0
    for n in threads:
        samples = measure(model, n, args.rounds, args.reps)
        for test in TESTS:
            ref_rounds, our_rounds = samples["llama-bench"][test], samples["localmix"][test]
            ref = [v for values in ref_rounds for v in values]
            ours = [v for values in our_rounds for v in values]
            ratio = statistics.mean(ours) / statistics.mean(ref)
            paired = paired_ratio(our_rounds, ref_rounds)
            worst = max(worst, abs(ratio - 1))
            verdict = "ok" if abs(ratio - 1) <= TARGET else "OUTSIDE"
            print(
                f"{n:>7}  {test:<6} {cell(ref)} {cell(ours)} {ratio:6.3f} {paired:6.3f}  {verdict}"
            )
    sys.exit(0 if worst <= TARGET else 1)


if __name__ == "__main__":
    main()
