"""What to measure: llama-bench's parameter sweeps and the test cases they expand to.

Each sweep is a tuple of values; `cases()` takes their cartesian product in llama-bench's order
(model outermost, then load settings, then context settings, threads, depth; within those:
every pp test, then every tg test, then every pp+tg pair), so a model is loaded as few times
as possible and results line up with llama-bench's row for row.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

from localmix import settings as app_settings
from localmix.errors import UsageError

# The KV cache types llama-bench accepts for -ctk / -ctv (ggml's names).
CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
# -fa values, as llama.cpp's common argument parser reads them.
_FLASH_ATTN = {
    "on": "on", "enabled": "on", "true": "on", "1": "on",
    "off": "off", "disabled": "off", "false": "off", "0": "off",
    "auto": "auto", "-1": "auto",
}  # fmt: skip
# first[-last[(+|*)step]], as llama-bench's parse_int_range reads it.
_RANGE = re.compile(r"^(-?\d+)(?:-(\d+)(?:([+*])(\d+))?)?$")
# A sweep longer than this is a typo (1-1000000000), not a benchmark: refused before expanding.
MAX_SWEEP = 1000
# A repetition count past this is a typo that would run for days (llama-bench's default is 5).
MAX_REPETITIONS = 1000


@dataclass(frozen=True)
class BenchParams:
    """A sweep: every combination of these values is one test (llama-bench's defaults)."""

    n_prompt: tuple[int, ...] = (512,)
    n_gen: tuple[int, ...] = (128,)
    n_pg: tuple[tuple[int, int], ...] = ()
    n_depth: tuple[int, ...] = (0,)
    n_batch: tuple[int, ...] = (2048,)
    n_ubatch: tuple[int, ...] = (512,)
    type_k: tuple[str, ...] = ("f16",)
    type_v: tuple[str, ...] = ("f16",)
    n_threads: tuple[int, ...] = ()  # empty: settings.default_threads()
    n_gpu_layers: tuple[int, ...] = (-1,)  # -1: every layer that the backend can take
    flash_attn: tuple[str, ...] = ("auto",)
    # llama-bench's --repack 0|1 (weights in the CPU's extra buffer types); empty: the door's
    # CPU rule (load.weight_repack), which llama-bench's default of 1 is not on AMX builds.
    repack: tuple[bool, ...] = ()
    repetitions: int = 5
    warmup: bool = True
    seed: int = 1  # random tokens are drawn from this seed, like llama-bench's unseeded rand()
    # Offload hook: (tensor-name regex, buffer type) pairs for every test, e.g. experts on CPU.
    tensor_overrides: tuple[tuple[str, str], ...] = ()
    # llama-bench's -rpc: RPC workers (HOST:PORT) whose devices every test offloads to; not
    # swept (llama-bench registers them once for the whole run)
    rpc: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("type_k", "type_v"):
            for value in getattr(self, name):
                if value not in CACHE_TYPES:
                    raise UsageError(
                        f"unknown KV cache type {value!r}",
                        hint=f"use one of {', '.join(CACHE_TYPES)}",
                    )
        for value in self.flash_attn:
            if value not in ("on", "off", "auto"):
                raise UsageError(
                    f"unknown flash-attention mode {value!r}", hint="use on, off or auto"
                )
        if not 1 <= self.repetitions <= MAX_REPETITIONS:
            raise UsageError(
                f"repetitions must be between 1 and {MAX_REPETITIONS}, not {self.repetitions}",
                hint="llama-bench's default is 5",
            )
        for f in fields(self):
            value = getattr(self, f.name)
            optional = f.name in ("n_threads", "n_pg", "tensor_overrides", "repack", "rpc")
            if isinstance(value, tuple) and not optional and not value:
                raise UsageError(
                    f"{f.name}: give at least one value",
                    hint="a range's first value must not be above its last (1-8, not 8-1)",
                )
        for value in (*self.n_prompt, *self.n_gen, *self.n_depth, *sum(self.n_pg, ())):
            if value < 0:
                raise UsageError(
                    f"token counts must not be negative, not {value}", hint="use 0 or more"
                )
        for value in (*self.n_batch, *self.n_ubatch, *self.n_threads):
            if value < 1:
                raise UsageError(
                    f"batch sizes and thread counts must be at least 1, not {value}",
                    hint="use 1 or more",
                )
        for value in self.n_threads:  # every combination would fail alike: say it once, first
            app_settings.check_threads(value, "-t")


@dataclass(frozen=True)
class BenchCase:
    """One test: a model, one value of every setting, and what to time."""

    model: Path
    n_prompt: int
    n_gen: int
    n_depth: int
    n_batch: int
    n_ubatch: int
    type_k: str
    type_v: str
    n_threads: int
    n_gpu_layers: int
    flash_attn: str
    tensor_overrides: tuple[tuple[str, str], ...] = ()
    repack: bool = True
    rpc: tuple[str, ...] = ()

    @property
    def test(self) -> str:
        """llama-bench's test name: pp512, tg128, pp512+tg128, with ' @ d4096' for depth."""
        return test_name(self.n_prompt, self.n_gen, self.n_depth)

    @property
    def n_ctx(self) -> int:
        """Context this test needs (tokens); llama-bench sizes its context exactly so."""
        return self.n_prompt + self.n_gen + self.n_depth

    @property
    def load_key(self) -> tuple[object, ...]:
        """Tests with the same key share one loaded Engine."""
        return (
            self.model,
            self.n_batch,
            self.n_ubatch,
            self.type_k,
            self.type_v,
            self.n_threads,
            self.n_gpu_layers,
            self.flash_attn,
            self.tensor_overrides,
            self.repack,
            self.rpc,
        )


def test_name(n_prompt: int, n_gen: int, n_depth: int = 0) -> str:
    if n_prompt > 0 and n_gen == 0:
        name = f"pp{n_prompt}"
    elif n_gen > 0 and n_prompt == 0:
        name = f"tg{n_gen}"
    else:
        name = f"pp{n_prompt}+tg{n_gen}"
    return f"{name} @ d{n_depth}" if n_depth > 0 else name


def cases(models: Sequence[Path], params: BenchParams) -> list[BenchCase]:
    """Expand a sweep into test cases, in llama-bench's order."""
    from localmix import load, settings

    threads = params.n_threads or (settings.default_threads(),)
    repacks = params.repack or (load.weight_repack(),)
    out: list[BenchCase] = []
    for model in models:
        for ngl, repack in ((n, r) for n in params.n_gpu_layers for r in repacks):
            for nb in params.n_batch:
                for nub in params.n_ubatch:
                    for tk in params.type_k:
                        for tv in params.type_v:
                            for fa in params.flash_attn:
                                for nt in threads:
                                    for nd in params.n_depth:
                                        base = BenchCase(
                                            Path(model), 0, 0, nd, nb, nub, tk, tv, nt, ngl, fa,
                                            params.tensor_overrides, repack, params.rpc,
                                        )  # fmt: skip
                                        out.extend(_tests(base, params))
    return out


def _tests(base: BenchCase, params: BenchParams) -> list[BenchCase]:
    tests = [replace(base, n_prompt=n) for n in params.n_prompt if n > 0]
    tests += [replace(base, n_gen=n) for n in params.n_gen if n > 0]
    tests += [replace(base, n_prompt=p, n_gen=g) for p, g in params.n_pg if p or g]
    return tests


# --- parsing command-line values (comma lists and ranges, as llama-bench reads them) ---


def parse_ints(
    values: Sequence[str], *, name: str, allow_negative: bool = False
) -> tuple[int, ...]:
    """'1,2,4' / '1-8' / '1-8+2' / '1-16*2', possibly repeated, to a tuple of ints."""
    out: list[int] = []
    for text in values:
        for item in text.split(","):
            item = item.strip()
            match = _RANGE.match(item)
            if not match or (not allow_negative and item.startswith("-")):
                raise UsageError(
                    f"{name}: {item!r} is not a number or range",
                    hint="use a comma list like 1,2,4 or a range like 1-8, 1-8+2, 1-16*2",
                )
            first = int(match[1])
            last = int(match[2]) if match[2] else first
            op, step = match[3] or "+", int(match[4] or 1)
            if step < 1 or (op == "*" and (step < 2 or first < 1)):
                raise UsageError(
                    f"{name}: {item!r} is a range that never ends",
                    hint="a + step must be 1 or more; a * range needs a factor of 2 or more",
                )
            # a * range has at most 64 values; only a + range can explode
            if op == "+" and len(out) + (last - first) // step + 1 > MAX_SWEEP:
                raise UsageError(
                    f"{name}: {item!r} makes more than {MAX_SWEEP} values",
                    hint="use a shorter range or a larger step",
                )
            value = first
            while value <= last:
                out.append(value)
                value = value + step if op == "+" else value * step
    return tuple(out)


def parse_pairs(values: Sequence[str], *, name: str = "-pg") -> tuple[tuple[int, int], ...]:
    """'512,128' (repeatable) to ((512, 128),): llama-bench's -pg."""
    out = []
    for text in values:
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise UsageError(f"{name}: {text!r} is not a pair", hint="use -pg 512,128")
        out.append((int(parts[0]), int(parts[1])))
    return tuple(out)


def parse_words(values: Sequence[str], *, name: str) -> tuple[str, ...]:
    """'f16,q8_0' (repeatable) to ('f16', 'q8_0'); -fa's aliases (1, true, ...) normalised."""
    words = tuple(w.strip().lower() for text in values for w in text.split(",") if w.strip())
    if name in ("-fa", "flash_attn"):
        unknown = [w for w in words if w not in _FLASH_ATTN]
        if unknown:
            raise UsageError(f"-fa: unknown value {unknown[0]!r}", hint="use on, off or auto")
        return tuple(_FLASH_ATTN[w] for w in words)
    return words


def parse_switches(values: Sequence[str], *, name: str) -> tuple[bool, ...]:
    """'0,1' (repeatable) to (False, True): llama-bench's boolean sweeps (--repack)."""
    out = []
    for word in parse_words(values, name=name):
        if word not in ("0", "1"):
            raise UsageError(f"{name}: {word!r} is not 0 or 1", hint=f"use {name} 0,1")
        out.append(word == "1")
    return tuple(out)


def _ints(flag: str, negative: bool = False) -> Callable[[Sequence[str]], tuple[object, ...]]:
    return lambda values: parse_ints(values, name=flag, allow_negative=negative)


def _words(flag: str) -> Callable[[Sequence[str]], tuple[object, ...]]:
    return lambda values: parse_words(values, name=flag)


# llama-bench's flags: the BenchParams field each sets, and how its values are read.
OPTIONS: dict[str, tuple[str, Callable[[Sequence[str]], tuple[object, ...]]]] = {
    "-p": ("n_prompt", _ints("-p")),
    "-n": ("n_gen", _ints("-n")),
    "-pg": ("n_pg", parse_pairs),
    "-d": ("n_depth", _ints("-d")),
    "-t": ("n_threads", _ints("-t")),
    "-ngl": ("n_gpu_layers", _ints("-ngl", negative=True)),
    "-b": ("n_batch", _ints("-b")),
    "-ub": ("n_ubatch", _ints("-ub")),
    "-fa": ("flash_attn", _words("-fa")),
    "-ctk": ("type_k", _words("-ctk")),
    "-ctv": ("type_v", _words("-ctv")),
    "--repack": ("repack", lambda values: parse_switches(values, name="--repack")),
}


def from_options(
    options: dict[str, Sequence[str] | None],
    *,
    repetitions: int = 5,
    warmup: bool = True,
    rpc: Sequence[str] = (),
) -> BenchParams:
    """BenchParams from llama-bench's options as typed, keyed by flag ({"-p": ["512", "1-8"]});
    a flag left out (None or empty) keeps BenchParams' default. rpc: -rpc's workers, parsed."""
    sweep: dict[str, object] = {"repetitions": repetitions, "warmup": warmup, "rpc": tuple(rpc)}
    for flag, values in options.items():
        if values:
            field, parse = OPTIONS[flag]
            sweep[field] = parse(values)
    return BenchParams(**sweep)  # type: ignore[arg-type]
