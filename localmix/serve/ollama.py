"""Ollama's API, as much as its own clients use: /api/chat and /api/generate (newline-delimited
JSON when streamed, Ollama's default), /api/tags, /api/ps, /api/show, /api/version, and
keep_alive (a duration: "5m", 300, 0 unloads, negative stays). A chat with no messages or a
generate with no prompt loads the model (or, with keep_alive 0, unloads it), as `ollama run`
and `ollama stop` use them. Errors are Ollama's {"error": "..."} with the status code."""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Union

from pydantic import BaseModel, ConfigDict, Field

from localmix import __version__
from localmix.errors import LocalmixError, UsageError
from localmix.llama.records import Chunk, Stats
from localmix.serve import app, logprobs, prompts
from localmix.serve.models import UNSET, Unset

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from localmix.chat.toolcalls import Call
    from localmix.chat.tools import Tool
    from localmix.llama.batch import Generation
    from localmix.models.store import Located
    from localmix.serve.models import Model, Registry

FINISH = {"stop": "stop", "stop_string": "stop", "length": "length", "interrupted": "stop"}
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
FOREVER_AT = "2318-01-01T00:00:00Z"  # what a model that never unloads shows as its expiry


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class Options(_Body):
    temperature: Union[float, None] = Field(None, ge=0)  # noqa: UP007 - pydantic on 3.10
    top_p: Union[float, None] = Field(None, ge=0, le=1)  # noqa: UP007
    top_k: Union[int, None] = Field(None, ge=0)  # noqa: UP007
    min_p: Union[float, None] = Field(None, ge=0, le=1)  # noqa: UP007
    repeat_penalty: Union[float, None] = Field(None, gt=0)  # noqa: UP007
    repeat_last_n: Union[int, None] = Field(None, ge=-1)  # noqa: UP007
    seed: Union[int, None] = None  # noqa: UP007
    num_predict: Union[int, None] = Field(None, ge=-2)  # noqa: UP007
    stop: Union[list[str], None] = None  # noqa: UP007


class ChatMessage(_Body):
    role: str
    content: str = ""
    images: Union[list[Any], None] = None  # noqa: UP007
    tool_calls: Union[list[dict[str, Any]], None] = None  # noqa: UP007 - arguments: an object
    tool_name: Union[str, None] = None  # noqa: UP007 - a tool result: the function it answers
    tool_call_id: Union[str, None] = None  # noqa: UP007


class Base(_Body):
    model: str
    think: Union[bool, str, None] = None  # noqa: UP007 - a reasoning model's switch
    stream: bool = True
    options: Union[Options, None] = None  # noqa: UP007
    keep_alive: Union[str, float, None] = None  # noqa: UP007
    format: Union[str, dict[str, Any], None] = None  # noqa: UP007
    logprobs: bool = False
    top_logprobs: Union[int, None] = Field(None, ge=0, le=20)  # noqa: UP007


class ChatRequest(Base):
    messages: list[ChatMessage] = []
    tools: Union[list[Any], None] = None  # noqa: UP007


class GenerateRequest(Base):
    prompt: str = ""
    system: Union[str, None] = None  # noqa: UP007
    raw: bool = False
    suffix: Union[str, None] = None  # noqa: UP007
    images: Union[list[Any], None] = None  # noqa: UP007


def keep_alive_seconds(value: str | float | None) -> float | Unset | None:
    """Ollama's keep_alive: seconds as a number, or a Go duration ("5m", "1h30m", "-1");
    negative is forever (None), absent leaves the model's own (UNSET)."""
    if value is None:
        return UNSET
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = sign * float(body)
        except ValueError:
            parts = _DURATION.findall(body)
            if not parts or "".join(n + u for n, u in parts) != body:
                raise UsageError(
                    f"keep_alive {value!r} is not a duration", hint='use e.g. "5m", "30s", 0 or -1'
                ) from None
            seconds = sign * sum(float(n) * _UNITS[u] for n, u in parts)
    return None if seconds < 0 else seconds


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")


def _now() -> str:
    return _iso(time.time())


