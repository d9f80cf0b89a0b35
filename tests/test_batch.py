"""llama.batch: several sequences in one context, decoded together, each as Engine.stream() would
decode it alone (tiny random-weight Mistral for the numbers, the scripted model for exact text)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from localmix.errors import ContextTooLong, EngineError, UsageError
from localmix.llama.batch import Batch, Generation
from localmix.llama.engine import Chunk, Engine, EngineConfig, Sampling, Stats

from .scripted_gguf import write_scripted_gguf

BOS, EOS = 1, 2
HELLO, WORLD, BANG = 22557, 1526, 28808  # ▁Hello, ▁world, !
PROMPTS = [
    [BOS, 1014, 4419, 18760, 286],
    [BOS, 272, 17898, 3914, 754, 28723, 400],
    [BOS, 22557],
    [BOS, 1526, 28808, 1526, 1014, 4419, 18760, 286, 272, 17898, 3914],
]
GREEDY = Sampling.greedy()


@pytest.fixture(scope="module")
def single(tiny_mistral_gguf_f16: Path) -> Iterator[Engine]:
    with Engine(EngineConfig(tiny_mistral_gguf_f16, n_ctx=512, n_threads=2)) as engine:
        yield engine


@pytest.fixture(scope="module")
def batch(tiny_mistral_gguf_f16: Path) -> Iterator[Batch]:
    config = EngineConfig(tiny_mistral_gguf_f16, n_ctx=1024, n_threads=2, n_batch=64, n_seq_max=4)
    with Engine(config) as engine:
        yield Batch(engine)


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Batch]:
    """After BOS: ▁Hello ▁world ! EOS; after token 100: 101 100 101 ... forever."""
    successors = {BOS: HELLO, HELLO: WORLD, WORLD: BANG, BANG: EOS, 100: 101, 101: 100}
    path = write_scripted_gguf(tmp_path_factory.mktemp("scripted") / "s.gguf", successors)
    with Engine(EngineConfig(path, n_ctx=512, n_threads=1, n_seq_max=2)) as engine:
        yield Batch(engine)


def alone(engine: Engine, prompt: list[int], sampling: Sampling, n: int) -> list[int]:
    items = list(engine.stream(prompt, sampling=sampling, max_tokens=n))
    return [c.token for c in items if isinstance(c, Chunk) and c.token >= 0]


def drain(batch: Batch, seqs: dict[int, int]) -> tuple[dict[int, list[int]], dict[int, Stats]]:
    """Step until every sequence in seqs (seq id -> label) finished: tokens and Stats by label."""
    tokens: dict[int, list[int]] = {label: [] for label in seqs.values()}
    stats: dict[int, Stats] = {}
    while len(stats) < len(seqs):
        for seq, item in batch.step():
            if isinstance(item, Chunk) and item.token >= 0:
                tokens[seqs[seq]].append(item.token)
            elif isinstance(item, Stats):
                stats[seqs[seq]] = item
    return tokens, stats


def test_sequences_decoded_together_match_each_decoded_alone(batch: Batch, single: Engine) -> None:
    expected = [alone(single, p, GREEDY, 24) for p in PROMPTS]
    seqs = {batch.start(Generation(p, GREEDY, max_tokens=24)): i for i, p in enumerate(PROMPTS)}
    assert sorted(seqs) == [0, 1, 2, 3] and batch.free == 0
    tokens, stats = drain(batch, seqs)
    assert [tokens[i] for i in range(4)] == expected
    assert all(s.finish_reason == "length" and s.generated_tokens == 24 for s in stats.values())
    assert batch.active == 0


def test_a_request_joins_between_decode_steps(batch: Batch, single: Engine) -> None:
    """A starts; after a few steps B starts and both go on in the same steps."""
    a, b = PROMPTS[1], PROMPTS[3]
    seq_a = batch.start(Generation(a, GREEDY, max_tokens=30))
    got: dict[int, list[int]] = {0: [], 1: []}
    for _ in range(5):
        for _, item in batch.step():
            got[0].append(item.token)  # type: ignore[union-attr]
    seq_b = batch.start(Generation(b, GREEDY, max_tokens=10))
    shared = batch.step()  # one decode: A's next token and B's whole prompt
    assert {seq for seq, _ in shared} == {seq_a, seq_b}
    for seq, item in shared:
        got[0 if seq == seq_a else 1].append(item.token)  # type: ignore[union-attr]
    tokens, _ = drain(batch, {seq_a: 0, seq_b: 1})
    assert got[0] + tokens[0] == alone(single, a, GREEDY, 30)
    assert got[1] + tokens[1] == alone(single, b, GREEDY, 10)


def test_long_prompts_are_read_in_chunks_while_others_generate(
    batch: Batch, single: Engine
) -> None:
    """n_batch is 64: a 200-token prompt takes four steps beside the generating sequence's token
    (63, 63, 63, 11; beside others its last token gets no step of its own), and the generating
    sequence gets a token in each of them."""
    long_prompt = [BOS, *itertools.islice(itertools.cycle(PROMPTS[3][1:]), 199)]
    batch.clear_idle()  # nothing of it cached: all 200 tokens are read
    seq_a = batch.start(Generation(PROMPTS[0], GREEDY, max_tokens=12))
    batch.step()
    seq_b = batch.start(Generation(long_prompt, GREEDY, max_tokens=4))
    steps_of_a = 0
    while True:
        out = batch.step()
        if any(seq == seq_b for seq, _ in out):
            break
        assert [seq for seq, _ in out] == [seq_a]
        steps_of_a += 1
    assert steps_of_a == 3
    tokens, stats = drain(batch, {seq_a: 0, seq_b: 1})
    assert stats[1].prompt_tokens + stats[1].cached_tokens == 200
    assert alone(single, long_prompt, GREEDY, 4)[1:] == tokens[1]


def test_cancel_frees_the_sequences_kv_cells(batch: Batch) -> None:
    seq = batch.start(Generation(PROMPTS[1], GREEDY, max_tokens=100))
    for _ in range(4):  # the prompt but its last token, then that token alone: two steps
        batch.step()
    assert batch.cells(seq) == len(PROMPTS[1]) + 2  # the third token is sampled, not decoded
    stats = batch.cancel(seq)
    assert stats.finish_reason == "interrupted" and stats.generated_tokens == 3
    assert batch.cells(seq) == 0 and batch.kv_tokens(seq) == () and batch.free == batch.n_seq
    with pytest.raises(UsageError):
        batch.cancel(seq)


def test_a_continued_conversation_reuses_its_sequences_cache(batch: Batch, single: Engine) -> None:
    batch.clear_idle()
    first = list(PROMPTS[3])
    seqs = {batch.start(Generation(first, GREEDY, max_tokens=6)): 0}
    tokens, _ = drain(batch, seqs)
    follow = [*first, *tokens[0][:-1], 28705, 13]  # what was said, then new text
    seq = batch.start(Generation(follow, GREEDY, max_tokens=5))
    assert seq in seqs
    more, stats = drain(batch, {seq: 0})
    assert stats[0].cached_tokens == len(first) + 5 and stats[0].prompt_tokens == 2
    assert more[0] == alone(single, follow, GREEDY, 5)


def test_starting_a_generation_frees_the_other_idle_caches(batch: Batch) -> None:
    """llama.cpp attends over every cell up to the highest in use: idle caches would slow every
    decode, so only the one the new request continues is kept."""
    batch.clear_idle()
    seqs = {batch.start(Generation(PROMPTS[i], GREEDY, max_tokens=4)): i for i in range(3)}
    drain(batch, seqs)
    assert all(batch.cells(seq) > 0 for seq in seqs)
    first = next(seq for seq, i in seqs.items() if i == 0)
    follow = [*batch.kv_tokens(first), 13]
    assert batch.start(Generation(follow, GREEDY, max_tokens=1)) == first
    assert [batch.cells(seq) for seq in seqs if seq != first] == [0, 0]
    drain(batch, {first: 0})


def test_seeded_sampling_is_reproducible_within_a_batch(batch: Batch) -> None:
    sampled = Sampling(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=7)
    seqs = {batch.start(Generation(PROMPTS[0], sampled, max_tokens=16)): i for i in range(2)}
    other = batch.start(Generation(PROMPTS[0], Sampling(temperature=1.5, seed=8), max_tokens=16))
    tokens, _ = drain(batch, {**seqs, other: 2})
    assert tokens[0] == tokens[1] != tokens[2]


def test_stop_strings_end_of_generation_and_limits(scripted: Batch) -> None:
    cases = [
        (Generation([BOS], GREEDY, max_tokens=10), "Hello world!", "stop", 3),
        (Generation([BOS], GREEDY, max_tokens=2), "Hello world", "length", 2),
        (Generation([BOS], GREEDY, max_tokens=10, stop=("world",)), "Hello ", "stop_string", 2),
        (Generation([BOS], GREEDY, max_tokens=0), "", "length", 0),
        (Generation([BOS], GREEDY, max_tokens=5, ignore_eos=True), None, "length", 5),
    ]
    for gen, text, finish, n in cases:
        seq = scripted.start(gen)
        pieces, stats = [], None
        while stats is None:
            for got, item in scripted.step():
                assert got == seq
                if isinstance(item, Chunk):
                    pieces.append(item.text)
                else:
                    stats = item
        if text is not None:
            assert "".join(pieces).lstrip() == text.lstrip(), gen
        assert (stats.finish_reason, stats.generated_tokens) == (finish, n), gen


def test_generation_stops_at_the_sequence_context(scripted: Batch) -> None:
    room = scripted.seq_ctx
    seq = scripted.start(Generation([BOS, *([100] * (room - 3))], GREEDY, max_tokens=50))
    stats = None
    while stats is None:
        stats = next((i for _, i in scripted.step() if isinstance(i, Stats)), None)
    assert stats.finish_reason == "length" and stats.generated_tokens == 3
    assert scripted.cells(seq) == room


def test_refusals(scripted: Batch) -> None:
    with pytest.raises(UsageError):
        scripted.start(Generation([]))
    with pytest.raises(UsageError):
        scripted.start(Generation([BOS, 10**6]))
    with pytest.raises(ContextTooLong):
        scripted.start(Generation([BOS] * (scripted.seq_ctx + 1)))
    seqs = [scripted.start(Generation([100], GREEDY, max_tokens=100)) for _ in range(2)]
    with pytest.raises(EngineError, match="busy"):
        scripted.start(Generation([100]))
    for seq in seqs:
        scripted.cancel(seq)
    assert scripted.free == 2


def test_single_sequence_engines_are_unchanged(single: Engine) -> None:
    """n_seq_max defaults to 1: the REPL's and bench's engine loads as before."""
    assert EngineConfig(Path("x.gguf")).n_seq_max == 1
    assert single._c.llama_n_seq_max(single._ctx) == 1
    with pytest.raises(UsageError):
        EngineConfig(Path("x.gguf"), n_seq_max=0)


def test_a_seeded_reply_is_the_same_with_its_prompt_cached_or_not(
    small_mistral_q4_k_m: Path,
) -> None:
    """A quantized matmul rounds differently for one row than for many: the last prompt token is
    decoded alone either way, so a repeated request (its prompt cached) samples what it did."""
    import random

    sampling = Sampling(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=11)
    rng = random.Random(0)
    prompts = [[BOS, *(rng.randrange(3, 32000) for _ in range(rng.randrange(8, 60)))]
               for _ in range(12)]  # fmt: skip
    config = EngineConfig(small_mistral_q4_k_m, n_ctx=1024, n_threads=2, n_seq_max=2)
    with Engine(config) as engine:
        engine_config = EngineConfig(small_mistral_q4_k_m, n_ctx=512, n_threads=2)
        with Engine(engine_config) as single:
            for prompt in prompts:
                single.clear()
                fresh = alone(single, prompt, sampling, 6)
                assert alone(single, prompt, sampling, 6) == fresh  # the whole prompt cached
        batch = Batch(engine)
        for prompt in prompts:
            batch.clear_idle()
            runs = []
            for _ in range(2):
                seq = batch.start(Generation(prompt, sampling, max_tokens=6))
                runs.append(drain(batch, {seq: 0})[0][0])
            assert runs[0] == runs[1], prompt
