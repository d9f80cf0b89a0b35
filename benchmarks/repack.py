"""What weight repacking (llama.cpp's CPU extra buffer types) is worth on this machine: pp512 and
tg128 with --repack 0 and 1, through llama-bench and `localmix bench`, on one Q4_K_M file.

The evidence for the CPU rule (localmix.load.repack_choice), which turns repacking off only where
the build has AMX kernels: on any other host the rule must cost nothing (localmix keeps
llama.cpp's default), and this shows what a user who opts in or out gains or loses. Each round
runs all four (tool x setting) back to back, rotating the order; ratios are medians of per-round
ratios with 95% bootstrap intervals (pairing.py).

    python benchmarks/repack.py [--threads 2] [--rounds 6] [--reps 2] [--model FILE.gguf]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_vs_llama_bench import TESTS, llama_bench, localmix_bench
from engine_vs_llama_bench import make_model
from llamacpp_tools import pinned_version, tool
from pairing import mean_std, paired

from localmix import load, settings
from localmix.llama.hardware import amx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="default: physical cores")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--model", type=Path, default=None, help="default: the synthetic 125M")
    args = parser.parse_args()
    threads = args.threads or settings.default_threads()
    tool("llama-bench")  # built before anything is timed
    model = args.model or make_model("mistral")
    tools = {"llama-bench": llama_bench, "localmix": localmix_bench}
    runs = [(name, repack) for repack in (False, True) for name in tools]
    samples: dict[tuple[str, bool], dict[str, list[float]]] = {
        run: {t: [] for t in TESTS} for run in runs
    }
    for index in range(args.rounds):
        shift = index % len(runs)
        for name, repack in runs[shift:] + runs[:shift]:
            for test, values in tools[name](model, threads, args.reps, repack).items():
                samples[name, repack][test].append(statistics.mean(values))
        print(f"round {index + 1}/{args.rounds} done", file=sys.stderr)
    choice = load.repack_choice()
    print(f"llama-cpp-python {pinned_version()}; {amx().summary}; {model.name}, {threads} threads")
    print(f"localmix's rule here: repacking {'on' if choice.on else 'off'}: {choice.why}")
    print(f"{args.rounds} rounds x {args.reps} repetitions; ratios: median [95% interval]\n")
    print("| tool | test | repack 0 t/s | repack 1 t/s | repack 1 / 0 |")
    print("|---|---|---|---|---|")
    for name in tools:
        for test in TESTS:
            off, on = samples[name, False][test], samples[name, True][test]
            print(f"| {name} | {test} | {mean_std(off)} | {mean_std(on)} | {paired(on, off)} |")
    print("\n| setting | test | localmix / llama-bench |\n|---|---|---|")
    for repack in (False, True):
        for test in TESTS:
            ours, ref = samples["localmix", repack][test], samples["llama-bench", repack][test]
            print(f"| repack {int(repack)} | {test} | {paired(ours, ref)} |")


if __name__ == "__main__":
    main()
