"""doctor: what this machine and this llama.cpp build offer a model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from localmix.cli.options import JsonOpt

if TYPE_CHECKING:
    from localmix.llama.hardware import Hardware


def doctor_command(json: JsonOpt = False) -> None:
    """Show llama.cpp's backends and devices, free memory, threads, RAM and memory bandwidth."""
    from localmix.cli import render
    from localmix.llama import hardware

    machine = hardware.probe()
    if json:
        from dataclasses import asdict

        from localmix import load

        render.print_json({**asdict(machine), "repack": load.repack_choice(amx=machine.amx)})
        return
    render.console().print(doctor_table(machine))
    if machine.rebuild_command:
        render.err_console().print(
            f"[yellow]hint:[/] this llama.cpp build cannot use the {machine.gpu_hardware} GPU; "
            "rebuild it with:",
            soft_wrap=True,
        )
        render.console().print(machine.rebuild_command, soft_wrap=True, markup=False)


def doctor_table(machine: Hardware) -> Any:
    """The probe as a two-part table: the machine, then one row per device."""
    from rich.console import Group
    from rich.table import Table

    from localmix.cli.render import human_size

    facts = Table(box=None, show_header=False)
    facts.add_column(style="bold")
    facts.add_column()
    threads = f"{machine.threads_physical} physical, {machine.threads_logical} logical"
    ram = f"{human_size(machine.ram_available)} available of {human_size(machine.ram_total)}"
    rows = [
        ("system", f"{machine.system} {machine.machine}"),
        ("backends", ", ".join(machine.backends) or "none"),
        ("GPU offload", "yes" if machine.gpu_offload else "no (CPU-only build)"),
        ("CPU threads", threads),
        ("CPU features", " ".join(machine.cpu_features) or "-"),
        ("RAM", ram),
        ("bandwidth", f"{machine.bandwidth_gbs:.1f} GB/s (copy)" if machine.bandwidth_gbs else "-"),
    ]
    rows += _cpu_rule_rows(machine)
    if machine.apple_silicon:
        rows.append(("memory", "unified (Apple Silicon): the GPU shares RAM"))
    if machine.gpu_hardware:
        rows.append(("GPU hardware", machine.gpu_hardware))
    for name, value in rows:
        facts.add_row(name, value)
    devices = Table(box=None, header_style="bold")
    for column in ("DEVICE", "TYPE", "BACKEND", "DESCRIPTION", "FREE", "TOTAL", "BUFFER TYPE"):
        devices.add_column(column, justify="right" if column in ("FREE", "TOTAL") else "left")
    for d in machine.devices:
        devices.add_row(
            d.name,
            d.kind,
            d.backend,
            d.description,
            human_size(d.free_bytes),
            human_size(d.total_bytes),
            d.buffer_type,
        )
    return Group(facts, "", devices)


def _cpu_rule_rows(machine: Hardware) -> list[tuple[str, str]]:
    """AMX (build and CPU) and what localmix does about it: the door's CPU rule."""
    from localmix import load

    choice = load.repack_choice(amx=machine.amx)
    kinds = ", ".join(machine.extra_buffer_types) or "none in this build"
    return [
        ("AMX", machine.amx.summary),
        ("repacking", f"{'on' if choice.on else 'off'}: {choice.why}"),
        ("repack buffers", kinds),
    ]


def paths_command(json: JsonOpt = False) -> None:
    """Show where models, manifests, tmp, bench history, chats and the HF cache live."""
    from localmix import settings
    from localmix.cli import render

    places = settings.paths()
    if json:
        render.print_json({name.replace(" ", "_").lower(): path for name, path in places.items()})
        return
    table = _paths_table(places)
    render.print_table(table)


def _paths_table(places: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column(no_wrap=True)
    table.add_column(style="dim")
    for name, path in places.items():
        table.add_row(name, str(path), "" if path.exists() else "(not created yet)")
    return table


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor_command)
    app.command("paths")(paths_command)
