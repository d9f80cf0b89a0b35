"""list / show / rm / du: the store, seen from the terminal."""

from __future__ import annotations

from typing import Annotated

import typer

from localmix.cli.options import JsonOpt, ModelArg


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
    from localmix.models import store

    shown = store.show(name)
    if json_out:
        render.print_json(shown.to_json())
        return
    render.console().print(render.show_panel(shown.manifest, shown.info))


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
