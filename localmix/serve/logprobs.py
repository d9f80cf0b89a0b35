"""Log-probabilities in the shapes clients read: OpenAI's chat (and Ollama's, the same entries:
token, logprob, bytes, top_logprobs) and OpenAI's legacy completions (parallel lists); and the
logit_bias both APIs' clients send. The numbers come from the generation core (TokenLogprob);
this module only names the tokens (through the model's vocabulary) and lays them out."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from localmix.serve import app

if TYPE_CHECKING:
    from localmix.llama.records import Chunk, TokenLogprob

Piece = Callable[[int], bytes]  # token id -> its bytes (control tokens rendered)
MAX_BIAS = 100.0  # OpenAI's range for a logit_bias value: [-100, 100]


def entries(chunks: Sequence[Chunk], piece: Piece) -> list[dict[str, Any]]:
    """OpenAI chat's logprobs.content (and Ollama's logprobs): one entry per token."""
    return [_entry(c.logprob, piece) for c in chunks if c.logprob is not None]


def _entry(lp: TokenLogprob, piece: Piece) -> dict[str, Any]:
    entry = _named(lp.token, lp.logprob, piece)
    entry["top_logprobs"] = [_named(t, p, piece) for t, p in lp.top]
    return entry


def _named(token: int, logprob: float, piece: Piece) -> dict[str, Any]:
    data = piece(token)
    return {
        "token": data.decode("utf-8", errors="replace"),
        "logprob": logprob,
        "bytes": list(data),
    }


def legacy(chunks: Sequence[Chunk], piece: Piece, offset: int = 0) -> dict[str, Any]:
    """OpenAI completions' logprobs: tokens, token_logprobs, top_logprobs (token -> logprob) and
    text_offset (each token's start in the text, counting from offset)."""
    tokens, logprobs, tops, offsets = [], [], [], []
    for chunk in chunks:
        lp = chunk.logprob
        if lp is None:
            continue
        text = piece(lp.token).decode("utf-8", errors="replace")
        tokens.append(text)
        logprobs.append(lp.logprob)
        tops.append({piece(t).decode("utf-8", errors="replace"): p for t, p in lp.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops,
            "text_offset": offsets}  # fmt: skip


def bias(
    field: str, values: dict[str, float] | None, n_vocab: int
) -> tuple[tuple[int, float], ...]:
    """A logit_bias object ({"token id": bias}) as the core's pairs; a 400 naming the field for
    a key that is no token id of this model or a value out of [-100, 100]."""
    out = []
    for key, value in (values or {}).items():
        token = int(key) if str(key).lstrip("-").isdigit() else None
        if token is None or not 0 <= token < n_vocab:
            raise app.BadField(
                field, f"{field}: {key!r} is not a token id of this model (0 to {n_vocab - 1})"
            )
        if not isinstance(value, (int, float)) or not -MAX_BIAS <= value <= MAX_BIAS:
            raise app.BadField(field, f"{field}[{key}] must be a number in [-100, 100]")
        out.append((token, float(value)))
    return tuple(out)
