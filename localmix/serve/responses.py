"""OpenAI's Responses API: POST /v1/responses (streamed as typed SSE events, or not) and GET /
DELETE /v1/responses/{id} for the responses the server keeps, so that `previous_response_id`
continues a conversation.

A request means a chat completion: its input items become chat messages, its flat function tools
and `text.format` become chat's tools and response_format, and the reply is generated, constrained
and parsed by the code chat completions use (serve/openai.py, serve/prompts.py). Only the shapes
are this module's: output items (reasoning, message, function_call) and the stream's events, in
the order OpenAI's own SDK checks (created, in_progress, each item added, its parts and deltas,
done, completed).

Kept responses live in memory, the newest KEPT of them: a restart forgets them, as llama-server's
and vLLM's in-memory stores do. `store: false` keeps nothing.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from pydantic import Field

from localmix.errors import LocalmixError, UsageError
from localmix.llama.records import Chunk, Stats
from localmix.serve import app, logprobs, openai, prompts
from localmix.serve.models import UNSET

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from localmix.chat.template import Message
    from localmix.chat.toolcalls import CallArgs, CallStart
    from localmix.chat.tools import Tool, ToolCall
    from localmix.serve.models import Registry

KEPT = 256  # responses kept for previous_response_id and GET, newest first out last
LOGPROBS = "message.output_text.logprobs"
# include values: logprobs are honoured; reasoning comes back as plain text, so there is no
# encrypted_content to include (Codex-style clients ask for it with store false)
INCLUDES = frozenset({LOGPROBS, "reasoning.encrypted_content"})
# fields that change nothing localmix returns: accepted and ignored
NO_EFFECT = openai.NO_EFFECT | {"stream_options", "prompt_cache_retention"}


class ResponsesRequest(openai._Body):
    model: str
    input: Union[str, list[Any]]  # noqa: UP007 - pydantic on 3.10
    instructions: Union[str, None] = None  # noqa: UP007
    stream: bool = False
    temperature: Union[float, None] = Field(None, ge=0, le=2)  # noqa: UP007
    top_p: Union[float, None] = Field(None, ge=0, le=1)  # noqa: UP007
    max_output_tokens: Union[int, None] = Field(None, ge=1)  # noqa: UP007
    top_logprobs: Union[int, None] = Field(None, ge=0, le=20)  # noqa: UP007
    tools: Union[list[Any], None] = None  # noqa: UP007
    tool_choice: Union[str, dict[str, Any], None] = None  # noqa: UP007
    parallel_tool_calls: Union[bool, None] = None  # noqa: UP007
    text: Union[dict[str, Any], None] = None  # noqa: UP007
    reasoning: Union[dict[str, Any], None] = None  # noqa: UP007
    previous_response_id: Union[str, None] = None  # noqa: UP007
    store: Union[bool, None] = None  # noqa: UP007 - None: true, as OpenAI
    include: Union[list[str], None] = None  # noqa: UP007
    truncation: Union[str, None] = None  # noqa: UP007
    background: Union[bool, None] = None  # noqa: UP007
    max_tool_calls: Union[int, None] = None  # noqa: UP007
    # extensions, as on chat completions (llama-server, vLLM)
    seed: Union[int, None] = None  # noqa: UP007
    top_k: Union[int, None] = Field(None, ge=0)  # noqa: UP007
    min_p: Union[float, None] = Field(None, ge=0, le=1)  # noqa: UP007
    repeat_penalty: Union[float, None] = Field(None, gt=0)  # noqa: UP007
    ignore_eos: bool = False


# -- request → chat --------------------------------------------------------------------------


def refuse_unsupported(req: ResponsesRequest) -> None:
    """A 400 naming the first field localmix would otherwise not honour."""
    bad = app.BadField
    if req.background:
        raise bad("background", "background responses are not supported", hint="leave it out")
    if req.truncation not in (None, "disabled"):
        raise bad(
            "truncation", "truncation 'auto' is not supported: a prompt too long is refused",
            hint="leave it out, or send 'disabled'",
        )  # fmt: skip
    if req.max_tool_calls is not None:
        raise bad("max_tool_calls", "max_tool_calls is not supported",
                  hint="parallel_tool_calls: false allows one call per response")  # fmt: skip
    if not req.tools and req.tool_choice not in (None, "none"):
        raise bad("tool_choice", "tool_choice needs tools", hint="send tools, or leave it out")
    for value in req.include or ():
        if value not in INCLUDES:
            raise bad("include", f"include {value!r} is not supported", hint=LOGPROBS)
    text = req.text or {}
    for key in text:
        if key == "verbosity" and text[key] not in (None, "medium"):
            raise bad("text.verbosity", "text.verbosity is not supported", hint="leave it out")
        if key not in ("format", "verbosity"):
            raise bad(f"text.{key}", f"text.{key} is not supported")
    for name, value in (req.model_extra or {}).items():
        if value is not None and name not in NO_EFFECT:
            raise bad(name, f"{name} is not supported",
                      hint="leave it out: localmix refuses what it would not honour")  # fmt: skip


def as_chat(req: ResponsesRequest, tools: Sequence[Tool]) -> openai.ChatRequest:
    """The chat completion the request means, with its tools (its messages aside: see
    conversation())."""
    reasoning = req.reasoning or {}
    fields: dict[str, Any] = {
        "model": req.model, "messages": [], "temperature": req.temperature, "top_p": req.top_p,
        "max_completion_tokens": req.max_output_tokens, "seed": req.seed, "top_k": req.top_k,
        "min_p": req.min_p, "repeat_penalty": req.repeat_penalty, "ignore_eos": req.ignore_eos,
        "tool_choice": req.tool_choice, "parallel_tool_calls": req.parallel_tool_calls,
        "reasoning_effort": reasoning.get("effort") if isinstance(reasoning, dict) else None,
        "response_format": _response_format(req),
    }  # fmt: skip
    if LOGPROBS in (req.include or ()) or req.top_logprobs is not None:
        fields.update(logprobs=True, top_logprobs=req.top_logprobs or 0)
    chat = openai.ChatRequest.model_validate(fields)
    chat.tools = [t.to_openai() for t in tools] or None
    return chat


def _response_format(req: ResponsesRequest) -> dict[str, Any] | None:
    """text.format in chat's response_format shape, once it is known to be well formed."""
    from localmix.chat import grammars

    value = (req.text or {}).get("format")
    try:
        grammars.text_format(value)
    except UsageError as error:
        raise app.BadField("text.format", error.message, error.hint) from None
    if isinstance(value, dict) and value.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": value}
    return value


