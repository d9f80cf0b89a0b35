"""The code base stays `ruff check` and `ruff format` clean (CI runs this with the other tests)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["localmix", "tests", "benchmarks"]


def _ruff() -> list[str]:
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if exe is None:
        pytest.fail(
            "ruff is not installed: it is part of the test extra (pip install -e '.[test]')"
        )
    return [exe]


@pytest.mark.parametrize("args", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff(args: list[str]) -> None:
    result = subprocess.run(
        [*_ruff(), *args, *TARGETS], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _imported_packages() -> set[str]:
    """The top-level names localmix/ imports from outside the standard library and itself."""
    names: set[str] = set()
    for path in (ROOT / "localmix").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"localmix"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    """Distributions pyproject.toml depends on, with those an extra it names brings in
    (mistral-common[sentencepiece] declares sentencepiece)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared: set[str] = set()
    for requirement in project["dependencies"]:
        found = re.match(r"\s*([A-Za-z0-9._-]+)\s*(?:\[([^\]]*)\])?", requirement)
        assert found, requirement
        declared.add(_canonical(found.group(1)))
        for extra in filter(None, (e.strip() for e in (found.group(2) or "").split(","))):
            for sub in importlib.metadata.requires(found.group(1)) or []:
                if re.search(rf"extra\s*==\s*['\"]{re.escape(extra)}['\"]", sub):
                    declared.add(_canonical(re.split(r"[^A-Za-z0-9._-]", sub, maxsplit=1)[0]))
    return declared


def test_every_third_party_import_is_a_declared_dependency() -> None:
    """A module localmix imports only because another dependency happens to pull it in breaks
    when that one stops: each must come from a distribution pyproject.toml names."""
    owners = importlib.metadata.packages_distributions()
    declared = _declared()
    undeclared = {}
    for module in sorted(_imported_packages()):
        dists = owners.get(module, [module])  # not installed here (tomli on 3.11): its own name
        if not {_canonical(d) for d in dists} & declared:
            undeclared[module] = dists
    assert undeclared == {}, f"imported but not in pyproject.toml dependencies: {undeclared}"
