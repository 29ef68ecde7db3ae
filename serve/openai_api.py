"""OpenAI-compatible routes on the ingress: /v1/models, /v1/completions, /v1/chat/completions (streaming included).

Code that speaks the OpenAI API (the official `openai` client, LangChain, curl scripts) picks a composition by the
`model` field, as LoRAX picks an adapter: a stored composition's name, else a task's name (its task vectors); an
inline composition rides in the extra body field `composition`. Generation runs on the model deployment's one
decoding loop (`TPVModel.generate_stream`: rows of different compositions batched on cached prompt keys/values);
`stream: true` relays its steps as server-sent events through a streaming handle, ending `data: [DONE]`.

The same limits, API keys and error kinds as the native routes apply; `OpenAIErrors` only re-shapes an error of
these paths into the OpenAI error body ({"error": {"message", "type", "param", "code"}}), whatever raised it (a
guard's 401/413, validation, the model replica), so the mapping by type stays in `serve.errors`.
"""

# no `from __future__ import annotations`: Serve's class-based FastAPI views need the real annotation objects
import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve import errors, metrics
from serve.auth import Principal, principal
from serve.jobs import GenerateJob, GenerationHead, ModelName
from serve.limits import LimitExceeded, check_composition
from serve.openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Model,
    ModelList,
    OpenAIErrorResponse,
    SamplingFields,
    Usage,
)
from tpv.generate import Delta, Transcript

OPENAI_PATHS = frozenset({"/v1/models", "/v1/completions", "/v1/chat/completions"})
BODIES = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest}
COMPLETION_DEFAULT_TOKENS = 16  # the OpenAI API's default for /v1/completions
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error",
          409: "conflict_error", 413: "invalid_request_error", 422: "invalid_request_error"}

router = APIRouter(tags=["OpenAI-compatible"])
RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": OpenAIErrorResponse, "description": text}
    for code, text in ((400, "malformed JSON"), (401, "missing or wrong API key"), (403, "outside the key's scope"),
                       (404, "unknown model, task, vector or composition"), (408, "body not sent in time"),
                       (413, "body too large"), (422, "invalid request (limits, unsupported fields, no chat template)"),
                       (500, "server-side fault (e.g. a corrupt store entry this request names)"),
                       (503, "no model replica available"), (504, "the model did not answer in time"))
}
#: with `stream: true` the 200 answer is server-sent events (the schema is one event's, as before OpenAPI 3.2)
_EVENT = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string", "description": "a chunk's JSON (an error's, {\"error\": ...}, after a late failure), "
                                              "then [DONE]"}}}
STREAMED = {200: {"content": {"text/event-stream": {"schema": _EVENT}},
                  "description": "the completion, or with `stream: true` its chunks as server-sent events"}}


# ---- errors -------------------------------------------------------------------------------------------------------


def openai_error(status: int, native: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI error body for a native one ({"error": kind, "detail", "errors"?}) answered with `status`."""
    fields = native.get("errors") if status == 422 else None  # a field error names its field; JSON errors do not
    loc = [p for p in (fields[0].get("loc", []) if fields else []) if p != "body"][:1]  # the top-level field
    kind = str(native.get("error", "error"))
    return {"error": {"message": str(native.get("detail", kind)),
                      "type": _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
                      "param": str(loc[0]) if loc else None, "code": kind}}


class OpenAIErrors:
    """ASGI middleware: an error answer (status >= 400, JSON) on an OpenAI path gets the OpenAI error body.
    Added after the key and body guards, so their refusals are re-shaped too; successes pass untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "").removeprefix(scope.get("root_path", "")) if scope["type"] == "http" else ""
        if path not in OPENAI_PATHS:
            await self.app(scope, receive, send)
            return
        held: Message | None = None
        body = b""

        async def reshape(message: Message) -> None:
            nonlocal held, body
            if message["type"] == "http.response.start" and message["status"] >= 400:
                held = message  # sent with the new body's length once the body is known
                return
            if held is None or message["type"] != "http.response.body":
                await send(message)
                return
            body += message.get("body", b"")
            if message.get("more_body", False):
                return
            try:
                new = json.dumps(openai_error(held["status"], json.loads(body))).encode()
            except (ValueError, AttributeError):
                new = body  # not a JSON error body: as it was
            headers = [(k, v) for k, v in held.get("headers", []) if k.lower() != b"content-length"]
            await send({**held, "headers": [*headers, (b"content-length", str(len(new)).encode())]})
            await send({"type": "http.response.body", "body": new, "more_body": False})

        await self.app(scope, receive, reshape)


