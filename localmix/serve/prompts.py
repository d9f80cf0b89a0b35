"""Requests → prompt token ids, with the code the REPL uses: Mistral formats through
chat/template.py (the GGUF's jinja template only for other families), a reasoning model's thinking
switch as chat/session.py sets it (chat/reasoning.py), plain text through the engine's tokenizer;
and the reply as the REPL shows it: thinking apart from the answer, without the first piece's
SentencePiece space."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from localmix.chat import template
from localmix.chat.template import Content, Message
from localmix.errors import ContextTooLong, UsageError
from localmix.llama.records import Chunk
from localmix.serve import app

if TYPE_CHECKING:
    from localmix.chat.grammars import JsonOutput, ToolChoice
    from localmix.chat.toolcalls import Call, CallArgs, CallStart, Event
    from localmix.chat.tools import Tool, ToolCall
    from localmix.serve.models import Model

# OpenAI's newer name for the system role; the prompt is the same.
ROLE_ALIASES = {"developer": "system"}


def message(
    role: str,
    content: Content,
    *,
    tool_calls: Sequence[ToolCall] = (),
    tool_call_id: str | None = None,
    name: str | None = None,
) -> Message:
    """A chat message from an API's fields (content: text, or text and Picture parts);
    UsageError for roles chat cannot encode."""
    role = ROLE_ALIASES.get(role, role)
    if role not in template.ROLES:
        raise UsageError(
            f"messages with role {role!r} are not supported",
            hint="use system, user, assistant and tool messages",
        )
    return Message(role, content, tuple(tool_calls), tool_call_id, name)


def chat_tokens(
    model: Model,
    messages: Sequence[Message],
    think: bool | None = None,
    tools: Sequence[Tool] = (),
) -> list[int]:
    """The exact prompt for a conversation and the tools offered, ready for the assistant's
    reply. think switches a reasoning model's thinking on or off (None: the model's default, as
    `localmix chat`)."""
    if not messages:
        raise UsageError("messages is empty", hint="send at least one user message")
    profile = model.profile
    try:
        profile.check_tools(tools)
    except UsageError as error:
        raise app.BadField("tools", error.message, error.hint) from None
    prompt = profile.prompt(
        messages, model.engine.tokenize, thinking=thinking_of(model, think), tools=tools
    )
    return fits(model, prompt)


def thinking_of(model: Model, think: bool | None) -> bool:
    """Whether a reply thinks: the request's switch, else the model's default."""
    return model.profile.thinks_by_default if think is None else think


def reply_grammar(
    model: Model,
    think: bool | None,
    *,
    tools: Sequence[Tool] = (),
    tool_choice: ToolChoice = "auto",
    parallel_tool_calls: bool = True,
    output: JsonOutput | None = None,
) -> str | None:
    """The grammar a reply must follow (chat.profile.reply_grammar), for either API."""
    from localmix.chat.profile import reply_grammar as grammar_of

    profile = model.profile
    return grammar_of(
        profile, model.engine.tokenize, tools=tools, tool_choice=tool_choice,
        parallel_tool_calls=parallel_tool_calls, output=output,
        thinking=bool(profile.think_mode) and thinking_of(model, think),
    )  # fmt: skip


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
    room = model.worker.seq_ctx
    if len(tokens) >= room:
        raise ContextTooLong(
            f"the prompt is {len(tokens)} tokens; the context holds {room}",
            hint="shorten the conversation, or serve with a larger --ctx",
        )
    return tokens


@dataclass(frozen=True)
class Shown:
    """What one Chunk of a reply adds: answer text, thinking text, tool-call events."""

    text: str = ""
    thinking: str = ""
    calls: tuple[CallStart | CallArgs, ...] = ()


class Reply:
    """A chat reply as it streams, split the way the REPL shows it: feed() each Chunk and get what
    it adds (answer, thinking, and with tools offered, tool calls read from the token ids), then
    finish() once the reply ends. A raw completion (chat=False) is all answer, as generated."""

    def __init__(self, model: Model, chat: bool, tools: bool = False) -> None:
        from localmix.chat.reasoning import Splitter
        from localmix.chat.toolcalls import CallParser

        profile = model.profile
        self._strip = profile.strip_space and chat
        self._split = Splitter(profile.think_ids if chat else None)
        syntax = profile.tool_syntax if chat and tools else None
        self.parser = CallParser(syntax, dict(profile.tool_ids)) if syntax else None

    @property
    def thought_tokens(self) -> int:
        return self._split.thought_tokens

    @property
    def calls(self) -> list[Call]:
        """The tool calls read so far (whole ones, once finish() has run)."""
        return self.parser.calls if self.parser else []

    def feed(self, chunk: Chunk) -> Shown:
        if self._strip and chunk.text:
            self._strip = False
            if chunk.text.startswith(" "):
                chunk = Chunk(chunk.text[1:], chunk.token, chunk.logprob)
        from localmix.chat.reasoning import Thought

        shown = self._split.feed(chunk)
        if shown is None:
            return Shown()
        if isinstance(shown, Thought):
            return Shown(thinking=shown.text)
        if self.parser is None:
            return Shown(text=shown.text)
        return _shown(self.parser.feed(shown))

    def finish(self) -> Shown:
        """What the end of the reply settles (tool calls a "list" syntax held until now)."""
        return _shown(self.parser.finish()) if self.parser else Shown()


def _shown(events: Sequence[Event]) -> Shown:
    text = "".join(e for e in events if isinstance(e, str))
    return Shown(text=text, calls=tuple(e for e in events if not isinstance(e, str)))
