"""The demo: the whole product offline on a model localmix builds itself. synth -> convert ->
quantize Q4_K_M -> store -> a short bench -> what the quant costs against the model's F16 file
(`localmix eval` over 4 chunks) -> one chat turn.

`run` does the work and prints nothing: progress goes to on_progress, each part's result to
on_step as soon as it is known (so a caller can show it then), and the whole comes back as a
DemoRun.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from localmix.progress import OnProgress, Progress, ignore

if TYPE_CHECKING:
    from localmix.bench.result import BenchResult
    from localmix.bench.run import BenchEvent
    from localmix.llama.engine import Stats
    from localmix.models.store import Manifest
    from localmix.quality.stats import Scores

PROMPT = "Explain in one sentence why the sky is blue."
QUANT = "Q4_K_M"
REFERENCE_QUANT = "F16"
EVAL_CHUNKS = 4
CHAT_CTX = 1024
CHAT_SEED = 42


@dataclass(frozen=True)
class Starting:
    """The checks passed: the demo of `model` starts (nothing has been built yet)."""

    model: str


@dataclass(frozen=True)
class StageDone:
    """A stage of the build (synth, convert, quantize, register) ended after `seconds`."""

    stage: str
    seconds: float


@dataclass(frozen=True)
class Stored:
    """The quantized model is in the store."""

    manifest: Manifest


@dataclass(frozen=True)
class Benched:
    """The short bench's results (pp256, tg64)."""

    results: tuple[BenchResult, ...]


@dataclass(frozen=True)
class QuantCost:
    """What the quant costs against the reference: llama-perplexity's numbers over a few chunks."""

    quant: str
    reference: str
    scores: Scores


@dataclass(frozen=True)
class ChatStarts:
    """The chat turn starts with this prompt (the model loads next)."""

    prompt: str


@dataclass(frozen=True)
class ChatText:
    """A piece of the reply, as it is generated."""

    text: str


Step = Starting | StageDone | Stored | Benched | QuantCost | ChatStarts | ChatText
OnStep = Callable[[Step], None]


@dataclass(frozen=True)
class ChatTurn:
    prompt: str
    reply: str
    stats: Stats | None  # None when the engine reported none


@dataclass(frozen=True)
class DemoRun:
    """All of it: the model built, its build stages' times, bench, quant cost, chat, and the
    total seconds."""

    manifest: Manifest
    timings: tuple[StageDone, ...]
    bench: tuple[BenchResult, ...]
    cost: QuantCost
    chat: ChatTurn
    seconds: float


def _no_step(_: Step) -> None:
    """The on_step of a caller that only wants the DemoRun."""


def run(
    model: str = "tiny-mistral",
    *,
    threads: int | None = None,
    max_tokens: int = 48,
    on_progress: OnProgress = ignore,
    on_step: OnStep = _no_step,
) -> DemoRun:
    """Build (or reuse) the built-in `model`, bench it, measure its quant against F16 and chat
    once. Raises UsageError before any work for a model that is not built-in or a thread count
    the machine cannot run."""
    check(model, threads)
    on_step(Starting(model))
    started = time.perf_counter()
    manifest, timings = _build(model, threads, on_progress, on_step)
    on_step(Stored(manifest))
    results = _bench(manifest, threads, on_progress)
    on_step(Benched(results))
    cost = _quant_cost(manifest, threads, on_progress)
    on_step(cost)
    chat = _chat(manifest, threads, max_tokens, on_step)
    return DemoRun(manifest, timings, results, cost, chat, time.perf_counter() - started)


def check(model: str, threads: int | None) -> None:
    """What would fail minutes into the build fails first: an unknown or downloadable model, a
    thread count (or LOCALMIX_THREADS) the machine cannot run."""
    from localmix import settings
    from localmix.errors import UsageError
    from localmix.models import catalog

    spec = catalog.load().get(model)
    if not spec.synthetic:
        raise UsageError(
            f"{spec.name} is not a built-in model", hint="use tiny-mistral or tiny-mixtral"
        )
    if threads is not None:
        settings.check_threads(threads)
    else:
        settings.default_threads()


class _StageClock:
    """Passes the build's progress on and times its stages: a stage ends when another starts
    (a record without a unit) or when the build returns (finish)."""

    def __init__(self, on_progress: OnProgress, on_step: OnStep) -> None:
        self._on_progress, self._on_step = on_progress, on_step
        self._stage, self._since = "", 0.0
        self.timings: list[StageDone] = []

    def __call__(self, event: Progress) -> None:
        if not event.unit and event.stage != self._stage:
            self.finish()
            self._stage, self._since = event.stage, time.perf_counter()
        self._on_progress(event)

    def finish(self) -> None:
        if self._stage:
            done = StageDone(self._stage, time.perf_counter() - self._since)
            self.timings.append(done)
            self._on_step(done)
            self._stage = ""


def _build(
    model: str, threads: int | None, on_progress: OnProgress, on_step: OnStep
) -> tuple[Manifest, tuple[StageDone, ...]]:
    from localmix.build.synth import builtin

    clock = _StageClock(on_progress, on_step)
    manifest = builtin.build(model, QUANT, threads=threads, on_progress=clock)
    clock.finish()
    return manifest, tuple(clock.timings)


def _bench(
    manifest: Manifest, threads: int | None, on_progress: OnProgress
) -> tuple[BenchResult, ...]:
    from localmix.bench.params import BenchParams
    from localmix.bench.run import run as bench

    params = BenchParams(
        n_prompt=(256,),
        n_gen=(64,),
        repetitions=3,
        n_threads=(threads,) if threads else (),
    )

    def tests(event: BenchEvent) -> None:
        # index counts tests from 1: the ones before it are done, and it is too once it says so
        done = event.index if event.stage == "done" else event.index - 1
        on_progress(
            Progress(
                "bench",
                subject=event.test,
                done=done,
                total=event.total,
                unit="tests",
                detail=event.stage,
            )
        )

    on_progress(Progress("bench", subject=manifest.ref))
    return tuple(bench([manifest.file], params, progress=tests))


def _quant_cost(manifest: Manifest, threads: int | None, on_progress: OnProgress) -> QuantCost:
    """`localmix eval` in miniature: the quantized file against the model's F16 file (built here
    too) over a few chunks of the shipped text."""
    from localmix.build.synth import builtin
    from localmix.quality.evaluate import EvalSettings, evaluate

    reference = builtin.build(
        manifest.name, REFERENCE_QUANT, threads=threads, on_progress=on_progress
    )
    result = evaluate(
        manifest.ref,
        reference.ref,
        settings=EvalSettings(max_chunks=EVAL_CHUNKS, threads=threads),
        progress=on_progress,
    )
    return QuantCost(manifest.quant, reference.quant, result.scores)


def _chat(manifest: Manifest, threads: int | None, max_tokens: int, on_step: OnStep) -> ChatTurn:
    from localmix import load
    from localmix.chat.session import Session
    from localmix.llama.engine import Chunk, Sampling, Stats

    on_step(ChatStarts(PROMPT))
    parts: list[str] = []
    stats: Stats | None = None
    settings = load.LoadSettings(ctx=CHAT_CTX, threads=threads)
    with load.open_model(manifest.file, settings) as loaded:
        session = Session(
            loaded.engine,
            manifest.chat_format,
            sampling=Sampling(seed=CHAT_SEED),
            max_tokens=max_tokens,
        )
        for item in session.send(PROMPT):
            if isinstance(item, Chunk):
                parts.append(item.text)
                on_step(ChatText(item.text))
            elif isinstance(item, Stats):
                stats = item
    return ChatTurn(PROMPT, "".join(parts), stats)
