"""Real OS errors, not simulated ones: a store whose folders cannot be made (a regular file where
LOCALMIX_HOME/models or /tmp should be: ENOTDIR stops root too, where chmod would not) during
import, quantize, synth and rm; and a real ENOSPC from /dev/full through the mapping."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from localmix.errors import DiskSpaceError, OutputError, from_os_error
from tests.cli_run import Result, run_cli


def _one_error(result: Result) -> None:
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert result.code != 0
    assert "Traceback" not in result.err and "internal error" not in result.err, result.err
    assert lines[-2].startswith("error: ") and lines[-1].startswith("hint: "), result.err


def _leftovers(home: Path) -> list[Path]:
    return [
        p for p in home.rglob("*") if p.is_file() and (".partial" in p.name or p.suffix == ".json")
    ]


@pytest.mark.parametrize("blocked", ["models", "tmp"])
def test_import_copy_into_a_blocked_store(
    blocked: str,
    localmix_home: Path,
    tiny_mistral_gguf_f16: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    localmix_home.mkdir(parents=True)
    (localmix_home / blocked).write_text("a file where a folder belongs")
    result = run_cli(capsys, "import", str(tiny_mistral_gguf_f16), "--copy", "-n", "t")
    _one_error(result)
    assert result.code == 12
    assert _leftovers(localmix_home) == []
    assert run_cli(capsys, "list").out.strip() == ""


def test_quantize_a_store_model_into_a_blocked_store(
    localmix_home: Path, tiny_mistral_gguf_f16: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(capsys, "import", str(tiny_mistral_gguf_f16), "-n", "t").code == 0
    (localmix_home / "tmp").write_text("a file where a folder belongs")
    result = run_cli(capsys, "quantize", "t", "-q", "Q8_0", "-t", "1")
    _one_error(result)
    assert [m for m in run_cli(capsys, "list", "--json").out.split('"quant"') if "Q8_0" in m] == []


def test_rm_with_the_manifests_folder_gone_read_only(
    localmix_home: Path, tiny_mistral_gguf_f16: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """rm cannot delete a manifest in a folder that is not writable: one line, the model stays.
    chmod does not stop root, so the test is skipped there."""
    if os.geteuid() == 0:
        pytest.skip("root ignores file modes; the ENOTDIR tests cover root")
    assert run_cli(capsys, "import", str(tiny_mistral_gguf_f16), "-n", "t").code == 0
    folder = localmix_home / "manifests" / "t"
    folder.chmod(0o500)
    try:
        _one_error(run_cli(capsys, "rm", "t"))
    finally:
        folder.chmod(0o700)
    assert "t" in run_cli(capsys, "list").out


def test_synth_under_a_file_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    result = run_cli(capsys, "synth", str(blocker / "deeper" / "ckpt"))
    _one_error(result)
    assert {p.name for p in tmp_path.iterdir()} <= {"blocker", "localmix-home"}


def test_synth_into_a_new_folder_is_all_or_nothing(tmp_path: Path) -> None:
    from localmix.build.synth import checkpoints as synth

    out = synth.checkpoint(tmp_path / "a" / "b" / "ckpt", seed=0)
    assert (out / "config.json").is_file()
    assert not [p for p in tmp_path.rglob("*.partial")]


def test_a_real_full_disk_maps_to_disk_space_error() -> None:
    """/dev/full answers every write with ENOSPC: the OSError is the kernel's own."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    with pytest.raises(OSError) as caught, open("/dev/full", "wb") as handle:
        handle.write(b"x" * 4096)
        handle.flush()
    assert caught.value.errno == errno.ENOSPC
    error = from_os_error(caught.value, "writing the model")
    assert isinstance(error, DiskSpaceError) and error.exit_code == 9
    assert "no space left" in error.message and error.hint


def test_a_real_enotdir_and_eio_map_with_a_hint(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(OSError) as caught:
        (blocker / "x").write_text("x")
    error = from_os_error(caught.value, "writing")
    assert isinstance(error, OutputError) and error.hint and str(blocker) in error.message
    # an errno with no family of its own still reads as a sentence, with no dangling colon
    other = from_os_error(OSError(errno.EIO, os.strerror(errno.EIO)), "writing")
    assert not other.message.endswith(":") and other.hint
