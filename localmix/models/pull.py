"""The pull journey: catalog.resolve -> hub.download -> (checkpoint: convert -> quantize) -> store.add;
and `import` of a GGUF already on disk.

A GGUF from the Hub is registered where it lies in the shared HF cache (owned=False, no copy);
a converted model is localmix's own file. Space is checked before anything is downloaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from localmix import disk, settings
from localmix.errors import ModelNotFound, OfflineMiss, UsageError
from localmix.models import catalog, hub, repofiles, store, tags
from localmix.models.store import Manifest
from localmix.progress import OnProgress, Progress, ignore

if TYPE_CHECKING:
    from localmix.build.imatrix.files import Imatrix
    from localmix.gguffile import GGUFInfo

# Output types convert writes directly (no quantize step).
_CONVERT_TYPES = ("F16", "BF16", "F32")
AUTO_IMATRIX = "auto"  # --imatrix auto: the model's own, computed from the converted checkpoint


@dataclass(frozen=True)
class _Plan:
    """Where a reference leads: which repo, which store name, and whether to convert."""

    name: str
    repo: str
    quant: str | None
    convert: bool
    chat_format: str | None = None
    preferred_file: str | None = None
    file_quant: str | None = None  # the tag the repo's file names carry for quant, if another


def _plan(reference: str, quant: str | None, from_source: bool) -> _Plan:
    ref = catalog.resolve(reference)
    quant = (quant or ref.quant or "").upper() or None
    if ref.kind is catalog.RefKind.PATH:
        raise UsageError(
            f"{reference!r} is a path: files on disk are imported, not pulled",
            hint=f"localmix import {reference}",
        )
    if ref.kind is catalog.RefKind.CATALOG:
        spec = ref.spec
        assert spec is not None
        quant = quant or spec.default_quant
        if from_source or not spec.gguf_repo:
            return _Plan(spec.name, spec.source, quant, True, spec.chat_format)
        tag = spec.file_quant(quant) if quant in spec.quant_files else None
        return _Plan(
            spec.name, spec.gguf_repo, quant, False, spec.chat_format, spec.gguf_file(quant), tag
        )
    assert ref.repo is not None
    if ref.kind is catalog.RefKind.HF_GGUF:
        if from_source:
            raise UsageError(
                "--from-source needs a checkpoint repo", hint="write ORG/REPO without hf.co/"
            )
        return _Plan(ref.name, ref.repo, quant, False)
    return _Plan(ref.name, ref.repo, quant, True)


def _check_quant_name(quant: str | None) -> None:
    """A quant that no GGUF file name could carry fails before the Hub is asked (an empty
    --quant, a typo like Q9_X would otherwise surface as a network or listing error)."""
    from localmix.build import quantize

    if quant is None:
        return
    if quant not in quantize.QUANT_TYPES and not tags.is_quant(quant):
        raise UsageError(
            f"{quant!r} is not a quantization type",
            hint="e.g. Q4_K_M, Q5_K_M, Q8_0 (`localmix quantize --help`)",
        )


def _existing(name: str, quant: str | None) -> Manifest | None:
    if quant is None:
        return None
    for manifest in store.find(f"{name}:{quant}"):
        if all(Path(p).exists() for p in (manifest.path, *manifest.extra_files)):
            return manifest
    return None


def pull(
    reference: str,
    *,
    quant: str | None = None,
    revision: str | None = None,
    from_source: bool = False,
    keep_source: bool = False,
    offline: bool = False,
    imatrix: Path | str | None = None,
    progress: OnProgress = ignore,
) -> Manifest:
    """Fetch a model (a ready GGUF, or a checkpoint converted and quantized here) into the store.
    imatrix, an importance-matrix file, guides the quantization of a converted checkpoint;
    "auto" computes the model's own from the converted file first (`localmix imatrix`).
    progress hears every stage: resolve, wait, download and verify (bytes), retry, convert,
    imatrix, quantize (tensors, chunks), register, done."""
    store.clean_tmp()  # leftovers of a pull, convert or quantize that was killed
    matrix: Imatrix | str | None = None
    if imatrix == AUTO_IMATRIX:
        matrix = AUTO_IMATRIX
    elif imatrix is not None:
        from localmix.build.imatrix import files as importance

        matrix = importance.load(imatrix)  # a bad file fails before any download
    ref = catalog.resolve(reference)
    if ref.spec is not None and ref.spec.synthetic:
        # Built-in synthetic models are built here, offline, not downloaded.
        from localmix.build.synth import builtin

        return builtin.build(
            ref.spec.name,
            (quant or ref.quant or ref.spec.default_quant).upper(),
            on_progress=progress,
        )
    if quant is not None and not quant.strip():
        raise UsageError("--quant is empty", hint="e.g. -q Q4_K_M, or leave it out for the default")
    plan = _plan(reference, quant, from_source)
    _check_quant_name(plan.quant)
    offline = offline or settings.offline()
    if not offline:
        settings.hf_endpoint()  # a garbage HF_ENDPOINT fails here, before anything is printed
    if revision is None and (found := _existing(plan.name, plan.quant)):
        progress(Progress("done", subject=found.ref, detail="already installed"))
        return found
    hub.check_repo(plan.repo)  # before anything is printed or becomes a path
    if revision is not None:
        hub.check_revision(revision)
    progress(Progress("resolve", subject=f"{plan.repo}@{revision or 'main'}"))
    listing = hub.repo_files(plan.repo, revision, offline=offline)
    if plan.convert and not _has_checkpoint(listing) and repofiles.gguf_quants(listing.names):
        if from_source:
            repofiles.checkpoint_files(listing.names)  # raises: a GGUF repo holds no checkpoint
        plan = dataclasses.replace(plan, convert=False)  # ORG/REPO named a GGUF repo
    if matrix is not None and not plan.convert:
        raise UsageError(
            f"--imatrix guides a quant made here, but {plan.repo} is pulled as a ready GGUF",
            hint="add --from-source to convert the original checkpoint and quantize it here",
        )
    # "Already there?" and the registration under one lock: a second pull of the model waits and
    # finds the first one's result; an `rm` of it waits for this pull to finish.
    with store.lock(plan.name, lambda: progress(Progress("wait", subject=plan.name))):
        if plan.convert:
            return _pull_checkpoint(plan, listing, keep_source, progress, matrix)
        return _pull_gguf(plan, listing, progress)


def _has_checkpoint(listing: hub.Listing) -> bool:
    try:
        repofiles.checkpoint_files(listing.names)
    except Exception:
        return False
    return True


def _offline_miss(exc: Exception, listing: hub.Listing) -> Exception:
    if not listing.cached:
        return exc
    hint = getattr(exc, "hint", None)
    return OfflineMiss(
        f"offline, and the Hugging Face cache lacks it: {exc}",
        hint=(hint + "; " if hint else "") + "cached quants only; run the pull online to fetch",
    )


def _pull_gguf(plan: _Plan, listing: hub.Listing, emit: OnProgress) -> Manifest:
    from localmix import gguffile

    try:
        quant, names = repofiles.choose_gguf(
            listing.names,
            plan.file_quant or plan.quant,
            repo=plan.repo,
            preferred=plan.preferred_file,
        )
    except ModelNotFound as exc:
        raise _offline_miss(exc, listing) from exc
    if plan.file_quant:
        quant = plan.quant or quant  # registered under the catalog's name (Q6_K, not Q6)
    if found := _existing(plan.name, quant):
        emit(Progress("done", subject=found.ref, detail="already installed"))
        return found
    disk.check_space({hub.cache_dir(): (hub.bytes_to_fetch(listing, names), "download")})
    download = hub.download(listing, names, progress=emit)
    first = download.files[0]
    info = gguffile.inspect(first.path)
    emit(Progress("register", subject=f"{plan.name}:{quant}"))
    manifest = store.manifest_of(
        first.path,
        info,
        name=plan.name,
        quant=quant,
        chat_format=plan.chat_format,
        sha256=first.sha256,
        source=f"hf:{listing.repo}@{listing.commit}",
        owned=False,
        hub_files=tuple(str(f.path) for f in download.files),
    )
    manifest = store.add(manifest)
    emit(Progress("done", subject=manifest.ref))
    return manifest


def _pull_checkpoint(
    plan: _Plan,
    listing: hub.Listing,
    keep_source: bool,
    emit: OnProgress,
    imatrix: Imatrix | str | None,
) -> Manifest:
    from localmix.build import quantize

    quant = (plan.quant or quantize.DEFAULT_TYPE).upper()
    if quant not in _CONVERT_TYPES:
        # an unknown type, or one that needs a missing imatrix, fails before any download
        quantize.quant_type(quant, imatrix=imatrix is not None)
    if found := _existing(plan.name, quant):
        emit(Progress("done", subject=found.ref, detail="already installed"))
        return found
    names = repofiles.checkpoint_files(listing.names)
    _check_convertible(plan, listing, names, emit)
    weights = sum(listing.file(n).size for n in names if n.endswith(".safetensors"))
    # Published checkpoints are 16-bit, so the f16 GGUF is about the size of the weights (an f32
    # checkpoint makes it half: the estimate errs on the safe side), and n_params = bytes / 2.
    intermediate = weights
    output = weights if quant in _CONVERT_TYPES else quantize.estimate_size(weights // 2, quant)
    disk.check_space(
        {
            hub.cache_dir(): (hub.bytes_to_fetch(listing, names), "download"),
            settings.tmp_dir(): (intermediate + output, "conversion and output"),
        }
    )
    download = hub.download(listing, names, progress=emit)
    manifest = _convert_and_quantize(plan, quant, download, keep_source, emit, imatrix)
    if not keep_source:
        hub.discard(download)  # the checkpoint served its purpose; files other tools had stay
    emit(Progress("done", subject=manifest.ref))
    return manifest


def _check_convertible(
    plan: _Plan, listing: hub.Listing, names: list[str], emit: OnProgress
) -> None:
    """Read the checkpoint's config first: a model localmix does not convert (Mistral Small 4,
    FP8 releases) is refused before gigabytes of weights come down, with the way to a GGUF."""
    from localmix.build.convert import check_config
    from localmix.errors import CheckpointError, LocalmixError

    config = next(n for n in names if n in ("config.json", "params.json"))
    download = hub.download(listing, [config], progress=emit)
    try:
        check_config(download.files[0].path)
    except CheckpointError as exc:
        try:
            spec = catalog.load().get(plan.name)
        except LocalmixError:
            spec = None  # ORG/REPO outside the catalog: the generic hint stands
        if spec is not None and spec.gguf_repo:
            # the catalog knows a ready GGUF of this model: name the exact command
            exc = CheckpointError(
                exc.message, hint=f"pull the ready GGUF: localmix pull {plan.name}"
            )
        raise exc from None


def _convert_and_quantize(
    plan: _Plan,
    quant: str,
    download: hub.Download,
    keep_source: bool,
    emit: OnProgress,
    imatrix: Imatrix | str | None = None,
) -> Manifest:
    from localmix.build import quantize
    from localmix.build.convert import convert

    source = f"hf:{download.repo}@{download.commit}"
    hub_files = tuple(str(f.path) for f in download.files) if keep_source else ()
    with store.tmp_file(".f16.gguf") as f16:
        outtype = quant if quant in _CONVERT_TYPES else "F16"
        convert(download.snapshot, f16, outtype=outtype.lower(), progress=emit)
        if quant in _CONVERT_TYPES:
            return _register_owned(plan, quant, f16, source, hub_files, emit)
        if imatrix == AUTO_IMATRIX:
            imatrix = _calibrate(plan, f16, emit)
        with store.tmp_file(".gguf") as out:
            quantize.quantize(f16, out, quant, progress=emit, imatrix=imatrix)
            manifest = _register_owned(plan, quant, out, source, hub_files, emit)
        if keep_source:  # the f16 stays as NAME:F16, the best input for `localmix quantize`
            _register_owned(plan, "F16", f16, source, hub_files, emit)
    return manifest


def _calibrate(plan: _Plan, f16: Path, emit: OnProgress) -> Imatrix:
    """--imatrix auto: the model's importance matrix from the converted file, kept in the
    model's folder (where `localmix imatrix` and `quantize --imatrix auto` look for it)."""
    from localmix.build.imatrix import compute as calibration
    from localmix.build.imatrix import files as importance

    out = store.imatrix_path(plan.name)
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        calibration.compute(f16, out=out, progress=emit)
    return importance.load(out)


