"""OpenAI's API: /v1/chat/completions, /v1/completions (each streamed over SSE or not) and
/v1/models, with usage counts in every response and errors in OpenAI's error body.

Fields OpenAI defines and localmix cannot honour (n > 1, presence and frequency penalties other
than the clients' default 0) are refused with 400 rather than ignored. tools, tool_choice,
parallel_tool_calls and response_format are honoured: prompts as mistral-common encodes them,
the reply constrained by a grammar (chat/grammars.py), tool calls read from its token ids. logprobs / top_logprobs and logit_bias come from the generation core (serve/logprobs.py).
Extensions that llama-server and vLLM accept too: top_k, min_p, repeat_penalty, ignore_eos, and
return_token_ids (the prompt's token ids and the reply's in the response).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from localmix import __version__
from localmix.errors import LocalmixError, ModelNotFound, UsageError
from localmix.llama.records import Chunk, Stats
from localmix.serve import app, logprobs, prompts
from localmix.serve.models import UNSET

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from localmix.chat.toolcalls import CallArgs, CallStart
    from localmix.chat.tools import Tool
    from localmix.llama.batch import Generation
    from localmix.serve.models import Model, Registry

FINISH = {"stop": "stop", "stop_string": "stop", "length": "length", "interrupted": "stop"}
FINGERPRINT = f"localmix-{__version__}"
MAX_STOPS = 16


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImagePart(_Body):
    """OpenAI's image part: image_url {"url": "data:image/...;base64,..."} (or the URL alone)."""

    type: Literal["image_url"]
    image_url: Union[dict[str, Any], str]  # noqa: UP007


class ChatMessage(_Body):
    role: str
    content: Union[str, list[Union[TextPart, ImagePart]], None] = None  # noqa: UP007
    tool_calls: Union[list[dict[str, Any]], None] = None  # noqa: UP007 - an assistant's calls
    tool_call_id: Union[str, None] = None  # noqa: UP007 - a tool result: the call it answers
    name: Union[str, None] = None  # noqa: UP007


class StreamOptions(_Body):
    include_usage: bool = False


class Sampled(_Body):
    """The fields both completion routes share."""

    model: str
    stream: bool = False
    stream_options: Union[StreamOptions, None] = None  # noqa: UP007
    temperature: Union[float, None] = Field(None, ge=0, le=2)  # noqa: UP007
    top_p: Union[float, None] = Field(None, ge=0, le=1)  # noqa: UP007
    max_tokens: Union[int, None] = Field(None, ge=1)  # noqa: UP007 - OpenAI: 0 is refused
    stop: Union[str, list[str], None] = None  # noqa: UP007
    seed: Union[int, None] = None  # noqa: UP007
    n: int = 1
    logprobs: Union[bool, int, None] = None  # noqa: UP007 - chat: a bool; completions: 0-5
    top_logprobs: Union[int, None] = Field(None, ge=0, le=20)  # noqa: UP007 - chat only
    logit_bias: Union[dict[str, float], None] = None  # noqa: UP007
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    # extensions (llama-server, vLLM)
    top_k: Union[int, None] = Field(None, ge=0)  # noqa: UP007
    min_p: Union[float, None] = Field(None, ge=0, le=1)  # noqa: UP007
    repeat_penalty: Union[float, None] = Field(None, gt=0)  # noqa: UP007
    ignore_eos: bool = False
    return_token_ids: bool = False


class ChatRequest(Sampled):
    messages: list[ChatMessage]
    # a reasoning model's switch: "none" turns thinking off, any other effort on (v15: "high")
    reasoning_effort: Union[str, None] = None  # noqa: UP007
    max_completion_tokens: Union[int, None] = Field(None, ge=1)  # noqa: UP007
    tools: Union[list[Any], None] = None  # noqa: UP007
    tool_choice: Union[str, dict[str, Any], None] = None  # noqa: UP007
    parallel_tool_calls: Union[bool, None] = None  # noqa: UP007 - None: true, as OpenAI
    response_format: Union[dict[str, Any], None] = None  # noqa: UP007


class CompletionRequest(Sampled):
    prompt: Union[str, list[str], list[int], list[list[int]]]  # noqa: UP007
    max_tokens: Union[int, None] = Field(16, ge=1)  # noqa: UP007 - OpenAI's default here
    echo: bool = False
    suffix: Union[str, None] = None  # noqa: UP007


