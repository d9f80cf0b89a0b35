"""The chat REPL: commands and keys through prompt-toolkit's pipe input on a real engine (the
scripted GGUF of tests/scripted_gguf.py), and end to end through a pseudo-terminal."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console

from localmix import settings
from localmix.chat.session import Session
from localmix.chat.template import Message
from localmix.cli.repl import Repl, SlashCompleter, in_block, message_text
from localmix.cli.reply import ReplyView
from localmix.errors import ModelNotFound
from localmix.llama.engine import Engine
from localmix.llama.records import Chunk, EngineConfig, Sampling
from localmix.models import store
from tests.scripted_gguf import write_scripted_gguf

REPLY = "Hello there, world."
# greedy: "]" (end of "[/INST]") -> ▁Hello ▁there , ▁world . -> </s>
SCRIPT = {28793: 22557, 22557: 736, 736: 28725, 28725: 1526, 1526: 28723, 28723: 2}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    path = write_scripted_gguf(tmp_path_factory.mktemp("scripted") / "scripted.gguf", SCRIPT)
    with Engine(EngineConfig(path, n_ctx=512, n_threads=1)) as loaded:
        yield loaded


@pytest.fixture
def session(engine: Engine) -> Session:
    return Session(engine, "v1", sampling=Sampling.greedy(), max_tokens=16, model="scripted")


def drive(session: Session, keys: str, *, history: object = None) -> tuple[Repl, str]:
    """Type `keys` into a REPL over `session` (\\r is Enter) until the input runs out."""
    out = io.StringIO()
    console = Console(file=out, width=100, color_system=None, highlight=False)
    with create_pipe_input() as pipe:
        pipe.send_text(keys)
        pipe.close()  # the REPL reads what was typed, then sees end of input (Ctrl-D)
        repl = Repl(
            session,
            console=console,
            input=pipe,
            output=DummyOutput(),
            history=history if history is not None else InMemoryHistory(),  # type: ignore[arg-type]
        )
        repl.run()
    return repl, out.getvalue()


def test_message_streams_the_reply_then_a_stats_line(session: Session) -> None:
    _, out = drive(session, "Hi\r")
    assert REPLY in out
    assert re.search(r"\d+ tok prompt .* t/s · 5 tok .* t/s · first token .* s", out)
    assert session.messages == [Message("user", "Hi"), Message("assistant", REPLY)]


@pytest.mark.parametrize(
    ("command", "field", "value"),
    [
        ("/set temperature 0.2", "temperature", 0.2),
        ("/set top_p 0.5", "top_p", 0.5),
        ("/set top_k 7", "top_k", 7),
        ("/set min_p 0.1", "min_p", 0.1),
        ("/set repeat_penalty 1.3", "repeat_penalty", 1.3),
        ("/set seed 42", "seed", 42),
        ("/set SEED none", "seed", None),
    ],
)
def test_set_changes_sampling(session: Session, command: str, field: str, value: object) -> None:
    session.set_option("seed", 1)
    drive(session, command + "\r")
    assert getattr(session.sampling, field) == value


def test_set_max_tokens_limits_the_reply(session: Session) -> None:
    _, out = drive(session, "/set max_tokens 2\rHi\r")
    assert session.max_tokens == 2
    assert session.messages[-1] == Message("assistant", "Hello there")
    assert "max tokens" in out


def test_set_without_arguments_lists_the_settings(session: Session) -> None:
    _, out = drive(session, "/set\r")
    for name in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed", "max_tokens"):
        assert name in out


@pytest.mark.parametrize(
    "keys",
    ["/set temperature hot\r", "/set top_p 0\r", "/set nope 1\r", "/set top_k\r", "/frobnicate\r"],
)
def test_bad_command_is_an_error_line_and_the_chat_goes_on(session: Session, keys: str) -> None:
    before = session.sampling
    _, out = drive(session, keys + "Hi\r")
    assert "error:" in out and "Traceback" not in out
    assert session.sampling == before
    assert REPLY in out  # the next message still works


def test_system_sets_shows_and_removes_the_system_prompt(session: Session) -> None:
    _, out = drive(session, "/system Be brief.\r/system\r")
    assert session.system == "Be brief."
    assert "system prompt: Be brief." in out
    drive(session, "/system none\r")
    assert session.system is None


def test_system_prompt_reaches_the_prompt_tokens(session: Session) -> None:
    drive(session, "/system Be brief.\rHi\r")
    prompt = session.prompt()
    assert session.engine.detokenize(prompt).count("Be brief.") == 1


def test_clear_forgets_the_conversation_but_keeps_the_system_prompt(session: Session) -> None:
    drive(session, "/system Be brief.\rHi\r/clear\r")
    assert session.messages == []
    assert session.system == "Be brief."


def test_save_and_load_round_trip(session: Session, tmp_path: Path) -> None:
    file = tmp_path / "chat.json"
    drive(session, f"/system Be brief.\r/set temperature 0.3\rHi\r/save {file}\r")
    saved = list(session.messages)
    assert json.loads(file.read_text())["messages"][1]["content"] == REPLY
    _, out = drive(session, f"/clear\r/system none\r/set temperature 1.5\r/load {file}\r")
    assert session.messages == saved
    assert session.system == "Be brief."
    assert session.sampling.temperature == 0.3
    assert "2 messages" in out


def test_save_without_a_name_goes_to_the_home_and_load_finds_it(session: Session) -> None:
    repl, _ = drive(session, "Hi\r/save\r/clear\r")
    saves = set((settings.home() / "chats").glob("*.json"))
    assert len(saves) == 2 and repl.autosave is None  # the turn's own file and the /save
    drive(session, "/load\r")
    assert session.messages == [Message("user", "Hi"), Message("assistant", REPLY)]


def test_load_without_a_file_reads_the_last_save_file(session: Session, tmp_path: Path) -> None:
    file = tmp_path / "mine.json"
    drive(session, "Hi\r/save\r")  # an older save in the home's chats/
    _, out = drive(session, f"/clear\rHi\r/retry\r/save {file}\r/clear\r/load\r")
    assert f"loaded {file}" in out
    assert session.messages == [Message("user", "Hi"), Message("assistant", REPLY)]


def _chat_files() -> list[Path]:
    return sorted((settings.home() / "chats").glob("*.json"))


def _saved_roles(path: Path) -> list[str]:
    return [m["role"] for m in json.loads(path.read_text())["messages"]]


def test_every_turn_is_saved_in_the_chats_folder(session: Session) -> None:
    repl, _ = drive(session, "Hi\r")
    [first] = _chat_files()
    assert repl.autosave == first and _saved_roles(first) == ["user", "assistant"]
    drive_on = Repl(session, console=repl.console, input=None, output=DummyOutput())
    drive_on.autosave = first
    drive_on.send("And then?")
    assert _saved_roles(first) == ["user", "assistant"] * 2  # the same file, a turn longer
    assert not list(first.parent.glob(".*.tmp"))  # written whole, then renamed
    _, _ = drive(session, "/undo\r")  # a new REPL: its own file, one exchange shorter
    assert len(_chat_files()) == 2
    repl, _ = drive(session, "/clear\rHi\r")
    assert repl.autosave not in (None, first) and len(_chat_files()) == 3


def test_load_without_a_file_brings_back_what_a_dead_repl_left(session: Session) -> None:
    drive(session, "/system Be brief.\rHi\r")  # then the process died: nothing typed /save
    left = [*session.messages]
    session.clear()
    session.set_system(None)
    repl, out = drive(session, "/load\r")
    assert session.messages == left and session.system == "Be brief."
    assert "loaded" in out and "2 messages" in out
    assert repl.autosave == _chat_files()[0]  # and goes on saving into it


def test_stats_after_clear_or_undo_shows_no_old_reply(session: Session) -> None:
    _, out = drive(session, "Hi\r/clear\r/stats\r")
    assert "no reply yet" in out and "reply 5 tokens" not in out
    _, out = drive(session, "Hi\r/undo\r/stats\r")
    assert "no reply yet" in out and "reply 5 tokens" not in out


def test_retry_generates_the_last_reply_again(session: Session) -> None:
    session.sampling = Sampling(temperature=1.0, seed=None)
    _, out = drive(session, "Hi\r/retry\r")
    assert [m.role for m in session.messages] == ["user", "assistant"]
    assert session.messages[0].content == "Hi"
    assert out.count("tok prompt") == 2  # two replies, each with its stats line
    assert session.last_stats is not None and session.last_stats.cached_tokens > 0


def test_retry_closed_before_the_reply_keeps_the_old_one(session: Session) -> None:
    drive(session, "Hi\r")
    stream = session.retry()
    stream.close()  # never started: nothing changes
    stream = session.retry()
    assert next(stream) is not None  # the first piece of the new reply
    stream.close()
    assert session.messages[0] == Message("user", "Hi") and len(session.messages) == 2


def test_undo_drops_the_last_exchange(session: Session) -> None:
    _, out = drive(session, "One\rTwo\r/undo\r")
    assert session.messages == [Message("user", "One"), Message("assistant", REPLY)]
    assert "dropped 2 messages ('Two' …)" in out
    drive(session, "/undo\r")
    assert session.messages == []


@pytest.mark.parametrize("command", ["/undo", "/retry"])
def test_undo_and_retry_with_nothing_said_are_errors(session: Session, command: str) -> None:
    _, out = drive(session, command + "\rHi\r")
    assert "error: there is no" in out or "error: there is nothing" in out
    assert REPLY in out  # the chat goes on


def test_an_interrupted_reply_shows_only_the_numbers_it_has(session: Session) -> None:
    from localmix.cli.render import stats_line

    stream = session.send("Hi")
    first = next(item for item in stream if isinstance(item, Chunk))
    stream.close()
    stats = session.last_stats
    assert first.text and stats is not None and stats.finish_reason == "interrupted"
    line = stats_line(stats)
    assert stats.generated_tokens == 1 and " 0.0 t/s" not in line and "1 tok ·" in line
    early = replace(stats, generated_tokens=0, ttft_s=0.0, gen_tps=0.0, prompt_s=0.15)
    line = stats_line(early)
    assert "first token 0" not in line and "before the first token" in line and "in 0.15 s" in line


def test_load_of_a_missing_file_is_an_error(session: Session, tmp_path: Path) -> None:
    _, out = drive(session, f"/load {tmp_path / 'nope.json'}\r")
    assert "error: cannot read" in out


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ('"""\rline one\r\rline two\r"""\r', "line one\n\nline two"),
        ('"""first\rsecond"""\r', "first\nsecond"),
        ("one\x1b\rtwo\r", "one\ntwo"),  # Alt-Enter
        ("\x1b[200~pasted\nlines\x1b[201~\r", "pasted\nlines"),  # bracketed paste
        ("//etc/hosts is a file\r", "/etc/hosts is a file"),
    ],
)
def test_multiline_input_sends_one_message(session: Session, keys: str, message: str) -> None:
    drive(session, keys)
    assert session.messages[0] == Message("user", message)
    assert len(session.messages) == 2


def test_ctrl_c_at_the_prompt_clears_the_line(session: Session) -> None:
    drive(session, "never sent\x03Hi\r")
    assert [m.content for m in session.messages] == ["Hi", REPLY]


@pytest.mark.parametrize("keys", ["\x04Hi\r", "/bye\rHi\r", "/exit\rHi\r"])
def test_ctrl_d_and_bye_end_the_repl(session: Session, keys: str) -> None:
    out = io.StringIO()
    with create_pipe_input() as pipe:
        pipe.send_text(keys)  # the pipe stays open: only Ctrl-D or /bye can end run()
        repl = Repl(session, console=Console(file=out), input=pipe, output=DummyOutput(),
                    history=InMemoryHistory())  # fmt: skip
        repl.run()
    assert session.messages == []


def test_history_is_kept_in_the_home(session: Session) -> None:
    drive(session, "Hi\r/stats\r", history=settings.home() / "history")
    text = (settings.home() / "history").read_text()
    assert "+Hi" in text and "+/stats" in text


def test_stats_and_help_and_model_describe_the_chat(session: Session) -> None:
    _, out = drive(session, "/stats\rHi\r/stats\r/help\r/?\r/model\r")
    assert "no reply yet" in out
    assert "reply 5 tokens" in out and "/ 512 tokens" in out
    assert out.count("/system [TEXT|none]") == 2
    assert "scripted" in out


def test_model_switch_carries_the_conversation_to_the_new_model(engine: Engine) -> None:
    path = Path(engine.config.model_path)
    loaded: list[Engine] = []

    def loader(name: str) -> Session:
        if name == "nope":
            raise ModelNotFound(f"model {name!r} is not in the store")
        loaded.append(Engine(EngineConfig(path, n_ctx=256, n_threads=1)))
        return Session(loaded[-1], "v1", sampling=Sampling(), model=name)

    old = loader("first")
    old.sampling, old.max_tokens = Sampling.greedy(), 16
    old.set_system("Be brief.")
    out = io.StringIO()
    with create_pipe_input() as pipe:
        pipe.send_text("Hi\r/model second\r/model nope\r")
        pipe.close()
        repl = Repl(old, console=Console(file=out, width=100), loader=loader, input=pipe,
                    output=DummyOutput(), history=InMemoryHistory())  # fmt: skip
        repl.run()
    try:
        assert "error: model 'nope' is not in the store" in out.getvalue()
        assert repl.session.model == "second"  # loaded again after the failed switch
        assert [e.n_ctx for e in loaded] == [256, 256, 256]
        assert repl.session.messages == [Message("user", "Hi"), Message("assistant", REPLY)]
        assert repl.session.system == "Be brief." and repl.session.sampling.is_greedy
        assert list(repl.session.send("Hi"))[-1].generated_tokens == 5  # type: ignore[union-attr]
    finally:
        for e in loaded:
            e.close()


def test_model_switch_without_a_loader_is_an_error(session: Session) -> None:
    _, out = drive(session, "/model other\r")
    assert "error: this chat cannot switch models" in out


@pytest.mark.parametrize(
    ("text", "completions"),
    [
        ("/s", ["/system", "/set", "/stats", "/save"]),
        ("/set te", ["temperature"]),
        ("/set m", ["min_p", "max_tokens"]),
        ("hello /s", []),
    ],
)
def test_slash_commands_complete(session: Session, text: str, completions: list[str]) -> None:
    repl = Repl(session, console=Console(file=io.StringIO()))
    found = SlashCompleter(repl).get_completions(Document(text), CompleteEvent())
    assert [c.text for c in found] == completions


def test_model_names_complete_from_the_store(session: Session, tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    store.add(_manifest("tiny-thing", gguf))
    repl = Repl(session, console=Console(file=io.StringIO()))
    found = SlashCompleter(repl).get_completions(Document("/model ti"), CompleteEvent())
    assert [c.text for c in found] == ["tiny-thing:F16"]


@pytest.mark.parametrize(
    ("text", "open_"),
    [
        ('"""', True),
        ('"""\nabc', True),
        ('"""\nabc\n"""', False),
        ("abc", False),
        ('""""""', False),
    ],
)
def test_triple_quotes_open_and_close_a_block(text: str, open_: bool) -> None:
    assert in_block(text) is open_
    if not open_ and text.startswith('"""'):
        assert '"""' not in message_text(text)


