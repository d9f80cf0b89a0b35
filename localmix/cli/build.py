"""convert / quantize / synth: building GGUF files, with progress."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from localmix.cli.options import ImatrixOpt, OutputOpt, QuantOpt, ThreadsOpt
from localmix.errors import UsageError

_NAME_HINT = "give a .gguf path or a name from `localmix list`"


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

    out = output or Path.cwd() / f"{src.resolve().name}.{outtype.upper()}.gguf"
    with render.steps() as bar:
        tasks: list[object] = []  # the bar appears with the first tensor, after the input checks

        def show(event: object) -> None:
            if not tasks:
                tasks.append(bar.add_task("converting", total=None, detail=""))
            bar.update(
                tasks[0],  # type: ignore[arg-type]
                completed=event.index,  # type: ignore[attr-defined]
                total=event.total,  # type: ignore[attr-defined]
                detail=event.tensor_name,  # type: ignore[attr-defined]
            )

        path = convert(src, out, outtype=outtype.lower(), progress=show)
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
    from localmix.build.imatrix.compute import ImatrixEvent
    from localmix.cli import render

    kind = q.quant_type(qtype, imatrix=imatrix is not None)
    with render.steps() as bar:
        # a bar per stage, each appearing with its first event, after the input checks
        tasks: dict[str, object] = {}

        def show(event: q.QuantizeEvent | ImatrixEvent) -> None:
            if isinstance(event, ImatrixEvent):
                if "imatrix" not in tasks:
                    tasks["imatrix"] = bar.add_task("computing the importance matrix", detail="")
                bar.update(tasks["imatrix"], completed=event.chunk, total=event.total)  # type: ignore[arg-type]
                return
            if "quantize" not in tasks:
                tasks["quantize"] = bar.add_task(
                    f"quantizing to {kind.name}", total=None, detail=""
                )
            bar.update(
                tasks["quantize"],  # type: ignore[arg-type]
                completed=event.index,
                total=event.total,
                detail=event.tensor,
            )

        path = Path(src)
        if not src.strip():
            raise UsageError("no model given: the name or path is empty", hint=_NAME_HINT)
        if path.suffix == ".gguf" or path.exists():
            out = output or path.with_name(f"{path.stem.rsplit('.', 1)[0]}.{kind.name}.gguf")
            result = q.quantize(
                path,
                out,
                kind.name,
                threads=threads,
                progress=show,
                allow_requantize=allow_requantize,
                imatrix=imatrix,
            )
        else:
            manifest = q.quantize_model(
                src,
                kind.name,
                threads=threads,
                progress=show,
                allow_requantize=allow_requantize,
                imatrix=imatrix,
                on_wait=render.waiting(src),
            )
            result = manifest.file
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
