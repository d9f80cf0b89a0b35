"""The Typer app and main(): every LocalmixError becomes `error:` / `hint:` and its exit code."""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import typer
import typer.main
from typer.core import TyperGroup

from localmix import __version__, settings
from localmix.cli.options import Command, FalseHelp
from localmix.errors import INTERRUPTED_EXIT_CODE, LocalmixError, from_os_error


class Entry(NamedTuple):
    module: str  # its register(app) adds the command
    help: str  # the line the root help lists it with ("" for a hidden alias)


# Every command, so that `localmix --help` lists them without importing a command module or
# building a command: a command is built from its module when it runs or shows its own help.
# tests/test_cli_help.py holds each line to the first line of the command's own help.
COMMANDS = {
    "pull": Entry(
        "localmix.cli.pull",
        "Download a model from the Hugging Face Hub (resumable, sha256-verified) into the store.",
    ),
    "import": Entry(
        "localmix.cli.pull",
        "Register a GGUF file on disk (validated first); chats remember its --format and --mmproj.",
    ),
    "chat": Entry(
        "localmix.cli.chat",
        "Chat with a model: a REPL on a terminal; with a PROMPT or piped input, print the reply.",
    ),
    "run": Entry("localmix.cli.chat", ""),
    "bench": Entry(
        "localmix.cli.bench",
        "Measure tokens/s the way llama-bench does: pp (prompt) and tg (generation), mean ± std.",
    ),
    "eval": Entry(
        "localmix.cli.eval",
        "Measure what a quant loses: PPL ratio, KL divergence and same top token against a "
        "reference.",
    ),
    "list": Entry(
        "localmix.cli.models", "List installed models (or, with --available, the catalog)."
    ),
    "show": Entry(
        "localmix.cli.models",
        "Show a model's architecture, size, quant, context, tensor types, chat format and source.",
    ),
    "rm": Entry(
        "localmix.cli.models",
        "Remove a model (all its quants unless NAME:QUANT) and the files localmix owns.",
    ),
    "du": Entry(
        "localmix.cli.models",
        "Disk used by the store: owned files, referenced files, leftovers, free space.",
    ),
    "convert": Entry(
        "localmix.cli.build",
        "Convert a Hugging Face or Mistral-native checkpoint to GGUF (streaming, bounded memory).",
    ),
    "quantize": Entry(
        "localmix.cli.build",
        "Quantize a GGUF file (or a store model) with llama.cpp, Q4_K_M by default.",
    ),
    "synth": Entry(
        "localmix.cli.build",
        "Write a random-weight checkpoint with a real Mistral tokenizer (for demos and tests).",
    ),
    "imatrix": Entry(
        "localmix.cli.imatrix",
        "Compute an importance matrix for the 1-3 bit quant types, as llama-imatrix does.",
    ),
    "doctor": Entry(
        "localmix.cli.doctor",
        "Show llama.cpp's backends and devices, free memory, threads, RAM and bandwidth, and RPC.",
    ),
    "paths": Entry(
        "localmix.cli.doctor",
        "Show where models, manifests, tmp, bench history, chats and the HF cache live.",
    ),
    "demo": Entry(
        "localmix.cli.demo",
        "Build a small random-weight model, then convert, quantize, bench and chat with it "
        "offline.",
    ),
    "serve": Entry(
        "localmix.cli.serve",
        "Serve models over HTTP: OpenAI's API under /v1, Ollama's under /api.",
    ),
    "ps": Entry("localmix.cli.serve", "List the models a running `localmix serve` has loaded."),
    "worker": Entry(
        "localmix.cli.worker",
        "Serve this machine's devices to another localmix's --rpc, over llama.cpp's RPC protocol.",
    ),
}


class _Registrar(typer.Typer):
    """What a command module's register(app) adds its commands to: each one is an
    options.Command, so its help reads like the rest."""

    def command(self, *args: Any, cls: Any = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or Command, **kwargs)


