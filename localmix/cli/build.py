"""convert / quantize / synth: building GGUF files, with progress."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from localmix.cli.options import ImatrixOpt, OutputOpt, QuantOpt, ThreadsOpt


def convert_command(
    src: Annotated[Path, typer.Argument(help="Checkpoint directory (HF or Mistral-native).")],
    output: OutputOpt = None,
    outtype: Annotated[
        str, typer.Option("--outtype", help="f16, bf16, f32 or q8_0.", case_sensitive=False)
    ] = "f16",
) -> None:
    """Convert a Hugging Face or Mistral-native checkpoint to GGUF (streaming, bounded memory)."""
    from localmix.build.convert import convert
    from localmix.cli import render
    from localmix.cli.progress_view import ProgressView

    out = output or Path.cwd() / f"{src.resolve().name}.{outtype.upper()}.gguf"
    with ProgressView() as view:  # bars appear with the first tensor, after the input checks
        path = convert(src, out, outtype=outtype.lower(), progress=view)
    render.err_console().print(f"wrote {path} ({render.human_size(path.stat().st_size)})")


def quantize_command(
    src: Annotated[str, typer.Argument(help="A GGUF file, or a model in the store.")],
    output: OutputOpt = None,
    qtype: QuantOpt = "Q4_K_M",
    threads: ThreadsOpt = None,
    allow_requantize: Annotated[
        bool,
        typer.Option(
            "--allow-requantize",
            help="Quantize an already-quantized file or store model (quality is lost twice).",
        ),
    ] = False,
    imatrix: ImatrixOpt = None,
) -> None:
    """Quantize a GGUF file (or a store model) with llama.cpp, Q4_K_M by default."""
    from localmix.build import quantize as q
    from localmix.cli import render
    from localmix.cli.progress_view import ProgressView

    q.quant_type(qtype, imatrix=imatrix is not None)  # a bad type is said before any bar
    # bars appear with the work (an importance matrix first, if --imatrix auto needs one)
    with ProgressView() as view:
        result = q.quantize_any(
            src, qtype, output, threads=threads, progress=view, allow_requantize=allow_requantize,
            imatrix=imatrix, on_wait=render.waiting(src),
        )  # fmt: skip
    render.err_console().print(f"wrote {result} ({render.human_size(result.stat().st_size)})")


def synth_command(
    out: Annotated[Path, typer.Argument(help="Directory for the checkpoint.")],
    arch: Annotated[str, typer.Option(help="mistral, mixtral or ministral3.")] = "mistral",
    size: Annotated[str, typer.Option(help="tiny, small, 125m or 1b.")] = "tiny",
    tokenizer: Annotated[str, typer.Option(help="v1, v3 or tekken.")] = "v1",
    layout: Annotated[str, typer.Option(help="hf or mistral (native).")] = "hf",
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Random seed.")] = 0,
) -> None:
    """Write a random-weight checkpoint with a real Mistral tokenizer (for demos and tests)."""
    from localmix.build.synth.checkpoints import checkpoint
    from localmix.cli import render

    # A 1b checkpoint takes tens of seconds: say what is happening while it is written.
    with render.err_console().status(f"writing a random-weight {arch} {size} checkpoint"):
        path = checkpoint(out, arch=arch, size=size, tokenizer=tokenizer, layout=layout, seed=seed)
    render.err_console().print(f"wrote {arch} {size} checkpoint to {path}")


def register(app: typer.Typer) -> None:
    app.command("convert")(convert_command)
    app.command("quantize")(quantize_command)
    app.command("synth")(synth_command)
