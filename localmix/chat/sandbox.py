"""Rendering a chat template from a GGUF file, which is untrusted code: in jinja's immutable
sandbox (no attribute tricks, no mutation), with no loader (include / import / extends fail
cleanly), and within a budget of time and size, so a hostile template ends in InvalidGGUF
instead of a hang, a memory blow-up or a 100 MB prompt that llama.cpp aborts on.

jinja's sandbox caps range() at 100,000 items but not loops nested in loops, nor strings grown
by `*`, `+` or `~`: a trace on the template's own frames checks the clock and the size of its
variables on every line, and the operators that build strings and lists check their results.
"""

from __future__ import annotations

import contextvars
import json
import sys
import time
from collections.abc import Mapping
from functools import lru_cache
from types import FrameType
from typing import Any

from localmix.errors import InvalidGGUF

SECONDS = 2.0  # a real template renders in milliseconds
MAX_CHARS = 4 * 2**20  # the rendered prompt, and any string or list built on the way
_HINT = "name a Mistral chat format with --format, or fix the GGUF's template"


class TemplateRaised(Exception):
    """raise_exception() called by a template."""


class _OverBudget(Exception):
    pass


class _Budget:
    """The clock and size limits of one render."""

    def __init__(self, seconds: float, max_chars: int) -> None:
        self.seconds, self.max_chars = seconds, max_chars
        self.deadline = time.monotonic() + seconds

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _OverBudget(f"it ran for more than {self.seconds:g} s")

    def limit(self, size: int) -> None:
        if size > self.max_chars:
            raise _OverBudget(f"it built a value of more than {self.max_chars:,} items")

    def sized(self, value: Any) -> Any:
        if isinstance(value, (str, list, tuple)):
            self.limit(len(value))
        return value

    def trace(self, frame: FrameType, event: str, arg: Any) -> Any:
        """sys.settrace hook: follow only frames of compiled templates."""
        return self._line if frame.f_code.co_filename == "<template>" else None

    def _line(self, frame: FrameType, event: str, arg: Any) -> Any:
        self.tick()
        for value in frame.f_locals.values():
            self.sized(value)
        return self._line


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("budget", default=None)


def _budget() -> _Budget:
    return _BUDGET.get() or _Budget(SECONDS, MAX_CHARS)


def render(
    template: str,
    variables: Mapping[str, Any],
    *,
    seconds: float = SECONDS,
    max_chars: int = MAX_CHARS,
) -> str:
    """The template's text for variables, or InvalidGGUF (with the reason) if it fails, loops
    past `seconds` or writes (or builds) more than `max_chars`."""
    compiled = _compile(template)
    budget = _Budget(seconds, max_chars)
    token = _BUDGET.set(budget)
    previous = sys.gettrace()
    sys.settrace(budget.trace)
    try:
        parts: list[str] = []
        total = 0
        for chunk in compiled.generate(**variables):
            total += len(chunk)
            if total > max_chars:
                raise _OverBudget(f"it wrote more than {max_chars:,} characters")
            parts.append(chunk)
        return "".join(parts)
    except TemplateRaised as exc:
        raise InvalidGGUF(f"the model's chat template failed: {exc}", hint=_HINT) from None
    except _OverBudget as exc:
        raise InvalidGGUF(f"the model's chat template was stopped: {exc}", hint=_HINT) from None
    except RecursionError:
        raise InvalidGGUF("the model's chat template recurses without end", hint=_HINT) from None
    except MemoryError:
        raise InvalidGGUF("the model's chat template exhausted memory", hint=_HINT) from None
    except Exception as exc:
        raise InvalidGGUF(
            f"the model's chat template failed: {type(exc).__name__}: {exc}".splitlines()[0],
            hint=_HINT,
        ) from None
    finally:
        sys.settrace(previous)
        _BUDGET.reset(token)


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Bounded(ImmutableSandboxedEnvironment):
        # the operators that can build big values in one step
        intercepted_binops = frozenset({"*", "**", "+"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            budget = _budget()
            budget.tick()
            if operator == "**" and isinstance(right, int) and abs(right) > 64:
                raise _OverBudget(f"it raised a number to the power {right}")
            if operator == "*" and isinstance(left, (str, list, tuple)) and isinstance(right, int):
                budget.limit(len(left) * right)  # the size, before building it
            if operator == "*" and isinstance(right, (str, list, tuple)) and isinstance(left, int):
                budget.limit(len(right) * left)
            return budget.sized(super().call_binop(context, operator, left, right))

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
            _budget().tick()
            return _budget().sized(super().call(__context, __obj, *args, **kwargs))

    def raise_exception(message: str) -> None:
        raise TemplateRaised(message)

    def strftime_now(fmt: str) -> str:
        from datetime import datetime

        return datetime.now().strftime(fmt)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, **kw: Any) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, **kw)

    env = Bounded(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=["jinja2.ext.loopcontrols"],
        loader=jinja2.DictLoader({}),  # include / import / extends find nothing
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise InvalidGGUF(
            f"the model's chat template does not parse: {e}",
            hint="name a Mistral chat format with --format",
        ) from None
