"""`localmix eval`: a model against a reference over one text, chunk by chunk, as
`llama-perplexity --kl-divergence` measures it, with no base-logits file.

The chunking is llama-perplexity's: the whole text is tokenized once as the vocabulary says
(BOS first when it adds one, control-token text left as text), cut into chunks of n_ctx tokens
(whatever is left over is not scored), and each chunk is run from an empty KV cache with its first
token replaced by BOS; only the second half is scored, each chunk's first n_ctx/2 tokens being
context, so a chunk scores n_ctx - 1 - n_ctx/2 tokens.

Both models run in lockstep, one chunk at a time: the reference's logits of a chunk are scored
against the model's as soon as both exist, then dropped. llama-perplexity instead writes the
reference's log-probabilities of every scored token to a file first (about 2 bytes x vocabulary a
token: 8.6 GB for the default text at tekken's 131k) and reads it back in a second run. Lockstep
needs no disk at all and memory for one chunk's logits of each model (n_ctx/2 x vocabulary float32,
134 MB at 131k), and is exact (float32, full vocabulary, no top-k); the price is holding both
models at once (with mmap on the CPU, pages of both) and, for a table of quants, running the
reference again for each quant instead of once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from localmix.build.quantize import SOURCE_PREFERENCE
from localmix.errors import ReferenceNotFound, TextTooShort, UsageError, VocabularyMismatch
from localmix.progress import OnProgress, Progress, ignore

if TYPE_CHECKING:
    from localmix.corpus import Text
    from localmix.load import Loaded, LoadSettings
    from localmix.models.store import Located, Manifest
    from localmix.quality.stats import Scores

DEFAULT_CTX = 512  # llama-perplexity's default -c
# References a store model is compared with, best first: full precision, else Q8_0 (its loss is
# about a tenth of Q4_K_M's, so it still ranks the smaller quants): quantize's own preference.
REFERENCE_QUANTS = SOURCE_PREFERENCE
_RANK = {"F32": 0, "BF16": 1, "F16": 1, "Q8_0": 2}


@dataclass(frozen=True)
class EvalSettings:
    """How to run an evaluation: tokens per chunk (llama-perplexity's -c), at most this many
    chunks (None: as many as the text fills), and how to load both models."""

    n_ctx: int = DEFAULT_CTX
    max_chunks: int | None = None
    threads: int | None = None
    n_gpu_layers: int | None = None
    repack: bool | None = None  # None: the door's CPU rule
    rpc: tuple[str, ...] = ()  # RPC workers both models' layers go to (HOST:PORT)

    def __post_init__(self) -> None:
        from localmix.load import MIN_CTX

        if self.n_ctx < MIN_CTX:
            raise UsageError(
                f"a chunk of {self.n_ctx} tokens is below llama.cpp's smallest context, {MIN_CTX}",
                hint=f"use --ctx {MIN_CTX} or more (llama-perplexity's default: 512)",
            )
        if self.max_chunks is not None and self.max_chunks < 1:
            raise UsageError(f"--chunks must be 1 or more, not {self.max_chunks}")

    def load_settings(self) -> LoadSettings:
        from localmix.load import LoadSettings

        return LoadSettings(
            ctx=self.n_ctx,
            threads=self.threads,
            threads_batch=self.threads,
            n_gpu_layers=self.n_gpu_layers,
            repack=self.repack,
            rpc=self.rpc,
        )


@dataclass(frozen=True)
class Evaluation:
    """One model against its reference over one text: the scores and how they were made.
    model_tps / reference_tps: tokens a second each model was run at (n_ctx per chunk)."""

    model: str
    model_path: Path
    reference: str
    reference_path: Path
    text: str
    n_ctx: int
    n_chunks: int
    n_vocab: int
    scores: Scores
    seconds: float
    model_tps: float
    reference_tps: float


def evaluate(
    model: str | Path,
    against: str | Path | None = None,
    text: Text | None = None,
    settings: EvalSettings | None = None,
    progress: OnProgress | None = None,
) -> Evaluation:
    """Run `model` and its reference over `text` (default: the shipped one) and score them.

    The reference is `against` (a store name or a GGUF path), else the store's best
    full-precision or Q8_0 file of the same model. Raises ReferenceNotFound, VocabularyMismatch,
    TextTooShort, and the door's errors for files that do not load."""
    from localmix import corpus, load

    settings = settings or EvalSettings()
    text = text or corpus.default()
    target = load.locate(model)
    reference = reference_for(model, against)
    if reference.path.resolve() == target.path.resolve():
        raise UsageError(
            f"{target.name} would be compared with itself",
            hint="give another file with --against",
        )
    emit = progress or ignore
    with ExitStack() as stack:
        emit(Progress("load", subject=reference.name))
        ref = stack.enter_context(load.open_model(reference, settings.load_settings()))
        emit(Progress("load", subject=target.name))
        loaded = stack.enter_context(load.open_model(target, settings.load_settings()))
        emit(Progress("tokenize", subject=reference.name))
        tokens = tokenize(ref, text.text)
        check_tokens(ref, loaded, text.text, tokens)
        return score(ref, loaded, tokens, text.name, settings, emit)


def reference_for(model: str | Path, against: str | Path | None) -> Located:
    """The file to compare `model` with: `against`, else the store's most precise file of the
    same model (F32, BF16, F16, then Q8_0), never one less precise than the model itself."""
    from localmix import load
    from localmix.models import store

    if against is not None:
        return load.locate(against)
    path = Path(model).expanduser()
    if path.suffix == ".gguf" or path.is_file():
        raise ReferenceNotFound(
            f"{path.name} is a file: localmix cannot tell which file is its full-precision one",
            hint="give the reference with --against (its F16 or Q8_0 GGUF, or a store name)",
        )
    manifest = store.get(str(model))
    return best_reference(manifest.name, below=manifest)


def best_reference(name: str, below: Manifest | None = None) -> Located:
    """The store's most precise file of the model `name` (F32, BF16, F16, then Q8_0); with
    `below`, one other than that file and at least as precise. ReferenceNotFound otherwise."""
    from localmix import load
    from localmix.models import store

    rank = _RANK.get(below.quant, len(REFERENCE_QUANTS)) if below else len(REFERENCE_QUANTS)
    siblings = {m.quant: m for m in store.find(name)}
    for quant in REFERENCE_QUANTS:
        if quant in siblings and _RANK[quant] <= rank and (below is None or quant != below.quant):
            return load.locate(siblings[quant].ref)
    if not siblings:
        store.get(name)  # ModelNotFound, with its usual hint
    raise ReferenceNotFound(*_no_reference(name, below))


def _no_reference(name: str, below: Manifest | None) -> tuple[str, str]:
    if below is not None and below.quant in REFERENCE_QUANTS[:3]:
        message = f"{below.ref} is already the most precise file of {name} in the store"
    else:
        message = f"the store has no full-precision or Q8_0 file of {name} to compare with"
    hint = (
        f"`localmix pull {name} --keep-source` keeps the F16 GGUF, `localmix pull {name}:Q8_0` "
        "fetches the Q8_0 one; or give any GGUF of the same model with --against"
    )
    return message, hint


def tokenize(reference: Loaded, text: str) -> list[int]:
    """The text's tokens as llama-perplexity makes them: the vocabulary's own BOS rule, and
    control-token text (`[INST]`) left as text."""
    engine = reference.engine
    return engine.tokenize(text, add_bos=True, special=False)


def check_tokens(reference: Loaded, model: Loaded, text: str, tokens: Sequence[int]) -> None:
    """VocabularyMismatch unless the model reads the text as the reference's `tokens`."""
    hint = "compare quants of one model (same tokenizer), e.g. its Q4_K_M with its F16"
    if reference.engine.n_vocab != model.engine.n_vocab:
        raise VocabularyMismatch(
            f"{model.target.name} has {model.engine.n_vocab} tokens and "
            f"{reference.target.name} {reference.engine.n_vocab}: they are not the same model",
            hint=hint,
        )
    if tokenize(model, text) != list(tokens):
        raise VocabularyMismatch(
            f"{model.target.name} and {reference.target.name} tokenize the text differently",
            hint=hint,
        )


def chunks(
    tokens: Sequence[int], n_ctx: int, bos: int | None, limit: int | None = None
) -> Iterator[tuple[list[int], list[int]]]:
    """(chunk tokens, scored targets) per chunk: n_ctx tokens, the first one BOS (when the
    model adds one); targets are the chunk's tokens after position n_ctx/2, which the logits of
    positions n_ctx/2 .. n_ctx-2 predict."""
    first = n_ctx // 2
    count = len(tokens) // n_ctx
    for index in range(count if limit is None else min(limit, count)):
        chunk = list(tokens[index * n_ctx : (index + 1) * n_ctx])
        targets = chunk[first + 1 :]
        if bos is not None:
            chunk[0] = bos
        yield chunk, targets


def score(
    reference: Loaded,
    model: Loaded,
    tokens: Sequence[int],
    text_name: str,
    settings: EvalSettings,
    progress: OnProgress | None = None,
) -> Evaluation:
    """Both loaded models over tokens, in lockstep, chunk by chunk (see the module's doc)."""
    import numpy as np

    from localmix.quality.stats import Tally

    n_ctx = settings.n_ctx
    available = len(tokens) // n_ctx
    if available == 0:
        raise TextTooShort(
            f"the text is {len(tokens)} tokens: less than one chunk of {n_ctx}",
            hint=f"give a longer --text, or a smaller --ctx (at least 256; {len(tokens)} fit)"
            if len(tokens) >= 256
            else "give a longer --text (a chunk needs 256 tokens or more)",
        )
    total = available if settings.max_chunks is None else min(settings.max_chunks, available)
    ref, engine = reference.engine, model.engine
    bos = ref.bos_id if ref.adds_bos else None
    first, tally = n_ctx // 2, Tally()
    emit = progress or ignore
    ref_s = model_s = 0.0
    start = time.perf_counter()
    name = model.target.name
    emit(Progress("eval", subject=name))
    emit(Progress("eval", subject=name, total=total, unit="chunks"))
    for index, (chunk, targets) in enumerate(chunks(tokens, n_ctx, bos, total), start=1):
        began = time.perf_counter()
        # views on each context's own output buffer: the reference's stays valid while the
        # other engine runs, and both are read before either decodes again
        ref_logits = ref.logits(chunk, first, view=True)
        middle = time.perf_counter()
        logits = engine.logits(chunk, first, view=True)
        ref_s, model_s = ref_s + middle - began, model_s + time.perf_counter() - middle
        # the last position predicts past the chunk: computed (as llama.cpp does), not scored
        tally.add(ref_logits[:-1], logits[:-1], np.asarray(targets))
        del ref_logits, logits
        emit(Progress("eval", subject=name, done=index, total=total, unit="chunks"))
    return Evaluation(
        model=model.target.name,
        model_path=model.target.path,
        reference=reference.target.name,
        reference_path=reference.target.path,
        text=text_name,
        n_ctx=n_ctx,
        n_chunks=total,
        n_vocab=engine.n_vocab,
        scores=tally.scores(),
        seconds=time.perf_counter() - start,
        model_tps=total * n_ctx / model_s if model_s > 0 else 0.0,
        reference_tps=total * n_ctx / ref_s if ref_s > 0 else 0.0,
    )
