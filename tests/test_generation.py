"""llama.generation, the one generation core: the same Generation gives the same tokens, text,
log-probabilities and finish reason whether Engine.generate (one sequence) or a Batch (many)
drives it; logit_bias and logprobs are honoured by both (tiny random-weight Mistral for the
numbers, checked against a numpy log-softmax of llama.cpp's own logits)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from localmix.errors import UsageError
from localmix.llama.batch import Batch
from localmix.llama.engine import Chunk, Engine, EngineConfig, Sampling, Stats
from localmix.llama.generation import Generation, common_prefix

BOS = 1
PROMPT = [BOS, 1014, 4419, 18760, 286, 272, 17898]
SAMPLINGS = {
    "greedy": Sampling.greedy(),
    "penalised": Sampling(temperature=0.0, repeat_penalty=1.3),
    "sampled": Sampling(seed=11),
}


@pytest.fixture(scope="module")
def single(tiny_mistral_gguf_f16: Path) -> Iterator[Engine]:
    with Engine(EngineConfig(tiny_mistral_gguf_f16, n_ctx=256, n_threads=2)) as engine:
        yield engine


@pytest.fixture(scope="module")
def batch(tiny_mistral_gguf_f16: Path) -> Iterator[Batch]:
    config = EngineConfig(tiny_mistral_gguf_f16, n_ctx=512, n_threads=2, n_seq_max=2)
    with Engine(config) as engine:
        yield Batch(engine)


def by_engine(engine: Engine, gen: Generation) -> tuple[list[Chunk], Stats]:
    engine.clear()
    items = list(engine.generate(gen))
    stats = items.pop()
    assert isinstance(stats, Stats)
    return [c for c in items if isinstance(c, Chunk)], stats


def by_batch(batch: Batch, gen: Generation) -> tuple[list[Chunk], Stats]:
    batch.clear_idle()
    seq = batch.start(gen)
    chunks: list[Chunk] = []
    while True:
        for got, item in batch.step():
            assert got == seq
            if isinstance(item, Stats):
                return chunks, item
            chunks.append(item)


def same(a: tuple[list[Chunk], Stats], b: tuple[list[Chunk], Stats]) -> None:
    (chunks_a, stats_a), (chunks_b, stats_b) = a, b
    assert [(c.text, c.token) for c in chunks_a] == [(c.text, c.token) for c in chunks_b]
    assert stats_a.finish_reason == stats_b.finish_reason
    assert stats_a.generated_tokens == stats_b.generated_tokens
    for x, y in zip(chunks_a, chunks_b, strict=True):
        assert (x.logprob is None) == (y.logprob is None)
        if x.logprob is not None and y.logprob is not None:
            assert x.logprob.logprob == pytest.approx(y.logprob.logprob, abs=1e-4)
            assert [t for t, _ in x.logprob.top] == [t for t, _ in y.logprob.top]


@pytest.mark.parametrize("mode", SAMPLINGS)
def test_one_generation_two_drivers_same_reply(single: Engine, batch: Batch, mode: str) -> None:
    gen = Generation(PROMPT, SAMPLINGS[mode], max_tokens=12, logprobs=3, ignore_eos=True)
    alone = by_engine(single, gen)
    assert alone[1].generated_tokens == 12 and alone[1].finish_reason == "length"
    same(alone, by_batch(batch, gen))


def test_logprobs_are_the_log_softmax_of_the_logits(single: Engine) -> None:
    gen = Generation(PROMPT, Sampling.greedy(), max_tokens=4, logprobs=5, ignore_eos=True)
    chunks, _ = by_engine(single, gen)
    tokens = [c.token for c in chunks]
    rows = single.logits(PROMPT + tokens[:-1], first=len(PROMPT) - 1)
    for chunk, row in zip(chunks, rows, strict=True):
        expected = row.astype(np.float64) - np.log(np.exp(row - row.max()).sum()) - row.max()
        assert chunk.logprob is not None
        assert chunk.logprob.token == chunk.token
        assert chunk.logprob.logprob == pytest.approx(expected[chunk.token], abs=1e-4)
        top = chunk.logprob.top
        assert len(top) == 5 and top[0][0] == chunk.token  # greedy: the pick is the most likely
        assert [t for t, _ in top] == list(np.argsort(-expected, kind="stable")[:5])
        assert all(a[1] >= b[1] for a, b in itertools.pairwise(top))
        assert all(lp <= 0 for _, lp in top)


def test_no_logprobs_unless_asked(single: Engine) -> None:
    chunks, _ = by_engine(single, Generation(PROMPT, Sampling.greedy(), max_tokens=3))
    assert chunks and all(c.logprob is None for c in chunks)
    zero, _ = by_engine(single, Generation(PROMPT, Sampling.greedy(), max_tokens=3, logprobs=0))
    assert all(c.logprob is not None and c.logprob.top == () for c in zero)


@pytest.mark.parametrize("mode", SAMPLINGS)
def test_logit_bias_forces_and_bans_tokens(single: Engine, batch: Batch, mode: str) -> None:
    forced = 4419
    base = SAMPLINGS[mode]
    sampling = Sampling(**{**base.__dict__, "logit_bias": ((forced, 1000.0),)})
    gen = Generation(PROMPT, sampling, max_tokens=6, ignore_eos=True)
    alone = by_engine(single, gen)
    assert [c.token for c in alone[0]] == [forced] * 6
    same(alone, by_batch(batch, gen))
    free = by_engine(single, Generation(PROMPT, Sampling.greedy(), max_tokens=6, ignore_eos=True))
    banned = {c.token for c in free[0]}
    ban = Sampling(temperature=0.0, repeat_penalty=1.0,
                   logit_bias=tuple((t, -math.inf) for t in banned))  # fmt: skip
    got = by_engine(single, Generation(PROMPT, ban, max_tokens=6, ignore_eos=True))
    assert not banned & {c.token for c in got[0]}


def test_the_bias_moves_the_logprobs_too(single: Engine) -> None:
    forced = 4419
    sampling = Sampling(temperature=0.0, repeat_penalty=1.0, logit_bias=((forced, 1000.0),))
    chunks, _ = by_engine(single, Generation(PROMPT, sampling, max_tokens=1, logprobs=1))
    assert chunks[0].logprob is not None
    assert chunks[0].logprob.logprob == pytest.approx(0.0, abs=1e-6)


def test_refusals(single: Engine, batch: Batch) -> None:
    n = single.n_vocab
    bad = [
        Generation(PROMPT, logprobs=21),
        Generation(PROMPT, logprobs=-1),
        Generation(PROMPT, Sampling(logit_bias=((n, 1.0),))),
        Generation(PROMPT, Sampling(logit_bias=((-1, 1.0),))),
    ]
    for gen in bad:
        with pytest.raises(UsageError):
            single.generate(gen)
        with pytest.raises(UsageError):
            batch.start(gen)
    for value in (math.nan, math.inf):
        with pytest.raises(UsageError, match="logit bias"):
            Sampling(logit_bias=((3, value),))


def test_a_saved_bias_reads_back() -> None:
    assert Sampling(logit_bias=[[3, 2]]).logit_bias == ((3, 2.0),)  # type: ignore[arg-type]


def test_common_prefix_keeps_the_last_prompt_token_to_decode() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 3]) == 2
    assert common_prefix([1, 2, 3, 4], [1, 2, 9]) == 2
    assert common_prefix([], [1, 2]) == 0
    assert common_prefix([5], [1, 2]) == 0
