"""A reply on the terminal as it streams: markdown rendered while it arrives, at a bounded cost.

Finished markdown blocks (a blank line outside a code fence, then a new unindented line) are
printed once, for good; only the block still growing lives in a rich Live region, re-rendered a
few times a second from rich's refresh thread. Rendering work therefore stays small and off the
decode loop (llama.cpp releases the GIL), and a long reply scrolls like plain output instead of
fighting the Live region for the screen.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
    from rich.live import Live
    from rich.segment import Segment

# C0 controls but tab and newline, and DEL: a model's output must not drive the terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
# The live region re-renders at most this many characters of the growing block (its tail).
_LIVE_TAIL_CHARS = 6000


def printable(text: str) -> str:
    """Text without terminal control characters (tab and newline stay)."""
    return _CONTROL.sub("", text)


class _Trimmed:
    """A renderable without blank lines around it (rich starts lists with one, for instance),
    optionally cut to its last `height` lines so a Live region never outgrows the screen."""

    def __init__(self, renderable: RenderableType, *, tail: bool = False) -> None:
        self.renderable = renderable
        self.tail = tail

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        from rich.segment import Segment

        lines = console.render_lines(self.renderable, options, pad=False)
        while lines and _blank(lines[-1]):
            lines.pop()
        while lines and _blank(lines[0]):
            lines.pop(0)
        if self.tail:
            lines = lines[-max(1, (options.max_height or console.height) - 1) :]
        for line in lines:
            yield from line
            yield Segment.line()


def _blank(line: list[Segment]) -> bool:
    """No text and no background (a code block's padding line has one)."""
    return all(not s.text.strip() and (s.style is None or s.style.bgcolor is None) for s in line)


class ReplyView:
    """Shows one streamed reply; feed() the text pieces, then finish(). A context manager."""

    def __init__(
        self, console: Console, *, markdown: bool = True, refresh_per_second: float = 8.0
    ) -> None:
        self.console = console
        self.markdown = markdown
        self.refresh_per_second = refresh_per_second
        self.text = ""  # the whole reply so far
        self._pending = ""  # the markdown block still growing
        self._scan = 0  # offset in _pending up to which whole lines were scanned
        self._fence: str | None = None  # the open code fence's marker, if any
        self._blank = False  # a blank line (outside a fence) ended the scanned part
        self.blocks = 0  # markdown blocks printed for good
        self._live: Live | None = None
        self._finished = False

    def __enter__(self) -> ReplyView:
        if self.markdown and self.console.is_terminal and not self.console.is_dumb_terminal:
            from rich.live import Live

            self._live = Live(
                console=self.console,
                get_renderable=self._live_view,
                refresh_per_second=self.refresh_per_second,
                transient=True,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

    def feed(self, piece: str) -> None:
        """Add a piece of reply text."""
        piece = printable(piece)
        if not piece:
            return
        self.text += piece
        if not self.markdown:
            self.console.file.write(piece)
            self.console.file.flush()
            return
        self._pending += piece
        if "\n" in piece or self._blank:
            self._commit_finished_blocks()

    def finish(self) -> None:
        """Stop the live region and print what is left; idempotent."""
        if self._finished:
            return
        self._finished = True
        if self._live is not None:
            self._live.stop()
            self._live = None
        if not self.markdown:
            if self.text and not self.text.endswith("\n"):
                self.console.file.write("\n")
                self.console.file.flush()
            return
        if self._pending.strip():
            self._print_block(self._pending)
        self._pending = ""
        self._scan = 0

    # -- markdown blocks ---------------------------------------------------------------------

    def _commit_finished_blocks(self) -> None:
        text, pos = self._pending, self._scan
        while (end := text.find("\n", pos)) >= 0:
            line = text[pos:end]
            if self._blank and self._fence is None and _starts_block(line):
                self._commit(pos)
                text, pos = self._pending, self._scan
                continue
            self._scan_line(line)
            pos = end + 1
        self._scan = pos
        rest = text[pos:]
        # the first characters of a new unindented block: the one before it is complete
        if self._blank and self._fence is None and rest.strip() and _starts_block(rest):
            self._commit(pos)

    def _scan_line(self, line: str) -> None:
        fence = _FENCE.match(line)
        if self._fence is None:
            if fence:
                self._fence = fence.group(1)[0] * len(fence.group(1))
                self._blank = False
            else:
                self._blank = not line.strip()
        elif fence and fence.group(1).startswith(self._fence) and not line[fence.end() :].strip():
            self._fence = None
            self._blank = False

    def _commit(self, cut: int) -> None:
        block, self._pending = self._pending[:cut], self._pending[cut:]
        self._scan, self._blank = 0, False
        self._print_block(block)

    def _print_block(self, block: str) -> None:
        from rich.markdown import Markdown

        if self.blocks:
            self.console.print()  # the blank line that separated the blocks
        self.blocks += 1
        self.console.print(_Trimmed(Markdown(block.strip("\n"))))

    def _live_view(self) -> Any:
        from rich.markdown import Markdown

        text = self._pending
        if len(text) > _LIVE_TAIL_CHARS:
            # a huge block (a long code listing): render its tail, inside its fence if open
            text = text[-_LIVE_TAIL_CHARS:].split("\n", 1)[-1]
            if self._fence is not None:
                text = self._fence + "\n" + text
        return _Trimmed(Markdown(text.strip("\n") or " "), tail=True)


def _starts_block(line: str) -> bool:
    """A line that begins a new top-level block (not an indented continuation)."""
    return bool(line) and not line[0].isspace()


class ThoughtView:
    """A reasoning model's thinking as it streams: dim text (show) or only a live count on a
    terminal (hide); finish() ends it with one summary line, the thought's token count."""

    def __init__(self, console: Console, *, show: bool = True) -> None:
        self.console = console
        self.show = show
        self.text = ""
        self.tokens = 0
        self._status: Any = None
        self._done = False

    def feed(self, piece: str, token: int = 0) -> None:
        """Add a piece of thinking (token -1: text flushed at the end, not a token)."""
        from rich.text import Text

        self.tokens += token >= 0
        piece = printable(piece)
        self.text += piece
        if self.show:
            if piece:
                self.console.print(Text(piece, style="dim"), end="", highlight=False)
            return
        if self.console.is_terminal and not self.console.is_dumb_terminal:
            if self._status is None:
                self._status = self.console.status("thinking", spinner="dots")
                self._status.start()
            self._status.update(f"thinking … {self.tokens} tokens")

    def finish(self) -> None:
        """The summary line (nothing when there was no thinking); idempotent."""
        if self._done or not (self.tokens or self.text):
            return
        self._done = True
        if self._status is not None:
            self._status.stop()
        if self.show and self.text and not self.text.endswith("\n"):
            self.console.print()
        where = "" if self.show else " · /thoughts shows it"
        self.console.print(
            f"╰ thought for {self.tokens} token{'s' * (self.tokens != 1)}{where}",
            style="dim italic",
            markup=False,
            highlight=False,
        )
