"""The chat REPL: prompt-toolkit input (history, multiline, completion), streamed replies and
slash commands, over one chat.Session. Input and output are injectable for tests (a pipe input,
a DummyOutput, a rich Console on a buffer). Imported only when a chat starts, so prompt-toolkit
and rich load here, not at `localmix --help`."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prompt_toolkit import PromptSession
from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
from prompt_toolkit.completion import CompleteEvent, Completer, Completion, PathCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.enums import DEFAULT_BUFFER
from prompt_toolkit.filters import has_focus
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.history import FileHistory, History
from prompt_toolkit.key_binding import KeyBindings
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from localmix import settings
from localmix.chat.reasoning import Thought
from localmix.chat.session import Notice
from localmix.cli.reply import ReplyView, ThoughtView
from localmix.errors import LocalmixError, UsageError
from localmix.llama.records import Chunk, Stats

if TYPE_CHECKING:
    from prompt_toolkit.input import Input
    from prompt_toolkit.output import Output
    from rich.console import Console

    from localmix.chat.images import Image
    from localmix.chat.session import Session

# Loads a model by name (store reference or .gguf path) into a fresh Session: /model.
Loader = Callable[[str], "Session"]

BLOCK = '"""'
PROMPT = ">>> "
CONTINUATION = "... "


@dataclass(frozen=True)
class Command:
    name: str
    usage: str
    help: str
    run: Callable[[Repl, str], bool]  # False: leave the REPL


COMMANDS: dict[str, Command] = {}
ALIASES = {"/?": "/help", "/exit": "/bye", "/quit": "/bye"}


def _command(name: str, usage: str, help: str) -> Callable[[Any], Any]:
    def register(run: Callable[[Repl, str], bool | None]) -> Callable[[Repl, str], bool | None]:
        COMMANDS[name] = Command(name, usage, help, lambda repl, arg: run(repl, arg) is not False)
        return run

    return register


def in_block(text: str) -> bool:
    """True while a `\"\"\"` block is open: Enter then adds a line instead of sending."""
    body = text.lstrip()
    if not body.startswith(BLOCK):
        return False
    return not body[len(BLOCK) :].rstrip().endswith(BLOCK)


def message_text(text: str) -> str:
    """The message a prompt entry sends: a `\"\"\"` block without its quotes."""
    body = text.strip()
    if body.startswith(BLOCK):
        body = body[len(BLOCK) :]
        if body.rstrip().endswith(BLOCK):
            body = body.rstrip()[: -len(BLOCK)]
    return body.strip("\n").rstrip()


