"""The offload plan as a table, for `chat --estimate` and `bench --estimate`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

if TYPE_CHECKING:
    from localmix.llama.offload import Plan

# Options chat and bench share; both pass them to offload.estimate_for.
EstimateOpt = Annotated[
    bool,
    typer.Option(
        "--estimate", help="Print the memory plan (per tensor group and device) and exit."
    ),
]
VramBudgetOpt = Annotated[
    Optional[str],  # noqa: UP045 - typer needs Optional at runtime on 3.10
    typer.Option(
        "--vram-budget",
        metavar="SIZE",
        help="Plan as if the GPU had this much memory, e.g. 24GiB.",
    ),
]
NglOpt = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(
        "-ngl",
        "--n-gpu-layers",
        min=-1,
        help="Layers on the GPU (-1: all; default: as many as fit where there is a GPU, "
        "planned from its free memory; none on a CPU-only machine).",
    ),
]
CpuMoeOpt = Annotated[
    bool, typer.Option("--cpu-moe", "-cmoe", help="Keep all the experts (MoE weights) on the CPU.")
]
NCpuMoeOpt = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(
        "--n-cpu-moe",
        "-ncmoe",
        min=0,
        metavar="N",
        help="Keep the experts of the first N layers on the CPU.",
    ),
]


def cpu_moe_layers(all_experts: bool, first_n: int | None) -> int | None:
    """llama.cpp's two options as one number: --cpu-moe is every layer, --n-cpu-moe N the first N."""
    from localmix.errors import UsageError
    from localmix.load import ALL_LAYERS

    if all_experts and first_n is not None:
        raise UsageError(
            "--cpu-moe and --n-cpu-moe both say where the experts go",
            hint="give one: --cpu-moe for every layer, --n-cpu-moe N for the first N",
        )
    return ALL_LAYERS if all_experts else first_n


def plan_table(plan: Plan) -> Any:
    """Rows of (tensor group, device, bytes, detail), then per-device totals against the budget."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table

    from localmix.cli.render import human_size

    table = Table(box=None, header_style="bold")
    for column in ("GROUP", "DEVICE", "SIZE", "DETAIL"):
        table.add_column(column, justify="right" if column == "SIZE" else "left")
    order = {name: i for i, name in enumerate((plan.gpu_device, "CPU"))}
    for row in sorted(plan.rows, key=lambda r: order.get(r.device, 9)):
        table.add_row(row.group, row.device, human_size(row.n_bytes), row.detail)
    totals = Table(box=None, header_style="bold")
    for column in ("DEVICE", "PLANNED", "BUDGET"):
        totals.add_column(column, justify="left" if column == "DEVICE" else "right")
    budget = plan.budget
    for device, n_bytes in sorted(plan.totals.items(), key=lambda kv: order.get(kv[0], 9)):
        limit = budget.gpu_bytes if device == plan.gpu_device else budget.ram_bytes
        shared = " (unified, shared)" if budget.unified and device == "CPU" else ""
        totals.add_row(device, human_size(n_bytes), human_size(limit) + shared)
    settings = (
        f"n_gpu_layers {plan.n_gpu_layers}  ctx {plan.n_ctx}  KV {plan.type_k}/{plan.type_v}  "
        f"flash-attn {plan.flash_attn}"
    )
    parts: list[Any] = [f"[bold]{escape(plan.summary)}[/]", table, "", totals, "", settings]
    parts += [escape(f"override: {p} -> {b}") for p, b in plan.tensor_overrides]
    parts += [escape(f"note: {note}") for note in plan.notes]
    if not plan.fits:
        parts.append("[yellow]does not fit:[/] llama.cpp may fail to allocate")
    return Group(*parts)
