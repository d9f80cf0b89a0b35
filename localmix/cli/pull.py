"""pull / import: models from the Hub or from disk into the store, with rich progress on stderr."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from localmix.cli.options import ChatFormatOpt, ImatrixOpt, JsonOpt

if TYPE_CHECKING:
    from localmix.models.store import Manifest

NameArg = Annotated[
    str,
    typer.Argument(
        help="NAME[:QUANT]: a catalog name (mistral, mixtral:q5_k_m), hf.co/ORG/REPO[:QUANT] "
        "for a repo of GGUF files, or ORG/REPO for a checkpoint to convert and quantize.",
        metavar="NAME[:QUANT]",
    ),
]


def _done(manifest: Manifest, verb: str) -> None:
    from localmix.cli import render

    where = "" if manifest.owned else f" (in place: {manifest.path})"
    render.console().print(
        f"{verb} [bold]{manifest.ref}[/] — {render.human_size(manifest.size)}{where}",
        highlight=False,
    )
    render.err_console().print(f"[dim]try: localmix chat {manifest.name}[/]", highlight=False)


def pull_command(
    name: NameArg,
    quant: Annotated[
        Optional[str],  # noqa: UP045 - typer needs Optional at runtime on 3.10
        typer.Option("--quant", "-q", help="Quantization to fetch or make (default Q4_K_M)."),
    ] = None,
    revision: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--revision", help="Branch, tag or commit of the Hub repo (default main)."),
    ] = None,
    from_source: Annotated[
        bool,
        typer.Option(
            "--from-source", help="Convert the original checkpoint even where a GGUF exists."
        ),
    ] = False,
    keep_source: Annotated[
        bool,
        typer.Option(
            "--keep-source",
            help="Keep the downloaded checkpoint and the F16 GGUF (registered as NAME:F16).",
        ),
    ] = False,
    offline: Annotated[
        bool, typer.Option("--offline", help="Use only the local Hugging Face cache.")
    ] = False,
    imatrix: ImatrixOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Download a model from the Hugging Face Hub (resumable, sha256-verified) into the store."""
    from localmix.cli import render
    from localmix.cli.progress_view import ProgressView
    from localmix.models import pull

    with ProgressView() as view:
        manifest = pull.pull(
            name,
            quant=quant,
            revision=revision,
            from_source=from_source,
            keep_source=keep_source,
            offline=offline,
            imatrix=imatrix,
            progress=view,
        )
    if json_out:
        render.print_json(manifest.to_json())
        return
    _done(manifest, "pulled")


def import_command(
    path: Annotated[Path, typer.Argument(help="A .gguf file (the first shard of a split one).")],
    name: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--name", "-n", help="Store name (default: from the file name)."),
    ] = None,
    copy: Annotated[
        bool, typer.Option("--copy", help="Copy the file into the store instead of referencing it.")
    ] = False,
    chat_format: ChatFormatOpt = None,
    mmproj: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            "--mmproj",
            metavar="FILE",
            dir_okay=False,
            help="The model's vision tower (its mmproj GGUF), kept with it: chats see images.",
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Register a GGUF file on disk (validated first); chats remember its --format and --mmproj."""
    from localmix.cli import render
    from localmix.models import pull

    manifest = pull.import_gguf(path, name=name, copy=copy, chat_format=chat_format, mmproj=mmproj)
    if json_out:
        render.print_json(manifest.to_json())
        return
    _done(manifest, "imported")


def register(app: typer.Typer) -> None:
    app.command("pull")(pull_command)
    app.command("import")(import_command)
