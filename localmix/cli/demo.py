"""`localmix demo`: the whole product offline on a model localmix builds itself (localmix.demo
does the work; this shows each part as it comes: the build's stages, the bench table, what the
quant costs, the chat reply, then a summary)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from localmix.cli.options import ThreadsOpt

if TYPE_CHECKING:
    from localmix.cli.progress_view import ProgressView
    from localmix.demo import DemoRun, QuantCost, Step


def demo_command(
    model: Annotated[
        str, typer.Option("--model", "-m", help="Built-in model: tiny-mistral or tiny-mixtral.")
    ] = "tiny-mistral",
    threads: ThreadsOpt = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens in the chat reply.")] = 48,
) -> None:
    """Build a small random-weight model, then convert, quantize, bench and chat with it offline."""
    from localmix import demo
    from localmix.cli.progress_view import ProgressView

    with ProgressView(transient=True) as view:
        result = demo.run(
            model,
            threads=threads,
            max_tokens=max_tokens,
            on_progress=view,
            on_step=_StepView(view),
        )
    _chat_end(result)
    _summary(result)


class _StepView:
    """Shows each part of the demo as it is done; results on stdout, the rest on stderr."""

    def __init__(self, view: ProgressView) -> None:
        self._view = view

    def __call__(self, step: Step) -> None:
        from rich.markup import escape

        from localmix import demo
        from localmix.cli import render

        if isinstance(step, demo.StageDone):
            self._view.say(f"[green]✓[/] {step.stage} [dim]{step.seconds:.1f} s[/]")
            return
        if isinstance(step, demo.ChatText):
            render.console().print(step.text, end="", markup=False, highlight=False)
            return
        self._view.close()  # a result follows the bars of the work it ends; stdout needs no live
        if isinstance(step, demo.Starting):
            _banner(step.model)
        elif isinstance(step, demo.Stored):
            size = render.human_size(step.manifest.size)
            render.err_console().print(f"[green]✓[/] {step.manifest.ref} in the store ({size})")
        elif isinstance(step, demo.Benched):
            from localmix.bench import report

            render.console().print(report.table(list(step.results)))
        elif isinstance(step, demo.QuantCost):
            heading = f"{step.quant} against {step.reference}:"
            render.console().print(f"\n[bold]{heading}[/] {escape(_cost_line(step))}")
        elif isinstance(step, demo.ChatStarts):
            render.console().print(f"\n[bold]>>> {escape(step.prompt)}[/]")


def _banner(model: str) -> None:
    from rich.panel import Panel

    from localmix.cli import render

    render.err_console().print(
        Panel.fit(
            f"localmix demo: {model}, built here from random weights with Mistral's real "
            "tokenizer.\nThe pipeline is real; the weights are random, so the words are noise.",
            border_style="cyan",
        )
    )


def _cost_line(cost: QuantCost) -> str:
    s = cost.scores
    return (
        f"PPL ratio {s.ppl_ratio:.4f} · mean KLD {s.kld_mean:.4f} · "
        f"same top token {100 * s.same_top:.1f}% ({s.n_tokens} tokens)"
    )


def _chat_end(result: DemoRun) -> None:
    from localmix.cli import render

    console = render.console()
    console.print()
    if result.chat.stats is not None:
        console.print(render.stats_line(result.chat.stats), style="dim")


def _summary(result: DemoRun) -> None:
    from rich.table import Table

    from localmix.cli import render

    manifest = result.manifest
    table = Table(title="demo summary", box=None, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("model", f"{manifest.ref}  {render.human_size(manifest.size)}")
    table.add_row("file", manifest.path)
    for stage in result.timings:
        table.add_row(stage.stage, f"{stage.seconds:.1f} s")
    for bench in result.bench:
        table.add_row(bench.test, f"{bench.avg_ts:.1f} ± {bench.stddev_ts:.1f} t/s")
    table.add_row(f"vs {result.cost.reference}", _cost_line(result.cost))
    if result.chat.stats is not None:
        table.add_row("chat", render.stats_line(result.chat.stats))
    table.add_row("total", f"{result.seconds:.1f} s")
    name = manifest.name
    table.add_row(
        "next",
        f"localmix chat {name}  ·  localmix bench {name}  ·  "
        f"localmix eval {name}  ·  localmix serve {name}",
    )
    render.console().print()
    render.console().print(table)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