# -- request → generation --------------------------------------------------------------------


# OpenAI fields that change nothing localmix returns: accepted and ignored
NO_EFFECT = frozenset({
    "user", "metadata", "store", "service_tier", "prompt_cache_key",
    "safety_identifier", "cache_prompt",  # llama-server's: a cached prompt gives the same reply
})  # fmt: skip


def _refuse_unsupported(req: Sampled) -> None:
    """A 400 naming the first field localmix would otherwise not honour: OpenAI's fields it does
    not implement, and fields OpenAI does not define (OpenAI refuses those too)."""
    bad = app.BadField
    if req.n != 1:
        raise bad("n", "n must be 1: localmix generates one choice per request")
    _check_logprobs(req)
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise bad(name, f"{name} is not supported", hint="use repeat_penalty, e.g. 1.1")
    extra = {k: v for k, v in (req.model_extra or {}).items() if v is not None}
    if isinstance(req, ChatRequest) and not req.tools and req.tool_choice not in (None, "none"):
        raise bad("tool_choice", "tool_choice needs tools", hint="send tools, or leave it out")
    if isinstance(req, CompletionRequest):
        for name in ("echo", "suffix"):
            if getattr(req, name):
                raise bad(name, f"{name} is not supported")
    for name in extra:
        if name not in NO_EFFECT:
            hint = _UNSUPPORTED.get(name, "leave it out: localmix refuses what it would not honour")
            raise bad(name, f"{name} is not supported", hint=hint)


def _check_logprobs(req: Sampled) -> None:
    """OpenAI's rules: chat takes logprobs true/false and top_logprobs 0-20 beside it;
    completions take logprobs as the number of alternatives, 0-5."""
    bad = app.BadField
    if isinstance(req, ChatRequest):
        if req.logprobs is not None and not isinstance(req.logprobs, bool):
            raise bad("logprobs", "logprobs must be true or false", hint="top_logprobs: 0-20")
        if req.top_logprobs is not None and not req.logprobs:
            raise bad("top_logprobs", "top_logprobs needs logprobs: true")
        return
    if req.top_logprobs is not None:
        raise bad("top_logprobs", "top_logprobs is a chat field", hint="use logprobs: 0-5")
    if isinstance(req.logprobs, bool) or not 0 <= (req.logprobs or 0) <= 5:
        raise bad("logprobs", "logprobs must be a number of alternatives, 0 to 5")


def logprobs_asked(req: Sampled) -> int | None:
    """How many alternatives each token's logprobs carry, or None: none asked."""
    if isinstance(req, ChatRequest):
        return (req.top_logprobs or 0) if req.logprobs else None
    return None if req.logprobs is None else int(req.logprobs)


_UNSUPPORTED = {
    "functions": "legacy functions are not supported: send them as tools",
    "function_call": "legacy functions are not supported: use tools and tool_choice",
}


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS:
        raise app.BadField("stop", f"stop has {len(stops)} strings; at most {MAX_STOPS}")
    return tuple(s for s in stops if s)


def generation(req: Sampled, model: Model, prompt: list[int]) -> Generation:
    """The request's sampling and limits as a Generation (unset fields: localmix's defaults)."""
    from dataclasses import replace

    from localmix.llama.batch import Generation
    from localmix.llama.records import Sampling

    picked: dict[str, Any] = {
        "temperature": req.temperature, "top_p": req.top_p or None, "top_k": req.top_k,
        "min_p": req.min_p, "repeat_penalty": req.repeat_penalty,
        "seed": req.seed if req.seed is None or req.seed >= 0 else None,
        "logit_bias": logprobs.bias("logit_bias", req.logit_bias, model.engine.n_vocab) or None,
    }  # fmt: skip
    sampling = Sampling(**{k: v for k, v in picked.items() if v is not None})
    if req.top_p == 0:  # OpenAI allows 0: only the most likely token is left
        sampling = replace(sampling, top_k=1)
    limit = req.max_tokens
    if isinstance(req, ChatRequest) and req.max_completion_tokens is not None:
        limit = req.max_completion_tokens
    room = model.worker.seq_ctx - len(prompt)
    return Generation(
        prompt, sampling, max_tokens=room if limit is None else min(limit, room),
        stop=_stops(req.stop), ignore_eos=req.ignore_eos, logprobs=logprobs_asked(req),
        grammar=reply_grammar(req, model) if isinstance(req, ChatRequest) else None,
    )  # fmt: skip


