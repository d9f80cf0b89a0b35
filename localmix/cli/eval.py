"""eval: what a quant costs — perplexity, KL divergence and same top token against a reference,
as llama-perplexity --kl-divergence reports them; with --quants, a table over several quants."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from localmix.cli.options import JsonOpt, ModelArg, RepackOpt, RpcOpt, ThreadsOpt, rpc_endpoints
from localmix.cli.plan import NglOpt

DEFAULT_CTX = 512  # quality.evaluate.DEFAULT_CTX, repeated so --help needs no import

AgainstOpt = Annotated[
    Optional[str],  # noqa: UP045 - typer needs Optional at runtime on 3.10
    typer.Option(
        "--against",
        metavar="MODEL",
        help="Reference: a store name or .gguf path (default: the store's F32/BF16/F16, "
        "else Q8_0, file of the same model).",
    ),
]
TextOpt = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option(
        "--text", "-f", help="UTF-8 text to measure on (default: the Python Language Reference)."
    ),
]
CtxOpt = Annotated[
    int,
    typer.Option(
        "--ctx", "-c", help="Tokens per chunk; the second half of each is scored (llama's -c)."
    ),
]
ChunksOpt = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option("--chunks", help="Score at most this many chunks (a quick answer)."),
]
QuantsOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--quants",
        "-q",
        metavar="LIST",
        help="Comma list (Q4_K_M,Q5_K_M,Q8_0): a table over these quants of MODEL; "
        "missing ones are made from its full-precision file.",
    ),
]


def eval_command(
    model: ModelArg,
    against: AgainstOpt = None,
    text: TextOpt = None,
    ctx: CtxOpt = DEFAULT_CTX,
    chunks: ChunksOpt = None,
    quants: QuantsOpt = None,
    threads: ThreadsOpt = None,
    n_gpu_layers: NglOpt = None,
    repack: RepackOpt = None,
    rpc: RpcOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Measure what a quant loses: PPL ratio, KL divergence and same top token against a reference.

    The numbers of llama-perplexity --kl-divergence, over its chunks, without its base-logits
    file: the model and its reference run side by side, one chunk at a time."""
    from localmix import corpus
    from localmix.quality.evaluate import EvalSettings

    settings = EvalSettings(
        n_ctx=ctx, max_chunks=chunks, threads=threads, n_gpu_layers=n_gpu_layers, repack=repack,
        rpc=rpc_endpoints(rpc),
    )  # fmt: skip
    source = corpus.read(text)
    if quants is not None:
        _table(model, quants.split(","), against, source, settings, json_out)
    else:
        _single(model, against, source, settings, json_out)


def _single(model: str, against: str | None, text: Any, settings: Any, json_out: bool) -> None:
    from localmix.cli import render
    from localmix.cli.progress_view import ProgressView
    from localmix.quality import report
    from localmix.quality.evaluate import evaluate

    with ProgressView(transient=True) as view:
        evaluation = evaluate(model, against, text, settings, progress=view)
    if json_out:
        render.print_json(evaluation)
        return
    render.console().print(
        report.heading(evaluation), markup=False, highlight=False, soft_wrap=True
    )
    render.print_table(report.scores_table(evaluation))


def _table(
    model: str, quants: list[str], against: str | None, text: Any, settings: Any, json_out: bool
) -> None:
    from localmix.cli import render
    from localmix.cli.progress_view import ProgressView
    from localmix.quality import report
    from localmix.quality.quants import quant_table

    with ProgressView(transient=True) as view:
        table = quant_table(model, quants, against, text, settings, progress=view)
    if json_out:
        render.print_json(table)
        return
    out = render.console()
    out.print(report.table_heading(table), markup=False, highlight=False, soft_wrap=True)
    render.print_table(report.quants_table(table))
    out.print()
    out.print(report.plot(table), markup=False, highlight=False, end="")


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
