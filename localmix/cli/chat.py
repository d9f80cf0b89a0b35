"""chat: the REPL on a terminal; with a prompt argument or piped input, just the reply."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from localmix.cli.options import JsonOpt, ModelArg, ThreadsOpt
from localmix.cli.plan import CpuMoeOpt, EstimateOpt, VramBudgetOpt

if TYPE_CHECKING:
    from localmix.chat.session import Session
    from localmix.llama.offload import Plan
    from localmix.llama.records import EngineConfig, Sampling, Stats
    from localmix.store import Located

DEFAULT_CTX = 4096
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
    typer.Option("--temperature", "--temp", min=0, help="Sampling temperature (0: greedy)."),
]
TopPOpt = Annotated[
    Optional[float],  # noqa: UP045
    typer.Option("--top-p", min=0, max=1, help="Nucleus sampling threshold."),
]
TopKOpt = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option("--top-k", min=0, help="Sample from the k most likely tokens (0: all)."),
]
MinPOpt = Annotated[
    Optional[float],  # noqa: UP045
    typer.Option("--min-p", min=0, max=1, help="Drop tokens below this share of the best one."),
]
RepeatOpt = Annotated[
    Optional[float],  # noqa: UP045
    typer.Option("--repeat-penalty", help="Penalty for repeating recent tokens (1: off)."),
]
SeedOpt = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option("--seed", help="Sampling seed (default: random)."),
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
NglOpt = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option("-ngl", "--n-gpu-layers", help="Layers on the GPU (-1: all; default: none)."),
]
FormatOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--format", help="Chat format: v1, v2, v3, v3-tekken, v7 (default: from the model)."
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
StatsOpt = Annotated[
    bool, typer.Option("--stats", help="With a prompt: print the stats line on stderr.")
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
    chat_format: FormatOpt = None,
    overflow: OverflowOpt = "shift",
    json_out: JsonOpt = False,
    plain: PlainOpt = False,
    stats: StatsOpt = False,
    estimate: EstimateOpt = False,
    vram_budget: VramBudgetOpt = None,
    cpu_moe: CpuMoeOpt = None,
) -> None:
    """Chat with a model: a REPL on a terminal; with a PROMPT or piped input, print the reply."""
    from localmix import store
    from localmix.llama.records import Sampling

    picked = {
        "temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p,
        "repeat_penalty": repeat_penalty, "seed": seed,
    }  # fmt: skip
    sampling = Sampling(**{k: v for k, v in picked.items() if v is not None})
    if estimate:
        from localmix.cli.plan import plan_table
        from localmix.cli.render import console

        plan = offload_plan(
            store.locate(model), ctx=ctx, n_gpu_layers=n_gpu_layers, vram_budget=vram_budget,
            cpu_moe=cpu_moe, force=True,
        )  # fmt: skip
        console().print(plan_table(plan))
        return
    store.locate(model)  # an unknown model is the first thing to say, before reading stdin
    message = _message(prompt)

    def load(name: str, status: bool = False) -> Session:
        return open_session(
            name, ctx=ctx, threads=threads, n_gpu_layers=n_gpu_layers, vram_budget=vram_budget,
            cpu_moe=cpu_moe, chat_format=chat_format,
            system=system, sampling=sampling, max_tokens=max_tokens, overflow=overflow,
            status=status,
        )  # fmt: skip

    session = load(model, status=message is None)
    try:
        if message is None:
            _interactive(session, load, markdown=not plain)
        else:
            _one_shot(session, message, json_out=json_out, show_stats=stats)
    finally:
        session.engine.close()


def _message(prompt: str | None) -> str | None:
    """The one-shot message (prompt argument, then piped stdin), or None for the REPL."""
    from localmix.errors import UsageError

    piped = None if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
    if prompt is None and piped is None:
        return None
    text = "\n\n".join(part.strip("\n") for part in (prompt, piped) if part and part.strip())
    if not text.strip():
        raise UsageError("nothing to send: the prompt and standard input are empty")
    return text


def engine_config(
    target: Located,
    *,
    ctx: int | None,
    threads: int | None,
    n_gpu_layers: int | None,
    vram_budget: str | None = None,
    cpu_moe: int | None = None,
) -> EngineConfig:
    """How to load the model: context (default: 4096, or the model's own when smaller) and the
    offload plan's placement when a GPU is there or a budget / --cpu-moe is given."""
    from localmix.llama.records import EngineConfig

    config = EngineConfig(target.path, n_ctx=_ctx(target, ctx), n_threads=threads)
    plan = offload_plan(
        target, ctx=ctx, n_gpu_layers=n_gpu_layers, vram_budget=vram_budget, cpu_moe=cpu_moe
    )
    if plan is not None:
        return replace(config, **plan.engine_fields())
    if n_gpu_layers is not None:
        config = replace(config, n_gpu_layers=n_gpu_layers)
    return config


def _ctx(target: Located, ctx: int | None) -> int:
    if ctx is None:
        return min(DEFAULT_CTX, target.context_length) if target.context_length > 0 else DEFAULT_CTX
    return ctx


def offload_plan(
    target: Located,
    *,
    ctx: int | None,
    n_gpu_layers: int | None,
    vram_budget: str | None,
    cpu_moe: int | None,
    force: bool = False,
) -> Plan | None:
    """The fit plan (llama.offload) when it has something to decide, else None (CPU only)."""
    from localmix.llama import offload
    from localmix.llama.hardware import probe

    asked = force or vram_budget is not None or cpu_moe is not None
    machine = probe(bandwidth=False)
    if not asked and (n_gpu_layers is not None or not machine.gpus):
        return None
    return offload.estimate_for(
        target.path,
        n_ctx=_ctx(target, ctx) or target.context_length,
        vram_budget=vram_budget,
        ngl=n_gpu_layers,
        cpu_moe=cpu_moe,
        hardware=machine,
    )


def open_session(
    reference: str,
    *,
    ctx: int | None = None,
    threads: int | None = None,
    n_gpu_layers: int | None = None,
    vram_budget: str | None = None,
    cpu_moe: int | None = None,
    chat_format: str | None = None,
    system: str | None = None,
    sampling: Sampling | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    overflow: str = "shift",
    status: bool = False,
) -> Session:
    """Load a model and start a chat Session on it; the caller closes session.engine."""
    from contextlib import nullcontext

    from localmix import store
    from localmix.chat.session import Session
    from localmix.cli.render import err_console
    from localmix.llama.engine import Engine

    target = store.locate(reference)
    config = engine_config(
        target,
        ctx=ctx,
        threads=threads,
        n_gpu_layers=n_gpu_layers,
        vram_budget=vram_budget,
        cpu_moe=cpu_moe,
    )
    spinner = err_console().status(f"loading {target.name}") if status else nullcontext()
    with spinner:
        engine = Engine(config)
    try:
        # the manifest's format, else Session detects it from the GGUF's metadata
        return Session(
            engine, chat_format or target.chat_format, system=system, sampling=sampling,
            max_tokens=max_tokens, overflow=overflow, model=target.name,
        )  # fmt: skip
    except BaseException:
        engine.close()
        raise


def _interactive(session: Session, load: Callable[[str], Session], *, markdown: bool) -> None:
    from localmix.cli.render import console
    from localmix.cli.repl import Repl

    repl = Repl(session, console=console(), loader=load, markdown=markdown)
    repl.banner()
    try:
        repl.run()
    finally:
        if repl.session is not session:  # /model switched: close the one in use now
            repl.session.engine.close()


def _one_shot(session: Session, message: str, *, json_out: bool, show_stats: bool) -> None:
    """Print only the reply (streamed, no colors) or, with --json, the reply and its stats."""
    from localmix.chat.session import Notice
    from localmix.cli import render
    from localmix.cli.reply import printable
    from localmix.llama.records import Chunk, Stats

    out = sys.stdout
    tty = out.isatty()  # a terminal gets no control characters from the model; a pipe gets all
    pieces: list[str] = []
    final: Stats | None = None
    for item in session.send(message):
        if isinstance(item, Chunk):
            pieces.append(item.text)
            if not json_out:
                out.write(printable(item.text) if tty else item.text)
                out.flush()
        elif isinstance(item, Stats):
            final = item
        elif isinstance(item, Notice):
            render.err_console().print(item.text, style="dim", markup=False, highlight=False)
    reply = "".join(pieces)
    if json_out:
        render.print_json({"model": session.model, "reply": reply, "stats": final})
        return
    if not reply.endswith("\n"):
        out.write("\n")
        out.flush()
    if show_stats and final is not None:
        render.err_console().print(render.stats_line(final), style="dim", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("chat")(chat_command)
