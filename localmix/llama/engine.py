"""The engine: one GGUF model and one llama.cpp context, driven through llama-cpp-python's low-level
API. stream() reuses the KV cache's longest common prefix, decodes the rest in batches, then samples
with llama.cpp's own sampler chain, except at temperature 0, where the pick (with or without a
repeat penalty) is the chain's choice made in numpy over the few logits that matter; the per-token
loop does only what C cannot."""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localmix import settings
from localmix.errors import ContextTooLong, EngineError, UsageError
from localmix.llama.backend import LOG, llama
from localmix.llama.generation import (
    Generating,
    Generation,
    check_tokens,
    checked_prompt,
    common_prefix,
)
from localmix.llama.records import (
    FLASH_ATTN,
    KV_CACHE_TYPES,
    Chunk,
    EngineConfig,
    Sampling,
    Stats,
)

if TYPE_CHECKING:
    import numpy

    from localmix.llama.generation import ImageSpan
    from localmix.llama.tap import Tap
    from localmix.llama.vision import Vision

__all__ = ["Chunk", "Engine", "EngineConfig", "Generation", "Sampling", "Stats"]

_LOAD_MODE_NONE, _LOAD_MODE_AUTO = 0, -1  # enum llama_load_mode
_DECODE_ERRORS = {1: "no free KV cache slot", 2: "aborted", -1: "invalid batch"}


def _int32_array(values: Sequence[int]) -> Any:
    return (ctypes.c_int32 * len(values))(*values)


def logits_rows(ctx: Any, n_vocab: int) -> Callable[[int], numpy.ndarray]:
    """Batch index (-1: the last) -> its logits as a numpy array over llama.cpp's own buffer,
    valid until the next decode. A view is made once per buffer address, not once per token."""
    import numpy as np

    from localmix.llama.lib import logits_address

    address_of = logits_address()
    views: dict[int, numpy.ndarray] = {}

    def view(index: int) -> numpy.ndarray:
        address = address_of(ctx, index)
        found = views.get(address)
        if found is None:
            if not address:
                raise EngineError("llama.cpp returned no logits")
            buffer = (ctypes.c_float * n_vocab).from_address(address)
            found = views[address] = np.frombuffer(buffer, dtype=np.float32)
        return found

    return view


def _no_logits(index: int) -> numpy.ndarray:
    raise EngineError("this engine has no context (vocab_only)")