# options that size the runner, which the server's own flags decide: accepted and ignored
RESOURCE_OPTIONS = frozenset({
    "num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "num_keep", "use_mmap",
    "use_mlock", "low_vram", "f16_kv", "numa", "vocab_only", "logits_all",
})  # fmt: skip
# sampling options localmix has not got, at the value that turns them off (accepted as such)
NEUTRAL_OPTIONS = {
    "mirostat": 0, "typical_p": 1.0, "tfs_z": 1.0, "presence_penalty": 0.0,
    "frequency_penalty": 0.0, "penalize_newline": None,
}  # fmt: skip
# top-level fields Ollama defines that localmix does not honour (yet)
UNHONOURED = ("template", "context")


def _refuse_unsupported(req: Base) -> None:
    """A 400 naming the first field or option localmix would otherwise not honour."""
    extra = req.model_extra or {}
    for name in UNHONOURED:
        if extra.get(name):
            raise app.BadField(name, f"{name} is not supported")
    for name, value in ((req.options.model_extra or {}) if req.options else {}).items():
        if name in RESOURCE_OPTIONS or value is None:
            continue
        if name not in NEUTRAL_OPTIONS or NEUTRAL_OPTIONS[name] not in (None, value):
            raise app.BadField(
                f"options.{name}", f"option {name} is not supported",
                hint="localmix samples with temperature, top_k, top_p, min_p, repeat_penalty, "
                "repeat_last_n, seed, num_predict and stop",
            )  # fmt: skip
    if req.top_logprobs is not None and not req.logprobs:
        raise app.BadField("top_logprobs", "top_logprobs needs logprobs: true")
    if getattr(req, "images", None) and getattr(req, "raw", False):
        raise app.BadField("images", "images need a chat prompt: a raw prompt has no image tokens")
    if getattr(req, "suffix", None):
        raise UsageError("suffix (fill-in-the-middle) is not supported")


def generation(req: Base, model: Model, prompt: list[int]) -> Generation:
    from localmix.llama.batch import Generation
    from localmix.llama.records import Sampling

    opts = req.options or Options()
    picked: dict[str, Any] = {
        "temperature": opts.temperature, "top_p": opts.top_p or None, "top_k": opts.top_k,
        "min_p": opts.min_p, "repeat_penalty": opts.repeat_penalty,
        "repeat_last_n": opts.repeat_last_n,
        "seed": opts.seed if opts.seed is None or opts.seed >= 0 else None,
    }  # fmt: skip
    if opts.top_p == 0:
        picked["top_k"] = 1
    sampling = Sampling(**{k: v for k, v in picked.items() if v is not None})
    room = model.worker.seq_ctx - len(prompt)
    limit = opts.num_predict  # -1: no limit, -2: fill the context (both: the room left)
    return Generation(
        prompt, sampling, max_tokens=room if limit is None or limit < 0 else min(limit, room),
        stop=tuple(s for s in opts.stop or () if s),
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        grammar=reply_grammar(req, model),
    )  # fmt: skip


def error_response(error: LocalmixError) -> Response:
    from starlette.responses import JSONResponse

    message = error.message + (f" ({error.hint})" if error.hint else "")
    return JSONResponse({"error": message}, status_code=app.status_of(error))


# -- /api/chat and /api/generate ---------------------------------------------------------------


