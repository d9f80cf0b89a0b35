"""Computing an importance matrix the way llama.cpp's llama-imatrix does, without it: the model
reads a text in chunks, and llama.cpp's eval callback hands over the inputs of every weight
matrix product, whose squares are summed per column (per expert for MoE weights).

llama-imatrix's rules, kept here so its files and ours hold the same values:
- the text (a trailing newline dropped, as `-f` reads it) is tokenized once, with BOS where the
  model adds one and special tokens as plain text; each chunk of chunk_size tokens starts from an
  empty KV cache, its first token replaced by BOS, and every position is an output (otherwise
  llama.cpp would skip the last layer's feed-forward for all but one token);
- a product is collected when it is a MUL_MAT_ID (experts), or a MUL_MAT of a `blk.*` weight
  whose float32 input has at least 16 rows (the output weight is left out);
- an expert's sums and count grow only with the tokens routed to it; chunk_count is the largest
  count divided by chunk_size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from localmix.errors import EngineError, ModelNotFound, UsageError
from localmix.progress import OnProgress, Progress

if TYPE_CHECKING:
    import numpy

    from localmix.build.imatrix.files import Entry
    from localmix.llama.records import MatMul
    from localmix.load import LoadSettings
    from localmix.models.store import Located

DEFAULT_CHUNK = 512  # llama-imatrix's default context (-c)
MIN_CHUNK = 16  # a smaller chunk feeds no dense product llama-imatrix collects
AUTO = "auto"  # `--imatrix auto`: the model's own, computed first when missing
_MIN_ROWS = 16  # llama-imatrix skips MUL_MAT with fewer input rows
_MAX_BATCH = 2048  # llama-imatrix decodes a chunk in batches of at most this many tokens


@dataclass(frozen=True)
class ImatrixResult:
    """What `compute` wrote."""

    path: Path
    model: str  # the file it ran (store name:quant, or the file's name)
    dataset: str
    chunks: int
    chunk_size: int  # tokens
    tokens: int  # tokens run: chunks x chunk_size
    entries: int  # weights with importance values
    partial: tuple[str, ...]  # expert weights some expert of which saw no token
    seconds: float


class Collector:
    """llama-imatrix's collection as an engine tap: per weight, sums of squared inputs (matrices x
    columns, float64 across calls; dense weights keep one row) and the number of rows summed."""

    def __init__(self) -> None:
        self.sums: dict[str, numpy.ndarray] = {}
        self.counts: dict[str, numpy.ndarray] = {}

    def wants(self, product: MatMul) -> bool:
        if product.op == "MUL_MAT_ID":
            return True
        if product.op != "MUL_MAT":
            return False
        if product.input_shape[1] < _MIN_ROWS or not product.input_f32:
            return False
        return product.weight.startswith("blk.")

    def take(
        self, product: MatMul, inputs: numpy.ndarray, expert_ids: numpy.ndarray | None
    ) -> None:
        if expert_ids is None:
            self._dense(product, inputs)
        else:
            self._experts(product, inputs, expert_ids)

    def _entry(self, name: str, matrices: int, columns: int) -> tuple[numpy.ndarray, ...]:
        import numpy as np

        sums = self.sums.get(name)
        if sums is None:
            sums = self.sums[name] = np.zeros((matrices, columns), dtype=np.float64)
            self.counts[name] = np.zeros(matrices, dtype=np.int64)
        elif sums.shape != (matrices, columns):
            raise EngineError(f"{name}: inputs of {columns} columns after {sums.shape[1]}")
        return sums, self.counts[name]

    def _dense(self, product: MatMul, x: numpy.ndarray) -> None:
        """A weight of n2 x n3 matrices (1 x 1 for a plain matrix) multiplying x (ne3, ne2,
        ne1, ne0): input plane (i3, i2) goes to matrix (i3 % n3) * n2 + i2 % n2."""
        import numpy as np

        n2, n3 = product.weight_shape[2], product.weight_shape[3]
        columns = x.shape[-1]
        sums, counts = self._entry(product.weight, 1, columns * n2 * n3)
        # float32 within one call (at most a batch of rows), float64 across calls: error below
        # llama-imatrix's float32 running sums, at a sixth of the time of squaring in float64
        planes = np.einsum("...ij,...ij->...j", x, x)  # (ne3, ne2, ne0)
        for i3 in range(x.shape[0]):
            for i2 in range(x.shape[1]):
                at = ((i3 % n3) * n2 + i2 % n2) * columns
                sums[0, at : at + columns] += planes[i3, i2]
        counts += x.shape[0] * x.shape[1] * x.shape[2] // (n2 * n3)

    def _experts(self, product: MatMul, x: numpy.ndarray, ids: numpy.ndarray) -> None:
        """x (1, tokens, slots or 1, columns); ids (tokens, used): slot s of token t goes to
        expert ids[t, s], its input row x[t, s % rows]."""
        import numpy as np

        experts = product.weight_shape[2]
        if x.shape[0] != 1 or ids.shape[0] != x.shape[1]:
            raise EngineError(f"{product.weight}: expert inputs of an unexpected shape {x.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= experts):
            raise EngineError(f"{product.weight}: an expert id outside 0..{experts - 1}")
        if ids.size == 0:
            return
        rows = x[0]  # (tokens, slots or 1, columns)
        sums, counts = self._entry(product.weight, experts, rows.shape[-1])
        slots = np.arange(ids.shape[1]) % rows.shape[1]
        squares = np.square(rows[:, slots]).reshape(ids.size, -1)
        # Sum each expert's rows in one pass: rows sorted by expert, then added up per run.
        # (A matrix product would call BLAS, whose threads fight llama.cpp's for the cores.)
        routed = ids.reshape(-1)
        order = np.argsort(routed, kind="stable")
        which, starts = np.unique(routed[order], return_index=True)
        sums[which] += np.add.reduceat(squares[order], starts, axis=0)
        counts += np.bincount(routed, minlength=experts)

    def check_finite(self) -> None:
        """llama-imatrix stops on inf or nan in the sums: so does this."""
        import numpy as np

        for name, sums in self.sums.items():
            if not np.isfinite(sums).all():
                raise EngineError(
                    f"the inputs of {name} are not finite (inf or nan)",
                    hint="the model's weights overflow on this text: check the model file",
                )

    def entries(self) -> dict[str, Entry]:
        """The collected data, as imatrix.save writes it."""
        import numpy as np

        from localmix.build.imatrix.files import Entry

        return {
            name: Entry(self.sums[name].astype(np.float32), self.counts[name].astype(np.float32))
            for name in sorted(self.sums)
        }

    def chunk_count(self, chunk_size: int) -> int:
        most = max((int(c.max()) for c in self.counts.values() if c.size), default=0)
        return most // chunk_size

    def partial(self) -> tuple[str, ...]:
        return tuple(sorted(n for n, c in self.counts.items() if c.size > 1 and not c.all()))


def compute(
    model: str | Path,
    *,
    text: Path | None = None,
    out: Path | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    chunks: int | None = None,
    settings: LoadSettings | None = None,
    progress: OnProgress | None = None,
) -> ImatrixResult:
    """Compute model's importance matrix over text (the default corpus if None) and write it in
    llama-imatrix's GGUF format to out (default: beside the model, see default_path). chunks
    limits how many chunks of chunk_size tokens are run (default: all the text holds). progress
    hears the computation start (subject: the model run) and then each chunk."""
    from localmix import corpus, load
    from localmix.build.imatrix.files import save
    from localmix.build.quantize import writable_dir
    from localmix.models import store

    if chunk_size < MIN_CHUNK:
        raise UsageError(f"a chunk must be at least {MIN_CHUNK} tokens, not {chunk_size}")
    if chunks is not None and chunks < 1:
        raise UsageError(f"the number of chunks must be 1 or more, not {chunks}")
    target, name = _target(model)
    out = Path(out) if out is not None else default_path(target, name)
    in_store = name is not None and out == store.imatrix_path(name)
    writable_dir(out, target.path, src_is="model", made_later=in_store)
    source = corpus.read(text)
    collector = Collector()
    settings = replace(
        settings or load.LoadSettings(),
        ctx=max(chunk_size, load.MIN_CTX),
        n_batch=min(chunk_size, _MAX_BATCH),
    )
    started = time.perf_counter()
    if progress is not None:
        progress(Progress("imatrix", subject=target.name))
    with load.open_model(target, settings, tap=collector) as loaded:
        engine = loaded.engine
        # `-f` drops one trailing newline; BOS as llama_tokenize's add_special would put it.
        body = source.text[:-1] if source.text.endswith("\n") else source.text
        tokens = engine.tokenize(body, add_bos=True, special=False)
        available = len(tokens) // chunk_size
        if available == 0:
            raise UsageError(
                f"{source.name} is {len(tokens)} tokens, less than one chunk of {chunk_size}",
                hint="give a longer text, or a smaller --chunk-size",
            )
        total = min(available, chunks) if chunks else available
        for index in range(total):
            chunk = tokens[index * chunk_size : (index + 1) * chunk_size]
            if engine.adds_bos:
                chunk[0] = engine.bos_id
            engine.clear()
            engine.process(chunk, every_output=True)
            collector.check_finite()
            if progress is not None:
                progress(
                    Progress(
                        "imatrix", subject=target.name, done=index + 1, total=total, unit="chunks"
                    )
                )
    entries = collector.entries()
    if not entries:
        raise EngineError(f"{target.name}: llama.cpp ran no weight product that an imatrix covers")
    write = lambda: save(  # noqa: E731 - the same write with or without the store's lock
        out,
        entries,
        datasets=(source.source,),
        chunk_count=collector.chunk_count(chunk_size),
        chunk_size=chunk_size,
    )
    if in_store:
        with store.lock(name):  # type: ignore[arg-type]
            if not store.find(name):  # removed while this ran: leave nothing behind
                raise ModelNotFound(f"{name} was removed while its imatrix was computed")
            out.parent.mkdir(parents=True, exist_ok=True)
            write()
    else:
        write()
    return ImatrixResult(
        path=out,
        model=target.name,
        dataset=source.source,
        chunks=total,
        chunk_size=chunk_size,
        tokens=total * chunk_size,
        entries=len(entries),
        partial=collector.partial(),
        seconds=time.perf_counter() - started,
    )


def _target(model: str | Path) -> tuple[Located, str | None]:
    """The file to run and the store name (None for a path): a store model without a quant
    runs its most precise file, as llama-imatrix is best given the unquantized model."""
    from localmix.build.quantize import most_precise
    from localmix.models import store, tags

    text = str(model)
    candidate = Path(text).expanduser()
    if candidate.suffix == ".gguf" or candidate.is_file():
        return store.locate(text), None
    if not text.strip():
        raise UsageError("no model given: the name or path is empty")
    base, quant = tags.split(text)
    if quant is None:
        best = most_precise(store.find(base))
        if best is not None:
            text = best.ref
    manifest = store.get(text)
    return store.locate(manifest.ref), manifest.name


def default_path(target: Located, name: str | None) -> Path:
    """A store model's imatrix lives in its folder (store.imatrix_path); a file's beside it,
    named for it: model.F16.gguf -> model.F16.imatrix.gguf."""
    from localmix.models import store

    if name is not None:
        return store.imatrix_path(name)
    return target.path.with_name(f"{target.path.stem}.imatrix.gguf")


def ensure(
    model: str | Path,
    progress: OnProgress | None = None,
    *,
    text: Path | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    chunks: int | None = None,
) -> Path:
    """`--imatrix auto`: the model's imatrix at its default place (default_path), computed there
    first (as `compute` would, all chunks of the default text unless told) when it is missing."""
    target, name = _target(model)
    path = default_path(target, name)
    if path.is_file():
        return path
    return compute(model, text=text, chunk_size=chunk_size, chunks=chunks, progress=progress).path
