"""llama-bench's measurements (pp, tg, pp+tg, at a depth) on localmix's Engine.

Semantics follow llama.cpp's tools/llama-bench: random tokens (the first one BOS when the model
adds one); pp = one prompt of n_prompt tokens processed in n_batch chunks; tg = n_gen single-token
decodes, no sampling; pp+tg = both, timed together; one warmup (the whole prompt, one generated
token) before the repetitions; the KV cache is emptied before each repetition, and refilled to
n_depth untimed; t/s = (n_prompt + n_gen) / time of each repetition; model load is not timed.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localmix.bench.params import BenchCase, BenchParams, cases
from localmix.bench.result import BenchResult
from localmix.load import MIN_CTX

if TYPE_CHECKING:
    from localmix.llama.engine import Engine
    from localmix.load import LoadSettings


@dataclass(frozen=True)
class BenchEvent:
    """Progress: `stage` is load / warmup / depth / run / done; index counts tests from 1."""

    stage: str
    index: int
    total: int
    test: str
    model: str
    rep: int = 0
    reps: int = 0
    result: BenchResult | None = None


@dataclass(frozen=True)
class Machine:
    """What the results say about where they ran (llama-bench's cpu_info, gpu_info, backends)."""

    cpu_info: str = ""
    gpu_info: str = ""
    backends: str = "CPU"


OnBenchEvent = Callable[[BenchEvent], None]


def run(
    models: Sequence[Path],
    params: BenchParams = BenchParams(),  # noqa: B008 - frozen, safe as a default
    progress: OnBenchEvent | None = None,
) -> list[BenchResult]:
    """Run every test of the sweep on every model; results in llama-bench's order.

    A combination llama.cpp refuses (say a quantized V cache without flash attention) becomes a
    result with `error` set and no samples; the rest of the sweep still runs."""
    from localmix.errors import LocalmixError

    todo = cases(models, params)
    machine = machine_info()
    results: dict[int, BenchResult] = {}
    for key_cases in _by_engine(todo):
        first_index, first = key_cases[0]
        _emit(progress, "load", first_index, len(todo), first, params)
        n_ctx = max(case.n_ctx for _, case in key_cases)
        try:
            # llama.cpp pads a context to 256 tokens anyway; the door refuses smaller ones
            engine = open_case(first, max(n_ctx, MIN_CTX))
        except LocalmixError as exc:
            for index, case in key_cases:
                results[index] = failed(case, machine, exc)
                _emit(progress, "done", index, len(todo), case, params, result=results[index])
            continue
        with engine:
            for index, case in key_cases:
                try:
                    result = _run_case(engine, case, params, machine, index, len(todo), progress)
                except LocalmixError as exc:
                    result = failed(case, machine, exc)
                results[index] = result
                _emit(progress, "done", index, len(todo), case, params, result=result)
    return [results[i] for i in sorted(results)]


def failed(case: BenchCase, machine: Machine, exc: Exception) -> BenchResult:
    """The error row of a test llama.cpp refused: its settings, the reason, no samples."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return _row(case, machine, stamp, (), model_type="", model_size=0, model_n_params=0,
                error=str(exc))  # fmt: skip


def _by_engine(todo: list[BenchCase]) -> list[list[tuple[int, BenchCase]]]:
    """Tests grouped by load settings (first-seen order), so each Engine loads once."""
    groups: dict[tuple[object, ...], list[tuple[int, BenchCase]]] = {}
    for index, case in enumerate(todo, start=1):
        groups.setdefault(case.load_key, []).append((index, case))
    return list(groups.values())


def load_settings(case: BenchCase, n_ctx: int) -> LoadSettings:
    """The door's settings for a test: all explicit (GPU layers too), so nothing is re-planned;
    n_ctx 0 is the model's own context."""
    from localmix.load import LoadSettings

    return LoadSettings(
        ctx=max(n_ctx, 0),
        threads=case.n_threads,
        threads_batch=case.n_threads,  # llama-bench uses one count for both
        n_batch=case.n_batch,
        n_ubatch=case.n_ubatch,
        n_gpu_layers=case.n_gpu_layers,
        flash_attn=case.flash_attn,
        type_k=case.type_k,
        type_v=case.type_v,
        tensor_overrides=case.tensor_overrides,
        repack=case.repack,
        rpc=case.rpc,
    )


def open_case(case: BenchCase, n_ctx: int) -> Engine:
    """The model of a test, loaded through the door (load.open_model)."""
    from localmix import load

    return load.open_model(case.model, load_settings(case, n_ctx)).engine


def _emit(
    progress: OnBenchEvent | None,
    stage: str,
    index: int,
    total: int,
    case: BenchCase,
    params: BenchParams,
    rep: int = 0,
    result: BenchResult | None = None,
) -> None:
    if progress is not None:
        event = BenchEvent(
            stage, index, total, case.test, case.model.name, rep, params.repetitions, result
        )
        progress(event)


class _Tokens:
    """Random token ids the way llama-bench draws them (BOS first when the model adds one)."""

    def __init__(self, engine: Engine, seed: int) -> None:
        self.n_vocab = engine.n_vocab
        self.bos = engine.bos_id if engine.adds_bos else None  # llama-bench's rule too
        self.rng = random.Random(seed)

    def prompt(self, n: int) -> list[int]:
        tokens = [self.rng.randrange(self.n_vocab) for _ in range(n)]
        if tokens and self.bos is not None:
            tokens[0] = self.bos
        return tokens

    def gen(self, n: int) -> list[int]:
        first = self.bos if self.bos is not None else self.rng.randrange(self.n_vocab)
        return [first, *(self.rng.randrange(self.n_vocab) for _ in range(n - 1))][:n]


def _run_case(
    engine: Engine,
    case: BenchCase,
    params: BenchParams,
    machine: Machine,
    index: int,
    total: int,
    progress: OnBenchEvent | None,
) -> BenchResult:
    tokens = _Tokens(engine, params.seed)
    test_time = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    engine.clear()
    if params.warmup:
        _emit(progress, "warmup", index, total, case, params)
        if case.n_prompt > 0:
            engine.process(tokens.prompt(case.n_prompt))
        if case.n_gen > 0:
            _generate(engine, tokens.gen(1))
    depth = tokens.prompt(case.n_depth) if case.n_depth else []
    samples: list[int] = []
    for rep in range(1, params.repetitions + 1):
        if depth:
            _emit(progress, "depth", index, total, case, params, rep)
        _fill_depth(engine, depth)
        prompt = tokens.prompt(case.n_prompt) if case.n_prompt else []
        gen = tokens.gen(case.n_gen) if case.n_gen else []
        _emit(progress, "run", index, total, case, params, rep)
        start = time.perf_counter_ns()
        if prompt:
            engine.process(prompt)
        if gen:
            _generate(engine, gen)
        samples.append(time.perf_counter_ns() - start)
    return _result(engine, case, machine, test_time, tuple(samples))


def _generate(engine: Engine, tokens: list[int]) -> None:
    decode_one = engine.decode_one
    for token in tokens:
        decode_one(token)


def _fill_depth(engine: Engine, depth: list[int]) -> None:
    """Leave exactly the depth tokens in the KV cache: keep them when already there (llama-bench
    restores a saved state instead), else empty the cache and process them (untimed)."""
    held = engine.kv_tokens
    if depth and len(held) >= len(depth) and tuple(held[: len(depth)]) == tuple(depth):
        if len(held) > len(depth):
            engine.shift(len(depth), len(held) - len(depth))
        return
    engine.clear()
    if depth:
        engine.process(depth)


def _result(
    engine: Engine, case: BenchCase, machine: Machine, test_time: str, samples: tuple[int, ...]
) -> BenchResult:
    return _row(
        case, machine, test_time, samples, model_type=engine.description,
        model_size=int(engine.size_bytes), model_n_params=int(engine.n_params),
        build_commit=build_info(),
    )  # fmt: skip


def _row(
    case: BenchCase, machine: Machine, test_time: str, samples: tuple[int, ...], **model: Any
) -> BenchResult:
    """A result row: the test's settings and where it ran, plus what the caller knows."""
    return BenchResult(
        model_filename=str(case.model),
        n_batch=case.n_batch,
        n_ubatch=case.n_ubatch,
        n_threads=case.n_threads,
        type_k=case.type_k,
        type_v=case.type_v,
        n_gpu_layers=case.n_gpu_layers,
        flash_attn=case.flash_attn,
        n_prompt=case.n_prompt,
        n_gen=case.n_gen,
        n_depth=case.n_depth,
        test_time=test_time,
        samples_ns=samples,
        backends=with_rpc(machine.backends, case.rpc),
        cpu_info=machine.cpu_info,
        gpu_info=machine.gpu_info,
        tensor_buft_overrides=";".join(f"{p}={b}" for p, b in case.tensor_overrides) or "none",
        repack=case.repack,
        rpc_servers=",".join(case.rpc),
        **model,
    )


def with_rpc(backends: str, rpc: tuple[str, ...]) -> str:
    """llama-bench's backends when RPC workers are used: RPC after the others ("RPC" alone on
    a CPU build, "CUDA,RPC" beside a GPU)."""
    if not rpc:
        return backends
    return "RPC" if backends == "CPU" else f"{backends},RPC"


def build_info() -> str:
    """What built the engine: llama-bench writes llama.cpp's commit; ours is the pinned binding."""
    from importlib import metadata

    try:
        return f"llama-cpp-python {metadata.version('llama-cpp-python')}"
    except metadata.PackageNotFoundError:
        return "unknown"


def machine_info() -> Machine:
    """CPU / GPU descriptions and backends, named as llama-bench names them."""
    from localmix.llama import hardware

    info = hardware.probe(bandwidth=False)
    cpus = [d.description for d in info.devices if d.kind in ("cpu", "accel")]
    gpus = [d.description for d in info.gpus]
    # llama-bench lists the registered backends other than CPU, or "CPU" when there are none.
    backends = [b for b in info.backends if b != "CPU" and not b.startswith("RPC")]
    return Machine(", ".join(cpus) or _cpu_name(), ", ".join(gpus), ",".join(backends) or "CPU")


def _cpu_name() -> str:
    """The CPU's model name as ggml's CPU device describes it (from /proc/cpuinfo on Linux)."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