# ---- helpers ------------------------------------------------------------------------------------------------------


def _sse(payload: BaseModel | dict[str, Any] | str) -> str:
    if isinstance(payload, BaseModel):
        payload = payload.model_dump_json()
    elif isinstance(payload, dict):
        payload = json.dumps(payload)
    return f"data: {payload}\n\n"


def _usage(prompt_tokens: list[int], completion_tokens: int) -> Usage:
    prompt = sum(prompt_tokens)
    return Usage(prompt_tokens=prompt, completion_tokens=completion_tokens, total_tokens=prompt + completion_tokens)


def _epoch(iso: str) -> int:
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return 0


class OpenAIRoutes:
    """The OpenAI routes, as methods of the ingress (`serve.app.TPVIngress` inherits them): they use its
    `settings`, and `_call` (retries on a lost model replica, deadlines)."""

    settings: Any
    _call: Callable

    def _job(self, req: SamplingFields, who: Principal, sources: list[str], conversations: list[list[dict[str, str]]],
             max_tokens: int) -> GenerateJob:
        """The same checks as the native routes (key scope, limits), then the model deployment's job."""
        limits = self.settings.limits
        field = "messages" if conversations else "prompt"  # what the client calls the texts: the error's param
        inputs = len(sources) + len(conversations)
        if inputs * req.n > limits.max_inputs:
            raise LimitExceeded(f"{inputs} prompt(s) x n={req.n} is {inputs * req.n} completions; the limit is "
                                f"{limits.max_inputs}", field)
        if max_tokens > limits.max_new_tokens:
            raise LimitExceeded(f"max_tokens {max_tokens} is over the limit {limits.max_new_tokens}", "max_tokens")
        for i, text in enumerate(sources):
            if len(text) > limits.max_input_chars:
                raise LimitExceeded(f"prompt[{i}] is {len(text)} characters; the limit is {limits.max_input_chars}",
                                    field)
        for conversation in conversations:
            size = sum(len(m["content"]) for m in conversation)
            if size > limits.max_input_chars:
                raise LimitExceeded(f"the messages are {size} characters; the limit is {limits.max_input_chars}",
                                    field)
        if req.composition is not None:
            who.allow_composition(req.composition)
            check_composition(req.composition, limits)
            ref = req.composition
        else:
            ref = ModelName(req.model, who)
        metrics.note_composition(req.composition if req.composition is not None else req.model)
        return GenerateJob(ref, sources, req.sampling(max_tokens), req.n, conversations, field)

    async def _stream(self, job: GenerateJob, req: SamplingFields, chunk: Callable[[list[Delta]], BaseModel],
                      opening: BaseModel | None, final: Callable[[Usage], BaseModel]) -> StreamingResponse:
        """Server-sent events of one generation. Errors before the first token answer with their status; later
        ones become an error event, then [DONE]."""
        head: GenerationHead
        head, stream = await self._call("generate_stream", job, stream=True)
        idle_s = self.settings.request_timeout_s

        async def events() -> AsyncIterator[str]:
            transcript = Transcript(len(head.prompt_tokens) * job.n)
            try:
                if opening is not None:
                    yield _sse(opening)
                while True:
                    try:
                        news = await asyncio.wait_for(anext(stream), idle_s)
                    except StopAsyncIteration:
                        break
                    transcript.add(news)
                    shown = [d for d in news if d.text or d.finish_reason]
                    if shown:
                        yield _sse(chunk(shown))
                if req.include_usage:
                    yield _sse(final(_usage(head.prompt_tokens, sum(map(len, transcript.tokens)))))
            except Exception as exc:  # noqa: BLE001 - the client learns it in the stream; the status was 200
                if isinstance(exc, asyncio.TimeoutError):
                    exc = errors.RequestTimeout(f"no token within {idle_s:g} s")
                response = errors.exception_response(exc)
                yield _sse(openai_error(response.status_code, json.loads(response.body)))
            finally:
                stream.cancel()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- routes ---------------------------------------------------------------------------------------------------

    @router.get("/v1/models", response_model=ModelList, responses=RESPONSES)
    async def openai_models(self, who: Principal = Depends(principal)) -> ModelList:
        """Every model id the key may use: stored compositions, then tasks with task vectors (a stored composition
        shadows a task of the same name; that task is still reachable as an inline composition)."""
        listing = await self._call("vectors")
        allowed = who.key.compositions if who.key is not None else None
        stored = set(listing["compositions"])
        newest: dict[str, int] = {}
        for m in listing["metas"]:
            if m.kind == "task" and who.visible(m.task) and m.task not in stored:
                newest[m.task] = max(newest.get(m.task, 0), _epoch(m.created_at))
        data = [Model(id=c, created=0, owned_by="composition") for c in sorted(stored)
                if allowed is None or c in allowed]
        return ModelList(data=data + [Model(id=t, created=c, owned_by="task") for t, c in sorted(newest.items())])

    @router.post("/v1/completions", response_model=Completion, responses={**RESPONSES, **STREAMED})
    async def openai_completions(self, req: CompletionRequest, who: Principal = Depends(principal)):
        """Continue each prompt after the composed soft prompt (`n` choices each; `stream` for server-sent events)."""
        bound = req.max_tokens if req.max_tokens is not None else COMPLETION_DEFAULT_TOKENS
        job = self._job(req, who, req.prompts, [], bound)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            def chunk(news: list[Delta]) -> Completion:
                return Completion(id=cid, created=created, model=req.model, choices=[
                    CompletionChoice(index=d.row, text=d.text, finish_reason=d.finish_reason) for d in news])

            return await self._stream(job, req, chunk, None,
                                      lambda usage: Completion(id=cid, created=created, model=req.model, choices=[],
                                                               usage=usage))
        result = await self._call("generate", job)
        done = result.completions
        return Completion(
            id=cid, created=created, model=req.model,
            choices=[CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason) for i, c in enumerate(done)],
            usage=_usage([c.prompt_tokens for c in done[:: job.n]], sum(len(c.token_ids) for c in done)),
        )

    @router.post("/v1/chat/completions", response_model=ChatCompletion, responses={**RESPONSES, **STREAMED})
    async def openai_chat(self, req: ChatCompletionRequest, who: Principal = Depends(principal)):
        """The conversation through the backbone's chat template, then the assistant's turn after the composed
        soft prompt."""
        bound = req.token_bound if req.token_bound is not None else self.settings.limits.max_new_tokens
        job = self._job(req, who, [], [req.conversation()], bound)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            def chunk(news: list[Delta]) -> ChatCompletionChunk:
                return ChatCompletionChunk(id=cid, created=created, model=req.model, choices=[
                    ChatChunkChoice(index=d.row, delta=ChatDelta(content=d.text or None), finish_reason=d.finish_reason)
                    for d in news])

            opening = ChatCompletionChunk(id=cid, created=created, model=req.model, choices=[
                ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content="")) for i in range(req.n)])
            return await self._stream(job, req, chunk, opening,
                                      lambda usage: ChatCompletionChunk(id=cid, created=created, model=req.model,
                                                                        choices=[], usage=usage))
        result = await self._call("generate", job)
        done = result.completions
        return ChatCompletion(
            id=cid, created=created, model=req.model,
            choices=[ChatChoice(index=i, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason)
                     for i, c in enumerate(done)],
            usage=_usage([c.prompt_tokens for c in done[:: job.n]], sum(len(c.token_ids) for c in done)),
        )