def test_reply_view_prints_markdown_blocks_as_they_finish() -> None:
    out = io.StringIO()
    console = Console(file=out, width=60, color_system=None)
    text = "# Title\n\nPara *one*.\n\n```python\nx = 1\n\ny = 2\n```\n\n- a\n- b\n\nEnd."
    with ReplyView(console) as view:
        for i, char in enumerate(text):
            view.feed(char)
            if text[: i + 1].endswith("Para"):
                assert view.blocks == 1  # the heading is printed once the next block begins
    rendered = out.getvalue()
    assert view.blocks == 5  # heading, paragraph, the code block with its blank line, list, end
    assert "```" not in rendered and "*one*" not in rendered
    for piece in ("Title", "Para one.", "x = 1", "y = 2", "• a", "End."):
        assert piece in rendered
    assert view.text == text


def test_reply_view_drops_terminal_control_characters() -> None:
    out = io.StringIO()
    for markdown in (True, False):
        with ReplyView(Console(file=out, color_system=None), markdown=markdown) as view:
            view.feed("red\x1b[31m text\x07")
    assert "\x1b" not in out.getvalue() and "\x07" not in out.getvalue()
    assert "red[31m text" in out.getvalue()


def _manifest(name: str, path: Path, chat_format: str | None = "v1") -> store.Manifest:
    return store.Manifest(
        name=name, quant="F16", path=str(path), size=path.stat().st_size, sha256="0" * 64,
        architecture="llama", chat_format=chat_format, context_length=2048, parameters=0,
        source=f"path:{path}", created=time.time(), owned=False,
    )  # fmt: skip