class Repl:
    """An interactive chat over a Session; run() until /bye or Ctrl-D."""

    def __init__(
        self,
        session: Session,
        *,
        console: Console,
        loader: Loader | None = None,
        input: Input | None = None,
        output: Output | None = None,
        history: History | Path | None = None,
        markdown: bool = True,
        show_thoughts: bool = True,
    ) -> None:
        self.session = session
        self.console = console
        self.loader = loader
        self.markdown = markdown
        self.show_thoughts = show_thoughts  # stream a reasoning model's thinking (dim), or hide it
        self._input, self._output = input, output
        self._history = history
        self._prompt: PromptSession[str] | None = None
        self._stop_requested = False
        self._phase = "idle"  # while a reply streams: prompt, reply, closing
        self._last_save: Path | None = None  # what /load without a file reads
        self.autosave: Path | None = None  # where every turn is saved (chosen at the first)
        self._autosave_failed = False
        self.attached: list[Image] = []  # images for the next message (/image, a pasted path)

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        """Read and answer until /bye or Ctrl-D; Ctrl-C at the prompt clears the line."""
        prompt = self._prompt_session()
        while True:
            try:
                text = prompt.prompt()
            except KeyboardInterrupt:
                continue
            except EOFError:
                break
            if not self.handle(text):
                break

    def handle(self, text: str) -> bool:
        """One prompt entry: a slash command or a message. False when the REPL should end."""
        stripped = text.strip()
        if not stripped:
            return True
        if stripped.startswith("/") and not stripped.startswith("//"):
            name, _, arg = stripped.partition(" ")
            name = ALIASES.get(name.lower(), name.lower())
            command = COMMANDS.get(name)
            if command is None:
                self._error(UsageError(f"unknown command {name}", hint="/? lists them"))
                return True
            try:
                return command.run(self, arg.strip())
            except LocalmixError as exc:
                self._error(exc)
                return True
        pasted = image_path(stripped) if self.session.profile.sees_images else None
        if pasted is not None:  # an image file's path on its own line: attach it
            try:
                self.attach(pasted)
            except LocalmixError as exc:
                self._error(exc)
            return True
        # "//" sends a message that starts with a slash
        self.send(message_text(text.lstrip()[1:] if stripped.startswith("//") else text))
        return True

    def send(self, text: str) -> Stats | None:
        """Send a message (with the images attached to it) and show the reply as it streams;
        Ctrl-C stops the reply."""
        if not text.strip():
            return None
        attached, self.attached = self.attached, []
        try:
            stream = self.session.send(text, attached)
        except LocalmixError as exc:
            self._error(exc)
            return None
        return self.show(stream)

    def attach(self, path: Path) -> None:
        """Read an image file for the next message (UsageError for one that is not)."""
        from localmix.chat import images

        if not self.session.profile.sees_images:
            raise UsageError(
                "this model does not see images",
                hint="start a vision model with its --mmproj",
            )
        try:
            data = path.read_bytes()
        except OSError as error:
            raise UsageError(f"cannot read {path}: {error.strerror or error}") from None
        image = images.decode(data)
        self.attached.append(image)
        self.say(f"attached {path.name} ({image.width}x{image.height}) to your next message")

    def show(self, stream: Iterator[Chunk | Thought | Stats | Notice]) -> Stats | None:
        """Show a reply stream of the session (send, retry): its thinking (dim, or a count), the
        answer, then its stats line."""
        before = self.session.last_stats
        stats: Stats | None = None
        thought = ThoughtView(self.console, show=self.show_thoughts)
        try:
            terminal_input = self._prompt.input if self._prompt and self._input is None else None
            with (
                self._interruptible(),
                _keys_held(terminal_input) as ctrl_c_typed,
                ExitStack() as views,
            ):
                if ctrl_c_typed:
                    stream.close()  # not started: the message is as if never sent
                    self.say("interrupted")
                    return None
                view: ReplyView | None = None  # opened at the answer, after the thinking
                try:
                    for item in stream:
                        if isinstance(item, Thought):
                            self._phase = "reply"
                            thought.feed(item.text, item.token)
                        elif isinstance(item, Chunk):
                            self._phase = "reply"
                            if view is None:
                                thought.finish()
                                view = views.enter_context(
                                    ReplyView(self.console, markdown=self.markdown)
                                )
                            view.feed(item.text)
                        elif isinstance(item, Stats):
                            stats = item
                        elif isinstance(item, Notice):
                            self.say(item.text)
                        if self._stop_requested:
                            break
                finally:
                    self._phase = "closing"
                    stream.close()  # the KV cache and the messages keep what was said
                    thought.finish()
        except KeyboardInterrupt:  # Ctrl-C while the prompt was processed: no reply began
            if self.session.last_stats is before:
                self.say("interrupted")
                return None
        except LocalmixError as exc:
            self._error(exc)
            return None
        if stats is None and self.session.last_stats is not before:
            stats = self.session.last_stats  # the interrupted reply's
        if stats is not None:
            self._stats_line(stats)
        self.keep()
        return stats

    def keep(self) -> None:
        """Save the conversation as it stands into this REPL's chats file (every turn)."""
        from localmix.chat import saved

        if not self.session.messages:
            return
        if self.autosave is None:
            self.autosave = saved.new_path()
            self.autosave.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.session.save(self.autosave)
        except LocalmixError as exc:
            if not self._autosave_failed:  # said once, not after every turn
                self._autosave_failed = True
                self._error(exc)

    @contextmanager
    def _interruptible(self) -> Iterator[None]:
        """While tokens stream, Ctrl-C asks the loop to stop after the current one (a clean close
        of the generator); while the prompt is processed, or a second time, it interrupts at once."""
        self._stop_requested, self._phase = False, "prompt"
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_sigint(signum: int, frame: Any) -> None:
            if self._phase == "closing":
                return
            if self._phase == "prompt" or self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
            self._phase = "idle"

    # -- output ------------------------------------------------------------------------------

    def say(self, text: str, style: str = "dim") -> None:
        self.console.print(text, style=style, markup=False, highlight=False)

    def banner(self) -> None:
        """The first lines: the model, its context and format, and how to get help."""
        engine = self.session.engine
        name = self.session.model or Path(engine.config.model_path).name
        thinking = ""
        if self.session.think_mode is not None:
            thinking = f" · thinking {'on' if self.session.thinking else 'off'} (/think)"
        self.say(
            f"{name} · {engine.description} · context {engine.n_ctx} · "
            f"format {self.session.format.name}{thinking}"
        )
        self.say('/? for help · """ for multiline · Ctrl-C stops a reply · Ctrl-D exits')

    def _stats_line(self, stats: Stats) -> None:
        from localmix.cli.render import stats_line

        line = stats_line(stats)
        if stats.finish_reason == "interrupted":
            line += " · interrupted"
        elif stats.finish_reason == "length":
            line += " · max tokens reached (/set max_tokens N)"
        self.say(line)

    def _error(self, exc: LocalmixError) -> None:
        self.console.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False)
        if exc.hint:
            self.console.print(f"[yellow]hint:[/] {escape(exc.hint)}", highlight=False)

    # -- prompt-toolkit ----------------------------------------------------------------------

    def _prompt_session(self) -> PromptSession[str]:
        if self._prompt is None:
            self._prompt = PromptSession(
                message=FormattedText([("bold", PROMPT)]),
                multiline=True,  # what Enter does is decided by _key_bindings
                prompt_continuation=lambda width, line, wrap: CONTINUATION.rjust(width),
                key_bindings=_key_bindings(),
                history=self._history_store(),
                completer=SlashCompleter(self),
                complete_while_typing=True,
                auto_suggest=AutoSuggestFromHistory(),
                placeholder=FormattedText([("#888888", "Send a message (/? for help)")]),
                input=self._input,
                output=self._output,
            )
        return self._prompt

    def _history_store(self) -> History:
        if isinstance(self._history, History):
            return self._history
        path = self._history or settings.repl_history_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileHistory(str(path))


