"""bench: llama-bench's tests and formats on localmix's engine; roofline, chat, history, plot."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from localmix.cli.plan import CpuMoeOpt, EstimateOpt, NCpuMoeOpt, VramBudgetOpt, cpu_moe_layers

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from localmix.bench.params import BenchParams
    from localmix.bench.result import BenchResult
    from localmix.models.store import Located

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
) -> None:
    """Measure tokens/s the way llama-bench does: pp (prompt) and tg (generation), mean ± std."""
    from localmix.bench import params as bp
    from localmix.bench.report import FORMATS
    from localmix.errors import UsageError

    if output is not None and output not in FORMATS:
        raise UsageError(f"-o: unknown format {output!r}", hint=f"use one of {', '.join(FORMATS)}")
    sweep: dict[str, object] = {"repetitions": repetitions, "warmup": warmup}
    for name, values, parse in (
        ("n_prompt", n_prompt, lambda v: bp.parse_ints(v, name="-p")),
        ("n_gen", n_gen, lambda v: bp.parse_ints(v, name="-n")),
        ("n_pg", n_pg, bp.parse_pairs),
        ("n_depth", n_depth, lambda v: bp.parse_ints(v, name="-d")),
        ("n_threads", threads, lambda v: bp.parse_ints(v, name="-t")),
        (
            "n_gpu_layers",
            n_gpu_layers,
            lambda v: bp.parse_ints(v, name="-ngl", allow_negative=True),
        ),
        ("n_batch", n_batch, lambda v: bp.parse_ints(v, name="-b")),
        ("n_ubatch", n_ubatch, lambda v: bp.parse_ints(v, name="-ub")),
        ("flash_attn", flash_attn, lambda v: bp.parse_words(v, name="-fa")),
        ("type_k", cache_type_k, lambda v: bp.parse_words(v, name="-ctk")),
        ("type_v", cache_type_v, lambda v: bp.parse_words(v, name="-ctv")),
        ("repack", repack, lambda v: bp.parse_switches(v, name="--repack")),
    ):
        if values:
            sweep[name] = parse(values)
    params = bp.BenchParams(**sweep)  # type: ignore[arg-type]
    from localmix import load

    targets = [load.locate(name) for name in models]  # each name walked once
    formats = {t.path: t.chat_format for t in targets}
    names = {str(t.path): t.name for t in targets}  # rows say which model they measured
    moe = cpu_moe_layers(cpu_moe, n_cpu_moe)
    planned = _planned(targets, params, estimate, vram_budget, moe, explicit_ngl=bool(n_gpu_layers))
    if estimate:
        return
    for group, group_params in planned:
        if chat:
            _chat(group, formats, group_params, output)
        else:
            _bench(group, group_params, names, output=output, compare=compare, plot=plot,
                   save=save)  # fmt: skip


def _planned(
    targets: list[Located],
    params: BenchParams,
    estimate: bool,
    vram_budget: str | None,
    cpu_moe: int | None,
    *,
    explicit_ngl: bool,
) -> list[tuple[list[Path], BenchParams]]:
    """Apply the offload plan per model where the door's rule (load.plan_for) makes one.

    Without a plan, all models share one sweep, like llama-bench; with one, each model gets its
    own GPU layers and expert overrides.
    """
    import dataclasses

    from localmix import load
    from localmix.cli import render
    from localmix.cli.plan import plan_table

    n_ctx = max(p + g for p in params.n_prompt for g in params.n_gen) + max(params.n_depth)
    settings = load.LoadSettings(
        ctx=max(n_ctx, 256),
        n_gpu_layers=params.n_gpu_layers[0] if explicit_ngl else None,
        vram_budget=vram_budget,
        cpu_moe=cpu_moe,
        n_ubatch=params.n_ubatch[0],
        flash_attn=params.flash_attn[0],
        type_k=params.type_k[0],
        type_v=params.type_v[0],
    )
    if not estimate:
        for notice in load.notices(settings):
            render.err_console().print(f"note: {notice}", style="dim", markup=False)
    shared: list[Path] = []
    groups: list[tuple[list[Path], BenchParams]] = []
    for target in targets:
        path = target.path
        # a context past the model's fails here, before the bar (in a sweep it is a typo)
        load.check(target, settings, beyond_trained=False)
        plan = load.plan_for(target, settings, force=estimate)
        if estimate and plan is not None:
            render.console().print(f"[bold]{path.name}[/]")
            render.console().print(plan_table(plan))
        elif plan is None:
            shared.append(path)
        else:
            planned = dataclasses.replace(
                params, n_gpu_layers=(plan.n_gpu_layers,), tensor_overrides=plan.tensor_overrides
            )
            groups.append(([path], planned))
    return ([(shared, params)] if shared else []) + groups


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
    _notes(results, output)


def _notes(results: list[BenchResult], output: str | None) -> None:
    """What the numbers need beside them: refused combinations, and spreads too wide to trust;
    exits non-zero (after printing everything) when llama.cpp refused a combination."""
    from localmix.bench.result import NOISY_PCT
    from localmix.cli import render
    from localmix.errors import EngineError

    err = render.err_console()
    failed = [r for r in results if r.error]
    for reason in dict.fromkeys(r.error for r in failed):  # one line per reason, not per row
        which = [r for r in failed if r.error == reason]
        settings = {f"fa={r.flash_attn} ctk={r.type_k} ctv={r.type_v}" for r in which}
        err.print(f"{', '.join(sorted(settings))}: {reason}", markup=False, highlight=False)
    noisy = sum(r.noisy for r in results)
    if noisy:
        err.print(
            f"note: {noisy} result(s) vary by more than {NOISY_PCT:g}% between repetitions; "
            "more -r, fewer threads than cores or a quieter machine steadies them",
            style="dim",
        )
    if failed:
        v_quant = any(
            r.type_v not in ("f16", "f32", "bf16") and r.flash_attn != "on" for r in failed
        )
        raise EngineError(
            f"llama.cpp refused {len(failed)} of {len(results)} tests; the others ran",
            hint="a quantized V cache (-ctv) needs flash attention (-fa on)"
            if v_quant
            else "the reason is printed above",
        )


def _chat(paths: list[Path], formats: dict[Path, str | None], params: BenchParams,
          output: str | None) -> None:  # fmt: skip
    from localmix.bench import report
    from localmix.bench.chat import run_chat
    from localmix.cli import render

    max_tokens = params.n_gen[0] if params.n_gen and params.n_gen[0] > 0 else 128
    with render.err_console().status("chat bench") as status:
        results = run_chat(
            paths, params, chat_formats=formats, max_tokens=max_tokens,
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
