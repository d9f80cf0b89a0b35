"""Which models share one llama-bench sweep and which get their own offload plan.

Without a plan (no GPU, or -ngl given), all models share one sweep, as llama-bench runs them; a
model the door's rule (load.plan_for) plans gets its own GPU layers and expert overrides.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from localmix.bench.params import BenchParams

if TYPE_CHECKING:
    from localmix.llama.offload import Plan
    from localmix.load import LoadSettings
    from localmix.models.store import Located


@dataclass(frozen=True)
class Group:
    """Models benched with the same parameters; plan is the offload plan that set them."""

    paths: list[Path]
    params: BenchParams
    plan: Plan | None = None


def load_settings(
    params: BenchParams,
    *,
    explicit_ngl: bool,
    vram_budget: str | None = None,
    cpu_moe: int | None = None,
) -> LoadSettings:
    """The load settings a plan is made for: the sweep's largest context and first values."""
    from localmix import load

    n_ctx = max(p + g for p in params.n_prompt for g in params.n_gen) + max(params.n_depth)
    return load.LoadSettings(
        ctx=max(n_ctx, 256),
        n_gpu_layers=params.n_gpu_layers[0] if explicit_ngl else None,
        vram_budget=vram_budget,
        cpu_moe=cpu_moe,
        n_ubatch=params.n_ubatch[0],
        flash_attn=params.flash_attn[0],
        type_k=params.type_k[0],
        type_v=params.type_v[0],
        rpc=params.rpc,
    )


def groups(
    targets: list[Located], params: BenchParams, settings: LoadSettings, *, force: bool = False
) -> list[Group]:
    """The shared sweep (if any model has no plan) first, then one group per planned model;
    force plans every model (for --estimate). A context past a model's is an error here, before
    anything runs (in a sweep it is a typo)."""
    from localmix import load

    shared: list[Path] = []
    planned: list[Group] = []
    for target in targets:
        load.check(target, settings, beyond_trained=False)
        plan = load.plan_for(target, settings, force=force)
        if plan is None:
            shared.append(target.path)
            continue
        own = dataclasses.replace(
            params, n_gpu_layers=(plan.n_gpu_layers,), tensor_overrides=plan.tensor_overrides
        )
        planned.append(Group([target.path], own, plan))
    return ([Group(shared, params)] if shared else []) + planned
