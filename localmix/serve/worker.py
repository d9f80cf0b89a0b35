"""A loaded model's own process: the server never runs llama.cpp in its own.

Each model the server loads runs in a worker process (spawned, not forked: the server has
threads) that opens it through the one door (load.open_model) and runs its Scheduler. The server
keeps only the model's vocabulary (a vocab_only Engine: prompts and pieces), sends each request's
Generation down a pipe and gets every step's events back, one message per step. A worker that dies
(a signal, an abort inside llama.cpp, the out-of-memory killer) is an EngineError for the requests
it was serving, naming the model and the signal; the registry then loads the model afresh for the
next request, and every other model and client carries on.
"""

from __future__ import annotations

import contextlib
import itertools
import signal
import threading
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from localmix.errors import EngineError, LocalmixError
from localmix.llama.records import Chunk, Stats
from localmix.serve.scheduler import Busy, Job, to_loops

if TYPE_CHECKING:
    from collections.abc import Callable
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess

    from localmix.llama.batch import Batch, Generation
    from localmix.llama.offload import Plan
    from localmix.load import LoadSettings
    from localmix.models.store import Located

Event = tuple[int, Chunk | Stats | LocalmixError]
STOP_S = 30.0  # how long a closing worker may take to finish before it is killed


@dataclass(frozen=True)
class BatchState:
    """A worker's batch as it stands between two steps: sequences generating, and per sequence
    the tokens its KV cache holds and the cells llama.cpp counts for it."""

    active: int
    kv: tuple[tuple[int, ...], ...]
    cells: tuple[int, ...]


@dataclass(frozen=True)
class Started:
    """What a worker reports once its model is loaded."""

    n_ctx: int
    seq_ctx: int
    n_seq: int
    plan: Plan | None
    notices: tuple[str, ...]


