"""Reasoning models: a reply's [THINK]…[/THINK] part streams apart from the answer, stays in the
history as mistral-common encodes it, is shown dim (or counted) in the REPL and marked in --json;
thinking turns on and off by the reasoning prompt (v13) or reasoning_effort (v15).

The model is tests/scripted_gguf.py's, with a tekken v13 / v15 vocabulary: after [/INST] it
greedily says [THINK]Two plus two makes four[/THINK]Four.</s> on real llama.cpp, and every prompt
is checked against mistral-common's encode_chat_completion on the same tokenizer file.
"""

from __future__ import annotations

import io
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console

from localmix.chat import reasoning, template
from localmix.chat.reasoning import REASONING_PROMPT, Thought
from localmix.chat.session import Session
from localmix.chat.template import Message, Think
from localmix.cli.repl import Repl
from localmix.errors import UsageError
from localmix.llama.engine import Engine
from localmix.llama.records import Chunk, EngineConfig, Sampling, Stats
from localmix.models import store
from tests.cli_run import run_cli
from tests.scripted_gguf import write_scripted_gguf
from tests.tekken_files import tekken_file
from tests.test_chat_template import reference_request

THOUGHT, ANSWER = "Two plus two", "It is four."
# [/INST] -> [THINK] Two ␣plus ␣two [/THINK] It ␣is ␣four . </s>  (tekken ids)
SCRIPT = {
    4: 34, 34: 16489, 16489: 2984, 2984: 2295, 2295: 35, 35: 2757, 2757: 1395, 1395: 3946,
    3946: 1046, 1046: 2,
}  # fmt: skip
GENERATED = 9  # tokens the reply puts in the KV cache (</s> ends it without being decoded)
THOUGHT_TOKENS = 3
VOCAB = 20000  # the tekken vocabulary cut to its first 19000 pieces: every id above is in it


@pytest.fixture(scope="module", params=["v13", "v15"])
def scripted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp(f"think-{request.param}")
    tok = tekken_file(request.param, folder, vocab_size=VOCAB)
    path = write_scripted_gguf(folder / "think.gguf", SCRIPT, tekken=tok)
    return {"version": request.param, "tokenizer": tok, "path": path}


@pytest.fixture(scope="module")
def engine(scripted: dict) -> Iterator[Engine]:
    with Engine(EngineConfig(scripted["path"], n_ctx=512, n_threads=1)) as loaded:
        yield loaded


@pytest.fixture
def session(engine: Engine) -> Session:
    return Session(engine, sampling=Sampling.greedy(), max_tokens=32, model="think")


