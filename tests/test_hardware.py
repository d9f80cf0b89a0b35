"""`localmix doctor`: the machine and the llama.cpp build, probed for real."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from localmix.errors import UsageError
from localmix.llama import hardware, lib
from localmix.llama.offload import GIB
from tests.cli_run import run_cli


@pytest.fixture(scope="module")
def machine() -> hardware.Hardware:
    return hardware.probe()


def test_probe_returns_sane_values(machine: hardware.Hardware) -> None:
    assert "CPU" in machine.backends
    cpu = next(d for d in machine.devices if d.kind == "cpu")
    assert cpu.buffer_type == "CPU" and cpu.total_bytes > 0
    assert 1 <= machine.threads_physical <= machine.threads_logical
    assert 0 < machine.ram_available <= machine.ram_total
    assert machine.bandwidth_gbs > 0
    assert machine.system_info.startswith("CPU")
    if not machine.gpus:
        assert not machine.gpu_offload


def test_probe_is_json_serializable(machine: hardware.Hardware) -> None:
    from localmix.cli.render import _plain

    text = json.dumps(_plain(machine))
    assert json.loads(text)["devices"][0]["name"]


@pytest.mark.parametrize(
    ("gpu", "backends", "flag"),
    [("nvidia", ("CPU",), "CUDA"), ("apple", ("CPU",), "METAL"), ("nvidia", ("CUDA", "CPU"), None)],
)
def test_rebuild_command_names_the_missing_backend(
    gpu: str, backends: tuple[str, ...], flag: str | None
) -> None:
    command = hardware.rebuild_command(gpu, backends)
    if flag is None:
        assert command is None
    else:
        assert command == (
            f'CMAKE_ARGS="-DGGML_{flag}=on" pip install --force-reinstall --no-cache-dir '
            "llama-cpp-python==0.3.36"
        )


def test_no_gpu_no_rebuild_command() -> None:
    assert hardware.rebuild_command(None, ("CPU",)) is None


@pytest.mark.parametrize(
    ("ram_gib", "share"), [(16, 2 / 3), (32, 2 / 3), (64, 3 / 4), (128, 3 / 4)]
)
def test_apple_working_set(ram_gib: int, share: float) -> None:
    assert hardware.recommended_working_set(ram_gib * GIB) == pytest.approx(ram_gib * GIB * share)


def test_cpu_buffer_type_is_known() -> None:
    assert "CPU" in lib.buffer_type_names()


@pytest.mark.parametrize(
    ("override", "needle"),
    [(("blk\\.0\\.ffn_up_exps", "NoSuchGPU"), "unknown buffer type"), (("blk.(", "CPU"), "regex")],
)
def test_bad_tensor_overrides_are_refused(override: tuple[str, str], needle: str) -> None:
    params = SimpleNamespace(tensor_buft_overrides=None)  # refused before it is touched
    with pytest.raises(UsageError, match=needle):
        lib.apply_tensor_overrides(params, [override])


def test_doctor_json(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "doctor", "--json")
    assert result.code == 0
    report = json.loads(result.out)
    assert report["backends"] and report["ram_total"] > 0


def test_doctor_table(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "doctor")
    assert result.code == 0
    assert "backends" in result.out and "bandwidth" in result.out
