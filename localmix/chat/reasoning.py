"""Reasoning models: the switch that turns thinking on or off, and a reply's [THINK]…[/THINK]
part told apart from its answer as the tokens stream.

Mistral's reasoning models take the switch two ways:
- "prompt" (v13: Magistral Small 2507/2509, the Ministral 3 Reasoning models): the reasoning system
  prompt their repos ship as SYSTEM_PROMPT.txt, whose template part is itself a thinking chunk;
- "effort" (v15: Mistral Small 4): the model setting reasoning_effort, "high" or "none" (its
  tokenizer's default), written in [MODEL_SETTINGS] before the first [INST].
What mistral-common does with a reply's thinking on later turns: an assistant message's ThinkChunk
is encoded [THINK]…[/THINK] again (v13+; [THINK] alone while unclosed), so a session keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass

from localmix.chat.template import ChatFormat, MistralFormat, Think, Tokenize, has_control_token
from localmix.llama.records import Chunk

# SYSTEM_PROMPT.txt of mistralai/Ministral-3-14B-Reasoning-2512 (565 bytes, [THINK]…[/THINK] as
# control tokens), the prompt docs.mistral.ai gives for Magistral Small 2509.
REASONING_PROMPT: tuple[str | Think, ...] = (
    "# HOW YOU SHOULD THINK AND ANSWER\n\n"
    "First draft your thinking process (inner monologue) until you arrive at a response. "
    "Format your response using Markdown, and use LaTeX for any mathematical equations. "
    "Write both your thoughts and the response in the same language as the input.\n\n"
    "Your thinking process must follow the template below:",
    Think(
        "Your thoughts or/and draft, like working through an exercise on scratch paper. "
        "Be as casual and as long as you want until you are confident to generate the response "
        "to the user."
    ),
    "Here, provide a self-contained response.",
)

MODES = ("prompt", "effort")


@dataclass(frozen=True)
class Thought:
    """Text of a reply's thinking as it streams (token -1: text flushed at the end)."""

    text: str
    token: int


def mode(fmt: ChatFormat, tokenize: Tokenize) -> str | None:
    """How thinking is switched for a model: "effort" (v15), "prompt" (v13 with [THINK] in the
    vocabulary), or None (no thinking switch)."""
    if not isinstance(fmt, MistralFormat) or not fmt.think:
        return None
    if fmt.settings:
        return "effort"
    return "prompt" if has_control_token(tokenize, "[THINK]") else None


def markers(fmt: ChatFormat, tokenize: Tokenize) -> tuple[int, int] | None:
    """The ids of [THINK] and [/THINK] when the format encodes thinking and the vocabulary has
    both, else None (the reply is all answer)."""
    if not fmt.think or not all(has_control_token(tokenize, p) for p in ("[THINK]", "[/THINK]")):
        return None
    from localmix.chat.template import control_token

    return control_token(tokenize, "[THINK]"), control_token(tokenize, "[/THINK]")


class Splitter:
    """Turns the engine's Chunks into Thoughts (between [THINK] and [/THINK]) and answer Chunks,
    and collects both: `parts()` is the reply as message content."""

    def __init__(self, ids: tuple[int, int] | None) -> None:
        self._begin, self._end = ids if ids is not None else (None, None)
        self.thinking = False
        self.thought_tokens = 0
        self._parts: list[str | Think] = []
        self._text: list[str] = []

    def feed(self, chunk: Chunk) -> Chunk | Thought | None:
        """What to show for one engine Chunk (None for the markers themselves)."""
        if chunk.token == self._begin and self._begin is not None:
            self._flush()
            self.thinking = True
            return None
        if chunk.token == self._end and self.thinking:
            self._flush()
            self.thinking = False
            return None
        self._text.append(chunk.text)
        if self.thinking:
            self.thought_tokens += chunk.token >= 0
            return Thought(chunk.text, chunk.token)
        return chunk

    def _flush(self) -> None:
        text = "".join(self._text)
        self._text.clear()
        if self.thinking:
            self._parts.append(Think(text))
        elif text:
            self._parts.append(text)

    def parts(self) -> tuple[str | Think, ...]:
        """The reply so far: text and Think parts; a thought still open is Think(closed=False)."""
        parts = list(self._parts)
        text = "".join(self._text)
        if self.thinking:
            parts.append(Think(text, closed=False))
        elif text:
            parts.append(text)
        return tuple(parts)


def thinks_by_default(model: str | None, think_mode: str | None) -> bool:
    """Whether a chat starts with thinking on: for a catalog reasoning model switched by its
    prompt (Magistral, Ministral 3 Reasoning: their repos ship the reasoning prompt as the
    default system prompt); Mistral Small 4's default reasoning_effort is "none"."""
    if think_mode != "prompt" or not model:
        return False
    from localmix.errors import LocalmixError
    from localmix.models import catalog

    try:
        return catalog.load().get(model).reasoning
    except LocalmixError:  # not a catalog name (a path, hf.co/...), or a broken user catalog
        return False
