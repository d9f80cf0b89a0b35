"""How a model chats, decided once for every caller (the REPL, one-shot chat, the demo, serve,
bench's chat prompt): its chat format, how its thinking is switched and whether a chat starts
with it on, its [THINK] markers, and the leading-space rule for a reply's first piece.

`prompt()` is the one place that turns a conversation and a thinking choice into token ids:
the reasoning system prompt first for a format switched by prompt (v13), reasoning_effort for
one switched by effort (v15), the user's system prompt, then the messages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from localmix.chat import reasoning, template
from localmix.chat.template import ChatFormat, Message, Tokenize
from localmix.errors import UsageError

if TYPE_CHECKING:
    from localmix.chat.grammars import JsonOutput, ToolChoice
    from localmix.chat.images import ImageConfig
    from localmix.chat.tools import Tool
    from localmix.llama.engine import Engine


@dataclass(frozen=True)
class ChatProfile:
    """A model's chat set-up; see the module docstring."""

    format: ChatFormat
    think_mode: str | None  # "prompt", "effort" or None: no thinking switch
    think_ids: tuple[int, int] | None  # [THINK] and [/THINK], when the reply can hold thinking
    thinks_by_default: bool  # a chat starts with thinking on (catalog reasoning models)
    strip_space: bool  # drop the first reply piece's leading space (SentencePiece vocabularies)
    tool_syntax: str | None = None  # how the model calls tools (chat.toolcalls.SYNTAX), if it can
    tool_ids: Mapping[str, int] = field(default_factory=dict)  # [TOOL_CALLS], [ARGS], [CALL_ID]
    images: ImageConfig | None = None  # a vision model's image settings (None: text only)

    @property
    def sees_images(self) -> bool:
        """Whether the model takes images (a vision model with its vision tower loaded)."""
        return self.images is not None

    @property
    def calls_tools(self) -> bool:
        """Whether the model's format and vocabulary have tool calls."""
        return self.tool_syntax is not None

    def check_tools(self, tools: Sequence[Tool]) -> None:
        """UsageError when tools are offered to a model that cannot call them."""
        if tools and not self.calls_tools:
            raise UsageError(
                f"this model cannot call tools (chat format {self.format.name})",
                hint="tool calls need a Mistral format with tool tokens: v2 and later",
            )

    def check_thinking(self, on: bool) -> None:
        """UsageError when thinking is asked of a model that has no switch for it."""
        if on and self.think_mode is None:
            raise UsageError(
                f"this model has no thinking switch (chat format {self.format.name})",
                hint="reasoning models: Magistral, Ministral 3 Reasoning, Mistral Small 4",
            )

    def conversation(
        self, messages: Sequence[Message], *, system: str | None, thinking: bool
    ) -> list[Message]:
        """The messages as the format sees them: reasoning prompt, system prompt, messages."""
        head = [Message("system", system)] if system else []
        if thinking and self.think_mode == "prompt":
            head.insert(0, Message("system", reasoning.REASONING_PROMPT))
        return [*head, *messages]

    def prompt(
        self,
        messages: Sequence[Message],
        tokenize: Tokenize,
        *,
        thinking: bool,
        system: str | None = None,
        tools: Sequence[Tool] = (),
    ) -> list[int]:
        """Prompt token ids for the conversation (with the tools the model may call), ready for
        the assistant's reply."""
        self.check_thinking(thinking)
        effort = ("high" if thinking else "none") if self.think_mode == "effort" else None
        return template.encode(
            self.format,
            self.conversation(messages, system=system, thinking=thinking),
            tokenize,
            tools=tools,
            reasoning_effort=effort,
            images=self.images,
        )


def reply_grammar(
    profile: ChatProfile,
    tokenize: Tokenize,
    *,
    tools: Sequence[Tool] = (),
    tool_choice: ToolChoice = "auto",
    parallel_tool_calls: bool = True,
    output: JsonOutput | None = None,
    thinking: bool = False,
) -> str | None:
    """The grammar a reply of this model must follow (chat.grammars), or None when nothing
    constrains it: tool calls in the model's own syntax and control tokens, as tool_choice and
    parallel_tool_calls allow; JSON output (a schema or any object); the model's thinking first
    when it thinks (thinking on, a format with [THINK])."""
    from localmix.chat import grammars

    def special(piece: str) -> int:
        return template.control_token(tokenize, piece)

    profile.check_tools(tools)
    fmt = profile.format.name if isinstance(profile.format, template.MistralFormat) else None
    return grammars.chat_grammar(
        fmt, special, tools=tools,
        tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls, output=output,
        think=thinking and profile.think_ids is not None,
    )  # fmt: skip


def profile_for(
    engine: Engine, chat_format: str | ChatFormat | None = None, model: str | None = None
) -> ChatProfile:
    """The profile of the model `engine` holds: chat_format names or is its format (None: the
    manifest left it to the GGUF, detected from the tokenizer or the GGUF's own template);
    model is the name it was opened by (catalog reasoning models think by default)."""
    fmt = resolve_format(engine, chat_format)
    think_mode = reasoning.mode(fmt, engine.tokenize)
    syntax, ids = tool_tokens(fmt, engine.tokenize)
    return ChatProfile(
        format=fmt,
        think_mode=think_mode,
        think_ids=reasoning.markers(fmt, engine.tokenize),
        thinks_by_default=reasoning.thinks_by_default(model, think_mode),
        strip_space=adds_space_prefix(engine.metadata),
        tool_syntax=syntax,
        tool_ids=ids,
        images=engine.vision.config if engine.vision is not None else None,
    )


def tool_tokens(fmt: ChatFormat, tokenize: Tokenize) -> tuple[str | None, dict[str, int]]:
    """The tool-call syntax of a Mistral format whose vocabulary has the control tokens it
    needs ([TOOL_CALLS], and [ARGS] from v11), and their ids; (None, {}) for any other."""
    from localmix.chat.toolcalls import SYNTAX

    syntax = SYNTAX.get(fmt.name) if isinstance(fmt, template.MistralFormat) else None
    if syntax is None:
        return None, {}
    ids = {
        piece: template.control_token(tokenize, piece)
        for piece in ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]")
        if template.has_control_token(tokenize, piece)
    }
    needed = ("[TOOL_CALLS]", "[ARGS]") if syntax == "args" else ("[TOOL_CALLS]",)
    return (syntax, ids) if all(p in ids for p in needed) else (None, {})


def resolve_format(engine: Engine, chat_format: str | ChatFormat | None) -> ChatFormat:
    """The chat format to use: a name, a format, or None to detect it from the model."""
    if isinstance(chat_format, str):
        return template.get(chat_format)
    if chat_format is not None:
        return chat_format
    return template.for_model(
        engine.metadata,
        engine.tokenize,
        bos_token=_piece_text(engine, engine.bos_id),
        eos_token=_piece_text(engine, engine.eos_id),
    )


def _piece_text(engine: Engine, token: int) -> str:
    if token < 0:
        return ""
    return engine.token_piece(token).decode("utf-8", errors="replace")


def adds_space_prefix(metadata: dict[str, str]) -> bool:
    """Whether the vocabulary prepends "▁" to text, so a reply's first piece starts with a space
    that mistral-common's decoded text does not have (chat clients drop it)."""
    if metadata.get("tokenizer.ggml.model") != "llama":
        return False
    return str(metadata.get("tokenizer.ggml.add_space_prefix", "true")).lower() != "false"
