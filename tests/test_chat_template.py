"""chat.template: Mistral chat prompts token for token equal to mistral-common, through llama.cpp.

Each format is checked on generated conversations (single and multi-turn, with and without a
system prompt, unicode, numbers, whitespace) against mistral-common's encode_chat_completion,
with the text tokenized by llama.cpp from a tiny GGUF that localmix converted from that very
tokenizer file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from localmix.chat import template
from localmix.chat.reasoning import REASONING_PROMPT
from localmix.chat.template import Message, TemplateFormat, Think
from localmix.errors import InvalidGGUF, UsageError
from tests.tekken_files import checkpoint_with, shipped, tekken_file

N_CONVERSATIONS = 40

# format -> (synth tokenizer whose checkpoint we start from, mistral-common tokenizer file to use);
# the v7 tekken file and v11+ come from tests/tekken_files.py (mistral-common ships none of those)
TOKENIZERS = {
    "v1": ("v1", "tokenizer.model.v1"),
    "v2": ("v3", "mistral_instruct_tokenizer_240216.model.v2"),
    "v3": ("v3", "mistral_instruct_tokenizer_240323.model.v3"),
    "v3-tekken": ("tekken", "tekken_240718.json"),
    "v7": ("v3", "mistral_instruct_tokenizer_241114.model.v7"),
    "v7-tekken": ("tekken", "v7"),  # Mistral Small 3's rules
    "v11": ("tekken", "v11"),  # Mistral Small 3.2
    "v13": ("tekken", "v13"),  # Magistral, Ministral 3, Devstral Small 2
    "v15": ("tekken", "v15"),  # Mistral Small 4
}

WORDS = [
    "hello", "world", "Mistral", "The", "quick brown fox", "x", "42", "3.14159", "1,000,000",
    "10^9", "12345678", "é", "naïve", "résumé", "e\u0301", "ß", "ÄÖÜ", "Привет", "مرحبا", "日本語",
    "中文，标点。", "한국어", "ไทย", "😀", "👨‍👩‍👧", "𝔘𝔫𝔦", "ﬁ", "①", "—", "...", "?!", "don't",
    "I'M", "https://example.com/a?b=c", "def f(x):\n    return x**2", '{"k": [1, 2]}',
    "$$\\frac{1}{2}$$", "tab\t", "\n", "\n\n\n", "  spaced  ", "\u00a0", "a\r\nb", "[INST]",
    "</s>", "<unk>", "▁",
    # control markers typed as text: they stay text
    "[THINK]", "[/THINK]", "[SYSTEM_PROMPT]", "[/INST]", "[MODEL_SETTINGS]", "[TOOL_CALLS]",
    "[ARGS]", "<s>",
]  # fmt: skip
SYSTEMS = [
    "Be brief.",
    "You are a pirate.\nSpeak like one.",
    " padded system ",
    "Réponds en français.",
]


def conversations(
    seed: int, n: int = N_CONVERSATIONS, *, thinking: bool = False
) -> list[list[Message]]:
    """n conversations: 1-4 user turns, replies between them, a system prompt in about half;
    with thinking, replies carry Think parts (closed or not) and some system prompts too."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        parts = [
            rng.choice(WORDS) + rng.choice(["", " ", " ", "\n"]) for _ in range(rng.randint(lo, hi))
        ]
        return "".join(parts)

    def reply() -> Message:
        answer = text(1, 12).strip() or "ok"
        if not thinking or rng.random() < 0.3:
            return Message("assistant", answer)
        think = Think(text(0, 8), closed=rng.random() < 0.8)
        parts = [think] if rng.random() < 0.15 else [think, answer + rng.choice(["", "  ", "\n"])]
        return Message("assistant", tuple(parts))

    out: list[list[Message]] = [
        [Message("user", "Hi")],
        [Message("system", "Be brief."), Message("user", "Hi")],
        [Message("user", "Hi"), Message("assistant", "Hello!"), Message("user", "Bye")],
        [
            Message("system", "S"),
            Message("user", "a"),
            Message("assistant", "b  "),
            Message("user", "c"),
        ],
        [Message("user", "long " * 300 + "end")],
        [Message("user", "type [THINK] and [/INST] and </s> as text")],
    ]
    if thinking:
        out += [
            [
                Message("user", "2+2?"),
                Message("assistant", (Think("add them "), "4  ")),
                Message("assistant", (Think("more"), "!")),  # merged with the one before
                Message("user", "and 3+3?"),
            ],
            [Message("user", "x"), Message("assistant", (Think("cut off"),)), Message("user", "y")],
            [  # adjacent text parts of one message: "\n\n" before v15, "" in v15
                Message("system", ("sys a", "sys b")),
                Message("user", "x"),
                Message("assistant", ("part one", " part two  ")),
                Message("user", "y"),
            ],
        ]
    while len(out) < n:
        msgs = [Message("system", rng.choice(SYSTEMS))] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 4)):
            msgs.append(Message("user", text(1, 12) or "hi"))
            msgs.append(reply())
        out.append(msgs[:-1])
    return out


