"""Shared fixtures: an isolated LOCALMIX_HOME for every test, and tiny models built once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def localmix_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own LOCALMIX_HOME; nothing touches the user's real store or cache."""
    home = tmp_path / "localmix-home"
    monkeypatch.setenv("LOCALMIX_HOME", str(home))
    monkeypatch.setenv("LOCALMIX_CACHE", str(tmp_path / "localmix-cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("LOCALMIX_DEBUG", raising=False)
    return home


# ---- tiny synthetic models, built once per session (localmix.build.synth.checkpoints + localmix.build.convert) ----------
# Checkpoints are HF layout, v1 tokenizer, seed 0, f32 weights: seconds to build on 2 cores.


def _tiny_ckpt(factory: pytest.TempPathFactory, arch: str) -> Path:
    from localmix.build.synth import checkpoints as synth

    return synth.checkpoint(factory.mktemp(f"tiny-{arch}") / "ckpt", arch=arch, size="tiny", seed=0)


def _tiny_gguf(factory: pytest.TempPathFactory, ckpt: Path, outtype: str) -> Path:
    import os

    from localmix.build.convert import convert

    # convert() stages its partial file under LOCALMIX_HOME/tmp: give this session-wide build its
    # own home so no test's isolated home sees it
    work = factory.mktemp(f"{ckpt.parent.name}-{outtype}")
    previous = os.environ.get("LOCALMIX_HOME")
    os.environ["LOCALMIX_HOME"] = str(work / "home")
    try:
        return convert(ckpt, work / f"model.{outtype.upper()}.gguf", outtype=outtype)
    finally:
        if previous is None:
            del os.environ["LOCALMIX_HOME"]
        else:
            os.environ["LOCALMIX_HOME"] = previous


@pytest.fixture(scope="session")
def tiny_mistral_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Mistral checkpoint (HF layout, v1 tokenizer). Treat as read-only."""
    return _tiny_ckpt(tmp_path_factory, "mistral")


@pytest.fixture(scope="session")
def tiny_mixtral_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Mixtral checkpoint (8 experts, top-2; HF layout, v1). Read-only."""
    return _tiny_ckpt(tmp_path_factory, "mixtral")


@pytest.fixture(scope="session")
def tiny_mistral_gguf_f32(
    tmp_path_factory: pytest.TempPathFactory, tiny_mistral_ckpt: Path
) -> Path:
    return _tiny_gguf(tmp_path_factory, tiny_mistral_ckpt, "f32")


@pytest.fixture(scope="session")
def tiny_mixtral_gguf_f32(
    tmp_path_factory: pytest.TempPathFactory, tiny_mixtral_ckpt: Path
) -> Path:
    return _tiny_gguf(tmp_path_factory, tiny_mixtral_ckpt, "f32")


@pytest.fixture(scope="session")
def tiny_mistral_gguf_f16(
    tmp_path_factory: pytest.TempPathFactory, tiny_mistral_ckpt: Path
) -> Path:
    return _tiny_gguf(tmp_path_factory, tiny_mistral_ckpt, "f16")


@pytest.fixture(scope="session")
def tiny_mixtral_gguf_f16(
    tmp_path_factory: pytest.TempPathFactory, tiny_mixtral_ckpt: Path
) -> Path:
    return _tiny_gguf(tmp_path_factory, tiny_mixtral_ckpt, "f16")


@pytest.fixture(scope="session")
def small_mistral_q4_k_m(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 256-wide Mistral in Q4_K_M: wide enough for real K-quant blocks (tiny's 64 is not), so
    its quantized matrix products round the way a real model's do."""
    from localmix.build.quantize import quantize

    f16 = _tiny_gguf(tmp_path_factory, _small_ckpt(tmp_path_factory), "f16")
    return quantize(f16, f16.with_name("model.Q4_K_M.gguf"), "Q4_K_M")


def _small_ckpt(factory: pytest.TempPathFactory) -> Path:
    from localmix.build.synth import checkpoints as synth

    return synth.checkpoint(factory.mktemp("small-mistral") / "ckpt", size="small", seed=0)


# ---- llama.cpp's RPC backend (tests/test_rpc.py, tests/test_rpc_commands.py) ----------------


def rpc_env(cache: Path) -> dict[str, str]:
    """A child's environment: this cache (with the RPC plug-in), this checkout, no debug."""
    env = {**os.environ, "LOCALMIX_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    env.pop("LOCALMIX_DEBUG", None)
    env.pop("LOCALMIX_RPC", None)
    return env


@pytest.fixture(scope="session")
def rpc_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache with the RPC plug-in in it, built by two processes at once (the lock makes one
    build it and the other wait for it): the build the product does where the wheel has none."""
    cache = tmp_path_factory.mktemp("rpc-cache")
    from localmix.llama import rpc_plugin

    code = "from localmix.llama import rpc_plugin; print(rpc_plugin.plugin())"
    command = [sys.executable, "-c", code]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    builders = [subprocess.Popen(command, env=rpc_env(cache), cwd=ROOT, **pipes) for _ in range(2)]
    results = [builder.communicate(timeout=600) for builder in builders]
    assert all(b.returncode == 0 for b in builders), [err[-2000:] for _, err in results]
    (path,) = {out.strip() for out, _ in results}
    plugin = Path(path)
    assert plugin.is_file() and plugin.is_relative_to(cache)
    # nothing half-built left: the plug-in's folder, its lock, no staging folder
    folder = plugin.parent
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name, f"{folder.name}.lock"]
    assert [p.name for p in folder.iterdir()] == [rpc_plugin.PLUGIN]
    return cache
