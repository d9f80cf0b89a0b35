"""The batch loop of one loaded model: a worker thread that owns the llama.cpp context.

llama.cpp contexts are not thread-safe, so every decode, sample and cache change of a model happens
on its one worker thread, which runs llama/batch.Batch: requests wait in a bounded queue, join the
batch between two decode steps when a sequence is free, and leave it when they finish or are
cancelled (a client that went away), which frees their KV cells. Tokens travel back to the asyncio
loop that asked, one call_soon_threadsafe per step (not per token), onto each Job's queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

from localmix.errors import LocalmixError
from localmix.llama.records import Chunk, Stats

if TYPE_CHECKING:
    from localmix.llama.batch import Batch, Generation
    from localmix.llama.engine import Engine

T = TypeVar("T")


class Busy(LocalmixError):
    """The server cannot take this request now (a full queue, every model in use): retry later."""


class Job:
    """One request's generation, seen from asyncio: submit it, then iterate its events."""

    def __init__(self, gen: Generation, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.gen = gen
        self.loop = loop or asyncio.get_running_loop()
        self.queue: asyncio.Queue[Chunk | Stats | BaseException] = asyncio.Queue()
        self.seq: int | None = None  # the sequence it runs on; set and cleared by the worker
        self.stats: Stats | None = None
        self.scheduler: Scheduler | None = None

    async def events(self) -> AsyncIterator[Chunk | Stats]:
        """Chunks, then the final Stats; an error of the engine is raised here. Leaving the loop
        early (a client gone) cancels the generation."""
        try:
            while True:
                item = await self.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, Stats):
                    self.stats = item
                yield item
                if isinstance(item, Stats):
                    return
        finally:
            if self.stats is None:
                self.cancel()

    def cancel(self) -> None:
        """Stop the generation (between two decode steps) and free its KV cells."""
        if self.scheduler is not None and self.stats is None:
            self.scheduler.cancel(self)


Deliver = Callable[[list[tuple[Any, Chunk | Stats | BaseException]]], None]