class Reply:
    """Ollama's response objects for one chat or generate request; a reasoning model's thinking
    goes in Ollama's own field ("thinking"), apart from the answer."""

    def __init__(self, req: Base, run: app.Run, chat: bool, started: float) -> None:
        self.req, self.run, self.chat, self.started = req, run, chat, started
        tools = bool(getattr(req, "tools", None))
        self.reply = prompts.Reply(run.model, chat or not getattr(req, "raw", False), tools)
        self._sent = 0  # tool calls already streamed

    def piece(
        self, text: str, done: bool, thinking: str = "", scored: Sequence[Chunk] = ()
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.req.model, "created_at": _now()}
        if self.chat:
            body["message"] = {"role": "assistant", "content": text}
            if thinking:
                body["message"]["thinking"] = thinking
        else:
            body["response"] = text
            if thinking:
                body["thinking"] = thinking
        if self.req.logprobs and scored:
            body["logprobs"] = logprobs.entries(scored, self.run.model.engine.token_piece)
        body["done"] = done
        return body

    def final(
        self,
        text: str,
        thinking: str,
        stats: Stats,
        tokens: list[int],
        scored: Sequence[Chunk] = (),
    ) -> dict[str, Any]:
        body = self.piece(text, done=True, thinking=thinking, scored=scored)
        ns = 1e9
        body.update(
            done_reason=FINISH[stats.finish_reason],
            total_duration=int((time.perf_counter() - self.started) * ns),
            load_duration=int(self.run.acquire_s * ns),
            prompt_eval_count=len(self.run.prompt),
            prompt_eval_duration=int(stats.prompt_s * ns),
            eval_count=stats.generated_tokens,
            eval_duration=int((stats.gen_s + (stats.ttft_s - stats.prompt_s)) * ns),
        )
        if not self.chat:
            body["context"] = self.run.prompt + tokens
        return body

    async def stream(self) -> AsyncIterator[bytes]:
        tokens: list[int] = []
        scored: list[Chunk] = []  # tokens whose logprobs go out with the next line
        try:
            async for item in self.run.events():
                if isinstance(item, Chunk):
                    if item.token >= 0:
                        tokens.append(item.token)
                    if item.logprob is not None:
                        scored.append(item)
                    shown = self.reply.feed(item)
                    if shown.text or shown.thinking:
                        piece = self.piece(shown.text, False, shown.thinking, scored)
                        yield app.dumps(piece) + b"\n"
                        scored = []
                    line = self._whole_calls(final=False) if shown.calls else b""
                    if line:
                        yield line
                    continue
                shown = self.reply.finish()
                if shown.text:
                    yield app.dumps(self.piece(shown.text, False, "", scored)) + b"\n"
                    scored = []
                line = self._whole_calls(final=True)
                if line:
                    yield line
                yield app.dumps(self.final("", "", item, tokens, scored)) + b"\n"
        except LocalmixError as error:
            yield app.dumps({"error": error.message}) + b"\n"

    def _whole_calls(self, *, final: bool) -> bytes:
        """A line with the calls completed since the last one (Ollama sends each call whole):
        every call but the one still streaming, or all of them at the end."""
        calls = self.reply.calls
        done = calls if final else calls[:-1]
        new = done[self._sent :]
        self._sent = len(done)
        if not new:
            return b""
        body = self.piece("", False)
        body["message"]["tool_calls"] = tool_calls(new, self._sent - len(new))
        return app.dumps(body) + b"\n"

    def whole(self, chunks: list[Chunk], stats: Stats) -> dict[str, Any]:
        shown = [self.reply.feed(c) for c in chunks] + [self.reply.finish()]
        text, thinking = "".join(s.text for s in shown), "".join(s.thinking for s in shown)
        tokens = [c.token for c in chunks if c.token >= 0]
        body = self.final(text, thinking, stats, tokens, chunks)
        if self.reply.calls and self.chat:
            body["message"]["tool_calls"] = tool_calls(self.reply.calls, 0)
        return body


def tool_calls(calls: Sequence[Call], first: int) -> list[dict[str, Any]]:
    """Ollama's message.tool_calls: arguments as an object, each call's index in the reply."""
    return [
        {"id": c.id, "function": {"index": first + i, "name": c.name,
                                  "arguments": _arguments(c.arguments)}}
        for i, c in enumerate(calls)
    ]  # fmt: skip


def _arguments(text: str) -> Any:
    try:
        return json.loads(text) if text.strip() else {}
    except ValueError:
        return text  # cut off mid-arguments: what there is, as text