def chat_messages(req: ChatRequest) -> list[prompts.Message]:
    from localmix.chat.tools import ToolCall

    out = []
    for i, m in enumerate(req.messages):
        content = _content(m.content, f"messages[{i}].content")
        calls = [
            ToolCall.from_openai(call, where=f"messages[{i}].tool_calls[{j}]")
            for j, call in enumerate(m.tool_calls or ())
        ]
        out.append(
            prompts.message(m.role, content or "", tool_calls=calls,
                            tool_call_id=m.tool_call_id, name=m.name)
        )  # fmt: skip
    return out


def _content(content: str | list[TextPart | ImagePart] | None, where: str) -> prompts.Content:
    """A message's text, or its text and images (Picture parts) in order."""
    from localmix.serve import media

    if not isinstance(content, list):
        return content or ""
    if all(isinstance(part, TextPart) for part in content):
        return "".join(part.text for part in content)  # type: ignore[union-attr]
    parts: list[Any] = []
    for j, part in enumerate(content):
        if isinstance(part, TextPart):
            parts.append(part.text)
            continue
        url = part.image_url.get("url") if isinstance(part.image_url, dict) else part.image_url
        parts.append(media.from_url(url, f"{where}[{j}].image_url").picture())
    return tuple(parts)


def chat_tools(req: ChatRequest) -> list[Tool]:
    """The request's tools (UsageError naming the one that is wrong)."""
    from localmix.chat.tools import Tool

    try:
        return [Tool.from_openai(t, where=f"tools[{i}]") for i, t in enumerate(req.tools or ())]
    except UsageError as error:
        raise app.BadField("tools", error.message, error.hint) from None


def thinking(req: ChatRequest) -> bool | None:
    """The request's thinking switch: reasoning_effort "none" is off, any other on."""
    return None if req.reasoning_effort is None else req.reasoning_effort != "none"


def reply_grammar(req: ChatRequest, model: Model) -> str | None:
    """The grammar the reply must follow: tool calls as tool_choice allows, response_format."""
    from localmix.chat import grammars

    try:
        choice = grammars.tool_choice_from_openai(req.tool_choice)
    except UsageError as error:
        raise app.BadField("tool_choice", error.message, error.hint) from None
    try:
        output = grammars.response_format(req.response_format)
    except UsageError as error:
        raise app.BadField("response_format", error.message, error.hint) from None
    return prompts.reply_grammar(
        model, thinking(req), tools=chat_tools(req), tool_choice=choice,
        parallel_tool_calls=req.parallel_tool_calls is not False, output=output,
    )  # fmt: skip


# -- responses ---------------------------------------------------------------------------------


def usage(prompt: Sequence[int], stats: Stats) -> dict[str, Any]:
    return {
        "prompt_tokens": len(prompt),
        "completion_tokens": stats.generated_tokens,
        "total_tokens": len(prompt) + stats.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
    }


def error_body(error: LocalmixError, status: int) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    codes = {404: "not_found", 413: "request_too_large", 503: "server_busy"}
    code = "context_length_exceeded" if "context holds" in error.message else codes.get(status)
    if isinstance(error, ModelNotFound):
        code = "model_not_found"
    message = error.message + (f" ({error.hint})" if error.hint else "")
    param = getattr(error, "param", None)
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(error: LocalmixError) -> Response:
    from starlette.responses import JSONResponse

    status = app.status_of(error)
    return JSONResponse(error_body(error, status), status_code=status)


