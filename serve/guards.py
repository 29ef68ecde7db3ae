"""What happens before the app reads a request: the API key is checked, then the body is read under bounds.

ASGI middlewares, so they act before FastAPI touches the body. `KeyGuard` refuses a missing or wrong key (401)
without reading a byte of the body. `BodyGuard` sees the body as it arrives (Serve streams it from the proxy):
a chunked body with no Content-Length is cut off at `max_body_bytes` (413) and a client that drips its body is
cut off after `body_read_timeout_s` (408), freeing its slot. The body is then handed to the app in one piece.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve import auth
from serve.errors import BodyTimeout, BodyTooLarge, error_response, exception_response
from serve.playground import PAGE_PATHS


@dataclass
class BodyLimits:
    max_bytes: int = 2_000_000
    timeout_s: float = 10.0


# One per process: the deployment's reconfigure() sets it, the middleware (built by FastAPI) reads it.
LIMITS = BodyLimits()


def configure(max_bytes: int, timeout_s: float) -> None:
    LIMITS.max_bytes, LIMITS.timeout_s = max_bytes, timeout_s


async def read_body(receive: Receive, limits: BodyLimits) -> bytes:
    """The whole body, or BodyTooLarge / BodyTimeout; an early client disconnect ends it as read so far."""
    deadline = time.monotonic() + limits.timeout_s
    parts: list[bytes] = []
    size = 0
    while True:
        left = deadline - time.monotonic()
        try:
            message = await asyncio.wait_for(receive(), timeout=max(left, 0.0))
        except asyncio.TimeoutError:
            raise BodyTimeout(f"the request body was not received within {limits.timeout_s:g} s") from None
        if message["type"] != "http.request":
            return b"".join(parts)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limits.max_bytes:
            raise BodyTooLarge(f"the body is over the limit of {limits.max_bytes} bytes")
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


class BodyGuard:
    """ASGI middleware applying `LIMITS` to every HTTP request before the app sees it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await error_response(400, "bad_header", "content-length is not a number")(scope, receive, send)
                return
            if int(length) > LIMITS.max_bytes:
                exc = BodyTooLarge(f"the body is {int(length)} bytes; the limit is {LIMITS.max_bytes}")
                await exception_response(exc)(scope, receive, send)
                return
        try:
            body = await read_body(receive, LIMITS)
        except (BodyTooLarge, BodyTimeout) as exc:
            await exception_response(exc)(scope, receive, send)
            return
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


OPEN_PATHS = frozenset({"/v1/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", *PAGE_PATHS})


def bearer_token(scope: Scope) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None."""
    value = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
    scheme, _, token = value.partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


class KeyGuard:
    """ASGI middleware: with keys configured, every path but OPEN_PATHS needs a valid one (the route's own
    dependency then applies the key's scope)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not auth.KEYRING.open:
            path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
            if path not in OPEN_PATHS:
                try:
                    auth.KEYRING.check(bearer_token(scope))
                except auth.Unauthorized as exc:
                    await exception_response(exc)(scope, receive, send)
                    return
        await self.app(scope, receive, send)
