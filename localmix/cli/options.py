"""Option and argument types declared once and shared by the commands, and the Command class
whose help shows them as placeholders (MODEL, N, PATH) rather than Python types.

Only typer's and click's public extension points are used: a command class passed as `cls=`
(app.py's registrar gives every command this one), overriding click's public methods
(collect_usage_pieces, format_options, get_help_option) and setting metavars on the command's own
parameters. Typer is pinned to 0.29: its help and error wording, which tests/test_cli_help.py
and tests/test_bad_input.py check, changed between 0.28 and 0.29 (14 of those tests fail on
0.28), and 0.30 is not out to try.

Help is typer's plain one (rich_markup_mode=None in app.py): click's layout. Typer 0.29's rich
help cannot read like this through any public hook: it prints an argument's Python type beside
it whatever its metavar (MODEL <str>), and --help's (<bool>), from the parameter classes
typer.main builds, which no `cls=` reaches; and its renderer, typer.rich_utils, imports
rich.markdown (markdown-it) and rich.traceback (pygments) at its top, about 45 ms, which put
`localmix --help` at or over its 150 ms budget. The plain help imports no part of rich.
"""

from __future__ import annotations

import inspect
import math
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperArgument, TyperCommand, TyperOption


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
_RPC_HELP: dict[str, Any] = {
    "metavar": "HOST:PORT,...",
    "callback": not_empty,
    "help": "Put the layers on these machines' devices, comma-separated: each runs `localmix "
    "worker` (llama.cpp's RPC); -ngl N offloads only the last N, the rest stay here (default: "
    "LOCALMIX_RPC; llama.cpp's own tools read LLAMA_ARG_RPC).",
}
RpcOpt = Annotated[Optional[str], typer.Option("--rpc", **_RPC_HELP)]  # noqa: UP045
# doctor: the workers to probe, not to load on
DoctorRpcOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--rpc",
        metavar="HOST:PORT,...",
        callback=not_empty,
        help="Probe these RPC workers (`localmix worker`), comma-separated: protocol and each "
        "device's memory (default: LOCALMIX_RPC).",
    ),
]
# bench: llama-bench's spelling too
BenchRpcOpt = Annotated[Optional[str], typer.Option("--rpc", "-rpc", **_RPC_HELP)]  # noqa: UP045


def rpc_endpoints(value: str | None) -> tuple[str, ...]:
    """--rpc as the door takes it, else LOCALMIX_RPC: each HOST:PORT once (UsageError for a
    malformed one, naming the variable when it came from there)."""
    from localmix import settings
    from localmix.errors import UsageError
    from localmix.llama.rpc import parse_endpoints

    if value:
        return tuple(str(endpoint) for endpoint in parse_endpoints(value))
    value = settings.rpc_workers()
    if not value:
        return ()
    try:
        return tuple(str(endpoint) for endpoint in parse_endpoints(value))
    except UsageError as exc:
        raise UsageError(
            f"LOCALMIX_RPC: {exc.message}", hint=exc.hint or "unset it to load on this machine"
        ) from None


OutputOpt = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option(
        "--output", "-o", help="Output file (default: next to the input or in the store)."
    ),
]


# What a value looks like in help, by its Python type: people read N or PATH, not <int> or <str>.
_METAVARS: dict[object, str] = {bool: "", int: "N", float: "NUMBER", str: "TEXT", Path: "PATH"}


def _metavar(annotation: object) -> str:
    """The help placeholder for an option of this type (a flag has none)."""
    if typing.get_origin(annotation) is Annotated:
        return _metavar(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) is list:
        return "LIST"
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args and typing.get_origin(annotation) is not None:  # Optional[X]
        return _metavar(args[0])
    return _METAVARS.get(annotation, "VALUE")


class FalseHelp:
    """A command or group whose --help is False when not given, as any flag of localmix is.

    Typer 0.29 coerces every parameter's value with a converter it builds from pydantic, except
    a bool that already is one; click's --help is None when not given, so processing it imported
    pydantic, about 35 ms of `localmix list` and of `localmix chat --help` (the root group's
    --help is processed before the subcommand's). tests/test_cli_help.py checks the imports."""

    def get_help_option(self, ctx: typer.Context) -> TyperOption | None:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.default = False
        return option


class Command(FalseHelp, TyperCommand):
    """A command whose help reads the way other tools' does: `Usage: localmix chat [OPTIONS]
    MODEL [PROMPT]`, an argument named in capitals, N or PATH beside an option, nothing beside a
    flag (typer 0.29 writes a parameter with no metavar as its Python type, <str>, an argument
    always so, and a required one as {MODEL} in usage)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        callback = inspect.unwrap(self.callback) if self.callback else None
        hints = typing.get_type_hints(callback, include_extras=True) if callback else {}
        for param in self.params:
            if param.metavar is None and param.name:
                argument = param.param_type_name == "argument"
                param.metavar = param.name.upper() if argument else _metavar(hints.get(param.name))

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                pieces.append(_argument_name(param, usage=True))
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces

    def format_options(self, ctx: typer.Context, formatter: Any) -> None:
        arguments, options = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                # typer's record names an argument with its Python type: keep only its text
                arguments.append((_argument_name(param, usage=False), record[1]))
            else:
                options.append(record)
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def _argument_name(param: TyperArgument | TyperOption, *, usage: bool) -> str:
    """MODEL, or [PROMPT] in a usage line where it may be left out; NAME... for several."""
    name = param.metavar or (param.name or "").upper()
    if usage and not param.required:
        name = f"[{name}]"
    return name + ("..." if param.nargs != 1 else "")


ChatFormatOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--format",
        callback=not_empty,
        help="Chat format: v1, v2, v3, v3-tekken, v7, v11, v13, v15 (default: from the model).",
    ),
]
