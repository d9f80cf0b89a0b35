"""Several sequences in one llama.cpp context, decoded together: continuous batching.

A Batch owns an Engine loaded with n_seq_max > 1 (sequence ids 0..n-1, one KV buffer shared by
all of them). Each step() is one llama_decode of one batch: the last sampled token of every
sequence that is generating, then as much of the waiting prompts as n_batch leaves room for, so
a new request joins between two decode steps and long prompts do not stall the others. Each
sequence keeps its own sampler, stop strings and counters, with the single-sequence semantics of
Engine.stream(): the same Chunks, the same finish reasons, the same Stats.

A finished sequence keeps its tokens in the KV cache, so a request that continues it (the next
chat turn) is given that slot and decodes only what is new, until another generation starts (the
other idle sequences' cells are freed then); a cancelled one frees its cells at once. llama.cpp contexts are not thread-safe: one thread drives a Batch (and its Engine).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from localmix.errors import ContextTooLong, EngineError, UsageError
from localmix.llama.records import Chunk, Sampling, Stats
from localmix.llama.sampler import PenalizedGreedy, sampler_chain
from localmix.llama.textstream import TextStream

if TYPE_CHECKING:
    import numpy

    from localmix.llama.engine import Engine

_NO_KV_SLOT = 1  # llama_decode: the KV cache has no room for the batch


@dataclass(frozen=True)
class Generation:
    """What one sequence is asked to do: continue `prompt` (token ids) with at most max_tokens
    tokens, sampled as `sampling` says, until an end-of-generation token or a stop string."""

    prompt: Sequence[int]
    sampling: Sampling = field(default_factory=Sampling)
    max_tokens: int = 512
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass
class _Slot:
    """One sequence id: the tokens its KV cells hold, and the generation it runs (if any)."""

    seq: int
    kv: list[int] = field(default_factory=list)  # tokens at positions 0..len-1
    pending: list[int] = field(default_factory=list)  # tokens to decode next, in order
    gen: Generation | None = None
    pick: Callable[[int], int] | None = None  # batch index of the logits -> token
    chain: Any = None  # llama.cpp sampler chain, freed when the generation ends
    text: TextStream | None = None
    last_used: float = 0.0
    cached = prompt_left = n_gen = n_samples = 0
    t_start = t_prompt = t_first = t_last = 0.0

    @property
    def busy(self) -> bool:
        return self.gen is not None


class Batch:
    """Continuous batching over one Engine: start() a Generation on a free sequence, step() to
    decode once and collect what every sequence produced, cancel() to stop one early."""

    def __init__(self, engine: Engine, seq_ctx: int | None = None) -> None:
        self.engine = engine
        # The engine's own decode loop is not used while a Batch drives its context; reaching
        # into it (same package) keeps one owner of the model, vocabulary and caches.
        self._c, self._ctx, self._mem = engine._c, engine._ctx, engine._mem
        self.n_seq = int(self._c.llama_n_seq_max(self._ctx))
        self.seq_ctx = min(seq_ctx or engine.n_ctx // self.n_seq, engine.n_ctx)
        self._size = max(engine._n_batch, self.n_seq)
        self._batch = self._c.llama_batch_init(self._size, 0, 1)
        if not self._batch.token:
            raise EngineError(f"llama.cpp could not allocate a batch of {self._size} tokens")
        self._stack_free()
        self._slots = [_Slot(seq) for seq in range(self.n_seq)]
        engine.clear()  # sequence 0 was the engine's: start from an empty cache
        self._views = self._logits_views()

    def _stack_free(self) -> None:
        self.engine._stack.callback(self._c.llama_batch_free, self._batch)
        # Field access on a ctypes struct builds a new pointer object: keep these once.
        b = self._batch
        self._tok, self._pos, self._nseq, self._seqid, self._logit = (
            b.token, b.pos, b.n_seq_id, b.seq_id, b.logits
        )  # fmt: skip
        for i in range(self._size):
            self._nseq[i] = 1

    # -- what is there -------------------------------------------------------------------------

    @property
    def active(self) -> int:
        """Sequences generating now."""
        return sum(slot.busy for slot in self._slots)

    @property
    def free(self) -> int:
        """Sequences a new generation could start on."""
        return self.n_seq - self.active

    def kv_tokens(self, seq: int) -> tuple[int, ...]:
        """The tokens sequence `seq` holds in the KV cache."""
        return tuple(self._slots[seq].kv)

    def cells(self, seq: int) -> int:
        """KV positions llama.cpp holds for `seq` (0 once it is freed), asked of llama.cpp."""
        return int(self._c.llama_memory_seq_pos_max(self._mem, seq)) + 1

    # -- starting and stopping -----------------------------------------------------------------

    def start(self, gen: Generation) -> int:
        """Begin a generation on a free sequence (the one whose cache shares the longest prefix
        with the prompt); returns its id. Decoding happens in step()."""
        prompt = self._checked(gen)
        slot, keep = self._choose(prompt)
        self._truncate(slot, keep)
        self._clear_idle(but=slot)
        slot.gen = gen
        slot.pending = prompt[len(slot.kv) :]
        slot.cached = len(slot.kv)
        slot.prompt_left = len(slot.pending)
        slot.n_gen = slot.n_samples = 0
        slot.t_start = slot.t_prompt = slot.t_first = slot.t_last = time.perf_counter()
        slot.text = TextStream(gen.stop)
        try:
            slot.pick, slot.chain = self._picker(gen.sampling, prompt)
        except BaseException:
            slot.gen = None
            raise
        return slot.seq

    def _checked(self, gen: Generation) -> list[int]:
        prompt = list(gen.prompt)
        if not prompt:
            raise UsageError("the prompt has no tokens")
        if min(prompt) < 0 or max(prompt) >= self.engine.n_vocab:
            raise UsageError(f"token ids must be in [0, {self.engine.n_vocab})")
        if len(prompt) > self.seq_ctx:
            raise ContextTooLong(
                f"the prompt is {len(prompt)} tokens; the context holds {self.seq_ctx}",
                hint="shorten the prompt or serve with a larger context size",
            )
        if gen.max_tokens < 0:
            raise UsageError(f"max_tokens must be 0 or more, not {gen.max_tokens}")
        if self.free == 0:
            raise EngineError("every sequence is busy")
        return prompt

    def _choose(self, prompt: list[int]) -> tuple[_Slot, int]:
        """The idle slot to use and how many of its cached tokens to keep: the longest common
        prefix wins, then the least recently used. The last prompt token is always decoded again
        (its logits pick the first token)."""
        best, best_n = None, -1
        for slot in self._slots:
            if slot.busy:
                continue
            n, limit = 0, min(len(slot.kv), len(prompt) - 1)
            while n < limit and slot.kv[n] == prompt[n]:
                n += 1
            if n > best_n or (n == best_n and best is not None and slot.last_used < best.last_used):
                best, best_n = slot, n
        assert best is not None  # _checked made sure one is free
        return best, best_n

    def _truncate(self, slot: _Slot, keep: int) -> None:
        if keep >= len(slot.kv):
            return
        if not self._c.llama_memory_seq_rm(self._mem, slot.seq, keep, -1):
            # a cache that cannot drop a suffix (sliding window): drop the sequence instead
            self._c.llama_memory_seq_rm(self._mem, slot.seq, -1, -1)
            keep = 0
        del slot.kv[keep:]

    def cancel(self, seq: int) -> Stats:
        """Stop sequence `seq` now and free its KV cells; returns its Stats ("interrupted")."""
        slot = self._slots[seq]
        if not slot.busy:
            raise UsageError(f"sequence {seq} is not generating")
        stats = self._finish(slot, "interrupted")
        self._c.llama_memory_seq_rm(self._mem, seq, -1, -1)
        slot.kv.clear()
        return stats

    def clear_idle(self) -> int:
        """Free the KV cells that idle sequences keep for prefix reuse; returns how many."""
        return self._clear_idle(but=None)

    def _clear_idle(self, but: _Slot | None) -> int:
        # llama.cpp attends over every cell up to the highest one in use, masked or not: cells
        # that idle sequences keep would slow down every decode (llama-server clears them too)
        freed = 0
        for slot in self._slots:
            if not slot.busy and slot.kv and slot is not but:
                self._c.llama_memory_seq_rm(self._mem, slot.seq, -1, -1)
                freed += len(slot.kv)
                slot.kv.clear()
        return freed

    # -- sampling ------------------------------------------------------------------------------

    def _logits_views(self) -> Callable[[int], numpy.ndarray]:
        """Batch index -> its logits as a numpy view over llama.cpp's buffer (valid until the
        next decode)."""
        from localmix.llama.engine import logits_rows

        return logits_rows(self._ctx, self.engine.n_vocab)

    def _picker(self, sampling: Sampling, prompt: list[int]) -> tuple[Callable[[int], int], Any]:
        """How this sequence picks a token from the logits at a batch index, and the sampler
        chain to free afterwards (None for the greedy picks that need none)."""
        view = self._views
        if sampling.is_plain_greedy:
            return (lambda i: int(view(i).argmax())), None
        if sampling.is_greedy:
            penalized = PenalizedGreedy(self.engine.n_ctx, sampling, prompt)
            return (lambda i: penalized.pick(view(i))), None
        chain = sampler_chain(self._c, self._ctx, sampling, prompt)
        return partial(self._c.llama_sampler_sample, chain, self._ctx), chain

    # -- one step ------------------------------------------------------------------------------

    def step(self) -> list[tuple[int, Chunk | Stats]]:
        """Decode once for every busy sequence; returns (sequence id, Chunk or its final Stats)
        in order. A sequence's Stats is its last item: its slot is free again after it."""
        rows = self._fill()
        if not rows:
            return []
        self._decode(rows)
        out: list[tuple[int, Chunk | Stats]] = []
        for slot, _, index in rows:
            if index >= 0:
                self._sampled(slot, index, out)
        return out

    def _fill(self) -> list[tuple[_Slot, int, int]]:
        """Put the next tokens into the batch: one for each generating sequence, then prompt
        chunks, oldest request first, while n_batch has room. Returns (slot, tokens taken,
        batch index of its logits or -1 while its prompt is still being read) per slot."""
        tok, pos, seqid, logit = self._tok, self._pos, self._seqid, self._logit
        busy = [s for s in self._slots if s.busy and s.pending]
        # generating sequences first (one token each), so a long prompt never delays them
        busy.sort(key=lambda s: (s.prompt_left > 0, s.t_start))
        n, rows = 0, []
        for slot in busy:
            # A lone sequence's last prompt token goes in a step of its own (after the rest), as
            # it does when the rest is cached: a seeded reply then repeats whether its prompt was
            # cached or not. Beside other sequences the batch's shape varies anyway, so there it
            # would only cost a step of time to first token.
            hold = slot.prompt_left > 1 and len(busy) == 1
            ahead = len(slot.pending) - 1 if hold else len(slot.pending)
            take = min(ahead, self._size - n)
            if take <= 0:
                break
            base, pending = len(slot.kv), slot.pending
            for j in range(take):
                tok[n + j] = pending[j]
                pos[n + j] = base + j
                seqid[n + j][0] = slot.seq
                logit[n + j] = 0
            n += take
            done = take == len(pending)
            if done:
                logit[n - 1] = 1
            rows.append((slot, take, n - 1 if done else -1))
        self._batch.n_tokens = n
        return rows

    def _decode(self, rows: list[tuple[_Slot, int, int]]) -> None:
        rc = self._c.llama_decode(self._ctx, self._batch)
        if rc == _NO_KV_SLOT and self.clear_idle():
            rc = self._c.llama_decode(self._ctx, self._batch)  # room made: once more
        if rc != 0:
            self._sync()
            from localmix.llama.backend import LOG

            raise EngineError(
                f"llama_decode failed ({rc}) for {len(rows)} sequences: "
                + LOG.last_error("no detail")
            )
        for slot, take, _ in rows:
            slot.kv.extend(slot.pending[:take])
            del slot.pending[:take]
            slot.prompt_left = max(0, slot.prompt_left - take)

    def _sync(self) -> None:
        """Make each slot's token list agree with the cells llama.cpp kept after a failure."""
        for slot in self._slots:
            held = self.cells(slot.seq)
            if held < len(slot.kv):
                del slot.kv[held:]

    def _sampled(self, slot: _Slot, index: int, out: list[tuple[int, Chunk | Stats]]) -> None:
        """Pick the next token of `slot` from batch row `index`; hand out its text or finish."""
        gen, engine, clock = slot.gen, self.engine, time.perf_counter
        assert gen is not None and slot.pick is not None and slot.text is not None
        if slot.n_samples == 0:
            slot.t_prompt = clock()
        if slot.n_gen >= gen.max_tokens:  # max_tokens 0: the prompt only
            out.append((slot.seq, self._finish(slot, "length")))
            return
        token = slot.pick(index)
        slot.t_last = clock()
        slot.n_samples += 1
        if slot.n_samples == 1:
            slot.t_first = slot.t_last
        end = engine._eog.get(token)
        if end is None:
            end = engine._is_end(token)
        if end and not gen.ignore_eos:
            out.append((slot.seq, self._finish(slot, "stop")))
            return
        slot.n_gen += 1
        data = engine._pieces.get(token)
        text = slot.text.feed(engine._piece(token) if data is None else data)
        out.append((slot.seq, Chunk(text, token)))
        more = slot.n_gen < gen.max_tokens and len(slot.kv) < self.seq_ctx
        if slot.text.stopped or not more:
            self._flush(slot, out)
            out.append(
                (slot.seq, self._finish(slot, "stop_string" if slot.text.stopped else "length"))
            )
            return
        slot.pending = [token]

    def _flush(self, slot: _Slot, out: list[tuple[int, Chunk | Stats]]) -> None:
        assert slot.text is not None
        tail = slot.text.flush()
        if tail:
            out.append((slot.seq, Chunk(tail, -1)))

    def _finish(self, slot: _Slot, reason: str) -> Stats:
        """End the slot's generation: free its sampler, count, and make it idle."""
        if slot.chain is not None:
            self._c.llama_sampler_free(slot.chain)
        now = time.perf_counter()
        assert slot.gen is not None
        reading = slot.n_samples == 0 and reason == "interrupted"
        processed = (len(slot.gen.prompt) - slot.cached) - slot.prompt_left
        prompt_s = (now if reading else slot.t_prompt) - slot.t_start
        gen_s = slot.t_last - slot.t_first
        stats = Stats(
            prompt_tokens=max(0, processed),
            cached_tokens=slot.cached,
            generated_tokens=slot.n_gen,
            ttft_s=slot.t_first - slot.t_start if slot.n_samples else 0.0,
            prompt_s=prompt_s,
            prompt_tps=processed / prompt_s if prompt_s > 0 and processed > 0 else 0.0,
            gen_s=gen_s,
            gen_tps=(slot.n_samples - 1) / gen_s if gen_s > 0 else 0.0,
            finish_reason=reason,
        )
        slot.gen = slot.pick = slot.chain = slot.text = None
        slot.pending = []
        slot.prompt_left = 0
        slot.last_used = now
        return stats
