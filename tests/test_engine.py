"""The engine on real llama.cpp: tiny random-weight models from the shared fixtures, and a scripted
model (tests/scripted_gguf.py) whose greedy output is chosen token by token."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from localmix.errors import ContextTooLong, EngineError, InvalidGGUF, UsageError
from localmix.llama.engine import Chunk, Engine, EngineConfig, Sampling, Stats
from localmix.llama.textstream import TextStream

from .scripted_gguf import write_scripted_gguf

BOS, EOS = 1, 2
PROMPT = [BOS, 1014, 4419, 18760, 286, 272, 17898, 3914, 754, 28723]


def byte_token(value: int) -> int:
    """v1 vocabulary: <0x00> .. <0xFF> are tokens 3 .. 258."""
    return 3 + value


def run(stream: Iterator[Chunk | Stats]) -> tuple[list[Chunk], Stats]:
    items = list(stream)
    *chunks, stats = items
    assert isinstance(stats, Stats)
    assert all(isinstance(c, Chunk) for c in chunks)
    return chunks, stats


def tokens_of(chunks: list[Chunk]) -> list[int]:
    return [c.token for c in chunks if c.token >= 0]


@pytest.fixture(scope="module")
def engine(tiny_mistral_gguf_f16: Path) -> Iterator[Engine]:
    with Engine(EngineConfig(tiny_mistral_gguf_f16, n_ctx=512, n_threads=2)) as eng:
        yield eng


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Engine, dict[int, int]]]:
    """BOS → € (3 byte tokens) → 😀 (4 byte tokens) → ▁Hello → ▁world → ! → EOS, and a 2-cycle."""
    euro = [byte_token(b) for b in "€".encode()]
    smile = [byte_token(b) for b in "😀".encode()]
    hello, world, bang = 22557, 1526, 28808  # ▁Hello, ▁world, !
    script = [BOS, *euro, *smile, hello, world, bang, EOS]
    successors = dict(itertools.pairwise(script))
    successors.update({100: 101, 101: 100})  # a loop that never ends
    path = write_scripted_gguf(tmp_path_factory.mktemp("scripted") / "scripted.gguf", successors)
    with Engine(EngineConfig(path, n_ctx=256, n_threads=2)) as eng:
        yield eng, successors


def test_engine_reports_model_facts(engine: Engine) -> None:
    assert engine.n_vocab == 32000
    assert engine.n_ctx >= 512
    assert (engine.bos_id, engine.eos_id) == (BOS, EOS)
    assert engine.n_layer >= 1 and engine.n_embd > 0 and engine.n_ctx_train > 0
    assert engine.metadata["general.architecture"] == "llama"
    assert engine.description and engine.system_info
    assert engine.size_bytes > 0 and engine.n_params > 0


def test_tokenize_and_detokenize_round_trip(engine: Engine) -> None:
    text = "Hello world, ça va? 東京"
    tokens = engine.tokenize(text, add_bos=True)
    assert tokens[0] == BOS
    assert engine.detokenize(tokens[1:]) == text
    assert engine.tokenize("</s>", special=True) == [EOS]
    assert engine.tokenize("</s>", special=False) != [EOS]
    assert engine.token_piece(EOS) == b"</s>"
    assert engine.token_piece(byte_token(0xE2)) == b"\xe2"


def test_greedy_stream_is_deterministic(engine: Engine) -> None:
    first, stats = run(engine.stream(PROMPT, sampling=Sampling.greedy(), max_tokens=24))
    engine.clear()
    second, _ = run(engine.stream(PROMPT, sampling=Sampling.greedy(), max_tokens=24))
    assert tokens_of(first) == tokens_of(second)
    assert stats.generated_tokens == len(tokens_of(first)) > 0
    assert stats.finish_reason in ("stop", "length")


@pytest.mark.parametrize("model", ["tiny_mistral_gguf_f16", "tiny_mixtral_gguf_f16"])
def test_greedy_stream_matches_llama_cpp_python(model: str, request: pytest.FixtureRequest) -> None:
    from llama_cpp import Llama

    path: Path = request.getfixturevalue(model)
    with Engine(EngineConfig(path, n_ctx=512, n_threads=2)) as eng:
        chunks, _ = run(eng.stream(PROMPT, sampling=Sampling.greedy(), max_tokens=24))
    ours = tokens_of(chunks)
    reference = Llama(str(path), n_ctx=512, n_threads=2, verbose=False)
    try:
        theirs = []
        for token in reference.generate(PROMPT, temp=0.0, repeat_penalty=1.0):
            if token == EOS or len(theirs) == len(ours):
                break
            theirs.append(token)
    finally:
        reference.close()
    assert ours == theirs


def test_greedy_tokens_are_the_argmax_of_logits(engine: Engine) -> None:
    engine.clear()
    chunks, _ = run(
        engine.stream(PROMPT, sampling=Sampling.greedy(), max_tokens=8, ignore_eos=True)
    )
    generated = tokens_of(chunks)
    logits = engine.logits(PROMPT + generated[:-1])
    assert logits.shape == (len(PROMPT) + len(generated) - 1, engine.n_vocab)
    assert str(logits.dtype) == "float32"
    assert list(logits[len(PROMPT) - 1 :].argmax(axis=1)) == generated
    assert engine.kv_tokens == tuple(PROMPT + generated[:-1])
    # logits() grew llama.cpp's output buffer (it may move): greedy picks read the new one.
    engine.clear()
    again, _ = run(engine.stream(PROMPT, sampling=Sampling.greedy(), max_tokens=8, ignore_eos=True))
    assert tokens_of(again) == generated


def test_engines_keep_cpu_thread_pools(tiny_mistral_gguf_f16: Path) -> None:
    """One pool when prompt and generation use the same thread count, two otherwise (as llama-cli
    does), and the output does not depend on the pools."""
    outputs = []
    for threads, batch, pools in ((2, None, 1), (1, 2, 2)):
        config = EngineConfig(
            tiny_mistral_gguf_f16, n_ctx=256, n_threads=threads, n_threads_batch=batch
        )
        with Engine(config) as eng:
            assert eng.thread_pools == pools
            chunks, _ = run(eng.stream(PROMPT, sampling=Sampling.greedy(), max_tokens=6))
            outputs.append(tokens_of(chunks))
    assert outputs[0] == outputs[1] and outputs[0]


def test_seeded_sampling_is_reproducible(engine: Engine) -> None:
    sampling = Sampling(seed=1234, temperature=1.0)
    engine.clear()
    first, _ = run(engine.stream(PROMPT, sampling=sampling, max_tokens=16, ignore_eos=True))
    engine.clear()
    second, _ = run(engine.stream(PROMPT, sampling=sampling, max_tokens=16, ignore_eos=True))
    assert tokens_of(first) == tokens_of(second)


def test_second_stream_processes_only_new_tokens(engine: Engine) -> None:
    engine.clear()
    chunks, stats = run(
        engine.stream(PROMPT, sampling=Sampling.greedy(), max_tokens=6, ignore_eos=True)
    )
    assert (stats.prompt_tokens, stats.cached_tokens) == (len(PROMPT), 0)
    reply = tokens_of(chunks)
    follow_up = PROMPT + reply + [733, 16289, 28793]
    _, stats = run(engine.stream(follow_up, sampling=Sampling.greedy(), max_tokens=2))
    # The reply's last token was sampled but never decoded, so it is processed with the new ones.
    assert stats.cached_tokens == len(PROMPT) + len(reply) - 1
    assert stats.prompt_tokens == 4
    assert engine.kv_tokens[: len(follow_up)] == tuple(follow_up)


def test_same_prompt_again_reprocesses_one_token(engine: Engine) -> None:
    engine.clear()
    first, _ = run(engine.stream(PROMPT, sampling=Sampling.greedy(), max_tokens=1))
    second, stats = run(engine.stream(PROMPT, sampling=Sampling.greedy(), max_tokens=1))
    assert (stats.prompt_tokens, stats.cached_tokens) == (1, len(PROMPT) - 1)
    assert tokens_of(first) == tokens_of(second)


def test_diverging_prompt_drops_the_rest_of_the_cache(engine: Engine) -> None:
    engine.clear()
    engine.process(PROMPT)
    other = [*PROMPT[:4], 415, 2936]
    _, stats = run(engine.stream(other, sampling=Sampling.greedy(), max_tokens=1))
    assert (stats.prompt_tokens, stats.cached_tokens) == (2, 4)
    assert engine.kv_tokens == tuple(other)


def test_max_tokens_finishes_with_length(engine: Engine) -> None:
    engine.clear()
    chunks, stats = run(engine.stream(PROMPT, max_tokens=5, ignore_eos=True))
    assert len(tokens_of(chunks)) == stats.generated_tokens == 5
    assert stats.finish_reason == "length"
    _, stats = run(engine.stream(PROMPT, max_tokens=0))
    assert (stats.generated_tokens, stats.finish_reason) == (0, "length")


def test_closing_a_stream_midway_keeps_the_cache_consistent(engine: Engine) -> None:
    engine.clear()
    full, _ = run(engine.stream(PROMPT, sampling=Sampling.greedy(), max_tokens=12, ignore_eos=True))
    expected = tokens_of(full)

    engine.clear()
    stream = engine.stream(PROMPT, sampling=Sampling.greedy(), max_tokens=12, ignore_eos=True)
    seen = [next(stream).token for _ in range(5)]
    stream.close()
    assert engine.last_stats is not None
    assert engine.last_stats.finish_reason == "interrupted"
    # Each token is decoded before its text is handed out, so all five are in the cache.
    assert engine.kv_tokens == tuple(PROMPT + seen)

    rest, stats = run(
        engine.stream(PROMPT + seen, sampling=Sampling.greedy(), max_tokens=7, ignore_eos=True)
    )
    assert stats.cached_tokens == len(PROMPT) + len(seen) - 1
    assert seen + tokens_of(rest) == expected


def test_a_new_call_closes_the_open_stream(engine: Engine) -> None:
    engine.clear()
    stream = engine.stream(PROMPT, sampling=Sampling.greedy(), max_tokens=12)
    first = next(stream).token
    engine.process([415])  # the open stream is closed first, its cache state kept
    assert engine.last_stats is not None and engine.last_stats.finish_reason == "interrupted"
    assert engine.kv_tokens == (*PROMPT, first, 415)
    with pytest.raises(StopIteration):
        next(stream)


def test_process_and_decode_one_append_to_the_cache(engine: Engine) -> None:
    engine.clear()
    engine.process(PROMPT)
    engine.decode_one(415)
    assert engine.kv_tokens == (*PROMPT, 415)


def test_shift_drops_positions_and_generation_goes_on(engine: Engine) -> None:
    engine.clear()
    engine.process(PROMPT)
    engine.shift(keep=2, discard=5)
    assert engine.kv_tokens == tuple(PROMPT[:2] + PROMPT[7:])
    prompt = [*engine.kv_tokens, 415]
    chunks, stats = run(engine.stream(prompt, sampling=Sampling.greedy(), max_tokens=3))
    assert stats.cached_tokens == len(prompt) - 1
    assert chunks
    with pytest.raises(UsageError):
        engine.shift(keep=2, discard=1000)


def test_prompt_longer_than_the_context_is_refused(engine: Engine) -> None:
    too_long = [BOS] + [415] * engine.n_ctx
    with pytest.raises(ContextTooLong):
        engine.stream(too_long)
    engine.clear()
    with pytest.raises(ContextTooLong):
        engine.process(too_long)
    assert engine.kv_tokens == ()


def test_generation_stops_when_the_context_is_full(engine: Engine) -> None:
    engine.clear()
    prompt = [BOS] + [415] * (engine.n_ctx - 4)
    _, stats = run(engine.stream(prompt, max_tokens=100, ignore_eos=True))
    assert stats.finish_reason == "length"
    assert stats.generated_tokens == engine.n_ctx - len(prompt) + 1
    assert len(engine.kv_tokens) == engine.n_ctx


def test_utf8_characters_are_never_split(scripted: tuple[Engine, dict[int, int]]) -> None:
    eng, _ = scripted
    eng.clear()
    chunks, stats = run(eng.stream([BOS], sampling=Sampling.greedy(), max_tokens=50))
    assert [c.text for c in chunks] == ["", "", "€", "", "", "", "😀", " Hello", " world", "!"]
    assert stats.finish_reason == "stop"
    assert stats.generated_tokens == 10


@pytest.mark.parametrize(
    ("stop", "text"),
    [
        (["world"], "€😀 Hello "),
        (["lo wor"], "€😀 Hel"),  # a stop string across two tokens
        (["😀"], "€"),
        (["!"], "€😀 Hello world"),
        (["absent"], "€😀 Hello world!"),
    ],
)
def test_stop_strings_end_the_stream_before_them(
    scripted: tuple[Engine, dict[int, int]], stop: list[str], text: str
) -> None:
    eng, _ = scripted
    chunks, stats = run(eng.stream([BOS], sampling=Sampling.greedy(), max_tokens=50, stop=stop))
    assert "".join(c.text for c in chunks) == text
    assert stats.finish_reason == ("stop" if stop == ["absent"] else "stop_string")


def test_end_of_sequence_is_not_text_and_ignore_eos_goes_on(
    scripted: tuple[Engine, dict[int, int]],
) -> None:
    eng, _ = scripted
    chunks, stats = run(eng.stream([BOS], sampling=Sampling.greedy(), max_tokens=50))
    assert EOS not in tokens_of(chunks) and stats.finish_reason == "stop"
    chunks, stats = run(
        eng.stream([BOS], sampling=Sampling.greedy(), max_tokens=12, ignore_eos=True)
    )
    assert tokens_of(chunks)[10] == EOS and stats.finish_reason == "length"


def test_a_loop_runs_until_max_tokens(scripted: tuple[Engine, dict[int, int]]) -> None:
    eng, _ = scripted
    chunks, stats = run(eng.stream([100], sampling=Sampling.greedy(), max_tokens=7))
    assert tokens_of(chunks) == [101, 100, 101, 100, 101, 100, 101]
    assert stats.finish_reason == "length"


@pytest.mark.parametrize("text", ["€😀 naïve 東京", "plain ascii", "\U0001f600\U0001f680é"])
def test_text_stream_never_splits_characters_at_any_byte_boundary(text: str) -> None:
    data = text.encode()
    for size in (1, 2, 3):
        stream = TextStream()
        out = [stream.feed(data[i : i + size]) for i in range(0, len(data), size)]
        assert "".join(out) + stream.flush() == text
        assert all("\ufffd" not in piece for piece in out)


def test_text_stream_flushes_an_incomplete_character_as_replacement() -> None:
    stream = TextStream()
    assert stream.feed(b"ok\xe2\x82") == "ok"
    assert stream.flush() == "\ufffd"


def test_text_stream_holds_back_a_possible_stop_string() -> None:
    stream = TextStream(["</answer>"])
    assert stream.feed(b"fine </") == "fine "
    assert stream.feed(b"ans") == ""
    assert stream.feed(b"wer> more") == ""
    assert stream.stopped
    stream = TextStream(["</answer>"])
    assert stream.feed(b"a </an") == "a "
    assert stream.feed(b"d") == "</and"
    assert stream.feed(b" </") == " "
    assert stream.flush() == "</"


def test_bad_model_files_are_invalid_gguf(tmp_path: Path) -> None:
    with pytest.raises(InvalidGGUF):
        Engine(EngineConfig(tmp_path / "missing.gguf"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 100)
    with pytest.raises(InvalidGGUF):
        Engine(EngineConfig(junk))


@pytest.mark.parametrize(
    "change",
    [{"flash_attn": "maybe"}, {"type_k": "q3_k"}, {"n_threads": 0}, {"n_batch": 0}],
)
def test_bad_engine_settings_are_usage_errors(change: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        EngineConfig(Path("model.gguf"), **change)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "change", [{"temperature": -1.0}, {"top_p": 0.0}, {"min_p": 2.0}, {"repeat_penalty": 0.0}]
)
def test_bad_sampling_settings_are_usage_errors(change: dict[str, float]) -> None:
    with pytest.raises(UsageError):
        Sampling(**change)  # type: ignore[arg-type]


def test_kv_cache_types_and_flash_attention_load(tiny_mistral_gguf_f16: Path) -> None:
    config = EngineConfig(
        tiny_mistral_gguf_f16, n_ctx=256, flash_attn="on", type_k="bf16", type_v="f32"
    )
    with Engine(config) as eng:
        _, stats = run(eng.stream(PROMPT, max_tokens=4, ignore_eos=True))
        assert stats.generated_tokens == 4


def test_close_is_idempotent_and_final(tiny_mistral_gguf_f16: Path) -> None:
    eng = Engine(EngineConfig(tiny_mistral_gguf_f16, n_ctx=128))
    stream = eng.stream(PROMPT, max_tokens=4)
    next(stream)
    eng.close()
    eng.close()
    with pytest.raises(EngineError):
        eng.tokenize("hi")
    with pytest.raises(EngineError):
        eng.stream(PROMPT)


def test_a_build_without_the_thread_pool_api_still_loads(
    tiny_mistral_gguf_f16: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ggml then makes a pool per graph itself: slower on some builds, never wrong."""
    from localmix.llama import lib

    monkeypatch.setattr(lib, "_threadpool_api", lambda: None)
    with Engine(EngineConfig(tiny_mistral_gguf_f16, n_ctx=256, n_threads=2)) as eng:
        assert eng.thread_pools == 0
        chunks, stats = run(eng.stream(PROMPT, sampling=Sampling.greedy(), max_tokens=4))
        assert stats.generated_tokens == len(tokens_of(chunks)) > 0
