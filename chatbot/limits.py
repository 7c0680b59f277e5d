"""Size limits on what a client sends, applied before anything reaches the model.

A chat request holds at most `max_messages` messages, each at most
`max_message_chars` characters (a system prompt too), `max_total_chars`
characters in all; its body is at most `max_body_bytes`. The API refuses a
request beyond any of them with a 413 (`request_too_large`) in
milliseconds: before its prompt is tokenized, before it waits for the model.
The chat page refuses a message or a system prompt over the limit, and sends
the newest turns of its own history that fit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from chatbot.errors import TOO_LARGE, TOO_LARGE_CODE, ApiError, error_body

MIN_BODY_BYTES = 1 << 20


class TooLarge(ApiError):
    """A request over a size limit; `param` names what is over it."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(TOO_LARGE, message, code=TOO_LARGE_CODE, param=param)


@dataclass(frozen=True)
class Limits:
    max_message_chars: int = 8000  # one message, a system prompt included
    max_messages: int = 64  # messages in one request, a system prompt included
    max_total_chars: int = 32000  # all of a request's messages together

    def validate(self) -> "Limits":
        for name in ("max_message_chars", "max_messages", "max_total_chars"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a whole number of at least 1")
        if self.max_total_chars < self.max_message_chars:
            raise ValueError("--max-total-chars must be at least --max-message-chars")
        return self

    @property
    def max_body_bytes(self) -> int:
        """Room for any request within the other limits: JSON may spell one
        character in 12 bytes (an escaped surrogate pair), plus the fields
        around the messages."""
        return max(MIN_BODY_BYTES, 12 * self.max_total_chars + 1024 * self.max_messages)

    def check(self, messages: list[dict]) -> None:
        """Raise `TooLarge` when `messages` (role and text) are over a limit."""
        if len(messages) > self.max_messages:
            raise TooLarge(f"messages: {len(messages):,} messages, the limit is {self.max_messages:,}", "messages")
        total = 0
        for i, message in enumerate(messages):
            chars = len(message["content"])
            if chars > self.max_message_chars:
                what = " (the system prompt)" if message["role"] == "system" else ""
                raise TooLarge(f"messages.{i}.content{what}: {chars:,} characters, the limit is "
                               f"{self.max_message_chars:,}", f"messages.{i}.content")
            total += chars
        if total > self.max_total_chars:
            raise TooLarge(f"messages: {total:,} characters in all, the limit is {self.max_total_chars:,}",
                           "messages")

    def newest_within(self, messages: list[dict]) -> tuple[list[dict], int]:
        """The chat page's own history within the limits: every system message
        and the newest other messages that fit, starting on a user's; and how
        many were left out. `TooLarge` when even the system prompt and the
        last message do not fit together."""
        system = [m for m in messages if m["role"] == "system"]
        turns = [m for m in messages if m["role"] != "system"]
        room_messages = self.max_messages - len(system)
        room_chars = self.max_total_chars - sum(len(m["content"]) for m in system)
        start, used = len(turns), 0
        for i in range(len(turns) - 1, -1, -1):
            used += len(turns[i]["content"])
            if used > room_chars or len(turns) - i > room_messages:
                break
            if turns[i]["role"] == "user" or i == 0:
                start = i
        if start == len(turns) and turns:
            raise TooLarge(f"the system prompt and the message do not fit together within {self.max_messages:,} "
                           f"messages and {self.max_total_chars:,} characters", "messages")
        return [*system, *turns[start:]], start


class BodyLimit:
    """ASGI middleware: a request under `prefix` whose body is over the
    limits' `max_body_bytes` is answered 413 at once, before it is parsed (a
    declared Content-Length over it, before the body is even read)."""

    def __init__(self, app, *, limits: Limits, prefix: str = "/v1/"):
        self.app, self.limits, self.prefix = app, limits, prefix

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            return await self.app(scope, receive, send)
        limit = self.limits.max_body_bytes
        declared = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), b"")
        if declared.isdigit() and int(declared) > limit:
            return await self._refuse(send, f"the request body is {int(declared):,} bytes; the limit is")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await self._refuse(send, "the request body is over the limit of")
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # a streamed reply listens for the client leaving
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send, what: str) -> None:
        limits = self.limits
        message = (f"{what} {limits.max_body_bytes:,} bytes (a request holds at most {limits.max_messages:,} "
                   f"messages and {limits.max_total_chars:,} characters in all)")
        payload = json.dumps(error_body(message, TOO_LARGE_CODE, status=TOO_LARGE)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                   (b"connection", b"close")]
        await send({"type": "http.response.start", "status": TOO_LARGE, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
