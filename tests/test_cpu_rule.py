"""The CPU rule (load.repack_choice): weights stay out of ggml's AMX kernels, which segfault at the
first decode of a quantized model on some AMX hosts; everything else keeps llama.cpp's repacking.

The rule is pinned here without an AMX machine (what localmix passes to llama.cpp when the build
reports AMX kernels); the end-to-end tests decode a Q4_K_M file in child processes, so on an AMX
host a broken rule fails them with a message instead of killing the runner, and compare the
tokens with a llama.cpp built without AMX kernels."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from localmix import load
from localmix.errors import UsageError
from localmix.llama import hardware, lib
from tests.cli_run import run_cli

REPO = Path(__file__).resolve().parent.parent
AMX_HOST = hardware.Amx(kernels=True, cpu=True, buffer=True)


@pytest.fixture(scope="module")
def q4_k_m(tmp_path_factory: pytest.TempPathFactory, tiny_mistral_gguf_f16: Path) -> Path:
    from localmix.build.quantize import quantize

    out = tmp_path_factory.mktemp("cpu-rule") / "tiny.Q4_K_M.gguf"
    return quantize(tiny_mistral_gguf_f16, out, "Q4_K_M")


def test_weights_stay_out_of_the_amx_buffer_type_where_llama_cpp_offers_it() -> None:
    assert load.weight_repack(amx=AMX_HOST) is False
    assert "AMX" in load.repack_choice(amx=AMX_HOST).why and "--repack" in (
        load.repack_choice(amx=AMX_HOST).why
    )
    # AMX kernels that the OS does not grant are never used: repacking stays llama.cpp's default
    assert load.weight_repack(amx=hardware.Amx(kernels=True, cpu=False, buffer=False)) is True
    assert load.weight_repack(amx=hardware.Amx()) is True


def test_what_the_user_asks_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load.weight_repack(True, amx=AMX_HOST) is True
    assert load.weight_repack(False, amx=hardware.Amx()) is False
    monkeypatch.setenv("LOCALMIX_REPACK", "1")
    assert load.weight_repack(amx=AMX_HOST) is True
    assert load.weight_repack(False, amx=AMX_HOST) is False  # the flag before the environment
    monkeypatch.setenv("LOCALMIX_REPACK", "off")
    assert load.weight_repack(amx=hardware.Amx()) is False
    monkeypatch.setenv("LOCALMIX_REPACK", "maybe")
    with pytest.raises(UsageError, match="LOCALMIX_REPACK"):
        load.weight_repack(amx=hardware.Amx())


def test_a_build_with_amx_kernels_loads_without_extra_buffers(
    q4_k_m: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the door passes to llama.cpp when the CPU backend reports AMX_INT8 and offers its
    AMX buffer type (as the pip build does on a Sapphire Rapids host)."""
    features = {**lib.cpu_features(), "AMX_INT8": "1"}
    monkeypatch.setattr(lib, "cpu_features", lambda: features)
    monkeypatch.setattr(lib, "extra_buffer_types", lambda: ("AMX", "CPU_REPACK"))
    hardware.amx.cache_clear()
    try:
        assert hardware.amx().kernels and hardware.amx().buffer
        config, _ = load.configure(load.locate(q4_k_m), load.LoadSettings(ctx=256))
        assert config.repack is False
        asked, _ = load.configure(load.locate(q4_k_m), load.LoadSettings(ctx=256, repack=True))
        assert asked.repack is True
    finally:
        hardware.amx.cache_clear()


def test_the_amx_facts_are_the_builds_own() -> None:
    facts = hardware.amx()
    assert facts.kernels == (lib.cpu_features().get("AMX_INT8") == "1")
    assert facts.buffer == ("AMX" in lib.extra_buffer_types())
    assert facts.buffer <= facts.kernels  # the AMX buffer type exists only with the kernels
    assert lib.extra_buffer_types()  # every x86/ARM build here repacks (CPU_REPACK at least)
    assert load.weight_repack() is (not facts.buffer)


def _repacked_log(path: Path, repack: bool, capfd: pytest.CaptureFixture[str]) -> str:
    capfd.readouterr()
    settings = load.LoadSettings(ctx=256, threads=1, repack=repack, verbose=True)
    with load.open_model(path, settings):
        pass
    return capfd.readouterr().err


