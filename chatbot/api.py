"""The chat over HTTP: OpenAI-compatible chat completions, feedback, models.

Routes are plain (sync) FastAPI handlers: FastAPI runs them in its thread
pool, and the `Policy` takes care of sharing the model. Every error is a 4xx
(or 503 when the model is busy) with an OpenAI-style JSON body
(`chatbot.errors`), never a 500 for bad input. A chat request over a size
limit (`chatbot.limits`) is refused before its prompt is tokenized; one
whose history does not fit the model's context loses its oldest turns, and
the answer says how many (`X-Truncated-Messages`, `usage.truncated_messages`).

With logins or API keys configured every route asks for one (401 without);
the rater of a reply or a thumb is then its user, and the body's ``user``
is kept as a label (`chatbot.identity`). Thumbs faster than `RateLimit`
allows are answered 429 and not stored.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import threading
import time
from typing import Any, Literal

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from chatbot.credentials import Credentials
from chatbot.errors import ApiError, ErrorResponse, error_body
from chatbot.identity import Caller, Identity, api_caller
from chatbot.limits import TooLarge
from chatbot.policy import Busy, GenerationSettings, Policy, PromptError, Route
from chatbot.rate_limit import RateLimit, retry_after
from storage import ResponseNotFound, Store, StoreError
from storage.store import new_response_id

TRUNCATED_HEADER = "X-Truncated-Messages"


def _encodable(value):
    """Text that is valid Unicode: JSON can carry a lone surrogate ("\\ud800"),
    which no UTF-8 encoder (the tokenizer, SQLite) accepts."""
    texts = [value] if isinstance(value, str) else [
        v for part in value or [] if isinstance(part, dict) for v in part.values() if isinstance(v, str)]
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text must be valid Unicode (it holds a lone surrogate)") from None
    return value


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = ""

    _valid_text = field_validator("content")(classmethod(lambda cls, v: _encodable(v)))

    def text(self) -> str:
        """Text content; OpenAI's list of parts is joined (text parts only)."""
        if isinstance(self.content, list):
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stream: bool = False
    user: str | None = Field(default=None, max_length=200)

    _valid_text = field_validator("user", "model")(classmethod(lambda cls, v: _encodable(v)))


class FeedbackRequest(BaseModel):
    """A thumb on a reply, or a correction: the reply the rater would have
    liked instead (it comes with a thumbs-down, so `value` may be left out)."""

    model_config = ConfigDict(extra="forbid")
    response_id: str = Field(min_length=1, max_length=200)
    value: StrictInt | None = None
    comment: str | None = Field(default=None, max_length=8000)
    correction: str | None = Field(default=None, description="a better reply, in place of this one")
    user: str | None = Field(default=None, max_length=200)

    _valid_text = field_validator("response_id", "comment", "correction", "user")(
        classmethod(lambda cls, v: _encodable(v)))

    @field_validator("value")
    @classmethod
    def _plus_or_minus_one(cls, value: int | None) -> int | None:
        if value is not None and value not in (1, -1):
            raise ValueError("value must be 1 (thumbs-up) or -1 (thumbs-down)")
        return value

    @model_validator(mode="after")
    def _a_thumb_or_a_correction(self) -> "FeedbackRequest":
        if self.correction is not None and not self.correction.strip():
            raise ValueError("correction: an empty correction")
        if self.value is None and self.correction is None:
            raise ValueError("value: give a thumb (1 or -1), a correction, or both")
        if self.correction is not None and self.value == 1:
            raise ValueError("value: a correction replaces the reply, so it comes with a thumbs-down (-1)")
        return self


