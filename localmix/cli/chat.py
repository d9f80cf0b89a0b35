"""chat: the REPL on a terminal; with a prompt argument or piped input, just the reply."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from localmix.cli.options import (
    MAX_SEED,
    ChatFormatOpt,
    JsonOpt,
    ModelArg,
    RepackOpt,
    RpcOpt,
    ThreadsOpt,
    number_in,
    rpc_endpoints,
)
from localmix.cli.plan import (
    CpuMoeOpt,
    EstimateOpt,
    NCpuMoeOpt,
    NglOpt,
    VramBudgetOpt,
    cpu_moe_layers,
)
from localmix.errors import UsageError

if TYPE_CHECKING:
    from localmix.chat.images import Image
    from localmix.chat.session import Session
    from localmix.llama.records import Stats
    from localmix.models.store import Located

DEFAULT_CTX = 4096  # load.DEFAULT_CTX, repeated here so --help needs no import
DEFAULT_MAX_TOKENS = 1024

PromptArg = Annotated[
    Optional[str],  # noqa: UP045 - typer needs Optional at runtime on 3.10
    typer.Argument(help="A message: print the reply and exit. Piped input is sent too (after it)."),
]
SystemOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--system", "-s", help="System prompt."),
]
TempOpt = Annotated[
    Optional[float],  # noqa: UP045
    typer.Option(
        "--temperature", "--temp", callback=number_in(0), help="Sampling temperature (0: greedy)."
    ),
]
TopPOpt = Annotated[
    Optional[float],  # noqa: UP045
    typer.Option("--top-p", callback=number_in(0, 1), help="Nucleus sampling threshold."),
]
TopKOpt = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option("--top-k", min=0, help="Sample from the k most likely tokens (0: all)."),
]
MinPOpt = Annotated[
    Optional[float],  # noqa: UP045
    typer.Option(
        "--min-p", callback=number_in(0, 1), help="Drop tokens below this share of the best one."
    ),
]
RepeatOpt = Annotated[
    Optional[float],  # noqa: UP045
    typer.Option(
        "--repeat-penalty",
        callback=number_in(0),
        help="Penalty for repeating recent tokens (1: off).",
    ),
]
SeedOpt = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option("--seed", min=0, max=MAX_SEED, help="Sampling seed (default: random)."),
]
MaxTokensOpt = Annotated[
    int, typer.Option("--max-tokens", "-n", min=1, help="Most tokens in one reply.")
]
CtxOpt = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(
        "--ctx",
        "-c",
        min=0,
        help=f"Context size in tokens (0: the model's own; default: {DEFAULT_CTX} or less).",
    ),
]
OverflowOpt = Annotated[
    str,
    typer.Option(
        "--overflow",
        help="When the context is full: shift (drop the oldest turns, keep the KV cache) or "
        "drop (drop them and re-process).",
    ),
]
PlainOpt = Annotated[
    bool, typer.Option("--plain", help="Show replies as plain text, not rendered markdown.")
]
ThinkOpt = Annotated[
    Optional[bool],  # noqa: UP045
    typer.Option(
        "--think/--no-think",
        help="A reasoning model thinks before it answers (default: the model's own way: "
        "Magistral and Ministral 3 Reasoning think, Mistral Small 4 does not).",
    ),
]
SchemaOpt = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option(
        "--schema",
        help="Reply with JSON that follows this JSON schema file (a grammar enforces it).",
        dir_okay=False,
    ),
]
HideThinkingOpt = Annotated[
    bool,
    typer.Option("--hide-thinking", help="Show only how long the model thought, not its thinking."),
]
ImageOpt = Annotated[
    Optional[list[Path]],  # noqa: UP045
    typer.Option(
        "--image",
        metavar="FILE",
        help="With a prompt: an image file the message shows the model (PNG, JPEG, WebP, GIF, "
        "BMP; repeat for several). Needs a vision model and its --mmproj.",
        dir_okay=False,
    ),
]
MmprojOpt = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option(
        "--mmproj",
        help="A vision model's vision tower (its mmproj GGUF), so that it sees images.",
        dir_okay=False,
    ),
]
StatsOpt = Annotated[
    bool, typer.Option("--stats", help="With a prompt: print the stats line on stderr.")
]
ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Go on with the latest chat saved with this model (the REPL saves every turn).",
    ),
]


def chat_command(
    model: ModelArg,
    prompt: PromptArg = None,
    system: SystemOpt = None,
    temperature: TempOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    min_p: MinPOpt = None,
    repeat_penalty: RepeatOpt = None,
    seed: SeedOpt = None,
    max_tokens: MaxTokensOpt = DEFAULT_MAX_TOKENS,
    ctx: CtxOpt = None,
    threads: ThreadsOpt = None,
    n_gpu_layers: NglOpt = None,
    repack: RepackOpt = None,
    chat_format: ChatFormatOpt = None,
    overflow: OverflowOpt = "shift",
    json_out: JsonOpt = False,
    plain: PlainOpt = False,
    think: ThinkOpt = None,
    hide_thinking: HideThinkingOpt = False,
    schema: SchemaOpt = None,
    image: ImageOpt = None,
    mmproj: MmprojOpt = None,
    stats: StatsOpt = False,
    resume: ResumeOpt = False,
    estimate: EstimateOpt = False,
    vram_budget: VramBudgetOpt = None,
    cpu_moe: CpuMoeOpt = False,
    n_cpu_moe: NCpuMoeOpt = None,
    rpc: RpcOpt = None,
) -> None:
    """Chat with a model: a REPL on a terminal; with a PROMPT or piped input, print the reply.

    `localmix run` is the same command (Ollama's name for it)."""
    from localmix import load
    from localmix.chat.session import open_session
    from localmix.llama.records import Sampling

    picked = {
        "temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p,
        "repeat_penalty": repeat_penalty, "seed": seed,
    }  # fmt: skip
    sampling = Sampling(**{k: v for k, v in picked.items() if v is not None})
    settings = load.LoadSettings(
        ctx=ctx, threads=threads, n_gpu_layers=n_gpu_layers, vram_budget=vram_budget,
        cpu_moe=cpu_moe_layers(cpu_moe, n_cpu_moe), repack=repack, rpc=rpc_endpoints(rpc),
    )  # fmt: skip
    target = load.locate(model)  # an unknown model is the first thing to say, before stdin
    if estimate:
        from localmix.cli.plan import plan_table
        from localmix.cli.render import console

        plan = load.plan_for(target, settings, force=True)
        assert plan is not None  # forced
        console().print(plan_table(plan))
        return
    output = _schema(schema) if schema is not None else None
    message = _message(prompt)
    pictures = [_image(path) for path in image or ()]
    if pictures and message is None:
        raise UsageError("--image goes with a PROMPT", hint='localmix chat MODEL "..." --image F')

    def open_chat(reference: str | Located, status: bool = False) -> Session:
        def opener(target: Located) -> tuple[Session, tuple[str, ...]]:
            return open_session(
                target, settings, chat_format=chat_format, system=system, sampling=sampling,
                max_tokens=max_tokens, overflow=overflow, thinking=think, mmproj=mmproj,
            )  # fmt: skip

        return _opened(reference, opener, status=status)

    resumed = _resumed(target.name) if resume else None
    session = open_chat(target, status=message is None)
    try:
        if output is not None:
            session.set_schema(output)
        if resumed is not None and resumed.exists():
            session.load(resumed)
        if message is None:
            _interactive(
                session, open_chat, markdown=not plain, show_thoughts=not hide_thinking,
                resumed=resumed,
            )  # fmt: skip
        else:
            _one_shot(
                session,
                message,
                json_out=json_out,
                show_stats=stats,
                show_thoughts=not hide_thinking,
                images=pictures,
            )
            if resumed is not None:  # the turn goes into the chat it continued
                session.save(resumed)
    finally:
        session.engine.close()


def _resumed(model: str) -> Path:
    """The chat --resume goes on with: the latest saved with this model, else a new one (said on
    stderr) that the next --resume continues."""
    from localmix.chat import saved
    from localmix.cli.render import err_console
    from localmix.errors import UsageError

    try:
        return saved.latest(model)
    except UsageError:
        path = saved.new_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        err_console().print(f"note: no saved chat with {model} yet; a new one", style="dim")
        return path


def _image(path: Path) -> Image:
    """The image in an --image file; UsageError for one that is missing, unreadable or not an
    image localmix reads."""
    from localmix.chat import images

    try:
        data = path.expanduser().read_bytes()
    except OSError as error:
        raise UsageError(f"--image: cannot read {path}: {error.strerror or error}") from None
    try:
        return images.decode(data)
    except UsageError as error:
        raise UsageError(f"--image: {path}: {error.message}", hint=error.hint) from None


def _schema(path: Path) -> Any:
    """The JSON schema in a --schema file; UsageError for a missing or unreadable one."""
    import json

    from localmix.errors import UsageError

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise UsageError(f"--schema: cannot read {path}: {error.strerror or error}") from None
    except ValueError as error:
        raise UsageError(
            f"--schema: {path} is not JSON: {error}", hint="give a JSON schema file"
        ) from None


def _message(prompt: str | None) -> str | None:
    """The one-shot message (prompt argument, then piped stdin), or None for the REPL."""
    from localmix.errors import UsageError

    piped = None if sys.stdin is None or sys.stdin.isatty() else _read_stdin()
    if prompt is None and piped is None:
        return None
    if prompt is not None:
        # bytes that are not UTF-8 reach argv as lone surrogates; they cannot be tokenized
        prompt = prompt.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    text = "\n\n".join(part.strip("\n") for part in (prompt, piped) if part and part.strip())
    if not text.strip():
        raise UsageError(
            "nothing to send: the prompt and standard input are empty",
            hint="give a message, or leave the prompt out for the interactive chat",
        )
    return text


def _read_stdin() -> str:
    """Piped input as text; bytes that are not UTF-8 become U+FFFD, as in the prompt."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # a text stream (tests): already decoded
        return sys.stdin.read()
    return buffer.read().decode("utf-8", "replace")


def _opened(
    reference: str | Located,
    opener: Callable[[Located], tuple[Session, tuple[str, ...]]],
    *,
    status: bool,
) -> Session:
    """The session opener gives, with a spinner while it loads (status) and its notices shown."""
    from contextlib import nullcontext

    from localmix import load
    from localmix.cli.render import err_console

    target = load.locate(reference)
    spinner = err_console().status(f"loading {target.name}") if status else nullcontext()
    with spinner:
        session, notices = opener(target)
    for notice in notices:
        err_console().print(f"note: {notice}", style="dim", markup=False, highlight=False)
    return session


def _interactive(
    session: Session,
    loader: Callable[[str], Session],
    *,
    markdown: bool,
    show_thoughts: bool,
    resumed: Path | None = None,
) -> None:
    from localmix.cli.render import console
    from localmix.cli.repl import Repl

    repl = Repl(
        session, console=console(), loader=loader, markdown=markdown, show_thoughts=show_thoughts
    )
    repl.banner()
    if resumed is not None:
        repl.autosave = resumed  # its next turns go on in the same file
        n = len(session.messages)
        if n:
            repl.say(f"resumed {resumed}: {n} message{'s' * (n != 1)}")
    try:
        repl.run()
    finally:
        if repl.session is not session:  # /model switched: close the one in use now
            repl.session.engine.close()


def _one_shot(
    session: Session,
    message: str,
    *,
    json_out: bool,
    show_stats: bool,
    show_thoughts: bool,
    images: Sequence[Image] = (),
) -> None:
    """Print only the answer (streamed, no colors) or, with --json, the reply and its stats. A
    reasoning model's thinking goes to stderr, dim, when stderr is a terminal; --json has it as
    "thinking"."""
    from localmix.chat.reasoning import Thought
    from localmix.chat.session import Notice
    from localmix.cli import render
    from localmix.cli.reply import ThoughtView, printable
    from localmix.llama.records import Chunk, Stats

    out = sys.stdout
    tty = out.isatty()  # a terminal gets no control characters from the model; a pipe gets all
    err = render.err_console()
    thought = ThoughtView(err, show=show_thoughts) if err.is_terminal and not json_out else None
    pieces: list[str] = []
    final: Stats | None = None
    for item in session.send(message, images):
        if isinstance(item, Thought):
            if thought is not None:
                thought.feed(item.text, item.token)
        elif isinstance(item, Chunk):
            if thought is not None:
                thought.finish()
            pieces.append(item.text)
            if not json_out:
                out.write(printable(item.text) if tty else item.text)
                out.flush()
        elif isinstance(item, Stats):
            final = item
        elif isinstance(item, Notice):
            err.print(item.text, style="dim", markup=False, highlight=False)
    if thought is not None:
        thought.finish()
    reply = "".join(pieces)
    if json_out:
        last = session.messages[-1] if session.messages else None
        thinking = last.thinking if last is not None and last.role == "assistant" else None
        render.print_json(
            {
                "model": session.model,
                "reply": reply,
                "thinking": thinking,
                "thinking_tokens": session.last_thought_tokens,
                "stats": final,
            }
        )
        return
    if not reply.endswith("\n"):
        out.write("\n")
        out.flush()
    if show_stats and final is not None:
        err.print(render.stats_line(final), style="dim", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("chat")(chat_command)
    # Ollama's verb, for the hands that type it; hidden so that help lists the command once
    app.command("run", hidden=True)(chat_command)
