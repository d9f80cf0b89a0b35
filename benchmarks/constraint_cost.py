"""What constrained decoding costs (llama/constraint.py with chat/grammars.py's grammars).

(a) Compile time, on a 131,072-token tekken vocabulary (v15 control tokens) and a 32,768-token
    sentencepiece one (v7): the grammar text for 20 strict tools (chat_grammar: each schema
    checked) and its compile() (llguidance's matcher on the model's tokenizer), then the same for
    a mid-size JSON schema (22 properties, nested objects, arrays, enums, $defs). Also the
    one-time tokenizer build per engine. Tiny vocab-only GGUFs are enough: compiling reads only
    the vocabulary.
(b) The per-token cost of mask() + accept() in a real decode loop on the 125M benchmark model
    (engine_vs_llama_bench.make_model: 32,000-token v1 vocabulary, Q4_K_M): rounds of N tokens
    unconstrained and constrained, back to back, the same picker in both (argmax over the logits
    plus a pre-drawn Gumbel noise row, so a random-weight model wanders through the grammar's
    states). The constrained loop writes the mid-size schema's JSON, a fresh constraint each
    time one completes. Reported: mask+accept µs a token (mean, p99), the constrained / plain
    tokens-per-second ratio (median of per-round ratios) and the overhead against the model's
    own time per token. The same µs on the tiny tekken model show the 131k-vocabulary cost.

    python benchmarks/constraint_cost.py [--rounds 8] [--tokens 128] [--threads N]

Targets: compile under 50 ms for 20 strict tools; constrained tg >= 0.95x unconstrained.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.tekken_files

from engine_vs_llama_bench import make_model, models_dir
from pairing import paired

from localmix import settings
from localmix.chat import grammars
from localmix.chat.grammars import JsonOutput
from localmix.chat.template import control_token
from localmix.chat.tools import Tool
from localmix.llama import constraint
from localmix.llama.engine import Engine, EngineConfig

COMPILE_TARGET_MS = 50.0
RATIO_TARGET = 0.95
NOISE_ROWS = 64


def strict_tools(n: int = 20) -> list[Tool]:
    """n strict tools with schemas of the size agents send (3-6 typed parameters each)."""
    kinds = [
        {"type": "string", "description": "a path or a name"},
        {"type": "integer", "minimum": 0, "maximum": 10000},
        {"type": "boolean"},
        {"enum": ["fast", "thorough", "off"]},
        {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        {"type": ["number", "null"]},
    ]
    tools = []
    for i in range(n):
        props = {f"arg{j}": kinds[(i + j) % len(kinds)] for j in range(3 + i % 4)}
        schema = {
            "type": "object",
            "properties": props,
            "required": list(props)[:2],
            "additionalProperties": False,
        }
        tools.append(Tool(f"tool_{i:02d}_do_something", parameters=schema, strict=True))
    return tools


MID_SCHEMA = {
    "$defs": {
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string", "maxLength": 40},
                "city": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "country": {"enum": ["FR", "DE", "IT", "ES", "US"]},
            },
            "required": ["street", "city", "zip", "country"],
            "additionalProperties": False,
        }
    },
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1},
        "name": {"type": "string", "maxLength": 30},
        "email": {"type": "string", "format": "email"},
        "active": {"type": "boolean"},
        "score": {"type": "number", "minimum": 0, "maximum": 100},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 5},
        "home": {"$ref": "#/$defs/address"},
        "work": {"anyOf": [{"$ref": "#/$defs/address"}, {"type": "null"}]},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "orders": {
            "type": "array",
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                    "price": {"type": "number"},
                },
                "required": ["sku", "qty", "price"],
                "additionalProperties": False,
            },
        },
        "notes": {"type": ["string", "null"], "maxLength": 60},
        "created": {"type": "string", "format": "date"},
    },
    "required": ["id", "name", "email", "active", "score", "tags", "home", "work", "role"],
    "additionalProperties": False,
}


def vocab_gguf(kind: str) -> Path:
    """A tiny GGUF with the v15 tekken (131,072) or v7 sentencepiece (32,768) vocabulary, made
    once into the benchmark cache."""
    from localmix.build.convert import convert
    from tests.tekken_files import checkpoint_with, shipped, tekken_file

    out = models_dir() / f"constraint-vocab-{kind}.gguf"
    if out.is_file():
        return out
    work = models_dir() / f"constraint-vocab-{kind}.tmp"
    if kind == "tekken":
        tokenizer, synth = tekken_file("v15", work), "tekken"
    else:
        tokenizer, synth = shipped("mistral_instruct_tokenizer_241114.model.v7"), "v3"
    ckpt = checkpoint_with(tokenizer, work, synth_tokenizer=synth)
    convert(ckpt, work / "model.gguf", outtype="f16").replace(out)
    return out


def timed(fn, reps: int) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return out


def compile_costs(reps: int) -> list[tuple[str, str, int, float, float, float]]:
    """(vocabulary, grammar, n_vocab, text ms, compile ms, tokenizer build ms) rows."""
    rows = []
    tools = strict_tools()
    for kind, fmt in (("tekken", "v15"), ("spm", "v7")):
        with Engine(EngineConfig(vocab_gguf(kind), vocab_only=True)) as engine:
            start = time.perf_counter()
            constraint.tokenizer(engine)
            build_ms = (time.perf_counter() - start) * 1e3

            def special(piece: str, engine: Engine = engine) -> int:
                return control_token(engine.tokenize, piece)

            grammars_of = {
                "20 strict tools": lambda fmt=fmt, special=special: grammars.chat_grammar(
                    fmt, special, tools=tools
                ),
                "mid-size JSON schema": lambda: grammars.json_grammar(JsonOutput(MID_SCHEMA)),
            }
            for name, make in grammars_of.items():
                text = make()
                text_ms = statistics.median(timed(make, reps))
                comp_ms = statistics.median(
                    timed(lambda e=engine, t=text: constraint.compile(e, t), reps)
                )
                rows.append((kind, name, engine.n_vocab, text_ms, comp_ms, build_ms))
    return rows


class Picker:
    """argmax of the logits plus the step's pre-drawn Gumbel row: a seeded draw from the
    softmax (Gumbel-max), the same in every loop (~20 µs on 32k tokens)."""

    def __init__(self, n_vocab: int, seed: int) -> None:
        import numpy as np

        rng = np.random.default_rng(seed)
        self.noise = rng.gumbel(size=(NOISE_ROWS, n_vocab)).astype(np.float32)
        self.scratch = np.empty(n_vocab, dtype=np.float32)

    def __call__(self, row, step: int) -> int:  # type: ignore[no-untyped-def]
        import numpy as np

        np.add(row, self.noise[step % NOISE_ROWS], out=self.scratch)
        return int(self.scratch.argmax())


MODES = ("plain", "mask", "check")  # no grammar; mask every step; pick, mask if not allowed


def decode_loop(
    engine: Engine, n: int, seed: int, lark: str | None, mode: str = "mask"
) -> tuple[float, list[float], int, int]:
    """(seconds for n tokens, constraint seconds of each token, grammars completed, masks
    applied). mode "check": pick on the raw logits, mask and pick again only when the grammar
    does not allow the pick (the same token as "mask" for this picker)."""
    engine.clear()
    engine.process(engine.tokenize("Answer:", add_bos=True))
    pick = Picker(engine.n_vocab, seed)
    template = None if lark is None else constraint.compile(engine, lark)
    con = None if template is None else template.copy()
    costs: list[float] = []
    completed = masked = 0
    clock = time.perf_counter
    start = clock()
    for step in range(n):
        row = engine.logits_at(-1)
        if con is None:
            token = pick(row, step)
        elif mode == "mask":
            t0 = clock()
            con.mask(row)
            t1 = clock()
            token = pick(row, step)
            t2 = clock()
            con.accept(token)
            costs.append((t1 - t0) + (clock() - t2))
            masked += 1
        else:
            token = pick(row, step)
            t0 = clock()
            if not con.allows(token):
                con.mask(row)
                t1 = clock()
                token = pick(row, step)
                t0 -= clock() - t1  # the second pick is the picker's time, not the grammar's
                masked += 1
            con.accept(token)
            costs.append(clock() - t0)
        if con is not None and con.done:  # the JSON is complete: start the next one
            completed += 1
            con = template.copy()  # type: ignore[union-attr]
        engine.decode_one(token)
    return clock() - start, costs, completed, masked


def per_token(model: Path, threads: int, rounds: int, tokens: int) -> dict[str, dict]:  # type: ignore[type-arg]
    lark = grammars.json_grammar(JsonOutput(MID_SCHEMA))
    out: dict[str, dict] = {m: {"tps": [], "costs": [], "completed": 0, "masked": 0} for m in MODES}  # type: ignore[type-arg]
    config = EngineConfig(model, n_ctx=tokens + 16, n_threads=threads)
    with Engine(config) as engine:
        for mode in MODES:  # warm-up
            decode_loop(engine, 16, 0, None if mode == "plain" else lark, mode)
        for r in range(rounds):
            print(f"per token: round {r + 1}/{rounds}", file=sys.stderr)
            order = MODES[r % 3 :] + MODES[: r % 3]  # no mode always goes first
            for mode in order:
                seconds, spent, done, masked = decode_loop(
                    engine, tokens, r, None if mode == "plain" else lark, mode
                )
                found = out[mode]
                found["tps"].append(tokens / seconds)
                found["costs"] += spent
                found["completed"] += done
                found["masked"] += masked
        out["plain"]["n_vocab"] = engine.n_vocab
    return out


def tekken_mask_cost(tokens: int) -> tuple[int, list[float]]:
    """mask+accept seconds a token on the 131k vocabulary (a tiny model: the µs only)."""
    lark = grammars.json_grammar(JsonOutput(MID_SCHEMA))
    with Engine(EngineConfig(vocab_gguf("tekken"), n_ctx=tokens + 16, n_threads=1)) as engine:
        _, costs, _, _ = decode_loop(engine, tokens, 0, lark)
        _, more, _, _ = decode_loop(engine, tokens, 1, lark)
        return engine.n_vocab, costs + more


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def report(compiles: list, tg: dict, tekken: tuple[int, list[float]], threads: int) -> bool:  # type: ignore[type-arg]
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    ok = True
    table = Table(title="Grammar compile time (median)")
    for column in ("vocabulary", "grammar", "n_vocab", "text ms", "compile ms", "total ms"):
        table.add_column(column, justify="left" if column in ("vocabulary", "grammar") else "right")
    for kind, name, n_vocab, text_ms, comp_ms, _ in compiles:
        total = text_ms + comp_ms
        verdict = ""
        if name == "20 strict tools":
            good = total < COMPILE_TARGET_MS
            ok &= good
            verdict = " [green]ok[/]" if good else " [red]over[/]"
        table.add_row(
            kind, name, f"{n_vocab:,}", f"{text_ms:.2f}", f"{comp_ms:.2f}", f"{total:.2f}{verdict}"
        )
    console.print(table)
    builds = {kind: build for kind, _, _, _, _, build in compiles}
    console.print(
        "tokenizer build, once per engine: "
        + ", ".join(f"{kind} {ms:.0f} ms" for kind, ms in builds.items())
    )

    plain = tg["plain"]["tps"]
    per_token_s = 1 / statistics.median(plain)
    table = Table(
        title=f"constraint cost per token ({threads} threads; 125M Mistral Q4_K_M, "
        f"{tg['plain']['n_vocab']:,} tokens)",
        caption="ratio: median of per-round constrained/plain t/s [95% bootstrap interval]",
    )
    for column in ("mode", "mean µs", "p99 µs", "of a token", "masked", "t/s", "ratio"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    table.add_row("plain", "", "", "", "", f"{statistics.median(plain):.1f}", "")
    labels = {"mask": "mask every token", "check": "check the pick, mask if needed"}
    for mode, label in labels.items():
        found = tg[mode]
        costs = found["costs"]
        ratio = paired(found["tps"], plain)
        good = ratio.median >= RATIO_TARGET
        if mode == "mask":
            ok &= good
        mean_cost = statistics.mean(costs)
        table.add_row(
            label,
            f"{mean_cost * 1e6:.1f}",
            f"{p99(costs) * 1e6:.1f}",
            f"{mean_cost / per_token_s:.1%}",
            f"{found['masked'] / len(costs):.0%}",
            f"{statistics.median(found['tps']):.1f}",
            f"{ratio} ≥{RATIO_TARGET} " + ("[green]ok[/]" if good else "[red]below[/]"),
        )
    console.print(table)
    n_vocab, tek = tekken
    console.print(
        f"mask every token on the tiny tekken model ({n_vocab:,} tokens): "
        f"{statistics.mean(tek) * 1e6:.1f} µs mean, {p99(tek) * 1e6:.1f} µs p99"
    )
    done = tg["mask"]["completed"] + tg["check"]["completed"]
    console.print(
        f"{done} schema-valid JSON values completed in the constrained rounds; "
        f"125M per token {per_token_s * 1e3:.2f} ms unconstrained"
    )
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile-reps", type=int, default=20)
    args = parser.parse_args()
    threads = args.threads or settings.default_threads()
    compiles = compile_costs(args.compile_reps)
    tekken = tekken_mask_cost(args.tokens)
    model = make_model("mistral")
    tg = per_token(model, threads, args.rounds, args.tokens)
    sys.exit(0 if report(compiles, tg, tekken, threads) else 1)


if __name__ == "__main__":
    main()
