"""`localmix eval NAME --quants Q4_K_M,Q5_K_M,...`: what each quant of one model costs, in one
table: size, bits per weight, perplexity against the reference's, KL divergence, same top token,
and generation speed (llama-bench's tg test). Quants the store lacks are made first by localmix's
own quantize from the store's full-precision file.

The reference is loaded once and stays loaded; each quant is loaded in turn and run in lockstep
with it (evaluate.score), then closed, so at most two models are held at a time. Speeds are
measured last, one model at a time with nothing else loaded, each placed as the door would place
it alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from localmix.errors import UsageError
from localmix.progress import OnProgress, Progress, ignore
from localmix.quality.evaluate import EvalSettings

if TYPE_CHECKING:
    from localmix.corpus import Text
    from localmix.models.store import Located, Manifest
    from localmix.quality.evaluate import Evaluation
    from localmix.quality.stats import Scores

GEN_TOKENS = 64  # tokens of the speed test (llama-bench tg64)
GEN_REPETITIONS = 3
_FULL_PRECISION = ("F32", "BF16", "F16")


@dataclass(frozen=True)
class QuantRow:
    """One file of the model: its size (bytes), bits per weight (tensor bytes x 8 / parameters),
    its scores against the reference (None on the reference's own row), generation t/s (0 when
    not measured), and whether localmix made it for this table."""

    quant: str
    name: str
    path: Path
    size_bytes: int
    bits_per_weight: float
    scores: Scores | None
    gen_tps: float
    gen_tps_std: float
    made: bool = False

    @property
    def is_reference(self) -> bool:
        return self.scores is None


@dataclass(frozen=True)
class QuantTable:
    """The rows: the reference first, then the quants largest first, all over the same chunks."""

    model: str
    reference: str
    text: str
    n_ctx: int
    n_chunks: int
    n_tokens: int
    rows: tuple[QuantRow, ...]


def quant_table(
    model: str,
    quants: Sequence[str],
    against: str | Path | None = None,
    text: Text | None = None,
    settings: EvalSettings | None = None,
    progress: OnProgress | None = None,
    *,
    speed: bool = True,
) -> QuantTable:
    """Evaluate each of `quants` of the store model `model` against its reference (`against`,
    else the store's full-precision file), making the missing quants first; speed False skips
    the generation test."""
    from localmix import corpus
    from localmix.models import store

    settings = settings or EvalSettings()
    text = text or corpus.default()
    emit = progress or ignore
    wanted = _quant_names(model, quants)
    manifest = store.get(model)
    reference = _reference(manifest, against)
    if all(quant == _quant_of(reference) for quant in wanted):
        raise UsageError(
            f"{reference.name} is the reference: --quants names nothing to compare with it",
            hint="name other quants, e.g. --quants Q4_K_M,Q5_K_M,Q8_0",
        )
    located = [_ensure(manifest.name, quant, settings, emit) for quant in wanted]
    evaluations = _evaluate_all(reference, located, text, settings, emit)
    rows = [_row(reference, None, settings, emit, speed)]
    scored = [
        _row(target, evaluation.scores, settings, emit, speed, made)
        for (target, made), evaluation in zip(located, evaluations, strict=True)
        if evaluation is not None  # None: the reference itself was asked for, its row is first
    ]
    rows += sorted(scored, key=lambda row: -row.size_bytes)
    first = next((e for e in evaluations if e is not None), None)
    return QuantTable(
        model=manifest.name,
        reference=reference.name,
        text=text.name,
        n_ctx=settings.n_ctx,
        n_chunks=first.n_chunks if first else 0,
        n_tokens=first.scores.n_tokens if first else 0,
        rows=tuple(rows),
    )


def _quant_names(model: str, quants: Sequence[str]) -> list[str]:
    """The asked quants as the type table spells them, each once; UsageError for a path model,
    an unknown type, or none at all."""
    from localmix.build.quantize import quant_type

    path = Path(model).expanduser()
    if path.suffix == ".gguf" or path.is_file():
        raise UsageError(
            f"--quants needs a model in the store, not a file ({path.name})",
            hint="import it first (`localmix import FILE`), or compare files one at a time "
            "with --against",
        )
    names = [quant_type(q, imatrix=True).name for q in quants if q.strip()]
    if not names:
        raise UsageError("--quants names no quant", hint="e.g. --quants Q4_K_M,Q5_K_M,Q8_0")
    return list(dict.fromkeys(names))


def _reference(manifest: Manifest, against: str | Path | None) -> Located:
    """The one file every quant is compared with: --against, else the store's most precise."""
    from localmix import load
    from localmix.quality.evaluate import best_reference

    return load.locate(against) if against is not None else best_reference(manifest.name)


def _quant_of(target: Located) -> str:
    return target.info.quant


def _ensure(
    name: str, quant: str, settings: EvalSettings, emit: OnProgress
) -> tuple[Located, bool]:
    """The store's file of `name` at `quant`, made from the full-precision one when missing;
    (file, whether it was made now)."""
    from localmix import load
    from localmix.build.quantize import quant_type, quantize_model
    from localmix.models import store

    have = {m.quant: m for m in store.find(name)}
    if quant in have:
        return load.locate(have[quant].ref), False
    if not any(q in have for q in _FULL_PRECISION):
        raise UsageError(
            f"{name}:{quant} is not in the store, and there is no full-precision file of {name} "
            "to make it from",
            hint=f"`localmix pull {name}:{quant}` fetches it; `localmix pull {name} "
            "--keep-source` keeps the F16 file that localmix quantizes from",
        )
    kind = quant_type(quant, imatrix=True)
    if kind.needs_imatrix:
        raise UsageError(
            f"{name}:{quant} is not in the store, and {quant} needs an importance matrix",
            hint=f"make it first: `localmix quantize {name} -q {quant} --imatrix FILE`",
        )
    label = f"{name}:{quant}"
    emit(Progress("quantize", subject=quant, detail=f"making {label} with localmix quantize"))
    manifest = quantize_model(
        name,
        quant,
        threads=settings.threads,
        # its tensors only: the start was announced above, naming the model
        progress=lambda p: emit(p) if p.unit else None,
    )
    return load.locate(manifest.ref), True


def _evaluate_all(
    reference: Located,
    located: list[tuple[Located, bool]],
    text: Text,
    settings: EvalSettings,
    emit: OnProgress,
) -> list[Evaluation | None]:
    """One Evaluation per quant (None for the reference itself), the reference loaded once."""
    from localmix import load
    from localmix.quality.evaluate import check_tokens, score, tokenize

    results: list[Evaluation | None] = []
    with ExitStack() as stack:
        emit(Progress("load", subject=reference.name))
        ref = stack.enter_context(load.open_model(reference, settings.load_settings()))
        emit(Progress("tokenize", subject=reference.name))
        tokens = tokenize(ref, text.text)
        for target, _ in located:
            if target.path.resolve() == reference.path.resolve():
                results.append(None)
                continue
            emit(Progress("load", subject=target.name))
            with load.open_model(target, settings.load_settings()) as loaded:
                check_tokens(ref, loaded, text.text, tokens)
                results.append(score(ref, loaded, tokens, text.name, settings, emit))
    return results


def _row(
    located: Located,
    scores: Scores | None,
    settings: EvalSettings,
    emit: OnProgress,
    speed: bool,
    made: bool = False,
) -> QuantRow:
    info = located.info
    tensor_bytes = sum(t.n_bytes for t in info.tensors)
    gen = (0.0, 0.0)
    if speed:
        emit(Progress("bench", subject=located.name, detail=f"tg{GEN_TOKENS}"))
        gen = generation_speed(located, settings)
    return QuantRow(
        quant=_quant_of(located),
        name=located.name,
        path=located.path,
        size_bytes=info.file_size,
        bits_per_weight=tensor_bytes * 8 / info.n_params if info.n_params else 0.0,
        scores=scores,
        gen_tps=gen[0],
        gen_tps_std=gen[1],
        made=made,
    )


def generation_speed(
    target: Located,
    settings: EvalSettings,
    n_gen: int = GEN_TOKENS,
    repetitions: int = GEN_REPETITIONS,
) -> tuple[float, float]:
    """Generation tokens/s (mean, std) as llama-bench's tg test measures it, the model placed
    as the door places it when loaded alone."""
    from localmix import load
    from localmix.bench.params import BenchParams
    from localmix.bench.run import run
    from localmix.errors import EngineError

    plan = load.plan_for(target, settings.load_settings())
    params = BenchParams(
        n_prompt=(0,),
        n_gen=(n_gen,),
        repetitions=repetitions,
        n_threads=(settings.threads,) if settings.threads else (),
        n_gpu_layers=(plan.n_gpu_layers if plan else settings.n_gpu_layers or 0,),
        tensor_overrides=plan.tensor_overrides if plan else (),
    )
    (result,) = run([target.path], params)
    if result.error:
        raise EngineError(f"measuring {target.name}'s speed failed: {result.error}")
    return result.avg_ts, result.stddev_ts
