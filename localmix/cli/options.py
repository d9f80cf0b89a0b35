"""Option and argument types declared once and shared by the commands."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer


def number_in(low: float, high: float | None = None) -> Callable[[float | None], float | None]:
    """An option callback: a finite number in [low, high]. Typer's own min/max let nan through
    (every comparison with nan is false) and then name the wrong bound."""

    def check(value: float | None) -> float | None:
        if value is None:
            return value
        if math.isnan(value) or math.isinf(value):
            raise typer.BadParameter(f"{value} is not a number")
        if value < low or (high is not None and value > high):
            span = f"between {low:g} and {high:g}" if high is not None else f"{low:g} or more"
            raise typer.BadParameter(f"{value:g} is not {span}")
        return value

    return check


def not_empty(value: str | None) -> str | None:
    """An option callback: text that is given must say something (`--format ""` is a slip,
    not a request for the default)."""
    if value is not None and not value.strip():
        raise typer.BadParameter("is empty")
    return value


# llama.cpp's seeds are uint32 (its "random" seed is 0xFFFFFFFF); larger ones would wrap silently.
MAX_SEED = 2**32 - 2


ModelArg = Annotated[
    str, typer.Argument(help="Model: a store name (mistral, tiny-mixtral:Q4_K_M) or a .gguf path.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
ThreadsOpt = Annotated[
    Optional[int],  # noqa: UP045 - typer needs Optional at runtime on 3.10
    typer.Option("--threads", "-t", min=1, help="CPU threads (default: physical cores)."),
]
QuantOpt = Annotated[
    str,
    typer.Option("--type", "--quant", "-q", help="Quantization type, e.g. Q4_K_M, Q5_K_M, Q8_0."),
]
ImatrixOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--imatrix",
        metavar="FILE",
        callback=not_empty,
        help="Importance matrix (llama-imatrix's GGUF or .dat), or auto: the model's own, "
        "computed first if missing (`localmix imatrix`); needed by IQ1/IQ2/IQ3_XXS/Q2_K_S.",
    ),
]
RepackOpt = Annotated[
    Optional[bool],  # noqa: UP045
    typer.Option(
        "--repack/--no-repack",
        help="Let llama.cpp repack weights for the CPU's kernels, or not (default: yes, except "
        "on builds with AMX kernels; LOCALMIX_REPACK; `localmix doctor` says which).",
    ),
]
OutputOpt = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option(
        "--output", "-o", help="Output file (default: next to the input or in the store)."
    ),
]


# What a value looks like in help, by its Python type: people read N or PATH, not <int> or <str>.
_METAVARS: dict[object, str] = {bool: "", int: "N", float: "NUMBER", str: "TEXT", Path: "PATH"}


def _metavar(name: str, annotation: object, info: object) -> str:
    """The help placeholder for one parameter: its own name for an argument, else by type."""
    import typing

    if isinstance(info, typer.models.ArgumentInfo):
        return name.upper()
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is list:
        return "LIST"
    if args and typing.get_origin(annotation) is not None:  # Optional[X]
        return _metavar(name, args[0], info)
    return _METAVARS.get(annotation, "VALUE")


def plain_help() -> None:
    """Typer 0.29 prints Python types where help wants placeholders: `<bool>` beside flags and
    --help, `<str>` beside arguments, and `{MODEL}` for a required argument in usage lines. Drop
    the types (an argument's name in capitals already says what it is) and write usage as other
    tools do: MODEL required, [PROMPT] optional. Typer is pinned below 0.30, where these hooks
    live; tests/test_cli_help.py checks every command's help, so a change there shows."""
    from typer import core

    option_type = core.TyperOption.display_type_rich

    def flag_or_option_type(self: Any, ctx: Any) -> str | None:
        return None if self.is_flag and not self.metavar else option_type(self, ctx)

    def usage_name(self: Any) -> str:
        name = self.display_name_raw if self.required else f"[{self.display_name_raw}]"
        return name + ("..." if self.nargs != 1 else "")

    core.TyperArgument.display_type_rich = lambda self, ctx: None  # type: ignore[method-assign]
    core.TyperArgument._usage_display_name = usage_name  # type: ignore[method-assign]
    core.TyperOption.display_type_rich = flag_or_option_type  # type: ignore[method-assign]
    _coerce_lazily(core)
    for cls in (core.TyperCommand, core.TyperGroup):
        cls.format_help = _with_light_help_renderer(cls.format_help)  # type: ignore[method-assign]


def _with_light_help_renderer(format_help: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(self: Any, ctx: Any, formatter: Any) -> Any:
        _import_help_renderer()
        return format_help(self, ctx, formatter)

    return wrapped


def _import_help_renderer() -> None:
    """typer.rich_utils, the help renderer, imports rich.markdown (with markdown-it) and
    rich.traceback (with pygments) at its top, a third of `localmix --help`'s time, for the
    "markdown" markup mode and pretty tracebacks, neither of which localmix uses. Import it with
    stand-ins for those two, then take the stand-ins away, so later imports get the real ones."""
    import importlib
    import sys
    import types

    if "typer.rich_utils" in sys.modules:
        return
    stand_ins = {
        name: types.ModuleType(name)
        for name in ("rich.markdown", "rich.traceback")
        if name not in sys.modules
    }
    for name, module in stand_ins.items():
        module.__dict__[name.rsplit(".", 1)[1].capitalize()] = None  # Markdown, Traceback
        sys.modules[name] = module
    try:
        importlib.import_module("typer.rich_utils")
    finally:
        for name, module in stand_ins.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]


class _UnsetOrCoerced:
    """A parameter's coercion that needs no converter for a value that was not given: typer's own
    coerce() returns None (or () for a multi-value parameter) then, without using the converter."""

    def __init__(self, build: Callable[[], Any]) -> None:
        self._build = build

    def coerce(self, value: Any, param: Any, ctx: Any) -> Any:
        if value is None:
            return () if (param.multiple or param.nargs == -1) else None
        return self._build().coerce(value, param=param, ctx=ctx)


def _coerce_lazily(core: Any) -> None:
    """Typer 0.29 builds a pydantic converter for every parameter it processes, given or not, and
    importing pydantic is most of the time `localmix chat --help` or `localmix list` takes
    (the root group's unset --help is processed before the subcommand). Build it only for a
    value that was given; the result is the same (tests/test_cli_help.py times the imports)."""
    build = core.build_runtime_param

    def get_runtime_param(self: Any) -> Any:
        if self._runtime_param is not None:
            return self._runtime_param

        def real() -> Any:
            self._runtime_param = build(self.type_descriptor)
            return self._runtime_param

        return _UnsetOrCoerced(real)

    core._TyperParameter.get_runtime_param = get_runtime_param  # type: ignore[method-assign]


def name_values(app: typer.Typer) -> None:
    """Give every option and argument of app's commands a metavar that reads like help, where
    its declaration has none (Typer would show the Python type: <str>, <list[str]>)."""
    import typing

    for command in app.registered_commands:
        hints = typing.get_type_hints(command.callback, include_extras=True)
        # Keep the evaluated annotations: under `from __future__ import annotations` an inline
        # typer.Option(...) is re-created each time Typer evaluates the string.
        command.callback.__annotations__ = hints  # type: ignore[union-attr]
        for name, hint in hints.items():
            if typing.get_origin(hint) is not Annotated:
                continue
            annotation, *extras = typing.get_args(hint)
            for info in extras:
                if isinstance(info, typer.models.ParameterInfo) and info.metavar is None:
                    info.metavar = _metavar(name, annotation, info)


ChatFormatOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--format",
        callback=not_empty,
        help="Chat format: v1, v2, v3, v3-tekken, v7, v11, v13, v15 (default: from the model).",
    ),
]
