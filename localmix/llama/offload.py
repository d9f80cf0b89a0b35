"""The fit plan: which tensors go on the GPU, from the GGUF's tensor table alone (no weights read).

Memory per device = weights placed there + the KV cache of its layers + its compute buffer.
Placement follows llama.cpp's rules: token_embd always stays on the CPU; `n_gpu_layers = k`
puts the last k-1 repeating layers and the output layer on the GPU; tensor buffer overrides
move matching tensors (the MoE experts, `ffn_*_exps`) to the CPU buffer type. A shared expert
(`ffn_*_shexp`, Mistral Small 4) is read by every token and stays with attention. Latent attention
(MLA) caches one compressed K row per token per layer and no V.

The plan tries, fastest first: everything on the GPU; for MoE models, the experts of the first
N layers on the CPU with attention, norms, router and KV on the GPU (llama.cpp's --n-cpu-moe),
smallest N that fits; the most GPU layers that fit; the CPU alone. Nothing fits: DoesNotFit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localmix.errors import DoesNotFit, UsageError
from localmix.sizes import GIB, MIB, human_size, parse_size

if TYPE_CHECKING:
    from localmix.gguffile import GGUFInfo, TensorInfo
    from localmix.llama.hardware import Hardware

CPU = "CPU"
# CUDA context, cuBLAS workspaces and allocator fragmentation that no tensor accounts for.
GPU_HEADROOM = 512 * MIB
# llama.cpp pads the KV cache to a multiple of 256 cells (llama-context.cpp).
KV_PADDING = 256
EXPERT_PATTERN = r"ffn_(up|down|gate|gate_up)_(ch|)exps"
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Budget:
    """The memory a plan may use, in bytes. gpu_bytes 0 means no usable GPU."""

    gpu_bytes: int
    ram_bytes: int
    gpu_name: str = "GPU"  # the device label in the plan ("CUDA0", "Metal")
    unified: bool = False  # GPU memory is system RAM: GPU + CPU parts share ram_bytes
    headroom: int = GPU_HEADROOM

    @classmethod
    def apple(cls, ram_total: int) -> Budget:
        """An Apple Silicon Mac with ram_total bytes: Metal's working set bounds the GPU part."""
        from localmix.llama.hardware import recommended_working_set

        os_reserve = max(2 * GIB, ram_total // 10)
        return cls(
            gpu_bytes=recommended_working_set(ram_total),
            ram_bytes=ram_total - os_reserve,
            gpu_name="Metal",
            unified=True,
            headroom=256 * MIB,
        )


@dataclass(frozen=True)
class PlanRow:
    group: str  # token_embd, output, attention, norms, router, experts, ffn, KV cache, compute...
    device: str
    n_bytes: int
    detail: str = ""


@dataclass(frozen=True)
class Plan:
    """Where each tensor group goes, what it costs per device, and the EngineConfig it implies."""

    strategy: str  # "gpu" | "cpu-moe" | "layers" | "cpu" | "manual"
    summary: str
    n_gpu_layers: int  # EngineConfig.n_gpu_layers: -1 all, 0 none
    cpu_moe: int  # experts of layers 0..cpu_moe-1 on the CPU
    tensor_overrides: tuple[tuple[str, str], ...]
    n_ctx: int
    type_k: str
    type_v: str
    flash_attn: str
    n_ubatch: int
    gpu_device: str | None
    budget: Budget
    rows: tuple[PlanRow, ...]
    fits: bool
    notes: tuple[str, ...] = ()

    def total(self, device: str) -> int:
        """Planned bytes on a device ("CPU" or the GPU's name)."""
        return sum(r.n_bytes for r in self.rows if r.device == device)

    @property
    def totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.device] = out.get(r.device, 0) + r.n_bytes
        return out

    @property
    def gpu_bytes(self) -> int:
        return self.total(self.gpu_device) if self.gpu_device else 0

    def engine_fields(self) -> dict[str, Any]:
        """Keyword arguments for dataclasses.replace(EngineConfig, ...)."""
        return {
            "n_gpu_layers": self.n_gpu_layers,
            "tensor_overrides": self.tensor_overrides,
            "n_ctx": self.n_ctx,
            "type_k": self.type_k,
            "type_v": self.type_v,
            "flash_attn": self.flash_attn,
        }


