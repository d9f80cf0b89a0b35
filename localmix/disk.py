"""Writing files so that nothing half-written ever becomes a model, a manifest, an importance matrix
or a saved chat: one staged-write rule, one name for partial files, their cleanup after a killed
process, and the free-space check that runs before long writes.

The rule: write to a partial file, fsync it, rename it onto the final name, fsync the folder (so
the rename itself survives a power cut). A partial file is named `.NAME.PID.HEX.partial`: hidden,
the process that writes it (so a cleanup never removes a file another process is still writing),
and unique within that process. It sits beside its final file unless the caller asks for another
folder (the store's tmp/); a rename across file systems copies beside the final file first, so
the last step is always an atomic rename.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from localmix.errors import DiskSpaceError, OutputError

_PARTIAL = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.partial$")
# Room left beyond what a write needs: file-system metadata, a GGUF's alignment padding.
_SLACK = 64 * 2**20


def partial_path(final: Path, directory: Path | None = None) -> Path:
    """A fresh partial-file name for `final`, in `directory` (default: beside it)."""
    folder = directory if directory is not None else final.parent
    return folder / f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"


def writer_pid(path: Path) -> int | None:
    """The process that is (or was) writing a partial file; None for any other file."""
    match = _PARTIAL.match(path.name)
    return int(match["pid"]) if match else None


def partials_of(final: Path) -> list[Path]:
    """Partial files beside `final` that were meant to become it."""
    folder = final.parent if str(final.parent) else Path(".")
    if not folder.is_dir():
        return []
    found = (_PARTIAL.match(p.name) for p in folder.iterdir())
    return sorted(folder / m.string for m in found if m and m["name"] == final.name)


def ensure_dir(path: Path) -> Path:
    """Make a folder (and its parents); an OSError becomes one OutputError naming it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"cannot create {path}: {exc.strerror or exc}", hint="check LOCALMIX_HOME"
        ) from None
    return path


@contextlib.contextmanager
def staged(final: Path, directory: Path | None = None) -> Iterator[Path]:
    """Yield a partial path to write; when the block ends without an error, publish it as
    `final` (fsync, rename, fsync the folder). On any error, or if the block wrote nothing,
    the partial file is removed and `final` is untouched."""
    partial = partial_path(final, ensure_dir(directory if directory is not None else final.parent))
    try:
        yield partial
        if partial.exists():
            publish(partial, final)
    finally:
        with contextlib.suppress(OSError):
            partial.unlink()


@contextlib.contextmanager
def scratch(directory: Path, name: str) -> Iterator[Path]:
    """A fresh partial-file path in `directory` for work that another step publishes (the
    store moves it into place); removed at the end if it is still there."""
    path = partial_path(Path(name), ensure_dir(directory))
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


def publish(partial: Path, final: Path) -> None:
    """Make a complete partial file `final`: durable first, then one atomic rename."""
    _fsync_file(partial)
    try:
        os.replace(partial, final)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise OutputError(f"cannot write {final}: {exc.strerror or exc}") from None
        _copy_then_rename(partial, final)
    _fsync_dir(final.parent)


def _copy_then_rename(partial: Path, final: Path) -> None:
    """Across file systems: a copy beside `final`, made durable, then the atomic rename."""
    beside = partial_path(final)
    try:
        shutil.copyfile(partial, beside)
        _fsync_file(beside)
        os.replace(beside, final)
    except OSError as exc:
        raise OutputError(f"cannot write {final}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            beside.unlink()
        with contextlib.suppress(OSError):
            partial.unlink()


def write_text(path: Path, text: str) -> None:
    """Write a text file so that readers see the old or the new content, never half of it."""
    with staged(path) as partial:
        partial.write_text(text, encoding="utf-8")


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform lets a folder be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def file_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created if missing) against other processes;
    blocks while another holds it, calling on_wait once first. Not re-entrant: flock is per
    open file, so a second hold in one process waits for itself."""
    with open(path, "a+") as handle:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locks; single user
            yield
            return
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait:
                on_wait()
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (ours counts as gone: its own old leftovers)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, and belongs to another user
    return True


def remove_stale(paths: Iterable[Path], *, keep_unnamed: bool = False) -> int:
    """Remove the files among `paths` whose writer is gone (killed mid-write); bytes freed.
    A file whose writer still runs is left alone; one with no writer in its name is removed
    unless keep_unnamed."""
    freed = 0
    for path in paths:
        pid = writer_pid(path)
        if (pid is None and keep_unnamed) or (pid is not None and pid_alive(pid)):
            continue
        with contextlib.suppress(OSError):
            if path.is_file():
                size = path.stat().st_size
                path.unlink()
                freed += size
    return freed


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_space(needs: dict[Path, tuple[int, str]]) -> None:
    """Refuse (DiskSpaceError, with the numbers) when a file system lacks the bytes asked of it.

    `needs` maps a folder to (bytes, what for); folders on one file system add up.
    """
    from localmix.sizes import human_size

    by_device: dict[int, list[tuple[Path, int, str]]] = {}
    for folder, (n_bytes, why) in needs.items():
        if n_bytes <= 0:
            continue
        existing = _nearest_existing(folder)
        by_device.setdefault(existing.stat().st_dev, []).append((existing, n_bytes, why))
    for items in by_device.values():
        total = sum(n for _, n, _ in items) + _SLACK
        free = shutil.disk_usage(items[0][0]).free
        if total > free:
            parts = " + ".join(f"{human_size(n)} {why}" for _, n, why in items)
            where = ", ".join(sorted({str(p) for p, _, _ in items}))
            raise DiskSpaceError(
                f"not enough disk space: need {human_size(total - _SLACK)} ({parts}) on "
                f"{where}, {human_size(free)} free",
                hint="free some space (`localmix du`, `localmix rm`), or point HF_HOME / "
                "LOCALMIX_HOME or the output elsewhere",
            )