def _tokenizer_file(fmt: str, tmp: Path) -> Path:
    """The mistral-common tokenizer file for fmt."""
    name = TOKENIZERS[fmt][1]
    return tekken_file(name, tmp) if name.startswith("v") else shipped(name)


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def format_gguf(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path, Path]:
    """(format, its tokenizer file, a tiny GGUF converted from a checkpoint with that file)."""
    from localmix.build.convert import convert

    fmt = request.param
    tmp = tmp_path_factory.mktemp(f"fmt-{fmt}")
    tok_file = _tokenizer_file(fmt, tmp)
    # Mistral-native layout: the tokenizer file is the only vocabulary source, so swapping in
    # another version of the same size (v2/v7 for v3, tekken v7+ for v3) is all it takes.
    ckpt = checkpoint_with(tok_file, tmp, synth_tokenizer=TOKENIZERS[fmt][0])
    return fmt, tok_file, convert(ckpt, tmp / "model.gguf", outtype="f16")


def reference_content(m: Message) -> object:
    """A message's content as mistral-common's: text, or TextChunks and ThinkChunks."""
    from mistral_common.protocol.instruct.chunk import TextChunk, ThinkChunk

    if isinstance(m.content, str):
        return m.content
    return [
        TextChunk(text=p) if isinstance(p, str) else ThinkChunk(thinking=p.text, closed=p.closed)
        for p in m.content
    ]


def reference_request(msgs: list[Message], effort: str | None = None) -> object:
    """The same conversation as mistral-common's ChatCompletionRequest (Think -> ThinkChunk)."""
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        SystemMessage,
        UserMessage,
    )
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}

    return ChatCompletionRequest(
        messages=[kinds[m.role](content=reference_content(m)) for m in msgs],
        reasoning_effort=effort,
    )


def test_encode_matches_mistral_common(format_gguf: tuple[str, Path, Path]) -> None:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from localmix.llama.engine import Engine
    from localmix.llama.records import EngineConfig

    fmt, tok_file, gguf_path = format_gguf
    name = fmt.removesuffix("-tekken") if fmt == "v7-tekken" else fmt
    reference = MistralTokenizer.from_file(str(tok_file))
    convs = conversations(seed=len(fmt), thinking=template.get(name).think)
    convs += (
        [[Message("system", REASONING_PROMPT), *c[1:]] for c in convs[:4]] if name == "v13" else []
    )
    assert len(convs) >= N_CONVERSATIONS
    efforts = [None, *template.get(name).efforts]
    with Engine(EngineConfig(gguf_path, n_ctx=256, n_threads=1)) as engine:
        for i, msgs in enumerate(convs):
            effort = efforts[i % len(efforts)]
            expected = reference.encode_chat_completion(reference_request(msgs, effort)).tokens
            got = template.encode(name, msgs, engine.tokenize, reasoning_effort=effort)
            assert got == expected, msgs


@pytest.mark.parametrize("fmt", ["v1", "v7", "v3"])
def test_adding_a_turn_appends_tokens_except_v3_with_system(fmt: str) -> None:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    raw = MistralTokenizer.from_file(str(shipped(TOKENIZERS[fmt][1]))).instruct_tokenizer.tokenizer
    tokenize = _reference_tokenize(raw)
    for system in (None, "Be brief."):
        head = [Message("system", system)] if system else []
        turn1 = [*head, Message("user", "Hi")]
        turn2 = [*turn1, Message("assistant", "Hello"), Message("user", "Again")]
        first, second = template.encode(fmt, turn1, tokenize), template.encode(fmt, turn2, tokenize)
        stable = template.get(fmt).prefix_stable or system is None
        assert (second[: len(first)] == first) is stable


