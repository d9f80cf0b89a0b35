"""The one door that opens a model: a name or path and the user's settings in, the loaded Engine
with its offload plan out. chat, bench, demo, the REPL's /model (and next, serve) all come
through here, so the plan rule, the CPU rule (weight repacking, kept off AMX kernels), the
context default and the C++-runtime fix for CUDA builds (llama.backend, reached through Engine)
are written once.

    with load.open_model("mistral", LoadSettings(ctx=8192)) as loaded:
        for item in loaded.engine.stream(tokens): ...
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from localmix.errors import UsageError

if TYPE_CHECKING:
    from types import TracebackType

    from localmix.llama.engine import Engine
    from localmix.llama.hardware import Amx, Hardware
    from localmix.llama.offload import Plan
    from localmix.llama.records import EngineConfig, MatMulTap
    from localmix.models.store import Located

DEFAULT_CTX = 4096
ALL_LAYERS = 1 << 20  # cpu_moe: every layer's experts (the plan clamps it to the model's layers)
# llama.cpp pads every context to a multiple of 256 tokens (llama-context.cpp): a smaller one
# would silently become 256, so it is refused instead.
MIN_CTX = 256
MAX_CTX = 2**32 - 1  # llama_context_params.n_ctx is a uint32


@dataclass(frozen=True)
class LoadSettings:
    """What a user can say about loading: None means "decide for me".

    ctx None is the default (4096, or the model's own context when smaller); 0 is the model's
    own. n_gpu_layers None lets the offload plan decide when a GPU is there (CPU otherwise);
    vram_budget or cpu_moe always ask for a plan."""

    ctx: int | None = None
    threads: int | None = None
    threads_batch: int | None = None
    n_gpu_layers: int | None = None
    vram_budget: str | None = None
    cpu_moe: int | None = None
    n_batch: int = 2048
    n_ubatch: int = 512
    flash_attn: str = "auto"
    type_k: str = "f16"
    type_v: str = "f16"
    tensor_overrides: tuple[tuple[str, str], ...] = ()
    verbose: bool = False
    # Weights repacked into the CPU's extra buffer types (llama.cpp's --repack / --no-repack);
    # None: LOCALMIX_REPACK, else the CPU rule (weight_repack).
    repack: bool | None = None
    # Sequences decoded together (serve): each gets a context of n_ctx() tokens, drawn from one
    # KV cache of parallel * n_ctx() cells.
    parallel: int = 1
    # llama.cpp RPC workers (HOST:PORT, `localmix worker`): all layers go to their devices and
    # the local GPUs unless n_gpu_layers keeps some here (the first ones, on the CPU).
    rpc: tuple[str, ...] = ()
    # the devices that take the offloaded layers, in order (llama.cpp's --device), and their
    # shares of them (--tensor-split)
    devices: tuple[str, ...] = ()
    tensor_split: tuple[float, ...] = ()

    def n_ctx(self, target: Located) -> int:
        """The context (per sequence) to load with: the asked size, else 4096 capped at the
        trained one."""
        if self.ctx is not None:
            return self.ctx
        trained = target.context_length
        return min(DEFAULT_CTX, trained) if trained > 0 else DEFAULT_CTX

    def kv_cells(self, target: Located) -> int:
        """The context llama.cpp is asked for: n_ctx() for one sequence (0: the model's own),
        parallel times the per-sequence context for several."""
        n_ctx = self.n_ctx(target)
        if self.parallel == 1:
            return n_ctx
        return (n_ctx or target.context_length) * self.parallel

    @property
    def asks_for_plan(self) -> bool:
        return self.vram_budget is not None or self.cpu_moe is not None


@dataclass
class Loaded:
    """A model opened through the door; closing it frees the engine (context manager).
    notices: what the user should know about how it was loaded (shown, not fatal)."""

    target: Located
    config: EngineConfig
    plan: Plan | None
    engine: Engine = field(repr=False)
    notices: tuple[str, ...] = ()

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> Loaded:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def locate(reference: str | Path | Located) -> Located:
    """A store name or .gguf path to the file a command loads (the walk of a name happens once)."""
    from localmix.models import store

    if isinstance(reference, store.Located):
        return reference
    return store.locate(str(reference))


def plan_for(
    target: Located,
    settings: LoadSettings,
    *,
    force: bool = False,
    hardware: Hardware | None = None,
) -> Plan | None:
    """The offload plan when it has something to decide, else None (the CPU, or the user's -ngl).

    The rule: a plan when asked (force, --vram-budget, --cpu-moe), or when a GPU is there and
    neither -ngl nor explicit tensor overrides were given."""
    from localmix.llama import offload
    from localmix.llama.hardware import probe

    asked = force or settings.asks_for_plan
    if settings.rpc or settings.devices:
        if asked:
            raise UsageError(
                "the offload plan (--vram-budget, --cpu-moe, --estimate) does not place layers "
                "on RPC workers or chosen devices yet",
                hint="place them with -ngl (layers offloaded; the rest stay on this CPU)",
            )
        return None  # placed on the devices llama.cpp is given: the plan knows only this machine
    if not asked and (settings.n_gpu_layers is not None or settings.tensor_overrides):
        return None  # the user placed the model: nothing to plan, no hardware probe
    machine = hardware or probe(bandwidth=False)
    if not asked and not machine.gpus:
        return None
    return offload.estimate_for(
        target.path,
        n_ctx=settings.kv_cells(target) or target.context_length,
        type_k=settings.type_k,
        type_v=settings.type_v,
        n_ubatch=settings.n_ubatch,
        flash_attn=settings.flash_attn,
        vram_budget=settings.vram_budget,
        ngl=settings.n_gpu_layers,
        cpu_moe=settings.cpu_moe,
        hardware=machine,
        info=target.info,
    )


def check(target: Located, settings: LoadSettings, *, beyond_trained: bool = True) -> None:
    """Refuse, before llama.cpp sees them, a damaged file (InvalidGGUF) and numbers it would
    abort or hang on: threads past the machine, a context under 256 or whose KV cache is larger
    than this machine's memory. A context past the trained one is llama.cpp's choice to allow
    (a notice says so); beyond_trained False refuses it (bench sweeps, where it is a typo)."""
    from localmix import settings as app_settings

    target.info  # noqa: B018 - reads and validates the whole header, once, before any load
    for count, flag in (
        (settings.threads, "--threads"),
        (settings.threads_batch, "--threads-batch"),
    ):
        if count is not None:
            app_settings.check_threads(count, flag)
    for size, flag in ((settings.n_batch, "batch size"), (settings.n_ubatch, "micro-batch size")):
        if not 1 <= size <= MAX_CTX:
            raise UsageError(f"the {flag} must be between 1 and {MAX_CTX}, not {size}")
    n_ctx = settings.n_ctx(target)
    if n_ctx == 0:
        n_ctx = target.context_length
    else:
        _check_ctx(target, n_ctx, beyond_trained)
    offloads = settings.n_gpu_layers or settings.asks_for_plan or settings.rpc
    if n_ctx and not offloads:
        _check_kv_memory(target, settings, settings.kv_cells(target) or n_ctx)


def _check_ctx(target: Located, n_ctx: int, beyond_trained: bool) -> None:
    from localmix.errors import ContextTooLong

    if n_ctx < MIN_CTX:
        raise UsageError(
            f"a context of {n_ctx} tokens is below llama.cpp's smallest, {MIN_CTX}",
            hint=f"use --ctx {MIN_CTX} or more, or 0 for the model's own",
        )
    trained = target.context_length
    if n_ctx > MAX_CTX or (not beyond_trained and trained > 0 and n_ctx > trained):
        raise ContextTooLong(
            f"a context of {n_ctx} tokens is more than the {trained or MAX_CTX} tokens "
            f"{target.name} was trained on",
            hint=f"use --ctx {trained} or less (0: the model's own); for bench, smaller -p/-n/-d",
        )


def _check_kv_memory(target: Located, settings: LoadSettings, n_ctx: int) -> None:
    """On the CPU the whole KV cache is in RAM: refuse one larger than the machine's memory."""
    from localmix.errors import DoesNotFit
    from localmix.llama.hardware import ram
    from localmix.sizes import human_size

    need, (total, _) = kv_bytes(target, settings, n_ctx), ram()
    if total and need > total:
        raise DoesNotFit(
            f"a {n_ctx}-token context needs a {human_size(need)} KV cache, more than this "
            f"machine's {human_size(total)} of memory",
            hint="use a smaller --ctx, or a quantized KV cache type",
        )


def kv_bytes(target: Located, settings: LoadSettings, n_ctx: int) -> int:
    """Bytes of an n_ctx-token KV cache of target, with the settings' cache types."""
    from localmix.llama.offload import Shape, kv_bytes_per_element

    shape = Shape.of(target.info)
    per_token = (
        shape.n_layer
        * shape.n_head_kv
        * (
            shape.head_dim_k * kv_bytes_per_element(settings.type_k)
            + shape.head_dim_v * kv_bytes_per_element(settings.type_v)
        )
    )
    return int(per_token * n_ctx)


@dataclass(frozen=True)
class RepackChoice:
    """The CPU rule's answer: whether weights may be repacked, and why (doctor says it)."""

    on: bool
    why: str


def repack_choice(asked: bool | None = None, amx: Amx | None = None) -> RepackChoice:
    """The CPU rule: whether llama.cpp may put weights in the CPU's extra buffer types
    (model_params.use_extra_bufts; llama.cpp's --repack, on by default there).

    What the user asked (--repack / --no-repack, else LOCALMIX_REPACK) wins. Otherwise repacking
    is on, except where llama.cpp would hand weights to its AMX buffer type: ggml's AMX kernels
    (compiled into a native build on Sapphire Rapids and later Xeons) fault at the first decode of
    a quantized model on some of those hosts, a crash of the whole process that localmix cannot
    catch, and llama.cpp has no switch for AMX alone, so repacking goes with it there.
    Off costs little: on a 2-core AMX VM, a build without those kernels repacked to -18% pp512
    and +10% tg128 (llama-bench, 125M Q4_K_M), and the plain kernels give the tokens of a build
    without AMX. Nothing changes on machines without AMX."""
    from localmix import settings as app_settings

    if asked is not None:
        return RepackChoice(asked, "asked with --repack" if asked else "asked with --no-repack")
    chosen = app_settings.repack()
    if chosen is not None:
        return RepackChoice(chosen, f"LOCALMIX_REPACK={int(chosen)}")
    if amx is None:
        from localmix.llama.hardware import amx as probe_amx

        amx = probe_amx()
    if amx.buffer:
        return RepackChoice(
            False,
            "this build's AMX kernels crash on some AMX hosts, so weights stay out of them "
            "(--repack or LOCALMIX_REPACK=1 opts in)",
        )
    return RepackChoice(True, "llama.cpp's default (--no-repack or LOCALMIX_REPACK=0 turns it off)")


def weight_repack(asked: bool | None = None, amx: Amx | None = None) -> bool:
    """repack_choice's answer alone: what EngineConfig.repack is set to."""
    return repack_choice(asked, amx).on


def configure(target: Located, settings: LoadSettings) -> tuple[EngineConfig, Plan | None]:
    """The engine configuration for target under settings, and the plan that placed it (if any).
    Raises UsageError, ContextTooLong, DoesNotFit or InvalidGGUF for what would not load."""
    from localmix.llama.records import EngineConfig

    check(target, settings)
    config = EngineConfig(
        model_path=target.path,
        n_ctx=settings.kv_cells(target),
        n_threads=settings.threads,
        n_threads_batch=settings.threads_batch,
        n_batch=settings.n_batch,
        n_ubatch=settings.n_ubatch,
        n_gpu_layers=_gpu_layers(settings),
        flash_attn=settings.flash_attn,
        type_k=settings.type_k,
        type_v=settings.type_v,
        tensor_overrides=settings.tensor_overrides,
        repack=weight_repack(settings.repack),
        verbose=settings.verbose,
        n_seq_max=settings.parallel,
        rpc=settings.rpc,
        devices=settings.devices,
        tensor_split=settings.tensor_split,
    )
    plan = plan_for(target, settings)
    if plan is not None:
        config = replace(config, **plan.engine_fields())
    return config, plan


def _gpu_layers(settings: LoadSettings) -> int:
    """Layers to offload: the asked number; else all of them (-1) when RPC workers are given,
    as llama.cpp's --rpc does; else none (a plan may decide)."""
    if settings.n_gpu_layers is not None:
        return settings.n_gpu_layers
    return -1 if settings.rpc else 0


def notices(settings: LoadSettings, target: Located | None = None) -> tuple[str, ...]:
    """What to say before a load, as llama.cpp would warn: GPU settings on a build that cannot
    offload (so nobody mistakes a CPU run for a GPU one), a context past the trained one."""
    said: list[str] = []
    trained = target.context_length if target is not None else 0
    n_ctx = settings.n_ctx(target) if target is not None else 0
    if trained > 0 and n_ctx > trained:
        said.append(
            f"a {n_ctx}-token context is past the {trained} tokens {target.name} was trained on: "
            "replies may degrade beyond that"
        )
    if (bool(settings.n_gpu_layers) or settings.asks_for_plan) and not settings.rpc:
        from localmix.llama import lib

        if not lib.supports_gpu_offload():
            said.append(
                "this llama.cpp build has no GPU backend: GPU settings are ignored and everything "
                "runs on the CPU (`localmix doctor` shows how to rebuild it for your GPU)"
            )
    return tuple(said)


def open_model(
    reference: str | Path | Located,
    settings: LoadSettings | None = None,
    *,
    tap: MatMulTap | None = None,
) -> Loaded:
    """Locate, plan and load: the model ready to stream. The caller closes it. tap sees the
    inputs of the model's matrix products while it computes (an imatrix's collector)."""
    from localmix.llama.engine import Engine

    settings = settings or LoadSettings()
    target = locate(reference)
    config, plan = configure(target, settings)
    if tap is not None:
        config = replace(config, tap=tap)
    engine = Engine(config)
    return Loaded(target, config, plan, engine, notices=notices(settings, target))