def reference(scripted: dict, session: Session, messages: list[Message] | None = None) -> list:
    """mistral-common's tokens for the session's conversation (thinking switch included)."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    msgs = session.conversation(messages)
    effort = None
    if session.think_mode == "effort":
        effort = "high" if session.thinking else "none"
    tokenizer = MistralTokenizer.from_file(str(scripted["tokenizer"]))
    return tokenizer.encode_chat_completion(reference_request(msgs, effort)).tokens


def test_the_format_and_switch_come_from_the_vocabulary(scripted: dict, session: Session) -> None:
    assert session.format.name == scripted["version"]  # no chat template: the control tokens
    assert session.think_mode == {"v13": "prompt", "v15": "effort"}[scripted["version"]]
    assert session.thinking is False


def test_thinking_streams_apart_and_stays_in_the_history(scripted: dict, session: Session) -> None:
    events = list(session.send("2+2?"))
    thoughts = [e for e in events if isinstance(e, Thought)]
    answer = [e for e in events if isinstance(e, Chunk)]
    assert "".join(t.text for t in thoughts) == THOUGHT
    assert "".join(c.text for c in answer) == ANSWER
    assert isinstance(events[-1], Stats) and events[-1].generated_tokens == GENERATED
    assert session.last_thought_tokens == THOUGHT_TOKENS
    assert session.messages[-1] == Message("assistant", (Think(THOUGHT), ANSWER))
    # mistral-common encodes the thinking again on the next turn; the prompt only grows
    kv = len(session.engine.kv_tokens)
    nxt = [*session.messages, Message("user", "And 3+3?")]
    assert session.prompt(nxt) == reference(scripted, session, nxt)
    stats = list(session.send("And 3+3?"))[-1]
    assert isinstance(stats, Stats) and stats.cached_tokens == kv


@pytest.mark.parametrize("on", [True, False])
def test_the_thinking_switch_is_encoded_as_mistral_common_does(
    scripted: dict, session: Session, on: bool
) -> None:
    session.set_thinking(on)
    session.set_system("Be brief.")
    msgs = [Message("user", "2+2?")]
    prompt = session.prompt(msgs)
    assert prompt == reference(scripted, session, msgs)
    text = session.engine.detokenize(prompt)
    if scripted["version"] == "v13":  # the reasoning prompt, its template a thinking chunk
        assert (session.conversation(msgs)[0].content == REASONING_PROMPT) is on
        assert ("HOW YOU SHOULD THINK" in text) is on
    else:
        assert f'"reasoning_effort": "{"high" if on else "none"}"' in text


def test_a_reply_interrupted_while_thinking_keeps_an_open_thought(
    scripted: dict, session: Session
) -> None:
    stream = session.send("2+2?")
    seen = []
    for item in stream:
        if isinstance(item, Thought):
            seen.append(item.text)
            if len(seen) == 2:
                break
    stream.close()
    assert session.messages[-1] == Message("assistant", (Think("Two plus", closed=False),))
    nxt = [*session.messages, Message("user", "go on")]
    assert session.prompt(nxt) == reference(scripted, session, nxt)  # [THINK]Two plus</s>


def test_max_tokens_inside_the_thinking_leaves_it_open(session: Session) -> None:
    session.max_tokens = 3
    stats = list(session.send("2+2?"))[-1]
    assert isinstance(stats, Stats) and stats.finish_reason == "length"
    assert session.messages[-1] == Message("assistant", (Think("Two plus", closed=False),))


def test_saved_chats_keep_the_thinking(session: Session, engine: Engine, tmp_path: Path) -> None:
    list(session.send("2+2?"))
    saved = json.loads(session.save(tmp_path / "chat.json").read_text(encoding="utf-8"))
    assert saved["messages"][-1]["content"] == [{"thinking": THOUGHT, "closed": True}, ANSWER]
    other = Session(engine, sampling=Sampling.greedy())
    other.load(tmp_path / "chat.json")
    assert other.messages == session.messages and other.prompt() == session.prompt()


def test_models_without_a_switch_refuse_thinking(tmp_path: Path) -> None:
    from tests.test_repl import SCRIPT as V1_SCRIPT

    path = write_scripted_gguf(tmp_path / "v1.gguf", V1_SCRIPT)
    with Engine(EngineConfig(path, n_ctx=256, n_threads=1)) as engine:
        session = Session(engine, "v1")
        assert session.think_mode is None
        with pytest.raises(UsageError, match="no thinking switch"):
            session.set_thinking(True)
        with pytest.raises(UsageError, match="no thinking"):
            template.encode("v7", [Message("assistant", (Think("x"), "y"))], engine.tokenize)


def test_catalog_reasoning_models_think_by_default() -> None:
    assert reasoning.thinks_by_default("magistral", "prompt") is True
    assert reasoning.thinks_by_default("ministral-3:8b-reasoning", "prompt") is True
    assert reasoning.thinks_by_default("ministral-3:8b", "prompt") is False
    assert reasoning.thinks_by_default("mistral-small:4", "effort") is False  # effort none
    assert reasoning.thinks_by_default("/some/file.gguf", "prompt") is False


# --- the REPL and the CLI ------------------------------------------------------------------------


def drive(session: Session, keys: str) -> str:
    out = io.StringIO()
    console = Console(file=out, width=100, color_system=None, highlight=False)
    with create_pipe_input() as pipe:
        pipe.send_text(keys)
        pipe.close()
        repl = Repl(
            session, console=console, input=pipe, output=DummyOutput(), history=InMemoryHistory()
        )
        repl.banner()
        repl.run()
    return out.getvalue()


def test_repl_shows_the_thinking_then_a_summary_then_the_answer(session: Session) -> None:
    out = drive(session, "2+2?\r")
    assert "thinking off (/think)" in out  # the banner
    summary = f"╰ thought for {THOUGHT_TOKENS} tokens"
    assert out.index(THOUGHT) < out.index(summary) < out.index(ANSWER)


def test_repl_hides_the_thinking_and_unfolds_it_on_request(session: Session) -> None:
    out = drive(session, "/thoughts hide\r2+2?\r/thoughts\r")
    hidden, shown = out.split("/thoughts shows it", 1)
    assert THOUGHT not in hidden and ANSWER in shown
    assert THOUGHT in shown  # /thoughts prints the last reply's thinking


def test_repl_think_switches_thinking(session: Session) -> None:
    out = drive(session, "/think on\r/think\r/think off\r/think maybe\r")
    assert out.count("thinking on (") == 2 and "thinking off (" in out
    assert "error: /think takes on or off" in out
    assert session.thinking is False


@pytest.fixture
def stored(scripted: dict, monkeypatch: pytest.MonkeyPatch) -> str:
    path = scripted["path"]
    manifest = store.Manifest(
        name="think", quant="F32", path=str(path), size=path.stat().st_size, sha256="0" * 64,
        architecture="llama", chat_format=None, context_length=512, parameters=0,
        source=f"path:{path}", created=time.time(), owned=False,
    )  # fmt: skip
    store.add(manifest)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    return "think"


def test_chat_json_marks_the_thinking(stored: str, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "chat", stored, "2+2?", "--json", "--temperature", "0", "--think")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert (data["reply"], data["thinking"]) == (ANSWER, THOUGHT)
    assert data["thinking_tokens"] == THOUGHT_TOKENS


def test_chat_prints_only_the_answer(stored: str, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "chat", stored, "2+2?", "--temperature", "0", "--no-think")
    assert result.code == 0, result.err
    assert result.out == ANSWER + "\n"


def test_chat_think_on_a_model_without_a_switch_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.test_repl import SCRIPT as V1_SCRIPT

    path = write_scripted_gguf(tmp_path / "v1.gguf", V1_SCRIPT)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    result = run_cli(capsys, "chat", str(path), "Hi", "--think", "--temperature", "0")
    assert result.code != 0 and "no thinking switch" in result.err
