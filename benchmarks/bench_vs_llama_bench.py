"""`localmix bench` against llama.cpp's llama-bench: pp512 and tg128, same GGUF and threads.

The models are a ~125M-parameter synthetic Mistral and a small synthetic Mixtral (localmix.build.synth.checkpoints →
convert → quantize Q4_K_M), made once and cached. llama-bench is built from the llama.cpp source
that the pinned llama-cpp-python vendors (llamacpp_tools.py). Each round runs both tools back to
back (-r repetitions after a warmup each), swapping which goes first; the verdict is the median of
the per-round ratios, with its 95% bootstrap interval (pairing.py). Target: within ±3%.

    python benchmarks/bench_vs_llama_bench.py [--threads 1,2] [--rounds 20] [--reps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_vs_llama_bench import make_model
from llamacpp_tools import bench_repack_args, pinned_version, tool
from pairing import mean_std, paired

from localmix import settings
from localmix.bench.params import BenchParams
from localmix.bench.run import run

TESTS = ("pp512", "tg128")
TARGET = 0.03


def llama_bench(
    model: Path, threads: int, reps: int, repack: bool | None = None
) -> dict[str, list[float]]:
    """llama-bench's samples; repack None: localmix's setting (its CPU rule)."""
    flags = bench_repack_args() if repack is None else ["--repack", str(int(repack))]
    cmd = [
        str(tool("llama-bench")), "-m", str(model), "-p", "512", "-n", "128",
        "-t", str(threads), "-r", str(reps), "-o", "json", *flags,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return {
        _test(row["n_prompt"], row["n_gen"]): row["samples_ts"] for row in json.loads(done.stdout)
    }


def localmix_bench(
    model: Path, threads: int, reps: int, repack: bool | None = None
) -> dict[str, list[float]]:
    params = BenchParams(
        n_prompt=(512,), n_gen=(128,), n_threads=(threads,), repetitions=reps,
        repack=() if repack is None else (repack,),
    )  # fmt: skip
    return {_test(r.n_prompt, r.n_gen): list(r.samples_ts) for r in run([model], params)}


def _test(n_prompt: int, n_gen: int) -> str:
    return f"pp{n_prompt}" if n_prompt else f"tg{n_gen}"


Samples = dict[str, dict[str, list[list[float]]]]  # tool -> test -> one list of t/s per round


def measure(
    model: Path, threads: int, rounds: int, reps: int, repack: bool | None = None
) -> Samples:
    """Samples of both tools, alternating them round by round (and which one goes first)."""
    tools = {"llama-bench": llama_bench, "localmix": localmix_bench}
    samples: Samples = {name: {t: [] for t in TESTS} for name in tools}
    for index in range(rounds):
        order = list(tools) if index % 2 == 0 else list(reversed(tools))
        for name in order:
            for test, values in tools[name](model, threads, reps, repack).items():
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default=None, help="comma list (default: physical cores)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--models", default="mistral,mixtral", help="synthetic models to run")
    parser.add_argument("--model", type=Path, default=None, help="a GGUF instead of --models")
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
    models = [args.model] if args.model else [make_model(m) for m in args.models.split(",")]
    libs = "llama-bench's libraries" if args.same_libs else "its own build"
    print(f"llama-cpp-python {pinned_version()} on {libs}")
    print(f"{args.rounds} rounds x {args.reps} repetitions per tool, alternating")
    print("ratio: median of per-round localmix/llama-bench [95% bootstrap interval]")
    header = (
        f"{'model':<34} {'threads':>7}  {'test':<6} {'llama-bench t/s':>17} {'localmix t/s':>17}"
    )
    print(f"{header} {'ratio':>22} {'range':>12}  target ±3%")
    ok = True
    for model in models:
        for n in threads:
            samples = measure(model, n, args.rounds, args.reps)
            for test in TESTS:
                ref = [statistics.mean(v) for v in samples["llama-bench"][test]]
                ours = [statistics.mean(v) for v in samples["localmix"][test]]
                ratio = paired(ours, ref)
                good = abs(ratio.median - 1) <= TARGET
                ok &= good
                print(
                    f"{model.name:<34} {n:>7}  {test:<6} {mean_std(ref):>17} {mean_std(ours):>17} "
                    f"{ratio!s:>22} {ratio.lowest:.3f}..{ratio.highest:.3f}  "
                    + ("ok" if good else "OUTSIDE")
                )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