class Scheduler:
    """A worker thread running one Batch over `engine`; queue_limit requests may wait. Each
    step's events go to deliver (by default: onto each Job's asyncio queue; in a model worker
    process, down the pipe to the server)."""

    def __init__(
        self,
        engine: Engine,
        *,
        seq_ctx: int,
        queue_limit: int,
        name: str,
        deliver: Deliver | None = None,
    ) -> None:
        from localmix.llama.batch import Batch

        self.batch: Batch = Batch(engine, seq_ctx)
        self.queue_limit = queue_limit
        self._deliver = deliver or to_loops
        self._waiting: deque[Job] = deque()
        self._cancels: list[Job] = []
        self._calls: list[tuple[Callable[[Batch], Any], Future[Any]]] = []
        self._running: dict[int, Job] = {}  # sequence id -> job; touched by the worker only
        self._cond = threading.Condition()
        self._closing = False
        self.broken: LocalmixError | None = None  # set if the loop died of a bug
        self.finished: Counter[str] = Counter()  # finish reasons (and "error") so far
        self._thread = threading.Thread(target=self._run, name=f"localmix-{name}", daemon=True)
        self._thread.start()

    @property
    def load(self) -> int:
        """Requests running or waiting."""
        with self._cond:
            return len(self._running) + len(self._waiting)

    def submit(self, job: Job) -> None:
        """Queue a job; Busy when queue_limit jobs already wait for a sequence."""
        with self._cond:
            if self.broken is not None:
                raise self.broken
            if self._closing:
                raise Busy("the model is being unloaded", hint="send the request again")
            # running jobs are read without the worker's lock: a bound, not an exact count
            if len(self._waiting) + len(self._running) >= self.batch.n_seq + self.queue_limit:
                raise Busy(
                    f"{len(self._waiting)} requests already wait for this model",
                    hint="retry later, or serve with a larger --queue or --parallel",
                )
            job.scheduler = self
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> bool:
        """Stop job: True if it was still waiting (dropped, no event follows), else its
        generation ends between two steps with an "interrupted" Stats."""
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                return True
            self._cancels.append(job)
            self._cond.notify()
            return False

    def call(self, fn: Callable[[Batch], T]) -> T:
        """fn(batch), run on the worker thread between two steps (a Batch is not thread-safe)."""
        done: Future[T] = Future()
        with self._cond:
            if self._closing:
                raise Busy("the model is being unloaded")
            self._calls.append((fn, done))
            self._cond.notify()
        return done.result()

    def close(self) -> None:
        """Stop every job (waiting ones get Busy), stop the thread; the engine stays open."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()

    # -- the worker thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._turn():
                pass
        except Exception as error:  # a bug: every job gets an error instead of waiting forever
            from localmix.errors import EngineError

            self.broken = EngineError(f"the model's batch loop stopped: {error!r}")
            with self._cond:
                self._closing = True
            jobs = [*self._running.values(), *self._waiting]
            self._running.clear()
            self._deliver([(job, self.broken) for job in jobs])
            self._fail_calls(self.broken)
            return
        self._shut()
        self._fail_calls(Busy("the model was unloaded"))

    def _fail_calls(self, error: LocalmixError) -> None:
        with self._cond:
            calls, self._calls = self._calls, []
        for _, done in calls:
            done.set_exception(error)

    def _turn(self) -> bool:
        """Admit, cancel and step once; False when the scheduler is closing."""
        batch = self.batch
        with self._cond:
            while not (
                self._closing or self._waiting or self._cancels or self._running or self._calls
            ):
                self._cond.wait()
            if self._closing:
                return False
            cancels, self._cancels = self._cancels, []
            calls, self._calls = self._calls, []
            admitted = []
            while self._waiting and batch.free > len(admitted):
                admitted.append(self._waiting.popleft())
        for fn, done in calls:
            try:
                done.set_result(fn(batch))
            except Exception as error:  # the caller's to see
                done.set_exception(error)
        out: list[tuple[Job, Chunk | Stats | BaseException]] = []
        for job in cancels:
            if job.seq is not None and self._running.get(job.seq) is job:
                out.append((job, batch.cancel(job.seq)))
                self._done(job)
                self.finished["interrupted"] += 1
        for job in admitted:
            try:
                job.seq = batch.start(job.gen)
                self._running[job.seq] = job
            except LocalmixError as error:
                out.append((job, error))
        if self._running:
            self._step(out)
        self._deliver(out)
        return True

    def _step(self, out: list[tuple[Job, Chunk | Stats | BaseException]]) -> None:
        try:
            events = self.batch.step()
        except LocalmixError as error:  # llama_decode failed: every running job ends with it
            for job in list(self._running.values()):
                assert job.seq is not None
                self.batch.cancel(job.seq)
                self._done(job)
                self.finished["error"] += 1
                out.append((job, error))
            return
        running = self._running
        for seq, item in events:
            job = running[seq]
            out.append((job, item))
            if isinstance(item, Stats):
                self._done(job)
                self.finished[item.finish_reason] += 1

    def _done(self, job: Job) -> None:
        assert job.seq is not None
        del self._running[job.seq]
        job.seq = None

    def _shut(self) -> None:
        out: list[tuple[Job, Chunk | Stats | BaseException]] = []
        for job in list(self._running.values()):
            assert job.seq is not None
            out.append((job, self.batch.cancel(job.seq)))
            self._done(job)
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        gone = Busy("the model was unloaded", hint="send the request again")
        out.extend((job, gone) for job in waiting)
        self._deliver(out)


def to_loops(out: list[tuple[Job, Chunk | Stats | BaseException]]) -> None:
    """Hand each event to its job's loop: one wake-up per loop per step."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, Chunk | Stats | BaseException]]]
    by_loop = {}
    for job, item in out:
        by_loop.setdefault(job.loop, []).append((job, item))
    for loop, items in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody listens
            loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[Job, Chunk | Stats | BaseException]]) -> None:
    for job, item in items:
        job.queue.put_nowait(item)
