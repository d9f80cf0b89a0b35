"""The local model store: one manifest per model and quant, written last and atomically.

Layout under settings.home():
    models/<slug>/<QUANT>.gguf      files localmix owns (converted, quantized, copied)
    models/<slug>/imatrix.gguf      the model's importance matrix, if computed (`localmix imatrix`)
    manifests/<slug>/<QUANT>.json   a model exists once (and only while) its manifest exists
    locks/<slug>.lock               one lock per model name (and per HF cache repo being
                                    downloaded into: hf-models--ORG--NAME.lock, models/hubfetch.py)
    tmp/                            partial outputs, renamed into place when complete
A manifest may also point at a file localmix does not own (`import` by reference, a GGUF in the
shared Hugging Face cache); `rm` deletes only what localmix owns.

Manifests store paths relative to the home for files inside it and absolute paths for files
outside it, so a store that is copied or moved points at its own files; in memory (Manifest.path)
every path is absolute. Version-1 manifests (absolute paths everywhere) are migrated on read.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from localmix import disk, settings
from localmix.errors import LocalmixError, ModelNotFound, UsageError
from localmix.models import tags

if TYPE_CHECKING:
    from localmix.gguffile import GGUFInfo

# 2: paths inside the home are stored relative to it (1: absolute).
MANIFEST_VERSION = 2
# Preferred quant when a name is given without one and several exist.
_QUANT_PREFERENCE = ("Q4_K_M", "Q5_K_M", "Q4_K_S", "Q6_K", "Q8_0", "F16", "BF16", "F32")


@dataclass(frozen=True)
class Manifest:
    """A model in the store."""

    name: str
    quant: str
    path: str  # the GGUF file (the first shard of a split GGUF)
    size: int  # bytes, all shards
    sha256: str
    architecture: str
    chat_format: str | None
    context_length: int
    parameters: int
    source: str  # e.g. "hf:org/repo@revision", "path:/x.gguf", "synth:tiny-mistral"
    created: float
    owned: bool = True  # localmix made or copied the file(s) and may delete them
    extra_files: tuple[str, ...] = ()  # further shards
    hub_files: tuple[
        str, ...
    ] = ()  # files in the HF cache this model came from (for --purge-cache)
    mmproj: str | None = None  # a vision model's vision tower (its mmproj GGUF), by path
    version: int = MANIFEST_VERSION

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.quant}"

    @property
    def file(self) -> Path:
        return Path(self.path)

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data["extra_files"] = list(self.extra_files)
        data["hub_files"] = list(self.hub_files)
        return data

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Manifest:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for key in ("extra_files", "hub_files"):
            values[key] = tuple(values.get(key, ()) or ())  # type: ignore[arg-type]
        return cls(**values)  # type: ignore[arg-type]


def manifest_of(
    path: Path,
    info: GGUFInfo,
    *,
    name: str,
    source: str,
    owned: bool,
    quant: str | None = None,
    chat_format: str | None = None,
    sha256: str | None = None,
    hub_files: tuple[str, ...] = (),
) -> Manifest:
    """The one way to describe a GGUF as a store model: every fact from its header (the
    architecture is the file's own, `llama` for a Mixtral as llama.cpp writes it; the quant the
    file's unless a name says otherwise), the chat format given or detected from its tokenizer,
    the sha256 computed unless known, its further shards from the header's split count."""
    return Manifest(
        name=name,
        quant=(quant or info.quant).upper(),
        path=str(path),
        size=info.file_size,
        sha256=sha256 or sha256_file(path),
        architecture=info.architecture,
        chat_format=chat_format or chat_format_of(info),
        context_length=info.context_length,
        parameters=info.n_params,
        source=source,
        created=time.time(),
        owned=owned,
        extra_files=tuple(str(p) for p in info.files[1:]),
        hub_files=hub_files,
    )


def chat_format_of(info: GGUFInfo) -> str | None:
    """The Mistral chat format a GGUF's tokenizer points to (None: its own template decides)."""
    from localmix.chat import template

    return template.detect(info.metadata)


def slug(name: str) -> str:
    """A file-system-safe directory name for a model name (`mistral:v0.3` -> `mistral-v0.3`)."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", name.strip()).strip("-.")
    if not text:
        raise UsageError(
            f"{name!r} is not a usable model name", hint="use letters, digits, - _ . and :"
        )
    return text


def model_dir(name: str) -> Path:
    return settings.models_dir() / slug(name)


def model_path(name: str, quant: str) -> Path:
    """Where localmix keeps its own GGUF for a model and quant."""
    return model_dir(name) / f"{quant.upper()}.gguf"


def imatrix_path(name: str) -> Path:
    """Where a model's importance matrix lives (`localmix imatrix`), one for all its quants."""
    return model_dir(name) / "imatrix.gguf"


def _manifest_path(name: str, quant: str) -> Path:
    return settings.manifests_dir() / slug(name) / f"{quant.upper()}.json"


# Locks this thread holds (slug -> depth): flock is per open file, so taking the same lock twice
# in one process would deadlock; holding it across check, work and register needs re-entry.
_held = threading.local()


@contextlib.contextmanager
def lock(name: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the per-model lock (blocks while another localmix process holds it; on_wait is called
    once first when it has to). Re-entrant within a thread."""
    key = slug(name)
    depth: dict[str, int] = _held.__dict__.setdefault("depth", {})
    if depth.get(key):
        depth[key] += 1
        try:
            yield
        finally:
            depth[key] -= 1
        return
    path = disk.ensure_dir(settings.home() / "locks") / f"{key}.lock"
    with disk.file_lock(path, on_wait):
        depth[key] = 1
        try:
            yield
        finally:
            depth[key] = 0


def tmp_file(suffix: str = ".gguf") -> contextlib.AbstractContextManager[Path]:
    """A fresh path in the store's tmp/, removed at the end unless `add` moved it into place."""
    return disk.scratch(settings.tmp_dir(), "model" + suffix)


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    """Hex sha256 of a file, reading 8 MiB at a time; progress(bytes) after each block."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(8 << 20):
            digest.update(block)
            if progress:
                progress(len(block))
    return digest.hexdigest()


def add(manifest: Manifest, src: Path | None = None) -> Manifest:
    """Register a model: move `src` (if given) to its place in models/, then write the manifest.

    The manifest is written last, so an interruption before it leaves no half-registered model.
    """
    with lock(manifest.name):
        _check_folder_owner(manifest.name)
        if src is not None:
            dest = model_path(manifest.name, manifest.quant)
            disk.ensure_dir(dest.parent)
            disk.publish(src, dest)
            manifest = _replace(manifest, path=str(dest), owned=True)
        disk.write_text(
            _manifest_path(manifest.name, manifest.quant),
            json.dumps(_encode(manifest), indent=2) + "\n",
        )
    return manifest


def _check_folder_owner(name: str) -> None:
    """Two names can share one folder (`a/b` and `a-b` are both `a-b` on disk); the second would
    overwrite the first's manifests. The first name keeps the folder; the second is refused."""
    folder = settings.manifests_dir() / slug(name)
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        try:
            owner = json.loads(path.read_text(encoding="utf-8")).get("name")
        except (OSError, ValueError, AttributeError):
            continue  # unreadable: list_models reports it; it claims no name
        if isinstance(owner, str) and owner != name:
            raise UsageError(
                f"{name!r} would share its store folder with {owner!r} ({slug(name)})",
                hint=f"choose another name with --name, or remove {owner} first with `localmix rm`",
            )
        return


def _inside(path: Path, root: Path) -> Path | None:
    """path relative to root when it lies inside root (as written, or once links are resolved)."""
    for base, target in ((root, path), (root.resolve(), path.resolve())):
        with contextlib.suppress(ValueError):
            relative = target.relative_to(base)
            if ".." not in relative.parts:
                return relative
    return None


def _to_disk(path: str) -> str:
    """A path as a manifest stores it: relative to the home for a file inside it (so a copy of
    the store points at its own copy), absolute for a file registered by reference."""
    relative = _inside(Path(path), settings.home())
    return relative.as_posix() if relative is not None else path


def _encode(manifest: Manifest) -> dict[str, object]:
    data = manifest.to_json()
    data["path"] = _to_disk(manifest.path)
    data["extra_files"] = [_to_disk(p) for p in manifest.extra_files]
    data["hub_files"] = [_to_disk(p) for p in manifest.hub_files]
    data["version"] = MANIFEST_VERSION
    return data


def _moved_here(path: Path) -> Path | None:
    """For an absolute `.../models/<slug>/<QUANT>.gguf` of another home (a version-1 manifest
    copied or moved with its store), the same file under this home, if it is there."""
    if len(path.parts) < 3 or path.parts[-3] != "models":
        return None
    local = settings.models_dir() / path.parts[-2] / path.parts[-1]
    return local if local.is_file() else None


def _decode(data: dict[str, object]) -> Manifest:
    """A manifest as read from disk, with every path absolute, migrated from version 1."""
    manifest = Manifest.from_json(data)
    home = settings.home()

    def absolute(text: str) -> str:
        path = Path(text)
        return str(path if path.is_absolute() else home / path)

    manifest = _replace(
        manifest,
        path=absolute(manifest.path),
        extra_files=tuple(absolute(p) for p in manifest.extra_files),
        hub_files=tuple(absolute(p) for p in manifest.hub_files),
    )
    if manifest.owned and _inside(manifest.file, home) is None:
        # An owned file outside this home belongs to the store this one was copied or moved
        # from: use this store's own copy, or else refer to it without ever deleting it.
        files = [Path(p) for p in (manifest.path, *manifest.extra_files)]
        local = [_moved_here(p) for p in files]
        if all(local):
            manifest = _replace(
                manifest,
                path=str(local[0]),
                extra_files=tuple(str(p) for p in local[1:]),
            )
        else:
            manifest = _replace(manifest, owned=False)
    return manifest


def _replace(manifest: Manifest, **changes: object) -> Manifest:
    import dataclasses

    return dataclasses.replace(manifest, **changes)  # type: ignore[arg-type]


def list_models() -> list[Manifest]:
    """Every registered model, sorted by name then quant; unreadable manifests are skipped."""
    root = settings.manifests_dir()
    found: list[Manifest] = []
    if not root.is_dir():
        return found
    for path in sorted(root.glob("*/*.json")):
        try:
            found.append(_decode(json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError, TypeError):
            continue  # a damaged manifest hides one model, it must not break `list`
    return sorted(found, key=lambda m: (m.name, m.quant))


def find(reference: str) -> list[Manifest]:
    """All manifests a reference names: every quant of a name, or the one quant asked for."""
    name, quant = tags.split(reference)
    models = list_models()
    matches = [m for m in models if m.name == name and (quant is None or m.quant == quant)]
    if not matches:
        # The string that pulled a model names it too: an alias, `hf.co/ORG/REPO:QUANT` or
        # `ORG/REPO` resolve (offline) to the store name the pull gave it.
        name, quant = _pulled_name(reference) or (name, quant)
        matches = [m for m in models if m.name == name and (quant is None or m.quant == quant)]
    return matches


def _pulled_name(reference: str) -> tuple[str, str | None] | None:
    """The (store name, quant) a pull of this reference registers; None for a path or unknown."""
    from localmix.models import catalog

    try:
        ref = catalog.resolve(reference)
    except LocalmixError:
        return None
    if ref.kind is catalog.RefKind.PATH:
        return None
    return ref.name, ref.quant


def _not_a_file(reference: str) -> None:
    """A reference written as a path to a folder gets said so, not "pull it"."""
    from localmix.errors import InvalidGGUF

    looks_like_path = reference.startswith((".", "/", "~")) or os.sep in reference
    if looks_like_path and not reference.startswith("hf.co/"):
        path = Path(reference).expanduser()
        if path.is_dir():
            raise InvalidGGUF(
                f"{reference}: is a directory, not a GGUF file",
                hint="give the path of a .gguf file (`localmix convert` makes one from a checkpoint)",
            )


def get(reference: str) -> Manifest:
    """The model a reference names; with no quant, the preferred one of those present."""
    matches = find(reference)
    if not matches:
        _not_a_file(reference)
        names = sorted({m.name for m in list_models()})
        hint = f"pull it with `localmix pull {reference}`" + (
            f"; installed: {', '.join(names)}" if names else ""
        )
        raise ModelNotFound(f"model {reference!r} is not in the store", hint=hint)
    if len(matches) == 1:
        return matches[0]
    rank = {q: i for i, q in enumerate(_QUANT_PREFERENCE)}
    return min(matches, key=lambda m: (rank.get(m.quant, len(rank)), -m.created))


def remove(reference: str, on_wait: Callable[[], None] | None = None) -> list[Manifest]:
    """Unregister a model (all quants unless one is named) and delete the files localmix owns.

    Each name's manifests are looked up again under its lock, so a quantize or pull of that
    model still running when `rm` started is waited for and removed too (on_wait: when it has to).
    """
    names = sorted({m.name for m in find(reference)})
    if not names:
        raise ModelNotFound(f"model {reference!r} is not in the store", hint="see `localmix list`")
    _, quant = tags.split(reference)
    removed: list[Manifest] = []
    for name in names:
        with lock(name, on_wait):
            for manifest in find(f"{name}:{quant}" if quant else name):
                if manifest.name == name:
                    _unregister(manifest)
                    removed.append(manifest)
            if not any(m.name == name for m in list_models()):  # its imatrix goes with the last
                with contextlib.suppress(FileNotFoundError):
                    imatrix_path(name).unlink()
        for folder in (model_dir(name), _manifest_path(name, "x").parent):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
    return removed


def _unregister(manifest: Manifest) -> None:
    """Delete a manifest, then the files localmix owns: only ever files under this models/."""
    # Manifest first: a model half-deleted is a model gone, never a model broken.
    with contextlib.suppress(FileNotFoundError):
        _manifest_path(manifest.name, manifest.quant).unlink()
    if not manifest.owned:
        return
    models = settings.models_dir().resolve()
    for file in (manifest.path, *manifest.extra_files):
        if not Path(file).resolve().is_relative_to(models):
            continue  # not this store's file (another store's, or one registered by reference)
        with contextlib.suppress(FileNotFoundError):
            Path(file).unlink()


@dataclass(frozen=True)
class Usage:
    """Disk use of the store, bytes."""

    models: list[tuple[str, int, bool]] = field(default_factory=list)  # (ref, bytes, owned)
    owned_bytes: int = 0
    referenced_bytes: int = 0
    tmp_bytes: int = 0
    free_bytes: int = 0


def _tree_size(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def du() -> Usage:
    """How much disk the store uses: owned files, referenced files, leftovers in tmp/."""
    rows: list[tuple[str, int, bool]] = []
    owned = referenced = 0
    for m in list_models():
        size = sum(Path(f).stat().st_size for f in (m.path, *m.extra_files) if Path(f).exists())
        rows.append((m.ref, size, m.owned))
        if m.owned:
            owned += size
        else:
            referenced += size
    for name in sorted({m.name for m in list_models()}):  # `localmix imatrix` output: ours too
        matrix = imatrix_path(name)
        if matrix.is_file():
            rows.append((f"{name} imatrix", matrix.stat().st_size, True))
            owned += matrix.stat().st_size
    home = settings.home()
    free = shutil.disk_usage(
        home if home.exists() else home.parent if home.parent.exists() else Path.home()
    ).free
    return Usage(rows, owned, referenced, _tree_size(settings.tmp_dir()), free)


def clean_tmp() -> int:
    """Remove leftovers in tmp/ of work whose process is gone (killed); returns bytes freed.
    A file of a process still running (another pull or convert) is left alone."""
    root = settings.tmp_dir()
    return disk.remove_stale(root.iterdir()) if root.is_dir() else 0


@dataclass(frozen=True)
class Shown:
    """What `show` says about a model: its manifest (for a file outside the store, one described
    on the spot and not registered) and its header."""

    manifest: Manifest
    info: GGUFInfo

    def to_json(self) -> dict[str, object]:
        info = self.info
        return {
            "manifest": self.manifest.to_json(),
            "architecture": info.architecture,
            "parameters": info.n_params,
            "context_length": info.context_length,
            "block_count": info.block_count,
            "expert_count": info.expert_count,
            "file_size": info.file_size,
            "quant": info.quant,
            "tensor_types": info.type_histogram(),
        }


def show(reference: str) -> Shown:
    """A store model, or a GGUF file anywhere (validated, not registered), with its header."""
    from localmix import gguffile

    if Path(reference).expanduser().suffix == ".gguf" or Path(reference).expanduser().is_file():
        target = locate(reference)
        manifest = manifest_of(
            target.path,
            target.info,
            name=target.path.name,
            sha256="(not computed for a file outside the store)",
            source=f"path:{target.path}",
            owned=False,
        )
        return Shown(manifest, target.info)
    manifest = get(reference)
    return Shown(manifest, gguffile.inspect(manifest.file))


@dataclass(frozen=True)
class Located:
    """A model a command can load: its file, the name to show, chat format, trained context."""

    path: Path
    name: str
    chat_format: str | None
    context_length: int
    mmproj: Path | None = None  # the vision tower the store keeps with it

    @functools.cached_property
    def info(self) -> GGUFInfo:
        """The file's GGUF header, read once however many callers (plan, engine) ask."""
        from localmix import gguffile

        return gguffile.inspect(self.path)


def locate(reference: str) -> Located:
    """A store reference (mistral, tiny-mixtral:Q4_K_M) or a path to a .gguf file."""
    candidate = Path(reference).expanduser()
    if candidate.suffix == ".gguf" or candidate.is_file():
        if not candidate.is_file():
            raise ModelNotFound(
                f"{candidate}: no such file",
                hint="give a .gguf path or a name from `localmix list`",
            )
        from localmix import gguffile

        info = gguffile.inspect(candidate)  # a damaged or foreign file fails here, clearly
        located = Located(candidate, candidate.name, None, info.context_length or 0)
        located.__dict__["info"] = info  # already read: the plan reuses it
        return located
    manifest = get(reference)
    mmproj = Path(manifest.mmproj) if manifest.mmproj else None
    return Located(
        manifest.file, manifest.ref, manifest.chat_format, manifest.context_length, mmproj
    )
