"""What the engine's CPU thread pools are worth: engines with and without them, same GGUF and threads.

Without a pool attached, ggml sets up a throwaway one for every graph it computes. Builds with
OpenMP (Linux wheels) barely notice; builds without it (macOS among them) start and join worker
threads for every decoded token. This script runs both kinds of llama.cpp build from the pinned
source: the installed wheel (OpenMP) and libraries built with GGML_OPENMP=OFF (llamacpp_tools.py),
loaded through LLAMA_CPP_LIB_PATH in a child process. Rounds alternate the two engines.

    python benchmarks/threadpools.py [--rounds 10] [--threads 2] [--models mistral,mixtral]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_vs_llama_bench import N_PROMPT, engine_pp, make_model
from llamacpp_tools import libraries_without_openmp, pinned_version

N_GEN = 128


def child(model: Path, threads: int, rounds: int) -> dict[str, list[float]]:
    """In this process (its llama.cpp already chosen): per-round t/s with and without pools."""
    from localmix.llama.engine import Engine, EngineConfig

    def load(pools: bool) -> Engine:
        config = EngineConfig(model, n_ctx=N_PROMPT + N_GEN, n_threads=threads)
        if pools:
            return Engine(config)
        saved = Engine._threadpools
        Engine._threadpools = lambda self, *counts: None  # type: ignore[method-assign]
        try:
            return Engine(config)
        finally:
            Engine._threadpools = saved  # type: ignore[method-assign]

    rng = random.Random(0)

    def tg(engine: Engine) -> float:
        engine.clear()
        tokens = [engine.bos_id] + [rng.randrange(engine.n_vocab) for _ in range(N_GEN - 1)]
        start = time.perf_counter()
        for token in tokens:
            engine.decode_one(token)
        return N_GEN / (time.perf_counter() - start)

    engines = {"pools": load(True), "none": load(False)}
    assert engines["pools"].thread_pools and not engines["none"].thread_pools
    out: dict[str, list[float]] = {}
    for engine in engines.values():  # warmup
        engine_pp(engine, rng), tg(engine)
    for index in range(rounds):
        order = list(engines) if index % 2 == 0 else list(reversed(engines))
        for name in order:
            out.setdefault(f"pp512 {name}", []).append(engine_pp(engines[name], rng))
            out.setdefault(f"tg128 {name}", []).append(tg(engines[name]))
    for engine in engines.values():
        engine.close()
    return out


def run_child(model: Path, threads: int, rounds: int, lib_path: Path | None) -> dict:
    env = dict(os.environ)
    env.pop("LLAMA_CPP_LIB_PATH", None)
    if lib_path is not None:
        env["LLAMA_CPP_LIB_PATH"] = str(lib_path)
    cmd = [sys.executable, __file__, "--child", str(model), str(threads), str(rounds)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        model, threads, rounds = Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
        print(json.dumps(child(model, threads, rounds)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="mistral,mixtral")
    args = parser.parse_args()
    builds = {"wheel (OpenMP)": None, "GGML_OPENMP=OFF": libraries_without_openmp()}
    print(f"llama-cpp-python {pinned_version()}, {args.threads} threads, {args.rounds} rounds")
    print(
        f"{'model':<8} {'build':<16} {'test':<6} {'with pools':>11} {'without':>9} {'speed-up':>9}"
    )
    for name in args.models.split(","):
        model = make_model(name)
        for build, lib_path in builds.items():
            got = run_child(model, args.threads, args.rounds, lib_path)
            for test in ("pp512", "tg128"):
                pools, none = got[f"{test} pools"], got[f"{test} none"]
                ratio = statistics.median(a / b for a, b in zip(pools, none, strict=True))
                print(
                    f"{name:<8} {build:<16} {test:<6} {statistics.median(pools):11.1f} "
                    f"{statistics.median(none):9.1f} {ratio:8.2f}x"
                )


if __name__ == "__main__":
    main()
