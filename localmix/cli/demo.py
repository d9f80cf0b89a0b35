"""`localmix demo`: the whole product offline on a model localmix builds itself.

synth -> convert -> quantize Q4_K_M -> store -> a short bench -> what the quant costs against the
F16 file (localmix eval) -> one chat turn, with progress.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer

from localmix.cli.options import ThreadsOpt

DEMO_PROMPT = "Explain in one sentence why the sky is blue."


def _check_up_front(model: str, threads: int | None) -> None:
    """What would fail minutes into the build fails before the banner: an unknown or downloadable
    model, a thread count (or LOCALMIX_THREADS) the machine cannot run."""
    from localmix import settings
    from localmix.errors import UsageError
    from localmix.models import catalog

    spec = catalog.load().get(model)
    if not spec.synthetic:
        raise UsageError(
            f"{spec.name} is not a built-in model", hint="use tiny-mistral or tiny-mixtral"
        )
    if threads is not None:
        settings.check_threads(threads)
    else:
        settings.default_threads()


def demo_command(
    model: Annotated[
        str, typer.Option("--model", "-m", help="Built-in model: tiny-mistral or tiny-mixtral.")
    ] = "tiny-mistral",
    threads: ThreadsOpt = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens in the chat reply.")] = 48,
) -> None:
    """Build a small random-weight model, then convert, quantize, bench and chat with it offline."""
    from rich.panel import Panel

    from localmix.build.synth import builtin
    from localmix.cli import render

    _check_up_front(model, threads)
    err = render.err_console()
    err.print(
        Panel.fit(
            f"localmix demo: {model}, built here from random weights with Mistral's real "
            "tokenizer.\nThe pipeline is real; the weights are random, so the words are noise.",
            border_style="cyan",
        )
    )
    started = time.perf_counter()
    timings: dict[str, float] = {}
    with render.steps(transient=True) as bar:
        task = bar.add_task("building", total=None, detail="")
        stage_start: list[object] = [time.perf_counter(), ""]

        def finish_stage(now: float) -> None:
            if stage_start[1]:
                seconds = now - float(stage_start[0])  # type: ignore[arg-type]
                timings[str(stage_start[1])] = seconds
                bar.console.print(f"[green]✓[/] {stage_start[1]} [dim]{seconds:.1f} s[/]")

        def on_stage(stage: builtin.Stage) -> None:
            now = time.perf_counter()
            finish_stage(now)
            stage_start[:] = [now, stage.name]
            verb = "reusing" if stage.reused else stage.name
            bar.update(task, description=f"{verb} {stage.detail}".strip(), completed=0, total=None)

        def on_progress(event: object) -> None:
            total = getattr(event, "total", None)
            bar.update(task, completed=getattr(event, "index", 0), total=total)

        manifest = builtin.build(model, threads=threads, on_stage=on_stage, on_progress=on_progress)
        finish_stage(time.perf_counter())
    err.print(f"[green]✓[/] {manifest.ref} in the store ({render.human_size(manifest.size)})")

    results = _bench(manifest, threads)
    cost = _quant_cost(manifest, threads)
    _, stats = _chat(manifest, threads, max_tokens)
    _summary(manifest, timings, results, cost, stats, time.perf_counter() - started)


def _bench(manifest: object, threads: int | None) -> list[object]:
    from localmix.bench import report
    from localmix.bench.params import BenchParams
    from localmix.bench.run import run
    from localmix.cli import render

    params = BenchParams(
        n_prompt=(256,),
        n_gen=(64,),
        repetitions=3,
        n_threads=(threads,) if threads else (),
    )
    with render.steps(transient=True) as bar:
        task = bar.add_task("benchmarking", total=None, detail="")

        def show(event: object) -> None:
            bar.update(
                task,
                completed=getattr(event, "index", 0) - 1,
                total=getattr(event, "total", None),
                detail=f"{getattr(event, 'test', '')} {getattr(event, 'stage', '')}",
            )

        results = run([manifest.file], params, progress=show)  # type: ignore[attr-defined]
    render.console().print(report.table(results))
    return list(results)


def _quant_cost(manifest: object, threads: int | None) -> str:
    """`localmix eval` in miniature: the Q4_K_M file against the model's F16 file (built here
    too) over 4 chunks of the shipped text; one line of llama-perplexity's numbers."""
    from localmix.build.synth import builtin
    from localmix.cli import render
    from localmix.quality.evaluate import EvalSettings, evaluate

    name = manifest.name  # type: ignore[attr-defined]
    with render.steps(transient=True) as bar:
        task = bar.add_task("what Q4_K_M costs", total=None, detail="")

        def show(event: object) -> None:
            total = getattr(event, "total", None)
            done = getattr(event, "done", None)
            done = getattr(event, "index", 0) if done is None else done
            bar.update(task, completed=done, total=total or None)

        builtin.build(name, "F16", threads=threads, on_progress=show)
        result = evaluate(
            manifest.file,  # type: ignore[attr-defined]
            f"{name}:F16",
            settings=EvalSettings(max_chunks=4, threads=threads),
            progress=show,
        )
    s = result.scores
    line = (
        f"PPL ratio {s.ppl_ratio:.4f} · mean KLD {s.kld_mean:.4f} · "
        f"same top token {100 * s.same_top:.1f}% ({s.n_tokens} tokens)"
    )
    render.console().print(f"\n[bold]Q4_K_M against F16:[/] {line}")
    return line