def tools_of(req: ResponsesRequest) -> list[Tool]:
    """The request's function tools (Responses' flat shape), or a 400 naming the bad one."""
    from localmix.chat.tools import Tool

    try:
        return [Tool.from_responses(t, where=f"tools[{i}]") for i, t in enumerate(req.tools or ())]
    except UsageError as error:
        raise app.BadField("tools", error.message, error.hint) from None


def conversation(items: str | Sequence[Any]) -> list[Message]:
    """The chat messages of `input`: a string is one user message; items are messages (roles
    user, system, developer, assistant), an assistant's function_call items (joined into its
    message) and function_call_output items (tool results); reasoning items are the model's own
    past thinking, which Mistral's formats do not send back."""
    from localmix.chat.tools import ToolCall

    if isinstance(items, str):
        return [prompts.message("user", items)]
    out: list[Message] = []
    for k, item in enumerate(items):
        where = f"input[{k}]"
        if not isinstance(item, dict):
            raise app.BadField(where, f"{where}: an input item is an object")
        kind = item.get("type", "message")
        if kind == "message":
            out.append(_message(item, where))
        elif kind == "function_call":
            call = ToolCall.from_openai(
                {"id": item.get("call_id"), "function": {
                    "name": item.get("name"), "arguments": item.get("arguments")}},
                where=where,
            )  # fmt: skip
            _with_call(out, call)
        elif kind == "function_call_output":
            out.append(_result(item, where))
        elif kind != "reasoning":
            message = f"{where}.type: items of type {kind!r} are not supported"
            hint = "send message, function_call and function_call_output items"
            raise app.BadField(f"{where}.type", message, hint)
    return out


