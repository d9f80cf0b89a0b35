"""llama.constraint and chat.grammars: constrained decoding on real llama.cpp.

Tiny random-weight models (a v1 sentencepiece vocabulary of 32000 tokens, a v7 one of 32768 with
the tool tokens, a tekken one of 131072 with every v11+ control token) write JSON and Mistral tool
calls under the grammars; the loop here is the one a driver runs (mask, pick, accept, decode).
Random weights write anything: whatever they write must parse, validate and use exactly the
version's syntax, in every run.

The picker is a seeded draw over the softmax of the masked logits (or their argmax). For the
tool-call grammars the draw adds a bias to the control tokens and to tokens that close a string
or an object, a sampling policy like a request's logit_bias, so that the random model reaches
the grammar's every branch within a few hundred tokens; the mask still decides what is allowed
(a bias cannot lift a token out of -inf). The JSON schemas bound their strings (maxLength) and
arrays instead, and are drawn without any bias.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from localmix.chat import grammars
from localmix.chat.grammars import ANY_OBJECT, JsonOutput, Named
from localmix.chat.template import control_token
from localmix.chat.tools import Tool
from localmix.errors import EngineError, InvalidGGUF, UsageError
from localmix.llama import constraint
from localmix.llama.engine import Engine, EngineConfig
from tests.tekken_files import random_model, shipped, tekken_file

CONTROL = ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "[THINK]", "[/THINK]")


@pytest.fixture(scope="module")
def spm(tiny_mistral_gguf_f16: Path) -> Iterator[Engine]:
    """Mistral's v1 sentencepiece vocabulary (32000 tokens)."""
    with Engine(EngineConfig(tiny_mistral_gguf_f16, n_ctx=1024, n_threads=1)) as engine:
        yield engine


@pytest.fixture(scope="module")
def spm_tools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """The v7 sentencepiece vocabulary (32768 tokens; [TOOL_CALLS] is 5), for v2, v3 and v7."""
    folder = tmp_path_factory.mktemp("constraint-spm-v7")
    tokenizer = shipped("mistral_instruct_tokenizer_241114.model.v7")
    with Engine(EngineConfig(random_model(folder, tokenizer, "v3"), n_ctx=1024, n_threads=1)) as e:
        yield e


