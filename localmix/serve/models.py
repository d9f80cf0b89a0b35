"""The models a server has loaded: loaded on first use through the one door (load.open_model),
kept for a keep-alive time after their last request, unloaded when another needs the room.

Every store name addresses a model, as do the names that pulled it (store.locate); a .gguf path
only when it was named on the command line (an HTTP client never picks files to open). Two names
of one file share one loaded copy. Room is counted, not measured: each model holds its file and
its KV cache in bytes (mmap'd weights show up as page cache, so free memory would not say), and a
load that would pass the memory budget or the model count first unloads the idle models used least
recently. Loads and unloads run in worker threads; the asyncio loop never waits on llama.cpp.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from localmix.errors import ModelNotFound, UsageError
from localmix.serve.scheduler import Busy

if TYPE_CHECKING:
    from localmix.chat.profile import ChatProfile
    from localmix.llama.engine import Engine
    from localmix.load import LoadSettings
    from localmix.models.store import Located, Manifest
    from localmix.serve.worker import Worker


class Unset(enum.Enum):
    """A request that says nothing about keep-alive leaves the model's as it is."""

    UNSET = "unset"


UNSET = Unset.UNSET


@dataclass(frozen=True)
class ServeOptions:
    """How the server runs its models: sequences per model, requests that may wait for one,
    seconds a model stays loaded after its last request (None: forever), the most models at
    once, and the memory they may hold in bytes (None: 90% of this machine's RAM)."""

    parallel: int = 4
    queue: int = 64
    keep_alive: float | None = 300.0
    max_models: int = 3
    memory_budget: int | None = None


@dataclass(frozen=True)
class Listed:
    """A name a server offers: the name, its file, its manifest (None: a name given at start)."""

    name: str
    target: Located
    manifest: Manifest | None


@dataclass(eq=False)
class Model:
    """A loaded model: its worker process (serve/worker.py) and, here, its vocabulary (prompts
    and pieces). users: requests using it now; retired: its worker died, so a fresh copy takes
    its place and this one closes when its last request lets go."""

    name: str
    target: Located
    engine: Engine  # vocab_only
    worker: Worker
    profile: ChatProfile  # its chat format and thinking, as every chat gets them (chat/profile)
    memory: int  # bytes counted against the budget: file and KV cache
    keep_alive: float | None
    loaded_at: float
    load_s: float
    users: int = 0
    last_used: float = field(default_factory=time.monotonic)
    expires_at: float | None = None  # monotonic seconds; None: never
    retired: bool = False

    @property
    def key(self) -> Path:
        return self.target.path.resolve()


