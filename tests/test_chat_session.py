"""chat.Session on real llama.cpp: KV reuse across turns, context overflow, interruption, save/load.

The model is tests/scripted_gguf.py's: Mistral's v1 vocabulary, and greedy decoding that answers
every v1 prompt (which ends in "]" of "[/INST]") with "Hello there, world." and end of sequence.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from localmix.chat.session import Notice, Session
from localmix.chat.template import Message
from localmix.errors import ContextTooLong, InvalidGGUF, UsageError
from localmix.llama.engine import Engine
from localmix.llama.records import Chunk, EngineConfig, Sampling, Stats
from tests.scripted_gguf import write_scripted_gguf

REPLY = "Hello there, world."
# "]" (end of "[/INST]") -> ▁Hello ▁there , ▁world . -> </s>
_SCRIPT = {28793: 22557, 22557: 736, 736: 28725, 28725: 1526, 1526: 28723, 28723: 2}
REPLY_TOKENS = [22557, 736, 28725, 1526, 28723]


@pytest.fixture(scope="module")
def scripted_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_scripted_gguf(tmp_path_factory.mktemp("scripted") / "scripted.gguf", _SCRIPT)


def _engine(path: Path, n_ctx: int = 512) -> Engine:
    # llama.cpp rounds the context up to a multiple of 256 tokens; tests use 256 or 512
    return Engine(EngineConfig(path, n_ctx=n_ctx, n_threads=1))


def _session(engine: Engine, **kw: object) -> Session:
    kw.setdefault("sampling", Sampling.greedy())
    kw.setdefault("max_tokens", 16)
    return Session(engine, "v1", **kw)  # type: ignore[arg-type]


def _turn(session: Session, text: str) -> tuple[str, Stats, list[Notice]]:
    items = list(session.send(text))
    stats = items[-1]
    assert isinstance(stats, Stats)
    reply = "".join(i.text for i in items if isinstance(i, Chunk))
    return reply, stats, [i for i in items if isinstance(i, Notice)]


def _common_prefix(a: tuple[int, ...] | list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_session_reply_text_matches_mistral_common_decode(scripted_gguf: Path) -> None:
    from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer

    from tests.scripted_gguf import v1_tokenizer_path

    with _engine(scripted_gguf) as engine:
        session = _session(engine)
        items = list(session.send("Hi"))
    chunks = [i for i in items if isinstance(i, Chunk)]
    assert [c.token for c in chunks if c.token >= 0] == REPLY_TOKENS
    assert chunks[0].text == "Hello"  # the SentencePiece word-start space is not shown
    reference = SentencePieceTokenizer(str(v1_tokenizer_path())).decode(REPLY_TOKENS)
    assert session.messages == [Message("user", "Hi"), Message("assistant", reference)]
    assert reference == REPLY
    assert isinstance(items[-1], Stats) and items[-1].finish_reason == "stop"


@pytest.mark.parametrize("system", [None, "Be brief."])
def test_second_turn_processes_only_its_new_tokens(scripted_gguf: Path, system: str | None) -> None:
    with _engine(scripted_gguf) as engine:
        session = _session(engine, system=system)
        _, first, _ = _turn(session, "What is the capital of France?")
        prompt1 = first.prompt_tokens
        assert first.cached_tokens == 0
        kv_after_first = engine.kv_tokens
        new_turn = engine.tokenize("[INST] And of Italy? [/INST]", special=False)

        _, second, _ = _turn(session, "And of Italy?")

        # the cache held prompt 1 and the reply; the engine processed </s> and the new turn only
        assert len(kv_after_first) == prompt1 + len(REPLY_TOKENS)
        assert second.cached_tokens == len(kv_after_first)
        assert second.prompt_tokens == 1 + len(new_turn)
        assert session.prompt(session.messages[:-1])[: len(kv_after_first)] == list(kv_after_first)


def test_turn_after_clear_reuses_only_the_shared_prefix(scripted_gguf: Path) -> None:
    with _engine(scripted_gguf) as engine:
        session = _session(engine)
        _turn(session, "one")
        session.clear()
        assert session.messages == []
        kv = engine.kv_tokens
        _, stats, _ = _turn(session, "two")
        # only <s> ▁[ INST ] are shared with the cache; the engine processed the rest
        assert stats.cached_tokens == _common_prefix(kv, session.prompt(session.messages[:-1])) == 4
        assert [m.role for m in session.messages] == ["user", "assistant"]


@pytest.mark.parametrize("system", [None, "You are terse."])
def test_context_full_shifts_out_oldest_turn_with_notice(
    scripted_gguf: Path, system: str | None
) -> None:
    with _engine(scripted_gguf, n_ctx=256) as engine:
        session = _session(engine, system=system, max_tokens=8, overflow="shift")
        notices: list[Notice] = []
        turns = 0
        while not notices:
            turns += 1
            assert turns < 40, "the context never filled"
            kv_before = engine.kv_tokens
            reply, stats, notices = _turn(session, f"question number {turns}")
            assert reply == REPLY

        assert notices[0].text.startswith("context full: dropped 1 oldest turn")
        # the new turn was processed on top of the shifted cache: only </s> and the new turn
        new_turn = engine.tokenize(f"[INST] question number {turns} [/INST]", special=False)
        assert stats.prompt_tokens == 1 + len(new_turn)
        assert stats.cached_tokens == len(kv_before) - _dropped_len(session, system)
        users = [m.content for m in session.messages if m.role == "user"]
        if system is None:
            assert users[0] == "question number 2"  # the oldest turn is gone
        else:
            # v1 carries the system prompt in the first user message: that turn is kept
            assert users[:2] == ["question number 1", "question number 3"]
        # what the cache holds is exactly the prompt of the kept conversation plus the reply
        prompt = session.prompt(session.messages[:-1])
        assert list(engine.kv_tokens) == prompt + REPLY_TOKENS


def _dropped_len(session: Session, system: str | None) -> int:
    """Tokens of the dropped turn: [INST] question number N [/INST], the reply, </s>."""
    n = 2 if system else 1
    user = session.engine.tokenize(f"[INST] question number {n} [/INST]", special=False)
    return len(user) + len(REPLY_TOKENS) + 1


def test_context_full_drop_mode_reprocesses_after_the_cut(scripted_gguf: Path) -> None:
    with _engine(scripted_gguf, n_ctx=256) as engine:
        session = _session(engine, max_tokens=8, overflow="drop")
        notices: list[Notice] = []
        n = 0
        while not notices:
            n += 1
            assert n < 40, "the context never filled"
            kv_before = engine.kv_tokens
            _, stats, notices = _turn(session, f"question number {n}")
        prompt = session.prompt(session.messages[:-1])
        assert stats.cached_tokens == _common_prefix(kv_before, prompt)
        assert stats.prompt_tokens == len(prompt) - stats.cached_tokens
        assert stats.prompt_tokens > len(prompt) // 2  # the history after the cut ran again


def test_prompt_longer_than_context_is_context_too_long(scripted_gguf: Path) -> None:
    with _engine(scripted_gguf, n_ctx=256) as engine:
        session = _session(engine)
        _turn(session, "hi")
        before = list(session.messages)
        with pytest.raises(ContextTooLong) as err:
            list(session.send("word " * 400))
        assert err.value.hint
        assert session.messages == before
        assert _turn(session, "still here?")[0] == REPLY


def test_interrupted_reply_is_kept_and_the_next_turn_continues(scripted_gguf: Path) -> None:
    with _engine(scripted_gguf) as engine:
        session = _session(engine)
        stream = session.send("Tell me")
        got = []
        for item in stream:
            assert isinstance(item, Chunk)
            got.append(item.text)
            if len(got) == 2:
                break
        stream.close()  # what the REPL does on Ctrl-C
        assert "".join(got) == "Hello there"
        assert session.messages[-1] == Message("assistant", "Hello there")
        assert session.last_stats is not None and session.last_stats.finish_reason == "interrupted"
        kv = engine.kv_tokens
        reply, stats, _ = _turn(session, "Go on")
        assert reply == REPLY
        # the partial reply is re-encoded as a finished assistant turn (…</s>); the cache is reused
        assert stats.cached_tokens == _common_prefix(kv, session.prompt(session.messages[:-1]))
        assert stats.cached_tokens >= len(kv) - 1


def test_save_load_round_trip(scripted_gguf: Path, tmp_path: Path) -> None:
    with _engine(scripted_gguf) as engine:
        session = _session(engine, system="Answer in French.", model="scripted")
        _turn(session, "Bonjour ✓ 42")
        session.set_option("temperature", "0.3")
        session.set_option("seed", "7")
        session.set_option("max_tokens", "33")
        path = session.save(tmp_path / "chat.json")
        saved = json.loads(path.read_text(encoding="utf-8"))
        assert saved["version"] == 2 and saved["model"] == "scripted"
        old = tmp_path / "v1.json"  # what localmix wrote before replies could hold thinking
        old.write_text(json.dumps({**saved, "version": 1}), encoding="utf-8")
        assert _session(engine).load(old) == "scripted"

        other = _session(engine)
        assert other.load(path) == "scripted"
        assert other.messages == session.messages
        assert other.system == "Answer in French."
        assert other.sampling == session.sampling and other.sampling.seed == 7
        assert other.max_tokens == 33
        assert other.prompt() == session.prompt()


def test_load_rejects_other_files(scripted_gguf: Path, tmp_path: Path) -> None:
    with _engine(scripted_gguf) as engine:
        session = _session(engine)
        bad = tmp_path / "bad.json"
        bad.write_text("{not json", encoding="utf-8")
        with pytest.raises(UsageError):
            session.load(bad)
        bad.write_text(json.dumps({"format": "localmix-chat", "version": 99}), encoding="utf-8")
        with pytest.raises(UsageError, match="version 99"):
            session.load(bad)
        with pytest.raises(UsageError):
            session.load(tmp_path / "missing.json")


def test_set_option_validates(scripted_gguf: Path) -> None:
    with _engine(scripted_gguf) as engine:
        session = _session(engine)
        session.set_option("top_k", "5")
        session.set_option("seed", "none")
        assert session.sampling.top_k == 5 and session.sampling.seed is None
        assert session.settings()["top_k"] == 5
        for name, value in [
            ("temperature", "hot"),
            ("top_p", "2"),
            ("colour", "1"),
            ("max_tokens", "0"),
        ]:
            with pytest.raises(UsageError):
                session.set_option(name, value)


def test_a_mistral_vocabulary_is_known_by_its_tokens_not_its_name(scripted_gguf: Path) -> None:
    with _engine(scripted_gguf) as engine:
        # Mistral's v1 vocabulary in a model named "scripted", with no chat template
        assert Session(engine).format.name == "v1"


def test_model_without_known_format_or_template_is_invalid_gguf(tmp_path: Path) -> None:
    from tests.quant_tables import MISTRAL_7B, tiny, write_f16_gguf

    # a vocabulary of its own (not Mistral's), no chat template, named "Mistral 7B"
    path = write_f16_gguf(tiny(MISTRAL_7B, n_layer=1), tmp_path / "foreign.gguf")
    with _engine(path, n_ctx=256) as engine, pytest.raises(InvalidGGUF):
        Session(engine)
