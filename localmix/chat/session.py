"""A conversation with one loaded model: its messages, the prompt as token ids, the context budget.

Every turn re-encodes the whole conversation exactly as mistral-common would (chat/template.py) and
hands it to Engine.stream(), which reuses the longest common prefix with what its KV cache already
holds, so a turn processes only the tokens after that prefix. For the v1 and v7 formats that is just
the new turn; v2/v3 put the system prompt into the *last* user message (mistral-common's rule, and
what those models were trained on), so with a system prompt each turn re-processes the history after
the first [INST]. We follow the reference rather than trade exactness for speed.

Reasoning models (chat/reasoning.py): a reply's [THINK]…[/THINK] part streams as Thoughts, apart
from the answer's Chunks, and stays in the history as a Think part, which mistral-common encodes
again on later turns. `thinking` switches it on or off where the model has a switch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localmix import disk
from localmix.chat import images, reasoning, template
from localmix.chat.images import Image
from localmix.chat.profile import profile_for
from localmix.chat.reasoning import Thought
from localmix.chat.template import ChatFormat, Message, MistralFormat, Picture, Think
from localmix.errors import ContextTooLong, LocalmixError, OutputError, UsageError
from localmix.llama.generation import Generation, ImageSpan
from localmix.llama.records import Chunk, Sampling, Stats

IMAGE_TOKENS = ("[IMG]", "[IMG_BREAK]", "[IMG_END]")

if TYPE_CHECKING:
    from localmix.chat.grammars import JsonOutput
    from localmix.llama.engine import Engine
    from localmix.load import LoadSettings
    from localmix.models.store import Located

SAVE_FORMAT = "localmix-chat"
SAVE_VERSION = 2  # 2: a reply's content may be a list with thinking parts
READS_VERSIONS = (1, 2)
OVERFLOW_MODES = ("shift", "drop")
# What /set may change: sampling fields plus the reply budget.
SETTINGS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed", "max_tokens")


@dataclass(frozen=True)
class Notice:
    """Something the user should see between replies, e.g. that old turns left the context."""

    text: str


class Session:
    """Messages, system prompt and settings of one chat, kept in step with the engine's KV cache."""

    def __init__(
        self,
        engine: Engine,
        chat_format: str | ChatFormat | None = None,
        *,
        system: str | None = None,
        sampling: Sampling | None = None,
        max_tokens: int = 512,
        overflow: str = "shift",
        model: str | None = None,
        thinking: bool | None = None,
    ) -> None:
        if overflow not in OVERFLOW_MODES:
            raise UsageError(f"unknown overflow mode {overflow!r}", hint="use shift or drop")
        if max_tokens < 1:
            raise UsageError(f"max_tokens must be at least 1, not {max_tokens}")
        self.engine = engine
        self.profile = profile_for(engine, chat_format, model)
        self.system = system or None
        self.sampling = sampling or Sampling()
        self.max_tokens = max_tokens
        self.overflow = overflow
        self.model = model
        self.messages: list[Message] = []
        self.last_stats: Stats | None = None
        self.last_thought_tokens = 0  # tokens the last reply spent thinking
        self.thinking = False
        self.set_thinking(self.profile.thinks_by_default if thinking is None else thinking)
        self.output: JsonOutput | None = None  # every reply is JSON of this schema (set_schema)
        self.images: dict[str, Image] = {}  # the conversation's images' pixels, by key

    @property
    def format(self) -> ChatFormat:
        return self.profile.format

    @property
    def think_mode(self) -> str | None:
        """How thinking is switched: "prompt", "effort" or None (no switch)."""
        return self.profile.think_mode

    # --- the conversation -------------------------------------------------------------------

    def conversation(self, messages: Sequence[Message] | None = None) -> list[Message]:
        """The reasoning prompt (thinking on, "prompt" mode), the system prompt (if any), then the
        messages."""
        chosen = self.messages if messages is None else messages
        return self.profile.conversation(chosen, system=self.system, thinking=self.thinking)

    def prompt(self, messages: Sequence[Message] | None = None) -> list[int]:
        """The prompt token ids for the conversation, ready for the assistant's reply."""
        chosen = self.messages if messages is None else messages
        return self.profile.prompt(
            chosen, self.engine.tokenize, thinking=self.thinking, system=self.system
        )

    def set_schema(self, schema: Mapping[str, Any] | bool | None) -> None:
        """Make every reply JSON that follows `schema` (a JSON schema; True: any object), enforced
        by a grammar on the logits; None: free text again. UsageError for a schema the grammar
        engine refuses."""
        from localmix.chat.grammars import ANY_OBJECT, JsonOutput

        self.output = (
            None if schema is None else ANY_OBJECT if schema is True else JsonOutput(schema)
        )
        self._grammar()  # a bad schema is said now, not at the first reply

    def _grammar(self) -> str | None:
        from localmix.chat.profile import reply_grammar

        if self.output is None:
            return None
        return reply_grammar(
            self.profile,
            self.engine.tokenize,
            output=self.output,
            thinking=self.thinking and self.profile.think_ids is not None,
        )

    def set_thinking(self, on: bool) -> None:
        """Turn thinking on or off; UsageError for a model without a thinking switch."""
        self.profile.check_thinking(on)
        self.thinking = on

    def send(
        self, text: str, images: Sequence[Image] = ()
    ) -> Iterator[Chunk | Thought | Stats | Notice]:
        """Add a user message (its text, then any images) and stream the reply: Notices, then
        Thoughts (a reasoning model's thinking) and Chunks (the answer), then the final Stats.
        UsageError for images sent to a model that does not see them.

        Closing the iterator early (Ctrl-C) keeps the partial reply as the assistant's message, or
        forgets the user message when nothing was generated yet.
        """
        if images and not self.profile.sees_images:
            raise UsageError(
                "this model does not see images",
                hint="use a vision model (Mistral Small 3.2, Ministral 3, Magistral) with its "
                "mmproj",
            )
        self.images.update((i.key, i) for i in images)
        content = (text, *(i.picture() for i in images)) if images else text
        return self._turn([*self.messages, Message("user", content)], restore=None)

    def retry(self) -> Iterator[Chunk | Thought | Stats | Notice]:
        """Generate the last reply again (the same user message); as send(). Interrupted before
        any text, the old reply stays."""
        if not self.messages or self.messages[-1].role != "assistant":
            raise UsageError("there is no reply to retry", hint="send a message first")
        return self._turn(self.messages[:-1], restore=list(self.messages))

    def undo(self) -> list[Message]:
        """Drop the last exchange (its user message or messages and the reply); returns them."""
        starts = _turn_starts(self.messages)
        if not starts:
            raise UsageError("there is nothing to undo")
        removed = self.messages[starts[-1] :]
        del self.messages[starts[-1] :]
        self.last_stats = None  # the numbers were the dropped reply's
        return removed

    def _turn(
        self, messages: list[Message], *, restore: list[Message] | None
    ) -> Iterator[Chunk | Thought | Stats | Notice]:
        """Stream the reply to `messages` (which end with a user message). Abandoned before any
        text, the messages become `restore`, or lose that user message when restore is None."""
        prompt, kept, dropped = self._fit(messages)
        self.messages = kept
        room = self.engine.n_ctx - len(prompt)
        try:
            if dropped:
                yield Notice(f"context full: dropped {dropped} oldest turn{'s' * (dropped != 1)}")
            if room < self.max_tokens:
                yield Notice(f"context nearly full: reply limited to {room} tokens")
        except GeneratorExit:
            self._abandon(restore)  # closed before the reply began: the message was never sent
            raise
        yield from self._reply(prompt, min(self.max_tokens, room), restore)

    def _abandon(self, restore: list[Message] | None) -> None:
        if restore is None:
            self.messages.pop()
        else:
            self.messages = restore

    def clear(self) -> None:
        """Forget the messages and the last reply's numbers (the system prompt stays)."""
        self.messages.clear()
        self.last_stats = None

    def set_system(self, text: str | None) -> None:
        """Replace the system prompt (None or "" removes it)."""
        self.system = text or None

    # --- settings ---------------------------------------------------------------------------

    def set_option(self, name: str, value: str | float | None) -> None:
        """Change one of SETTINGS (as /set does); strings are parsed, "none" clears the seed."""
        if name not in SETTINGS:
            raise UsageError(f"unknown setting {name!r}", hint="one of: " + ", ".join(SETTINGS))
        try:
            if name == "max_tokens":
                tokens = int(value)  # type: ignore[arg-type]
                if tokens < 1:
                    raise UsageError(f"max_tokens must be at least 1, not {tokens}")
                self.max_tokens = tokens
                return
            if name == "seed":
                parsed: Any = None if value in (None, "", "none", "random") else int(value)  # type: ignore[arg-type]
            elif name in ("top_k",):
                parsed = int(value)  # type: ignore[arg-type]
            else:
                parsed = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise UsageError(f"{name} needs a number, not {value!r}") from None
        self.sampling = replace(self.sampling, **{name: parsed})

    def settings(self) -> dict[str, Any]:
        """The current values of SETTINGS."""
        values = {f.name: getattr(self.sampling, f.name) for f in fields(self.sampling)}
        values["max_tokens"] = self.max_tokens
        return {name: values[name] for name in SETTINGS}

    # --- save / load ------------------------------------------------------------------------

    def save(self, path: Path | str) -> Path:
        """Write the conversation and its settings as JSON (atomically); returns the path."""
        path = Path(path).expanduser()
        data = {
            "format": SAVE_FORMAT,
            "version": SAVE_VERSION,
            "model": self.model,
            "chat_format": self.format.name,
            "system": self.system,
            "messages": [m.to_json() for m in self.messages],
            "sampling": asdict(self.sampling),
            "max_tokens": self.max_tokens,
        }
        try:
            self._save_images(images_folder(path))
            disk.write_text(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n")
        except OSError as e:
            raise OutputError(f"cannot save the chat to {path}: {e.strerror}") from None
        return path

    def _pictures(self, messages: Sequence[Message] | None = None) -> list[Picture]:
        """The Picture parts of the messages (the conversation's), in order."""
        return [
            p for m in (self.messages if messages is None else messages)
            if not isinstance(m.content, str) for p in m.content if isinstance(p, Picture)
        ]  # fmt: skip

    def _save_images(self, folder: Path) -> None:
        """The conversation's images as PNG files in folder (the chat file names them by key)."""
        for picture in self._pictures():
            pixels = self.images.get(picture.key)
            if pixels is not None:
                images.save_png(pixels, folder)

    def _load_images(self, folder: Path, messages: Sequence[Message]) -> dict[str, Image]:
        loaded: dict[str, Image] = {}
        for picture in self._pictures(messages):
            file = folder / (picture.key.removeprefix("sha256:") + ".png")
            try:
                loaded[picture.key] = images.decode(file.read_bytes())
            except (OSError, UsageError):
                continue  # the turn keeps its place; sending it again needs the image
        return loaded

    def load(self, path: Path | str) -> str | None:
        """Replace messages, system prompt and settings with a saved chat; returns its model name."""
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise UsageError(f"cannot read {path}: {e.strerror}") from None
        except ValueError:
            raise UsageError(f"{path} is not a saved chat (not JSON)") from None
        if not isinstance(data, dict) or data.get("format") != SAVE_FORMAT:
            raise UsageError(f"{path} is not a saved localmix chat")
        if data.get("version") not in READS_VERSIONS:
            raise UsageError(
                f"{path} is a version {data.get('version')} chat file; this localmix reads "
                f"versions {', '.join(map(str, READS_VERSIONS))}",
                hint="upgrade localmix",
            )
        try:
            messages = [Message.from_json(m) for m in data["messages"]]
            sampling = Sampling(**data.get("sampling", {}))
            max_tokens = int(data.get("max_tokens", self.max_tokens))
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"{path} is a damaged chat file ({e})") from None
        if any(m.role not in ("user", "assistant") for m in messages):
            raise UsageError(f"{path} is a damaged chat file (unknown message role)")
        if not self.format.think:  # this model cannot read thinking back: its text goes on
            messages = [m.without_thinking() for m in messages]
        self.messages = messages
        self.images = self._load_images(images_folder(path), messages)
        self.system = data.get("system") or None
        self.sampling = sampling
        self.max_tokens = max(1, max_tokens)
        model = data.get("model")
        return model if isinstance(model, str) else None

    # --- internals --------------------------------------------------------------------------

    def _fit(self, messages: list[Message]) -> tuple[list[int], list[Message], int]:
        """The prompt for `messages` within the context: drops oldest turns when prompt + reply
        budget exceed n_ctx (shifting the KV cache to match in "shift" mode)."""
        n_ctx = self.engine.n_ctx
        full = self.prompt(messages)
        if len(full) + self.max_tokens <= n_ctx:
            return full, messages, 0
        starts = _turn_starts(messages)
        # v1 carries the system prompt inside the first user message: keep that turn, so the
        # rest of the prompt is a contiguous cut of the old one and the KV cache can shift.
        keep_first = isinstance(self.format, MistralFormat) and (
            self.format.system == "first_user" and self.system is not None
        )
        head = messages[: starts[1]] if keep_first and len(starts) > 1 else []
        first_droppable = 1 if head else 0
        prompt, kept, dropped = full, messages, 0
        for i in range(first_droppable + 1, len(starts)):
            kept = head + messages[starts[i] :]
            prompt = self.prompt(kept)
            dropped = i - first_droppable
            if len(prompt) + self.max_tokens <= n_ctx:
                break
        if len(prompt) >= n_ctx:
            raise ContextTooLong(
                f"the prompt is {len(prompt)} tokens; the context holds {n_ctx}",
                hint="shorten the message, /clear the history, or start with a larger --ctx",
            )
        if dropped and self.overflow == "shift":
            self._shift_cache(full, prompt)
        return prompt, kept, dropped

    def _shift_cache(self, old: list[int], new: list[int]) -> None:
        """When `new` is `old` with one block cut out, cut that block out of the KV cache too."""
        cut = _cut(old, new)
        if cut is None:
            return
        keep, discard = cut
        if _common_prefix(self.engine.kv_tokens, old) < keep + discard:
            return  # the cache does not hold the cut block; the engine re-processes instead
        try:
            self.engine.shift(keep, discard)
        except LocalmixError:
            self.engine.clear()  # a model whose cache cannot shift: start the prompt afresh

    def _reply(
        self, prompt: list[int], max_tokens: int, restore: list[Message] | None
    ) -> Iterator[Chunk | Thought | Stats]:
        split = reasoning.Splitter(self.profile.think_ids)
        stats: Stats | None = None
        strip = self.profile.strip_space
        gen = Generation(
            prompt, self.sampling, max_tokens, grammar=self._grammar(),
            images=self._image_spans(prompt),
        )  # fmt: skip
        stream = self.engine.generate(gen)
        try:
            for item in stream:
                if isinstance(item, Chunk):
                    if item.text and strip and item.text.startswith(" "):
                        item = Chunk(item.text[1:], item.token)
                    strip = strip and not item.text
                    shown = split.feed(item)
                    if shown is not None:
                        yield shown
                    continue
                stats = item
                yield item
        finally:
            stream.close()
            self.last_stats = stats or getattr(self.engine, "last_stats", None)
            self.last_thought_tokens = split.thought_tokens
            self._record(split.parts(), finished=stats is not None, restore=restore)

    def _image_spans(self, prompt: list[int]) -> tuple[ImageSpan, ...]:
        """Where the conversation's images sit in the prompt, each encoded only if the engine
        does not hold it in its cache already (on demand)."""
        vision = self.engine.vision
        pictures = self._pictures()
        if not pictures or vision is None:
            return ()
        tokenize = self.engine.tokenize
        ids = images.ImageIds(*(template.control_token(tokenize, t) for t in IMAGE_TOKENS))
        spans = []
        for picture, (start, length) in zip(
            pictures, images.placed(prompt, pictures, vision.config, ids), strict=True
        ):
            pixels = self.images.get(picture.key)
            if pixels is None:
                raise UsageError(
                    "an image of this chat is not loaded", hint="/clear, or send the image again"
                )
            spans.append(ImageSpan(start, length, picture.key, partial(vision.encode, pixels)))
        return tuple(spans)

    def _record(
        self, reply: tuple[str | Think, ...], *, finished: bool, restore: list[Message] | None
    ) -> None:
        """Keep the message list in step with what the model saw and said."""
        if reply:
            content = reply[0] if len(reply) == 1 and isinstance(reply[0], str) else reply
            self.messages.append(Message("assistant", content))
        elif not finished:
            self._abandon(restore)  # interrupted before any text: as if never sent
        # finished with an empty reply: the user message stays; the next one is merged with it


