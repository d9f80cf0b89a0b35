"""Every `localmix ...` line of the README's "Use it" section runs as written, in order, from a fresh
LOCALMIX_HOME against the local test Hub (tests/hub_server.py) serving tiny models under the
catalog's real repository and file names."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_pull import ROOT, Env, env  # noqa: F401 (the fixture)

USE_IT = re.compile(r"## Use it\s*```bash\n(?P<block>.*?)```", re.S)


def readme_lines() -> list[list[str]]:
    """The commands of the "Use it" block, as argument lists, comments removed."""
    block = USE_IT.search((ROOT / "README.md").read_text(encoding="utf-8"))
    assert block, 'README.md has no "Use it" bash block'
    lines = [shlex.split(line, comments=True) for line in block["block"].splitlines()]
    return [words for words in lines if words]


def test_the_use_it_block_is_only_localmix_commands() -> None:
    lines = readme_lines()
    assert len(lines) >= 8 and all(words[0] == "localmix" for words in lines)


def _hub_repos(tmp: Path) -> dict[str, Path]:
    """Tiny models under the names the catalog and the README point at."""
    from localmix.build.convert import convert
    from localmix.build.quantize import quantize
    from localmix.build.synth import checkpoints as synth

    mistral = synth.checkpoint(tmp / "mistral-ckpt", arch="mistral", size="tiny", tokenizer="v3")
    mixtral = synth.checkpoint(tmp / "mixtral-ckpt", arch="mixtral", size="tiny", tokenizer="v1")
    mistral_f16 = convert(mistral, tmp / "mistral.f16.gguf", outtype="f16")
    mixtral_f16 = convert(mixtral, tmp / "mixtral.f16.gguf", outtype="f16")
    mistral_gguf, mixtral_gguf = tmp / "mistral-gguf", tmp / "mixtral-gguf"
    mistral_gguf.mkdir()
    mixtral_gguf.mkdir()
    for quant in ("Q4_K_M", "Q6_K"):
        quantize(mistral_f16, mistral_gguf / f"Mistral-7B-Instruct-v0.3-{quant}.gguf", quant)
    quantize(mixtral_f16, mixtral_gguf / "Mixtral-8x7B-Instruct-v0.1.Q5_K_M.gguf", "Q5_K_M")
    return {
        "bartowski/Mistral-7B-Instruct-v0.3-GGUF": mistral_gguf,
        "mradermacher/Mixtral-8x7B-Instruct-v0.1-GGUF": mixtral_gguf,
        "mistralai/Mistral-7B-Instruct-v0.3": mistral,
    }


@pytest.mark.slow
def test_every_readme_command_runs_as_written(env: Env, tmp_path: Path) -> None:  # noqa: F811
    from tests.imatrix_files import write_gguf_imatrix

    with pytest.MonkeyPatch.context() as patch:  # building stages files in a home of its own
        patch.setenv("LOCALMIX_HOME", str(tmp_path / "build-home"))
        repos = _hub_repos(tmp_path / "repos")
    assert not env.home.exists()  # a fresh home
    for repo, folder in repos.items():
        (folder / "README.md").write_text(f"# {repo}\n")
        env.hub.add_repo(repo, folder)
    cwd = tmp_path / "work"
    cwd.mkdir()
    # the file a user brings for the 1-3 bit types (llama-imatrix's output)
    write_gguf_imatrix(tmp_path / "repos" / "mistral.f16.gguf", cwd / "imatrix.gguf")
    for words in readme_lines():
        # the REPL lines (`chat NAME`, flags aside) read a piped message
        interactive = words[1] == "chat" and len([w for w in words if w[0] != "-"]) == 3
        result = subprocess.run(
            [sys.executable, "-m", "localmix", *words[1:]],
            # One llama.cpp thread: on a 2-core machine shared with other work, spinning threads
            # made the random-weight replies (1024 tokens, never an EOS) take a minute.
            env=env.vars(LOCALMIX_THREADS="1"),
            cwd=cwd,
            input="Hi\n" if interactive else "",  # the REPL line reads a piped message
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, f"{shlex.join(words)}\n{result.stderr}"
        assert "Traceback" not in result.stderr


BUILT = re.compile(r"## How it is built.*?```\n(?P<tree>localmix/\n.*?)```", re.S)


def test_the_map_of_the_rooms_matches_the_code() -> None:
    """Every package and top-level module of localmix/ is on the README's map, every name on the
    map exists, and each package's line names each of its modules."""
    tree = BUILT.search((ROOT / "README.md").read_text(encoding="utf-8"))
    assert tree, 'README.md has no "How it is built" tree'
    lines = tree["tree"].splitlines()[1:]
    rooms: dict[str, str] = {}  # room -> the text that describes it (continuation lines too)
    last = ""
    for line in lines:
        for word in re.findall(r"\b([a-z_]+(?:\.py|/)) {2,}", line):  # the padded name columns
            rooms[word] = ""
            last = word
        rooms[last] += line
    package = ROOT / "localmix"
    actual = {p.name + "/" for p in package.iterdir() if p.is_dir() and p.name != "__pycache__"}
    actual |= {p.name for p in package.glob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    assert set(rooms) == actual
    for room, text in rooms.items():
        if room.endswith("/") and room != "data/":
            described = set(re.findall(r"[a-z_]+", text))
            modules = {
                p.stem if p.is_file() else p.name
                for p in (package / room).iterdir()
                if p.name not in ("__init__.py", "__pycache__", "models.toml")
            }
            assert modules <= described, f"{room}: {sorted(modules - described)} not on the map"