def _message(item: dict[str, Any], where: str) -> Message:
    role = item.get("role")
    if not isinstance(role, str):
        raise app.BadField(f"{where}.role", f"{where}.role: a message has a role")
    try:
        return prompts.message(role, _content(item.get("content"), f"{where}.content"))
    except UsageError as error:
        raise app.BadField(f"{where}.role", f"{where}.role: {error.message}", error.hint) from None


def _content(content: Any, where: str, images: bool = True) -> prompts.Content:
    """A content string, or its parts: text (input_text, output_text, refusal) and, where
    images may go, input_image (a data: URL) as Picture parts."""
    from localmix.serve import media

    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise app.BadField(where, f"{where}: content is a string or a list of parts")
    parts: list[Any] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text"):
            parts.append(str(part.get("text") or ""))
        elif kind == "refusal":
            parts.append(str(part.get("refusal") or ""))
        elif kind == "input_image" and images and "image_url" in part:
            parts.append(media.from_url(part["image_url"], f"{where}[{j}].image_url").picture())
        else:
            hint = "send input_text and input_image (a data: URL) parts"
            raise app.BadField(f"{where}[{j}]", f"{where}[{j}]: parts of type {kind!r} are not "
                               "supported", hint=hint)  # fmt: skip
    if all(isinstance(p, str) for p in parts):
        return "".join(parts)
    return tuple(parts)


def _with_call(out: list[Message], call: ToolCall) -> None:
    """Append an assistant's call: to its message just before, else in a message of its own."""
    from dataclasses import replace

    if out and out[-1].role == "assistant":
        out[-1] = replace(out[-1], tool_calls=(*out[-1].tool_calls, call))
    else:
        out.append(prompts.message("assistant", "", tool_calls=[call]))


def _result(item: dict[str, Any], where: str) -> Message:
    call_id = item.get("call_id")
    if not isinstance(call_id, str) or not call_id:
        raise app.BadField(f"{where}.call_id", f"{where}.call_id: a result names its call")
    output = item.get("output")
    text = output if isinstance(output, str) else _content(output, f"{where}.output", images=False)
    return prompts.message("tool", text, tool_call_id=call_id)


# -- kept responses ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Kept:
    """A response as sent, and the conversation it ended (its input and its reply, without the
    instructions: OpenAI does not carry those over to the next turn)."""

    body: dict[str, Any]
    turn: tuple[Message, ...]
    before: Kept | None = None

    def history(self) -> list[Message]:
        turns: list[tuple[Message, ...]] = []
        kept: Kept | None = self
        while kept is not None:
            turns.append(kept.turn)
            kept = kept.before
        return [m for turn in reversed(turns) for m in turn]


class Keeper:
    """The newest KEPT responses by id (a chain of turns shares its earlier ones)."""

    def __init__(self, size: int = KEPT) -> None:
        self.size = size
        self._kept: OrderedDict[str, Kept] = OrderedDict()

    def get(self, response_id: str) -> Kept:
        kept = self._kept.get(response_id)
        if kept is None:
            raise app.NotFound(
                f"no response with id {response_id!r} is kept",
                hint="the server keeps its newest responses in memory, until it stops",
            )
        self._kept.move_to_end(response_id)
        return kept

    def put(self, kept: Kept) -> None:
        self._kept[kept.body["id"]] = kept
        while len(self._kept) > self.size:
            self._kept.popitem(last=False)

    def pop(self, response_id: str) -> None:
        self.get(response_id)
        del self._kept[response_id]


# -- the reply as output items -------------------------------------------------------------------


Event = tuple[str, dict[str, Any]]  # an SSE event's type and its data (sequence_number aside)


