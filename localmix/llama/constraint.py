"""Constrained decoding: a grammar that masks the logits, token by token, so that what a model
writes always parses (a JSON schema, Mistral tool calls; localmix/chat/grammars.py writes them).

The grammar engine is llguidance: a grammar is Lark text as llguidance reads it (`%json {...}`
for a JSON schema, `<[9]>` for the control token with id 9). Per sequence and step:

    constraint = compile(engine, grammar)   # once per request; copy() for more sequences
    row = engine.logits_at(index)           # float32 view of llama.cpp's logits row
    constraint.mask(row)                    # tokens the grammar forbids -> -inf, in place
    token = <any picker over row>
    constraint.accept(token)                # EngineError if the grammar forbids it
    constraint.done                         # the grammar is complete: only the end token is left

or, llama.cpp's way, cheaper where the model mostly writes what the grammar wants: pick on the
raw row, and only if `not constraint.allows(token)`, mask(row) and pick again (the same token
for a greedy pick; for a seeded draw, the same distribution when nothing truncates it).

A batch of sequences: each has its own Constraint (their tokenizer, built once per engine, is
shared); mask_rows() computes all their masks in one call, in parallel outside the GIL.

The end token a finished grammar allows is the model's end-of-generation token (EOS, and EOT
where the vocabulary has a distinct one): a picker then ends the sequence the usual way.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from localmix.errors import EngineError, UsageError

if TYPE_CHECKING:
    import numpy

    from localmix.llama.engine import Engine

__all__ = ["Constraint", "compile", "mask_rows", "tokenizer"]


class _Vocab:
    """An engine's llguidance tokenizer. It calls llama.cpp's tokenizer on the engine's vocab
    (compiling a grammar tokenizes its literals), so it dies with the engine: `closed`."""

    def __init__(self, llt: Any, n_vocab: int, end_ids: tuple[int, ...]) -> None:
        self.llt = llt
        self.n_vocab = n_vocab
        self.end_ids = end_ids
        self.closed = False


def _addends() -> numpy.ndarray:
    """(256, 8) float32: for each byte of a bitmask, its 8 tokens' addends (0 allowed, -inf not;
    llguidance's bit order: token 8k+i is bit i of byte k)."""
    import numpy as np

    bits = (np.arange(256)[:, None] >> np.arange(8)) & 1
    return np.where(bits == 1, np.float32(0), np.float32(-np.inf)).astype(np.float32)


_ADDENDS: list[Any] = []


_VOCABS: weakref.WeakKeyDictionary[Engine, _Vocab] = weakref.WeakKeyDictionary()
_VOCABS_LOCK = threading.Lock()


def _vocab(engine: Engine) -> _Vocab:
    with _VOCABS_LOCK:
        found = _VOCABS.get(engine)
        if found is None:
            found = _VOCABS[engine] = _build_vocab(engine)
            engine.on_close(_retire_on_close(engine))
        return found


def _retire_on_close(engine: Engine) -> Any:
    """A callback that retires the engine's cached tokenizer (held weakly: no cycle)."""
    ref = weakref.ref(engine)

    def close() -> None:
        target = ref()
        if target is None:
            return
        with _VOCABS_LOCK:
            found = _VOCABS.pop(target, None)
        if found is not None:
            found.closed = True

    return close


def _build_vocab(engine: Engine) -> _Vocab:
    from llguidance.llamacpp import lltokenizer_from_vocab

    c = engine.lib
    engine.token_piece(0)  # EngineError on a closed engine
    end_ids = [engine.eos_id]
    eot = int(c.llama_vocab_eot(engine.vocab))
    if eot >= 0 and eot != engine.eos_id:
        end_ids.append(eot)
    end_ids = [t for t in end_ids if 0 <= t < engine.n_vocab]
    if not end_ids:
        raise EngineError("the model's vocabulary has no end-of-generation token")
    with warnings.catch_warnings():
        # llguidance reads token attributes through llama_cpp.llama_token_get_attr, which
        # llama-cpp-python 0.3.36 marks deprecated (llama_vocab_get_attr is the same call)
        warnings.filterwarnings(
            "ignore", message=r"llama_token_get_attr is deprecated", category=DeprecationWarning
        )
        llt = lltokenizer_from_vocab(engine.vocab, n_vocab=engine.n_vocab, eos_token=end_ids)
    return _Vocab(llt, engine.n_vocab, tuple(end_ids))


