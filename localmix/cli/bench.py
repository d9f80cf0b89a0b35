"""bench: llama-bench's tests and formats on localmix's engine; roofline, chat, history, plot."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from localmix.cli.options import BenchRpcOpt
from localmix.cli.plan import CpuMoeOpt, EstimateOpt, NCpuMoeOpt, VramBudgetOpt, cpu_moe_layers

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from localmix.bench.params import BenchParams
    from localmix.bench.result import BenchResult

_LIST = "Comma list or range (1-8, 1-8+2, 1-16*2); repeatable."
Ints = Optional[list[str]]  # noqa: UP045 - typer reads Optional at runtime on 3.10

ModelsArg = Annotated[
    list[str],
    typer.Argument(help="Models: store names (mistral, tiny-mixtral:Q4_K_M) or .gguf paths."),
]
PromptOpt = Annotated[Ints, typer.Option("-p", "--n-prompt", help=f"Prompt tokens (pp). {_LIST}")]
GenOpt = Annotated[Ints, typer.Option("-n", "--n-gen", help=f"Generated tokens (tg). {_LIST}")]
PgOpt = Annotated[
    Ints, typer.Option("-pg", help="A prompt then generation, timed together: pp,tg; repeatable.")
]
DepthOpt = Annotated[
    Ints, typer.Option("-d", "--n-depth", help=f"Tokens already in the context. {_LIST}")
]
RepsOpt = Annotated[
    int, typer.Option("-r", "--repetitions", min=1, help="Repetitions of each test.")
]
ThreadsOpt = Annotated[Ints, typer.Option("-t", "--threads", help=f"CPU threads. {_LIST}")]
NglListOpt = Annotated[
    Ints, typer.Option("-ngl", "--n-gpu-layers", help=f"Layers on the GPU (-1: all). {_LIST}")
]
BatchOpt = Annotated[Ints, typer.Option("-b", "--batch-size", help=f"Logical batch. {_LIST}")]
UbatchOpt = Annotated[Ints, typer.Option("-ub", "--ubatch-size", help=f"Physical batch. {_LIST}")]
FaOpt = Annotated[Ints, typer.Option("-fa", "--flash-attn", help="Flash attention: on, off, auto.")]
CtkOpt = Annotated[
    Ints, typer.Option("-ctk", "--cache-type-k", help="K cache type: f16, q8_0, ...")
]
RepackOpt = Annotated[
    Ints,
    typer.Option(
        "--repack",
        help="Repack weights for the CPU: 0, 1 or 0,1 (default: localmix's rule, "
        "`localmix doctor`).",
    ),
]
CtvOpt = Annotated[
    Ints, typer.Option("-ctv", "--cache-type-v", help="V cache type: f16, q8_0, ...")
]
FormatOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "-o", "--output", help="Print llama-bench's md, csv, json or jsonl instead of the table."
    ),
]
ChatOpt = Annotated[
    bool,
    typer.Option("--chat", help="Measure a chat turn: time to first token, t/s with sampling."),
]
CompareOpt = Annotated[
    bool,
    typer.Option("--compare", help="Compare with earlier runs of the same model and settings."),
]
PlotOpt = Annotated[bool, typer.Option("--plot", help="Plot t/s over the swept setting.")]
WarmupOpt = Annotated[bool, typer.Option("--warmup/--no-warmup", help="Run a warmup first.")]
SaveOpt = Annotated[
    bool, typer.Option("--save/--no-save", help="Record the results in the bench history.")
]


def bench_command(
    models: ModelsArg,
    n_prompt: PromptOpt = None,
    n_gen: GenOpt = None,
    n_pg: PgOpt = None,
    n_depth: DepthOpt = None,
    repetitions: RepsOpt = 5,
    threads: ThreadsOpt = None,
    n_gpu_layers: NglListOpt = None,
    n_batch: BatchOpt = None,
    n_ubatch: UbatchOpt = None,
    flash_attn: FaOpt = None,
    cache_type_k: CtkOpt = None,
    cache_type_v: CtvOpt = None,
    repack: RepackOpt = None,
    output: FormatOpt = None,
    chat: ChatOpt = False,
    compare: CompareOpt = False,
    plot: PlotOpt = False,
    warmup: WarmupOpt = True,
    save: SaveOpt = True,
    estimate: EstimateOpt = False,
    vram_budget: VramBudgetOpt = None,
    cpu_moe: CpuMoeOpt = False,
    n_cpu_moe: NCpuMoeOpt = None,
    rpc: BenchRpcOpt = None,
) -> None:
    """Measure tokens/s the way llama-bench does: pp (prompt) and tg (generation), mean ± std."""
    from localmix import load
    from localmix.bench import plan as bench_plan
    from localmix.bench.params import from_options
    from localmix.bench.report import FORMATS
    from localmix.cli import render
    from localmix.cli.options import rpc_endpoints
    from localmix.cli.plan import plan_table
    from localmix.errors import UsageError

    if output is not None and output not in FORMATS:
        raise UsageError(f"-o: unknown format {output!r}", hint=f"use one of {', '.join(FORMATS)}")
    options = {
        "-p": n_prompt, "-n": n_gen, "-pg": n_pg, "-d": n_depth, "-t": threads,
        "-ngl": n_gpu_layers, "-b": n_batch, "-ub": n_ubatch, "-fa": flash_attn,
        "-ctk": cache_type_k, "-ctv": cache_type_v, "--repack": repack,
    }  # fmt: skip
    params = from_options(options, repetitions=repetitions, warmup=warmup, rpc=rpc_endpoints(rpc))
    targets = [load.locate(name) for name in models]  # each name walked once
    settings = bench_plan.load_settings(
        params, explicit_ngl=bool(n_gpu_layers), vram_budget=vram_budget,
        cpu_moe=cpu_moe_layers(cpu_moe, n_cpu_moe),
    )  # fmt: skip
    if not estimate:
        for notice in load.notices(settings):
            render.err_console().print(f"note: {notice}", style="dim", markup=False)
    groups = bench_plan.groups(targets, params, settings, force=estimate)
    if estimate:
        for group in groups:
            assert group.plan is not None  # forced
            render.console().print(f"[bold]{group.paths[0].name}[/]")
            render.console().print(plan_table(group.plan))
        return
    formats = {t.path: t.chat_format for t in targets}
    names = {t.path: t.name for t in targets}
    labels = {str(path): name for path, name in names.items()}  # rows say which model they measured
    for group in groups:
        if chat:
            _chat(group.paths, formats, names, group.params, output)
        else:
            _bench(group.paths, group.params, labels, output=output, compare=compare, plot=plot,
                   save=save)  # fmt: skip


def _bench(paths: list[Path], params: BenchParams, names: dict[str, str], *,
           output: str | None, compare: bool, plot: bool, save: bool) -> None:  # fmt: skip
    from localmix.bench import history, report, roofline
    from localmix.bench.params import cases
    from localmix.bench.run import BenchEvent, run
    from localmix.cli import render

    total = len(cases(paths, params))
    with render.steps(transient=True) as bar:
        task = bar.add_task("bench", total=total, detail="")

        def progress(event: BenchEvent) -> None:
            step = f"{event.stage} {event.rep}/{event.reps}" if event.rep else event.stage
            bar.update(
                task,
                description=f"{event.model} {event.test}",
                detail=step,
                advance=1 if event.stage == "done" else 0,
            )

        results = run(paths, params, progress=progress)
    done = report.measured(results)
    comparisons = history.compare(done, history.load()) if compare else []
    if save:
        history.append(done)
    # With -o, stdout carries only llama-bench's format; the extras go to stderr.
    extras = render.err_console() if output else render.console()
    if output:
        sys.stdout.write(report.render(results, output))
        sys.stdout.flush()
    else:
        rooflines = [None if r.error else roofline.roofline(r) for r in results]
        _print_table(render.console(), report.table(results, rooflines, names))
    if plot:
        extras.print()
        extras.print(report.plot(results, names=names), markup=False, highlight=False, end="")
    if compare:
        extras.print()
        _print_table(extras, report.compare_table(comparisons, names))
    _notes(results)


def _notes(results: list[BenchResult]) -> None:
    """What the numbers need beside them: refused combinations, and spreads too wide to trust;
    exits non-zero (after printing everything) when llama.cpp refused a combination."""
    from localmix.bench import report
    from localmix.cli import render

    err = render.err_console()
    for line in report.refusals(results):  # one line per reason, not per row
        err.print(line, markup=False, highlight=False)
    noisy = report.noisy_note(results)
    if noisy:
        err.print(f"note: {noisy}", style="dim")
    refused = report.refused(results)
    if refused is not None:
        raise refused


def _chat(paths: list[Path], formats: dict[Path, str | None], names: dict[Path, str],
          params: BenchParams, output: str | None) -> None:  # fmt: skip
    from localmix.bench import report
    from localmix.bench.chat import run_chat
    from localmix.cli import render

    max_tokens = params.n_gen[0] if params.n_gen and params.n_gen[0] > 0 else 128
    with render.err_console().status("chat bench") as status:
        results = run_chat(
            paths, params, chat_formats=formats, names=names, max_tokens=max_tokens,
            progress=lambda text: status.update(text),
        )  # fmt: skip
    if output == "json":
        render.print_json([r.to_json() for r in results])
        return
    if output == "jsonl":
        import json

        sys.stdout.write("".join(json.dumps(r.to_json()) + "\n" for r in results))
        return
    _print_table(render.console(), report.chat_table(results))


def _print_table(console: Console, table: Table) -> None:
    """A table at its natural width: a pipe or a file gets whole rows, not 80-column wraps."""
    from rich.console import Console
    from rich.measure import Measurement

    if not console.is_terminal:
        wide = console.options.update_width(1000)
        width = max(console.width, Measurement.get(console, wide, table).maximum)
        console = Console(file=console.file, width=width, highlight=False, color_system=None)
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)
