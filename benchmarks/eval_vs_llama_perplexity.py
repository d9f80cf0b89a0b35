"""`localmix eval` against `llama-perplexity --kl-divergence`, on the same GGUFs, text and chunking.

1. Equality: tiny Mistral and Mixtral (synth, v1 tokenizer), F16 as the reference and Q4_K_M and
   Q8_0 as the models, over the default text (localmix/data/langref.txt) in chunks of 512 tokens.
   llama-perplexity (built from the vendored llama.cpp, llamacpp_tools.py) runs twice, as its
   README says: the reference with --kl-divergence-base FILE (it writes the reference's
   log-probabilities), then the model with --kl-divergence. `localmix eval --json` runs once.
   Pass: PPL of the model and of the reference agree to 1 part in 10^4 (4 significant digits),
   mean KLD and same-top rate within 1%.
2. Memory and disk on a 131k (tekken) vocabulary: peak RSS of `localmix eval` (the whole CLI
   process) for a few and for more chunks, and the bytes it wrote, against the size of
   llama-perplexity's base-logits file for the same chunks (checked against its formula, then
   given for the whole text) and the peak RSS of its two runs.

    python benchmarks/eval_vs_llama_perplexity.py [--chunks 16] [--tekken-chunks 4,16] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llamacpp_tools import repack_args, tool

REPO = Path(__file__).resolve().parent.parent
TEXT = REPO / "localmix" / "data" / "langref.txt"
N_CTX = 512
PPL_REL = 1e-4  # 4 significant digits
KLD_REL = 0.01  # mean KLD and same-top rate within 1%


@dataclass(frozen=True)
class Run:
    output: str
    peak_rss: int  # bytes
    written: int  # bytes the process wrote to storage (ru_oublock x 512)


def measured(cmd: list[str], env: dict[str, str] | None = None) -> Run:
    """Run cmd to the end; its combined output, peak RSS and bytes written (os.wait4)."""
    child = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO
    )
    out = child.stdout.read() if child.stdout else ""
    _, status, usage = os.wait4(child.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{Path(cmd[0]).name} failed ({code}):\n{out[-3000:]}")
    return Run(out, usage.ru_maxrss * 1024, usage.ru_oublock * 512)


_FLOAT = r"([-+0-9.eE]+)"
_LLAMA_FIELDS = {
    "ppl": rf"Mean PPL\(Q\)\s*:\s*{_FLOAT}",
    "ppl_ref": rf"Mean PPL\(base\)\s*:\s*{_FLOAT}",
    "ppl_ratio": rf"Mean PPL\(Q\)/PPL\(base\)\s*:\s*{_FLOAT}",
    "kld_mean": rf"Mean\s+KLD:\s*{_FLOAT}",
    "kld_max": rf"Maximum KLD:\s*{_FLOAT}",
    "kld_p999": rf"99\.9%\s+KLD:\s*{_FLOAT}",
    "kld_p99": rf"99\.0%\s+KLD:\s*{_FLOAT}",
    "kld_median": rf"Median\s+KLD:\s*{_FLOAT}",
    "dp_rms": rf"RMS Δp\s*:\s*{_FLOAT}",
    "same_top": rf"Same top p:\s*{_FLOAT}",
}
_PERCENT = ("dp_rms", "same_top")


def parse_llama(output: str) -> dict[str, float]:
    """llama-perplexity --kl-divergence's summary, fractions where it prints percentages."""
    values = {}
    for key, pattern in _LLAMA_FIELDS.items():
        match = re.search(pattern, output)
        if not match:
            raise SystemExit(f"llama-perplexity printed no {key}:\n{output[-3000:]}")
        values[key] = float(match[1]) / (100 if key in _PERCENT else 1)
    return values