def tokenizer(engine: Engine) -> Any:
    """The engine's llguidance LLTokenizer, built on first use (~0.1 s for 32k tokens, ~0.7 s
    for 131k) and kept until the engine closes."""
    return _vocab(engine).llt


def compile(engine: Engine, grammar: str) -> Constraint:
    """A Constraint for one sequence of engine's, from Lark grammar text (UsageError for a grammar
    llguidance refuses: a syntax error, a bad JSON schema, an unknown token)."""
    import llguidance

    if not isinstance(grammar, str) or not grammar.strip():
        raise UsageError("the grammar is empty")
    vocab = _vocab(engine)
    matcher = llguidance.LLMatcher(
        vocab.llt, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0
    )
    if matcher.is_error():
        raise UsageError(f"the grammar is not valid: {grammar_error(matcher.get_error())}")
    return Constraint(vocab, matcher)


def grammar_error(message: str) -> str:
    """llguidance's error message on one line: without its "at L(C): " position, the caret
    lines and the echo of the grammar ("   1 | start: ...") that follow it."""
    import re

    parts = []
    for line in message.strip().splitlines():
        if re.match(r"^\s*\d+ \|", line):
            break
        line = line.strip()
        if line and not re.fullmatch(r"[\^\s]+", line):
            parts.append(line)
    text = " ".join(parts) or "no reason given"
    return re.sub(r"^at \d+\(\d+\): ", "", text)


