"""`localmix chat` without a terminal: a prompt argument or piped input prints just the reply."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from localmix.errors import ContextTooLong, ModelNotFound, UsageError
from localmix.models import store
from tests.cli_run import run_cli
from tests.scripted_gguf import write_scripted_gguf

REPLY = "Hello there, world."
# greedy: "]" (end of "[/INST]") -> ▁Hello ▁there , ▁world . -> </s>
SCRIPT = {28793: 22557, 22557: 736, 736: 28725, 28725: 1526, 1526: 28723, 28723: 2}
GREEDY = ("--temperature", "0", "-t", "1")


@pytest.fixture(scope="module")
def scripted_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_scripted_gguf(tmp_path_factory.mktemp("scripted") / "scripted.gguf", SCRIPT)


@pytest.fixture
def scripted(scripted_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The scripted model in this test's store, and an empty standard input."""
    size = scripted_path.stat().st_size
    manifest = store.Manifest(
        name="scripted", quant="F32", path=str(scripted_path), size=size, sha256="0" * 64,
        architecture="llama", chat_format="v1", context_length=512, parameters=0,
        source=f"path:{scripted_path}", created=time.time(), owned=False,
    )  # fmt: skip
    store.add(manifest)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    return "scripted"


def test_prompt_argument_prints_just_the_reply(
    scripted: str, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_cli(capsys, "chat", scripted, "Hi", *GREEDY)
    assert result.code == 0, result.err
    assert result.out == REPLY + "\n"
    assert "\x1b" not in result.out


def test_piped_stdin_prints_just_the_reply(scripted: str) -> None:
    # a real pipe and a real process: llama.cpp's own logging must stay off stdout too
    result = subprocess.run(
        [sys.executable, "-m", "localmix", "chat", scripted, *GREEDY],
        input="Hi\n", capture_output=True, text=True, env=dict(os.environ), timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == REPLY + "\n"
    assert "Traceback" not in result.stderr


def test_piped_stdin_follows_the_prompt_argument(
    scripted: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    alone = json.loads(run_cli(capsys, "chat", scripted, "Summarize:", "--json", *GREEDY).out)
    monkeypatch.setattr(sys, "stdin", io.StringIO("a file of several words\n"))
    both = json.loads(run_cli(capsys, "chat", scripted, "Summarize:", "--json", *GREEDY).out)
    assert both["stats"]["prompt_tokens"] >= alone["stats"]["prompt_tokens"] + 5
    assert both["reply"] == REPLY


def test_json_has_the_reply_and_its_stats(
    scripted: str, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_cli(capsys, "chat", scripted, "Hi", "--json", *GREEDY)
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data["reply"] == REPLY
    assert data["model"] == "scripted:F32"
    stats = data["stats"]
    assert stats["generated_tokens"] == 5 and stats["finish_reason"] == "stop"
    assert stats["prompt_tokens"] > 0 and stats["cached_tokens"] == 0
    for key in ("ttft_s", "prompt_tps", "gen_tps"):
        assert isinstance(stats[key], float)


def test_stats_option_prints_the_stats_line_on_stderr(
    scripted: str, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_cli(capsys, "chat", scripted, "Hi", "--stats", *GREEDY)
    assert result.out == REPLY + "\n"
    assert "5 tok" in result.err and "first token" in result.err


def test_max_tokens_cuts_the_reply(scripted: str, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "chat", scripted, "Hi", "-n", "2", *GREEDY)
    assert result.out == "Hello there\n"


def test_prompt_longer_than_the_context_is_a_one_line_error(
    scripted: str, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_cli(capsys, "chat", scripted, "word " * 600, "-c", "256", *GREEDY)
    assert result.code == ContextTooLong.exit_code
    assert result.out == ""
    lines = result.err.strip().splitlines()
    assert lines[0].startswith("error: the prompt is ") and "context holds 256" in lines[0]
    assert lines[1].startswith("hint: ") and len(lines) == 2
    assert "Traceback" not in result.err


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("nowhere", "Hi"), ModelNotFound.exit_code, "error: model 'nowhere' is not in the store"),
        (("missing.gguf", "Hi"), ModelNotFound.exit_code, "no such file"),
        (("scripted", "Hi", "--top-p", "0"), UsageError.exit_code, "top_p must be in (0, 1]"),
        (("scripted", "Hi", "--overflow", "wrap"), UsageError.exit_code, "overflow mode"),
        (("scripted", "Hi", "--format", "v9"), UsageError.exit_code, "error:"),
        (("scripted", "   "), UsageError.exit_code, "nothing to send"),
    ],
)
def test_bad_input_is_a_clear_error(
    scripted: str, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], code: int,
    message: str,
) -> None:  # fmt: skip
    result = run_cli(capsys, "chat", *args, "-t", "1")
    assert result.code == code
    assert message in result.err
    assert "Traceback" not in result.err


def test_gguf_path_detects_its_chat_format(
    tiny_mistral_gguf_f16: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    result = run_cli(
        capsys, "chat", str(tiny_mistral_gguf_f16), "Hi", "-n", "4", "--json", "-t", "1"
    )
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data["stats"]["generated_tokens"] <= 4 and data["model"] == tiny_mistral_gguf_f16.name


def test_format_option_names_the_chat_format(
    scripted_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    result = run_cli(capsys, "chat", str(scripted_path), "Hi", "--format", "v1", *GREEDY)
    assert result.out == REPLY + "\n"


def test_a_v1_vocabulary_without_template_or_mistral_name_chats(
    scripted_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scripted GGUF holds Mistral's v1 vocabulary, no chat template, and the name "scripted"."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    result = run_cli(capsys, "chat", str(scripted_path), "Hi", *GREEDY)
    assert result.code == 0, result.err
    assert result.out == REPLY + "\n"
    assert run_cli(capsys, "import", str(scripted_path), "--json").code == 0
    assert store.get("scripted").chat_format == "v1"  # detected at import, from its tokens


def test_import_format_is_remembered_for_every_chat(
    scripted_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    result = run_cli(capsys, "import", str(scripted_path), "--name", "mine", "--format", "v7")
    assert result.code == 0, result.err
    assert store.get("mine").chat_format == "v7"
    # v7 needs control tokens this v1 vocabulary lacks: the chat uses the remembered format
    result = run_cli(capsys, "chat", "mine", "Hi", *GREEDY)
    assert result.code != 0 and "no control token [INST]" in result.err
    # importing the same file again with another --format changes what is remembered
    assert (
        run_cli(capsys, "import", str(scripted_path), "--name", "mine", "--format", "v1").code == 0
    )
    assert store.get("mine").chat_format == "v1"
    assert run_cli(capsys, "chat", "mine", "Hi", *GREEDY).out == REPLY + "\n"
    bad = run_cli(capsys, "import", str(scripted_path), "--name", "other", "--format", "v9")
    assert bad.code != 0 and "v9" in bad.err and "v7" in bad.err
    assert [m.name for m in store.list_models()] == ["mine"]


SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 10},
                   "legs": {"type": "integer", "minimum": 0, "maximum": 8},
                   "kind": {"enum": ["cat", "dog"]}},
    "required": ["name", "legs", "kind"],
    "additionalProperties": False,
}  # fmt: skip


@pytest.mark.parametrize("seed", ["1", "2", "3"])
def test_schema_makes_the_reply_json_that_validates(
    tiny_mistral_gguf_f16: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    seed: str,
) -> None:
    import jsonschema

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    schema = tmp_path / "animal.json"
    schema.write_text(json.dumps(SCHEMA))
    result = run_cli(capsys, "chat", str(tiny_mistral_gguf_f16), "Describe a cat.",
                     "--schema", str(schema), "--seed", seed, "-n", "120", "-t", "1")  # fmt: skip
    assert result.code == 0, result.err
    jsonschema.validate(json.loads(result.out), SCHEMA)  # random weights, valid anyway


def test_bad_schema_files_are_one_line_errors(
    scripted: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    not_json = tmp_path / "bad.json"
    not_json.write_text("{nope")
    bad_schema = tmp_path / "schema.json"
    bad_schema.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "nope"}}}))
    for path, needle in ((tmp_path / "missing.json", "cannot read"), (not_json, "not JSON"),
                         (bad_schema, "nope")):  # fmt: skip
        result = run_cli(capsys, "chat", scripted, "Hi", "--schema", str(path), *GREEDY)
        assert result.code != 0 and needle in result.err, result.err
        assert "Traceback" not in result.err
