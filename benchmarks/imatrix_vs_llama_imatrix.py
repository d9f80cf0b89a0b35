"""`localmix imatrix` against llama.cpp's `llama-imatrix`, on the same GGUF, text and chunking.

Synthetic Mistral and Mixtral checkpoints (tiny or small) are converted to f16; the default text
that ships with localmix is written to a file; then both tools run as a user runs them (a fresh
process each, the same threads, chunk size and chunk count) and their files are compared: the
same tensors in the same order and shapes, the same metadata, identical counts (per expert for
the MoE weights) and sums equal within float32 rounding (llama-imatrix adds each input in
float32, localmix in float64). Wall time is reported as a ratio, both tools timed in one run,
alternating which goes first.

    python benchmarks/imatrix_vs_llama_imatrix.py [--size small] [--chunks 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llamacpp_tools import repack_args, tool


def read(path: Path) -> tuple[list[tuple[str, tuple[int, ...]]], dict, dict]:
    """(tensor names and shapes in file order, metadata, name -> float32 values)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(path)
    layout = [(t.name, tuple(int(n) for n in t.shape)) for t in reader.tensors]
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    values = {t.name: np.array(t.data, dtype=np.float32).reshape(-1) for t in reader.tensors}
    return layout, meta, values


def compare(ours: Path, theirs: Path) -> tuple[bool, float, int]:
    """(same layout, metadata and counts; largest relative difference of a sum; tensors)."""
    import numpy as np

    our_layout, our_meta, our_values = read(ours)
    layout, meta, values = read(theirs)
    same = our_layout == layout and our_meta == meta
    worst = 0.0
    for name, want in values.items():
        got = our_values.get(name)
        if got is None or got.shape != want.shape:
            return False, float("inf"), len(values)
        if name.endswith(".counts"):
            same &= bool(np.array_equal(got, want))
        else:
            scale = np.maximum(np.abs(want), np.finfo(np.float32).tiny)
            worst = max(worst, float(np.max(np.abs(got - want) / scale)))
    return same, worst, len(values)


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{command[0]} failed:\n{done.stderr[-3000:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=("tiny", "small"))
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from localmix import corpus
    from localmix.build.convert import convert
    from localmix.build.synth import checkpoints as synth

    llama_imatrix = tool("llama-imatrix")
    # llama-imatrix adds n positive float32 terms one at a time: relative error at most (n-1)u,
    # u = 2^-24 (the sums are then compared value by value against localmix's float64 ones).
    tolerance = args.chunks * args.chunk_size * 2.0**-24
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, "LOCALMIX_HOME": str(work / "home")}
        # Relative names, run from `work`: both files then record the same dataset name.
        (work / "langref.txt").write_text(corpus.default().text, encoding="utf-8")
        common = ["-f", "langref.txt", "-c", str(args.chunk_size), "--chunks", str(args.chunks)]
        common += ["-t", str(args.threads)]
        print(
            f"{args.size} models, {args.chunks} chunks of {args.chunk_size} tokens of the default "
            f"text, {args.threads} threads, {args.rounds} rounds; sums must agree within "
            f"{tolerance:.1e} (float32 summation bound)\n"
        )
        print(f"{'model':<8} {'tensors':>7} {'layout+meta+counts':>18} {'max rel Δ sum':>14} "
              f"{'localmix s':>10} {'llama s':>8} {'llama/localmix':>14}")  # fmt: skip
        for arch in ("mistral", "mixtral"):
            ckpt = synth.checkpoint(work / f"{arch}-ckpt", arch=arch, size=args.size)
            convert(ckpt, work / f"{arch}.gguf", outtype="f16")
            ours_cmd = [sys.executable, "-m", "localmix", "imatrix", f"{arch}.gguf"]
            ours_cmd += [*common, "-o", "ours.gguf"]
            theirs_cmd = [str(llama_imatrix), "-m", f"{arch}.gguf", *common, "-o", "theirs.gguf"]
            theirs_cmd += ["--no-ppl", *repack_args()]
            ratios, ours_s, theirs_s = [], [], []
            for round_ in range(args.rounds):
                first_ours = round_ % 2 == 0
                pair = (ours_cmd, theirs_cmd) if first_ours else (theirs_cmd, ours_cmd)
                os.chdir(work)
                a, b = (timed(c, env) for c in pair)
                ours_t, theirs_t = (a, b) if first_ours else (b, a)
                ours_s.append(ours_t)
                theirs_s.append(theirs_t)
                ratios.append(theirs_t / ours_t)
            same, worst, tensors = compare(work / "ours.gguf", work / "theirs.gguf")
            ok = same and worst <= tolerance
            failures += not ok
            print(
                f"{arch:<8} {tensors:>7} {'identical' if same else 'DIFFERENT':>18} "
                f"{worst:>14.2e} {statistics.median(ours_s):>10.2f} "
                f"{statistics.median(theirs_s):>8.2f} {statistics.median(ratios):>14.3f}"
            )
    print("\nequal within float32 rounding" if not failures else "\nMISMATCH")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
