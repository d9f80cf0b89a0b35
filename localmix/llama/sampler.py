"""Sampling → llama.cpp's sampler chain (freed by the caller with llama_sampler_free), and the
greedy picks that need no chain: the argmax, and the argmax after a repeat penalty."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from localmix.errors import EngineError
from localmix.llama.records import Sampling

if TYPE_CHECKING:
    import numpy

_DEFAULT_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: llama.cpp draws a random seed


def sampler_chain(lib: Any, ctx: Any, sampling: Sampling, history: list[int]) -> Any:
    """A chain for one stream; the last repeat_last_n tokens of history count for the penalty."""
    model = lib.llama_get_model(ctx)
    n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
    last_n = penalty_window(lib.llama_n_ctx(ctx), sampling)
    penalize = sampling.repeat_penalty != 1.0 and last_n > 0
    links = []
    # top-k first: llama.h advises against penalties over the whole vocabulary, and on a 32k
    # vocabulary they cost ~100 us a token (3-4% of a small model's decode).
    if sampling.top_k > 0 and not sampling.is_greedy:
        links.append(lib.llama_sampler_init_top_k(sampling.top_k))
    if penalize:
        links.append(
            lib.llama_sampler_init_penalties(n_vocab, last_n, sampling.repeat_penalty, 0, 0)
        )
    if sampling.is_greedy:
        links.append(lib.llama_sampler_init_greedy())
    else:
        links.append(lib.llama_sampler_init_top_p(sampling.top_p, 1))
        links.append(lib.llama_sampler_init_min_p(sampling.min_p, 1))
        links.append(lib.llama_sampler_init_temp(sampling.temperature))
        seed = _DEFAULT_SEED if sampling.seed is None else sampling.seed & 0xFFFFFFFF
        links.append(lib.llama_sampler_init_dist(seed))

    params = lib.llama_sampler_chain_default_params()
    params.no_perf = True
    chain = lib.llama_sampler_chain_init(params)
    if not chain or not all(links):
        for link in ([chain] if chain else []) + [x for x in links if x]:
            lib.llama_sampler_free(link)
        raise EngineError("llama.cpp could not create the sampler chain")
    for link in links:  # the chain owns each link from here on
        lib.llama_sampler_chain_add(chain, link)
    if penalize:  # like llama-cli: the prompt counts as history for the penalty
        for token in history[-last_n:]:
            lib.llama_sampler_accept(chain, token)
    return chain


def penalty_window(n_ctx: int, sampling: Sampling) -> int:
    """How many recent tokens the repeat penalty looks at (repeat_last_n -1: the whole context)."""
    return n_ctx if sampling.repeat_last_n == -1 else sampling.repeat_last_n


class PenalizedGreedy:
    """Temperature 0 with a repeat penalty: the token llama.cpp's penalties → greedy chain picks,
    computed over the logits in numpy.

    Through llama_sampler_sample that chain fills a 32k-entry candidate array, looks every
    candidate up in the penalty's hash map and scans them all again for the maximum: ~300 us a
    token, several percent of a small model's token on the CPU. Only the repeat_last_n recent tokens
    change, so pick() rescales just those, exactly as llama_sampler_penalties_apply does (float32:
    a logit <= 0 is multiplied by the penalty, any other divided), takes the first maximum as
    llama_sampler_greedy_apply does, and puts the old values back. The window is the chain's: the
    last repeat_last_n tokens of the history given, then of every pick (as llama_sampler_sample
    accepts them, end-of-generation tokens included)."""

    def __init__(self, n_ctx: int, sampling: Sampling, history: Sequence[int]) -> None:
        import numpy as np

        self.last_n = penalty_window(n_ctx, sampling)
        if self.last_n <= 0:
            raise ValueError("PenalizedGreedy needs a penalty window of at least one token")
        self._where = np.where  # looked up once: pick() runs once a token
        self._penalty = np.float32(sampling.repeat_penalty)  # llama.cpp keeps it as a float
        # The window as a ring of token ids. A token twice in it is penalized once, as in
        # llama.cpp (a count, not a power): both copies read the same old value and write the
        # same new one.
        self._ring = np.zeros(self.last_n, dtype=np.intp)
        self._filled = 0  # tokens in the ring, up to last_n
        self._next = 0  # where the next token goes
        self._ids = self._ring[:0]
        for token in history[-self.last_n :]:
            self.accept(token)

    @property
    def window(self) -> list[int]:
        """The penalized tokens, oldest first."""
        ring, start = self._ring.tolist(), self._next if self._filled == self.last_n else 0
        return (ring[start:] + ring[:start])[: self._filled]

    def accept(self, token: int) -> None:
        """Add a token to the window (the oldest one leaves when it is full)."""
        self._ring[self._next] = token
        self._next = (self._next + 1) % self.last_n
        if self._filled < self.last_n:
            self._filled += 1
            self._ids = self._ring[: self._filled]

    def pick(self, logits: numpy.ndarray) -> int:
        """The greedy token for these float32 logits, then accepted into the window. The logits
        are changed while it runs and hold their old values again when it returns."""
        ids, penalty = self._ids, self._penalty
        old = logits[ids]  # a copy: fancy indexing
        try:
            logits[ids] = self._where(old <= 0, old * penalty, old / penalty)
            token = int(logits.argmax())
        finally:
            logits[ids] = old
        self.accept(token)
        return token
