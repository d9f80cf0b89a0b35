"""list / show / rm / du: the store, seen from the terminal."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from localmix.cli.options import JsonOpt, ModelArg

if TYPE_CHECKING:
    from localmix.gguffile import GGUFInfo
    from localmix.models.store import Manifest


def list_command(
    json_out: JsonOpt = False,
    available: Annotated[
        bool, typer.Option("--available", "-a", help="Show the catalog instead of the store.")
    ] = False,
) -> None:
    """List installed models (or, with --available, the catalog)."""
    from localmix.cli import render
    from localmix.models import catalog, store

    if available:
        specs = list(catalog.load().models.values())
        if json_out:
            render.print_json(specs)
            return
        render.console().print(render.catalog_table(specs))
        return
    models = store.list_models()
    if json_out:
        render.print_json([m.to_json() for m in models])
        return
    if not models:
        render.err_console().print(
            "no models yet: try `localmix demo`, or `localmix pull mistral`", style="dim"
        )
        return
    render.print_table(render.models_table(models))


def show_command(name: ModelArg, json_out: JsonOpt = False) -> None:
    """Show a model's architecture, size, quant, context, tensor types, chat format and source."""
    from localmix.cli import render
    from localmix.gguffile import inspect
    from localmix.models import store

    if Path(name).expanduser().suffix == ".gguf" or Path(name).expanduser().is_file():
        target = store.locate(name)  # a file outside the store: validated there
        info = target.info
        manifest = _unregistered(target.path, info)
    else:
        manifest = store.get(name)
        info = inspect(manifest.file)
    if json_out:
        render.print_json(
            {
                "manifest": manifest.to_json(),
                "architecture": info.architecture,
                "parameters": info.n_params,
                "context_length": info.context_length,
                "block_count": info.block_count,
                "expert_count": info.expert_count,
                "file_size": info.file_size,
                "quant": info.quant,
                "tensor_types": info.type_histogram(),
            }
        )
        return
    render.console().print(render.show_panel(manifest, info))


def _unregistered(path: Path, info: GGUFInfo) -> Manifest:
    """What `show` says about a GGUF file that is not in the store."""
    from localmix.models.pull import chat_format_of
    from localmix.models.store import Manifest

    return Manifest(
        name=path.name,
        quant=info.quant,
        path=str(path),
        size=info.file_size,
        sha256="(not computed for a file outside the store)",
        architecture=info.architecture,
        chat_format=chat_format_of(info),
        context_length=info.context_length,
        parameters=info.n_params,
        source=f"path:{path}",
        created=0.0,
        owned=False,
    )


def rm_command(
    name: ModelArg,
    purge_cache: Annotated[
        bool,
        typer.Option("--purge-cache", help="Also delete its files from the shared HF cache."),
    ] = False,
) -> None:
    """Remove a model (all its quants unless NAME:QUANT) and the files localmix owns.

    A file registered by reference (`import` without --copy, a GGUF in the HF cache) stays;
    --purge-cache also deletes HF cache files no other model of this store uses."""
    from localmix.cli import render
    from localmix.models import store

    removed = store.remove(name, on_wait=render.waiting(name))
    if purge_cache:
        from localmix.models import hub

        for manifest in removed:
            hub.purge(manifest)
    for manifest in removed:
        render.err_console().print(f"removed {manifest.ref}")


def du_command(json_out: JsonOpt = False) -> None:
    """Disk used by the store: owned files, referenced files, leftovers, free space."""
    from localmix.cli import render
    from localmix.models import store

    usage = store.du()
    if json_out:
        render.print_json(usage)
        return
    render.console().print(render.usage_table(usage))


def register(app: typer.Typer) -> None:
    app.command("list")(list_command)
    app.command("show")(show_command)
    app.command("rm")(rm_command)
    app.command("du")(du_command)
