"""Several sequences in one llama.cpp context, decoded together: continuous batching.

A Batch owns an Engine loaded with n_seq_max > 1 (sequence ids 0..n-1, one KV buffer shared by
all of them). Each step() is one llama_decode of one batch: the last sampled token of every
sequence that is generating, then as much of the waiting prompts as n_batch leaves room for, so
a new request joins between two decode steps and long prompts do not stall the others. Each
sequence runs the generation core (llama/generation.py) that Engine.stream() runs for one: the
same picks, Chunks, finish reasons and Stats.

A finished sequence keeps its tokens in the KV cache, so a request that continues it (the next
chat turn) is given that slot and decodes only what is new, until another generation starts (the
other idle sequences' cells are freed then); a cancelled one frees its cells at once. llama.cpp
contexts are not thread-safe: one thread drives a Batch (and its Engine).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from localmix.errors import EngineError, UsageError
from localmix.llama.generation import Generating, Generation, checked_prompt, common_prefix
from localmix.llama.records import Chunk, Stats

if TYPE_CHECKING:
    from localmix.llama.engine import Engine

__all__ = ["Batch", "Generation"]

_NO_KV_SLOT = 1  # llama_decode: the KV cache has no room for the batch


@dataclass
class _Slot:
    """One sequence id: the tokens its KV cells hold, and the generation it runs (if any)."""

    seq: int
    kv: list[int] = field(default_factory=list)  # tokens at positions 0..len-1
    run: Generating | None = None
    last_used: float = 0.0

    @property
    def busy(self) -> bool:
        return self.run is not None


class Batch:
    """Continuous batching over one Engine: start() a Generation on a free sequence, step() to
    decode once and collect what every sequence produced, cancel() to stop one early."""

    def __init__(self, engine: Engine, seq_ctx: int | None = None) -> None:
        self.engine = engine
        # The engine's own decode loop is not used while a Batch drives its context.
        self._c, self._ctx, self._mem = engine.lib, engine.context, engine.memory
        self.n_seq = int(self._c.llama_n_seq_max(self._ctx))
        self.seq_ctx = min(seq_ctx or engine.n_ctx // self.n_seq, engine.n_ctx)
        self._size = max(engine.n_batch, self.n_seq)
        self._batch = self._c.llama_batch_init(self._size, 0, 1)
        if not self._batch.token:
            raise EngineError(f"llama.cpp could not allocate a batch of {self._size} tokens")
        self._stack_free()
        self._slots = [_Slot(seq) for seq in range(self.n_seq)]
        engine.clear()  # sequence 0 was the engine's: start from an empty cache

    def _stack_free(self) -> None:
        self.engine.on_close(lambda: self._c.llama_batch_free(self._batch))
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
        prompt = checked_prompt(
            gen, self.engine.n_vocab, self.seq_ctx,
            hint="shorten the prompt or serve with a larger context size",
        )  # fmt: skip
        if gen.images:  # the scheduler decodes tokens only (Engine.stream takes images)
            raise UsageError("images are not served yet")
        if self.free == 0:
            raise EngineError("every sequence is busy")
        slot, keep = self._choose(prompt)
        self._truncate(slot, keep)
        self._clear_idle(but=slot)
        slot.run = Generating(self.engine, gen, prompt, cached=len(slot.kv), n_ctx=self.seq_ctx)
        return slot.seq

    def _choose(self, prompt: list[int]) -> tuple[_Slot, int]:
        """The idle slot to use and how many of its cached tokens to keep: the longest common
        prefix wins, then the least recently used."""
        best, best_n = None, -1
        for slot in self._slots:
            if slot.busy:
                continue
            n = common_prefix(slot.kv, prompt)
            if n > best_n or (n == best_n and best is not None and slot.last_used < best.last_used):
                best, best_n = slot, n
        assert best is not None  # start() made sure one is free
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
        busy = [s for s in self._slots if s.run is not None and s.run.pending]
        # generating sequences first (one token each), so a long prompt never delays them
        busy.sort(key=lambda s: (s.run.prompt_left > 0, s.run.t_start))  # type: ignore[union-attr]
        n, rows = 0, []
        for slot in busy:
            run = slot.run
            assert run is not None
            # A lone sequence's last prompt token goes in a step of its own (after the rest), as
            # it does when the rest is cached: a seeded reply then repeats whether its prompt was
            # cached or not. Beside other sequences the batch's shape varies anyway, so there it
            # would only cost a step of time to first token.
            hold = run.prompt_left > 1 and len(busy) == 1
            pending = run.pending
            take = min(len(pending) - 1 if hold else len(pending), self._size - n)
            if take <= 0:
                break
            base = len(slot.kv)
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
            assert slot.run is not None
            slot.kv.extend(slot.run.pending[:take])
            slot.run.decoded(take)

    def _sync(self) -> None:
        """Make each slot's token list agree with the cells llama.cpp kept after a failure."""
        for slot in self._slots:
            held = self.cells(slot.seq)
            if held < len(slot.kv):
                del slot.kv[held:]

    def _sampled(self, slot: _Slot, index: int, out: list[tuple[int, Chunk | Stats]]) -> None:
        """Pick the next token of `slot` from batch row `index`; hand out its text, and its
        Stats once it is done."""
        run = slot.run
        assert run is not None
        out.extend((slot.seq, chunk) for chunk in run.sample(index))
        if run.done:
            out.append((slot.seq, self._finish(slot, None)))

    def _finish(self, slot: _Slot, reason: str | None) -> Stats:
        """End the slot's generation (reason: why, when the core did not end it itself): free
        its sampler, count, and make the slot idle."""
        run = slot.run
        assert run is not None
        run.close()
        stats = run.stats(reason)
        slot.run = None
        slot.last_used = time.perf_counter()
        return stats
