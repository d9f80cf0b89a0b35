"""The generation core: one sequence's way from a prompt to its last token, written once.

`Generating` is the per-sequence state machine that Engine.stream (one sequence) and the serve
scheduler's Batch (many, one llama_decode for all) both drive. The driver owns the KV cache and
the decodes; the state owns everything else: the checks a prompt must pass, which tokens go to
the cache next (`pending`), the picker (argmax, penalised argmax, or llama.cpp's sampler chain),
the logit bias, log-probabilities, end-of-generation and stop strings, the text stream and Stats.

A driver's loop:

    state = Generating(engine, gen, cached=<tokens reused from the cache>, n_ctx=<room>)
    decode state.pending, calling state.decoded(n) for the n tokens that reached the cache
    chunks = state.sample(index)  # index: the batch row holding this sequence's last logits
    if not state.done: decode state.pending (the token just picked) and sample again
    stats = state.stats()         # once done, or with "interrupted" when the driver stops it
    state.close()                 # frees the sampler chain; idempotent

Constraints (grammars), tool-call parsing and speculative decoding belong here, so that every
caller gets them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from localmix.errors import ContextTooLong, UsageError
from localmix.llama.records import Chunk, Sampling, Stats, TokenLogprob
from localmix.llama.sampler import PenalizedGreedy, sampler_chain
from localmix.llama.textstream import TextStream

if TYPE_CHECKING:
    import numpy

    from localmix.llama.constraint import Constraint
    from localmix.llama.engine import Engine

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs


@dataclass(frozen=True)
class Generation:
    """What one sequence is asked to do: continue `prompt` (token ids) with at most max_tokens
    tokens, picked as `sampling` says, until an end-of-generation token or a stop string.
    logprobs: None for none, else each token's log-probability with that many alternatives.
    grammar: the reply must match it (JSON schemas, tool calls); the logits are masked to it."""

    prompt: Sequence[int]
    sampling: Sampling = field(default_factory=Sampling)
    max_tokens: int = 512
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    grammar: str | None = None  # a constraint on the reply (llama/constraint.py): Lark text
    images: tuple[ImageSpan, ...] = ()  # embeddings that stand in for prompt positions


@dataclass(frozen=True)
class ImageSpan:
    """An image in a prompt: the `length` positions from `start` on (its [IMG] and [IMG_BREAK]
    tokens) take the vision tower's embeddings (length x n_embd float32), given or made on
    demand (a callable: an image the cache already holds is not encoded again); key names the
    image, so that a cache holding another image at those positions is not reused."""

    start: int
    length: int
    key: str
    embeddings: numpy.ndarray | Callable[[], numpy.ndarray] = field(repr=False)

    @property
    def end(self) -> int:
        return self.start + self.length

    def rows(self) -> numpy.ndarray:
        return self.embeddings() if callable(self.embeddings) else self.embeddings


def checked_prompt(gen: Generation, n_vocab: int, n_ctx: int, *, hint: str) -> list[int]:
    """The prompt as a list, after the checks every caller's prompt passes (hint: what to do
    about one too long for n_ctx)."""
    prompt = list(gen.prompt)
    if not prompt:
        raise UsageError("the prompt has no tokens")
    check_tokens(prompt, n_vocab)
    if len(prompt) > n_ctx:
        raise ContextTooLong(
            f"the prompt is {len(prompt)} tokens; the context holds {n_ctx}", hint=hint
        )
    if gen.max_tokens < 0:
        raise UsageError(f"max_tokens must be 0 or more, not {gen.max_tokens}")
    if gen.logprobs is not None and not 0 <= gen.logprobs <= MAX_TOP_LOGPROBS:
        raise UsageError(f"top logprobs must be in [0, {MAX_TOP_LOGPROBS}], not {gen.logprobs}")
    check_tokens([token for token, _ in gen.sampling.logit_bias], n_vocab, what="logit_bias")
    at = 0
    for span in gen.images:  # in order, apart, and before the last token (decoded alone)
        if span.start < at or span.end >= len(prompt) or span.length < 1:
            raise UsageError("image spans must lie apart, in order, inside the prompt")
        at = span.end
    return prompt


def check_tokens(tokens: Sequence[int], n_vocab: int, *, what: str = "token ids") -> None:
    if tokens and (min(tokens) < 0 or max(tokens) >= n_vocab):
        raise UsageError(f"{what} must be in [0, {n_vocab})")


def common_prefix(cached: Sequence[int], prompt: Sequence[int]) -> int:
    """How many cached tokens a prompt can reuse: their common prefix, short of the prompt's last
    token, which is always decoded again (its logits pick the first token)."""
    n, limit = 0, min(len(cached), len(prompt) - 1)
    while n < limit and cached[n] == prompt[n]:
        n += 1
    return n


def picker(
    engine: Engine, sampling: Sampling, history: list[int]
) -> tuple[Callable[[int], int], Any]:
    """How a sequence picks a token from the logits at a batch index (-1: the last), and the
    sampler chain to free afterwards (None for the greedy picks, which need none)."""
    rows = engine.logits_at
    if sampling.is_plain_greedy:
        # the token llama.cpp's greedy sampler would choose (the first maximum), without
        # building its candidate array (~30 us a token)
        return (lambda i: int(rows(i).argmax())), None
    if sampling.is_greedy:
        penalized = PenalizedGreedy(engine.n_ctx, sampling, history)
        return (lambda i: penalized.pick(rows(i))), None
    chain = sampler_chain(engine.lib, engine.context, sampling, history)
    return partial(engine.lib.llama_sampler_sample, chain, engine.context), chain


class Generating:
    """One Generation in progress; see the module docstring for the driver's loop."""

    def __init__(self, engine: Engine, gen: Generation, prompt: list[int], *, cached: int,
                 n_ctx: int) -> None:  # fmt: skip
        self.gen, self.engine, self.n_ctx = gen, engine, n_ctx
        self.prompt_len, self.cached = len(prompt), cached
        self.pending = prompt[cached:]  # tokens the driver decodes next, in order
        self.prompt_left = len(self.pending)  # of those, prompt tokens
        self.kv_len = cached  # positions this sequence holds in the cache
        self.n_gen = self.n_samples = 0
        self.finish_reason: str | None = None  # set once done
        self.t_start = self.t_first = self.t_last = time.perf_counter()
        self.t_prompt: float | None = None
        self.image_s = 0.0  # the driver's time encoding images (the vision tower), in prompt_s
        self._text = TextStream(gen.stop)
        self._bias = _bias_arrays(gen.sampling.logit_bias)
        self._constraint = _constraint(engine, gen.grammar)
        # A greedy pick is checked against the grammar first and the logits masked only when it
        # is refused (llama.cpp's common sampler does the same): the argmax of the masked logits
        # is the unmasked argmax whenever that one is allowed, and a check costs far less than a
        # mask. Logprobs need the masked distribution, so they mask first.
        self._lazy_mask = gen.sampling.is_plain_greedy and gen.logprobs is None
        self._pick, self._chain = picker(engine, gen.sampling, prompt)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def decoded(self, n: int) -> None:
        """The driver put the first n pending tokens into the cache."""
        del self.pending[:n]
        self.kv_len += n
        self.prompt_left = max(0, self.prompt_left - n)

    def sample(self, index: int) -> list[Chunk]:
        """Pick the next token from the logits at batch row `index`: the text it settles (with
        the stream's tail once done). Unless that ends the generation (`done`), the token is now
        `pending`: the driver decodes it before sampling again."""
        clock = time.perf_counter
        if self.t_prompt is None:
            self.t_prompt = clock()
        gen = self.gen
        if self.n_gen >= gen.max_tokens:  # max_tokens 0: the prompt only
            self.finish_reason = "length"
            return []
        logprob = self._adjust(index)
        token = self._pick(index)
        constraint = self._constraint
        if constraint is not None:
            if self._lazy_mask and not constraint.allows(token):
                constraint.mask(self.engine.logits_at(index))
                token = self._pick(index)
            constraint.accept(token)
        self.t_last = clock()
        self.n_samples += 1
        if self.n_samples == 1:
            self.t_first = self.t_last
        engine = self.engine
        if engine.is_end(token) and not gen.ignore_eos:
            self.finish_reason = "stop"
            return []
        self.n_gen += 1
        text = self._text
        chunk = Chunk(text.feed(engine.piece(token)), token)
        if logprob is not None:
            chunk = Chunk(chunk.text, token, logprob(token))
        if text.stopped:
            self.finish_reason = "stop_string"
        elif self.n_gen >= gen.max_tokens or self.kv_len >= self.n_ctx:
            self.finish_reason = "length"
        else:
            self.pending = [token]
            return [chunk]
        tail = text.flush()
        return [chunk, Chunk(tail, -1)] if tail else [chunk]

    def _adjust(self, index: int) -> Callable[[int], TokenLogprob] | None:
        """Apply the logit bias and the constraint's mask to the logits in place (every picker
        reads them there) and, when asked, read the log-probabilities of this position, for the
        token still to be picked."""
        eager = self._constraint is not None and not self._lazy_mask
        if self._bias is None and not eager and self.gen.logprobs is None:
            return None
        row = self.engine.logits_at(index)
        if self._bias is not None:
            ids, values = self._bias
            row[ids] += values
        if self._constraint is not None and not self._lazy_mask:
            self._constraint.mask(row)
        if self.gen.logprobs is None:
            return None
        return partial(token_logprob, _log_softmax(row), top=self.gen.logprobs)

    def stats(self, reason: str | None = None) -> Stats:
        """The sequence's counters; reason (e.g. "interrupted") when the driver ended it."""
        reason = reason or self.finish_reason or "interrupted"
        now = time.perf_counter()
        reading = self.t_prompt is None  # stopped while its prompt was read
        processed = (self.prompt_len - self.cached) - self.prompt_left
        prompt_s = (now if reading else self.t_prompt or now) - self.t_start
        gen_s = self.t_last - self.t_first
        return Stats(
            prompt_tokens=max(0, processed),
            cached_tokens=self.cached,
            generated_tokens=self.n_gen,
            ttft_s=self.t_first - self.t_start if self.n_samples else 0.0,
            prompt_s=prompt_s,
            prompt_tps=processed / prompt_s if prompt_s > 0 and processed > 0 else 0.0,
            gen_s=gen_s,
            gen_tps=(self.n_samples - 1) / gen_s if gen_s > 0 else 0.0,
            finish_reason=reason,
            image_s=self.image_s,
        )

    def close(self) -> None:
        """Free the sampler chain (idempotent)."""
        chain, self._chain = self._chain, None
        if chain is not None:
            self.engine.lib.llama_sampler_free(chain)


