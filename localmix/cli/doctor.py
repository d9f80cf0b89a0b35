"""doctor: what this machine and this llama.cpp build offer a model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from localmix.cli.options import DoctorRpcOpt, JsonOpt

if TYPE_CHECKING:
    from localmix.errors import WorkerError
    from localmix.llama.hardware import Hardware
    from localmix.llama.rpc import Worker


def doctor_command(json: JsonOpt = False, rpc: DoctorRpcOpt = None) -> None:
    """Show llama.cpp's backends and devices, free memory, threads, RAM and bandwidth, and RPC.

    Whether this build has llama.cpp's RPC backend, and with --rpc (or LOCALMIX_RPC) each
    worker it can reach: its protocol and devices' memory, or why not (exit 7)."""
    from localmix.cli import render
    from localmix.cli.options import rpc_endpoints
    from localmix.llama import hardware

    machine = hardware.probe()
    backend = rpc_backend()
    workers = probe_workers(rpc_endpoints(rpc))
    if json:
        from dataclasses import asdict

        from localmix import load

        found = [
            {"endpoint": e, "error": w.message, "hint": w.hint}
            if isinstance(w, Exception)
            else asdict(w)
            for e, w in workers
        ]
        rpc_info = {**backend, "workers": found}
        render.print_json(
            {**asdict(machine), "repack": load.repack_choice(amx=machine.amx), "rpc": rpc_info}
        )
        _fail_if_unreachable(workers)
        return
    render.console().print(doctor_table(machine, backend))
    if workers:
        render.console().print()
        render.console().print(workers_table(workers))
    if machine.rebuild_command:
        render.err_console().print(
            f"[yellow]hint:[/] this llama.cpp build cannot use the {machine.gpu_hardware} GPU; "
            "rebuild it with:",
            soft_wrap=True,
        )
        render.console().print(machine.rebuild_command, soft_wrap=True, markup=False)
    _fail_if_unreachable(workers)


def rpc_backend() -> dict[str, Any]:
    """Whether this build has llama.cpp's RPC backend (without building it): where it is, or
    how it comes (the first `worker` / --rpc builds it, else an RPC install)."""
    from localmix.llama import rpc_plugin

    kind, path = rpc_plugin.available()
    if kind == "wheel":
        said = f"yes: the wheel's {path}"
    elif kind == "plug-in":
        said = f"yes: the plug-in built from the pinned llama-cpp-python source, {path}"
    else:
        said = (
            "not built yet: the first `localmix worker` or --rpc builds it (g++, the pinned "
            "llama-cpp-python source that pip fetches once); without a compiler or the network, "
            + rpc_plugin.reinstall_hint()
        )
    return {"backend": kind, "path": str(path) if path else None, "summary": said}


def probe_workers(endpoints: tuple[str, ...]) -> list[tuple[str, Worker | WorkerError]]:
    """Each worker's probe (protocol, devices' memory), or the error that says why not."""
    from localmix.errors import WorkerError
    from localmix.llama import rpc

    found: list[tuple[str, Worker | WorkerError]] = []
    for endpoint in endpoints:
        try:
            found.append((endpoint, rpc.probe(endpoint)))
        except WorkerError as exc:
            found.append((endpoint, exc))
    return found


def workers_table(workers: list[tuple[str, Worker | WorkerError]]) -> Any:
    """One row per device of each worker (its protocol, free and total memory), or its error."""
    from rich.table import Table

    from localmix.cli.render import human_size

    table = Table(box=None, header_style="bold")
    for column in ("RPC WORKER", "PROTOCOL", "DEVICE", "FREE", "TOTAL"):
        table.add_column(column, justify="right" if column in ("FREE", "TOTAL") else "left")
    for endpoint, worker in workers:
        if isinstance(worker, Exception):
            hint = f" ({worker.hint})" if worker.hint else ""
            table.add_row(endpoint, "error", f"{worker.message}{hint}", "", "")
            continue
        for index, (free, total) in enumerate(
            zip(worker.free_bytes, worker.total_bytes, strict=True)
        ):
            table.add_row(
                endpoint if index == 0 else "", worker.version if index == 0 else "",
                str(index), human_size(free), human_size(total),
            )  # fmt: skip
    return table


def _fail_if_unreachable(workers: list[tuple[str, Worker | WorkerError]]) -> None:
    """After everything is shown: exit as a WorkerError when a worker could not be reached."""
    from localmix.errors import WorkerError

    bad = [e for e, w in workers if isinstance(w, WorkerError)]
    if bad:
        raise WorkerError(
            f"{len(bad)} of {len(workers)} RPC workers cannot be used: {', '.join(bad)}",
            hint="see each one's error above",
        )


def doctor_table(machine: Hardware, rpc: dict[str, Any] | None = None) -> Any:
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
        *([("RPC", rpc["summary"])] if rpc else []),
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