def routes(registry: Registry) -> list[Route]:
    from starlette.routing import Route

    async def chat(request: Request) -> Response:
        return await _answer(request, registry, ChatRequest, chat=True)

    async def generate(request: Request) -> Response:
        return await _answer(request, registry, GenerateRequest, chat=False)

    async def tags(_: Request) -> Response:
        return _json({"models": _tags(registry)})

    async def ps(_: Request) -> Response:
        return _json({"models": [_running(m) for m in registry.running()]})

    async def show(request: Request) -> Response:
        try:
            data = await app.read_json(request)
            name = data.get("model") or data.get("name")
            if not isinstance(name, str):
                raise UsageError("model: Field required")
            target = registry.locate(name)
            return _json(_show(target, await _capabilities(registry, target)))
        except LocalmixError as error:
            return error_response(error)

    async def version(_: Request) -> Response:
        return _json({"version": __version__})

    return [
        Route("/api/chat", chat, methods=["POST"]),
        Route("/api/generate", generate, methods=["POST"]),
        Route("/api/tags", tags, methods=["GET"]),
        Route("/api/ps", ps, methods=["GET"]),
        Route("/api/show", show, methods=["POST"]),
        Route("/api/version", version, methods=["GET"]),
    ]


def _json(data: Any) -> Response:
    from starlette.responses import JSONResponse

    return JSONResponse(data)


def chat_messages(req: ChatRequest) -> list[prompts.Message]:
    """Ollama's messages: tool calls with arguments as objects, results by tool_name."""
    from localmix.chat.tools import ToolCall

    return [
        prompts.message(
            m.role,
            with_images(m.content, m.images, f"messages[{i}].images"),
            tool_call_id=m.tool_call_id,
            name=m.tool_name,
            tool_calls=[
                ToolCall.from_openai(c, where=f"messages[{i}].tool_calls[{j}]")
                for j, c in enumerate(m.tool_calls or ())
            ],
        )
        for i, m in enumerate(req.messages)
    ]


def with_images(text: str, images: list[Any] | None, where: str) -> prompts.Content:
    """Ollama's message: its text, then its images (base64) as Picture parts."""
    from localmix.serve import media

    if not images:
        return text
    pictures = [media.from_base64(b, f"{where}[{k}]").picture() for k, b in enumerate(images)]
    return (text, *pictures) if text else tuple(pictures)


def chat_tools(req: Base) -> list[Tool]:
    from localmix.chat.tools import Tool

    tools = getattr(req, "tools", None) or ()
    return [Tool.from_openai(t, where=f"tools[{i}]") for i, t in enumerate(tools)]


def thinking(req: Base) -> bool | None:
    """Ollama's think: true/false, or an effort ("low", "medium", "high") that means on."""
    return None if req.think is None else req.think not in (False, "none", "false")


def reply_grammar(req: Base, model: Model) -> str | None:
    """The grammar the reply must follow: Ollama's format ("json" or a schema), tool calls."""
    from localmix.chat import grammars

    try:
        output = grammars.ollama_format(req.format)
    except UsageError as error:
        raise app.BadField("format", error.message, error.hint) from None
    raw = isinstance(req, GenerateRequest) and req.raw
    if raw and output is not None:
        return grammars.json_grammar(output)  # a raw prompt: no chat format around the JSON
    return prompts.reply_grammar(model, thinking(req), tools=chat_tools(req), output=output)


def _prompt_of(req: Base, chat: bool) -> Callable[[Model], list[int]] | None:
    """How to build the prompt, or None for a request that only loads or unloads."""
    think = thinking(req)
    if isinstance(req, ChatRequest):
        if not req.messages:
            return None
        messages, tools = chat_messages(req), chat_tools(req)
        return lambda model: prompts.chat_tokens(model, messages, think, tools)
    assert isinstance(req, GenerateRequest)
    if not req.prompt:
        return None
    if req.raw:
        return lambda model: prompts.text_tokens(model, req.prompt)
    head = [prompts.message("system", req.system)] if req.system else []
    messages = [*head, prompts.message("user", with_images(req.prompt, req.images, "images"))]
    return lambda model: prompts.chat_tokens(model, messages, think)


async def _answer(
    request: Request, registry: Registry, kind: type[Base], *, chat: bool
) -> Response:
    from starlette.responses import Response

    started = time.perf_counter()
    try:
        req = app.parse(kind, await app.read_json(request))
        _refuse_unsupported(req)
        keep_alive = keep_alive_seconds(req.keep_alive)
        prompt_of = _prompt_of(req, chat)
        if prompt_of is None:
            return await _load_only(request, registry, req, keep_alive, chat)
        run = await app.start(
            request, registry, req.model, keep_alive, prompt_of,
            lambda model, prompt: generation(req, model, prompt),
        )  # fmt: skip
        reply = Reply(req, run, chat, started)
        if req.stream:
            return run.response(reply.stream(), "application/x-ndjson")
        chunks, stats = await app.unless_gone(request, run.collect())
        return _json(reply.whole(chunks, stats))
    except LocalmixError as error:
        return error_response(error)
    except app.ClientGone:
        return Response(status_code=499)


