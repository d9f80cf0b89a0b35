"""The Typer app and main(): every LocalmixError becomes `error:` / `hint:` and its exit code."""

from __future__ import annotations

import importlib
import sys

import typer

from localmix import __version__, settings
from localmix.cli.options import name_values, plain_help
from localmix.errors import INTERRUPTED_EXIT_CODE, LocalmixError, from_os_error

app = typer.Typer(
    name="localmix",
    help="Run Mistral and Mixtral locally: pull, convert, quantize, chat, bench.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    epilog="Environment: "
    + "; ".join(f"{name}: {text}" for name, text in settings.ENVIRONMENT.items()),
)

# Each command module has register(app); importing them is cheap (heavy imports live inside
# the command functions), so `localmix --help` stays fast.
COMMAND_MODULES = (
    "localmix.cli.pull",
    "localmix.cli.chat",
    "localmix.cli.bench",
    "localmix.cli.eval",
    "localmix.cli.models",
    "localmix.cli.build",
    "localmix.cli.imatrix",
    "localmix.cli.doctor",
    "localmix.cli.demo",
    "localmix.cli.serve",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"localmix {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
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


for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(app)
name_values(app)
plain_help()


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
