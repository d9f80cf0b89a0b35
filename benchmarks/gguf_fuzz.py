"""Corrupted GGUFs, the full run: a real tiny Q4_K_M (synth -> convert -> llama.cpp quantize),
damaged in 12 ways (bit flips in header, key/values and tensor table; truncations; absurd counts,
string lengths and array counts; alignment values; offsets past the end; bad type ids; bad
dimensions; bad value types), each variant through `localmix show` and a one-token chat (a real
llama.cpp load) in a child process. Prints how every run ended.

    python benchmarks/gguf_fuzz.py [--count 1200] [--seed 1] [--timeout 60] [--keep DIR]

Exit status 0 when no child died of a signal, hung past the timeout, printed a traceback or an
"internal error". Variants that ended badly are kept in the work folder for a look.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _q4_k_m(work: Path) -> Path:
    from localmix.build.convert import convert
    from localmix.build.quantize import quantize
    from localmix.build.synth import checkpoints as synth

    ckpt = synth.checkpoint(work / "ckpt", arch="mistral", size="tiny", seed=0)
    f16 = convert(ckpt, work / "tiny.F16.gguf", outtype="f16")
    return quantize(f16, work / "tiny.Q4_K_M.gguf", "Q4_K_M", threads=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1200, help="variants (default 1200)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per child")
    parser.add_argument("--keep", type=Path, help="work folder to keep (default: a temp dir)")
    args = parser.parse_args()

    from tests import gguf_fuzz

    with tempfile.TemporaryDirectory(prefix="gguf-fuzz-") as temp:
        work = args.keep or Path(temp)
        os.environ["LOCALMIX_HOME"] = str(work / "home")
        os.environ["LOCALMIX_THREADS"] = "1"
        source = _q4_k_m(work)
        started = time.monotonic()
        tally = gguf_fuzz.fuzz(
            source, work / "variants", seed=args.seed, count=args.count, timeout_s=args.timeout
        )
        seconds = time.monotonic() - started
        print(f"{args.count} variants of {source.name} (seed {args.seed}) in {seconds:.0f} s")
        for what, counts in (("show", tally.show), ("load", tally.load)):
            print(f"  {what}: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
        bad = len(tally.bad)
        print(f"  signals, hangs, tracebacks, internal errors: {bad}")
        print(f"  refused by llama.cpp after validation (exit 13): {len(tally.refused)}")
        for line in tally.bad[:20] + tally.refused[:20]:
            print("   ", line[:300])
        if bad and not args.keep:
            print("rerun with --keep DIR to look at the variants that ended badly")
    return 1 if tally.bad else 0


if __name__ == "__main__":
    sys.exit(main())
