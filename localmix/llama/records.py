"""The engine's records: how to load a model (EngineConfig), how to sample (Sampling), and what a
stream yields (Chunk, then Stats). localmix's own tables stand in for llama.cpp's C enums."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from localmix.errors import UsageError

if TYPE_CHECKING:
    import numpy

# enum llama_flash_attn_type (include/llama.h)
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}

# enum ggml_type values of the KV cache types llama.cpp accepts (llama-bench's -ctk / -ctv list).
KV_CACHE_TYPES = {
    "f32": 0,
    "f16": 1,
    "bf16": 30,
    "q8_0": 8,
    "q4_0": 2,
    "q4_1": 3,
    "iq4_nl": 20,
    "q5_0": 6,
    "q5_1": 7,
}

# LLAMA_MAX_SEQ (llama-cparams.h): a context refuses more sequences than this.
MAX_SEQUENCES = 256

FINISH_REASONS = ("stop", "length", "stop_string", "interrupted")


def _choice(what: str, value: str, table: dict[str, int]) -> None:
    if value not in table:
        raise UsageError(f"unknown {what} {value!r}", hint="one of: " + ", ".join(table))


@dataclass(frozen=True)
class EngineConfig:
    """How to load a GGUF: context size (tokens; 0 = the model's trained context), threads, batch
    sizes (tokens), GPU layers (-1 = all), flash attention, KV cache types and tensor placement
    (devices, local or on RPC workers, and overrides)."""

    model_path: Path
    n_ctx: int = 4096
    n_threads: int | None = None  # None: settings.default_threads()
    n_threads_batch: int | None = None  # None: n_threads
    n_batch: int = 2048
    n_ubatch: int = 512
    n_gpu_layers: int = 0
    flash_attn: str = "auto"
    type_k: str = "f16"
    type_v: str = "f16"
    tensor_overrides: tuple[tuple[str, str], ...] = ()  # (regex on tensor name, buffer type)
    use_mmap: bool = True
    # llama_model_params.use_extra_bufts: weights may go to the CPU's extra buffer types (repacked
    # for its kernels: CPU_REPACK, AMX). llama.cpp's default; load.weight_repack decides it.
    repack: bool = True
    verbose: bool = False
    tap: MatMulTap | None = None  # sees the inputs of the graph's matrix products (imatrix)
    # Sequences decoded together (llama/batch.py); above 1 the KV cache is one buffer that every
    # sequence draws cells from (llama.cpp's kv_unified), n_ctx cells in all.
    n_seq_max: int = 1
    # the vocabulary and metadata only, no weights and no context: tokenize and detokenize
    # (serve's HTTP side, while the model itself runs in a worker process)
    vocab_only: bool = False
    # llama.cpp RPC workers (HOST:PORT, `localmix worker`) whose devices join this process's
    # (llama/rpc.py). Their CPUs never repack weights; `repack` is for the layers kept here.
    rpc: tuple[str, ...] = ()
    # The devices that take the offloaded layers, in order, by name (llama.cpp's --device:
    # RPC0, CUDA0, CPU...); () is llama.cpp's choice, with rpc: those workers' devices, then the
    # local GPUs (the last device holds the output, so logits need not cross the network).
    devices: tuple[str, ...] = ()
    # each device's share of the offloaded layers (--tensor-split); () splits by free memory
    tensor_split: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        _choice("flash attention mode", self.flash_attn, FLASH_ATTN)
        _choice("KV cache type", self.type_k, KV_CACHE_TYPES)
        _choice("KV cache type", self.type_v, KV_CACHE_TYPES)
        if self.n_ctx < 0:
            raise UsageError(f"context size must be 0 or more, not {self.n_ctx}")
        if self.n_batch < 1 or self.n_ubatch < 1:
            raise UsageError("batch sizes must be at least 1", hint="use 1 or more")
        if not 1 <= self.n_seq_max <= MAX_SEQUENCES:
            raise UsageError(
                f"parallel sequences must be between 1 and {MAX_SEQUENCES}, not {self.n_seq_max}"
            )
        for threads in (self.n_threads, self.n_threads_batch):
            if threads is not None and threads < 1:
                raise UsageError(f"threads must be at least 1, not {threads}")
        if self.rpc:
            from localmix.llama.rpc import parse_endpoints

            object.__setattr__(self, "rpc", tuple(str(e) for e in parse_endpoints(self.rpc)))
        split = tuple(float(share) for share in self.tensor_split)
        object.__setattr__(self, "tensor_split", split)
        if split and (any(not 0 <= s < float("inf") for s in split) or not sum(split) > 0):
            raise UsageError(
                "a tensor split is shares of 0 or more, at least one above 0",
                hint="e.g. 3,1 puts three quarters of the offloaded layers on the first device",
            )


@dataclass(frozen=True)
class MatMul:
    """A matrix product in llama.cpp's compute graph, as the eval callback sees it. Shapes are
    ggml's ne, innermost first; the weight is the first operand, the inputs the second."""

    op: str  # "MUL_MAT", or "MUL_MAT_ID": one matrix per expert, chosen per token by expert ids
    weight: str  # the first operand's name ("blk.0.attn_q.weight" for a model weight)
    weight_shape: tuple[int, ...]  # (columns, rows, matrices, 1): matrices is experts for _ID
    input_shape: tuple[int, ...]  # (columns, rows, ...): rows are tokens (or expert slots)
    input_f32: bool


class MatMulTap(Protocol):
    """What an engine calls while it computes: wants() for every product about to run, take()
    with the inputs of each product wanted, once it has run."""

    def wants(self, product: MatMul) -> bool: ...

    def take(
        self, product: MatMul, inputs: numpy.ndarray, expert_ids: numpy.ndarray | None
    ) -> None:
        """inputs: float32 shaped (ne3, ne2, ne1, ne0), readable only during the call; expert_ids
        (MUL_MAT_ID only): int32 (tokens, experts used), the expert each input row goes to."""


_SAMPLING_HINT = "see `localmix chat --help` for each sampling value's range"


@dataclass(frozen=True)
class Sampling:
    """llama.cpp's sampler chain: repeat penalty, top-k, top-p, min-p, temperature, then a seeded
    draw; temperature 0 picks the most likely token. seed None draws a random seed."""

    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    seed: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)

    def __post_init__(self) -> None:
        # a saved chat reads it back as lists of lists
        bias = tuple((int(t), float(b)) for t, b in self.logit_bias)
        object.__setattr__(self, "logit_bias", bias)
        if any(b != b or b == float("inf") for _, b in bias):  # -inf bans a token; NaN, +inf no
            raise UsageError("a logit bias must be a number or -inf", hint=_SAMPLING_HINT)
        if not self.temperature >= 0:
            raise UsageError(
                f"temperature must be 0 or more, not {self.temperature}", hint=_SAMPLING_HINT
            )
        if self.top_k < 0:
            raise UsageError(
                f"top_k must be 0 (off) or more, not {self.top_k}", hint=_SAMPLING_HINT
            )
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1], not {self.top_p}", hint=_SAMPLING_HINT)
        if not 0 <= self.min_p <= 1:
            raise UsageError(f"min_p must be in [0, 1], not {self.min_p}", hint=_SAMPLING_HINT)
        if not self.repeat_penalty > 0:
            raise UsageError(
                f"repeat_penalty must be above 0, not {self.repeat_penalty}", hint=_SAMPLING_HINT
            )
        if self.repeat_last_n < -1:
            raise UsageError(
                "repeat_last_n must be -1 (whole context), 0 (off) or more", hint=_SAMPLING_HINT
            )

    @classmethod
    def greedy(cls) -> Sampling:
        """Always the most likely token: temperature 0, no repeat penalty."""
        return cls(temperature=0.0, repeat_penalty=1.0)

    @property
    def is_greedy(self) -> bool:
        return self.temperature <= 0

    @property
    def is_plain_greedy(self) -> bool:
        """Temperature 0 and nothing that changes logits: the choice is the argmax."""
        return self.is_greedy and (self.repeat_penalty == 1.0 or self.repeat_last_n == 0)


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability (natural log, over the whole vocabulary, after any
    logit bias and before sampling's cuts), and the most likely tokens at its position."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, log-probability), most likely first


@dataclass(frozen=True)
class Chunk:
    """Generated text for one token. text never splits a UTF-8 character, so it may be empty while
    a character or a possible stop string is incomplete; token is -1 for the text flushed at the end.
    logprob: the token's, when the generation asked for them."""

    text: str
    token: int
    logprob: TokenLogprob | None = None


@dataclass(frozen=True)
class Stats:
    """One stream's counters: tokens, seconds and tokens per second (generation excludes the first
    token, whose time is in ttft_s)."""

    prompt_tokens: int  # tokens processed this call
    cached_tokens: int  # reused from the KV cache
    generated_tokens: int
    ttft_s: float
    prompt_s: float
    prompt_tps: float
    gen_s: float
    gen_tps: float
    finish_reason: str  # one of FINISH_REASONS
    image_s: float = 0.0  # of prompt_s, the vision tower's time encoding the prompt's images
