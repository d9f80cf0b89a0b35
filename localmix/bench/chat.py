"""The chat benchmark: what a user feels in the REPL, measured through Engine.stream().

Unlike llama-bench's pp / tg, this is one real chat turn: the model's chat template around a
user message, the default sampler chain, text detokenized as it streams. Each repetition starts
from an empty KV cache, so time to first token includes processing the whole prompt.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from localmix.bench.params import BenchParams, cases
from localmix.bench.result import mean, stdev
from localmix.bench.run import build_info, machine_info, open_case

if TYPE_CHECKING:
    from localmix.llama.engine import Engine, Sampling, Stats

MESSAGE = (
    "Explain, in a few paragraphs, how a lighthouse keeper in the nineteenth century kept the "
    "lamp burning through a winter storm, and what could go wrong."
)


@dataclass(frozen=True)
class ChatBenchResult:
    """Time to first token and generation speed of one chat turn, per repetition."""

    model_filename: str
    model_type: str
    n_threads: int
    n_gpu_layers: int
    n_prompt: int  # tokens of the templated chat prompt
    max_tokens: int
    test_time: str
    samples_ttft_s: tuple[float, ...]
    samples_gen_ts: tuple[float, ...]  # generation t/s, first token excluded
    samples_prompt_ts: tuple[float, ...]
    samples_n_gen: tuple[int, ...]  # tokens generated (a random model may stop early)
    build_commit: str = "unknown"
    cpu_info: str = ""
    backends: str = "CPU"

    @property
    def avg_ttft_s(self) -> float:
        return mean(self.samples_ttft_s)

    @property
    def stddev_ttft_s(self) -> float:
        return stdev(self.samples_ttft_s)

    @property
    def avg_ts(self) -> float:
        return mean(self.samples_gen_ts)

    @property
    def stddev_ts(self) -> float:
        return stdev(self.samples_gen_ts)

    @property
    def avg_prompt_ts(self) -> float:
        return mean(self.samples_prompt_ts)

    def to_json(self) -> dict[str, object]:
        from dataclasses import asdict

        data: dict[str, object] = asdict(self)
        data.update(
            avg_ttft_s=self.avg_ttft_s,
            stddev_ttft_s=self.stddev_ttft_s,
            avg_ts=self.avg_ts,
            stddev_ts=self.stddev_ts,
            avg_prompt_ts=self.avg_prompt_ts,
        )
        return data


def run_chat(
    models: Sequence[Path],
    params: BenchParams = BenchParams(),  # noqa: B008 - frozen, safe as a default
    *,
    chat_formats: dict[Path, str | None] | None = None,
    names: dict[Path, str] | None = None,
    max_tokens: int = 128,
    message: str = MESSAGE,
    progress: Callable[[str], None] | None = None,
) -> list[ChatBenchResult]:
    """One chat turn per repetition, for each model and each -t / -ngl value; chat_formats and
    names are what the store says of each model (its format, the name a chat opens it by)."""
    from localmix.llama.engine import Sampling

    machine = machine_info()
    sweep = BenchParams(
        n_prompt=(1,), n_gen=(0,), n_threads=params.n_threads,
        n_gpu_layers=params.n_gpu_layers, n_batch=params.n_batch[:1],
        n_ubatch=params.n_ubatch[:1], type_k=params.type_k[:1], type_v=params.type_v[:1],
        flash_attn=params.flash_attn[:1], tensor_overrides=params.tensor_overrides,
        repack=params.repack,
    )  # fmt: skip
    results = []
    for case in cases(models, sweep):
        if progress:
            progress(f"{case.model.name}: loading")
        with open_case(case, 0) as engine:
            fmt = (chat_formats or {}).get(case.model)
            prompt = chat_prompt(engine, fmt, message, (names or {}).get(case.model))
            n_ctx_left = engine.n_ctx - len(prompt)
            budget = max(1, min(max_tokens, n_ctx_left))
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            if params.warmup:
                if progress:
                    progress(f"{case.model.name}: warmup")
                _turn(engine, prompt, Sampling(), 1)
            stats = []
            for rep in range(1, params.repetitions + 1):
                if progress:
                    progress(f"{case.model.name}: chat turn {rep}/{params.repetitions}")
                stats.append(_turn(engine, prompt, Sampling(), budget))
            results.append(
                ChatBenchResult(
                    model_filename=str(case.model),
                    model_type=engine.description,
                    n_threads=case.n_threads,
                    n_gpu_layers=case.n_gpu_layers,
                    n_prompt=len(prompt),
                    max_tokens=budget,
                    test_time=stamp,
                    samples_ttft_s=tuple(s.ttft_s for s in stats),
                    samples_gen_ts=tuple(s.gen_tps for s in stats),
                    samples_prompt_ts=tuple(s.prompt_tps for s in stats),
                    samples_n_gen=tuple(s.generated_tokens for s in stats),
                    build_commit=build_info(),
                    cpu_info=machine.cpu_info,
                    backends=machine.backends,
                )
            )
    return results


def _turn(engine: Engine, prompt: list[int], sampling: Sampling, max_tokens: int) -> Stats:
    """One streamed reply from an empty cache; returns the engine's Stats."""
    from localmix.llama.engine import Stats

    engine.clear()
    stats = None
    # ignore_eos: every turn generates max_tokens, so turns (and runs) compare like for like.
    turn = engine.stream(prompt, sampling=sampling, max_tokens=max_tokens, ignore_eos=True)
    for item in turn:
        if isinstance(item, Stats):
            stats = item
    assert stats is not None  # stream() always ends with Stats
    return stats


def chat_prompt(
    engine: Engine, chat_format: str | None, message: str, model: str | None = None
) -> list[int]:
    """The user message as `localmix chat` sends it (chat.profile: the named or detected format,
    thinking as the model starts a chat); the bare text after BOS for a model with no format."""
    from localmix.chat.profile import profile_for
    from localmix.chat.template import Message
    from localmix.errors import InvalidGGUF

    try:
        profile = profile_for(engine, chat_format, model)
    except InvalidGGUF:
        return engine.tokenize(message, add_bos=True, special=False)
    messages = [Message("user", message)]
    return profile.prompt(messages, engine.tokenize, thinking=profile.thinks_by_default)