class Registry:
    """The loaded models of one server, by file; acquire() and release() them from the loop."""

    def __init__(
        self,
        settings: LoadSettings,
        options: ServeOptions,
        named: Sequence[tuple[str, Located]] = (),
    ) -> None:
        from dataclasses import replace

        from localmix import load
        from localmix import settings as app_settings

        self.settings = replace(settings, parallel=options.parallel)
        self.options = options
        self.named = dict(named)  # names given on the command line (paths allowed)
        # what would fail at the first load is said now: threads, context, KV cache memory
        if self.settings.threads is not None:
            app_settings.check_threads(self.settings.threads)
        for target in self.named.values():
            load.check(target, self.settings)
        if len({t.path.resolve() for t in self.named.values()}) > options.max_models:
            raise UsageError(
                f"{len(self.named)} models are named to load at start; at most "
                f"{options.max_models} are loaded at once",
                hint="name fewer, or serve with a larger --max-models",
            )
        self._models: dict[Path, Model] = {}
        self._loads: dict[Path, asyncio.Task[Model]] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # unloads under way
        self._room = asyncio.Lock()  # one load or eviction decision at a time
        self._reaper: asyncio.Task[None] | None = None
        self.loads = 0  # models loaded so far (a request that ran nothing loads nothing)

    # -- lookup --------------------------------------------------------------------------------

    def locate(self, reference: str) -> Located:
        """The model a request names: a name given at start, else a store name (or the name
        that pulled it), never a path; ModelNotFound otherwise."""
        from localmix.models import store

        if not isinstance(reference, str) or not reference.strip():
            raise ModelNotFound("no model named", hint="give the name of a model in the store")
        reference = reference.strip()
        names = [reference]
        if reference.endswith(":latest"):  # Ollama clients add it to bare names
            names.append(reference.removesuffix(":latest"))
        for name in names:
            if name in self.named:
                return self.named[name]
        for name in names:
            found = store.find(name) if name.strip() else []
            if found:
                manifest = store.get(name)  # the preferred quant when several are installed
                return store.Located(
                    manifest.file, manifest.ref, manifest.chat_format, manifest.context_length
                )
        installed = sorted({m.name for m in store.list_models()})
        raise ModelNotFound(
            f"model {reference!r} is not in the store",
            hint=f"pull it with `localmix pull {reference}`"
            + (f"; installed: {', '.join(installed)}" if installed else ""),
        )

    def listing(self) -> list[Listed]:
        """One entry per name, as /v1/models and /api/tags list them: the names given at start,
        then the store's models (name:quant) but those a name given at start already stands for
        (`serve mistral` lists mistral once, not also mistral:Q4_K_M). Two store names of one
        file are two entries, as Ollama lists a copied model."""
        from localmix.models import store

        out = [Listed(name, target, None) for name, target in self.named.items()]
        taken = {*self.named, *(t.name for t in self.named.values())}
        for manifest in store.list_models():
            if manifest.ref in taken:
                continue
            located = store.Located(
                manifest.file, manifest.ref, manifest.chat_format, manifest.context_length
            )
            out.append(Listed(manifest.ref, located, manifest))
        return out

    def running(self) -> list[Model]:
        """The loaded models, most recently used first."""
        return sorted(self._models.values(), key=lambda m: -m.last_used)

    def find_loaded(self, reference: str) -> Model | None:
        try:
            return self._models.get(self.locate(reference).path.resolve())
        except ModelNotFound:
            return None

    # -- use -----------------------------------------------------------------------------------

    async def acquire(self, reference: str, keep_alive: float | Unset | None = UNSET) -> Model:
        """The model `reference` names, loaded if needed and held (release() it after)."""
        target = self.locate(reference)
        key = target.path.resolve()
        while (model := self._models.get(key)) is None or model.worker.broken is not None:
            if model is not None:  # its worker died: load it afresh
                self._retire(model)
                continue
            load = self._loads.get(key)
            if load is None:
                load = self._loads[key] = asyncio.get_running_loop().create_task(
                    self._load(reference, target)
                )
                load.add_done_callback(partial(self._loaded, key))
            # shielded: a client that leaves while its model loads does not stop the load
            await asyncio.shield(load)
        model.users += 1
        model.expires_at = None
        model.last_used = time.monotonic()
        if not isinstance(keep_alive, Unset):
            model.keep_alive = keep_alive
        return model

    def _loaded(self, key: Path, load: asyncio.Task[Model]) -> None:
        self._loads.pop(key, None)
        if not load.cancelled():
            load.exception()  # retrieved here too: every waiter may have gone

    def release(self, model: Model) -> None:
        """The request is done with the model: start its keep-alive time (0: unload now).
        Not a coroutine, so a cancelled request's cleanup cannot be cut short."""
        model.users -= 1
        model.last_used = time.monotonic()
        if model.retired:
            if model.users == 0:
                self._close_soon(model)
            return
        if model.users > 0 or model.keep_alive is None:
            return
        if model.keep_alive <= 0:
            self._unload_soon(model)
        else:
            model.expires_at = model.last_used + model.keep_alive

    def _unload_soon(self, model: Model) -> None:
        task = asyncio.get_running_loop().create_task(self._unload(model))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _retire(self, model: Model) -> None:
        """A model whose worker died leaves the loaded set at once (the next request loads it
        afresh); it closes when its requests have their errors."""
        if self._models.get(model.key) is model:
            del self._models[model.key]
        if not model.retired:
            model.retired = True
            if model.users == 0:
                self._close_soon(model)

    def _close_soon(self, model: Model) -> None:
        loop = asyncio.get_running_loop()
        task = loop.create_task(asyncio.to_thread(_close, model))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _died(self, model: Model, loop: asyncio.AbstractEventLoop) -> None:
        """Called from the worker's reader thread when its process died."""
        with contextlib.suppress(RuntimeError):  # the loop has closed: the server is stopping
            loop.call_soon_threadsafe(self._retire, model)

    async def unload(self, reference: str) -> bool:
        """Unload the model now (once its requests finish); False if it was not loaded."""
        model = self.find_loaded(reference)
        if model is None:
            return False
        model.keep_alive = 0
        if model.users == 0:
            await self._unload(model)
        return True

    # -- loading and unloading -----------------------------------------------------------------

    async def _load(self, reference: str, target: Located) -> Model:
        async with self._room:
            need = self._need(target)
            await self._make_room(need)
            started = time.monotonic()
            loop = asyncio.get_running_loop()
            model = await loop.run_in_executor(None, self._open, reference, target, need)
            model.load_s = time.monotonic() - started
            model.worker.on_death = partial(self._died, model, loop)
            self._models[model.key] = model
            self.loads += 1
            return model

    def _need(self, target: Located) -> int:
        from localmix import load

        size = target.info.file_size
        return size + load.kv_bytes(target, self.settings, self.settings.kv_cells(target))

    def _budget(self) -> int:
        if self.options.memory_budget is not None:
            return self.options.memory_budget
        from localmix.llama.hardware import ram

        total, _ = ram()
        return int(total * 0.9) if total else 1 << 62

    async def _make_room(self, need: int) -> None:
        """Unload idle models, least recently used first, until one more of `need` bytes fits
        the budget and the model count; Busy when the ones in the way are all in use."""
        budget = self._budget()
        while self._models:
            held = sum(m.memory for m in self._models.values())
            if len(self._models) < self.options.max_models and held + need <= budget:
                return
            idle = [m for m in self._models.values() if m.users == 0]
            if not idle:
                raise Busy(
                    "every loaded model is in use and another does not fit beside them",
                    hint="retry when a request finishes, or serve with a larger --max-models",
                )
            await self._unload(min(idle, key=lambda m: m.last_used))

    def profile_of(self, target: Located) -> ChatProfile:
        """How the model chats (what /api/show's capabilities say): a loaded model's profile,
        else read from its vocabulary alone (blocking: call it in a thread)."""
        loaded = self._models.get(target.path.resolve())
        if loaded is not None and not loaded.retired:
            return loaded.profile
        from localmix.chat.profile import profile_for
        from localmix.llama.engine import Engine, EngineConfig

        with Engine(EngineConfig(target.path, vocab_only=True)) as engine:
            return profile_for(engine, target.chat_format, target.name)

    def _open(self, name: str, target: Located, need: int) -> Model:
        """Start the model's worker process (it loads through the door) and read its
        vocabulary here (in a worker thread of the server)."""
        from localmix.chat.profile import profile_for
        from localmix.llama.engine import Engine, EngineConfig
        from localmix.serve.worker import Worker

        engine = Engine(EngineConfig(target.path, vocab_only=True))
        try:
            profile = profile_for(engine, target.chat_format, target.name)
            worker = Worker.start(
                target.name, target, self.settings, parallel=self.options.parallel,
                queue_limit=self.options.queue,
            )  # fmt: skip
        except BaseException:
            engine.close()
            raise
        keep = None if name in self.named else self.options.keep_alive
        return Model(
            name=name if name in self.named else target.name,
            target=target,
            engine=engine,
            worker=worker,
            profile=profile,
            memory=need,
            keep_alive=keep,
            loaded_at=time.time(),
            load_s=0.0,
        )

    async def _unload(self, model: Model) -> None:
        if self._models.get(model.key) is not model:
            return
        del self._models[model.key]
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, _close, model)

    def preload(self) -> None:
        """Load the models named on the command line, in this thread, before serving (they
        stay until evicted or unloaded)."""
        for name, target in self.named.items():
            key = target.path.resolve()
            if key not in self._models:
                started = time.monotonic()
                model = self._open(name, target, self._need(target))
                model.load_s = time.monotonic() - started
                self._models[key] = model

    # -- keep-alive ----------------------------------------------------------------------------

    def start(self) -> None:
        """Begin unloading models whose keep-alive runs out (call from the serving loop)."""
        loop = asyncio.get_running_loop()
        for model in self._models.values():  # preloaded before the loop ran
            model.worker.on_death = partial(self._died, model, loop)
        if self._reaper is None:
            self._reaper = loop.create_task(self._reap())

    async def _reap(self) -> None:
        """Unload models whose keep-alive ran out, checking twice a second."""
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for model in list(self._models.values()):
                if model.users == 0 and model.expires_at is not None and model.expires_at <= now:
                    await self._unload(model)

    async def close(self) -> None:
        """Unload everything (server shutdown)."""
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for task in list(self._tasks):
            await task
        for model in list(self._models.values()):
            await self._unload(model)

    def close_now(self) -> None:
        """Unload whatever is still loaded, from this thread (after the loop has stopped, or
        when it never started)."""
        for model in list(self._models.values()):
            del self._models[model.key]
            _close(model)


def _close(model: Model) -> None:
    model.worker.close()
    model.engine.close()
