"""Same output as llama.cpp's own tools: `localmix convert` against convert_hf_to_gguf.py, and
`localmix quantize` against llama-quantize, all from the llama.cpp source that the pinned
llama-cpp-python vendors.

    python benchmarks/reference_tools.py [--keep DIR] [--arch A] [--size S] [--layout L]

For synthetic Mistral, Mixtral and Ministral 3 checkpoints (sizes tiny and small; Hugging Face and
Mistral-native; --tokenizer v1, v3 or tekken)
it converts with both converters (f16 and f32) and compares every tensor (name, type, shape, bytes)
and every metadata key; then it quantizes localmix's f16 GGUF to Q4_K_M with localmix and with
llama-quantize and compares the results byte for byte. convert_hf_to_gguf.py needs torch and
transformers: they live in a separate virtual environment in the user cache directory that this
script makes on first use, never in localmix's dependencies. Exit status 0 when nothing essential
differs; general.* keys other than the architecture and file type are listed but not essential."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamacpp_tools  # a sibling script, not a package

# The converter's own requirements (requirements/requirements-convert_*.txt in the vendored tree)
# decide the reference venv, except torch: its pin comes from a CPU index we cannot reach, so the
# machine's local CPU wheel stands in; gguf comes from the vendored gguf-py, which the script puts
# on sys.path itself.
TORCH = "torch==2.13.0"
EXTRA_PACKAGES = ("safetensors", "mistral_common", "pyyaml", "tqdm", "requests")
_REQUIREMENT_FILES = (
    "requirements-convert_hf_to_gguf.txt",
    "requirements-convert_legacy_llama.txt",
)
# Differences that are expected, with the reason the report shows. Keyed by (layout, key, aspect).
_NO_CONTEXT = (
    "convert_hf_to_gguf.py --mistral-format finds no context length in params.json "
    "(max_seq_len), and llama.cpp refuses to load its GGUF without one"
)
INTENTIONAL = {
    ("mistral", "llama.context_length", "extra"): _NO_CONTEXT,
    ("mistral", "mistral3.context_length", "extra"): _NO_CONTEXT,
}
# The essential metadata the comparison must actually see (absent from both files = a failure too).
REQUIRED_KEYS = (
    "general.architecture",
    "{arch}.context_length",
    "{arch}.embedding_length",
    "{arch}.block_count",
    "{arch}.feed_forward_length",
    "{arch}.attention.head_count",
    "{arch}.attention.head_count_kv",
    "{arch}.rope.freq_base",
    "{arch}.rope.dimension_count",
    "{arch}.attention.layer_norm_rms_epsilon",
    "tokenizer.ggml.model",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.chat_template",
)
REQUIRED_MOE_KEYS = ("{arch}.expert_count", "{arch}.expert_used_count")
# general.* keys other than these describe the file (name, sizes, who made it), not the model
_GENERAL_ESSENTIAL = {"general.architecture", "general.file_type", "general.alignment"}


@dataclass(frozen=True)
class Diff:
    what: str  # tensor or key name
    aspect: str  # "missing", "extra", "type", "shape", "bytes", "value"
    expected: str  # the reference tool's
    got: str  # localmix's
    essential: bool
    note: str = ""  # why a non-essential difference is expected


@dataclass(frozen=True)
class Comparison:
    case: str
    n_tensors: int
    n_keys: int
    diffs: tuple[Diff, ...]
    types: str  # tensor-type histogram of localmix's file, e.g. "F32×5 Q4_K×8"

    @property
    def essential(self) -> list[Diff]:
        return [d for d in self.diffs if d.essential]


# ---- the reference environment ----------------------------------------------------------------


def converter_requirements(src: Path) -> list[str]:
    """What convert_hf_to_gguf.py needs, from the vendored requirements files (torch swapped)."""
    wanted: list[str] = []
    for name in _REQUIREMENT_FILES:
        for line in (src / "requirements" / name).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if not line or line.startswith("-"):
                continue
            if line.startswith("torch"):
                line = TORCH
            if not line.startswith("gguf") and line not in wanted:
                wanted.append(line)
    return wanted + [p for p in EXTRA_PACKAGES if p not in wanted]


def refvenv(src: Path) -> Path:
    """Python of the reference-tools venv (made once, in the user cache directory)."""
    import platformdirs

    root = Path(platformdirs.user_cache_dir("localmix", appauthor=False)) / "refvenv"
    python = root / "bin" / "python"
    marker = root / "requirements.done"
    packages = converter_requirements(src)
    wanted = "\n".join(packages)
    if marker.is_file() and marker.read_text() == wanted:
        return python
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *packages], check=True)
    marker.write_text(wanted)
    return python


def llama_source() -> Path:
    """The vendored llama.cpp tree that llamacpp_tools unpacked (and built llama-quantize from)."""
    llamacpp_tools.tool("llama-quantize")
    src = llamacpp_tools.cache_dir() / "src"
    if not (src / "convert_hf_to_gguf.py").is_file():
        raise RuntimeError(f"{src} has no convert_hf_to_gguf.py")
    return src


def reference_convert(python: Path, src: Path, ckpt: Path, out: Path, outtype: str) -> Path:
    cmd = [str(python), str(src / "convert_hf_to_gguf.py"), str(ckpt), "--outfile", str(out)]
    cmd += ["--outtype", outtype]
    if (ckpt / "params.json").is_file() and not (ckpt / "config.json").is_file():
        cmd.append("--mistral-format")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    _run(cmd, env=env)
    return out


def reference_quantize(src_gguf: Path, out: Path, qtype: str) -> Path:
    threads = str(os.cpu_count() or 1)
    _run([str(llamacpp_tools.tool("llama-quantize")), str(src_gguf), str(out), qtype, threads])
    return out


def _run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    # errors="replace": llama-quantize logs token text, and tekken pieces are partial UTF-8
    done = subprocess.run(
        cmd, capture_output=True, text=True, errors="replace", env=env, check=False
    )
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
        raise RuntimeError(
            f"{Path(cmd[1] if cmd[0].endswith('python') else cmd[0]).name} failed:\n{tail}"
        )


# ---- comparing two GGUF files -----------------------------------------------------------------


def _fields(reader: Any) -> dict[str, Any]:
    out = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):  # header fields: version, tensor and kv counts
            continue
        out[name] = field.contents()
    return out


def _show(value: Any) -> str:
    if isinstance(value, list):
        head = ", ".join(repr(v) for v in value[:3])
        return f"[{len(value)} items: {head}{', ...' if len(value) > 3 else ''}]"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _value_diff(expected: Any, got: Any) -> tuple[str, str]:
    if isinstance(expected, list) and isinstance(got, list) and len(expected) == len(got):
        at = next(i for i, (a, b) in enumerate(zip(expected, got, strict=True)) if a != b)
        return f"[{at}] = {_show(expected[at])}", f"[{at}] = {_show(got[at])}"
    return _show(expected), _show(got)


def compare(case: str, reference: Path, ours: Path, *, layout: str = "hf") -> Comparison:
    """Every tensor and every metadata key of `ours` against `reference`."""
    import numpy as np
    from gguf import GGUFReader

    ref, got = GGUFReader(reference), GGUFReader(ours)
    diffs: list[Diff] = []
    ref_t = {t.name: t for t in ref.tensors}
    got_t = {t.name: t for t in got.tensors}
    for name in sorted(ref_t.keys() - got_t.keys()):
        diffs.append(Diff(name, "missing", "present", "-", True))
    for name in sorted(got_t.keys() - ref_t.keys()):
        diffs.append(Diff(name, "extra", "-", "present", True))
    ref_order, got_order = [t.name for t in ref.tensors], [t.name for t in got.tensors]
    if ref_order != got_order and not diffs:
        at = next(i for i, (a, b) in enumerate(zip(ref_order, got_order, strict=True)) if a != b)
        why = "the reference follows the checkpoint's sorted tensor names; order has no meaning"
        diffs.append(
            Diff("(tensor order)", "order", ref_order[at], got_order[at], False, why + f" (#{at})")
        )
    for name in sorted(ref_t.keys() & got_t.keys()):
        a, b = ref_t[name], got_t[name]
        if a.tensor_type != b.tensor_type:
            diffs.append(Diff(name, "type", a.tensor_type.name, b.tensor_type.name, True))
        elif list(a.shape) != list(b.shape):
            diffs.append(Diff(name, "shape", str(list(a.shape)), str(list(b.shape)), True))
        elif not np.array_equal(a.data.view(np.uint8), b.data.view(np.uint8)):
            where = np.flatnonzero(a.data.view(np.uint8).ravel() != b.data.view(np.uint8).ravel())
            diffs.append(
                Diff(name, "bytes", f"{a.n_bytes} bytes", f"{where.size} bytes differ", True)
            )
    ref_f, got_f = _fields(ref), _fields(got)
    for key in sorted(ref_f.keys() | got_f.keys()):
        if key not in got_f:
            diff = Diff(key, "missing", _show(ref_f[key]), "-", True)
        elif key not in ref_f:
            diff = Diff(key, "extra", "-", _show(got_f[key]), True)
        elif ref_f[key] != got_f[key]:
            diff = Diff(key, "value", *_value_diff(ref_f[key], got_f[key]), True)
        else:
            continue
        diffs.append(_classify(diff, layout))
    arch = got_f.get("general.architecture", "llama")
    moe = any("_exps" in name for name in got_t)
    for template in REQUIRED_KEYS + (REQUIRED_MOE_KEYS if moe else ()):
        key = template.format(arch=arch)
        if key not in ref_f and key not in got_f:
            diffs.append(Diff(key, "absent from both", "-", "-", True))
    counts: dict[str, int] = {}
    for t in got.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    types = " ".join(f"{k}×{v}" for k, v in sorted(counts.items()))
    return Comparison(case, len(ref_t), len(ref_f), tuple(diffs), types)


# ---- the run ----------------------------------------------------------------------------------


def run(
    work: Path, archs: list[str], layouts: list[str], sizes: list[str], tokenizer: str = "v1"
) -> list[Comparison]:
    from localmix.build.convert import convert
    from localmix.build.quantize import quantize
    from localmix.build.synth import checkpoints as synth

    src = llama_source()
    python = refvenv(src)
    results = []
    for size in sizes:
        for arch in archs:
            for layout in layouts:
                name = f"{size}-{arch}" + ("" if layout == "hf" else "-native")
                ckpt = synth.checkpoint(
                    work / name, arch=arch, size=size, layout=layout, seed=0, tokenizer=tokenizer
                )
                for outtype in ("f16", "f32"):
                    case = f"{name} convert {outtype}"
                    ours = convert(ckpt, work / f"{name}.localmix.{outtype}.gguf", outtype=outtype)
                    try:
                        theirs = reference_convert(
                            python, src, ckpt, work / f"{name}.reference.{outtype}.gguf", outtype
                        )
                    except RuntimeError as exc:
                        if layout == "hf" or arch != "mixtral":
                            raise
                        # its Mistral-native MoE path is for DeepSeek-style models: no Mixtral
                        results.append(_reference_failed(case, exc))
                        continue
                    results.append(compare(case, theirs, ours, layout=layout))
                # both quantizers read the same f16 file, so only the quantizer can differ
                f16 = work / f"{name}.localmix.f16.gguf"
                ours_q = quantize(f16, work / f"{name}.localmix.Q4_K_M.gguf", "Q4_K_M")
                theirs_q = reference_quantize(f16, work / f"{name}.reference.Q4_K_M.gguf", "Q4_K_M")
                results.append(compare(f"{name} quantize Q4_K_M", theirs_q, ours_q))
    return results


def _classify(diff: Diff, layout: str) -> Diff:
    from dataclasses import replace

    reason = INTENTIONAL.get((layout, diff.what, diff.aspect))
    if reason:
        return replace(diff, essential=False, note=reason)
    if diff.what.startswith("general.") and diff.what not in _GENERAL_ESSENTIAL:
        return replace(diff, essential=False, note="describes the file, not the model")
    return diff


def _reference_failed(case: str, exc: Exception) -> Comparison:
    last = str(exc).strip().splitlines()[-1]
    note = "convert_hf_to_gguf.py --mistral-format routes MoE to its DeepSeek-style path"
    return Comparison(case, 0, 0, (Diff("(reference tool)", "failed", last, "-", False, note),), "")


def report(results: list[Comparison]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped into a file or a log: don't squeeze to 80 columns
        console = Console(width=160)
    summary = Table(title="localmix vs llama.cpp's own tools")
    for col in (
        "case",
        "tensors",
        "keys",
        "essential diffs",
        "other diffs",
        "localmix tensor types",
    ):
        summary.add_column(col, justify="right" if col in ("tensors", "keys") else "left")
    for r in results:
        n_ess = len(r.essential)
        summary.add_row(
            r.case,
            str(r.n_tensors),
            str(r.n_keys),
            f"[red]{n_ess}[/]" if n_ess else "[green]0[/]",
            str(len(r.diffs) - n_ess),
            r.types,
        )
    console.print(summary)
    details = Table(title="differences (reference tool → localmix)")
    for col in ("case", "tensor / key", "aspect", "reference", "localmix", "essential / why not"):
        details.add_column(col, overflow="fold")
    for r in results:
        for d in r.diffs:
            details.add_row(
                r.case,
                d.what,
                d.aspect,
                d.expected,
                d.got,
                "[red]yes[/]" if d.essential else f"no: {d.note}",
            )
    if details.row_count:
        console.print(details)
    else:
        console.print("no differences at all")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="write (and keep) the checkpoints and GGUFs here")
    parser.add_argument("--arch", action="append", choices=["mistral", "mixtral", "ministral3"])
    parser.add_argument("--tokenizer", default="v1", choices=["v1", "v3", "tekken"])
    parser.add_argument(
        "--layout",
        action="append",
        choices=["hf", "mistral"],
        help="checkpoint layouts (default both)",
    )
    parser.add_argument("--size", action="append", choices=["tiny", "small", "125m"])
    args = parser.parse_args(argv)
    archs = args.arch or ["mistral", "mixtral", "ministral3"]
    # tiny (dim 64) is below k-quant block size 256, so Q4_K_M falls back to legacy types there;
    # small (dim 256) exercises Q4_K and Q6_K themselves
    sizes = args.size or ["tiny", "small"]
    layouts = args.layout or ["hf", "mistral"]
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        results = run(args.keep, archs, layouts, sizes, args.tokenizer)
    else:
        with tempfile.TemporaryDirectory(prefix="localmix-reftools-") as tmp:
            results = run(Path(tmp), archs, layouts, sizes, args.tokenizer)
    report(results)
    return 1 if any(r.essential for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
