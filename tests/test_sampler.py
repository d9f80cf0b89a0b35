"""Greedy picks with a repeat penalty (sampler.PenalizedGreedy) are llama.cpp's own penalties →
greedy chain, token for token: checked against llama_sampler_sample on a real model, and on
hand-made logits where ties, negative logits and the sliding window decide the pick."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from localmix.llama.engine import Chunk, Engine, EngineConfig, Sampling, Stats
from localmix.llama.sampler import PenalizedGreedy, sampler_chain

PROMPT = [1, 1014, 4419, 18760, 286, 272, 17898, 3914, 754, 28723]
N_GEN = 40


@pytest.fixture(scope="module")
def engine(tiny_mistral_gguf_f16: Path) -> Iterator[Engine]:
    with Engine(EngineConfig(tiny_mistral_gguf_f16, n_ctx=256, n_threads=2)) as eng:
        yield eng


def stream_tokens(engine: Engine, sampling: Sampling) -> list[int]:
    engine.clear()
    items = list(engine.stream(PROMPT, sampling=sampling, max_tokens=N_GEN, ignore_eos=True))
    assert isinstance(items[-1], Stats) and items[-1].generated_tokens == N_GEN
    return [c.token for c in items if isinstance(c, Chunk) and c.token >= 0]


def chain_tokens(engine: Engine, sampling: Sampling) -> list[int]:
    """The same generation through llama.cpp's sampler chain and llama_sampler_sample (the path
    stream() took for every non-plain sampling before the numpy pick)."""
    c, ctx = engine._c, engine._ctx  # a reference run in C: reach in past the engine's loop
    engine.clear()
    engine.process(PROMPT)
    chain = sampler_chain(c, ctx, sampling, PROMPT)
    tokens: list[int] = []
    try:
        while len(tokens) < N_GEN:
            tokens.append(int(c.llama_sampler_sample(chain, ctx, -1)))
            if len(tokens) < N_GEN:
                engine.decode_one(tokens[-1])
    finally:
        c.llama_sampler_free(chain)
    return tokens


@pytest.mark.parametrize(
    ("penalty", "last_n"),
    [(1.1, 64), (1.5, 3), (2.0, 1), (0.8, 64), (1.3, -1)],
)
def test_penalized_greedy_matches_llama_cpp_chain(
    engine: Engine, penalty: float, last_n: int
) -> None:
    sampling = Sampling(temperature=0.0, repeat_penalty=penalty, repeat_last_n=last_n)
    assert stream_tokens(engine, sampling) == chain_tokens(engine, sampling)


def test_the_penalty_changes_greedy_output(engine: Engine) -> None:
    """The comparison above is only worth something if the penalty changes what is picked."""
    plain = stream_tokens(engine, Sampling.greedy())
    penalized = stream_tokens(
        engine, Sampling(temperature=0.0, repeat_penalty=1.5, repeat_last_n=3)
    )
    assert plain != penalized


def test_no_window_or_no_penalty_is_plain_greedy(engine: Engine) -> None:
    plain = stream_tokens(engine, Sampling.greedy())
    assert stream_tokens(engine, Sampling(temperature=0.0, repeat_last_n=0)) == plain
    assert stream_tokens(engine, Sampling(temperature=0.0, repeat_penalty=1.0)) == plain


def picker(penalty: float, last_n: int, history: list[int]) -> PenalizedGreedy:
    sampling = Sampling(temperature=0.0, repeat_penalty=penalty, repeat_last_n=last_n)
    return PenalizedGreedy(4096, sampling, history)


def test_positive_logits_are_divided_and_negative_multiplied() -> None:
    logits = np.array([0.0, 2.0, 1.9, -1.0, -0.9, 0, 0, 0], dtype=np.float32)
    # token 1 (2.0 / 1.1 = 1.818) falls below token 2 (1.9)
    assert picker(1.1, 4, [1]).pick(logits) == 2
    negative = np.full(8, -5.0, dtype=np.float32)
    negative[3], negative[4] = -1.0, -0.9
    # token 4 (-0.9 * 1.2 = -1.08) falls below token 3 (-1.0)
    assert picker(1.2, 4, [4]).pick(negative) == 3
    # a penalty below 1 favours repeats: token 3 (-1.0 * 0.5) rises above token 4
    assert picker(0.5, 4, [3]).pick(negative) == 3
    assert logits.tolist() == [0.0, 2.0, np.float32(1.9), -1.0, np.float32(-0.9), 0, 0, 0]


def test_ties_go_to_the_first_token() -> None:
    logits = np.array([1.0, 3.0, 3.0, 3.3, 0, 0, 0, 0], dtype=np.float32)
    # token 3 penalized to exactly 3.0 (3.3 / 1.1 in float32 is 3.0): the first 3.0 wins
    p = picker(float(np.float32(3.3) / np.float32(3.0)), 4, [3])
    assert np.float32(3.3) / p._penalty == np.float32(3.0)
    assert p.pick(logits) == 1


def test_the_window_slides_over_history_and_picks() -> None:
    logits = np.array([0.0, 5.0, 4.0, 3.0, 0, 0, 0, 0], dtype=np.float32)
    p = picker(10.0, 2, [7, 1, 2])  # only the last 2 of the history count: 1 and 2
    assert p.window == [1, 2]
    assert p.pick(logits) == 3  # 1 and 2 are penalized; window is now 2, 3
    assert p.pick(logits) == 1  # 1 left the window
    assert p.pick(logits) == 2  # window 3, 1
    assert p.window == [1, 2]


def test_a_repeated_token_is_penalized_once() -> None:
    logits = np.array([0.0, 2.0, 1.5, 0, 0, 0, 0, 0], dtype=np.float32)
    # 2.0 / 1.2 = 1.67 stays above 1.5; penalized twice (1.39) it would not
    assert picker(1.2, 4, [1, 1, 1]).pick(logits) == 1
    assert logits[1] == np.float32(2.0)