def api_router(policy: Policy, store: Store, options, *, credentials: Credentials | None = None,
               thumbs: RateLimit | None = None) -> APIRouter:
    """`options` is the `ChatOptions` shared with the chat page, and so is
    `thumbs`, the rate limit of feedback (one from `options` when not given)."""
    caller = api_caller(credentials)
    thumbs = thumbs or RateLimit(options.max_thumbs_per_minute)
    unauthorized = {401: {"model": ErrorResponse, "description": "No login or API key, or a wrong one"}}
    router = APIRouter(prefix="/v1", dependencies=[Depends(caller)],
                       responses=unauthorized if credentials and credentials.required else None)

    def settings_for(req: ChatRequest) -> GenerationSettings:
        defaults: GenerationSettings = options.defaults
        max_new = req.max_completion_tokens or req.max_tokens or defaults.max_new_tokens
        if max_new > options.max_new_tokens_limit:
            raise ApiError(400, f"max_tokens: at most {options.max_new_tokens_limit} on this server")
        return GenerationSettings(
            max_new_tokens=max_new,
            temperature=defaults.temperature if req.temperature is None else req.temperature,
            top_p=defaults.top_p if req.top_p is None else req.top_p,
            system_prompt="", within_base=defaults.within_base,
        ).validate()

    def prompt_for(req: ChatRequest) -> list[dict]:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        options.limits.check(messages)
        if messages[-1]["role"] != "user":
            raise ApiError(400, "messages: the last message must be from the user")
        if not messages[-1]["content"].strip():
            raise ApiError(400, "messages: the last user message is empty")
        if not any(m["role"] == "system" for m in messages) and options.defaults.system_prompt:
            messages.insert(0, {"role": "system", "content": options.defaults.system_prompt})
        return messages

    def log(prompt, result, settings, response_id, identity: Identity) -> None:
        # Each API request is a conversation of its own (the client keeps the
        # history); both rows go in one commit.
        with store.transaction():
            conversation = store.start_conversation(identity.session_id, identity.user)
            store.log_response(
                conversation_id=conversation, prompt=prompt, reply=result.text,
                model_version=result.version, generation=settings.as_dict(),
                latency_ms=result.latency_ms, prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens, finish_reason=result.finish_reason,
                response_id=response_id, **identity.columns(),
            )

    def busy(exc: Busy | None = None) -> ApiError:
        message = str(exc) if exc else "the model is busy: too many requests are waiting, try again shortly"
        return ApiError(503, message, code="server_busy", headers={"Retry-After": "2"})

    @router.post("/chat/completions", responses={
        413: {"model": ErrorResponse, "description": "Over a size limit: too many messages or characters"},
        503: {"model": ErrorResponse, "description": "Too many requests are waiting for the model"}})
    def chat_completions(req: ChatRequest, who: Caller = Depends(caller)):
        identity = who.identity(claimed=req.user)
        settings, prompt = settings_for(req), prompt_for(req)
        response_id, created = new_response_id(), int(time.time())
        if not req.stream:
            try:
                result = policy.generate(prompt, settings, route=Route(key=identity.key))
            except Busy as exc:
                raise busy(exc) from None
            except PromptError as exc:
                raise ApiError(400, str(exc), param="messages") from None
            log(prompt, result, settings, response_id, identity)
            return JSONResponse({
                "id": response_id,
                "object": "chat.completion",
                "created": created,
                "model": result.version,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "finish_reason": _finish(result.finish_reason),
                }],
                "usage": {
                    "prompt_tokens": result.prompt_tokens,
                    "completion_tokens": result.completion_tokens,
                    "total_tokens": result.prompt_tokens + result.completion_tokens,
                    "truncated_messages": result.truncated_messages,
                },
            }, headers={TRUNCATED_HEADER: str(result.truncated_messages)})

        if policy.busy():
            raise busy()
        try:
            stream = policy.stream(prompt, settings, route=Route(key=identity.key))  # tokenized here, before it waits for the model
        except PromptError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        # Generation is read on a thread of its own, which also logs the
        # reply; it hands the pieces to the response on the event loop
        # (`call_soon_threadsafe`: no thread hop per piece). Pieces that
        # arrive together go out as one chunk. A client that goes away sets
        # the stop event, and the reply is logged as stopped.
        def chunk(delta: dict, finish=None) -> str:
            # The version that writes this reply, bound when it joined the
            # batch: a hot-swap meanwhile does not change it.
            body = {
                "id": response_id, "object": "chat.completion.chunk", "created": created,
                "model": stream.result.version,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def events():
            loop = asyncio.get_running_loop()
            items: collections.deque = collections.deque()  # touched on the event loop only
            ready = asyncio.Event()

            def push(item) -> None:
                items.append(item)
                ready.set()

            def put(item) -> None:
                with contextlib.suppress(RuntimeError):  # the loop has closed: the server is stopping
                    loop.call_soon_threadsafe(push, item)

            def produce():
                try:
                    for piece in stream:
                        put(("piece", piece))
                    log(prompt, stream.result, settings, response_id, identity)
                    put(("done", stream.result.finish_reason))
                except Exception as exc:  # noqa: BLE001 - reported in the stream
                    put(("error", exc))

            # Starting a thread waits until it runs, which under load (the
            # engine's thread holding the GIL) took ~2 ms: on the event loop
            # that held up every other stream's chunks. A pool thread waits instead.
            producer = threading.Thread(target=produce, daemon=True, name=f"generate-{response_id}")
            try:
                await loop.run_in_executor(None, producer.start)
                started = False
                while True:
                    if not items:
                        ready.clear()
                        await ready.wait()
                    kind, value = items.popleft()
                    while kind == "piece" and items and items[0][0] == "piece":
                        value += items.popleft()[1]
                    if not started and kind != "error":
                        started = True
                        yield chunk({"role": "assistant", "content": ""})
                    if kind == "piece":
                        yield chunk({"content": value})
                    elif kind == "done":
                        yield chunk({}, _finish(value))
                        yield "data: [DONE]\n\n"
                        return
                    else:
                        message = str(value) if isinstance(value, Busy) else f"generation failed: {value}"
                        yield f"data: {json.dumps(error_body(message, 'generation_error', status=500))}\n\n"
                        return
            finally:
                stream.stop.set()  # a no-op once generation has finished

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                          TRUNCATED_HEADER: str(stream.prompt.dropped)})

    @router.post("/feedback", responses={
        404: {"model": ErrorResponse, "description": "No response with that id"},
        413: {"model": ErrorResponse, "description": "A correction over --max-message-chars"},
        429: {"model": ErrorResponse, "description": "Thumbs from this rater faster than the server's limit"}})
    def feedback(req: FeedbackRequest, who: Caller = Depends(caller)):
        identity = who.identity(claimed=req.user)
        if (wait := thumbs.take(identity.key)) is not None:
            raise ApiError(429, f"more than {thumbs.per_minute} thumbs a minute from one rater; this one was "
                                f"not stored, try again in {retry_after(wait)} s", code="rate_limit_exceeded",
                           headers={"Retry-After": retry_after(wait)})
        if req.correction is not None and len(req.correction) > options.max_message_chars:
            raise TooLarge(f"correction: {len(req.correction):,} characters, the limit is "
                           f"{options.max_message_chars:,}", "correction")
        value = -1 if req.value is None else req.value
        try:
            feedback_id = store.record_feedback(req.response_id, value, comment=req.comment,
                                                correction=req.correction, **identity.columns())
        except ResponseNotFound as exc:
            raise ApiError(404, str(exc), code="response_not_found") from None
        except StoreError as exc:
            raise ApiError(400, str(exc)) from None
        return {"id": feedback_id, "response_id": req.response_id, "value": value,
                "correction": req.correction is not None}

    @router.get("/models")
    def models():
        return {
            "object": "list",
            "data": [{"id": policy.version, "object": "model", "created": 0, "owned_by": "learning-chatbot"}],
        }

    return router


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"