def _reference_tokenize(raw: object) -> template.Tokenize:
    """mistral-common's own tokenizer behind the engine's tokenize signature."""

    def tokenize(text: str, *, add_bos: bool = False, special: bool = True) -> list[int]:
        ids: list[int] | None = None
        if special:
            try:
                ids = [raw.get_special_token(text)]  # type: ignore[attr-defined]
            except Exception:
                ids = None
        if ids is None:
            ids = raw.encode(text, bos=False, eos=False)  # type: ignore[attr-defined]
        return [raw.bos_id, *ids] if add_bos else ids  # type: ignore[attr-defined]

    return tokenize


def test_unknown_format_and_role_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="v9"):
        template.get("v9")
    with pytest.raises(UsageError, match="tool"):
        template.encode("v1", [Message("tool", "x")], lambda t, **kw: [1])


# --- detection --------------------------------------------------------------------------------

_V3_TOKENS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]"]
# a 32000-piece list with "▁[", "INST", "]" where Mistral's v1 vocabulary has them; and where
# Llama 2's has them (518, 25580, 29962)
_V1_PIECES = [f"p{i}" for i in range(32000)]
_V1_PIECES[733], _V1_PIECES[16289], _V1_PIECES[28793] = "▁[", "INST", "]"
_LLAMA2_PIECES = [f"p{i}" for i in range(32000)]
_LLAMA2_PIECES[518], _LLAMA2_PIECES[25580], _LLAMA2_PIECES[29962] = "▁[", "INST", "]"
_MISTRAL_V1_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)
_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_TEKKEN = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "tekken"}
_TEKKEN_V7 = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
_LLAMA2 = "{% for m in messages %}[INST] <<SYS>>{{ m.content }}<</SYS>> [/INST]{% endfor %}"


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": _V3_TOKENS}, "v3"),
        (
            {
                "tokenizer.ggml.model": "llama",
                "tokenizer.ggml.tokens": [*_V3_TOKENS, "[SYSTEM_PROMPT]"],
            },
            "v7",
        ),
        ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "tekken"}, "v3-tekken"),
        (
            {
                "tokenizer.ggml.model": "gpt2",
                "tokenizer.ggml.pre": "tekken",
                "tokenizer.chat_template": "{{ '[SYSTEM_PROMPT]' }}[INST]",
            },
            "v7",
        ),
        ({"tokenizer.ggml.model": "llama", "tokenizer.chat_template": _MISTRAL_V1_TEMPLATE}, "v1"),
        # the name is not evidence; v1's pieces at their ids are
        ({"tokenizer.ggml.model": "llama", "general.name": "Mistral-7B-Instruct-v0.2"}, None),
        ({"tokenizer.ggml.model": "llama", "general.name": "llama-2-7b"}, None),
        ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": _V1_PIECES}, "v1"),
        ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": _LLAMA2_PIECES}, None),
        ({"tokenizer.ggml.model": "llama", "tokenizer.chat_template": _LLAMA2}, None),
        ({"tokenizer.ggml.model": "llama", "tokenizer.chat_template": _CHATML}, None),
        ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2"}, None),
        ({"tokenizer.chat_template": "mistral-v7-tekken"}, "v7"),  # llama.cpp's built-in names
        # tekken vocabularies by their control tokens (a converted file with no template)
        ({**_TEKKEN, "tokenizer.ggml.tokens": [*_TEKKEN_V7, "[ARGS]", "[CALL_ID]"]}, "v11"),
        ({**_TEKKEN, "tokenizer.ggml.tokens": [*_TEKKEN_V7, "[ARGS]", "[THINK]"]}, "v13"),
        ({**_TEKKEN, "tokenizer.ggml.tokens": [*_TEKKEN_V7, "[THINK]", "[MODEL_SETTINGS]"]}, "v15"),
        ({**_TEKKEN, "tokenizer.ggml.tokens": _TEKKEN_V7}, "v3-tekken"),
        # the tokens win over a built-in name that a converter wrote for an older version
        (
            {
                **_TEKKEN,
                "tokenizer.ggml.tokens": [*_TEKKEN_V7, "[THINK]"],
                "tokenizer.chat_template": "mistral-v7-tekken",
            },
            "v13",
        ),
        ({**_TEKKEN, "tokenizer.chat_template": _CHATML}, None),  # a ChatML fine-tune of Nemo
        ({"tokenizer.chat_template": "mistral-v1"}, "v1"),
        ({"tokenizer.chat_template": "chatml"}, None),
        # gguffile.inspect() shows long arrays by their length only
        (
            {
                "tokenizer.ggml.model": "llama",
                "tokenizer.ggml.tokens": "[32768 items]",
                "tokenizer.chat_template": "{{ '[INST]' }}",
            },
            "v3",
        ),
        (
            {
                "tokenizer.ggml.model": "llama",
                "tokenizer.ggml.tokens": "[32000 items]",
                "tokenizer.chat_template": _MISTRAL_V1_TEMPLATE,
            },
            "v1",
        ),
    ],
)
def test_detect_from_metadata(metadata: dict[str, object], expected: str | None) -> None:
    assert template.detect(metadata) == expected