def images_folder(chat: Path) -> Path:
    """Where a saved chat keeps its images: a folder beside it."""
    return chat.with_name(chat.name + ".images")


def _turn_starts(messages: Sequence[Message]) -> list[int]:
    """Indexes where a turn begins: a user message that does not follow another user message."""
    return [
        i
        for i, m in enumerate(messages)
        if m.role == "user" and (i == 0 or messages[i - 1].role != "user")
    ]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _cut(old: Sequence[int], new: Sequence[int]) -> tuple[int, int] | None:
    """(keep, discard) such that new == old[:keep] + old[keep + discard:], else None."""
    discard = len(old) - len(new)
    if discard <= 0:
        return None
    prefix = _common_prefix(old, new)
    suffix = _common_prefix(old[::-1], new[::-1])
    if prefix + suffix < len(new):
        return None
    keep = min(prefix, len(new))
    return keep, discard


def open_session(
    reference: str | Located,
    settings: LoadSettings | None = None,
    *,
    chat_format: str | None = None,
    system: str | None = None,
    sampling: Sampling | None = None,
    max_tokens: int = 512,
    overflow: str = "shift",
    thinking: bool | None = None,
    mmproj: Path | None = None,
) -> tuple[Session, tuple[str, ...]]:
    """Open a model through the door (load.open_model) and start a Session on it, with what the
    user should know about how it was loaded; the caller closes session.engine. chat_format None:
    the manifest's, else detected from the GGUF; thinking None: the model's own default;
    mmproj: a vision model's vision tower, so that it sees images."""
    from localmix import load

    target = load.locate(reference)
    loaded = load.open_model(target, settings)
    try:
        vision = mmproj or target.mmproj  # the flag, else the one the store keeps with it
        if vision is not None:
            loaded.engine.attach_vision(vision)
        session = Session(
            loaded.engine, chat_format or target.chat_format, system=system, sampling=sampling,
            max_tokens=max_tokens, overflow=overflow, model=target.name, thinking=thinking,
        )  # fmt: skip
    except BaseException:
        loaded.close()
        raise
    return session, loaded.notices
