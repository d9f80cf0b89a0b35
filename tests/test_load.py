"""The door that opens a model (localmix.load): one place for the context default, the plan rule
and the engine, used by chat, bench, demo and the REPL's /model."""

from __future__ import annotations

import ast
import io
import sys
from pathlib import Path

import pytest

from localmix import load
from localmix.cli import chat as chat_cli
from localmix.models import store
from tests.cli_run import run_cli

PACKAGE = Path(load.__file__).resolve().parent


def test_the_context_default_is_4096_or_the_trained_context() -> None:
    long = store.Located(Path("m.gguf"), "m", None, 32768)
    short = store.Located(Path("m.gguf"), "m", None, 2048)
    unknown = store.Located(Path("m.gguf"), "m", None, 0)
    assert load.LoadSettings().n_ctx(long) == 4096
    assert load.LoadSettings().n_ctx(short) == 2048
    assert load.LoadSettings().n_ctx(unknown) == 4096
    assert load.LoadSettings(ctx=0).n_ctx(long) == 0  # the model's own, as llama.cpp reads it
    assert load.LoadSettings(ctx=8192).n_ctx(short) == 8192
    assert chat_cli.DEFAULT_CTX == load.DEFAULT_CTX  # the help text says the same number


def test_a_located_file_is_read_once(tiny_mistral_gguf_f16: Path) -> None:
    target = load.locate(str(tiny_mistral_gguf_f16))
    assert target.info is target.info  # the header read by locate, reused by the plan
    assert load.locate(target) is target


def test_the_plan_rule(tiny_mixtral_gguf_f16: Path) -> None:
    target = load.locate(tiny_mixtral_gguf_f16)
    # this CPU build has no GPU: nothing to plan unless asked
    assert load.plan_for(target, load.LoadSettings()) is None
    # the user placed the model: never re-planned
    assert load.plan_for(target, load.LoadSettings(n_gpu_layers=0)) is None
    # a budget or --cpu-moe asks for a plan, as does --estimate (force)
    budgeted = load.plan_for(target, load.LoadSettings(vram_budget="24GiB"))
    assert budgeted is not None and budgeted.budget.gpu_bytes == 24 * 1024**3
    moe = load.plan_for(target, load.LoadSettings(cpu_moe=2))
    assert moe is not None and moe.cpu_moe == 2
    assert load.plan_for(target, load.LoadSettings(), force=True) is not None


def test_open_model_loads_what_configure_says(tiny_mixtral_gguf_f16: Path) -> None:
    settings = load.LoadSettings(ctx=256, threads=1, cpu_moe=1, vram_budget="1GiB")
    config, plan = load.configure(load.locate(tiny_mixtral_gguf_f16), settings)
    assert plan is not None and config.tensor_overrides == plan.tensor_overrides
    assert config.n_gpu_layers == plan.n_gpu_layers and config.n_ctx == 256
    with load.open_model(str(tiny_mixtral_gguf_f16), settings) as loaded:
        assert loaded.config == config
        assert loaded.engine.n_ctx == 256
        assert loaded.target.name == tiny_mixtral_gguf_f16.name
    assert loaded.engine._closed


def test_commands_open_models_only_through_the_door() -> None:
    """No command module builds an Engine itself: they all call load.open_model."""
    offenders = []
    rooms = ("cli", "bench", "quality")
    for path in sorted(p for room in rooms for p in (PACKAGE / room).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Engine":
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


def test_cpu_moe_options_mean_what_they_mean_in_llama_cpp(
    tiny_mixtral_gguf_f16: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--cpu-moe is a flag (every layer's experts), --n-cpu-moe / -ncmoe N the first N layers."""
    model = str(tiny_mixtral_gguf_f16)
    every = run_cli(capsys, "chat", model, "--estimate", "--cpu-moe", "--vram-budget", "1GiB")
    assert every.code == 0 and "the experts of layers 0-1 on the CPU" in every.out, every  # 2
    first = run_cli(capsys, "chat", model, "--estimate", "-ncmoe", "1", "--vram-budget", "1GiB")
    assert first.code == 0 and "the experts of layer 0 on the CPU" in first.out, first
    missing = run_cli(capsys, "chat", model, "--estimate", "--n-cpu-moe")
    assert missing.code == 2 and "requires an argument" in missing.err, missing


def test_gpu_settings_on_a_cpu_only_build_are_said(
    tiny_mistral_gguf_f16: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from localmix.llama import lib

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    if lib.supports_gpu_offload():
        pytest.skip("this build has a GPU backend")
    args = ("chat", str(tiny_mistral_gguf_f16), "hi", "-n", "1", "--format", "v1", "-t", "1")
    offloaded = run_cli(capsys, *args, "-ngl", "99")
    assert offloaded.code == 0 and "no GPU backend" in offloaded.err
    assert "no GPU backend" not in run_cli(capsys, *args).err
    assert load.notices(load.LoadSettings()) == ()
    assert load.notices(load.LoadSettings(n_gpu_layers=99))