# -- end to end, through a pseudo-terminal --------------------------------------------------------


def _spawn(*args: str) -> object:
    pexpect = pytest.importorskip("pexpect")
    env = dict(os.environ, PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm-256color", COLUMNS="100")
    child = pexpect.spawn(
        sys.executable, ["-m", "localmix", "chat", *args], env=env, encoding="utf-8",
        dimensions=(30, 100), timeout=60,
    )  # fmt: skip
    child.expect(">>> ")
    return child


@pytest.fixture(scope="module")
def looping_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Greedy decoding says "Hello there, world." over and over and never ends by itself."""
    loop = {**SCRIPT, 28723: 22557}  # "." -> "▁Hello" instead of end of sequence
    return write_scripted_gguf(tmp_path_factory.mktemp("looping") / "looping.gguf", loop)


@pytest.fixture
def looping(looping_gguf: Path) -> str:
    store.add(_manifest("looping", looping_gguf))
    return "looping"


@pytest.mark.slow
def test_repl_end_to_end_in_a_terminal(looping: str, tmp_path: Path) -> None:
    import pexpect

    args = ("-c", "131072", "-n", "100000", "--temperature", "0", "-t", "1")
    child: pexpect.spawn = _spawn(looping, *args)  # type: ignore[assignment]
    child.sendline("Hi")
    child.expect("Hello there, world. Hello there, world.")  # streaming, long before the end
    child.sendintr()  # Ctrl-C mid-reply
    child.expect(r"tok prompt .* · interrupted")
    child.expect(">>> ")  # the session goes on
    child.sendline("/set max_tokens 8")
    child.expect("max_tokens = 8")
    child.expect(">>> ")
    child.sendline("Again")
    child.expect(r"8 tok [\d.]+ t/s")  # the stats line of a whole reply
    child.expect(">>> ")
    file = tmp_path / "chat.json"
    child.sendline(f"/save {file}")
    child.expect("saved")
    child.expect(">>> ")
    child.sendline("/clear")
    child.expect("conversation cleared")
    child.expect(">>> ")
    child.sendline(f"/load {file}")
    # a long path may wrap the line before "messages", styles reset around the break
    found = child.expect([r"4(\x1b\[[0-9;]*m|\s)+messages", pexpect.TIMEOUT])
    assert found == 0, f"/load said: {child.before[-600:]!r}"
    child.expect(">>> ")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    messages = json.loads(file.read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "Hi"
    assert messages[1]["content"].startswith("Hello there, world. Hello")  # the partial reply
    assert messages[3]["content"] == "Hello there, world. Hello there,"  # 8 tokens


@pytest.mark.slow
def test_a_repl_killed_between_turns_is_resumed(looping: str) -> None:
    """SIGKILL after a turn (no /save, no exit): `chat MODEL --resume` has the conversation,
    as a REPL and as a one-shot that adds its turn to the same file."""
    import pexpect

    args = ("-n", "8", "--temperature", "0", "-t", "1")
    child: pexpect.spawn = _spawn(looping, *args)  # type: ignore[assignment]
    child.sendline("Remember the word teal")
    child.expect(r"8 tok [\d.]+ t/s")
    child.expect(">>> ")
    child.kill(signal.SIGKILL)
    child.close()
    assert child.signalstatus == signal.SIGKILL
    [saved] = (settings.home() / "chats").glob("*.json")
    child = _spawn(looping, *args, "--resume")  # type: ignore[assignment]
    shown = child.before
    assert "resumed" in shown and "2 messages" in shown  # said before the first prompt
    child.sendline("Which word?")
    child.expect(r"8 tok [\d.]+ t/s")
    child.expect(">>> ")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    assert len(json.loads(saved.read_text())["messages"]) == 4  # the same file goes on
    done = subprocess.run(
        [sys.executable, "-m", "localmix", "chat", looping, "And the word?", *args, "--resume"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [m["content"] for m in json.loads(saved.read_text())["messages"]][::2] == [
        "Remember the word teal", "Which word?", "And the word?",
    ]  # fmt: skip


def test_resume_with_nothing_saved_starts_the_chat_the_next_resume_continues(looping: str) -> None:
    def one_shot(text: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "localmix", "chat", looping, text, "-n", "4", "--resume"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    first = one_shot("Hi")
    assert first.returncode == 0 and "no saved chat with looping" in first.stderr
    assert one_shot("Again").returncode == 0
    [saved] = (settings.home() / "chats").glob("*.json")
    assert [m["content"] for m in json.loads(saved.read_text())["messages"]][::2] == ["Hi", "Again"]


@pytest.mark.slow
def test_repl_ctrl_c_clears_the_line_and_ctrl_d_exits(looping: str) -> None:
    import pexpect

    child: pexpect.spawn = _spawn(looping, "-t", "1")  # type: ignore[assignment]
    child.send("half a thought")
    child.sendintr()
    child.expect(">>> ")
    child.sendline("/stats")
    child.expect("no reply yet")
    child.expect(">>> ")  # keys typed before the prompt is back meet the tty's line discipline
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    history = (settings.home() / "history").read_text()
    assert "+/stats" in history and "half a thought" not in history


@pytest.mark.slow
def test_keys_typed_during_a_reply_are_not_echoed_and_never_run(looping: str) -> None:
    import pexpect

    # a reply that ends by itself (Ctrl-C would make the tty flush the keys on its own)
    args = ("-c", "16384", "-n", "5000", "--temperature", "0", "-t", "1")
    child: pexpect.spawn = _spawn(looping, *args)  # type: ignore[assignment]
    transcript = child.logfile_read = io.StringIO()
    child.sendline("Hi")
    child.expect("Hello there, world. Hello there, world.")
    child.send("typed meanwhile\r/undo\r")  # echoed and run at the next prompt, if not held
    child.expect(r"5000 tok [\d.]+ t/s .* max tokens reached")
    child.expect(">>> ")
    child.sendline("/stats")
    child.expect(r"context \d+ / 16384 tokens · 2 messages")  # no /undo ran, nothing was sent
    child.expect(">>> ")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "typed meanwhile" not in transcript.getvalue()  # never echoed
    history = (settings.home() / "history").read_text()
    assert "typed meanwhile" not in history and "+/undo" not in history


@pytest.mark.slow
def test_ctrl_c_right_after_enter_stops_the_reply(looping: str) -> None:
    import pexpect

    # Pressed at once, ^C reaches the prompt's raw-mode input as a byte, not as a signal; a moment
    # later it lands while the prompt is processed. Either way the reply stops and says so.
    args = ("-c", "131072", "-n", "100000", "--temperature", "0", "-t", "1")
    child: pexpect.spawn = _spawn(looping, *args)  # type: ignore[assignment]
    for delay in (0.0, 0.0, 0.02, 0.05, 0.15):
        child.sendline("Hi")
        time.sleep(delay)
        child.sendintr()
        child.expect("interrupted", timeout=15)
        child.expect(">>> ")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
