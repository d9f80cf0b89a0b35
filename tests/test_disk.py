"""Staged writes: a file appears complete or not at all, partial files name their writer, and
a cleanup removes only what a dead process left."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from localmix import disk
from localmix.errors import DiskSpaceError


def _dead_pid() -> int:
    out = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return int(out)


def test_a_staged_file_appears_only_when_the_block_succeeds(tmp_path: Path) -> None:
    final = tmp_path / "m.gguf"
    final.write_text("old")
    with pytest.raises(RuntimeError), disk.staged(final) as partial:
        partial.write_text("half")
        assert partial.parent == tmp_path and disk.writer_pid(partial) == os.getpid()
        raise RuntimeError("killed mid-write")
    assert final.read_text() == "old" and list(tmp_path.iterdir()) == [final]
    with disk.staged(final) as partial:
        partial.write_text("new")
        assert final.read_text() == "old"  # readers never see the new file half-written
    assert final.read_text() == "new" and list(tmp_path.iterdir()) == [final]


def test_a_partial_in_another_folder_is_published_onto_the_final_name(tmp_path: Path) -> None:
    (tmp_path / "tmp").mkdir()
    final = tmp_path / "out" / "m.gguf"
    final.parent.mkdir()
    with disk.staged(final, directory=tmp_path / "tmp") as partial:
        assert partial.parent == tmp_path / "tmp"
        partial.write_bytes(b"gguf")
    assert final.read_bytes() == b"gguf" and not any((tmp_path / "tmp").iterdir())


def test_one_naming_scheme_and_only_dead_writers_are_cleaned(tmp_path: Path) -> None:
    final = tmp_path / "m.Q4_K_M.gguf"
    mine = disk.partial_path(final)
    assert mine.name.startswith(".m.Q4_K_M.gguf.") and mine.name.endswith(".partial")
    dead = tmp_path / f".m.Q4_K_M.gguf.{_dead_pid()}.0a1b2c3d.partial"
    live = tmp_path / ".m.Q4_K_M.gguf.1.0a1b2c3d.partial"  # pid 1 always runs
    other = tmp_path / ".other.gguf.1.0a1b2c3d.partial"
    for path in (dead, live, other):
        path.write_bytes(b"half")
    assert disk.partials_of(final) == sorted([dead, live])
    assert disk.remove_stale(disk.partials_of(final)) == 4
    assert not dead.exists() and live.exists() and other.exists()


def test_write_text_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "manifest.json"
    disk.write_text(path, "{}\n")
    disk.write_text(path, '{"a": 1}\n')
    assert path.read_text() == '{"a": 1}\n' and list(path.parent.iterdir()) == [path]


def test_space_on_one_file_system_adds_up(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    with pytest.raises(DiskSpaceError) as info:
        disk.check_space({tmp_path / "a": (1 << 60, "download"), tmp_path / "b": (1 << 30, "x")})
    assert "need 1024.0 PiB (1024.0 PiB download + 1.0 GiB x)" in info.value.message
    disk.check_space({tmp_path: (1, "a byte")})  # fits: no error