@contextmanager
def _keys_held(terminal_input: Input | None) -> Iterator[bool]:
    """While a reply streams, keys typed on the terminal are not echoed into it, and afterwards
    they are discarded, so half a sentence or a /bye typed meanwhile never runs at the next prompt.
    Ctrl-C still interrupts (ISIG stays on). Yields whether a Ctrl-C was typed ahead of the
    reply (see _ctrl_c_typed_ahead). Does nothing unless stdin is a terminal."""
    fd = -1
    if terminal_input is not None and sys.stdin is not None and sys.stdin.isatty():
        fd = sys.stdin.fileno()
    if fd < 0:
        yield False
        return
    import termios

    saved = termios.tcgetattr(fd)
    quiet = list(saved)
    quiet[3] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON)  # lflag
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield _ctrl_c_typed_ahead(fd, terminal_input)
    finally:
        termios.tcflush(fd, termios.TCIFLUSH)  # what was typed during the reply
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def _ctrl_c_typed_ahead(fd: int, terminal_input: Input | None) -> bool:
    """A Ctrl-C pressed right after Enter arrives while the prompt still has the terminal in raw
    mode: a byte, not a signal. prompt-toolkit keeps what it read past the Enter for the next
    prompt, and the rest waits in the terminal's queue; a ^C in either stops the reply before it
    begins (the rest is discarded, as keys typed during a reply are)."""
    import select

    from prompt_toolkit.input.typeahead import get_typeahead
    from prompt_toolkit.keys import Keys

    ahead = get_typeahead(terminal_input) if terminal_input is not None else []
    pending = b""
    while select.select([fd], [], [], 0)[0]:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        pending += chunk
    return any(key.key == Keys.ControlC for key in ahead) or b"\x03" in pending


def _key_bindings() -> KeyBindings:
    bindings = KeyBindings()
    focused = has_focus(DEFAULT_BUFFER)

    @bindings.add("enter", filter=focused)
    def _enter(event: Any) -> None:
        buffer = event.current_buffer
        if in_block(buffer.text):
            buffer.newline(copy_margin=False)
        else:
            buffer.validate_and_handle()

    @bindings.add("escape", "enter", filter=focused)
    def _newline(event: Any) -> None:
        event.current_buffer.newline(copy_margin=False)

    return bindings