@pytest.fixture(scope="module")
def tekken(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """A v15 tekken vocabulary (131072 tokens, [TOOL_CALLS] 9, [ARGS] 32, [CALL_ID] 33, [THINK]
    34, [/THINK] 35): the grammars of every tekken version need only those ids."""
    folder = tmp_path_factory.mktemp("constraint-tekken")
    tokenizer = tekken_file("v15", folder)
    with Engine(
        EngineConfig(random_model(folder, tokenizer, "tekken"), n_ctx=1024, n_threads=1)
    ) as e:
        yield e


# -- the driver ----------------------------------------------------------------------------------


def pick(row: np.ndarray, rng: np.random.Generator | None) -> int:
    """argmax (rng None) or a draw from the softmax of the allowed (finite) logits."""
    if rng is None:
        return int(row.argmax())
    ids = np.flatnonzero(row > -np.inf)
    z = row[ids].astype(np.float64)
    p = np.exp(z - z.max())
    return int(ids[rng.choice(len(ids), p=p / p.sum())])


def generate(
    engine: Engine,
    con: constraint.Constraint,
    seed: int | None,
    *,
    bias: tuple[np.ndarray, np.ndarray] | None = None,
    max_tokens: int = 600,
) -> list[int]:
    """The tokens the model writes under the constraint, up to (without) its end token."""
    engine.clear()
    engine.process(engine.tokenize("Answer:", add_bos=True))
    rng = None if seed is None else np.random.default_rng(seed)
    out: list[int] = []
    for _ in range(max_tokens):
        row = engine.logits_at(-1)
        if bias is not None:
            row[bias[0]] += bias[1]
        con.mask(row)
        token = pick(row, rng)
        con.accept(token)
        if token in con.end_ids:
            assert con.done
            return out
        out.append(token)
        engine.decode_one(token)
    pytest.fail(f"no end within {max_tokens} tokens: {text(engine, out)[:300]!r}")


def text(engine: Engine, tokens: list[int]) -> str:
    """The bytes the tokens write, as UTF-8 (strictly: the grammar allows only valid text)."""
    return b"".join(engine.piece(t) for t in tokens).decode("utf-8")


def specials(engine: Engine) -> Callable[[str], int]:
    return lambda piece: control_token(engine.tokenize, piece)


# -- JSON schemas --------------------------------------------------------------------------------

STR = {"type": "string", "maxLength": 10}
SCHEMAS: dict[str, dict] = {
    "flat object": {
        "type": "object",
        "properties": {"name": STR, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "enum": {"enum": ["red", "green", "blue"]},
    "mixed enum": {"enum": ["a", None, 1, True, {"k": [1]}]},
    "nested objects": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "tags": {"type": "array", "items": STR, "maxItems": 3},
                    "address": {
                        "type": "object",
                        "properties": {
                            "city": STR,
                            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                        },
                        "required": ["city", "zip"],
                        "additionalProperties": False,
                    },
                },
                "required": ["id", "tags", "address"],
                "additionalProperties": False,
            }
        },
        "required": ["user"],
        "additionalProperties": False,
    },
    "array min/max items": {
        "type": "array",
        "items": {"type": "integer", "minimum": -50, "maximum": 50},
        "minItems": 2,
        "maxItems": 4,
    },
    "booleans and null": {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "nothing": {"type": "null"}},
        "required": ["ok", "nothing"],
        "additionalProperties": False,
    },
    "bounded number": {"type": "number", "minimum": -1, "maximum": 1},
    "number": {"type": "number"},
    "integer multipleOf": {"type": "integer", "minimum": 0, "maximum": 1000, "multipleOf": 5},
    "anyOf": {"anyOf": [{"type": "integer"}, STR, {"type": "null"}]},
    "oneOf tagged": {
        "oneOf": [
            {
                "type": "object",
                "properties": {"kind": {"const": "circle"}, "r": {"type": "number", "minimum": 0}},
                "required": ["kind", "r"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {"kind": {"const": "square"}, "side": {"type": "integer"}},
                "required": ["kind", "side"],
                "additionalProperties": False,
            },
        ]
    },
    "unicode strings": {
        "type": "object",
        "properties": {
            "greeting": {"enum": ["héllo wörld", "日本語", "Ελληνικά", "emoji 😀", "Привет"]},
            "free": {"type": "string", "minLength": 1, "maxLength": 6},
            "fixed": {"const": "naïve — ✓"},
        },
        "required": ["greeting", "free", "fixed"],
        "additionalProperties": False,
    },
    "optional properties": {
        "type": "object",
        "properties": {
            "a": {"type": "integer"},
            "b": STR,
            "c": {"type": "boolean"},
            "d": {"type": "null"},
        },
        "required": ["a"],
        "additionalProperties": False,
    },
    "type list": {"type": ["string", "null"], "maxLength": 6},
    "const object": {"const": {"version": 2, "ok": True}},
    "pattern": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
    "defs and refs": {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "type": "array",
        "items": {"$ref": "#/$defs/point"},
        "maxItems": 3,
    },
    "allOf": {
        "allOf": [
            {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
            {"properties": {"b": {"type": "boolean"}}, "required": ["b"]},
        ],
        "additionalProperties": False,
        "properties": {"a": True, "b": True},
    },
    "prefixItems": {
        "type": "array",
        "prefixItems": [{"type": "integer"}, {"type": "boolean"}, STR],
        "items": False,
        "minItems": 3,
    },
    "formats": {
        "type": "object",
        "properties": {
            "day": {"type": "string", "format": "date"},
            "mail": {"type": "string", "format": "email", "maxLength": 20},
            "id": {"type": "string", "format": "uuid"},
        },
        "required": ["day", "mail", "id"],
        "additionalProperties": False,
    },
    "deep arrays": {
        "type": "array",
        "maxItems": 2,
        "items": {
            "type": "object",
            "properties": {
                "rows": {
                    "type": "array",
                    "maxItems": 2,
                    "items": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
                }
            },
            "required": ["rows"],
            "additionalProperties": False,
        },
    },
    "empty object": {"type": "object", "additionalProperties": False},
    "openai strict style": {
        "type": "object",
        "properties": {
            "answer": STR,
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "sources": {"type": ["array", "null"], "items": STR, "maxItems": 2},
        },
        "required": ["answer", "confidence", "sources"],
        "additionalProperties": False,
    },
    "string lengths": {"type": "string", "minLength": 3, "maxLength": 5},
}
FORMATS = jsonschema.FormatChecker()


def check_json(schema: dict, written: str) -> object:
    value = json.loads(written)
    jsonschema.validate(value, schema, format_checker=FORMATS)
    return value


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_output_validates(spm: Engine, tekken: Engine, name: str) -> None:
    schema = SCHEMAS[name]
    lark = grammars.json_grammar(JsonOutput(schema))
    seen = set()
    for engine, seeds in ((spm, (0, 1, 2)), (tekken, (0, 1))):
        compiled = constraint.compile(engine, lark)
        for seed in seeds:
            written = text(engine, generate(engine, compiled.copy(), seed))
            value = check_json(schema, written)
            # json.dumps' layout: ", " and ": ", no other whitespace (after an optional lead)
            assert written.strip() == json.dumps(value, ensure_ascii=False) or _same_layout(written)
            seen.add(written)
    assert seen


def _same_layout(written: str) -> bool:
    """Equal to json.dumps of its value but for number spelling (1.0e3, -0) and escapes."""
    return "\\" in written or bool(re.search(r"[0-9][eE.]|-0", written))


def test_any_object_and_strict_false(spm: Engine) -> None:
    for output in (ANY_OBJECT, grammars.ollama_format("json")):
        assert output == ANY_OBJECT
        con = constraint.compile(spm, grammars.json_grammar(output))
        # any object: its keys are strings with no bound, hence the bias toward closing them
        written = text(spm, generate(spm, con, 0, bias=tool_bias(spm)))
        assert isinstance(json.loads(written), dict)
    # strict false: what cannot be enforced (uniqueItems) is ignored, the rest holds
    loose = {"type": "array", "items": {"enum": [1, 2, 3]}, "uniqueItems": True, "maxItems": 3}
    output = grammars.response_format(
        {"type": "json_schema", "json_schema": {"name": "x", "schema": loose}}
    )
    assert output == JsonOutput(loose, strict=False)
    con = constraint.compile(spm, grammars.json_grammar(output))
    value = json.loads(text(spm, generate(spm, con, 3)))
    assert isinstance(value, list) and len(value) <= 3 and set(value) <= {1, 2, 3}


def test_finished_grammar_allows_only_the_end_token(spm: Engine, tekken: Engine) -> None:
    for engine in (spm, tekken):
        con = constraint.compile(engine, grammars.json_grammar(JsonOutput({"const": "ok"})))
        assert not con.done and not con.accepting
        row = np.zeros(engine.n_vocab, dtype=np.float32)
        while not con.accepting:
            con.mask(row)
            con.accept(int(row.argmax()))
            row[:] = 0
        assert con.done and con.end_ids == (engine.eos_id,)
        assert list(con.allowed()) == [engine.eos_id]
        con.mask(row)
        assert np.flatnonzero(row > -np.inf).tolist() == [engine.eos_id]
        con.accept(engine.eos_id)
        assert con.done


def test_mask_rows_batch(tekken: Engine) -> None:
    """Many sequences: one compile, copies, masks computed together; each its own state."""
    schema = SCHEMAS["flat object"]
    first = constraint.compile(tekken, grammars.json_grammar(JsonOutput(schema)))
    cons = [first.copy() for _ in range(4)]
    rng = np.random.default_rng(0)
    out: list[list[int]] = [[] for _ in cons]
    live = list(range(len(cons)))
    for _ in range(400):
        if not live:
            break
        rows = {i: rng.standard_normal(tekken.n_vocab).astype(np.float32) for i in live}
        alone = {i: rows[i].copy() for i in live}
        for i in live:
            cons[i].copy().mask(alone[i])
        constraint.mask_rows([(cons[i], rows[i]) for i in live])
        for i in list(live):
            assert np.array_equal(rows[i], alone[i])
            token = pick(rows[i], rng)
            cons[i].accept(token)
            if token == tekken.eos_id:
                live.remove(i)
            else:
                out[i].append(token)
    assert not live
    written = [text(tekken, tokens) for tokens in out]
    assert len(set(written)) > 1
    for w in written:
        check_json(schema, w)


def test_check_the_pick_then_mask_picks_the_same(spm: Engine) -> None:
    """allows(): a driver may pick on the raw logits and mask only when the grammar refuses
    the pick; with a Gumbel-max draw (its noise kept for the second pick) the tokens are those
    of masking first."""
    schema = SCHEMAS["nested objects"]
    compiled = constraint.compile(spm, grammars.json_grammar(JsonOutput(schema)))
    fresh = compiled.copy()
    allowed = set(fresh.allowed().tolist())
    assert all(fresh.allows(t) == (t in allowed) for t in range(spm.n_vocab))
    assert not fresh.allows(-1) and not fresh.allows(spm.n_vocab)
    for seed in range(3):
        runs, masked = [], 0
        for check_first in (False, True):
            con = compiled.copy()
            spm.clear()
            spm.process(spm.tokenize("Answer:", add_bos=True))
            rng = np.random.default_rng(seed)
            out: list[int] = []
            for _ in range(600):
                row = spm.logits_at(-1)
                noise = rng.gumbel(size=spm.n_vocab).astype(np.float32)
                token = int((row + noise).argmax()) if check_first else -1
                if not con.allows(token):
                    con.mask(row)
                    token = int((row + noise).argmax())
                    masked += check_first
                con.accept(token)
                if token == spm.eos_id:
                    break
                out.append(token)
                spm.decode_one(token)
            runs.append(out)
        assert runs[0] == runs[1]
        check_json(schema, text(spm, runs[0]))
        assert masked


def test_rollback_and_forced(spm: Engine) -> None:
    con = constraint.compile(spm, 'start: "hello world"')
    forced = con.forced()
    assert text(spm, forced) == "hello world"
    for token in forced:
        con.accept(token)
    con.rollback(len(forced))
    assert con.n_accepted == 0 and con.forced() == forced
    with pytest.raises(UsageError):
        con.rollback(1)


# -- tool calls ----------------------------------------------------------------------------------

WEATHER = Tool(
    "get_weather",
    parameters={
        "type": "object",
        "properties": {"city": STR, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
    strict=True,
)
ADD = Tool(
    "add",
    parameters={
        "type": "object",
        "properties": {
            "a": {"type": "integer", "minimum": -100, "maximum": 100},
            "b": {"type": "integer", "minimum": -100, "maximum": 100},
        },
        "required": ["a", "b"],
        "additionalProperties": False,
    },
    strict=True,
)
PING = Tool("ping", parameters={"type": "object", "properties": {"host": {"type": "string"}}})
TOOLS = [WEATHER, ADD, PING]
ID = re.compile(r"^[a-zA-Z0-9]{9}$")

# (format, vocabulary fixture)
CASES = [
    ("v2", "spm_tools"),
    ("v3", "spm_tools"),
    ("v7", "spm_tools"),
    ("v3-tekken", "tekken"),
    ("v7", "tekken"),
    ("v11", "tekken"),
    ("v13", "tekken"),
    ("v15", "tekken"),
]
ARRAY_FORMATS = ("v2", "v3", "v3-tekken", "v7")


def tool_bias(engine: Engine) -> tuple[np.ndarray, np.ndarray]:
    """The test's sampling policy for tool calls: control tokens and EOS very likely, tokens
    that close a string or an object likelier (see the module docstring)."""
    cached = getattr(engine, "_test_tool_bias", None)
    if cached is not None:
        return cached
    controls = list(control_ids(engine).values())
    ids, values = [engine.eos_id, *controls], [12.0] * (1 + len(controls))
    for token in range(engine.n_vocab):
        piece = engine.piece(token)
        if b'"' in piece or b"}" in piece:
            ids.append(token)
            values.append(4.0)
    bias = (np.array(ids), np.array(values, dtype=np.float32))
    engine._test_tool_bias = bias  # type: ignore[attr-defined]
    return bias


def control_ids(engine: Engine) -> dict[str, int]:
    """The ids of the tool and thinking control tokens the vocabulary has."""
    ids = {}
    for piece in CONTROL:
        with contextlib.suppress(InvalidGGUF):
            ids[piece] = control_token(engine.tokenize, piece)
    return ids


def parse_reply(fmt: str, engine: Engine, tokens: list[int]) -> tuple[str | None, str, list[dict]]:
    """(thinking, text, calls) of a reply, split on the control-token ids as a parser must."""
    ids = control_ids(engine)
    controls = set(ids.values())
    think = None
    if "[THINK]" in ids and tokens and tokens[0] == ids["[THINK]"]:
        end = tokens.index(ids["[/THINK]"])
        think, tokens = text(engine, tokens[1:end]), tokens[end + 1 :]
        assert ids["[THINK]"] not in tokens and ids["[/THINK]"] not in tokens
    calls_id = ids["[TOOL_CALLS]"]
    if calls_id not in tokens:
        assert not controls & set(tokens), "a control token in free text"
        return think, text(engine, tokens), []
    first = tokens.index(calls_id)
    content, rest = tokens[:first], tokens[first:]
    assert not controls & set(content)
    pieces: list[list[int]] = []
    for token in rest:
        if token == calls_id:
            pieces.append([])
        else:
            pieces[-1].append(token)
    calls: list[dict] = []
    if fmt in ARRAY_FORMATS:
        assert len(pieces) == 1, "one [TOOL_CALLS] before the array"
        assert not controls & set(pieces[0])
        array = json.loads(text(engine, pieces[0]))
        assert isinstance(array, list) and array
        for call in array:
            keys = ["name", "arguments"] if fmt == "v2" else ["name", "arguments", "id"]
            assert list(call) == keys
            calls.append(call)
        return think, text(engine, content), calls
    for piece in pieces:
        args = ids["[ARGS]"]
        assert piece.count(args) == 1
        head, arguments = piece[: piece.index(args)], piece[piece.index(args) + 1 :]
        assert not controls & set(arguments)
        call: dict = {}
        call_id = ids.get("[CALL_ID]")
        if call_id is not None and call_id in head:
            assert fmt == "v11", "[CALL_ID] is v11's alone"
            call["id"] = text(engine, head[head.index(call_id) + 1 :])
            head = head[: head.index(call_id)]
        assert not controls & set(head)
        call["name"] = text(engine, head).strip()
        call["arguments"] = json.loads(text(engine, arguments))
        calls.append(call)
    return think, text(engine, content), calls


def check_calls(calls: list[dict], tools: list[Tool], fmt: str) -> None:
    by_name = {t.name: t for t in tools}
    for call in calls:
        tool = by_name[call["name"]]  # KeyError: a name the request did not offer
        if tool.strict:
            jsonschema.validate(call["arguments"], tool.parameters)
        assert isinstance(call["arguments"], dict)
        if fmt in ("v3", "v3-tekken", "v7"):
            assert ID.match(call["id"])
        elif "id" in call:
            assert fmt == "v11" and ID.match(call["id"])


CHOICES = {
    "auto": ("auto", True),
    "required": ("required", True),
    "required, one call": ("required", False),
    "named": (Named("add"), True),
    "none": ("none", True),
}


@pytest.mark.parametrize("choice", list(CHOICES))
@pytest.mark.parametrize(("fmt", "vocab"), CASES)
def test_tool_calls(request: pytest.FixtureRequest, fmt: str, vocab: str, choice: str) -> None:
    engine: Engine = request.getfixturevalue(vocab)
    tool_choice, parallel = CHOICES[choice]
    lark = grammars.chat_grammar(
        fmt,
        specials(engine),
        tools=TOOLS,
        tool_choice=tool_choice,
        parallel_tool_calls=parallel,
    )
    assert lark is not None
    compiled = constraint.compile(engine, lark)
    kinds = set()
    for seed in range(4):
        tokens = generate(engine, compiled.copy(), seed, bias=tool_bias(engine))
        think, content, calls = parse_reply(fmt, engine, tokens)
        assert think is None
        check_calls(calls, TOOLS, fmt)
        kinds.add("calls" if calls else "text")
        if calls and fmt in ("v2", "v3", "v3-tekken"):
            assert content == "", "v2/v3: text or tool calls, not both"
        if choice == "none":
            assert not calls and content
        elif choice == "auto":
            assert calls or content
        else:  # required, named: calls only
            assert calls and content == ""
            if not parallel:
                assert len(calls) == 1
            if choice == "named":
                assert {c["name"] for c in calls} == {"add"}
    if choice == "auto":
        assert kinds == {"calls", "text"}, "auto: seeds of both kinds"


@pytest.mark.parametrize("fmt", ["v13", "v15"])
def test_thinking_then_calls_or_json(tekken: Engine, fmt: str) -> None:
    special = specials(tekken)
    bias = tool_bias(tekken)
    thought = 0
    for tool_choice in ("auto", "required"):
        lark = grammars.chat_grammar(fmt, special, tools=TOOLS, tool_choice=tool_choice, think=True)
        compiled = constraint.compile(tekken, lark)
        for seed in range(3):
            think, content, calls = parse_reply(
                fmt, tekken, generate(tekken, compiled.copy(), seed, bias=bias)
            )
            thought += think is not None
            check_calls(calls, TOOLS, fmt)
            if tool_choice == "required":
                assert calls and content == ""
    schema = SCHEMAS["flat object"]
    lark = grammars.chat_grammar(fmt, special, output=JsonOutput(schema), think=True)
    compiled = constraint.compile(tekken, lark)
    for seed in range(3):
        think, content, calls = parse_reply(
            fmt, tekken, generate(tekken, compiled.copy(), seed, bias=bias)
        )
        thought += think is not None
        assert not calls
        check_json(schema, content)
    assert thought, "some seed thinks first"


@pytest.mark.parametrize(("fmt", "vocab"), [("v3", "spm_tools"), ("v11", "tekken")])
def test_json_or_tool_calls(request: pytest.FixtureRequest, fmt: str, vocab: str) -> None:
    """response_format with tools (tool_choice auto): the JSON reply or tool calls, no text."""
    engine: Engine = request.getfixturevalue(vocab)
    schema = SCHEMAS["booleans and null"]
    lark = grammars.chat_grammar(fmt, specials(engine), tools=TOOLS, output=JsonOutput(schema))
    compiled = constraint.compile(engine, lark)
    for seed in range(4):
        _, content, calls = parse_reply(
            fmt, engine, generate(engine, compiled.copy(), seed, bias=tool_bias(engine))
        )
        check_calls(calls, TOOLS, fmt)
        if not calls:
            check_json(schema, content)
        else:
            assert content == ""


def test_no_grammar_needed() -> None:
    assert grammars.chat_grammar("v7", lambda _: 5) is None
    assert grammars.chat_grammar(None) is None
    assert grammars.response_format({"type": "text"}) is None
    assert grammars.ollama_format("") is None


# -- request fields ------------------------------------------------------------------------------


def test_request_fields() -> None:
    assert grammars.tool_choice_from_openai(None) == "auto"
    assert grammars.tool_choice_from_openai("any") == "required"
    choice = {"type": "function", "function": {"name": "a"}}
    assert grammars.tool_choice_from_openai(choice) == Named("a")
    spec = {"schema": {"type": "object"}, "strict": True}
    assert grammars.response_format({"type": "json_schema", "json_schema": spec}) == JsonOutput(
        {"type": "object"}, True
    )
    assert grammars.response_format({"type": "json_object"}) == ANY_OBJECT
    assert grammars.ollama_format({"type": "integer"}) == JsonOutput({"type": "integer"}, False)


# -- bad input -----------------------------------------------------------------------------------

SP = {"[TOOL_CALLS]": 9, "[ARGS]": 32, "[CALL_ID]": 33, "[THINK]": 34, "[/THINK]": 35}.__getitem__


def _strict(schema: object) -> Callable[[], object]:
    return lambda: grammars.json_grammar(JsonOutput(schema))  # type: ignore[arg-type]


BAD: list[tuple[str, Callable[[], object], str]] = [
    ("invalid type", _strict({"type": "strin"}), "not a valid JSON schema: Invalid type: strin"),
    (
        "unsupported keyword",
        _strict({"type": "array", "uniqueItems": True}),
        "cannot be enforced: uniqueItems",
    ),
    ("unsupported keywords", _strict({"if": {}, "then": {}}), "cannot be enforced: if, then"),
    (
        "unsatisfiable",
        _strict({"type": "integer", "minimum": 5, "maximum": 2}),
        "minimum (5) is greater",
    ),
    ("dangling $ref", _strict({"$ref": "#/$defs/nope"}), "does not exist"),
    ("remote $ref", _strict({"$ref": "https://example.com/s.json"}), "not a valid JSON schema"),
    ("false schema", _strict(False), "must be a JSON schema object"),
    ("schema not an object", _strict("string"), "must be a JSON schema object"),
    ("NaN in a schema", _strict({"maximum": float("nan")}), "is not JSON"),
    ("look-around pattern", _strict({"type": "string", "pattern": "(?=a)"}), "look-around"),
    (
        "min/maxProperties",
        _strict({"type": "object", "properties": {"p": {}}, "maxProperties": 1}),
        "min/maxProperties only supported when",
    ),
    (
        "bad tool schema",
        lambda: grammars.chat_grammar(
            "v11", SP, tools=[Tool("t", parameters={"type": "object", "not": {}}, strict=True)]
        ),
        "tool t's parameters uses JSON Schema keywords that cannot be enforced: not",
    ),
    ("duplicate tools", lambda: grammars.chat_grammar("v11", SP, tools=[ADD, ADD]), "same name"),
    (
        "unknown named tool",
        lambda: grammars.chat_grammar("v11", SP, tools=[ADD], tool_choice=Named("x")),
        "names x, which is not a tool (add)",
    ),
    (
        "required without tools",
        lambda: grammars.chat_grammar("v11", SP, tool_choice="required"),
        "needs tools",
    ),
    ("tools on v1", lambda: grammars.chat_grammar("v1", SP, tools=[ADD]), "has no tool calls"),
    (
        "thinking on v7",
        lambda: grammars.chat_grammar("v7", SP, tools=[ADD], think=True),
        "reasoning model",
    ),
    ("odd tool_choice", lambda: grammars.tool_choice_from_openai("sometimes"), "not supported"),
    (
        "json with required",
        lambda: grammars.chat_grammar(
            "v11", SP, tools=[ADD], tool_choice="required", output=ANY_OBJECT
        ),
        "tool_choice auto or none",
    ),
    (
        "response_format xml",
        lambda: grammars.response_format({"type": "xml"}),
        "'xml' is not supported",
    ),
    ("ollama format", lambda: grammars.ollama_format("yaml"), 'format must be "json"'),
]


@pytest.mark.parametrize(("make", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input(make: Callable[[], object], message: str) -> None:
    with pytest.raises(UsageError) as caught:
        make()
    assert message in caught.value.message
    assert "\n" not in caught.value.message


def test_bad_grammar_and_tokens(spm: Engine) -> None:
    for grammar, message in [
        ("start: foo", 'unknown name: "foo"'),
        ("", "the grammar is empty"),
        ("start: <[99999999]>", "the grammar is not valid"),
        ('start: %json {"type": "strin"}', "Invalid type: strin"),
    ]:
        with pytest.raises(UsageError, match=re.escape(message)):
            constraint.compile(spm, grammar)
    con = constraint.compile(spm, grammars.json_grammar(ANY_OBJECT))
    letter_a = spm.tokenize("a")[-1]
    with pytest.raises(EngineError, match=f"token {letter_a} is not allowed"):
        con.accept(letter_a)
    with pytest.raises(UsageError, match="logits row"):
        constraint.compile(spm, grammars.json_grammar(ANY_OBJECT)).mask(np.zeros(5, np.float32))


def test_tokenizer_cached_silent_and_closed_with_its_engine(tiny_mistral_gguf_f16: Path) -> None:
    engine = Engine(EngineConfig(tiny_mistral_gguf_f16, vocab_only=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = constraint.tokenizer(engine)
    assert not [w for w in caught if "deprecated" in str(w.message)]
    assert constraint.tokenizer(engine) is first
    con = constraint.compile(engine, grammars.json_grammar(ANY_OBJECT))
    engine.close()
    with pytest.raises(EngineError, match="closed"):
        con.mask(np.zeros(engine.n_vocab, np.float32))
    with pytest.raises(EngineError, match="closed"):
        constraint.compile(engine, grammars.json_grammar(ANY_OBJECT))