@dataclass(frozen=True)
class Shape:
    """The hyper-parameters the estimate needs, read from GGUF metadata and the tensor table."""

    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_ff: int
    n_vocab: int
    n_expert: int
    n_expert_used: int
    context_length: int
    tied_output: bool = field(default=False)
    # MLA (Mistral Small 4, DeepSeek): the cache holds one compressed K row per token and no V
    kv_has_v: bool = field(default=True)

    @classmethod
    def of(cls, info: GGUFInfo) -> Shape:
        def key(name: str, default: Any = 0) -> int:
            value = info.key(name, default)
            if isinstance(value, (list, tuple)):  # per-layer values: the largest decides
                value = max(value) if value else default
            return int(value or default)

        n_embd, n_head = key("embedding_length"), key("attention.head_count", 1)
        n_head_kv = key("attention.head_count_kv", n_head)
        head_dim = key("attention.key_length", n_embd // max(n_head, 1))
        names = {t.name: t for t in info.tensors}
        embd = names.get("token_embd.weight")
        n_vocab = embd.shape[1] if embd and len(embd.shape) > 1 else 0
        return cls(
            n_layer=key("block_count"),
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim_k=head_dim,
            head_dim_v=key("attention.value_length", head_dim),
            n_ff=key("expert_feed_forward_length") or key("feed_forward_length"),
            n_vocab=n_vocab,
            n_expert=key("expert_count"),
            n_expert_used=key("expert_used_count"),
            context_length=key("context_length"),
            tied_output="output.weight" not in names,
            kv_has_v=not is_mla(info),
        )


def is_mla(info: GGUFInfo) -> bool:
    """Multi-head latent attention: llama.cpp then keeps no V cache (llama-kv-cache.cpp) and
    attends over the compressed K row (key_length = kv_lora_rank + rope dims, one KV head)."""
    return bool(info.key("attention.key_length_mla") and info.key("attention.value_length_mla"))


def kv_bytes_per_element(type_name: str) -> float:
    """Bytes per KV cache element for a cache type (f16, q8_0, ...), quant blocks included."""
    import gguf

    try:
        qtype = gguf.GGMLQuantizationType[type_name.upper()]
    except KeyError as exc:
        raise UsageError(
            f"unknown KV cache type {type_name!r}", hint="use f16, bf16, f32, q8_0, q5_1, q4_0"
        ) from exc
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return size / block


def group_of(name: str) -> tuple[str, int | None]:
    """A tensor's group for the plan table and its layer (None outside the repeating blocks)."""
    if name.startswith("token_embd"):
        return "token_embd", None
    if name.startswith(("output.", "output_norm.")):
        return "output", None
    match = _BLOCK.match(name)
    if not match:
        return "other", None
    layer, rest = int(match[1]), match[2]
    if rest.endswith("norm.weight") or rest.endswith("norm.bias"):
        return "norms", layer
    if rest.startswith("attn_"):
        return "attention", layer
    if rest.startswith(("ffn_gate_inp", "exp_probs_b")):
        return "router", layer
    if re.match(EXPERT_PATTERN, rest):
        return "experts", layer
    if re.match(r"ffn_(up|down|gate)_shexp", rest):
        return "shared expert", layer  # read by every token: stays beside attention
    if rest.startswith("ffn_"):
        return "ffn", layer
    return "other", layer


def cpu_moe_overrides(n_layers: int) -> tuple[tuple[str, str], ...]:
    """Tensor overrides that keep the experts of layers 0..n_layers-1 on the CPU."""
    if n_layers <= 0:
        return ()
    layers = "|".join(str(i) for i in range(n_layers))
    return ((rf"^blk\.({layers})\.{EXPERT_PATTERN}", CPU),)


@dataclass(frozen=True)
class _Placement:
    ngl: int  # 0..n_layer+1, llama.cpp's meaning (n_layer+1 = everything)
    cpu_moe: int


def _layer_on_gpu(layer: int, shape: Shape, ngl: int) -> bool:
    # llama.cpp: i_gpu_start = n_layer + 1 - ngl; the output layer has index n_layer.
    return layer >= shape.n_layer + 1 - ngl


def _compute_bytes(shape: Shape, n_kv: int, n_ubatch: int, flash: bool, logits: bool) -> int:
    """One device's compute buffer for a ubatch, in bytes (ggml's allocator reuses memory, so the
    peak is the largest of attention, FFN and logits, plus the residual stream):
      attention: FA: n_ubatch*n_head*head_dim*4*2; without FA the f32 KQ scores n_kv*n_ubatch*n_head*4
      FFN:       n_ubatch*n_ff*n_expert_used*4*3 (gate, up and their product)
      logits:    n_ubatch*n_vocab*4 on the device of the output layer
      residual:  n_ubatch*n_embd*4*4"""
    f32 = 4
    attention = n_ubatch * shape.n_head * shape.head_dim_v * f32 * 2
    if not flash:
        attention += n_kv * n_ubatch * shape.n_head * f32
    ffn = n_ubatch * shape.n_ff * max(shape.n_expert_used, 1) * f32 * 3
    output = n_ubatch * shape.n_vocab * f32 if logits else 0
    return max(attention, ffn, output) + n_ubatch * shape.n_embd * f32 * 4


class _Estimator:
    """Rows per device for any placement of one model at one context size."""

    def __init__(
        self,
        shape: Shape,
        tensors: Sequence[TensorInfo],
        *,
        n_ctx: int,
        type_k: str,
        type_v: str,
        n_ubatch: int,
        flash: bool,
        gpu_name: str,
    ) -> None:
        self.shape = shape
        self.tensors = [(t, *group_of(t.name)) for t in tensors]
        self.n_kv = -(-n_ctx // KV_PADDING) * KV_PADDING
        self.n_ubatch = min(n_ubatch, n_ctx)
        self.flash = flash
        self.gpu = gpu_name
        v_bytes = shape.head_dim_v * kv_bytes_per_element(type_v) if shape.kv_has_v else 0
        per_cell = shape.n_head_kv * (shape.head_dim_k * kv_bytes_per_element(type_k) + v_bytes)
        self.kv_layer = int(self.n_kv * per_cell)

    def device(self, group: str, layer: int | None, p: _Placement) -> str:
        if group == "token_embd" or (group == "other" and layer is None):
            return CPU  # llama.cpp keeps the input layer on the CPU
        index = self.shape.n_layer if layer is None else layer
        if not _layer_on_gpu(index, self.shape, p.ngl):
            return CPU
        if group == "experts" and layer is not None and layer < p.cpu_moe:
            return CPU
        return self.gpu

    def rows(self, p: _Placement) -> list[PlanRow]:
        sums: dict[tuple[str, str], list[int]] = {}
        largest_cpu = 0
        for tensor, group, layer in self.tensors:
            device = self.device(group, layer, p)
            entry = sums.setdefault((group, device), [0])
            entry[0] += tensor.n_bytes
            if layer is not None:
                entry.append(layer)
                if device == CPU:
                    largest_cpu = max(largest_cpu, tensor.n_bytes)
        if self.shape.tied_output:
            embd = sum(t.n_bytes for t, g, _ in self.tensors if g == "token_embd")
            device = self.device("output", None, p)
            sums.setdefault(("output", device), [0])[0] += embd  # llama.cpp duplicates it
        rows = [
            PlanRow(group, device, values[0], _layer_span(values[1:]))
            for (group, device), values in sums.items()
        ]
        on_gpu = [i for i in range(self.shape.n_layer) if _layer_on_gpu(i, self.shape, p.ngl)]
        kv = {self.gpu: len(on_gpu), CPU: self.shape.n_layer - len(on_gpu)}
        for device, layers in kv.items():
            if layers:
                detail = f"{self.n_kv} cells x {layers} layers"
                rows.append(PlanRow("KV cache", device, self.kv_layer * layers, detail))
        output_on_gpu = _layer_on_gpu(self.shape.n_layer, self.shape, p.ngl)
        cpu_layers = self.shape.n_layer - len(on_gpu)
        if on_gpu or output_on_gpu:
            gpu = _compute_bytes(self.shape, self.n_kv, self.n_ubatch, self.flash, output_on_gpu)
            # Big batches run CPU-resident weights on the GPU by copying them over, one at a time.
            gpu += largest_cpu
            rows.append(PlanRow("compute buffer", self.gpu, gpu, f"ubatch {self.n_ubatch}"))
        embd_rows = self.n_ubatch * self.shape.n_embd * 4 * 2  # inputs and host copies
        cpu = embd_rows
        if cpu_layers or not output_on_gpu:
            cpu = _compute_bytes(
                self.shape, self.n_kv, self.n_ubatch, self.flash, not output_on_gpu
            )
        rows.append(PlanRow("compute buffer", CPU, cpu, f"ubatch {self.n_ubatch}"))
        return rows


def _layer_span(layers: Iterable[int]) -> str:
    unique = sorted(set(layers))
    if not unique:
        return ""
    if unique == list(range(unique[0], unique[-1] + 1)):
        return f"layer {unique[0]}" if len(unique) == 1 else f"layers {unique[0]}-{unique[-1]}"
    return f"{len(unique)} layers"


def _fits(rows: Sequence[PlanRow], budget: Budget, gpu: str) -> bool:
    gpu_total = sum(r.n_bytes for r in rows if r.device == gpu)
    cpu_total = sum(r.n_bytes for r in rows if r.device == CPU)
    if gpu_total > budget.gpu_bytes:  # the reserve row is part of gpu_total
        return False
    if budget.unified:
        return gpu_total + cpu_total <= budget.ram_bytes
    return cpu_total <= budget.ram_bytes


def _with_headroom(rows: list[PlanRow], budget: Budget, gpu: str) -> list[PlanRow]:
    if any(r.device == gpu for r in rows):
        rows.append(PlanRow("reserve", gpu, budget.headroom, "driver, fragmentation"))
    return rows


def _candidates(shape: Shape, has_gpu: bool) -> Iterable[tuple[str, _Placement]]:
    """Placements, fastest first."""
    full = shape.n_layer + 1
    if has_gpu:
        yield "gpu", _Placement(full, 0)
        if shape.n_expert > 1:
            for n in range(1, shape.n_layer + 1):
                yield "cpu-moe", _Placement(full, n)
        for k in range(shape.n_layer, 0, -1):
            yield "layers", _Placement(k, 0)
    yield "cpu", _Placement(0, 0)


def _summary(strategy: str, p: _Placement, shape: Shape, gpu: str) -> str:
    if strategy == "cpu" or p.ngl == 0:
        return "everything on the CPU"
    layers = min(p.ngl, shape.n_layer + 1) - 1
    text = (
        f"all {shape.n_layer} layers and the output on {gpu}"
        if layers >= shape.n_layer
        else f"{layers} of {shape.n_layer} layers and the output on {gpu}, the rest on the CPU"
    )
    if p.cpu_moe:
        last = min(p.cpu_moe, shape.n_layer) - 1
        span = "layer 0" if last == 0 else f"layers 0-{last}"
        text += f"; the experts of {span} on the CPU"
    return text


def _first_fit(
    estimator: _Estimator,
    budget: Budget,
    choices: Iterable[tuple[str, _Placement]],
    accept_any: bool,
) -> tuple[str, _Placement, list[PlanRow], bool] | None:
    for strategy, placement in choices:
        rows = _with_headroom(estimator.rows(placement), budget, estimator.gpu)
        fits = _fits(rows, budget, estimator.gpu)
        if fits or accept_any:
            return strategy, placement, rows, fits
    return None


def plan(
    info: GGUFInfo,
    *,
    budget: Budget,
    n_ctx: int = 4096,
    type_k: str = "f16",
    type_v: str = "f16",
    n_ubatch: int = 512,
    flash_attn: str = "auto",
    ngl: int | None = None,
    cpu_moe: int | None = None,
) -> Plan:
    """The fastest placement of the model that fits the budget; n_ctx 0 = the trained context.

    ngl (-1 = all) and cpu_moe force a placement instead of searching; the plan then says
    whether it fits rather than raising. Raises DoesNotFit when no placement fits.
    """
    shape = Shape.of(info)
    n_ctx = n_ctx or shape.context_length or 4096
    if kv_bytes_per_element(type_v) < 2 and flash_attn == "off":
        raise UsageError(
            f"a {type_v} V cache needs flash attention", hint="drop --flash-attn off, or use f16"
        )
    gpu = budget.gpu_name if budget.gpu_bytes > 0 else None
    estimator = _Estimator(
        shape,
        info.tensors,
        n_ctx=n_ctx,
        type_k=type_k,
        type_v=type_v,
        n_ubatch=n_ubatch,
        flash=flash_attn != "off",
        gpu_name=gpu or "GPU",
    )
    notes: list[str] = []
    manual = ngl is not None or cpu_moe is not None
    if manual:
        full = shape.n_layer + 1
        layers = full if ngl is None or ngl < 0 else min(ngl, full)
        if gpu is None and layers:
            notes.append("no GPU: -ngl and --cpu-moe have nothing to offload to")
            layers = 0
        choices: Iterable[tuple[str, _Placement]] = [
            ("manual", _Placement(layers, max(0, min(cpu_moe or 0, shape.n_layer))))
        ]
    else:
        choices = _candidates(shape, gpu is not None)
    found = _first_fit(estimator, budget, choices, accept_any=manual)
    if found is None:
        raise _does_not_fit(info, shape, estimator, budget, n_ctx, type_k, type_v)
    strategy, placement, rows, fits = found
    if not fits:
        notes.append("this placement does not fit the memory budget; loading may fail")
    if gpu is None and not manual:
        notes.append("no GPU budget: running on the CPU")
    if strategy in ("cpu-moe", "layers") and "q8_0" not in (type_k, type_v):
        q8 = _Estimator(
            shape, info.tensors, n_ctx=n_ctx, type_k="q8_0", type_v="q8_0", n_ubatch=n_ubatch,
            flash=True, gpu_name=estimator.gpu,
        )  # fmt: skip
        if _fits(
            _with_headroom(q8.rows(_Placement(shape.n_layer + 1, 0)), budget, q8.gpu),
            budget,
            q8.gpu,
        ):
            notes.append(f"a q8_0 KV cache would fit everything on {q8.gpu}")
    full = placement.ngl > shape.n_layer
    return Plan(
        strategy=strategy,
        summary=_summary(strategy, placement, shape, estimator.gpu),
        n_gpu_layers=-1 if full else placement.ngl,
        cpu_moe=placement.cpu_moe,
        tensor_overrides=cpu_moe_overrides(placement.cpu_moe) if placement.ngl else (),
        n_ctx=n_ctx,
        type_k=type_k,
        type_v=type_v,
        flash_attn=flash_attn,
        n_ubatch=n_ubatch,
        gpu_device=gpu,
        budget=budget,
        rows=tuple(rows),
        fits=fits,
        notes=tuple(notes),
    )


def _does_not_fit(
    info: GGUFInfo,
    shape: Shape,
    estimator: _Estimator,
    budget: Budget,
    n_ctx: int,
    type_k: str,
    type_v: str,
) -> DoesNotFit:
    weights = sum(t.n_bytes for t in info.tensors)
    kv = estimator.kv_layer * shape.n_layer
    compute = _compute_bytes(shape, estimator.n_kv, estimator.n_ubatch, estimator.flash, True)
    need = weights + kv + compute
    if budget.unified:
        usable, where = budget.ram_bytes, f"{human_size(budget.ram_bytes)} of unified memory"
    elif budget.gpu_bytes:
        gpu = max(0, budget.gpu_bytes - budget.headroom)
        usable = gpu + budget.ram_bytes
        where = f"{human_size(gpu)} on {budget.gpu_name} + {human_size(budget.ram_bytes)} of RAM"
    else:
        usable, where = budget.ram_bytes, f"{human_size(budget.ram_bytes)} of RAM"
    ways = []
    spare = usable - kv - compute
    if spare > 0 and weights > spare:
        ways.append(f"a quant about {100 * (1 - spare / weights):.0f}% smaller than this one")
    if n_ctx > 4096:
        short = _Estimator(
            shape, [], n_ctx=4096, type_k=type_k, type_v=type_v, n_ubatch=512,
            flash=estimator.flash, gpu_name=estimator.gpu,
        )  # fmt: skip
        ways.append(f"--ctx 4096 (KV cache {human_size(short.kv_layer * shape.n_layer)})")
    if kv_bytes_per_element(type_k) >= 2 or kv_bytes_per_element(type_v) >= 2:
        q8 = _Estimator(
            shape, [], n_ctx=n_ctx, type_k="q8_0", type_v="q8_0", n_ubatch=512,
            flash=True, gpu_name=estimator.gpu,
        )  # fmt: skip
        ways.append(f"a q8_0 KV cache (KV cache {human_size(q8.kv_layer * shape.n_layer)})")
    return DoesNotFit(
        f"{info.name} needs about {human_size(need)} (weights {human_size(weights)}, KV cache {human_size(kv)} "
        f"at {n_ctx} tokens, compute {human_size(compute)}) but only {where} is usable",
        hint="ways out: " + "; ".join(ways or ["a machine with more memory"]),
    )


def budget_for(hardware: Hardware, vram_budget: int | str | None = None) -> Budget:
    """The budget of this machine: its largest GPU's free memory (or vram_budget bytes) and RAM."""
    gpus = sorted(hardware.gpus, key=lambda d: d.free_bytes, reverse=True)
    name = gpus[0].name if gpus else "GPU"
    gpu_bytes = gpus[0].free_bytes if gpus else 0
    if vram_budget is not None:
        gpu_bytes = parse_size(vram_budget) if isinstance(vram_budget, str) else int(vram_budget)
    if hardware.unified_memory:
        base = Budget.apple(hardware.ram_total)
        return Budget(
            gpu_bytes=gpu_bytes, ram_bytes=base.ram_bytes, gpu_name=name, unified=True,
            headroom=base.headroom,
        )  # fmt: skip
    return Budget(gpu_bytes=gpu_bytes, ram_bytes=hardware.ram_available, gpu_name=name)


def estimate_for(
    path: Path | str,
    *,
    n_ctx: int = 4096,
    type_k: str = "f16",
    type_v: str = "f16",
    n_ubatch: int = 512,
    flash_attn: str = "auto",
    vram_budget: int | str | None = None,
    ngl: int | None = None,
    cpu_moe: int | None = None,
    hardware: Hardware | None = None,
    info: GGUFInfo | None = None,
) -> Plan:
    """The plan for a GGUF file on this machine (reads the header unless given it; probes the
    hardware unless given it)."""
    from localmix import gguffile
    from localmix.llama.hardware import probe

    info = info or gguffile.inspect(path)
    machine = hardware or probe(bandwidth=False)
    budget = budget_for(machine, vram_budget)
    result = plan(
        info,
        budget=budget,
        n_ctx=n_ctx,
        type_k=type_k,
        type_v=type_v,
        n_ubatch=n_ubatch,
        flash_attn=flash_attn,
        ngl=ngl,
        cpu_moe=cpu_moe,
    )
    if vram_budget is not None and not machine.gpus:
        notes = (*result.notes, "rehearsal: this llama.cpp build has no GPU to run the plan on")
        result = _replace(result, notes=notes)
    return result


def _replace(result: Plan, **changes: Any) -> Plan:
    import dataclasses

    return dataclasses.replace(result, **changes)
