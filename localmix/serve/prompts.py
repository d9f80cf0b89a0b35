"""Requests → prompt token ids, with the code the REPL uses: Mistral formats through
chat/template.py (the GGUF's jinja template only for other families), plain text through the
engine's tokenizer; and the reply text as chat/session.py hands it out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from localmix.chat import template
from localmix.chat.template import Message
from localmix.errors import ContextTooLong, UsageError

if TYPE_CHECKING:
    from localmix.serve.models import Model

# OpenAI's newer name for the system role; the prompt is the same.
ROLE_ALIASES = {"developer": "system"}


def message(role: str, content: str) -> Message:
    """A chat message from an API's role and text; UsageError for roles chat cannot encode."""
    role = ROLE_ALIASES.get(role, role)
    if role not in template.ROLES:
        raise UsageError(
            f"messages with role {role!r} are not supported",
            hint="use system, user and assistant messages",
        )
    return Message(role, content)


def chat_tokens(model: Model, messages: Sequence[Message]) -> list[int]:
    """The exact prompt for a conversation, ready for the assistant's reply."""
    if not messages:
        raise UsageError("messages is empty", hint="send at least one user message")
    tokens = template.encode(model.format, messages, model.engine.tokenize)
    return fits(model, tokens)


def text_tokens(model: Model, text: str | Sequence[int]) -> list[int]:
    """A raw prompt (text with BOS, control-token text parsed, or token ids as given)."""
    if isinstance(text, str):
        tokens = model.engine.tokenize(text, add_bos=True, special=True)
    else:
        tokens = list(text)
        if tokens and (min(tokens) < 0 or max(tokens) >= model.engine.n_vocab):
            raise UsageError(f"token ids must be in [0, {model.engine.n_vocab})")
    if not tokens:
        raise UsageError("the prompt is empty", hint="send some text")
    return fits(model, tokens)


def fits(model: Model, tokens: list[int]) -> list[int]:
    """tokens, if they leave room in one sequence's context for at least one reply token."""
    room = model.scheduler.batch.seq_ctx
    if len(tokens) >= room:
        raise ContextTooLong(
            f"the prompt is {len(tokens)} tokens; the context holds {room}",
            hint="shorten the conversation, or serve with a larger --ctx",
        )
    return tokens


class ReplyText:
    """Generated text as a chat reply: without the first piece's SentencePiece space, as
    chat/session.py shows it (a raw completion keeps it)."""

    def __init__(self, strip_space: bool) -> None:
        self._strip = strip_space

    def feed(self, text: str) -> str:
        if self._strip and text:
            self._strip = False
            return text[1:] if text.startswith(" ") else text
        return text
