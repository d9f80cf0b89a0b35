"""Bad input, table-driven: each case ends in a one-line error, a non-zero exit, no traceback, and
nothing half-written where a model would be."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cli_run import Result, run_cli


@pytest.fixture(autouse=True)
def _no_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    """chat reads piped stdin: give it none, as a run with </dev/null would."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[Path, Path], list[str]]  # (work dir, a tiny checkpoint) -> CLI args
    code: int
    needle: str


def _copy_ckpt(work: Path, ckpt: Path) -> Path:
    dest = work / "ckpt"
    shutil.copytree(ckpt, dest)
    return dest


def _edit_config(work: Path, ckpt: Path, **changes: object) -> Path:
    dest = _copy_ckpt(work, ckpt)
    config = json.loads((dest / "config.json").read_text())
    config.update(changes)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def _truncate(path: Path, keep: float) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(int(size * keep))


def _truncated_safetensors(work: Path, ckpt: Path) -> list[str]:
    dest = _copy_ckpt(work, ckpt)
    shard = sorted(dest.glob("*.safetensors"))[0]
    _truncate(shard, 0.5)
    return ["convert", str(dest), "-o", str(work / "out.gguf")]


def _missing_shard(work: Path, ckpt: Path) -> list[str]:
    dest = _copy_ckpt(work, ckpt)
    shards = sorted(dest.glob("*.safetensors"))
    weight_map = {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}
    if len(shards) == 1:
        (dest / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
        shards[0].rename(dest / "model-00001-of-00002.safetensors")
    else:
        shards[-1].unlink()
    return ["convert", str(dest), "-o", str(work / "out.gguf")]


def _no_tokenizer(work: Path, ckpt: Path) -> list[str]:
    dest = _copy_ckpt(work, ckpt)
    for path in dest.iterdir():
        if path.name.startswith(("tokenizer", "tekken")):
            path.unlink()
    return ["convert", str(dest), "-o", str(work / "out.gguf")]


def _gguf_from(work: Path, tiny_gguf: Path, keep: float) -> Path:
    dest = work / "model.gguf"
    shutil.copyfile(tiny_gguf, dest)
    _truncate(dest, keep)
    return dest


def _text_as_gguf(work: Path) -> Path:
    path = work / "notes.gguf"
    path.write_text("these are my notes, not a model\n")
    return path


def _broken_catalog(work: Path) -> list[str]:
    home = Path(os.environ["LOCALMIX_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "models.toml").write_text('[models."mine"]\narchitecture = 7\n')
    return ["list", "--available"]


def _not_a_dir(work: Path) -> Path:
    # chmod cannot stop root (CI runs as root); a regular file as the parent stops everyone.
    blocker = work / "blocker"
    blocker.write_text("a file, not a directory")
    return blocker


CONVERT_CASES = [
    Case("missing dir", lambda w, c: ["convert", str(w / "nope")], 5, "nope"),
    Case(
        "empty dir", lambda w, c: ["convert", str((w / "empty").mkdir() or w / "empty")], 5, "empty"
    ),
    Case(
        "unsupported architecture",
        lambda w, c: ["convert", str(_edit_config(w, c, architectures=["GPT2LMHeadModel"]))],
        5,
        "GPT2LMHeadModel",
    ),
    Case(
        "config is not JSON",
        lambda w, c: [
            "convert",
            str((_copy_ckpt(w, c) / "config.json").write_text("{oops") and w / "ckpt"),
        ],
        5,
        "config.json",
    ),
    Case("truncated safetensors", _truncated_safetensors, 5, ".safetensors"),
    Case("missing safetensors shard", _missing_shard, 5, "model-00002-of-00002.safetensors"),
    Case("no tokenizer", _no_tokenizer, 5, "tokenizer"),
    Case(
        "shape mismatch with config",
        lambda w, c: ["convert", str(_edit_config(w, c, hidden_size=96)), "-o", str(w / "o.gguf")],
        5,
        "shape",
    ),
    Case(
        "unknown outtype",
        lambda w, c: ["convert", str(c), "--outtype", "q4", "-o", str(w / "o.gguf")],
        2,
        "q4",
    ),
    Case(
        "output dir not writable",
        lambda w, c: ["convert", str(c), "-o", str(_not_a_dir(w) / "o.gguf")],
        12,
        "blocker",
    ),
]

QUANTIZE_CASES = [
    Case("missing gguf", lambda w, g: ["quantize", str(w / "missing.gguf")], 6, "missing.gguf"),
    Case("truncated gguf", lambda w, g: ["quantize", str(_gguf_from(w, g, 0.6))], 6, "truncated"),
    Case(
        "gguf header cut", lambda w, g: ["quantize", str(_gguf_from(w, g, 0.001))], 6, "model.gguf"
    ),
    Case(
        "text file named .gguf", lambda w, g: ["quantize", str(_text_as_gguf(w))], 6, "not a GGUF"
    ),
    Case("unknown quant type", lambda w, g: ["quantize", str(g), "--type", "Q9_X"], 2, "Q9_X"),
    Case(
        "type needing an imatrix", lambda w, g: ["quantize", str(g), "-q", "iq2_xxs"], 2, "IQ2_XXS"
    ),
    Case(
        "quantize output not writable",
        lambda w, g: ["quantize", str(g), "-o", str(_not_a_dir(w) / "q.gguf")],
        12,
        "blocker",
    ),
]


def _relaid(work: Path, gguf: Path, alignment: int) -> str:
    from tests import gguf_fuzz

    data = gguf.read_bytes()
    path = work / f"aligned{alignment}.gguf"
    path.write_bytes(gguf_fuzz.relaid(data, gguf_fuzz.layout(data), alignment))
    return str(path)


def _chat(*extra: str) -> Callable[[Path, Path], list[str]]:
    return lambda w, g: ["chat", str(g), "hi", "-n", "1", *extra]


def _aligned(alignment: int, command: list[str]) -> Case:
    return Case(
        f"alignment {alignment} at {command[0]}",
        lambda w, g: [*command, _relaid(w, g, alignment)],
        6,
        "alignment",
    )


BOUNDS_CASES = [
    Case("threads 100000", _chat("--threads", "100000"), 2, "100000"),
    Case(
        "quantize threads 100000",
        lambda w, g: ["quantize", str(g), "-o", str(w / "q.gguf"), "-t", "100000"],
        2,
        "100000",
    ),
    Case("a context no memory holds", _chat("--ctx", "1000000000"), 10, "KV cache"),
    Case("context below 256", _chat("--ctx", "1"), 2, "256"),
    Case("top-p nan", _chat("--top-p", "nan"), 2, "not a number"),
    Case("temperature inf", _chat("--temperature", "inf"), 2, "not a number"),
    Case("min-p above 1", _chat("--min-p", "2"), 2, "between 0 and 1"),
    Case(
        "bench prompt past the context",
        lambda w, g: ["bench", str(g), "-p", "100000", "-n", "0", "-r", "1"],
        11,
        "100000",
    ),
    Case(
        "bench range of a billion",
        lambda w, g: ["bench", str(g), "-p", "1-1000000000"],
        2,
        "more than 1000",
    ),
]

GGUF_CASES = [
    _aligned(a, cmd)
    for a in (0, 1, 3, 16)
    for cmd in (["show"], ["import"], ["quantize", "-o", "/nonexistent-dir/x.gguf"], ["chat"])
] + [
    Case("show a missing path", lambda w, g: ["show", str(w / "nope.gguf")], 3, "nope.gguf"),
    Case(
        "quantize /nonexistent.gguf",
        lambda w, g: ["quantize", "/nonexistent.gguf"],
        6,
        "no such file",
    ),
    Case("import an empty name", lambda w, g: ["import", str(g), "--name", ""], 2, "name"),
    Case(
        "pull a revision with ..",
        lambda w, g: ["pull", "hf.co/org/x-GGUF:Q4_K_M", "--revision", "../../../../X"],
        2,
        "not a revision",
    ),
    Case("pull a repo id with ..", lambda w, g: ["pull", "hf.co/org/..:Q4_K_M"], 2, ""),
]

OTHER_CASES = [
    Case("broken models.toml", lambda w, g: _broken_catalog(w), 4, "models.toml"),
    Case("unknown model name", lambda w, g: ["show", "mixtrl"], 3, "mixtrl"),
    Case("rm unknown model", lambda w, g: ["rm", "nothing-here"], 3, "nothing-here"),
    Case("unknown option", lambda w, g: ["list", "--colour"], 2, "--colour"),
]


def _assert_clean_failure(result: Result, case: Case, work: Path, before: set[Path]) -> None:
    assert result.code == case.code, (result.code, result.err)
    assert "Traceback" not in result.err + result.out
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert lines and lines[0].startswith("error: "), result.err
    assert len([line for line in lines if not line.startswith("hint: ")]) == 1, result.err
    assert case.needle.lower() in result.err.lower(), result.err
    # Nothing half-written where a model would be: no new file anywhere, no store entry.
    home = Path(os.environ["LOCALMIX_HOME"])
    assert [
        p for p in home.rglob("*") if p.is_file() and p.relative_to(home).parts[0] == "tmp"
    ] == []
    assert not (home / "manifests").exists() or not any((home / "manifests").rglob("*.json"))
    assert _files(work) == before


def _files(work: Path) -> set[Path]:
    return {p for p in work.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", CONVERT_CASES, ids=lambda c: c.id)
def test_bad_checkpoint_input(
    case: Case, tmp_path: Path, tiny_mistral_ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    args = case.make(work, tiny_mistral_ckpt)
    before = _files(work)
    _assert_clean_failure(run_cli(capsys, *args), case, work, before)


@pytest.mark.parametrize(
    "case", QUANTIZE_CASES + OTHER_CASES + BOUNDS_CASES + GGUF_CASES, ids=lambda c: c.id
)
def test_bad_gguf_and_model_input(
    case: Case, tmp_path: Path, tiny_mistral_gguf_f16: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    args = case.make(work, tiny_mistral_gguf_f16)
    before = _files(work)
    _assert_clean_failure(run_cli(capsys, *args), case, work, before)
