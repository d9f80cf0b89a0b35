"""Every command answers --help, the CLI starts fast-importing, and the README's command reference
is generated from the CLI itself (so the docs cannot drift).

Regenerate the reference with:  LOCALMIX_WRITE_README=1 pytest tests/test_cli_help.py
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from localmix.cli.app import COMMANDS, app
from tests.cli_run import run_cli

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- commands:start -->", "<!-- commands:end -->"


def _commands() -> dict[str, object]:
    group = typer.main.get_command(app)
    return dict(sorted(group.commands.items()))  # type: ignore[attr-defined]


def command_reference() -> str:
    """Markdown for every command: usage, its help line, and its options."""
    lines: list[str] = []
    for name, command in _commands().items():
        if command.hidden:  # type: ignore[attr-defined]  # an alias: documented by its command
            continue
        params = command.params  # type: ignore[attr-defined]
        args = " ".join(
            p.name.upper() + ("..." if getattr(p, "nargs", 1) == -1 else "")
            for p in params
            if p.param_type_name == "argument"
        )
        lines.append(f"### `localmix {name}{' ' + args if args else ''}`")
        lines.append("")
        lines.append((command.help or "").strip().splitlines()[0])  # type: ignore[attr-defined]
        lines.append("")
        for p in params:
            if p.param_type_name != "option" or p.hidden:
                continue
            flags = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
            default = p.default
            shown = (
                ""
                if default in (None, False, (), [])
                or callable(default)
                or p.is_flag
                or str(default).startswith("<")
                else f" (default: {default})"
            )
            lines.append(f"- {flags}: {(p.help or '').strip()}{shown}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def test_readme_command_reference_matches_the_cli() -> None:
    text = README.read_text(encoding="utf-8")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    expected = f"{head}{START}\n{command_reference()}{END}{tail}"
    if os.environ.get("LOCALMIX_WRITE_README"):
        README.write_text(expected, encoding="utf-8")
    assert text == expected, "README command reference is stale: LOCALMIX_WRITE_README=1 pytest"


@pytest.mark.parametrize("name", list(_commands()))
def test_every_command_has_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, name, "--help")
    assert result.code == 0
    assert name in result.out


def test_cli_imports_no_heavy_module() -> None:
    code = (
        "import sys, localmix.cli.app as a; "
        "heavy = [m for m in ('llama_cpp', 'numpy', 'gguf', 'huggingface_hub', 'mistral_common',"
        " 'torch', 'prompt_toolkit') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [["--help"], ["chat", "--help"], ["list"], ["bench", "--help"]])
def test_help_and_list_import_neither_pydantic_nor_the_engine(
    argv: list[str], tmp_path: Path
) -> None:
    # Typer builds a pydantic converter per processed parameter that is not already a bool;
    # options.FalseHelp makes an unset --help False, so help and list need none
    # (benchmarks/startup.py), and the plain help needs neither markdown-it nor pygments.
    code = (
        "import sys\nfrom localmix.cli.app import main\n"
        f"sys.argv = ['localmix', *{argv!r}]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('pydantic', 'llama_cpp', 'numpy', 'huggingface_hub', 'mistral_common',"
        " 'prompt_toolkit', 'markdown_it', 'pygments', 'typer.rich_utils') if m in sys.modules]\n"
        "print(heavy, file=sys.stderr)\n"
    )
    env = {**os.environ, "LOCALMIX_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stderr.strip().splitlines()[-1] == "[]"


def test_the_root_help_lists_every_command_with_its_own_first_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The root help lists COMMANDS without building the commands: it must name every command a
    # module registers, each where it is registered, with the first line of its own help.
    registered: set[str | None] = set()
    for module in {entry.module for entry in COMMANDS.values()}:
        registrar = typer.Typer()
        importlib.import_module(module).register(registrar)
        registered |= {info.name for info in registrar.registered_commands}
    assert registered == set(COMMANDS)
    commands = _commands()
    for name, entry in COMMANDS.items():
        command = commands[name]
        assert command.callback.__module__ == entry.module, name  # type: ignore[attr-defined]
        first = (command.help or "").strip().splitlines()[0]  # type: ignore[attr-defined]
        assert entry.help == ("" if command.hidden else first), name  # type: ignore[attr-defined]
    out = " ".join(run_cli(capsys, "--help").out.split())
    for name, entry in COMMANDS.items():
        assert (f"{name} {entry.help}" in out) == bool(entry.help), name


def test_the_root_help_builds_no_command() -> None:
    code = (
        "import sys\nfrom localmix.cli.app import main\n"
        "sys.argv = ['localmix', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith('localmix.cli.')), file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    loaded = out.stderr.strip().splitlines()[-1]
    assert loaded == "['localmix.cli.app', 'localmix.cli.options']", loaded


def test_a_given_value_is_still_coerced_and_checked(capsys: pytest.CaptureFixture[str]) -> None:
    # Typer's converter still runs for a given value: a non-number is refused.
    result = run_cli(capsys, "chat", "x", "--top-k", "many")
    assert result.code == 2 and "--top-k" in result.err and "valid integer" in result.err


def test_no_command_prints_the_help_as_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys)
    assert result.code == 2 and result.out.startswith("Usage: localmix ") and result.err == ""
    assert "chat " in result.out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "--version")
    assert result.code == 0 and result.out.startswith("localmix ")


@pytest.mark.parametrize("name", list(_commands()))
def test_options_show_a_placeholder_not_a_python_type(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    command = _commands()[name]
    for param in command.params:  # type: ignore[attr-defined]
        if param.param_type_name == "option":
            assert param.metavar is not None, f"{name} {param.opts}: no metavar"
    result = run_cli(capsys, name, "--help")
    # no Python type anywhere (options, --help itself, arguments), no {MODEL} in the usage line
    assert not re.search(r"<[a-z]", result.out), f"{name}: a Python type in its help"
    assert not re.search(r"\{[A-Z_]+\}", result.out), f"{name}: braces in its usage"
    usage = next(line for line in result.out.splitlines() if "Usage:" in line)
    arguments = [p for p in command.params if p.param_type_name == "argument"]  # type: ignore[attr-defined]
    for argument in arguments:
        shown = argument.display_name_raw
        assert (shown if argument.required else f"[{shown}") in usage, usage


def test_the_root_help_shows_no_python_types(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "--help")
    assert result.code == 0 and not re.search(r"<[a-z]", result.out)


def test_run_is_chat_under_ollamas_name() -> None:
    commands = _commands()
    run, chat = commands["run"], commands["chat"]
    assert [p.name for p in run.params] == [p.name for p in chat.params]  # type: ignore[attr-defined]
    assert run.hidden and "localmix run" in (chat.help or "")  # type: ignore[attr-defined]


def test_paths_prints_where_everything_lives(
    capsys: pytest.CaptureFixture[str], localmix_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    monkeypatch.setenv("HF_HOME", str(localmix_home / "hf"))
    done = run_cli(capsys, "paths", "--json")
    assert done.code == 0, done.err
    places = json.loads(done.out)
    for key in ("models", "manifests", "tmp", "bench_history", "chats"):
        assert Path(places[key]).is_relative_to(localmix_home), key
    assert places["hugging_face_cache"] == str(localmix_home / "hf" / "hub")
    table = run_cli(capsys, "paths")
    assert str(localmix_home / "bench" / "history.jsonl") in table.out
    assert not (localmix_home / "models").exists()  # looking creates nothing