class Output:
    """The reply's output items as it streams: feed() each piece the chat reply shows (thinking,
    text, tool-call events) and get the stream events it makes; an item opens when its first
    piece comes and is done when the next kind of piece (or the end) comes."""

    def __init__(self, piece: logprobs.Piece, with_logprobs: bool) -> None:
        self.items: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None
        self._text = ""  # the open item's text so far (reasoning or message)
        self._logprobs: list[dict[str, Any]] = []
        self._scored: list[Chunk] = []  # tokens whose logprobs go out with the next text
        self._piece, self._with_logprobs = piece, with_logprobs

    @property
    def _index(self) -> int:
        return len(self.items) - 1

    def feed(self, shown: prompts.Shown, chunk: Chunk | None = None) -> list[Event]:
        """The events for what one chunk of the reply showed (chunk: its token's logprobs)."""
        if chunk is not None and chunk.logprob is not None and self._with_logprobs:
            self._scored.append(chunk)
        events: list[Event] = []
        if shown.thinking:
            self._scored = []  # thinking has no logprobs in this API
            events += self._delta("reasoning", shown.thinking, ())
        if shown.text:
            events += self._delta("message", shown.text, self._scored)
            self._scored = []
        for call in shown.calls:
            events += self._call(call)
        return events

    def close(self, status: str = "completed") -> list[Event]:
        """The events that finish the open item (status: completed, or incomplete when the
        reply was cut off)."""
        item, self._open = self._open, None
        if item is None:
            return []
        item["status"] = status
        at = {"item_id": item["id"], "output_index": self._index}
        item_done = ("response.output_item.done", {"output_index": self._index, "item": item})
        if item["type"] == "function_call":
            done = {**at, "name": item["name"], "arguments": item["arguments"]}
            return [("response.function_call_arguments.done", done), item_done]
        part = self._part(item["type"], self._text)
        item["content"] = [part]
        kind = "output_text" if item["type"] == "message" else "reasoning_text"
        text_done = {**at, "content_index": 0, "text": self._text}
        if item["type"] == "message":
            text_done["logprobs"] = self._logprobs
        return [
            (f"response.{kind}.done", text_done),
            ("response.content_part.done", {**at, "content_index": 0, "part": part}),
            item_done,
        ]

    def finish(self, status: str) -> list[Event]:
        """Close the last item; a reply with no item at all gets an empty message."""
        events = self.close(status)
        if not self.items:
            events = self._delta("message", "", ()) + self.close(status)
        return events

    def _delta(self, kind: str, text: str, scored: Sequence[Chunk]) -> list[Event]:
        events = [] if self._open and self._open["type"] == kind else self._start(kind)
        assert self._open is not None
        self._text += text
        at = {"item_id": self._open["id"], "output_index": self._index, "content_index": 0}
        if kind == "reasoning":
            return [*events, ("response.reasoning_text.delta", {**at, "delta": text})]
        entries = logprobs.entries(scored, self._piece)
        self._logprobs += entries
        if not text:
            return events
        return [*events, ("response.output_text.delta", {**at, "delta": text, "logprobs": entries})]

    def _start(self, kind: str) -> list[Event]:
        events = self.close()
        self._text, self._logprobs = "", []
        if kind == "reasoning":
            item: dict[str, Any] = {"type": "reasoning", "id": _id("rs"), "summary": [],
                                    "content": [], "status": "in_progress"}  # fmt: skip
        else:
            item = {"type": "message", "id": _id("msg"), "status": "in_progress",
                    "role": "assistant", "content": []}  # fmt: skip
        self.items.append(item)
        self._open = item
        at = {"item_id": item["id"], "output_index": self._index, "content_index": 0}
        return [
            *events,
            ("response.output_item.added", {"output_index": self._index, "item": dict(item)}),
            ("response.content_part.added", {**at, "part": self._part(kind, "")}),
        ]

    def _part(self, kind: str, text: str) -> dict[str, Any]:
        if kind == "reasoning":
            return {"type": "reasoning_text", "text": text}
        part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": []}
        if self._with_logprobs:
            part["logprobs"] = list(self._logprobs) if text else []
        return part

    def _call(self, event: CallStart | CallArgs) -> list[Event]:
        from localmix.chat.toolcalls import CallStart

        if isinstance(event, CallStart):
            events = self.close()
            item = {"type": "function_call", "id": _id("fc"), "call_id": event.id,
                    "name": event.name, "arguments": "", "status": "in_progress"}  # fmt: skip
            self.items.append(item)
            self._open = item
            return [*events, ("response.output_item.added",
                              {"output_index": self._index, "item": dict(item)})]  # fmt: skip
        assert self._open is not None and self._open["type"] == "function_call"
        self._open["arguments"] += event.text
        delta = {"item_id": self._open["id"], "output_index": self._index, "delta": event.text}
        return [("response.function_call_arguments.delta", delta)]


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# -- one response --------------------------------------------------------------------------------


