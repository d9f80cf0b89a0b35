"""Sampling → llama.cpp's sampler chain (freed by the caller with llama_sampler_free)."""

from __future__ import annotations

from typing import Any

from localmix.errors import EngineError
from localmix.llama.records import Sampling

_DEFAULT_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: llama.cpp draws a random seed


def sampler_chain(lib: Any, ctx: Any, sampling: Sampling, history: list[int]) -> Any:
    """A chain for one stream; the last repeat_last_n tokens of history count for the penalty."""
    model = lib.llama_get_model(ctx)
    n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
    last_n = lib.llama_n_ctx(ctx) if sampling.repeat_last_n == -1 else sampling.repeat_last_n
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