def _register_owned(
    plan: _Plan, quant: str, path: Path, source: str, hub_files: tuple[str, ...], emit: OnProgress
) -> Manifest:
    from localmix import gguffile

    info = gguffile.inspect(path)
    emit(Progress("register", subject=f"{plan.name}:{quant}"))
    manifest = store.manifest_of(
        path,
        info,
        name=plan.name,
        quant=quant,
        chat_format=plan.chat_format,
        source=source,
        owned=True,
        hub_files=hub_files,
    )
    return store.add(manifest, src=path)


def check_architecture(info: GGUFInfo) -> None:
    """InvalidGGUF for an architecture this llama.cpp cannot load: registering it would only
    move the failure to the first chat."""
    from localmix.errors import InvalidGGUF
    from localmix.llama.architectures import KNOWN

    if info.architecture not in KNOWN:
        raise InvalidGGUF(
            f"{info.path.name}: architecture {info.architecture[:40]!r} is not one this "
            "llama.cpp loads",
            hint="Mistral and Mixtral GGUFs say 'llama'; `localmix doctor` shows the llama.cpp "
            "version",
        )


def _name_from_file(path: Path) -> str:
    """`mistral-7b-instruct-v0.2.Q4_K_M.gguf` -> `mistral-7b-instruct-v0.2` (shards too)."""
    stem = re.sub(r"(-\d{5}-of-\d{5})?\.gguf$", "", path.name, flags=re.IGNORECASE)
    tag = tags.in_filename(path.name)
    if tag and stem.upper().endswith(tag) and stem[-len(tag) - 1 : -len(tag)] in ".-_":
        stem = stem[: -len(tag) - 1]
    return stem.lower() or "model"


