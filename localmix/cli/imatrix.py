"""imatrix: an importance matrix (llama-imatrix's GGUF format) computed from a model and a text."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from localmix.cli.options import JsonOpt, ModelArg, OutputOpt, RepackOpt, ThreadsOpt
from localmix.cli.plan import NglOpt

TextOpt = Annotated[
    Optional[Path],  # noqa: UP045 - typer needs Optional at runtime on 3.10
    typer.Option(
        "--text",
        "-f",
        help="UTF-8 text to calibrate on (default: the Python Language Reference, shipped).",
    ),
]
ChunksOpt = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option("--chunks", min=1, help="Run at most N chunks (default: all the text holds)."),
]
ChunkSizeOpt = Annotated[
    int,
    typer.Option("--chunk-size", "-c", min=16, help="Tokens per chunk (llama-imatrix's -c)."),
]


def imatrix_command(
    model: ModelArg,
    text: TextOpt = None,
    output: OutputOpt = None,
    chunks: ChunksOpt = None,
    chunk_size: ChunkSizeOpt = 512,
    threads: ThreadsOpt = None,
    n_gpu_layers: NglOpt = None,
    repack: RepackOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Compute an importance matrix for the 1-3 bit quant types, as llama-imatrix does.

    A store model's goes next to it, where `localmix quantize MODEL -q IQ2_XS --imatrix auto`
    finds it; a .gguf file's goes beside the file (FILE.imatrix.gguf)."""
    from localmix.build.imatrix import compute as calibration
    from localmix.cli import render
    from localmix.cli.progress_view import ProgressView
    from localmix.load import LoadSettings

    settings = LoadSettings(threads=threads, n_gpu_layers=n_gpu_layers, repack=repack)
    with ProgressView() as view:
        result = calibration.compute(
            model,
            text=text,
            out=output,
            chunk_size=chunk_size,
            chunks=chunks,
            settings=settings,
            progress=view,
        )
    if json_out:
        render.print_json(result)
        return
    console = render.err_console()
    for name in result.partial:
        console.print(f"note: some experts of {name} saw no token of this text", style="dim")
    console.print(
        f"wrote {result.path} ({result.entries} weights, {result.chunks} chunks of "
        f"{result.chunk_size} tokens, {result.seconds:.1f} s)",
        highlight=False,
        soft_wrap=True,
    )


def register(app: typer.Typer) -> None:
    app.command("imatrix")(imatrix_command)