def test_detect_on_converted_gguf(format_gguf: tuple[str, Path, Path]) -> None:
    from localmix import gguffile
    from localmix.llama.engine import Engine
    from localmix.llama.records import EngineConfig

    fmt, _, gguf_path = format_gguf
    # v2 differs from v3 only in tool calls; the tekken v7 file says "v7" itself
    expected = {"v2": "v3", "v7-tekken": "v7"}.get(fmt, fmt)
    # the header alone, as pull reads it (gguffile takes ~2 s on tekken's 131072 tokens)
    if fmt in ("v1", "v2", "v13"):
        assert template.detect(gguffile.inspect(gguf_path).metadata) == expected
    with Engine(EngineConfig(gguf_path, n_ctx=256, n_threads=1)) as engine:
        assert template.detect(engine.metadata, engine.tokenize) == expected
        without_template = {k: v for k, v in engine.metadata.items() if "chat_template" not in k}
        # sentencepiece, and tekken from v11 on: the control tokens tell
        if fmt in ("v2", "v3", "v7", "v11", "v13", "v15"):
            assert template.detect(without_template, engine.tokenize) == expected


@pytest.mark.parametrize(
    ("version", "thinking"),
    [("v7", False), ("v11", False), ("v13", False), ("v13", True), ("v15", False), ("v15", True)],
)
def test_mistral_common_generated_templates_are_detected(version: str, thinking: bool) -> None:
    """The jinja templates mistral-common generates for each tokenizer version (what Mistral's
    HF repos and GGUF converters carry), on a tekken vocabulary: the template tells."""
    from mistral_common.integrations.chat_templates.chat_templates import generate_chat_template
    from mistral_common.tokens.tokenizers.base import TokenizerVersion

    jinja = generate_chat_template(
        spm=False, tokenizer_version=TokenizerVersion(version), image_support=False,
        audio_support=False, thinking_support=thinking, default_system_prompt=None,
        plain_thinking_support=False, use_special_token_variables=True,
        model_settings_fields=None,
        reasoning_effort_values=("none", "high") if version == "v15" else None,
        reasoning_effort_default="none" if version == "v15" else None,
    )  # fmt: skip
    tekken = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "tekken"}
    assert template.detect({**tekken, "tokenizer.chat_template": jinja}) == version


@pytest.mark.parametrize(
    ("tokenizer", "expected"), [("v1", "v1"), ("v3", "v3"), ("tekken", "v3-tekken")]
)
def test_mistral_vocabularies_are_recognised_by_their_tokens_not_the_name(
    tokenizer: str, expected: str, tmp_path: Path
) -> None:
    """A GGUF converted from Mistral's real tokenizer with no chat template (as llama.cpp's
    converter writes one from a Hugging Face folder without it) and a name without "mistral"."""
    from localmix import gguffile
    from localmix.build.convert import convert
    from localmix.build.synth import checkpoints as synth
    from localmix.llama.engine import Engine
    from localmix.llama.records import EngineConfig

    ckpt = synth.checkpoint(tmp_path / "my-model", size="tiny", tokenizer=tokenizer, seed=0)
    config = ckpt / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": None}))
    gguf_path = convert(ckpt, tmp_path / "model.gguf", outtype="f16")
    metadata = gguffile.inspect(gguf_path).metadata
    assert metadata["general.name"] == "my-model"
    without_template = {k: v for k, v in metadata.items() if "chat_template" not in k}
    assert template.detect(without_template) == expected  # the header alone
    with Engine(EngineConfig(gguf_path, n_ctx=256, n_threads=1)) as engine:
        loaded = {k: v for k, v in engine.metadata.items() if "chat_template" not in k}
        assert template.detect(loaded, engine.tokenize) == expected
        assert template.for_model(loaded, engine.tokenize).name == expected