class Answer:
    """One response: its body at each stage, the events of its stream, and what it keeps."""

    def __init__(
        self,
        req: ResponsesRequest,
        chat: openai.ChatRequest,
        run: app.Run,
        inputs: list[Message],
        before: Kept | None,
    ) -> None:
        self.req, self.run, self.inputs, self.before = req, run, inputs, before
        self.id = _id("resp")
        self.created = int(time.time())
        self.reply = prompts.Reply(run.model, chat=True, tools=bool(chat.tools))
        self.output = Output(run.model.engine.token_piece, with_logprobs=bool(chat.logprobs))
        self._seq = 0

    def body(self, status: str, stats: Stats | None = None) -> dict[str, Any]:
        req = self.req
        body: dict[str, Any] = {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "model": req.model, "output": self.output.items if stats else [],
            "instructions": req.instructions, "tools": list(req.tools or []),
            "tool_choice": req.tool_choice or "auto",
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "temperature": req.temperature, "top_p": req.top_p,
            "max_output_tokens": req.max_output_tokens, "top_logprobs": req.top_logprobs,
            "previous_response_id": req.previous_response_id, "reasoning": req.reasoning,
            "text": {"format": (req.text or {}).get("format") or {"type": "text"}},
            "store": req.store is not False, "truncation": "disabled",
            "metadata": (req.model_extra or {}).get("metadata") or {},
            "error": None, "incomplete_details": None, "usage": None,
        }  # fmt: skip
        if stats is not None:
            body["completed_at"] = int(time.time())
            body["usage"] = self.usage(stats)
            if status == "incomplete":
                body["incomplete_details"] = {"reason": "max_output_tokens"}
        return body

    def usage(self, stats: Stats) -> dict[str, Any]:
        prompt = len(self.run.prompt)
        return {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": stats.cached_tokens},
            "output_tokens": stats.generated_tokens,
            "output_tokens_details": {"reasoning_tokens": self.reply.thought_tokens},
            "total_tokens": prompt + stats.generated_tokens,
        }

    @staticmethod
    def status(stats: Stats) -> str:
        return "incomplete" if stats.finish_reason == "length" else "completed"

    def whole(self, chunks: list[Chunk], stats: Stats) -> dict[str, Any]:
        for chunk in chunks:
            self.output.feed(self.reply.feed(chunk), chunk)
        status = self.status(stats)
        self.output.feed(self.reply.finish())
        self.output.finish(status)
        return self.body(status, stats)

    async def stream(self, keep: Callable[[Answer, dict[str, Any]], None]) -> AsyncIterator[bytes]:
        """The SSE events of the response, each with its type and sequence_number; the last is
        response.completed (response.incomplete when cut off, response.failed on an error)."""
        yield self._event("response.created", {"response": self.body("in_progress")})
        yield self._event("response.in_progress", {"response": self.body("in_progress")})
        try:
            async for item in self.run.events():
                if isinstance(item, Chunk):
                    events = self.output.feed(self.reply.feed(item), item)
                else:
                    status = self.status(item)
                    events = self.output.feed(self.reply.finish()) + self.output.finish(status)
                    body = self.body(status, item)
                    events.append((f"response.{status}", {"response": body}))
                    keep(self, body)
                for kind, data in events:
                    yield self._event(kind, data)
        except LocalmixError as error:  # after the headers: the failure goes in the stream
            body = self.body("failed")
            body["error"] = {"code": "server_error", "message": error.message}
            yield self._event("response.failed", {"response": body})

    def _event(self, kind: str, data: dict[str, Any]) -> bytes:
        payload = {"type": kind, "sequence_number": self._seq, **data}
        self._seq += 1
        return f"event: {kind}\ndata: ".encode() + app.dumps(payload) + b"\n\n"

    def kept(self, body: dict[str, Any]) -> Kept:
        """What continues this conversation: its input, then the reply as an assistant message."""
        from localmix.chat.tools import ToolCall

        text = "".join(p["text"] for i in body["output"] if i["type"] == "message"
                       for p in i["content"])  # fmt: skip
        calls = [ToolCall(i["name"], i["arguments"], i["call_id"]) for i in body["output"]
                 if i["type"] == "function_call"]  # fmt: skip
        reply = prompts.message("assistant", text, tool_calls=calls)
        return Kept(body, (*self.inputs, reply), self.before)