async def _load_only(
    request: Request, registry: Registry, req: Base, keep_alive: float | Unset | None, chat: bool
) -> Response:
    """No prompt: load the model (done_reason "load"), or unload it with keep_alive 0."""
    body: dict[str, Any] = {"model": req.model, "created_at": _now()}
    body.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
    body["done"] = True
    if keep_alive == 0:
        registry.locate(req.model)  # 404 for a name that is nothing
        await registry.unload(req.model)
        body["done_reason"] = "unload"
    else:
        model = await app.unless_gone(request, registry.acquire(req.model, keep_alive))
        registry.release(model)
        body["done_reason"] = "load"
    return _json(body)


# -- model listings ----------------------------------------------------------------------------


def _param_size(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _details(architecture: str, parameters: int, quant: str) -> dict[str, Any]:
    return {
        "parent_model": "", "format": "gguf", "family": architecture, "families": [architecture],
        "parameter_size": _param_size(parameters), "quantization_level": quant,
    }  # fmt: skip


def _tag(name: str, modified: float, size: int, digest: str, details: dict[str, Any]) -> dict:
    return {
        "name": name, "model": name, "modified_at": _iso(modified), "size": size,
        "digest": digest, "details": details,
    }  # fmt: skip


def _tags(registry: Registry) -> list[dict[str, Any]]:
    out = []
    for listed in registry.listing():
        m, info = listed.manifest, listed.target.info
        if m is not None:
            details = _details(m.architecture, m.parameters, m.quant)
            out.append(_tag(listed.name, m.created, m.size, m.sha256, details))
        else:
            details = _details(info.architecture, info.n_params, _quant(listed.target))
            modified = listed.target.path.stat().st_mtime
            out.append(_tag(listed.name, modified, info.file_size, "", details))
    return out


def _quant(target: Located) -> str:
    return target.info.quant.upper()


def _running(model: Model) -> dict[str, Any]:
    info = model.target.info
    plan = model.worker.plan
    vram = plan.total(plan.gpu_device) if plan is not None and plan.gpu_device else 0
    if model.keep_alive is None:
        expires = FOREVER_AT
    else:
        left = model.keep_alive if model.expires_at is None else model.expires_at - time.monotonic()
        expires = _iso(time.time() + max(0.0, left))
    worker = model.worker
    return {
        "name": model.name, "model": model.name, "size": model.memory, "digest": "",
        "details": _details(info.architecture, info.n_params, _quant(model.target)),
        "expires_at": expires, "size_vram": vram,
        "context_length": worker.seq_ctx,
        # localmix's own: sequences decoded together, requests using the model now
        "parallel": worker.n_seq, "requests": model.users,
    }  # fmt: skip


async def _capabilities(registry: Registry, target: Located) -> list[str]:
    """What Ollama's clients look for (Continue, Zed): completion, tools, thinking."""
    import asyncio

    try:
        profile = await asyncio.to_thread(registry.profile_of, target)
    except LocalmixError:
        return ["completion"]  # no chat format: text completion still works
    return (
        ["completion"] + ["tools"] * profile.calls_tools + ["thinking"] * bool(profile.think_mode)
    )


def _show(target: Located, capabilities: list[str]) -> dict[str, Any]:
    info = target.info
    model_info = {
        "general.architecture": info.architecture,
        "general.parameter_count": info.n_params,
        f"{info.architecture}.context_length": info.context_length,
    }
    return {
        "modelfile": "", "parameters": "",
        "template": target.chat_format or "", "details": _details(
            info.architecture, info.n_params, _quant(target)),
        "model_info": model_info, "capabilities": capabilities,
        "modified_at": _iso(target.path.stat().st_mtime),
    }  # fmt: skip
