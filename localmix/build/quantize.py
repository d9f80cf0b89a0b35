"""GGUF -> GGUF quantization through llama.cpp's llama_model_quantize: the type table, the input
check, a temporary output renamed only when complete, and per-tensor progress events."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from localmix import disk, settings
from localmix.errors import EngineError, OutputError, UsageError
from localmix.progress import OnProgress, Progress

if TYPE_CHECKING:
    from localmix.build.imatrix.files import Imatrix
    from localmix.models.store import Manifest


@dataclass(frozen=True)
class QuantType:
    name: str
    ftype: int  # llama_ftype
    bits: float  # approximate bits per weight (llama-quantize's table), for size estimates
    needs_imatrix: bool = False
    note: str = ""


# llama.cpp's llama_ftype values (include/llama.h); bits per weight as llama-quantize lists them.
QUANT_TYPES: dict[str, QuantType] = {
    q.name: q
    for q in (
        QuantType("F32", 0, 32.0),
        QuantType("F16", 1, 16.0),
        QuantType("BF16", 32, 16.0),
        QuantType("Q8_0", 7, 8.5),
        QuantType("Q6_K", 18, 6.56),
        QuantType("Q5_K_M", 17, 5.67),
        QuantType("Q5_K_S", 16, 5.52),
        QuantType("Q5_1", 9, 6.0),
        QuantType("Q5_0", 8, 5.5),
        QuantType("Q4_K_M", 15, 4.89, note="recommended"),
        QuantType("Q4_K_S", 14, 4.58),
        QuantType("Q4_1", 3, 5.0),
        QuantType("Q4_0", 2, 4.5),
        QuantType("IQ4_NL", 25, 4.5),
        QuantType("IQ4_XS", 30, 4.25),
        QuantType("Q3_K_L", 13, 4.27),
        QuantType("Q3_K_M", 12, 3.91),
        QuantType("Q3_K_S", 11, 3.5),
        QuantType("IQ3_M", 27, 3.66),
        QuantType("IQ3_S", 26, 3.44),
        QuantType("IQ3_XS", 22, 3.3),
        QuantType("IQ3_XXS", 23, 3.06, needs_imatrix=True),
        QuantType("Q2_K", 10, 2.96),
        QuantType("Q2_K_S", 21, 2.96, needs_imatrix=True),
        QuantType("IQ2_M", 29, 2.7, needs_imatrix=True),
        QuantType("IQ2_S", 28, 2.5, needs_imatrix=True),
        QuantType("IQ2_XS", 20, 2.31, needs_imatrix=True),
        QuantType("IQ2_XXS", 19, 2.06, needs_imatrix=True),
        QuantType("IQ1_M", 31, 1.75, needs_imatrix=True),
        QuantType("IQ1_S", 24, 1.56, needs_imatrix=True),
        QuantType("TQ2_0", 37, 2.06, note="ternary models only"),
        QuantType("TQ1_0", 36, 1.69, note="ternary models only"),
        QuantType("MXFP4_MOE", 38, 4.25),
    )
}
DEFAULT_TYPE = "Q4_K_M"


def quant_type(name: str, *, imatrix: bool = False) -> QuantType:
    """Look a quant type up by name, case-insensitively; UsageError listing the types otherwise.
    The lowest-bit types need an importance matrix (imatrix=True says one is given)."""
    key = name.strip().upper()
    if key not in QUANT_TYPES:
        raise UsageError(
            f"unknown quantization type {name!r}", hint="one of: " + ", ".join(QUANT_TYPES)
        )
    qtype = QUANT_TYPES[key]
    if qtype.needs_imatrix and not imatrix:
        raise UsageError(
            f"{qtype.name} needs an importance matrix",
            hint="pass --imatrix auto (computed from the model, see `localmix imatrix`) or "
            "--imatrix FILE (llama-imatrix's, or the one published beside a model's GGUFs), "
            "or use Q2_K, Q3_K_M or IQ3_M, which need none",
        )
    return qtype


def _tensor(name: str, index: int, total: int) -> Progress:
    """llama.cpp started tensor `index` (from 1) of `total`."""
    return Progress("quantize", subject=name, done=index, total=total, unit="tensors")


def estimate_size(n_params: int, qtype: str) -> int:
    """Approximate output bytes for a model of n_params at a quant type."""
    return int(n_params * QUANT_TYPES[qtype.upper()].bits / 8)


def quantize(
    src: Path,
    out: Path,
    qtype: str = DEFAULT_TYPE,
    *,
    threads: int | None = None,
    progress: OnProgress | None = None,
    allow_requantize: bool = False,
    imatrix: Path | str | Imatrix | None = None,
) -> Path:
    """Quantize a GGUF; the output appears at `out` only once complete. Returns `out`.

    An already-quantized input needs allow_requantize (quality is lost twice, as llama-quantize
    warns). imatrix, an importance matrix (a file, or one already loaded), guides every type and is
    needed by the lowest-bit ones; "auto" takes src's own (SRC_STEM.imatrix.gguf beside it),
    computed from src first when it is not there (progress then hears the imatrix stage too).
    progress hears the quantization start (subject: the type) and then each tensor.
    """
    from localmix import gguffile
    from localmix.build.imatrix import files as importance
    from localmix.llama.quant import model_quantize

    kind = quant_type(qtype, imatrix=imatrix is not None)
    src, out = Path(src), Path(out)
    # llama.cpp aborts the process (std::bad_alloc) on absurd thread counts: check first
    n_threads = settings.check_threads(threads) if threads else settings.default_threads()
    info = gguffile.inspect(src)  # a truncated or non-GGUF input fails here, not in C
    _check_requantize(src, info.quant, allow_requantize)
    out_dir = writable_dir(out, src)
    if imatrix == AUTO:
        from localmix.build.imatrix import compute as calibration

        imatrix = calibration.ensure(src, progress)
    matrix = importance.load(imatrix) if isinstance(imatrix, (str, Path)) else imatrix
    disk.remove_stale(disk.partials_of(out))  # of a quantize to `out` that was killed
    disk.check_space({out_dir: (estimate_size(info.n_params, kind.name), "the quantized model")})
    errors: list[str] = []
    result: list[int] = []

    def run() -> None:
        result.append(
            model_quantize(
                info.path,
                partial,
                kind.ftype,
                n_threads,
                allow_requantize=allow_requantize,
                imatrix=matrix,
                on_tensor=(lambda i, n, name: progress(_tensor(name, i, n))) if progress else None,
                on_error=errors.append,
            )
        )

    if progress:
        progress(Progress("quantize", subject=kind.name))
    # llama_model_quantize cannot be interrupted; running it in a daemon thread keeps Ctrl-C
    # responsive: the main thread removes the partial file and the process exits.
    worker = threading.Thread(target=run, name="llama-quantize", daemon=True)
    with disk.staged(out) as partial:  # beside out: the rename never crosses file systems
        worker.start()
        while worker.is_alive():
            worker.join(0.2)
        if not result or result[0] != 0:
            # llama.cpp's summary line says why; other error-level lines are context.
            detail = next(
                (
                    e.split("failed to quantize:", 1)[1].strip()
                    for e in errors
                    if "failed to quantize:" in e
                ),
                next((e for e in reversed(errors) if e), "llama.cpp reported a failure"),
            )
            mismatch = matrix is not None and "matrix" in detail.lower()
            if "iostream" in detail or "write" in detail.lower():
                # llama.cpp reports a failed write as a bare "basic_ios::clear: iostream error"
                disk.check_space({out_dir: (1, "the quantized model")})
                raise OutputError(
                    f"quantizing {src.name} failed while writing {out}: {detail}",
                    hint="check free space and permissions where the output goes",
                )
            raise EngineError(
                f"quantizing {src.name} to {kind.name} failed: {detail}",
                hint=f"is {matrix.path.name} made for this model?" if mismatch and matrix else None,
            )
    return out


_FULL_PRECISION = ("F32", "BF16", "F16")


def _check_requantize(src: Path, quant: str, allow: bool) -> None:
    """llama.cpp refuses an already-quantized input only after it started writing, with a bare
    'requantizing ... is disabled': say so first, with the way to ask for it."""
    if quant.upper() not in _FULL_PRECISION and not allow:
        raise UsageError(
            f"{src.name} is already quantized ({quant}); quantizing it again loses quality twice",
            hint="start from an F16/BF16/F32 GGUF, or pass --allow-requantize to accept the loss",
        )


def writable_dir(out: Path, src: Path, *, src_is: str = "input", made_later: bool = False) -> Path:
    """The output's folder, writable; an output that is a folder or `src` itself is refused
    (the rename at the end would replace it). made_later: the folder may not exist yet (the store
    makes a model's folder when it writes there); then its nearest existing parent must be
    writable."""
    if not str(out).strip() or out.name in ("", ".", ".."):
        raise UsageError(f"{str(out)!r} is not an output file name", hint="give -o FILE.gguf")
    if out.is_dir():
        raise OutputError(f"{out}: is a directory", hint=f"give a file name, e.g. -o {out}/x.gguf")
    if out.exists() and out.resolve() == src.resolve():
        raise UsageError(
            f"{out}: the output would replace the {src_is}", hint="choose another output with -o"
        )
    out_dir = out.parent if str(out.parent) else Path(".")
    folder = out_dir
    if made_later:
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
    elif not out_dir.is_dir():
        raise OutputError(f"{out_dir}: no such directory", hint="create it, or choose another -o")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{out_dir}: not writable", hint="choose another output with -o")
    return out_dir


# Sources to quantize a store model from, best first: requantizing a quantized file loses quality.
SOURCE_PREFERENCE = ("F32", "BF16", "F16", "Q8_0")


def most_precise(manifests: Iterable[Manifest]) -> Manifest | None:
    """The most precise of a model's files (SOURCE_PREFERENCE order), None when all are lower."""
    by_quant = {m.quant: m for m in manifests}
    return next((by_quant[q] for q in SOURCE_PREFERENCE if q in by_quant), None)


AUTO = "auto"  # imatrix="auto": the model's own importance matrix, computed when missing


def quantize_model(
    reference: str,
    qtype: str = DEFAULT_TYPE,
    *,
    threads: int | None = None,
    progress: OnProgress | None = None,
    allow_requantize: bool = False,
    imatrix: Path | str | None = None,
    on_wait: Callable[[], None] | None = None,
) -> Manifest:
    """Make another quant of a store model and register it (`localmix quantize mistral -q Q5_K_M`).
    imatrix "auto" takes the model's own importance matrix (store.imatrix_path), computed from
    the file quantized when it is not there yet.

    The check for the quant, the work and the registration happen under the model's lock: a
    second quantize of the same model waits and finds the first one's result, and an `rm` waits
    for this to finish (on_wait: called when this has to wait for another process).
    """
    from localmix.models import store, tags

    kind = quant_type(qtype, imatrix=imatrix is not None)
    name, _ = tags.split(reference)
    if not store.find(name):
        store.get(reference)  # raises ModelNotFound with the usual hint
    store.clean_tmp()  # leftovers of a quantize that was killed
    store_name = store.find(name)[0].name  # an alias (mistral) locks the name it stands for
    with store.lock(store_name, on_wait):
        by_quant = {m.quant: m for m in store.find(name)}
        if kind.name in by_quant:
            return by_quant[kind.name]
        if not by_quant:  # removed while this waited
            store.get(reference)
        source = most_precise(by_quant.values())
        if source is None:
            if not allow_requantize:
                raise UsageError(
                    f"{name} has only quantized files ({', '.join(sorted(by_quant))})",
                    hint="pull it with --keep-source (or --from-source) for a full-precision "
                    "file, or pass --allow-requantize to accept the quality loss",
                )
            source = store.get(name)
        if imatrix == AUTO:
            from localmix.build.imatrix import compute as calibration

            imatrix = calibration.ensure(source.ref, progress)
        return _quantize_and_register(source, kind, threads, progress, imatrix)


def quantize_any(
    src: str,
    qtype: str = DEFAULT_TYPE,
    output: Path | None = None,
    *,
    threads: int | None = None,
    progress: OnProgress | None = None,
    allow_requantize: bool = False,
    imatrix: Path | str | None = None,
    on_wait: Callable[[], None] | None = None,
) -> Path:
    """What `localmix quantize SRC` makes: a .gguf path (or an existing file) is quantized to
    output (default: beside it, named for the type), anything else is a store model that gets
    another quant; returns the file written (or found)."""
    kind = quant_type(qtype, imatrix=imatrix is not None)
    if not src.strip():
        raise UsageError(
            "no model given: the name or path is empty",
            hint="give a .gguf path or a name from `localmix list`",
        )
    path = Path(src)
    if path.suffix == ".gguf" or path.exists():
        out = output or path.with_name(f"{path.stem.rsplit('.', 1)[0]}.{kind.name}.gguf")
        return quantize(
            path, out, kind.name, threads=threads, progress=progress,
            allow_requantize=allow_requantize, imatrix=imatrix,
        )  # fmt: skip
    manifest = quantize_model(
        src, kind.name, threads=threads, progress=progress, allow_requantize=allow_requantize,
        imatrix=imatrix, on_wait=on_wait,
    )  # fmt: skip
    return manifest.file


def _quantize_and_register(
    source: Manifest,
    kind: QuantType,
    threads: int | None,
    progress: OnProgress | None,
    imatrix: Path | str | None,
) -> Manifest:
    import dataclasses
    import time

    from localmix import gguffile
    from localmix.models import store

    with store.tmp_file() as tmp:
        quantize(
            source.file,
            tmp,
            kind.name,
            threads=threads,
            progress=progress,
            allow_requantize=source.quant not in ("F32", "BF16", "F16"),
            imatrix=imatrix,
        )
        info = gguffile.inspect(tmp)
        manifest = dataclasses.replace(
            source,
            quant=kind.name,
            size=info.file_size,
            sha256=store.sha256_file(tmp),
            source=f"{source.source} -> {kind.name}",
            created=time.time(),
            extra_files=(),
            hub_files=(),
        )
        return store.add(manifest, src=tmp)