def _constraint(engine: Engine, grammar: str | None) -> Constraint | None:
    if grammar is None:
        return None
    from localmix.llama import constraint

    return constraint.compile(engine, grammar)


def _bias_arrays(bias: Sequence[tuple[int, float]]) -> tuple[numpy.ndarray, numpy.ndarray] | None:
    if not bias:
        return None
    import numpy as np

    merged: dict[int, float] = {}
    for token, value in bias:  # a token named twice: its biases add up
        merged[token] = merged.get(token, 0.0) + value
    return np.fromiter(merged, dtype=np.intp), np.fromiter(merged.values(), dtype=np.float32)


def _log_softmax(row: numpy.ndarray) -> numpy.ndarray:
    import numpy as np

    shifted = row.astype(np.float64) - float(row.max())
    return shifted - np.log(np.exp(shifted).sum())


def token_logprob(logprobs: numpy.ndarray, token: int, *, top: int) -> TokenLogprob:
    """The picked token's log-probability and the `top` most likely tokens', most likely first."""
    import numpy as np

    best: list[tuple[int, float]] = []
    if top:
        ids = np.argpartition(logprobs, -top)[-top:]
        ids = ids[np.argsort(-logprobs[ids], kind="stable")]
        best = [(int(i), float(logprobs[i])) for i in ids]
    return TokenLogprob(token, float(logprobs[token]), tuple(best))