# --- a GGUF's own jinja template ----------------------------------------------------------------


def test_chatml_template_renders_like_hugging_face() -> None:
    fmt = TemplateFormat(_CHATML)
    msgs = [Message("system", "Sys"), Message("user", "Hi ✓")]
    assert template.render(fmt, msgs) == (
        "<|im_start|>system\nSys<|im_end|>\n<|im_start|>user\nHi ✓<|im_end|>\n<|im_start|>assistant\n"
    )


def test_for_model_falls_back_to_the_gguf_template() -> None:
    fmt = template.for_model({"tokenizer.chat_template": _CHATML}, bos_token="<s>")
    assert isinstance(fmt, TemplateFormat) and fmt.bos_token == "<s>"
    assert template.for_model({}, name="v7") is template.FORMATS["v7"]
    with pytest.raises(InvalidGGUF):
        template.for_model({"tokenizer.ggml.model": "gpt2"})
    with pytest.raises(InvalidGGUF, match="built-in"):
        template.for_model({"tokenizer.chat_template": "chatml"})


def test_template_helpers_raise_exception_and_strftime_now() -> None:
    fmt = TemplateFormat(_MISTRAL_V1_TEMPLATE, bos_token="<s>", eos_token="</s>")
    with pytest.raises(InvalidGGUF, match="alternate"):
        template.render(fmt, [Message("assistant", "first")])
    dated = TemplateFormat("{{ strftime_now('%Y') }}{% for m in messages %}{% break %}{% endfor %}")
    assert template.render(dated, [Message("user", "x")]).isdigit()


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages.__class__.__mro__ }}",
        "{{ ''.__class__.__base__.__subclasses__() }}",
        "{% set x = messages.append(1) %}",
        "{{ broken",
    ],
)
def test_template_sandbox_refuses_unsafe_or_broken_templates(source: str) -> None:
    with pytest.raises(InvalidGGUF):
        template.render(TemplateFormat(source), [Message("user", "x")])


def test_mistral_v1_hf_template_matches_v1_for_one_turn(tiny_mistral_gguf_f16: Path) -> None:
    """The HF template of Mistral 7B v0.1, rendered and tokenized by llama.cpp, equals the v1
    format for a single user turn (later turns differ: it glues replies onto "[/INST]")."""
    from localmix.llama.engine import Engine
    from localmix.llama.records import EngineConfig

    jinja = TemplateFormat(_MISTRAL_V1_TEMPLATE, bos_token="<s>", eos_token="</s>")
    with Engine(EngineConfig(tiny_mistral_gguf_f16, n_ctx=256, n_threads=1)) as engine:
        assert template.detect(engine.metadata, engine.tokenize) == "v1"  # its jinja template
        for text in ("Hi", "What is 2 + 2? ✓", "line one\nline two"):
            msgs = [Message("user", text)]
            assert template.encode(jinja, msgs, engine.tokenize) == template.encode(
                "v1", msgs, engine.tokenize
            )


def test_gguf_template_gets_exactly_one_bos(tiny_mistral_gguf_f16: Path) -> None:
    from localmix.llama.engine import Engine
    from localmix.llama.records import EngineConfig

    with_bos = TemplateFormat("{{ bos_token }}" + _CHATML, bos_token="<s>")
    msgs = [Message("user", "Hi")]
    with Engine(EngineConfig(tiny_mistral_gguf_f16, n_ctx=256, n_threads=1)) as engine:
        fmt = template.for_model({**engine.metadata, "tokenizer.chat_template": _CHATML})
        assert isinstance(fmt, TemplateFormat) and engine.adds_bos  # the vocabulary adds BOS
        for f in (fmt, with_bos):
            tokens = template.encode(f, msgs, engine.tokenize)
            assert tokens[0] == engine.bos_id and tokens[1] != engine.bos_id
            assert engine.detokenize(tokens[1:]).startswith("<|im_start|>user")