def check_mmproj(path: Path | str) -> Path:
    """path, resolved, if it is a pixtral mmproj (the vision tower of Mistral's vision models);
    InvalidGGUF otherwise."""
    from localmix import gguffile
    from localmix.errors import InvalidGGUF

    resolved = Path(path).expanduser().resolve()
    projector = gguffile.inspect(resolved).metadata.get("clip.projector_type")
    if projector is None:
        raise InvalidGGUF(
            f"{resolved}: not an mmproj (a vision tower GGUF)",
            hint="a vision model's mmproj is published beside its GGUF files",
        )
    if projector != "pixtral":
        raise InvalidGGUF(f"{resolved}: projector {projector!r}, not pixtral (Mistral's)")
    return resolved


def import_gguf(
    path: Path | str,
    *,
    name: str | None = None,
    copy: bool = False,
    chat_format: str | None = None,
    mmproj: Path | str | None = None,
) -> Manifest:
    """Register a GGUF already on disk, by reference (or copied into the store), validated first.
    chat_format (v1, v3, ...) is kept in the manifest; None: detected from the vocabulary.
    mmproj: a vision model's vision tower, kept with it (by reference) so that chats see images."""
    from localmix import gguffile
    from localmix.chat import template

    if chat_format is not None:
        template.get(chat_format)  # UsageError naming the known formats
    vision = str(check_mmproj(mmproj)) if mmproj is not None else None

    if name is not None and (not name.strip() or name != name.strip()):
        raise UsageError(
            f"{name!r} is not a usable model name", hint="use letters, digits, - _ . and :"
        )
    path = Path(path).expanduser().resolve()
    info = gguffile.inspect(path)  # InvalidGGUF for anything truncated or not GGUF
    check_architecture(info)
    name = name or _name_from_file(path)
    store.slug(name)  # a name with nothing usable in it fails before any work
    quant = info.quant.upper()
    for manifest in store.find(f"{name}:{quant}"):
        if Path(manifest.path) == path and not copy:
            # importing the same file again with --format or --mmproj: remember them from now on
            changes = {"chat_format": chat_format, "mmproj": vision}
            changes = {k: v for k, v in changes.items() if v is not None}
            if all(getattr(manifest, k) == v for k, v in changes.items()):
                return manifest
            return store.add(dataclasses.replace(manifest, **changes))
        raise UsageError(
            f"{manifest.ref} is already installed (from {manifest.source})",
            hint="choose another name with --name, or remove it first with `localmix rm`",
        )
    if copy and len(info.files) > 1:
        raise UsageError(
            f"{path.name} is split into {len(info.files)} files; --copy takes single files",
            hint="import it by reference (without --copy)",
        )
    manifest = store.manifest_of(
        path,
        info,
        name=name,
        quant=quant,
        chat_format=chat_format,
        source=f"path:{path}",
        owned=copy,
    )
    manifest = dataclasses.replace(manifest, mmproj=vision)
    if not copy:
        return store.add(manifest)
    with store.tmp_file(".gguf") as tmp:
        disk.check_space({tmp.parent: (info.file_size, "copy")})
        shutil.copyfile(path, tmp)
        with contextlib.suppress(OSError):
            os.chmod(tmp, 0o644)
        return store.add(manifest, src=tmp)