@functools.cache
def _built(module: str) -> dict[str, Command]:
    """The commands one module registers, built by typer (once)."""
    registrar = _Registrar(rich_markup_mode=None, add_completion=False)
    importlib.import_module(module).register(registrar)
    return dict(typer.main.get_group(registrar).commands)


class _LazyCommands(Mapping[str, Command]):
    """The root group's commands by name: every name is known up front (COMMANDS), a command is
    built on first use. Typer's group looks commands up here, and offers close names from its
    keys for a mistyped one."""

    def __getitem__(self, name: str) -> Command:
        return _built(COMMANDS[name].module)[name]

    def __iter__(self) -> Iterator[str]:
        return iter(COMMANDS)

    def __len__(self) -> int:
        return len(COMMANDS)


class LazyGroup(FalseHelp, TyperGroup):
    """The root: lists every command from COMMANDS, builds only the one that runs."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.commands = _LazyCommands()  # type: ignore[assignment]

    def list_commands(self, ctx: typer.Context) -> list[str]:
        return list(COMMANDS)

    def format_commands(self, ctx: typer.Context, formatter: Any) -> None:
        rows = [(name, entry.help) for name, entry in COMMANDS.items() if entry.help]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


app = typer.Typer(
    name="localmix",
    cls=LazyGroup,
    help="Run Mistral and Mixtral locally: pull, convert, quantize, chat, bench.",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # typer's plain help: see options.Command
    epilog="Environment: "
    + "; ".join(f"{name}: {text}" for name, text in settings.ENVIRONMENT.items()),
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"localmix {__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(
        False,
        "--version",
        callback=_version,
        is_eager=True,
        metavar="",
        help="Show the version and exit.",
    ),
) -> None:
    """Run Mistral and Mixtral locally: pull, convert, quantize, chat, bench."""
    # `localmix` alone: the help, and the status of a usage error (no_args_is_help would make
    # the whole help the text of that error)
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(2)


# Every error line gets a hint line; where the raiser had nothing specific to add, this one.
_FALLBACK_HINT = "see `localmix COMMAND --help`, or `localmix doctor` for this machine"


def _say(message: str, hint: str | None = None) -> None:
    from rich.markup import escape

    from localmix.cli.render import err_console

    err_console().print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    if hint:
        err_console().print(f"[yellow]hint:[/] {escape(hint)}", soft_wrap=True)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app and map errors to exit codes."""
    code = 0
    try:
        result = app(args=argv, prog_name="localmix", standalone_mode=False)
        code = result if isinstance(result, int) else 0
        if code == INTERRUPTED_EXIT_CODE:  # typer turns Ctrl-C into a return value of 130
            _say("interrupted")
    except LocalmixError as exc:
        if settings.debug():
            raise
        _say(exc.message, exc.hint or _FALLBACK_HINT)
        code = exc.exit_code
    except (KeyboardInterrupt, typer.Abort):
        _say("interrupted")
        code = INTERRUPTED_EXIT_CODE
    except typer.Exit as exc:
        code = exc.exit_code
    except typer.TyperException as exc:  # usage errors: bad option, missing argument
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        _say(message.replace("\n", " "), "see `localmix --help` or `localmix COMMAND --help`")
        code = getattr(exc, "exit_code", 2)
    except BrokenPipeError:
        code = 0  # `localmix list | head`: the reader left, nothing is wrong
    except OSError as exc:  # a full disk, a read-only home, a path gone: the user can act
        if settings.debug():
            raise
        error = from_os_error(exc)
        _say(error.message, error.hint)
        code = error.exit_code
    except Exception as exc:  # a bug: one line for the user, the traceback behind LOCALMIX_DEBUG
        if settings.debug():
            raise
        _say(
            f"internal error: {type(exc).__name__}: {exc}".splitlines()[0],
            "run again with LOCALMIX_DEBUG=1 to see the traceback, and please report it",
        )
        code = 1
    sys.exit(code)
