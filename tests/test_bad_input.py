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
    env: tuple[tuple[str, str], ...] = ()  # environment for this run; WORK is the work dir


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
    assert "internal error" not in result.err
    lines = [line for line in result.err.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    # exactly one error line, then its hint, and nothing after: lines before it may only be
    # progress ("resolving ...") printed before the failure was known
    assert len(errors) == 1 and errors[0] == len(lines) - 2, result.err
    assert lines[-1].startswith("hint: "), result.err
    assert not any("error" in line.lower() for line in lines[: errors[0]]), result.err
    assert case.needle.lower() in result.err.lower(), result.err
    # Nothing half-written where a model would be: no new file anywhere, no store entry.
    home = Path(os.environ["LOCALMIX_HOME"])
    assert [
        p for p in home.rglob("*") if p.is_file() and p.relative_to(home).parts[0] == "tmp"
    ] == []
    assert not (home / "manifests").exists() or not any((home / "manifests").rglob("*.json"))
    assert _files(work) == before
    assert not [p for p in work.rglob("*.partial")], "a partial output was left behind"


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


# ---- every command, every kind of slip: wrong types, ranges, empties, paths, env, conflicts ---


def _args(*items: str) -> Callable[[Path, Path], list[str]]:
    """CLI args with GGUF standing for the tiny model and WORK for the work dir."""
    return lambda w, g: [i.replace("GGUF", str(g)).replace("WORK", str(w)) for i in items]


def _c(id: str, code: int, needle: str, *items: str, env: dict[str, str] | None = None) -> Case:
    return Case(id, _args(*items), code, needle, tuple((env or {}).items()))


def _requantized(work: Path, gguf: Path) -> str:
    """A Q8_0 copy of the tiny model, made outside the work dir (it is input, not output)."""
    from localmix.build import quantize

    out = work.parent / "q8.gguf"
    if not out.exists():
        quantize.quantize(gguf, out, "Q8_0", threads=1)
    return str(out)


def _odd_architecture(work: Path, gguf: Path) -> str:
    from tests.test_architectures import renamed_architecture

    return str(renamed_architecture(gguf, work.parent / "odd.gguf"))


FILE = str(Path(__file__))  # a readable file that is not a GGUF
HOME_FILE = {"LOCALMIX_HOME": FILE}

PULL_CASES = [
    _c("pull no name", 2, "Missing argument", "pull"),
    _c("pull empty name", 3, "empty", "pull", ""),
    _c("pull unknown name", 3, "mixtrl", "pull", "mixtrl"),
    _c("pull impossible quant", 2, "Q9_X", "pull", "mistral", "-q", "Q9_X"),
    _c("pull empty quant", 2, "--quant is empty", "pull", "mistral", "-q", ""),
    _c("pull lower-case nonsense quant", 2, "not a quantization", "pull", "mistral", "-q", "zz"),
    _c("pull empty revision", 2, "not a revision", "pull", "hf.co/org/repo", "--revision", ""),
    _c("pull revision with spaces", 2, "not a revision", "pull", "hf.co/o/r", "--revision", "a b"),
    _c("pull hf.co with no repo", 3, "not a Hub repo", "pull", "hf.co/"),
    _c("pull hf.co with no org", 3, "not a Hub repo", "pull", "hf.co/org"),
    _c("pull an empty quant tag", 2, "repository id", "pull", "hf.co/org/repo:"),
    _c("pull a path", 2, "imported, not pulled", "pull", "GGUF"),
    _c("pull --from-source of hf.co", 2, "--from-source", "pull", "hf.co/o/r", "--from-source"),
    _c("pull missing imatrix", 2, "importance matrix", "pull", "mistral", "--imatrix", "/nope"),
    _c("pull imatrix a folder", 2, "importance matrix", "pull", "mistral", "--imatrix", "WORK"),
    _c("pull extra argument", 2, "extra", "pull", "mistral", "more"),
    _c("pull unknown option", 2, "--fast", "pull", "mistral", "--fast"),
    _c("HF_ENDPOINT garbage", 2, "HF_ENDPOINT", "pull", "hf.co/o/r", env={"HF_ENDPOINT": "junk"}),
    _c(
        "HF_ENDPOINT bad ipv6",
        2,
        "HF_ENDPOINT",
        "pull",
        "hf.co/o/r",
        env={"HF_ENDPOINT": "http://[::1"},
    ),
    _c("HF_ENDPOINT ftp", 2, "HF_ENDPOINT", "pull", "hf.co/o/r", env={"HF_ENDPOINT": "ftp://x"}),
    _c(
        "HF_ENDPOINT bad port, token not echoed",
        2,
        "HF_ENDPOINT",
        "pull",
        "hf.co/o/r",
        env={"HF_ENDPOINT": "http://user:sekrit@:99999"},
    ),
    _c(
        "HF_ENDPOINT unreachable",
        7,
        "cannot reach",
        "pull",
        "hf.co/o/r",
        env={"HF_ENDPOINT": "http://127.0.0.1:9"},
    ),
    _c("pull offline, nothing cached", 7, "offline", "pull", "hf.co/o/r", "--offline"),
    _c(
        "HF_HUB_OFFLINE nothing cached",
        7,
        "offline",
        "pull",
        "hf.co/o/r",
        env={"HF_HUB_OFFLINE": "1"},
    ),
    _c("pull with LOCALMIX_HOME a file", 2, "LOCALMIX_HOME", "pull", "hf.co/o/r", env=HOME_FILE),
]

IMPORT_CASES = [
    _c("import no path", 2, "Missing argument", "import"),
    _c("import missing file", 6, "no such file", "import", "WORK/none.gguf"),
    _c("import a folder", 6, "directory", "import", "WORK"),
    _c("import mmproj missing", 6, "no such file", "import", "GGUF", "--mmproj", "WORK/n.gguf"),
    _c("import mmproj not a GGUF", 6, "not a GGUF", "import", "GGUF", "--mmproj", FILE),
    _c("import mmproj a text model", 6, "not an mmproj", "import", "GGUF", "--mmproj", "GGUF"),
    _c("import an empty path", 6, "directory", "import", ""),
    _c("import a text file", 6, "not a GGUF", "import", FILE),
    _c("import name ..", 2, "usable model name", "import", "GGUF", "--name", ".."),
    _c("import name spaces", 2, "usable model name", "import", "GGUF", "--name", "   "),
    _c("import name padded", 2, "usable model name", "import", "GGUF", "-n", " x"),
    _c("import name of slashes", 2, "usable model name", "import", "GGUF", "-n", "///"),
    _c("import with LOCALMIX_HOME a file", 2, "LOCALMIX_HOME", "import", "GGUF", env=HOME_FILE),
    Case(
        "import unknown architecture", lambda w, g: ["import", _odd_architecture(w, g)], 6, "llamz"
    ),
    _c("import unknown option", 2, "--link", "import", "GGUF", "--link"),
]

STORE_CASES = [
    _c("show no name", 2, "Missing argument", "show"),
    _c("show empty name", 3, "not in the store", "show", ""),
    _c("show missing quant", 3, "not in the store", "show", "tiny:Q4_K_M"),
    _c("show a folder", 6, "directory", "show", "WORK"),
    _c("show a missing .gguf", 3, "no such file", "show", "WORK/x.gguf"),
    _c("show a text file", 6, "not a GGUF", "show", FILE),
    _c("show with LOCALMIX_HOME a file", 2, "LOCALMIX_HOME", "show", "x", env=HOME_FILE),
    _c("show --json extra", 2, "extra", "show", "x", "y"),
    _c("rm no name", 2, "Missing argument", "rm"),
    _c("rm empty name", 3, "not in the store", "rm", ""),
    _c("rm a path", 3, "not in the store", "rm", "GGUF"),
    _c("rm traversal", 3, "not in the store", "rm", "../../etc"),
    _c("rm with LOCALMIX_HOME a file", 2, "LOCALMIX_HOME", "rm", "x", env=HOME_FILE),
    _c("list extra", 2, "extra", "list", "all"),
    _c("list with LOCALMIX_HOME a file", 2, "LOCALMIX_HOME", "list", env=HOME_FILE),
    _c("list --available broken home", 2, "LOCALMIX_HOME", "list", "-a", env=HOME_FILE),
    _c("du extra", 2, "extra", "du", "x"),
    _c("du with LOCALMIX_HOME a file", 2, "LOCALMIX_HOME", "du", env=HOME_FILE),
    _c("paths extra", 2, "extra", "paths", "x"),
    _c("paths with LOCALMIX_HOME a file", 2, "LOCALMIX_HOME", "paths", env=HOME_FILE),
    _c("doctor extra", 2, "extra", "doctor", "x"),
    _c("doctor unknown option", 2, "--all", "doctor", "--all"),
    _c("no such command", 2, "frobnicate", "frobnicate"),
]

CHAT_CASES = [
    _c("chat no model", 2, "Missing argument", "chat"),
    _c("chat unknown model", 3, "mixtrl", "chat", "mixtrl", "hi"),
    _c("chat missing file", 3, "no such file", "chat", "WORK/x.gguf", "hi"),
    _c("chat a text file", 6, "not a GGUF", "chat", FILE, "hi"),
    _c("chat empty prompt", 2, "nothing to send", "chat", "GGUF", "", "-n", "1"),
    _c("chat -n 0", 2, "--max-tokens", "chat", "GGUF", "hi", "-n", "0"),
    _c("chat -n -1", 2, "--max-tokens", "chat", "GGUF", "hi", "-n", "-1"),
    _c("chat -n a word", 2, "--max-tokens", "chat", "GGUF", "hi", "-n", "many"),
    _c("chat -n 1e3", 2, "--max-tokens", "chat", "GGUF", "hi", "-n", "1e3"),
    _c("chat temperature -1", 2, "0 or more", "chat", "GGUF", "hi", "--temp", "-1"),
    _c("chat temperature word", 2, "--temp", "chat", "GGUF", "hi", "--temp", "hot"),
    _c("chat temperature 1e400", 2, "not a number", "chat", "GGUF", "hi", "--temp", "1e400"),
    _c("chat top-p -0.5", 2, "between 0 and 1", "chat", "GGUF", "hi", "--top-p", "-0.5"),
    _c("chat top-p 1.5", 2, "between 0 and 1", "chat", "GGUF", "hi", "--top-p", "1.5"),
    _c("chat top-p 0", 2, "top_p", "chat", "GGUF", "hi", "--top-p", "0", "-n", "1"),
    _c("chat top-k -1", 2, "--top-k", "chat", "GGUF", "hi", "--top-k", "-1"),
    _c("chat min-p nan", 2, "not a number", "chat", "GGUF", "hi", "--min-p", "nan"),
    _c("chat min-p -inf", 2, "not a number", "chat", "GGUF", "hi", "--min-p", "-inf"),
    _c("chat repeat-penalty 0", 2, "above 0", "chat", "GGUF", "hi", "--repeat-penalty", "0"),
    _c(
        "chat repeat-penalty nan",
        2,
        "not a number",
        "chat",
        "GGUF",
        "hi",
        "--repeat-penalty",
        "nan",
    ),
    _c("chat seed -5", 2, "--seed", "chat", "GGUF", "hi", "--seed", "-5"),
    _c("chat seed past uint32", 2, "--seed", "chat", "GGUF", "hi", "--seed", str(2**64)),
    _c("chat ctx -1", 2, "--ctx", "chat", "GGUF", "hi", "--ctx", "-1"),
    _c("chat ctx 255", 2, "256", "chat", "GGUF", "hi", "--ctx", "255"),
    _c("chat ctx past any model", 11, "tokens", "chat", "GGUF", "hi", "--ctx", str(10**12)),
    _c("chat threads 0", 2, "--threads", "chat", "GGUF", "hi", "-t", "0"),
    _c("chat threads word", 2, "--threads", "chat", "GGUF", "hi", "-t", "all"),
    _c("chat -ngl -2", 2, "--n-gpu-layers", "chat", "GGUF", "hi", "-ngl", "-2"),
    _c("chat unknown format", 2, "v9", "chat", "GGUF", "hi", "--format", "v9", "-n", "1"),
    _c("chat empty format", 2, "--format", "chat", "GGUF", "hi", "--format", ""),
    _c("chat unknown overflow", 2, "wrap", "chat", "GGUF", "hi", "--overflow", "wrap", "-n", "1"),
    _c("chat schema missing file", 2, "--schema", "chat", "GGUF", "hi", "--schema", "WORK/no.json"),
    _c("chat schema not JSON", 2, "not JSON", "chat", "GGUF", "hi", "--schema", FILE),
    _c("chat schema a folder", 2, "--schema", "chat", "GGUF", "hi", "--schema", "WORK"),
    _c("chat image missing", 2, "--image", "chat", "GGUF", "hi", "--image", "WORK/no.png"),
    _c("chat image not an image", 2, "not an image", "chat", "GGUF", "hi", "--image", FILE),
    _c("chat mmproj missing", 6, "no such file", "chat", "GGUF", "hi", "--mmproj", "WORK/n.gguf"),
    _c("chat mmproj not a GGUF", 6, "not a GGUF", "chat", "GGUF", "hi", "--mmproj", FILE),
    _c("chat mmproj a text model", 6, "not an mmproj", "chat", "GGUF", "hi", "--mmproj", "GGUF"),
    _c("chat vram budget word", 2, "lots", "chat", "GGUF", "--vram-budget", "lots", "--estimate"),
    _c(
        "chat vram budget negative", 2, "-5", "chat", "GGUF", "--vram-budget", "-5GiB", "--estimate"
    ),
    _c("chat vram budget nan", 2, "nan", "chat", "GGUF", "--vram-budget", "nan", "--estimate"),
    _c("chat --n-cpu-moe -1", 2, "--n-cpu-moe", "chat", "GGUF", "hi", "--n-cpu-moe", "-1"),
    _c(
        "chat --cpu-moe with --n-cpu-moe",
        2,
        "--cpu-moe",
        "chat",
        "GGUF",
        "hi",
        "-n",
        "1",
        "--cpu-moe",
        "--n-cpu-moe",
        "2",
    ),
    _c(
        "LOCALMIX_REPACK word",
        2,
        "LOCALMIX_REPACK",
        "chat",
        "GGUF",
        "hi",
        env={"LOCALMIX_REPACK": "sometimes"},
    ),
    _c("bench --repack 2", 2, "--repack", "bench", "GGUF", "--repack", "2"),
    _c("bench --repack word", 2, "--repack", "bench", "GGUF", "--repack", "yes"),
    _c(
        "LOCALMIX_THREADS word",
        2,
        "LOCALMIX_THREADS",
        "chat",
        "GGUF",
        "hi",
        env={"LOCALMIX_THREADS": "abc"},
    ),
    _c(
        "LOCALMIX_THREADS 0",
        2,
        "LOCALMIX_THREADS",
        "chat",
        "GGUF",
        "hi",
        env={"LOCALMIX_THREADS": "0"},
    ),
    _c(
        "LOCALMIX_THREADS -3",
        2,
        "LOCALMIX_THREADS",
        "chat",
        "GGUF",
        "hi",
        env={"LOCALMIX_THREADS": "-3"},
    ),
    _c(
        "LOCALMIX_THREADS 1e9",
        2,
        "LOCALMIX_THREADS",
        "chat",
        "GGUF",
        "hi",
        env={"LOCALMIX_THREADS": "1000000000"},
    ),
    _c("run unknown model", 3, "nothing", "run", "nothing", "hi"),
    _c("run -n 0", 2, "--max-tokens", "run", "GGUF", "hi", "-n", "0"),
    _c("chat with LOCALMIX_HOME a file", 2, "LOCALMIX_HOME", "chat", "x", "hi", env=HOME_FILE),
]

BENCH_CASES = [
    _c("bench no model", 2, "Missing argument", "bench"),
    _c("bench unknown model", 3, "nothing", "bench", "nothing"),
    _c("bench missing file", 3, "no such file", "bench", "WORK/x.gguf"),
    _c("bench a folder", 6, "directory", "bench", "WORK"),
    _c("bench -p word", 2, "not a number", "bench", "GGUF", "-p", "abc"),
    _c("bench -p negative", 2, "-p", "bench", "GGUF", "-p", "-5"),
    _c("bench -p backwards range", 2, "at least one value", "bench", "GGUF", "-p", "8-1"),
    _c("bench -p +0 range", 2, "never ends", "bench", "GGUF", "-p", "1-8+0"),
    _c("bench -p *1 range", 2, "never ends", "bench", "GGUF", "-p", "1-8*1"),
    _c("bench -p empty", 2, "not a number", "bench", "GGUF", "-p", ""),
    _c("bench -p commas", 2, "not a number", "bench", "GGUF", "-p", ",,,"),
    _c("bench -n nan", 2, "not a number", "bench", "GGUF", "-n", "nan"),
    _c("bench -pg one number", 2, "-pg", "bench", "GGUF", "-pg", "8"),
    _c("bench -pg words", 2, "-pg", "bench", "GGUF", "-pg", "a,b"),
    _c("bench -d negative", 2, "-d", "bench", "GGUF", "-d", "-1"),
    _c("bench -d past the context", 11, "tokens", "bench", "GGUF", "-d", "100000", "-r", "1"),
    _c("bench -r 0", 2, "--repetitions", "bench", "GGUF", "-r", "0"),
    _c("bench -r 1e11", 2, "repetitions", "bench", "GGUF", "-r", "100000000000"),
    _c("bench -t 0", 2, "at least 1", "bench", "GGUF", "-t", "0"),
    _c("bench -t 100000", 2, "100000", "bench", "GGUF", "-t", "100000"),
    _c("bench -t range past the machine", 2, "more than", "bench", "GGUF", "-t", "1-100000*2"),
    _c("bench -ngl word", 2, "not a number", "bench", "GGUF", "-ngl", "abc"),
    _c("bench -b 0", 2, "at least 1", "bench", "GGUF", "-b", "0"),
    _c("bench -ub 0", 2, "at least 1", "bench", "GGUF", "-ub", "0"),
    _c("bench -fa maybe", 2, "maybe", "bench", "GGUF", "-fa", "maybe"),
    _c("bench -ctk q9", 2, "q9", "bench", "GGUF", "-ctk", "q9"),
    _c("bench -ctv empty", 2, "at least one value", "bench", "GGUF", "-ctv", ""),
    _c("bench -o xml", 2, "xml", "bench", "GGUF", "-o", "xml"),
    _c("bench -o empty", 2, "-o", "bench", "GGUF", "-o", ""),
    _c("bench vram budget 12XB", 2, "12XB", "bench", "GGUF", "--vram-budget", "12XB", "--estimate"),
    _c(
        "bench LOCALMIX_THREADS huge",
        2,
        "LOCALMIX_THREADS",
        "bench",
        "GGUF",
        "-r",
        "1",
        env={"LOCALMIX_THREADS": "100000"},
    ),
    _c("bench with LOCALMIX_HOME a file", 2, "LOCALMIX_HOME", "bench", "x", env=HOME_FILE),
]


def _imatrix_text(content: bytes) -> Callable[[Path, Path], list[str]]:
    """imatrix of the tiny model over a text file holding `content`."""

    def make(work: Path, gguf: Path) -> list[str]:
        text = work / "text.txt"
        text.write_bytes(content)
        return ["imatrix", str(gguf), "-f", str(text), "-o", str(work / "i.gguf")]

    return make


IMATRIX_CASES = [
    _c("imatrix no model", 2, "Missing argument", "imatrix"),
    _c("imatrix empty model", 2, "no model given", "imatrix", ""),
    _c("imatrix unknown model", 3, "nothing", "imatrix", "nothing"),
    _c("imatrix a folder", 6, "directory", "imatrix", "WORK"),
    Case(
        "imatrix a text file named .gguf",
        lambda w, g: ["imatrix", str(_text_as_gguf(w))],
        6,
        "not a GGUF",
    ),
    _c("imatrix text missing", 2, "no such text file", "imatrix", "GGUF", "-f", "WORK/no.txt"),
    _c("imatrix text a folder", 2, "directory", "imatrix", "GGUF", "-f", "WORK"),
    Case("imatrix text empty", _imatrix_text(b" \n"), 2, "is empty"),
    Case("imatrix text binary", _imatrix_text(b"\x00\x01"), 2, "NUL"),
    Case("imatrix text not utf-8", _imatrix_text(b"caf\xe9 " * 100), 2, "not UTF-8"),
    Case("imatrix text under a chunk", _imatrix_text(b"Short."), 2, "less than one chunk"),
    _c("imatrix chunks 0", 2, "--chunks", "imatrix", "GGUF", "--chunks", "0"),
    _c("imatrix chunk size 8", 2, "--chunk-size", "imatrix", "GGUF", "-c", "8"),
    _c("imatrix chunk size word", 2, "--chunk-size", "imatrix", "GGUF", "-c", "many"),
    _c("imatrix threads 0", 2, "--threads", "imatrix", "GGUF", "-t", "0"),
    _c("imatrix output a folder", 12, "is a directory", "imatrix", "GGUF", "-o", "WORK"),
    _c("imatrix output empty", 2, "output file name", "imatrix", "GGUF", "-o", ""),
    _c("imatrix output in no folder", 12, "no such directory", "imatrix", "GGUF", "-o", "WORK/a/b"),
    _c("imatrix output is the model", 2, "replace the model", "imatrix", "GGUF", "-o", "GGUF"),
    _c("imatrix with LOCALMIX_HOME a file", 2, "LOCALMIX_HOME", "imatrix", "x", env=HOME_FILE),
    _c(
        "quantize empty imatrix",
        2,
        "--imatrix",
        "quantize",
        "GGUF",
        "-o",
        "WORK/q.gguf",
        "--imatrix",
        "",
    ),
]

BUILD_CASES = [
    _c("convert no path", 2, "Missing argument", "convert"),
    _c(
        "convert empty path",
        5,
        "neither config.json nor params.json",
        "convert",
        "",
        "-o",
        "WORK/o.gguf",
    ),
    _c("convert a file", 5, "not a directory", "convert", FILE, "-o", "WORK/o.gguf"),
    _c("convert empty outtype", 2, "outtype", "convert", "WORK", "--outtype", ""),
    _c("quantize no input", 2, "Missing argument", "quantize"),
    _c("quantize empty input", 2, "empty", "quantize", ""),
    _c("quantize a folder", 6, "directory", "quantize", "WORK"),
    _c("quantize unknown model", 3, "nothing", "quantize", "nothing"),
    _c("quantize output is the input", 2, "replace the input", "quantize", "GGUF", "-o", "GGUF"),
    _c("quantize output a folder", 12, "is a directory", "quantize", "GGUF", "-o", "WORK"),
    _c("quantize output empty", 2, "output file name", "quantize", "GGUF", "-o", ""),
    _c("quantize empty type", 2, "quantization type", "quantize", "GGUF", "-q", ""),
    _c("quantize lower-case unknown type", 2, "q4_z", "quantize", "GGUF", "-q", "q4_z"),
    _c("quantize threads 0", 2, "--threads", "quantize", "GGUF", "-t", "0"),
    _c("quantize threads word", 2, "--threads", "quantize", "GGUF", "-t", "abc"),
    _c(
        "quantize missing imatrix",
        2,
        "importance matrix",
        "quantize",
        "GGUF",
        "-o",
        "WORK/q.gguf",
        "--imatrix",
        "/nope.dat",
    ),
    _c(
        "quantize imatrix a folder",
        2,
        "importance matrix",
        "quantize",
        "GGUF",
        "-o",
        "WORK/q.gguf",
        "--imatrix",
        "WORK",
    ),
    _c(
        "quantize imatrix not one",
        2,
        "",
        "quantize",
        "GGUF",
        "-o",
        "WORK/q.gguf",
        "--imatrix",
        FILE,
    ),
    _c(
        "quantize LOCALMIX_THREADS word",
        2,
        "LOCALMIX_THREADS",
        "quantize",
        "GGUF",
        "-o",
        "WORK/q.gguf",
        env={"LOCALMIX_THREADS": "x"},
    ),
    _c("quantize with LOCALMIX_HOME a file", 2, "LOCALMIX_HOME", "quantize", "x", env=HOME_FILE),
    Case(
        "requantize a quantized file without the flag",
        lambda w, g: ["quantize", _requantized(w, g), "-q", "Q4_K_M", "-o", str(w / "q.gguf")],
        2,
        "--allow-requantize",
    ),
    *IMATRIX_CASES,
    _c("synth empty path", 2, "directory name", "synth", ""),
    _c("synth to a file", 12, "is a file", "synth", FILE),
    _c("synth under a file", 12, "Not a directory", "synth", FILE + "/sub/x"),
    _c("synth unknown arch", 2, "gpt2", "synth", "WORK/x", "--arch", "gpt2"),
    _c("synth unknown size", 2, "huge", "synth", "WORK/x", "--size", "huge"),
    _c("synth unknown tokenizer", 2, "v9", "synth", "WORK/x", "--tokenizer", "v9"),
    _c("synth unknown layout", 2, "gguf", "synth", "WORK/x", "--layout", "gguf"),
    _c("synth seed -1", 2, "--seed", "synth", "WORK/x", "--seed", "-1"),
    _c("synth seed word", 2, "--seed", "synth", "WORK/x", "--seed", "abc"),
    _c("synth seed past uint32", 2, "--seed", "synth", "WORK/x", "--seed", str(2**40)),
    _c("demo unknown model", 3, "nosuch", "demo", "-m", "nosuch"),
    _c("demo empty model", 3, "unknown model", "demo", "-m", ""),
    _c("demo of a downloadable model", 2, "not a built-in", "demo", "-m", "mistral"),
    _c("demo max-tokens 0", 2, "--max-tokens", "demo", "--max-tokens", "0"),
    _c("demo threads 100000", 2, "100000", "demo", "-t", "100000"),
    _c("demo LOCALMIX_THREADS word", 2, "LOCALMIX_THREADS", "demo", env={"LOCALMIX_THREADS": "x"}),
    _c("demo with LOCALMIX_HOME a file", 2, "LOCALMIX_HOME", "demo", env=HOME_FILE),
]


def _short_text(work: Path, gguf: Path) -> list[str]:
    (work / "short.txt").write_text("Too short to fill a chunk.", encoding="utf-8")
    model = _requantized(work, gguf)
    return ["eval", model, "--against", str(gguf), "--text", str(work / "short.txt")]


EVAL_CASES = [
    _c("eval no model", 2, "Missing argument", "eval"),
    _c("eval unknown model", 3, "nothing", "eval", "nothing"),
    _c("eval empty model", 3, "is not in the store", "eval", ""),
    _c("eval a file with no reference", 3, "--against", "eval", "GGUF"),
    _c("eval against itself", 2, "with itself", "eval", "GGUF", "--against", "GGUF"),
    _c(
        "eval against a missing file",
        3,
        "no such file",
        "eval",
        "GGUF",
        "--against",
        "WORK/no.gguf",
    ),
    _c("eval against a folder", 6, "directory", "eval", "GGUF", "--against", "WORK"),
    _c("eval ctx below 256", 2, "256", "eval", "GGUF", "--against", "GGUF", "--ctx", "100"),
    _c("eval ctx a word", 2, "--ctx", "eval", "GGUF", "--ctx", "big"),
    _c("eval chunks 0", 2, "--chunks", "eval", "GGUF", "--against", "GGUF", "--chunks", "0"),
    _c("eval missing text", 2, "no such text file", "eval", "GGUF", "--text", "WORK/none.txt"),
    _c("eval text a folder", 2, "directory", "eval", "GGUF", "--text", "WORK"),
    _c("eval text not text", 2, "not a text file", "eval", "GGUF", "--text", "GGUF"),
    Case("eval text shorter than a chunk", _short_text, 2, "less than one chunk"),
    _c("eval quants of a file", 2, "in the store", "eval", "GGUF", "--quants", "Q4_K_M"),
    _c("eval quants unknown type", 2, "Q9_X", "eval", "tiny", "--quants", "Q4_K_M,Q9_X"),
    _c("eval quants empty", 2, "names no quant", "eval", "tiny", "--quants", ","),
    _c("eval quants of an unknown model", 3, "nothing", "eval", "nothing", "--quants", "Q8_0"),
    _c("eval ngl -2", 2, "n-gpu-layers", "eval", "GGUF", "-ngl", "-2"),
    _c("eval threads 0", 2, "--threads", "eval", "GGUF", "-t", "0"),
    _c("eval with LOCALMIX_HOME a file", 2, "LOCALMIX_HOME", "eval", "x", env=HOME_FILE),
]


# serve fails before it listens (nothing here may start a server), ps before it asks
SERVE_CASES = [
    _c("serve unknown model", 3, "nosuch", "serve", "nosuch", "--port", "0"),
    _c("serve a folder", 6, "directory", "serve", "WORK", "--port", "0"),
    _c("serve port 70000", 2, "--port", "serve", "--port", "70000"),
    _c("serve port word", 2, "--port", "serve", "--port", "http"),
    _c("serve parallel 0", 2, "--parallel", "serve", "--parallel", "0"),
    _c("serve parallel 1000", 2, "--parallel", "serve", "--parallel", "1000"),
    _c("serve queue -1", 2, "--queue", "serve", "--queue", "-1"),
    _c("serve keep-alive word", 2, "soon", "serve", "--keep-alive", "soon"),
    _c("serve keep-alive unit", 2, "5y", "serve", "--keep-alive", "5y"),
    _c("serve memory word", 2, "not a size", "serve", "--memory", "lots"),
    _c("serve max-models 0", 2, "--max-models", "serve", "--max-models", "0"),
    _c("serve ctx 10", 2, "256", "serve", "GGUF", "--ctx", "10", "--port", "0"),
    _c("serve threads 100000", 2, "100000", "serve", "GGUF", "-t", "100000", "--port", "0"),
    _c("serve threads without a model", 2, "100000", "serve", "-t", "100000", "--port", "0"),
    _c("serve with LOCALMIX_HOME a file", 2, "LOCALMIX_HOME", "serve", "tiny", env=HOME_FILE),
    _c("ps no server", 1, "no server answers", "ps", "--url", "http://127.0.0.1:9"),
    _c("ps not http", 2, "not an http address", "ps", "--url", "ftp://127.0.0.1"),
    _c("ps extra argument", 2, "extra", "ps", "more"),
]

# Each fails before the worker loads llama.cpp's RPC backend (which would stay in this process).
WORKER_CASES = [
    _c("worker port 0", 2, "--port", "worker", "--port", "0"),
    _c("worker port 70000", 2, "--port", "worker", "--port", "70000"),
    _c("worker host IPv6", 2, "IPv4 only", "worker", "--host", "::1"),
    _c(
        "worker host not here", 2, "not an address of this machine", "worker", "--host", "192.0.2.1"
    ),
    _c("worker host word", 2, "cannot resolve", "worker", "--host", "no-such-host.invalid"),
    _c("worker unknown device", 2, "no device 'NOPE'", "worker", "--device", "NOPE"),
    _c("worker threads 100000", 2, "100000", "worker", "-t", "100000"),
    _c("chat rpc no port", 2, "not HOST:PORT", "chat", "GGUF", "hi", "--rpc", "worker"),
    _c("chat rpc IPv6", 2, "IPv4 only", "chat", "GGUF", "hi", "--rpc", "[::1]:50052"),
    _c("chat rpc empty", 2, "empty", "chat", "GGUF", "hi", "--rpc", " "),
    _c(
        "chat rpc with a plan", 2, "RPC workers", "chat", "GGUF", "hi", "--rpc", "h:1", "--estimate"
    ),
    _c("chat LOCALMIX_RPC no port", 2, "LOCALMIX_RPC: RPC endpoint 'worker' is not HOST:PORT",
       "chat", "GGUF", "hi", env={"LOCALMIX_RPC": "worker"}),
    _c("bench -rpc no port", 2, "not HOST:PORT", "bench", "GGUF", "-rpc", "worker"),
    _c("bench --rpc IPv6", 2, "IPv4 only", "bench", "GGUF", "--rpc", "[::1]:50052"),
    _c("bench rpc empty", 2, "empty", "bench", "GGUF", "-rpc", ""),
    _c("bench rpc port", 2, "from 1 to 65535", "bench", "GGUF", "-rpc", "h:0"),
    _c("bench rpc with a plan", 2, "RPC workers", "bench", "GGUF", "-rpc", "h:1", "--estimate"),
    _c("bench LOCALMIX_RPC IPv6", 2, "LOCALMIX_RPC: RPC endpoint", "bench", "GGUF",
       env={"LOCALMIX_RPC": "::1"}),
    _c("eval rpc no port", 2, "not HOST:PORT", "eval", "GGUF", "--rpc", "worker"),
    _c("eval rpc empty", 2, "empty", "eval", "GGUF", "--rpc", " "),
    _c("eval rpc 17 workers", 2, "at most 16", "eval", "GGUF", "--rpc",
       ",".join(f"h:{p}" for p in range(1, 18))),
    _c("serve rpc no port", 2, "not HOST:PORT", "serve", "--rpc", "worker"),
    _c("serve rpc empty", 2, "empty", "serve", "--rpc", " "),
    # probed at start: nothing listens on port 1 of this machine
    _c("serve rpc unreachable", 7, "nothing listens at 127.0.0.1:1", "serve", "--rpc",
       "127.0.0.1:1"),
    _c("doctor rpc no port", 2, "not HOST:PORT", "doctor", "--rpc", "worker"),
    _c("doctor rpc unreachable", 7, "1 of 1 RPC workers cannot be used", "doctor", "--rpc",
       "127.0.0.1:1"),
]  # fmt: skip


@pytest.mark.parametrize(
    "case",
    PULL_CASES
    + IMPORT_CASES
    + STORE_CASES
    + CHAT_CASES
    + BENCH_CASES
    + BUILD_CASES
    + EVAL_CASES
    + SERVE_CASES
    + WORKER_CASES,
    ids=lambda c: c.id,
)
def test_every_command(
    case: Case,
    tmp_path: Path,
    tiny_mistral_gguf_f16: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    # the HF cache too is this test's own: an offline pull must not see the user's
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for name in ("HF_ENDPOINT", "HF_HUB_OFFLINE", "LOCALMIX_THREADS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in case.env:
        monkeypatch.setenv(name, value.replace("WORK", str(work)))
    args = case.make(work, tiny_mistral_gguf_f16)
    before = _files(work)
    result = run_cli(capsys, *args)
    assert "sekrit" not in result.err + result.out
    if dict(case.env).get("LOCALMIX_HOME"):
        monkeypatch.setenv("LOCALMIX_HOME", str(tmp_path / "localmix-home"))
    _assert_clean_failure(result, case, work, before)


def test_undecodable_prompt_is_sent_not_crashed(
    tiny_mistral_gguf_f16: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bytes that are not UTF-8 reach argv as lone surrogates: they become U+FFFD, no crash."""
    result = run_cli(capsys, "chat", str(tiny_mistral_gguf_f16), "hi \udcff", "-n", "1")
    assert result.code == 0, result.err
    assert "Traceback" not in result.err and "internal error" not in result.err


def test_case_count() -> None:
    """The issue asks for at least 150 rows across every command."""
    rows = CONVERT_CASES + QUANTIZE_CASES + OTHER_CASES + BOUNDS_CASES + GGUF_CASES
    rows += PULL_CASES + IMPORT_CASES + STORE_CASES + CHAT_CASES + BENCH_CASES + BUILD_CASES
    rows += EVAL_CASES
    rows += SERVE_CASES + WORKER_CASES
    assert len(rows) >= 150
    assert len({c.id for c in rows}) == len(rows)
    from localmix.cli.app import COMMANDS

    # every command has rows of its own (rows name their command first, or the env they break)
    for name in COMMANDS:
        assert any(c.id.split()[0] == name for c in rows), name