class Worker:
    """The server's handle on one model's worker process, with a Scheduler's interface:
    submit, cancel, load, broken, finished, close. Start it with Worker.start (blocking: it waits
    for the model to load)."""

    def __init__(
        self,
        name: str,
        process: BaseProcess,
        conn: Connection,
        started: Started,
        queue_limit: int,
    ) -> None:
        self.name = name
        self.process = process
        self.seq_ctx, self.n_seq, self.n_ctx = started.seq_ctx, started.n_seq, started.n_ctx
        self.plan, self.notices = started.plan, started.notices
        self.queue_limit = queue_limit
        self.broken: LocalmixError | None = None  # set when the process died
        self.finished: Counter[str] = Counter()  # finish reasons (and "error") so far
        self.on_death: Callable[[], None] | None = None  # called from the reader thread
        self._conn = conn
        self._lock = threading.Lock()  # jobs, ids and sending
        self._ids = itertools.count()
        self._of: dict[Job, int] = {}
        self._jobs: dict[int, Job] = {}  # waiting or running
        self._gone: dict[int, Job] = {}  # cancelled, until the worker says it let them go
        self._asked: dict[int, Future[Any]] = {}  # state() calls awaiting their answer
        self._closing = False
        self._reader = threading.Thread(target=self._read, name=f"localmix-{name}", daemon=True)
        self._reader.start()

    @classmethod
    def start(
        cls, name: str, target: Located, settings: LoadSettings, *, parallel: int, queue_limit: int
    ) -> Worker:
        """Spawn the worker and wait until it has loaded the model: its load error is raised
        here (a LocalmixError as the worker raised it, or an EngineError if it died)."""
        import multiprocessing
        from dataclasses import replace

        context = multiprocessing.get_context("spawn")
        target = replace(target)  # without the header read here: the worker reads its own
        ours, theirs = context.Pipe()
        process = context.Process(
            target=_serve_model, args=(theirs, target, settings, parallel), daemon=True,
            name=f"localmix-worker-{name}",
        )  # fmt: skip
        process.start()
        theirs.close()
        try:
            message = _first_message(ours, process)
        except BaseException:
            _stop(process, 0)
            ours.close()
            raise
        if message is None:
            process.join(STOP_S)
            ours.close()
            raise _death(name, process, "while loading it")
        if message[0] == "failed":
            process.join(STOP_S)
            ours.close()
            raise message[1]
        return cls(name, process, ours, message[1], queue_limit)

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def load(self) -> int:
        """Requests running or waiting."""
        with self._lock:
            return len(self._jobs)

    def submit(self, job: Job) -> None:
        """Send a job to the worker; Busy when queue_limit jobs already wait for a sequence."""
        with self._lock:
            if self.broken is not None:
                raise self.broken
            if self._closing:
                raise Busy("the model is being unloaded", hint="send the request again")
            waiting = len(self._jobs) - self.n_seq
            if waiting >= self.queue_limit:
                raise Busy(
                    f"{waiting} requests already wait for this model",
                    hint="retry later, or serve with a larger --queue or --parallel",
                )
            seq = next(self._ids)
            job.scheduler = self  # type: ignore[assignment]
            self._of[job], self._jobs[seq] = seq, job
            self._send(("submit", seq, job.gen))

    def cancel(self, job: Job) -> None:
        """Stop the job's generation (its KV cells are freed in the worker)."""
        with self._lock:
            seq = self._of.get(job)
            if seq is None or seq not in self._jobs:
                return
            self._gone[seq] = self._jobs.pop(seq)
            with contextlib.suppress(LocalmixError):  # a dead worker has stopped it already
                self._send(("cancel", seq))

    def state(self, timeout: float = 30.0) -> BatchState:
        """The worker's batch between two steps (what tests and diagnostics look at)."""
        answer: Future[BatchState] = Future()
        with self._lock:
            if self.broken is not None:
                raise self.broken
            asked = next(self._ids)
            self._asked[asked] = answer
            self._send(("state", asked))
        return answer.result(timeout)

    def close(self) -> None:
        """Stop every job (waiting ones get Busy), end the process (killed if it does not end
        within STOP_S seconds); safe to call twice."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            with contextlib.suppress(LocalmixError):
                self._send(("close",))
        self._reader.join(STOP_S)
        _stop(self.process, STOP_S)
        self._conn.close()

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            self._conn.send(message)
        except (OSError, ValueError):  # the worker is gone; the reader says why
            raise self.broken or EngineError(f"the worker for {self.name} has stopped") from None

    # -- the reader thread ---------------------------------------------------------------------

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "events":
                self._events(message[1])
            elif kind == "dropped":
                with self._lock:
                    self._gone.pop(message[1], None)
            elif kind == "state":
                with self._lock:
                    answer = self._asked.pop(message[1], None)
                if answer is not None:
                    _settle(answer, message[2])
            elif kind == "closed":
                break
        if not self._closing:
            self._died()

    def _events(self, events: list[Event]) -> None:
        out: list[tuple[Job, Chunk | Stats | BaseException]] = []
        with self._lock:
            for seq, item in events:
                job = self._jobs.get(seq)
                if isinstance(item, (Stats, BaseException)):
                    self._jobs.pop(seq, None)
                    gone = self._gone.pop(seq, None)
                    self.finished[item.finish_reason if isinstance(item, Stats) else "error"] += 1
                    self._of.pop(job or gone, None)  # type: ignore[arg-type]
                if job is not None:
                    out.append((job, item))
        to_loops(out)

    def _died(self) -> None:
        """The process ended on its own: every job gets the error, and so does what comes next."""
        self.process.join(5)
        error = _death(self.name, self.process, "")
        with self._lock:
            self.broken = error
            jobs = list(self._jobs.values())
            self._jobs.clear()
            self._gone.clear()
            self._of.clear()
            self.finished["error"] += len(jobs)
            asked, self._asked = list(self._asked.values()), {}
        for answer in asked:
            answer.set_exception(error)
        to_loops([(job, error) for job in jobs])
        if self.on_death is not None:
            self.on_death()


def _first_message(conn: Connection, process: BaseProcess) -> Any:
    """The worker's first message, or None if it died before sending one."""
    from multiprocessing.connection import wait

    wait([conn, process.sentinel])  # whichever comes first: a message, or its end
    if not conn.poll(0):
        return None
    try:
        return conn.recv()
    except (EOFError, OSError):
        return None