class SlashCompleter(Completer):
    """Completes slash commands, /set names, /model store names and /save, /load paths."""

    def __init__(self, repl: Repl) -> None:
        self.repl = repl
        self._paths = PathCompleter(expanduser=True)

    def get_completions(self, document: Document, event: CompleteEvent) -> Iterable[Completion]:
        text = document.text_before_cursor
        if not text.startswith("/") or "\n" in text:
            return
        if " " not in text:
            for name in COMMANDS:
                if name.startswith(text.lower()):
                    yield Completion(name, -len(text), display_meta=COMMANDS[name].help)
            return
        name, _, arg = text.partition(" ")
        if name in ("/save", "/load"):
            yield from self._paths.get_completions(Document(arg, len(arg)), event)
            return
        for word, meta in self._words(name):
            if word.startswith(arg) and " " not in arg:
                yield Completion(word, -len(arg), display_meta=meta)

    def _words(self, name: str) -> list[tuple[str, str]]:
        if name == "/set":
            values = self.repl.session.settings()
            return [(key, str(value)) for key, value in values.items()]
        if name in ("/think", "/thoughts"):
            words = ("on", "off") if name == "/think" else ("show", "hide")
            return [(word, "") for word in words]
        if name == "/model":
            from localmix.models import store

            return [(m.ref, m.architecture) for m in store.list_models()]
        return []


# -- commands ---------------------------------------------------------------------------------


@_command("/help", "", "show the commands and keys")
def _help(repl: Repl, arg: str) -> None:
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for command in COMMANDS.values():
        table.add_row(Text(f"{command.name} {command.usage}".rstrip()), Text(command.help))
    for keys, what in (
        ('"""', "start and end a multiline message"),
        ("Alt-Enter", "a new line"),
        ("Ctrl-C", "stop the reply; at the prompt, clear the line"),
        ("Ctrl-D", "exit"),
        ("Up, Ctrl-R", "history, search it"),
        ("//text", "send a message that starts with /"),
    ):
        table.add_row(Text(keys), Text(what))
    repl.console.print(table)


@_command("/system", "[TEXT|none]", "show or set the system prompt")
def _system(repl: Repl, arg: str) -> None:
    if not arg:
        current = repl.session.system
        repl.say(f"system prompt: {current}" if current else "no system prompt")
        return
    repl.session.set_system(None if arg.lower() == "none" else message_text(arg))
    repl.say("system prompt set" if repl.session.system else "system prompt removed")


@_command("/clear", "", "forget the conversation (the system prompt stays)")
def _clear(repl: Repl, arg: str) -> None:
    repl.session.clear()
    repl.autosave = None  # the next conversation gets its own file; this one stays saved
    repl.say("conversation cleared")


@_command("/set", "[NAME VALUE]", "show or change temperature, top_p, top_k, min_p, ...")
def _set(repl: Repl, arg: str) -> None:
    if not arg:
        values = repl.session.settings()
        repl.say("  ".join(f"{k} {'random' if v is None else v}" for k, v in values.items()))
        return
    name, _, value = arg.partition(" ")
    name = name.lower()
    if not value.strip():
        raise UsageError(f"/set {name} needs a value", hint="e.g. /set temperature 0.2")
    repl.session.set_option(name, value.strip())
    shown = repl.session.settings()[name]
    repl.say(f"{name} = {'random' if shown is None else shown}")


@_command("/stats", "", "the last reply's numbers and the context in use")
def _stats(repl: Repl, arg: str) -> None:
    session, engine = repl.session, repl.session.engine
    stats = session.last_stats
    if stats is None:
        repl.say("no reply yet")
    else:
        repl.say(
            f"prompt {stats.prompt_tokens} tokens processed, {stats.cached_tokens} reused from "
            f"the cache, in {stats.prompt_s:.3f} s ({stats.prompt_tps:.1f} t/s)"
        )
        repl.say(_reply_numbers(stats))
    repl.say(
        f"context {len(engine.kv_tokens)} / {engine.n_ctx} tokens · "
        f"{len(session.messages)} messages · format {session.format.name} · {engine.description}"
    )


@_command("/think", "[on|off]", "show or switch a reasoning model's thinking")
def _think(repl: Repl, arg: str) -> None:
    session = repl.session
    if arg.lower() not in ("", "on", "off"):
        raise UsageError(f"/think takes on or off, not {arg!r}")
    if arg:
        session.set_thinking(arg.lower() == "on")
    if session.think_mode is None:
        repl.say("this model has no thinking switch")
        return
    how = "reasoning_effort high / none" if session.think_mode == "effort" else "reasoning prompt"
    repl.say(f"thinking {'on' if session.thinking else 'off'} ({how})")


@_command("/thoughts", "[show|hide]", "the last reply's thinking; show or hide it as it streams")
def _thoughts(repl: Repl, arg: str) -> None:
    if arg.lower() in ("show", "hide"):
        repl.show_thoughts = arg.lower() == "show"
        repl.say(f"thinking is {'shown' if repl.show_thoughts else 'hidden'} as it streams")
        return
    if arg:
        raise UsageError(f"/thoughts takes show or hide, not {arg!r}")
    replies = [m for m in repl.session.messages if m.role == "assistant"]
    thinking = replies[-1].thinking if replies else None
    if thinking is None:
        repl.say("the last reply has no thinking")
        return
    repl.console.print(Text(thinking, style="dim"), highlight=False)