class Constraint:
    """One sequence's grammar state: mask() the logits, accept() the token picked, until done.

    accept() also works out the next step's bitmask, while llguidance's tables and this
    sequence's state are still in the cache (the decode that follows pushes them out). After
    the decode, allows(token) reads that bitmask (~1 us); mask(row) turns it into addends to the
    logits (0 allowed, -inf not, 4 bytes a token) and adds them, the one step that must touch
    the whole row. A driver that picks first and masks only when the pick is not allowed (what
    llama.cpp's own sampler does) pays for mask() on those steps only; for a greedy pick, or a
    Gumbel-max draw with its noise kept, the token is the same either way."""

    def __init__(self, vocab: _Vocab, matcher: Any) -> None:
        import llguidance.numpy as llgnp

        self._vocab = vocab
        self._matcher = matcher
        self._bits = llgnp.allocate_token_bitmask(1, vocab.n_vocab)
        self._addend: numpy.ndarray | None = None
        self._ready = False  # _bits is the current state's mask
        self._expanded = False  # and _addend too
        self.n_accepted = 0

    @property
    def n_vocab(self) -> int:
        return self._vocab.n_vocab

    @property
    def end_ids(self) -> tuple[int, ...]:
        """The tokens a complete grammar allows: the model's end-of-generation tokens."""
        return self._vocab.end_ids

    @property
    def done(self) -> bool:
        """The grammar cannot go on: only an end token is left to pick (or one was accepted)."""
        return bool(self._matcher.is_stopped())

    @property
    def accepting(self) -> bool:
        """What was accepted so far is a complete match (the end token is allowed now)."""
        return bool(self._matcher.is_accepting())

    def mask(self, logits: numpy.ndarray) -> None:
        """Set the logits of the tokens the grammar forbids at this step to -inf, in place
        (logits: the n_vocab float32 row the picker reads)."""
        import numpy as np

        self._check()
        n = self._vocab.n_vocab
        if logits.shape != (n,):
            raise UsageError(f"a logits row has {n} values, not shape {logits.shape}")
        if not self._ready:
            self._prepare()
        self._raise_failed()
        if not self._expanded:
            self._expand()
        assert self._addend is not None
        np.add(logits, self._addend.reshape(-1)[:n], out=logits)

    def allows(self, token: int) -> bool:
        """Whether the grammar allows token at this step (no logits touched)."""
        self._check()
        if not self._ready:
            self._prepare()
        self._raise_failed()
        token = int(token)
        if not 0 <= token < self._vocab.n_vocab:
            return False
        return bool((int(self._bits[0, token >> 5]) >> (token & 31)) & 1)

    def _prepare(self) -> None:
        """Work out the current state's bitmask."""
        import llguidance.numpy as llgnp

        llgnp.fill_next_token_bitmask(self._matcher, self._bits)
        self._ready, self._expanded = True, False

    def _expand(self) -> None:
        """The bitmask as addends to the logits."""
        import numpy as np

        if self._addend is None:
            self._addend = np.empty((self._bits.shape[1] * 4, 8), dtype=np.float32)
        if not _ADDENDS:
            _ADDENDS.append(_addends())
        # each byte of the bitmask looks up its 8 tokens' addends: branch-free, unlike a masked
        # assignment (twice as slow right after a decode)
        np.take(_ADDENDS[0], self._bits.view(np.uint8).reshape(-1), axis=0, out=self._addend)
        self._expanded = True

    def _raise_failed(self) -> None:
        if self._matcher.is_error():
            raise EngineError(f"the grammar failed: {grammar_error(self._matcher.get_error())}")

    def allowed(self) -> numpy.ndarray:
        """The ids of the tokens the grammar allows at this step."""
        import numpy as np

        self._check()
        if not self._ready:
            self._prepare()
        self._raise_failed()
        bits = np.unpackbits(self._bits.view(np.uint8), count=self.n_vocab, bitorder="little")
        return np.flatnonzero(bits)

    def accept(self, token: int) -> None:
        """Advance past the token picked; EngineError if the grammar does not allow it (the
        constraint is then spent: every later call raises too)."""
        self._check()
        self._ready = self._expanded = False
        if not self._matcher.consume_token(int(token)):
            reason = grammar_error(self._matcher.get_error())
            raise EngineError(f"token {token} is not allowed by the grammar here: {reason}")
        self.n_accepted += 1
        if not self._matcher.is_stopped():
            self._prepare()  # the next step's bitmask, while the caches are warm (see the class)

    def forced(self) -> list[int]:
        """Tokens the grammar forces next, whatever the model says (may be empty): a driver may
        decode them without sampling, accept()-ing each."""
        self._check()
        return list(self._matcher.compute_ff_tokens())

    def rollback(self, n: int) -> None:
        """Forget the last n accepted tokens (speculative decoding's rejected drafts)."""
        self._check()
        if not 0 <= n <= self.n_accepted or not self._matcher.rollback(n):
            raise UsageError(f"cannot roll back {n} of {self.n_accepted} tokens")
        self.n_accepted -= n
        self._ready = self._expanded = False

    def copy(self) -> Constraint:
        """An independent Constraint in the same state (e.g. one compile for n sequences)."""
        self._check()
        twin = Constraint(self._vocab, self._matcher.deep_copy())
        twin.n_accepted = self.n_accepted
        return twin

    def _check(self) -> None:
        if self._vocab.closed:
            raise EngineError("the engine of this constraint is closed")


_EXECUTOR: list[Any] = []


def mask_rows(pairs: Sequence[tuple[Constraint, numpy.ndarray]]) -> None:
    """mask() for many sequences at once: (constraint, its logits row) each. The masks not yet
    worked out (a constraint's first step: accept() works out the others) are computed together
    by llguidance's thread pool, outside the GIL."""
    import llguidance
    import llguidance.numpy as llgnp
    import numpy as np

    todo = [c for c, _ in pairs if not c._ready]
    if len(todo) > 1:
        for c in todo:
            c._check()
        words = todo[0]._bits.shape[1]
        if any(c._bits.shape[1] != words for c in todo):
            raise UsageError("the constraints of one batch belong to one vocabulary")
        with _VOCABS_LOCK:
            if not _EXECUTOR:
                _EXECUTOR.append(llguidance.LLExecutor())
            executor = _EXECUTOR[0]
        bits = np.empty((len(todo), words), dtype=np.int32)
        llgnp.fill_next_token_bitmask_par(
            executor, [(c._matcher, i) for i, c in enumerate(todo)], bits
        )
        for i, c in enumerate(todo):
            c._bits[0] = bits[i]
            c._ready, c._expanded = True, False
    for constraint, row in pairs:
        constraint.mask(row)