class Reply:
    """The pieces of one response: its id, timestamps, and how a choice is written. A reasoning
    model's thinking goes in reasoning_content (llama-server's and DeepSeek's field), apart from
    the answer's content."""

    def __init__(self, req: Sampled, run: app.Run, chat: bool) -> None:
        self.req, self.run, self.chat = req, run, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.reply = prompts.Reply(run.model, chat, tools=bool(getattr(req, "tools", None)))
        self.object = "chat.completion" if chat else "text_completion"
        self.logprobs = logprobs_asked(req) is not None
        self._piece_of = run.model.engine.token_piece
        self._offset = 0  # completions' text_offset: characters of text before the next token

    def head(self, chunk: bool) -> dict[str, Any]:
        obj = self.object + (".chunk" if chunk and self.chat else "")
        return {
            "id": self.id, "object": obj, "created": self.created, "model": self.req.model,
            "system_fingerprint": FINGERPRINT,
        }  # fmt: skip

    def choice(
        self,
        text: str | None,
        finish: str | None,
        *,
        delta: bool,
        thinking: str = "",
        scored: Sequence[Chunk] = (),
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if not self.chat:
            choice["text"] = text or ""
        elif delta:
            choice["delta"] = {} if text is None else {"content": text}
            if thinking:
                choice["delta"] = {"reasoning_content": thinking}
        else:
            choice["message"] = {"role": "assistant", "content": text or ""}
            if thinking:
                choice["message"]["reasoning_content"] = thinking
        choice["logprobs"] = self._logprobs(scored)
        choice["finish_reason"] = finish
        return choice

    def _logprobs(self, chunks: Sequence[Chunk]) -> dict[str, Any] | None:
        """The choice's logprobs for these chunks' tokens (None when not asked)."""
        if not self.logprobs:
            return None
        if self.chat:
            return {"content": logprobs.entries(chunks, self._piece_of), "refusal": None}
        laid = logprobs.legacy(chunks, self._piece_of, self._offset)
        self._offset += sum(len(t) for t in laid["tokens"])
        return laid

    def usage(self, stats: Stats) -> dict[str, Any]:
        counts = usage(self.run.prompt, stats)
        if self.reply.thought_tokens:
            counts["completion_tokens_details"] = {"reasoning_tokens": self.reply.thought_tokens}
        return counts

    def finish_reason(self, stats: Stats) -> str:
        """OpenAI's finish_reason: "tool_calls" when the reply called tools and was not cut off."""
        finish = FINISH[stats.finish_reason]
        return "tool_calls" if self.reply.calls and finish == "stop" else finish

    def whole(self, chunks: list[Chunk], stats: Stats) -> dict[str, Any]:
        shown = [self.reply.feed(c) for c in chunks] + [self.reply.finish()]
        text, thinking = "".join(s.text for s in shown), "".join(s.thinking for s in shown)
        body = self.head(chunk=False)
        finish = self.finish_reason(stats)
        choice = self.choice(text, finish, delta=False, thinking=thinking, scored=chunks)
        calls = self.reply.calls
        if calls:
            choice["message"]["content"] = text or None
            choice["message"]["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.name, "arguments": c.arguments}}
                for c in calls
            ]  # fmt: skip
        body["choices"] = [choice]
        body["usage"] = self.usage(stats)
        self._token_ids(body, [c.token for c in chunks if c.token >= 0])
        return body

    def _token_ids(self, body: dict[str, Any], tokens: list[int] | None) -> None:
        if self.req.return_token_ids:
            body["prompt_token_ids"] = self.run.prompt
            if tokens is not None and body["choices"]:
                body["choices"][0]["token_ids"] = tokens

    async def stream(self) -> AsyncIterator[bytes]:
        """SSE events: a role delta (chat), one per piece of text, the finish with usage (or,
        with stream_options.include_usage, a usage chunk after it, as OpenAI sends), [DONE]."""
        include_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
        if self.chat:
            first = self.head(chunk=True)
            first["choices"] = [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}
            ]  # fmt: skip
            yield _event(first)
        tokens: list[int] = []
        scored: list[Chunk] = []  # tokens whose logprobs go out with the next event
        try:
            async for item in self.run.events():
                if isinstance(item, Chunk):
                    shown = self.reply.feed(item)
                    if item.token >= 0:
                        tokens.append(item.token)
                    if item.logprob is not None:
                        scored.append(item)
                    for event in self._events(shown, scored):
                        yield event
                        scored = []
                    continue
                for event in self._events(self.reply.finish(), scored):
                    yield event
                    scored = []
                last = self.head(chunk=True)
                finish = self.finish_reason(item)
                last["choices"] = [self.choice(None, finish, delta=True, scored=scored)]
                self._token_ids(last, tokens)
                if include_usage:
                    yield _event(last)
                    last = self.head(chunk=True)
                    last["choices"] = []
                last["usage"] = self.usage(item)
                yield _event(last)
        except LocalmixError as error:  # after the headers: the error goes in the stream
            yield _event(error_body(error, app.status_of(error)))
        yield b"data: [DONE]\n\n"

    def _events(self, shown: prompts.Shown, scored: Sequence[Chunk]) -> list[bytes]:
        """The SSE events for what a chunk added: its text, then its tool-call deltas (each
        call's id, type and whole name first, then fragments of its arguments)."""
        out = []
        if shown.text or shown.thinking:
            out.append(self._piece(shown.text, shown.thinking, scored))
        if shown.calls and self.chat:
            body = self.head(chunk=True)
            choice = self.choice(None, None, delta=True, scored=() if out else scored)
            choice["delta"] = {"tool_calls": tool_call_deltas(shown.calls)}
            body["choices"] = [choice]
            out.append(_event(body))
        return out

    def _piece(self, text: str, thinking: str, scored: Sequence[Chunk]) -> bytes:
        body = self.head(chunk=True)
        body["choices"] = [self.choice(text, None, delta=True, thinking=thinking, scored=scored)]
        return _event(body)


