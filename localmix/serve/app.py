"""The ASGI app (Starlette) and what the OpenAI and Ollama routes share: reading a bounded JSON
body, validating it, the status code of each error, holding a model and a job for one request,
and noticing a client that left (its generation is cancelled and its KV cells freed)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from localmix.errors import ContextTooLong, LocalmixError, ModelNotFound, UsageError
from localmix.llama.records import Chunk, Stats
from localmix.serve.scheduler import Busy, Job

if TYPE_CHECKING:
    from pydantic import BaseModel
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

    from localmix.llama.batch import Generation
    from localmix.serve.guard import Policy
    from localmix.serve.models import Model, Registry, Unset

T = TypeVar("T")
Model_T = TypeVar("Model_T", bound="BaseModel")

MAX_BODY = 16 * 1024 * 1024  # bytes: far above any prompt a context holds


class TooLarge(LocalmixError):
    """The request body is larger than the server reads."""


class BadField(UsageError):
    """A request field that is missing or wrong; param names it (OpenAI's error "param")."""

    def __init__(self, param: str, message: str, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.param = param


class NotFound(LocalmixError):
    """Something other than a model that a request names and the server does not have."""


class ClientGone(Exception):
    """The client disconnected; nothing is left to answer."""


# error class -> HTTP status, subclasses first
STATUS: tuple[tuple[type[LocalmixError], int], ...] = (
    (Busy, 503),
    (TooLarge, 413),
    (ModelNotFound, 404),
    (NotFound, 404),
    (ContextTooLong, 400),
    (UsageError, 400),
)


def status_of(error: LocalmixError) -> int:
    """The HTTP status for an error: 400 bad input, 404 unknown model, 413, 503 busy, else 500."""
    return next((status for kind, status in STATUS if isinstance(error, kind)), 500)


def dumps(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


async def read_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object: TooLarge past MAX_BODY, UsageError when it is not JSON."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise TooLarge(f"the request body is {declared} bytes; the limit is {MAX_BODY}")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_BODY:
            raise TooLarge(f"the request body is over the limit of {MAX_BODY} bytes")
    try:
        data = json.loads(body)
    except ValueError as e:
        raise UsageError(f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UsageError("the body must be a JSON object")
    where = _unencodable(data)
    if where is not None:  # valid JSON ("\ud800"), but no text: it has no UTF-8 form
        raise BadField(where, f"{where}: a lone UTF-16 surrogate is not text")
    return data


def _unencodable(value: Any, where: str = "") -> str | None:
    """The path of the first string (key or value) in value holding a lone surrogate."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "body"
        return None
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return None
    for key, item in items:
        path = f"{where}.{key}" if where else str(key)
        found = _unencodable(key, path) if isinstance(value, dict) else None
        found = found or _unencodable(item, path)
        if found is not None:
            return found
    return None


def parse(kind: type[Model_T], data: dict[str, Any]) -> Model_T:
    """data validated as `kind`; UsageError naming the first field that is wrong."""
    from pydantic import ValidationError

    try:
        return kind.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise BadField(where, f"{where}: {first['msg']}") from None


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_gone(request: Request, work: Awaitable[T]) -> T:
    """Await work; if the client disconnects first, cancel it and raise ClientGone."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    if task.cancelled():
        raise ClientGone
    return task.result()


@dataclass
class Run:
    """One generation in flight: the model held for it, its job, the prompt and its first event
    (awaited before answering, so an error still gets its status code)."""

    registry: Registry
    model: Model
    job: Job
    prompt: list[int]
    first: Chunk | Stats
    _events: AsyncIterator[Chunk | Stats]
    acquire_s: float = 0.0  # seconds spent getting the model (its load, if this request did it)
    _held: bool = True

    async def events(self) -> AsyncIterator[Chunk | Stats]:
        """Every event, the first included; the model is released at the end (or on leaving)."""
        try:
            yield self.first
            if self.job.stats is None:
                async for item in self._events:
                    yield item
        finally:
            self.close()

    async def collect(self) -> tuple[list[Chunk], Stats]:
        chunks: list[Chunk] = []
        async for item in self.events():
            if isinstance(item, Chunk):
                chunks.append(item)
        assert self.job.stats is not None
        return chunks, self.job.stats

    def response(
        self, body: AsyncIterator[bytes], media_type: str, headers: dict[str, str] | None = None
    ) -> Response:
        """A streamed response of body that closes the run however it ends: a client that
        leaves before the first piece never starts body, so body's own cleanup cannot be it."""
        from starlette.background import BackgroundTask
        from starlette.responses import StreamingResponse

        async def close() -> None:
            self.close()

        return StreamingResponse(
            body, media_type=media_type, headers=headers, background=BackgroundTask(close)
        )

    def close(self) -> None:
        """Stop the job if it still runs, and let the model go (once)."""
        self.job.cancel()
        if self._held:
            self._held = False
            self.registry.release(self.model)


async def start(
    request: Request,
    registry: Registry,
    name: str,
    keep_alive: float | Unset | None,
    prompt_of: Callable[[Model], list[int]],
    generation_of: Callable[[Model, list[int]], Generation],
) -> Run:
    """Hold the model (loading it if needed), build the prompt, queue the job and wait for its
    first event; the client leaving at any point cancels what was started."""
    started = time.perf_counter()
    model = await unless_gone(request, registry.acquire(name, keep_alive))
    acquire_s = time.perf_counter() - started
    try:
        prompt = prompt_of(model)
        job = Job(generation_of(model, prompt))
        model.worker.submit(job)
        events = job.events()
        first = await unless_gone(request, events.__anext__())
    except BaseException:
        registry.release(model)
        raise
    return Run(registry, model, job, prompt, first, events, acquire_s)


def build_app(registry: Registry, policy: Policy | None = None) -> Starlette:
    """The app: OpenAI routes under /v1, Ollama's under /api, and / saying it runs, behind the
    guard (serve/guard.py: host names, origins, API keys)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    from localmix.serve import guard, ollama, openai, responses

    async def root(_: Request) -> PlainTextResponse:
        return PlainTextResponse("localmix is running")

    async def internal(request: Request, error: Exception) -> JSONResponse:
        # a bug, said in the API's own shape (never Starlette's text/plain page)
        message = f"internal error: {type(error).__name__}"
        return JSONResponse(guard.error_body(request.url.path, 500, message), status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        registry.start()
        try:
            yield
        finally:
            await registry.close()

    routes = [
        Route("/", root, methods=["GET", "HEAD"]),
        *openai.routes(registry),
        *responses.routes(registry),
        *ollama.routes(registry),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[Middleware(guard.Guard, policy=policy or guard.Policy())],
        exception_handlers={Exception: internal},
    )