def _chat(manifest: object, threads: int | None, max_tokens: int) -> tuple[str, object]:
    from localmix import load
    from localmix.chat.session import Session
    from localmix.cli import render
    from localmix.llama.engine import Chunk, Sampling, Stats

    console = render.console()
    console.print(f"\n[bold]>>> {DEMO_PROMPT}[/]")
    settings = load.LoadSettings(ctx=1024, threads=threads)
    parts: list[str] = []
    stats: Stats | None = None
    with load.open_model(manifest.file, settings) as loaded:  # type: ignore[attr-defined]
        session = Session(
            loaded.engine,
            manifest.chat_format,  # type: ignore[attr-defined]
            sampling=Sampling(seed=42),
            max_tokens=max_tokens,
        )
        for item in session.send(DEMO_PROMPT):
            if isinstance(item, Chunk):
                parts.append(item.text)
                console.print(item.text, end="", markup=False, highlight=False)
            elif isinstance(item, Stats):
                stats = item
    console.print()
    if stats is not None:
        console.print(render.stats_line(stats), style="dim")
    return "".join(parts), stats


def _summary(
    manifest: object,
    timings: dict[str, float],
    results: list[object],
    cost: str,
    stats: object,
    total_s: float,
) -> None:
    from rich.table import Table

    from localmix.cli import render

    table = Table(title="demo summary", box=None, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("model", f"{manifest.ref}  {render.human_size(manifest.size)}")  # type: ignore[attr-defined]
    table.add_row("file", manifest.path)  # type: ignore[attr-defined]
    for stage, seconds in timings.items():
        table.add_row(stage, f"{seconds:.1f} s")
    for result in results:
        table.add_row(
            result.test,  # type: ignore[attr-defined]
            f"{result.avg_ts:.1f} ± {result.stddev_ts:.1f} t/s",  # type: ignore[attr-defined]
        )
    table.add_row("vs F16", cost)
    if stats is not None:
        table.add_row("chat", render.stats_line(stats))
    table.add_row("total", f"{total_s:.1f} s")
    table.add_row(
        "next",
        f"localmix chat {manifest.name}  ·  localmix bench {manifest.name}  ·  "  # type: ignore[attr-defined]
        f"localmix eval {manifest.name}  ·  localmix serve {manifest.name}",  # type: ignore[attr-defined]
    )
    render.console().print()
    render.console().print(table)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