@_command("/retry", "", "generate the last reply again")
def _retry(repl: Repl, arg: str) -> None:
    repl.show(repl.session.retry())


@_command("/undo", "", "drop the last exchange (your message and the reply)")
def _undo(repl: Repl, arg: str) -> None:
    removed = repl.session.undo()
    repl.keep()
    first = removed[0].text
    shown = first if len(first) <= 40 else first[:39] + "…"
    repl.say(f"dropped {len(removed)} message{'s' * (len(removed) != 1)} ({shown!r} …)")


@_command("/image", "PATH", "attach an image to your next message (a vision model)")
def _image(repl: Repl, arg: str) -> None:
    if not arg:
        raise UsageError("/image needs a file", hint="/image photo.jpg")
    repl.attach(image_path(arg) or Path(arg).expanduser())


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")


def image_path(text: str) -> Path | None:
    """The image file a line names, if the whole line is one (quotes a terminal adds on a
    drag and drop are taken off)."""
    candidate = text.strip().strip("'\"")
    if "\n" in candidate or not candidate.lower().endswith(IMAGE_SUFFIXES):
        return None
    path = Path(candidate).expanduser()
    return path if path.is_file() else None


@_command("/save", "[FILE]", "save the conversation as JSON")
def _save(repl: Repl, arg: str) -> None:
    from localmix.chat import saved

    path = Path(arg).expanduser() if arg else saved.new_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    repl._last_save = repl.session.save(path)
    repl.say(f"saved {repl._last_save}")


@_command("/load", "[FILE]", "load a saved conversation (default: the latest, saved every turn)")
def _load(repl: Repl, arg: str) -> None:
    from localmix.chat import saved

    if arg:
        path = Path(arg).expanduser()
    elif repl._last_save is not None:
        path = repl._last_save
    else:  # the latest other than this REPL's own file: what a crash or another REPL left
        path = saved.latest(besides=repl.autosave)
    model = repl.session.load(path)
    # a chats-folder file goes on being saved into; a file of the user's own is left as it is
    repl.autosave = path if saved.is_autosaved(path) else None
    n = len(repl.session.messages)
    repl.say(f"loaded {path}: {n} message{'s' * (n != 1)}")
    if model and repl.session.model and model != repl.session.model:
        repl.say(f"it was saved with {model}; /model {model} switches to it")


@_command("/model", "[NAME]", "show the model, or switch to another (the chat goes on)")
def _model(repl: Repl, arg: str) -> None:
    if not arg:
        engine = repl.session.engine
        repl.say(f"{repl.session.model or engine.config.model_path} · {engine.description}")
        return
    if repl.loader is None:
        raise UsageError("this chat cannot switch models")
    old = repl.session
    # free the old model first: two large models rarely fit side by side
    previous = old.model or str(old.engine.config.model_path)
    old.engine.close()
    try:
        with repl.console.status(f"loading {arg}"):
            repl.session = repl.loader(arg)
    except LocalmixError:
        with repl.console.status(f"loading {previous} again"):
            repl.session = repl.loader(previous)
        raise
    finally:
        _carry(old, repl.session)
    repl.banner()


@_command("/bye", "", "exit (or Ctrl-D)")
def _bye(repl: Repl, arg: str) -> bool:
    return False


def _carry(old: Session, new: Session) -> None:
    """The conversation and its settings go on in a new Session (another model)."""
    if new is old:
        return
    new.set_system(old.system)
    new.sampling, new.max_tokens, new.messages = old.sampling, old.max_tokens, list(old.messages)
    if not new.format.think:  # a model that cannot read thinking back gets the answers only
        new.messages = [m.without_thinking() for m in new.messages]
    if new.think_mode is not None and old.think_mode is not None:
        new.set_thinking(old.thinking)


def _reply_numbers(stats: Stats) -> str:
    """The /stats line of a reply; an interrupted one shows only the numbers it has."""
    if stats.generated_tokens == 0:
        return f"no reply tokens; finished: {stats.finish_reason}"
    line = f"reply {stats.generated_tokens} tokens, first after {stats.ttft_s:.3f} s"
    if stats.gen_tps > 0:
        line += f", then {stats.gen_tps:.1f} t/s"
    return f"{line}; finished: {stats.finish_reason}"
