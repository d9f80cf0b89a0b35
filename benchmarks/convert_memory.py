"""Bounded memory: `localmix convert` on synthetic checkpoints of about 125M and 1B parameters, each
in its own child process, with the child's peak resident set size (ru_maxrss) against a budget of
the largest output tensor + 512 MiB.

    python benchmarks/convert_memory.py [--size 125m --size 1b] [--arch mistral] [--outtype f16]
                                        [--dtype bf16] [--keep DIR]

Checkpoints are written by localmix.build.synth.checkpoints (bf16 by default, as real checkpoints ship) in a child
process of their own, so the conversion's peak is measured alone. Exit status 0 when every size
stays within its budget.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SLACK = 512 * 2**20  # bytes allowed on top of the largest tensor: interpreter, libraries, vocab


@dataclass(frozen=True)
class Result:
    size: str
    params: int
    checkpoint_bytes: int
    largest_tensor: str
    largest_bytes: int
    peak_rss: int
    seconds: float

    @property
    def budget(self) -> int:
        return self.largest_bytes + SLACK

    @property
    def ok(self) -> bool:
        return self.peak_rss <= self.budget


def run_child(args: list[str]) -> tuple[int, float, str]:
    """Run this script in a child mode; return (peak RSS bytes, seconds, stdout)."""
    start = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, __file__, *args], stdout=subprocess.PIPE, cwd=REPO, text=True
    )
    out = child.stdout.read() if child.stdout else ""
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        raise SystemExit(f"child {args[0]} failed with exit status {child.returncode}")
    return usage.ru_maxrss * 1024, seconds, out  # Linux reports KiB


def measure(size: str, arch: str, outtype: str, dtype: str, work: Path) -> Result:
    from localmix.build.synth import checkpoints as synth

    ckpt = work / f"{arch}-{size}-{dtype}"
    if not (ckpt / ".complete").is_file():
        run_child(["--child-synth", str(ckpt), arch, size, dtype])
        (ckpt / ".complete").write_text("ok\n")
    out = work / f"{arch}-{size}.{outtype}.gguf"
    peak, seconds, _ = run_child(["--child-convert", str(ckpt), str(out), outtype])
    name, nbytes = largest_output(ckpt, outtype)
    checkpoint_bytes = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    out.unlink()
    return Result(
        size=size,
        params=synth.parameter_count(arch, size, "v1"),
        checkpoint_bytes=checkpoint_bytes,
        largest_tensor=name,
        largest_bytes=nbytes,
        peak_rss=peak,
        seconds=seconds,
    )


def child_synth(ckpt: str, arch: str, size: str, dtype: str) -> None:
    from localmix.build.synth import checkpoints as synth

    synth.checkpoint(Path(ckpt), arch=arch, size=size, dtype=dtype, seed=0)


def child_convert(ckpt: str, out: str, outtype: str) -> None:
    from localmix.build.convert import convert

    convert(Path(ckpt), Path(out), outtype=outtype)


def largest_output(ckpt: Path, outtype: str) -> tuple[str, int]:
    """The largest tensor of the conversion's plan (headers only): its GGUF name and bytes."""
    from localmix.build.convert import converter_for
    from localmix.build.convert.checkpoint import open_checkpoint

    tensors = converter_for(open_checkpoint(ckpt)).tensors(outtype)
    top = max(tensors, key=lambda t: t.nbytes)
    return top.name, top.nbytes


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def report(results: list[Result], arch: str, outtype: str, dtype: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"convert peak memory ({arch}, {dtype} checkpoint -> {outtype} GGUF)")
    for col in (
        "size",
        "params",
        "checkpoint",
        "largest tensor",
        "bytes",
        "peak RSS",
        "budget",
        "time",
        "",
    ):
        table.add_column(col, justify="left" if col in ("size", "largest tensor") else "right")
    for r in results:
        table.add_row(
            r.size,
            f"{r.params / 1e6:.0f}M",
            gib(r.checkpoint_bytes),
            r.largest_tensor,
            gib(r.largest_bytes),
            gib(r.peak_rss),
            gib(r.budget),
            f"{r.seconds:.0f} s",
            "[green]pass[/]" if r.ok else "[red]FAIL[/]",
        )
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(table)
    console.print(
        f"budget = largest output tensor + {gib(SLACK)}; peak RSS = the child's ru_maxrss"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child-synth":
        child_synth(*argv[1:])
        return 0
    if argv and argv[0] == "--child-convert":
        child_convert(*argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", action="append", choices=("tiny", "small", "125m", "1b"))
    parser.add_argument("--arch", default="mistral", choices=("mistral", "mixtral"))
    parser.add_argument("--outtype", default="f16", choices=("f32", "f16", "bf16", "q8_0"))
    parser.add_argument("--dtype", default="bf16", choices=("f32", "bf16"))
    parser.add_argument("--keep", type=Path, help="keep checkpoints here (reused on reruns)")
    args = parser.parse_args(argv)
    sizes = args.size or ["125m", "1b"]
    with tempfile.TemporaryDirectory(prefix="localmix-convert-memory-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("LOCALMIX_HOME", str(work / "home"))
        results = [measure(size, args.arch, args.outtype, args.dtype, work) for size in sizes]
    report(results, args.arch, args.outtype, args.dtype)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