def base_logits_bytes(n_vocab: int, n_chunks: int, n_ctx: int = N_CTX) -> int:
    """The size of llama-perplexity's --kl-divergence-base file: a header, the chunks' tokens,
    and per scored token the vocabulary's log-probabilities as uint16 plus 8 bytes of scale."""
    per_token = 2 * (2 * ((n_vocab + 1) // 2) + 4)
    return 8 + 4 + 4 + 4 + 4 * n_chunks * n_ctx + n_chunks * (n_ctx - 1 - n_ctx // 2) * per_token


@dataclass(frozen=True)
class LlamaKld:
    values: dict[str, float]
    base_ppl: float  # the reference's own run, full precision
    base_file: int  # bytes
    base_written: int  # bytes the reference's run wrote (the file, counted as eval's writes are)
    base_rss: int
    kld_rss: int


def llama_kld(
    reference: Path, model: Path, work: Path, chunks: int, threads: int, text: Path = TEXT
) -> LlamaKld:
    """llama-perplexity's two runs: the reference's log-probabilities to a file, then the model
    against them. The file is removed afterwards."""
    binary = str(tool("llama-perplexity"))
    base = work / f"{reference.stem}.kld"
    common = ["-f", str(text), "-c", str(N_CTX), "--chunks", str(chunks), "-t", str(threads)]
    common += repack_args()  # localmix's CPU rule, so both run the same kernels
    first = measured([binary, "-m", str(reference), "--kl-divergence-base", str(base), *common])
    size = base.stat().st_size
    second = measured(
        [binary, "-m", str(model), "--kl-divergence-base", str(base), "--kl-divergence", *common]
    )
    base.unlink()
    match = re.search(rf"Final estimate: PPL = {_FLOAT}", first.output)
    if not match:
        raise SystemExit(f"llama-perplexity printed no final PPL:\n{first.output[-3000:]}")
    return LlamaKld(parse_llama(second.output), float(match[1]), size, first.written,
                    first.peak_rss, second.peak_rss)  # fmt: skip


def localmix_eval(
    reference: Path, model: Path, chunks: int, threads: int, home: Path, text: Path = TEXT
) -> tuple[dict, Run]:
    """`localmix eval MODEL --against REF --json` as a user runs it (its own process)."""
    env = {**os.environ, "LOCALMIX_HOME": str(home), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "localmix", "eval", str(model), "--against", str(reference),
           "--text", str(text), "--ctx", str(N_CTX), "--chunks", str(chunks), "-t", str(threads),
           "--json"]  # fmt: skip
    run = measured(cmd, env)
    return json.loads(run.output[run.output.index("{") :]), run


def tiny_models(work: Path, arch: str, tokenizer: str, quants: tuple[str, ...]) -> dict[str, Path]:
    """A tiny synth model of arch as F16 and the given quants (made by localmix quantize)."""
    from localmix.build.convert import convert
    from localmix.build.quantize import quantize
    from localmix.build.synth import checkpoints as synth

    os.environ["LOCALMIX_HOME"] = str(work / "home")
    ckpt = synth.checkpoint(work / f"{arch}-{tokenizer}", arch=arch, size="tiny",
                            tokenizer=tokenizer, seed=0)  # fmt: skip
    f16 = convert(ckpt, work / f"{arch}-{tokenizer}-F16.gguf", outtype="f16")
    files = {"F16": f16}
    for quant in quants:
        files[quant] = quantize(f16, work / f"{arch}-{tokenizer}-{quant}.gguf", quant)
    return files


def _rel(ours: float, theirs: float) -> float:
    return abs(ours - theirs) / abs(theirs) if theirs else abs(ours)


def equality(work: Path, chunks: int, threads: int) -> bool:
    print(f"Equality: {chunks} chunks of {N_CTX} tokens of {TEXT.name}, {threads} threads")
    print(f"{'model':<16} {'quant':<7} {'':<9} {'PPL':>12} {'PPL(ref)':>12} {'mean KLD':>10} "
          f"{'99% KLD':>9} {'max KLD':>9} {'same top':>9} {'RMS Δp':>9}")  # fmt: skip
    ok = True
    for arch in ("mistral", "mixtral"):
        files = tiny_models(work, arch, "v1", ("Q4_K_M", "Q8_0"))
        for quant in ("Q4_K_M", "Q8_0"):
            theirs = llama_kld(files["F16"], files[quant], work, chunks, threads)
            ours, _ = localmix_eval(files["F16"], files[quant], chunks, threads, work / "home")
            s = ours["scores"]
            checks = {
                "ppl": _rel(s["ppl"], theirs.values["ppl"]) <= PPL_REL,
                "ppl_ref": _rel(s["ppl_ref"], theirs.base_ppl) <= PPL_REL,
                "kld": _rel(s["kld_mean"], theirs.values["kld_mean"]) <= KLD_REL,
                "top": _rel(s["same_top"], theirs.values["same_top"]) <= KLD_REL,
            }
            ok &= all(checks.values())
            for who, v, ref in (("localmix", s, theirs.base_ppl),
                                ("llama", theirs.values, theirs.base_ppl)):  # fmt: skip
                print(f"{'tiny ' + arch:<16} {quant:<7} {who:<9} {v['ppl']:>12.4f} "
                      f"{(v['ppl_ref'] if who == 'localmix' else ref):>12.4f} "
                      f"{v['kld_mean']:>10.6f} {v['kld_p99']:>9.6f} {v['kld_max']:>9.6f} "
                      f"{100 * v['same_top']:>8.3f}% {100 * v['dp_rms']:>8.4f}%")  # fmt: skip
            verdict = ", ".join(f"{k} {'ok' if v else 'DIFFERENT'}" for k, v in checks.items())
            print(f"{'':<16} {'':<7} {'':<9} rel. diff: PPL {_rel(s['ppl'], theirs.values['ppl']):.1e}"
                  f", PPL(ref) {_rel(s['ppl_ref'], theirs.base_ppl):.1e}, mean KLD "
                  f"{_rel(s['kld_mean'], theirs.values['kld_mean']):.1e}, same top "
                  f"{_rel(s['same_top'], theirs.values['same_top']):.1e} -> {verdict}")  # fmt: skip
    return ok


def memory(work: Path, tekken_chunks: list[int], threads: int) -> None:
    from localmix.build.synth.checkpoints import TOKENIZERS

    n_vocab = TOKENIZERS["tekken"].vocab_size
    files = tiny_models(work, "mistral", "tekken", ("Q4_K_M",))
    print(f"\nMemory and disk: tiny Mistral with tekken's {n_vocab}-token vocabulary, Q4_K_M "
          f"against F16, chunks of {N_CTX}, {threads} threads")  # fmt: skip
    print(f"{'chunks':>6} {'eval peak RSS':>14} {'eval wrote':>11} {'llama base file':>16} "
          f"{'llama wrote':>12} {'llama base RSS':>15} {'llama KLD RSS':>14} "
          f"{'KLD ours/theirs':>16}")  # fmt: skip
    mib = 2**20
    for chunks in tekken_chunks:
        ours, run = localmix_eval(files["F16"], files["Q4_K_M"], chunks, threads, work / "home")
        theirs = llama_kld(files["F16"], files["Q4_K_M"], work, chunks, threads)
        expected = base_logits_bytes(n_vocab, chunks)
        if theirs.base_file != expected:
            raise SystemExit(f"base file is {theirs.base_file} bytes, the formula says {expected}")
        ratio = ours["scores"]["kld_mean"] / theirs.values["kld_mean"]
        print(f"{chunks:>6} {run.peak_rss / mib:>10.0f} MiB {run.written / mib:>7.1f} MiB "
              f"{theirs.base_file / mib:>12.0f} MiB {theirs.base_written / mib:>8.0f} MiB "
              f"{theirs.base_rss / mib:>11.0f} MiB "
              f"{theirs.kld_rss / mib:>10.0f} MiB {ratio:>16.5f}")  # fmt: skip
    from localmix import corpus
    from localmix.llama.engine import Engine, EngineConfig

    with Engine(EngineConfig(files["F16"], n_ctx=N_CTX)) as engine:
        n_tokens = len(engine.tokenize(corpus.default().text, add_bos=True, special=False))
    whole = n_tokens // N_CTX
    print(f"The whole text ({n_tokens} tokens, {whole} chunks): llama-perplexity's base file "
          f"would be {base_logits_bytes(n_vocab, whole) / 2**30:.2f} GiB; localmix eval writes "
          "none, and its memory does not grow with the text.")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=16, help="chunks for the equality runs")
    parser.add_argument("--tekken-chunks", default="4,16", help="chunk counts for the memory runs")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ok = equality(work, args.chunks, args.threads)
        memory(work, [int(n) for n in args.tekken_chunks.split(",")], args.threads)
    print("\nequal" if ok else "\nDIFFERENT")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