def tool_call_deltas(events: Sequence[CallStart | CallArgs]) -> list[dict[str, Any]]:
    """delta.tool_calls entries, one per call index, in order: a start carries id, type and the
    whole name (arguments ""), later fragments only arguments."""
    from localmix.chat.toolcalls import CallStart

    entries: dict[int, dict[str, Any]] = {}
    for event in events:
        entry = entries.setdefault(event.index, {"index": event.index, "function": {}})
        if isinstance(event, CallStart):
            entry.update(id=event.id, type="function")
            entry["function"].update(name=event.name, arguments="")
        else:
            entry["function"]["arguments"] = entry["function"].get("arguments", "") + event.text
    return list(entries.values())


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + app.dumps(data) + b"\n\n"


# -- routes ------------------------------------------------------------------------------------


def routes(registry: Registry) -> list[Route]:
    from starlette.routing import Route

    async def chat(request: Request) -> Response:
        return await _complete(request, registry, ChatRequest, _chat_prompt, chat=True)

    async def completions(request: Request) -> Response:
        return await _complete(request, registry, CompletionRequest, _text_prompt, chat=False)

    async def models(_: Request) -> Response:
        from starlette.responses import JSONResponse

        return JSONResponse({"object": "list", "data": _model_list(registry)})

    async def model(request: Request) -> Response:
        from starlette.responses import JSONResponse

        name = request.path_params["name"]
        found = [m for m in _model_list(registry) if m["id"] == name]
        if not found:
            try:
                target = registry.locate(name)
            except LocalmixError as error:
                return error_response(error)
            found = [_model_entry(name, target.path.stat().st_mtime)]
        return JSONResponse(found[0])

    return [
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", model, methods=["GET"]),
    ]


def _chat_prompt(req: ChatRequest) -> Callable[[Model], list[int]]:
    messages, tools = chat_messages(req), chat_tools(req)
    return lambda model: prompts.chat_tokens(model, messages, thinking(req), tools)


def _text_prompt(req: CompletionRequest) -> Callable[[Model], list[int]]:
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise UsageError("prompt lists must hold one prompt: localmix answers one at a time")
        prompt = prompt[0]
    return lambda model: prompts.text_tokens(model, prompt)  # type: ignore[arg-type]


async def _complete(
    request: Request,
    registry: Registry,
    kind: type[Sampled],
    prompt_for: Callable[[Any], Callable[[Model], list[int]]],
    *,
    chat: bool,
) -> Response:
    from starlette.responses import JSONResponse, Response

    try:
        req = app.parse(kind, await app.read_json(request))
        _refuse_unsupported(req)
        run = await app.start(
            request, registry, req.model, UNSET, prompt_for(req),
            lambda model, prompt: generation(req, model, prompt),
        )  # fmt: skip
        reply = Reply(req, run, chat)
        if req.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return run.response(reply.stream(), "text/event-stream", headers)
        chunks, stats = await app.unless_gone(request, run.collect())
        return JSONResponse(reply.whole(chunks, stats))
    except LocalmixError as error:
        return error_response(error)
    except app.ClientGone:
        return Response(status_code=499)  # nobody reads it; the generation stopped


def _model_list(registry: Registry) -> list[dict[str, Any]]:
    return [
        _model_entry(m.name, m.manifest.created if m.manifest else m.target.path.stat().st_mtime)
        for m in registry.listing()
    ]


def _model_entry(name: str, created: float) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(created), "owned_by": "localmix"}