def _death(name: str, process: BaseProcess, when: str) -> EngineError:
    """The error a dead worker is for its requests: the model, and the signal or exit code."""
    code = process.exitcode
    if code is not None and code < 0:
        try:
            how = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"killed by signal {-code}"
    else:
        how = f"exited with code {code}" if code is not None else "stopped answering"
    where = f" {when}" if when else ""
    return EngineError(
        f"the worker running {name} died{where} ({how})",
        hint="the next request loads the model again; the server log has llama.cpp's last words",
    )


def _stop(process: BaseProcess, wait: float) -> None:
    process.join(wait)
    if process.is_alive():
        process.kill()
        process.join()


def _settle(answer: Future[Any], value: Any) -> None:
    if isinstance(value, BaseException):
        answer.set_exception(value)
    else:
        answer.set_result(value)


# -- the worker process --------------------------------------------------------------------------


class _Task:
    """A job inside the worker: what the Scheduler needs of one."""

    def __init__(self, seq: int, gen: Generation) -> None:
        self.id, self.gen = seq, gen
        self.seq: int | None = None
        self.scheduler: Any = None


def _batch_state(batch: Batch) -> BatchState:
    seqs = range(batch.n_seq)
    return BatchState(
        batch.active, tuple(batch.kv_tokens(s) for s in seqs), tuple(batch.cells(s) for s in seqs)
    )


def _serve_model(conn: Connection, target: Located, settings: LoadSettings, parallel: int) -> None:
    """The worker's main: load, say so, then run the Scheduler on what the server sends until
    it says close (or goes away)."""
    # Ctrl-C reaches the whole process group: the server decides when its workers stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from localmix import load
    from localmix.serve.scheduler import Scheduler

    sending = threading.Lock()
    tasks: dict[int, _Task] = {}

    def send(message: tuple[Any, ...]) -> None:
        with sending, contextlib.suppress(OSError):  # the server went away: nobody listens
            conn.send(message)

    def deliver(out: list[tuple[Any, Chunk | Stats | BaseException]]) -> None:
        events: list[Event] = []
        for task, item in out:
            if isinstance(item, (Stats, BaseException)):
                tasks.pop(task.id, None)
            events.append((task.id, _portable(item)))
        send(("events", events))

    try:
        loaded = load.open_model(target, settings)
        engine = loaded.engine
        # the server counts what waits (Worker.submit): here every job it sends may queue
        scheduler = Scheduler(
            engine, seq_ctx=engine.n_ctx // parallel, queue_limit=1 << 30, name=target.name,
            deliver=deliver,
        )  # fmt: skip
    except LocalmixError as error:
        send(("failed", error))
        return
    except Exception as error:  # a bug: said as an error of the engine, not a pickling failure
        send(("failed", EngineError(f"the worker could not load the model: {error!r}")))
        return
    started = Started(engine.n_ctx, scheduler.batch.seq_ctx, scheduler.batch.n_seq,
                      loaded.plan, loaded.notices)  # fmt: skip
    send(("ready", started))
    try:
        _obey(conn, scheduler, tasks, send)
    finally:
        scheduler.close()
        loaded.close()
        send(("closed",))


def _obey(
    conn: Connection,
    scheduler: Any,
    tasks: dict[int, _Task],
    send: Callable[[tuple[Any, ...]], None],
) -> None:
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the server is gone
        kind = message[0]
        if kind == "submit":
            task = tasks[message[1]] = _Task(message[1], message[2])
            try:
                scheduler.submit(task)
            except LocalmixError as error:
                tasks.pop(task.id, None)
                send(("events", [(task.id, error)]))
                if scheduler.broken is not None:
                    return  # its batch loop died of a bug: a fresh worker is the way out
        elif kind == "cancel":
            task = tasks.pop(message[1], None)
            if task is not None and scheduler.cancel(task):
                send(("dropped", task.id))
        elif kind == "state":
            try:
                send(("state", message[1], scheduler.call(_batch_state)))
            except LocalmixError as error:
                send(("state", message[1], error))
        elif kind == "close":
            return


def _portable(item: Chunk | Stats | BaseException) -> Chunk | Stats | LocalmixError:
    """item as it can cross the pipe: errors other than localmix's become an EngineError."""
    if isinstance(item, BaseException) and not isinstance(item, LocalmixError):
        return EngineError(f"the model's batch loop stopped: {item!r}")
    return item  # type: ignore[return-value]