def test_the_engine_passes_the_choice_to_llama_cpp(
    q4_k_m: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """llama.cpp's own log says where the weights went: repacked buffers only when allowed."""
    on = _repacked_log(q4_k_m, True, capfd)
    off = _repacked_log(q4_k_m, False, capfd)
    extra = lib.extra_buffer_types()[0]
    assert f"{extra} model buffer size" in on
    assert "model buffer size" in off and f"{extra} model buffer size" not in off


def _child(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        check=False,
    )


def _died(done: subprocess.CompletedProcess[str], what: str) -> str:
    name = signal.Signals(-done.returncode).name if done.returncode < 0 else done.returncode
    return (
        f"{what} died ({name}) decoding a Q4_K_M model. On this host ({hardware.amx().summary}) "
        f"the CPU rule in localmix.load.repack_choice let llama.cpp use kernels that crash here."
        f"\nstderr:\n{done.stderr[-2000:]}"
    )


@pytest.mark.slow
def test_chat_decodes_a_q4_k_m_model_in_a_child_process(q4_k_m: Path) -> None:
    """The command a user runs, in its own process: a crash in llama.cpp is this test's failure."""
    done = subprocess.run(
        [sys.executable, "-m", "localmix", "chat", str(q4_k_m), "Hello", "-n", "8", "-t", "1",
         "--temperature", "0", "--ctx", "256"],
        capture_output=True, text=True, timeout=300, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, _died(done, "localmix chat")
    assert done.stdout.strip()


_GREEDY = """
import json, sys
from localmix import load
from localmix.llama.hardware import amx
from localmix.llama.records import Sampling
repack = {"on": True, "off": False}.get(sys.argv[2]) if len(sys.argv) > 2 else None
settings = load.LoadSettings(ctx=256, threads=1, repack=repack)
with load.open_model(sys.argv[1], settings) as loaded:
    prompt = loaded.engine.tokenize("The capital of France is", add_bos=True)
    stream = loaded.engine.stream(prompt, sampling=Sampling(temperature=0), max_tokens=24,
                                  ignore_eos=True)
    tokens = [c.token for c in stream if hasattr(c, "token") and c.token >= 0]
print(json.dumps({"tokens": tokens, "repack": loaded.config.repack, "amx": amx().kernels}))
"""


def _greedy(path: Path, *, env: dict[str, str] | None = None, repack: bool | None = None) -> dict:
    args = [str(path)] + ([] if repack is None else ["on" if repack else "off"])
    code = f"import sys; sys.argv = ['greedy', *{args!r}]\n" + _GREEDY
    done = _child(code, env)
    assert done.returncode == 0, _died(done, "a greedy decode")
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_greedy_tokens_equal_a_build_without_amx_kernels(q4_k_m: Path) -> None:
    """localmix's default on this host against the same llama.cpp built with -mno-amx-*
    (benchmarks/llamacpp_tools.py, loaded through LLAMA_CPP_LIB_PATH), same file, prompt, greedy."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import llamacpp_tools
    finally:
        sys.path.pop(0)
    reference_libs = llamacpp_tools.build(tools=("llama",))
    ours = _greedy(q4_k_m)
    theirs = _greedy(q4_k_m, env={"LLAMA_CPP_LIB_PATH": str(reference_libs)}, repack=ours["repack"])
    assert theirs["amx"] is False  # the reference really has no AMX kernels
    assert len(ours["tokens"]) == 24
    assert ours["tokens"] == theirs["tokens"]


def test_bench_sweeps_repack_like_llama_bench(
    q4_k_m: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_cli(
        capsys, "bench", str(q4_k_m), "-p", "0", "-n", "4", "-r", "1", "-t", "1",
        "--repack", "0,1", "--no-save", "-o", "jsonl",
    )  # fmt: skip
    assert result.code == 0, result.err
    rows = [json.loads(line) for line in result.out.splitlines()]
    assert [row["repack"] for row in rows] == [False, True]
    table = run_cli(capsys, "bench", str(q4_k_m), "-p", "0", "-n", "4", "-r", "1", "-t", "1",
                    "--repack", "0", "--no-save")  # fmt: skip
    assert table.code == 0 and "rpk" in table.out
    bad = run_cli(capsys, "bench", str(q4_k_m), "--repack", "2")
    assert bad.code != 0 and "--repack" in bad.err and "Traceback" not in bad.err


def test_doctor_says_what_it_does_about_amx(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "doctor")
    assert result.code == 0
    assert "AMX" in result.out and "repacking" in result.out
    assert ("on:" if load.weight_repack() else "off:") in result.out
    data = json.loads(run_cli(capsys, "doctor", "--json").out)
    assert data["amx"] == {"kernels": hardware.amx().kernels, "cpu": hardware.amx().cpu,
                           "buffer": hardware.amx().buffer}  # fmt: skip
    assert data["repack"]["on"] is load.weight_repack()