# -- routes ------------------------------------------------------------------------------------


def routes(registry: Registry) -> list[Route]:
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    keeper = Keeper()

    async def create(request: Request) -> Response:
        return await _create(request, registry, keeper)

    async def fetch(request: Request) -> Response:
        try:
            return JSONResponse(keeper.get(request.path_params["id"]).body)
        except LocalmixError as error:
            return openai.error_response(error)

    async def delete(request: Request) -> Response:
        response_id = request.path_params["id"]
        try:
            keeper.pop(response_id)
        except LocalmixError as error:
            return openai.error_response(error)
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})

    return [
        Route("/v1/responses", create, methods=["POST"]),
        Route("/v1/responses/{id}", fetch, methods=["GET"]),
        Route("/v1/responses/{id}", delete, methods=["DELETE"]),
    ]


async def _create(request: Request, registry: Registry, keeper: Keeper) -> Response:
    from starlette.responses import JSONResponse, Response

    try:
        req = app.parse(ResponsesRequest, await app.read_json(request))
        refuse_unsupported(req)
        tools = tools_of(req)
        chat = as_chat(req, tools)
        before = _previous(keeper, req.previous_response_id)
        inputs = conversation(req.input)
        # instructions are this turn's only: OpenAI does not carry them over to the next
        system = [prompts.message("system", req.instructions)] if req.instructions else []
        history = [*system, *(before.history() if before else ()), *inputs]
        think = openai.thinking(chat)
        run = await app.start(
            request, registry, req.model, UNSET,
            lambda model: prompts.chat_tokens(model, history, think, tools),
            lambda model, prompt: openai.generation(chat, model, prompt),
        )  # fmt: skip
        answer = Answer(req, chat, run, inputs, before)

        def keep(done: Answer, body: dict[str, Any]) -> None:
            if req.store is not False:
                keeper.put(done.kept(body))

        if req.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return run.response(answer.stream(keep), "text/event-stream", headers)
        chunks, stats = await app.unless_gone(request, run.collect())
        body = answer.whole(chunks, stats)
        keep(answer, body)
        return JSONResponse(body)
    except LocalmixError as error:
        return openai.error_response(_renamed(error))
    except app.ClientGone:
        return Response(status_code=499)


def _previous(keeper: Keeper, response_id: str | None) -> Kept | None:
    """The kept response a request continues, or a 400 naming previous_response_id."""
    if response_id is None:
        return None
    try:
        return keeper.get(response_id)
    except app.NotFound as error:
        message = f"previous_response_id: {error.message}"
        raise app.BadField("previous_response_id", message, error.hint) from None


# chat's field names in errors -> the Responses API's
RENAMED = {"max_completion_tokens": "max_output_tokens", "response_format": "text.format",
           "messages": "input"}  # fmt: skip


def _renamed(error: LocalmixError) -> LocalmixError:
    param = getattr(error, "param", None)
    if isinstance(error, app.BadField) and param in RENAMED:
        message = error.message.replace(param, RENAMED[param])
        return app.BadField(RENAMED[param], message, error.hint)
    return error
