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
    eot = int(c.llama_vocab_eot(engine._vocab))
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
        llt = lltokenizer_from_vocab(engine._vocab, n_vocab=engine.n_vocab, eos_token=end_ids)
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
    """One sequence's grammar state: mask() the logits, accept() the token picked, until done."""

    def __init__(self, vocab: _Vocab, matcher: Any) -> None:
        import llguidance.numpy as llgnp

        self._vocab = vocab
        self._matcher = matcher
        self._bits = llgnp.allocate_token_bitmask(1, vocab.n_vocab)
        self._inverse = self._bits.copy()
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
        import llguidance.numpy as llgnp

        self._check()
        llgnp.fill_next_token_bitmask(self._matcher, self._bits)
        self._apply(logits)

    def _apply(self, logits: numpy.ndarray) -> None:
        import numpy as np

        if self._matcher.is_error():
            raise EngineError(f"the grammar failed: {grammar_error(self._matcher.get_error())}")
        n = self._vocab.n_vocab
        if logits.shape != (n,):
            raise UsageError(f"a logits row has {n} values, not shape {logits.shape}")
        # the forbidden tokens' bits, one byte each: unpacking the inverse of the bitmask and
        # assigning through it is the fastest numpy way (~20 us on 32k tokens, ~60 us on 131k)
        np.invert(self._bits, out=self._inverse)
        banned = np.unpackbits(self._inverse.view(np.uint8), count=n, bitorder="little")
        np.copyto(logits, -np.inf, where=banned.view(np.bool_))

    def allowed(self) -> numpy.ndarray:
        """The ids of the tokens the grammar allows at this step (computes the mask)."""
        import llguidance.numpy as llgnp
        import numpy as np

        self._check()
        llgnp.fill_next_token_bitmask(self._matcher, self._bits)
        if self._matcher.is_error():
            raise EngineError(f"the grammar failed: {grammar_error(self._matcher.get_error())}")
        bits = np.unpackbits(self._bits.view(np.uint8), count=self.n_vocab, bitorder="little")
        return np.flatnonzero(bits)

    def accept(self, token: int) -> None:
        """Advance past the token picked; EngineError if the grammar does not allow it (the
        constraint is then spent: every later call raises too)."""
        self._check()
        if not self._matcher.consume_token(int(token)):
            reason = grammar_error(self._matcher.get_error())
            raise EngineError(f"token {token} is not allowed by the grammar here: {reason}")
        self.n_accepted += 1

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
    """mask() for many sequences at once: (constraint, its logits row) each. The masks are
    computed together by llguidance's thread pool, then applied one row at a time."""
    import llguidance
    import llguidance.numpy as llgnp
    import numpy as np

    if not pairs:
        return
    if len(pairs) == 1:
        constraint, row = pairs[0]
        constraint.mask(row)
        return
    for constraint, _ in pairs:
        constraint._check()
    words = pairs[0][0]._bits.shape[1]
    if any(c._bits.shape[1] != words for c, _ in pairs):
        raise UsageError("the constraints of one batch belong to one vocabulary")
    with _VOCABS_LOCK:
        if not _EXECUTOR:
            _EXECUTOR.append(llguidance.LLExecutor())
        executor = _EXECUTOR[0]
    bits = np.empty((len(pairs), words), dtype=np.int32)
    llgnp.fill_next_token_bitmask_par(
        executor, [(c._matcher, i) for i, (c, _) in enumerate(pairs)], bits
    )
    for i, (constraint, row) in enumerate(pairs):
        constraint._bits[0] = bits[i]
        constraint._apply(row)