class Engine:
    """A loaded GGUF and its context (seq 0). Use as a context manager; close() is idempotent.

    Drivers of many sequences (llama/batch.py) use the context through lib, context, memory,
    n_batch, logits_at, piece, is_end and on_close; Engine's own loop drives sequence 0."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.last_stats: Stats | None = None
        self._kv: list[int] = []
        self._kv_images: list[tuple[int, int, str]] = []  # (start, end, key) of cached images
        self._embd_batch: Any = None
        self.vision: Vision | None = None  # the vision tower, once attach_vision loads it
        self._pieces: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}
        self._live: Iterator[Chunk | Stats] | None = None
        self.logits_at: Callable[[int], numpy.ndarray] = _no_logits
        self._closed = False
        self._tap: Tap | None = None
        self._stack = ExitStack()
        self._c = llama()
        try:
            self._load(config)
        except BaseException:
            self.close()
            raise

    # -- loading -------------------------------------------------------------------------------

    def _load(self, config: EngineConfig) -> None:
        c, path = self._c, Path(config.model_path)
        LOG.install(c)
        LOG.verbose = config.verbose
        LOG.errors.clear()
        mparams = c.llama_model_default_params()
        mparams.n_gpu_layers = config.n_gpu_layers
        mparams.load_mode = _LOAD_MODE_AUTO if config.use_mmap else _LOAD_MODE_NONE
        mparams.use_extra_bufts = config.repack
        mparams.vocab_only = config.vocab_only
        self._place(mparams, config)
        if config.tensor_overrides:
            from localmix.llama.lib import apply_tensor_overrides

            self._keepalive = apply_tensor_overrides(mparams, config.tensor_overrides)
        model = c.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            self._load_failed(path)
        self._model = model
        self._stack.callback(c.llama_model_free, model)
        self._read_model(model)
        if config.vocab_only:
            self.n_ctx = 0
            return

        threads = config.n_threads or settings.default_threads()
        batch_threads = config.n_threads_batch or threads
        pools = self._threadpools(threads, batch_threads)  # made before the context, freed after
        cparams = c.llama_context_default_params()
        cparams.n_ctx = config.n_ctx
        cparams.n_batch = config.n_batch
        cparams.n_ubatch = config.n_ubatch
        cparams.n_seq_max = config.n_seq_max
        cparams.kv_unified = config.n_seq_max > 1
        cparams.n_threads = threads
        cparams.n_threads_batch = batch_threads
        self.n_threads = threads
        cparams.flash_attn_type = FLASH_ATTN[config.flash_attn]
        cparams.type_k = KV_CACHE_TYPES[config.type_k]
        cparams.type_v = KV_CACHE_TYPES[config.type_v]
        if config.tap is not None:
            from localmix.llama.tap import Tap

            # Held by the engine: the context calls it until llama_free.
            self._tap = Tap(config.tap)
            cparams.cb_eval = self._tap.callback
        ctx = c.llama_init_from_model(model, cparams)
        if not ctx:
            raise EngineError(
                f"llama.cpp could not create a {config.n_ctx or 'full'}-token context for "
                f"{path.name}: {LOG.last_error('no reason given')}",
                hint="try a smaller context size or another KV cache type",
            )
        self._ctx = ctx
        self._stack.callback(c.llama_free, ctx)
        self.thread_pools = 0  # CPU thread pools attached: 1, 2 (own batch pool) or 0 (none)
        if pools:
            from localmix.llama.lib import attach_threadpools

            attach_threadpools(ctx, *pools)
            self.thread_pools = 2 if pools[1] else 1
        self._mem = self._not_null(c.llama_get_memory(ctx), "the context's KV cache")
        self.n_ctx = int(c.llama_n_ctx(ctx))
        self.system_info = (c.llama_print_system_info() or b"").decode(errors="replace")
        self._n_batch = int(c.llama_n_batch(ctx))
        self._batch = self._new_batch(self._n_batch)
        self._one = self._new_batch(1)
        self._one.n_tokens = 1
        self._one.logits[0] = 1
        # Field access on a ctypes struct builds a new pointer object: keep these once.
        self._one_token, self._one_pos = self._one.token, self._one.pos
        self.logits_at = logits_rows(ctx, self.n_vocab)

    def _place(self, mparams: Any, config: EngineConfig) -> None:
        """model_params.devices and tensor_split: the config's devices, else with RPC workers
        theirs then the local GPUs; left to llama.cpp otherwise, unless workers joined this
        process earlier (it would put them first: this config did not ask for them)."""
        from localmix.llama import rpc
        from localmix.llama.lib import apply_devices, local_offload_devices

        names = config.devices or None
        if config.rpc:
            remote = rpc.add_servers(config.rpc)  # probed first: an error, not llama.cpp's abort
            names = names or remote + local_offload_devices()
        elif names is None and rpc.registered():
            names = local_offload_devices()
        if names is not None or config.tensor_split:
            self._devices_keepalive = apply_devices(mparams, names, config.tensor_split)

    def _read_model(self, model: Any) -> None:
        """The model's own facts and vocabulary (all a vocab_only engine has)."""
        c = self._c
        self._vocab = self._not_null(c.llama_model_get_vocab(model), "the model's vocabulary")
        self.n_ctx_train = int(c.llama_model_n_ctx_train(model))
        self.n_vocab = int(c.llama_vocab_n_tokens(self._vocab))
        self.n_layer = int(c.llama_model_n_layer(model))
        self.n_embd = int(c.llama_model_n_embd(model))
        self.bos_id = int(c.llama_vocab_bos(self._vocab))
        self.eos_id = int(c.llama_vocab_eos(self._vocab))
        # The one BOS rule: the vocabulary's own (tokenizer.ggml.add_bos_token, else llama.cpp's
        # default for the tokenizer type), as llama.cpp's tools tokenize with it.
        self.adds_bos = bool(c.llama_vocab_get_add_bos(self._vocab)) and self.bos_id >= 0
        self.size_bytes = int(c.llama_model_size(model))
        self.n_params = int(c.llama_model_n_params(model))
        self._piece_buf = ctypes.create_string_buffer(256)
        self.description = self._text(lambda buf, size: c.llama_model_desc(model, buf, size))
        self.metadata = self._read_metadata()

    def _threadpools(self, threads: int, batch_threads: int) -> tuple[int, int | None] | None:
        """CPU thread pools kept for the engine's life, as llama-bench and llama-cli keep them:
        (pool, batch pool or None for the same), or None where the build cannot make them."""
        from localmix.llama.lib import free_threadpool, new_threadpool

        pools: list[int] = []
        for count in dict.fromkeys((threads, batch_threads)):
            pool = new_threadpool(count)
            if pool is None:
                return None
            self._stack.callback(free_threadpool, pool)
            pools.append(pool)
        return pools[0], pools[1] if len(pools) > 1 else None

    def _load_failed(self, path: Path) -> None:
        from localmix import gguffile
        from localmix.errors import InvalidGGUF

        gguffile.inspect(path)  # raises InvalidGGUF for a missing, truncated or foreign file
        # llama_model_load logs the reason ("error loading model: X"), then a bare summary
        marker = "error loading model:"
        reason = next(
            (e.split(marker, 1)[1].strip() for e in reversed(LOG.errors) if marker in e),
            None,
        )
        if reason and "allocate" not in reason:
            # the file, not the machine: a missing tensor, a wrong shape, an unknown architecture
            raise InvalidGGUF(
                f"{path}: llama.cpp cannot load this model: {reason}",
                hint="the file is damaged or made for another llama.cpp; fetch or convert it again",
            )
        raise EngineError(
            f"llama.cpp could not load {path.name}: {reason or LOG.last_error('no reason given')}",
            hint="the file may need a newer llama.cpp, or a different architecture",
        )

    def _not_null(self, pointer: Any, what: str) -> Any:
        if not pointer:
            raise EngineError(f"llama.cpp returned no {what}")
        return pointer

    def _new_batch(self, size: int) -> Any:
        batch = self._c.llama_batch_init(size, 0, 1)
        if not batch.token:
            raise EngineError(f"llama.cpp could not allocate a batch of {size} tokens")
        self._stack.callback(self._c.llama_batch_free, batch)
        for i in range(size):  # every token belongs to sequence 0
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
        return batch

    def _text(self, fill: Any, size: int = 256) -> str:
        """A string from a C getter that returns its full length, growing the buffer once."""
        buf = ctypes.create_string_buffer(size)
        n = fill(buf, size)
        if n >= size:
            buf = ctypes.create_string_buffer(n + 1)
            n = fill(buf, n + 1)
        return buf.value.decode("utf-8", errors="replace") if n >= 0 else ""

    def _read_metadata(self) -> dict[str, str]:
        c, model = self._c, self._model
        meta = {}
        for i in range(c.llama_model_meta_count(model)):
            key = self._text(
                lambda buf, size, i=i: c.llama_model_meta_key_by_index(model, i, buf, size)
            )
            val = self._text(
                lambda buf, size, i=i: c.llama_model_meta_val_str_by_index(model, i, buf, size)
            )
            meta[key] = val
        return meta

    # -- what a driver of the context uses ------------------------------------------------------

    @property
    def lib(self) -> Any:
        """llama-cpp-python's ctypes bindings (llama_cpp)."""
        return self._c

    @property
    def context(self) -> Any:
        """The llama_context; one thread at a time may decode on it."""
        return self._ctx

    @property
    def memory(self) -> Any:
        """The context's KV cache (llama_memory_t)."""
        return self._mem

    @property
    def vocab(self) -> Any:
        """The model's llama_vocab (its tokenizer, for llguidance's)."""
        return self._vocab

    @property
    def n_batch(self) -> int:
        """The most tokens one llama_decode takes."""
        return self._n_batch

    def on_close(self, callback: Callable[[], object]) -> None:
        """Call back when the engine closes, before the context is freed (e.g. a batch's free)."""
        self._stack.callback(callback)

    def piece(self, token: int) -> bytes:
        """The bytes a token adds to generated text (control tokens add none), remembered."""
        data = self._pieces.get(token)
        return self._piece(token) if data is None else data

    def is_end(self, token: int) -> bool:
        """Whether the token ends a generation (llama_vocab_is_eog), remembered."""
        end = self._eog.get(token)
        if end is None:
            end = self._eog[token] = bool(self._c.llama_vocab_is_eog(self._vocab, token))
        return end

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Free the context and the model; safe to call twice."""
        self._settle()
        self._closed = True
        self._stack.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with suppress(Exception):
            self.close()

    def _check(self) -> None:
        if self._closed:
            raise EngineError("the engine is closed")
        self._settle()

    def _settle(self) -> None:
        """Close a stream still open, so its KV state is final before anything else runs."""
        live, self._live = self._live, None
        if live is not None:
            live.close()  # type: ignore[attr-defined]

    # -- tokens --------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]:
        """Token ids of text; special=True parses control tokens written as text ("[INST]").
        add_bos: BOS first where the model's vocabulary adds one (`adds_bos`), as a text's
        first token; never for a model whose vocabulary says no."""
        self._check_open()
        data = text.encode("utf-8")
        size = len(data) + 2
        buf = (ctypes.c_int32 * size)()
        n = self._c.llama_tokenize(self._vocab, data, len(data), buf, size, False, special)
        if n < 0:
            size = -n
            buf = (ctypes.c_int32 * size)()
            n = self._c.llama_tokenize(self._vocab, data, len(data), buf, size, False, special)
        if n < 0:
            raise EngineError("llama.cpp could not tokenize the text")
        tokens = buf[:n]
        return [self.bos_id, *tokens] if add_bos and self.adds_bos else tokens

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Text of tokens, control tokens left out (as in a stream)."""
        self._check_open()
        arr = _int32_array(tokens)
        size = max(64, 8 * len(tokens))
        buf = ctypes.create_string_buffer(size)
        n = self._c.llama_detokenize(self._vocab, arr, len(tokens), buf, size, False, False)
        if n < 0:
            size = -n
            buf = ctypes.create_string_buffer(size)
            n = self._c.llama_detokenize(self._vocab, arr, len(tokens), buf, size, False, False)
        if n < 0:
            raise EngineError("llama.cpp could not detokenize the tokens")
        return buf.raw[:n].decode("utf-8", errors="replace")

    def token_piece(self, token: int) -> bytes:
        """The bytes of one token, control tokens rendered (e.g. b"[INST]")."""
        self._check_open()
        return self._piece(token, special=True)

    def _piece(self, token: int, special: bool = False) -> bytes:
        buf = self._piece_buf
        n = self._c.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            self._piece_buf = buf = ctypes.create_string_buffer(-n)
            n = self._c.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        piece = buf.raw[: max(n, 0)]
        if not special:
            self._pieces[token] = piece
        return piece

    def _check_tokens(self, tokens: Sequence[int]) -> None:
        check_tokens(tokens, self.n_vocab)

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError("the engine is closed")

    # -- the KV cache --------------------------------------------------------------------------

    @property
    def kv_tokens(self) -> tuple[int, ...]:
        """The tokens the KV cache holds for sequence 0, in order (positions 0..n-1)."""
        return tuple(self._kv)

    def clear(self) -> None:
        """Empty the KV cache."""
        self._check()
        self._c.llama_memory_clear(self._mem, True)
        self._kv.clear()
        self._kv_images.clear()

    def shift(self, keep: int, discard: int) -> None:
        """Drop KV positions [keep, keep + discard) and move the rest down (tokens)."""
        self._check()
        if keep < 0 or discard < 0 or keep + discard > len(self._kv):
            raise UsageError(f"cannot drop {discard} tokens after {keep} of {len(self._kv)}")
        if discard == 0:
            return
        c, mem = self._c, self._mem
        if not c.llama_memory_can_shift(mem):
            raise EngineError("this model's KV cache cannot be shifted")
        if not c.llama_memory_seq_rm(mem, 0, keep, keep + discard):
            raise EngineError("llama.cpp could not remove part of the KV cache")
        c.llama_memory_seq_add(mem, 0, keep + discard, -1, -discard)
        del self._kv[keep : keep + discard]
        # images before keep stay, later ones move down; one cut by the shift goes
        self._kv_images = [
            (s, e, k) if e <= keep else (s - discard, e - discard, k)
            for s, e, k in self._kv_images
            if e <= keep or s >= keep + discard
        ]

    def process(self, tokens: Sequence[int], *, every_output: bool = False) -> None:
        """Append tokens to the KV cache in n_batch batches, without sampling. every_output
        computes every position's output (else the last only: llama.cpp then runs the last
        layer's feed-forward for that one token)."""
        self._check()
        tokens = list(tokens)
        self._check_tokens(tokens)
        self._check_room(len(tokens))
        self._decode(tokens, outputs_from=0 if every_output else None)
        self._c.llama_synchronize(self._ctx)  # so a caller's clock sees finished work

    def decode_one(self, token: int) -> None:
        """Decode one token at the next position (what llama-bench's tg test does)."""
        self._check()
        if not 0 <= token < self.n_vocab:
            raise UsageError(f"token ids must be in [0, {self.n_vocab})")
        self._check_room(1)
        self._step(token)
        self._c.llama_synchronize(self._ctx)

    def logits(self, tokens: Sequence[int], first: int = 0, *, view: bool = False) -> numpy.ndarray:
        """(n_tokens - first, n_vocab) float32 logits of the positions from `first` on, from an
        empty KV cache; llama.cpp computes no output rows for the positions before `first`.

        view=True returns a read-only array over llama.cpp's own output buffer instead of a
        copy (n_vocab x 4 bytes a row saved): valid only until this engine decodes again or
        closes. Where the rows come from more than one n_batch decode it is a copy anyway."""
        import numpy as np

        self.clear()
        tokens = list(tokens)
        self._check_tokens(tokens)
        self._check_room(len(tokens))
        if not 0 <= first < max(len(tokens), 1):
            raise UsageError(f"first must be in [0, {len(tokens)}), not {first}")
        shape = (len(tokens) - first, self.n_vocab)
        one_decode = not tokens or first // self._n_batch == (len(tokens) - 1) // self._n_batch
        if view and one_decode:
            self._decode(tokens, outputs_from=first)
            rows = np.ctypeslib.as_array(self._output_logits(), shape=shape)
            rows.flags.writeable = False
            return rows
        out = np.empty(shape, dtype=np.float32)

        def collect(row: int, n: int) -> None:
            out[row : row + n] = np.ctypeslib.as_array(self._output_logits(), shape=(n, shape[1]))

        self._decode(tokens, outputs_from=first, each=collect)
        return out

    def _output_logits(self) -> Any:
        ptr = self._c.llama_get_logits(self._ctx)
        if not ptr:
            raise EngineError("llama.cpp returned no logits")
        return ptr

    def _check_room(self, n: int) -> None:
        if len(self._kv) + n > self.n_ctx:
            raise ContextTooLong(
                f"{len(self._kv) + n} tokens do not fit the {self.n_ctx}-token context",
                hint="use a larger context size or a shorter input",
            )

    def _decode(
        self,
        tokens: list[int],
        *,
        outputs_from: int | None = None,
        each: Callable[[int, int], None] | None = None,
    ) -> None:
        """Decode tokens at the next positions in n_batch batches, with logits of each batch's
        last token; with outputs_from, of every token from that index on instead. each(row, n)
        is called after a batch that has n output rows, the first being output row `row`."""
        c, batch, step = self._c, self._batch, self._n_batch
        row = 0
        for start in range(0, len(tokens), step):
            part = tokens[start : start + step]
            n, pos = len(part), len(self._kv)
            ctypes.memmove(batch.token, _int32_array(part), 4 * n)
            ctypes.memmove(batch.pos, _int32_array(range(pos, pos + n)), 4 * n)
            if outputs_from is None:
                ctypes.memset(batch.logits, 0, n)
                batch.logits[n - 1] = 1
                n_out = 1
            else:
                skip = min(max(outputs_from - start, 0), n)
                ctypes.memset(batch.logits, 0, skip)
                ctypes.memset(ctypes.addressof(batch.logits.contents) + skip, 1, n - skip)
                n_out = n - skip
            batch.n_tokens = n
            rc = c.llama_decode(self._ctx, batch)
            if rc != 0:
                self._decode_failed(rc)
            if self._tap is not None and self._tap.error is not None:
                self._sync_kv()
                self._tap.raise_error()
            self._kv.extend(part)
            if each is not None and n_out:
                each(row, n_out)
            row += n_out

    def _decode_prompt(self, tokens: list[int], images: Sequence[ImageSpan]) -> float:
        """Decode prompt tokens at the next positions, without outputs; the positions of an
        image take its embeddings instead of their tokens' (the images not yet in the cache).
        Returns the seconds spent making those embeddings (the vision tower)."""
        import time

        at, encoding = len(self._kv), 0.0
        for span in images:
            if span.end <= at:
                continue  # reused from the cache
            before = tokens[: span.start - at]
            self._decode(before, outputs_from=len(before))
            started = time.perf_counter()
            rows = span.rows()
            encoding += time.perf_counter() - started
            self._decode_embeddings(span, rows, tokens[span.start - at : span.end - at])
            tokens, at = tokens[span.end - at :], span.end
        self._decode(tokens, outputs_from=len(tokens))
        return encoding

    def _decode_embeddings(
        self, span: ImageSpan, embeddings: numpy.ndarray, placeholders: list[int]
    ) -> None:
        """An image's embeddings at the next positions, in n_batch batches; the cache records
        its placeholder tokens and its key."""
        import numpy as np

        rows = np.ascontiguousarray(embeddings, dtype=np.float32)
        if rows.shape[1] != self.n_embd or len(placeholders) != len(rows):
            raise UsageError(f"an image's embeddings must be {len(placeholders)} x {self.n_embd}")
        batch = self._embedding_batch()
        for start in range(0, len(rows), self._n_batch):
            part = rows[start : start + self._n_batch]
            n, pos = len(part), len(self._kv)
            ctypes.memmove(batch.embd, part.ctypes.data, part.nbytes)
            ctypes.memmove(batch.pos, _int32_array(range(pos, pos + n)), 4 * n)
            ctypes.memset(batch.logits, 0, n)
            batch.n_tokens = n
            rc = self._c.llama_decode(self._ctx, batch)
            if rc != 0:
                self._decode_failed(rc)
            self._kv.extend(placeholders[start : start + n])
        self._kv_images.append((span.start, span.end, span.key))

    def _embedding_batch(self) -> Any:
        if self._embd_batch is None:
            batch = self._c.llama_batch_init(self._n_batch, self.n_embd, 1)
            if not batch.embd:
                raise EngineError("llama.cpp could not allocate an embedding batch")
            self._stack.callback(self._c.llama_batch_free, batch)
            for i in range(self._n_batch):
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
            self._embd_batch = batch
        return self._embd_batch

    def attach_vision(self, mmproj: Path, *, gpu: bool = False) -> Vision:
        """Load the model's vision tower from its mmproj (llama/vision.py), closed with the
        engine."""
        from localmix.llama.vision import Vision

        self._check()
        vision = Vision(self._model, self.n_embd, Path(mmproj), threads=self.n_threads, gpu=gpu)
        self._stack.callback(vision.close)
        self.vision = vision
        return vision

    def _step(self, token: int) -> None:
        self._one_token[0] = token
        self._one_pos[0] = len(self._kv)
        rc = self._c.llama_decode(self._ctx, self._one)
        if rc != 0:
            self._decode_failed(rc)
        self._kv.append(token)

    def _decode_failed(self, rc: int) -> None:
        self._sync_kv()  # after a fatal error, finished micro-batches stay in the cache
        meaning = _DECODE_ERRORS.get(rc, "fatal error")
        raise EngineError(f"llama_decode failed ({rc}, {meaning}): {LOG.last_error('no detail')}")

    def _sync_kv(self) -> None:
        """Make kv_tokens and the cache agree after an error or an interruption."""
        held = int(self._c.llama_memory_seq_pos_max(self._mem, 0)) + 1
        if held < len(self._kv):
            del self._kv[held:]
            self._kv_images = [s for s in self._kv_images if s[1] <= held]
        elif held > len(self._kv):
            self._c.llama_memory_seq_rm(self._mem, 0, len(self._kv), -1)

    def _reuse_prefix(self, prompt: list[int], images: Sequence[ImageSpan] = ()) -> int:
        """Keep the longest common prefix of the cache and the prompt; returns its length. An
        image counts as the same only when its key is (two images of one size have the same
        token ids); the prefix never ends inside one."""
        kv, n = self._kv, common_prefix(self._kv, prompt)
        wanted = {(s.start, s.end, s.key) for s in images}
        for start, end, key in self._kv_images:
            if start < n and (start, end, key) not in wanted:
                n = min(n, start)
        for span in images:
            if span.start < n < span.end:
                n = span.start
        if n < len(kv):
            if not self._c.llama_memory_seq_rm(self._mem, 0, n, -1):
                self._c.llama_memory_clear(self._mem, True)  # e.g. a sliding-window cache
                n = 0
            del kv[n:]
        self._kv_images = [s for s in self._kv_images if s[1] <= n]
        return n

    # -- generation ----------------------------------------------------------------------------

    def stream(
        self,
        prompt: Sequence[int],
        *,
        sampling: Sampling = Sampling(),  # noqa: B008 (frozen record)
        max_tokens: int = 512,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        logprobs: int | None = None,
        grammar: str | None = None,
    ) -> Iterator[Chunk | Stats]:
        """Generate after prompt: Chunks of text, then Stats last. ignore_eos keeps going past
        end-of-generation tokens (benchmarks); logprobs gives each Chunk its token's
        log-probability with that many alternatives; grammar constrains the reply
        (llama/constraint.py). Raises ContextTooLong if the prompt alone does not fit. A token
        is in the KV cache by the time its Chunk is handed out (the last one excepted)."""
        gen = Generation(prompt, sampling, max_tokens, tuple(stop), ignore_eos, logprobs, grammar)
        return self.generate(gen)

    def generate(self, gen: Generation) -> Iterator[Chunk | Stats]:
        """stream() for a Generation record."""
        self._check()
        prompt = checked_prompt(
            gen, self.n_vocab, self.n_ctx,
            hint="shorten the conversation or use a larger context size",
        )  # fmt: skip
        self._live = self._generate(gen, prompt)
        return self._live

    def _generate(self, gen: Generation, prompt: list[int]) -> Iterator[Chunk | Stats]:
        """Drive the generation core (llama/generation.py) on sequence 0."""
        state: Generating | None = None
        try:
            cached = self._reuse_prefix(prompt, gen.images)
            state = Generating(self, gen, prompt, cached=cached, n_ctx=self.n_ctx)
            # The last prompt token is decoded alone, as it is when the rest comes from the
            # cache: a quantized matmul rounds differently in a batch of one than of many, so
            # this keeps a seeded reply the same whether its prompt was cached or not.
            ahead = state.pending[:-1]
            state.image_s = self._decode_prompt(ahead, gen.images)
            state.decoded(len(ahead))
            step, sample, decoded = self._step, state.sample, state.decoded
            step(state.pending[0])
            decoded(1)
            self._c.llama_synchronize(self._ctx)
            while True:
                chunks = sample(-1)
                # Decode the token before handing out its text: on a GPU llama_decode only queues
                # the work, so the caller's time with the text (rendering, printing) overlaps it.
                # On the CPU, where llama_decode returns when done, the order changes nothing.
                if not state.done:
                    step(state.pending[0])
                    decoded(1)
                yield from chunks
                if state.done:
                    break
        finally:
            if not self._closed:
                self._sync_kv()
            if state is None:
                self.last_stats = _no_stats()
            else:
                state.close()
                if state.prompt_left and not self._closed:
                    # interrupted while reading the prompt: count what reached the cache
                    state.decoded(max(0, len(self._kv) - state.kv_len))
                self.last_stats = state.stats()
        yield self.last_stats


def _no_stats() -> Stats:
    """The Stats of a stream that failed before it started (e.g. no sampler chain)."""
    return Stats(0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, "interrupted")
