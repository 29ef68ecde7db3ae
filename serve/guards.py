"""What happens before the app reads a request: the API key is checked, then the body is read under bounds.

ASGI middlewares, so they act before FastAPI touches the body. `KeyGuard` refuses a missing or wrong key (401)
without reading a byte of the body, and a request with more than one Authorization header (400). `BodyGuard`
sees the body as it arrives (Serve streams it from the proxy): a chunked body with no Content-Length is cut off at
`max_body_bytes` (413), and a client that drips its body is cut off after `body_read_timeout_s` (408). A body
arriving slower than `slow_body_bytes_per_s` (judged from `slow_body_after_s` on) needs one of `slow_body_slots`
slots, else it is cut off at once (408): fewer slots than the ingress's `max_ongoing_requests`, so slow clients
cannot hold every request slot for the body timeout, while a big body sent at any honest speed needs none. The body is then checked against its route
(`serve.parsing`) and handed to the app in one piece. HEAD is answered as GET without the body.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve import auth
from serve.errors import BodyTimeout, BodyTooLarge, SlowBodyRefused, error_response, exception_response
from serve.parsing import RouteShapes
from serve.playground import PAGE_PATHS
from tpv.errors import TpvError


@dataclass
class BodyLimits:
    max_bytes: int = 2_000_000
    timeout_s: float = 10.0
    slow_after_s: float = 0.25
    slow_rate: float = 8_000.0  # bytes per second: a body arriving slower than this (after slow_after_s) is slow
    slow_slots: int = 64
    slow_in_use: int = 0  # bodies past slow_after_s being read now (one event loop: no lock needed)


# One per process: the deployment's reconfigure() sets it, the middleware (built by FastAPI) reads it.
LIMITS = BodyLimits()


def configure(max_bytes: int, timeout_s: float, slow_after_s: float, slow_rate: float, slow_slots: int) -> None:
    LIMITS.max_bytes, LIMITS.timeout_s = max_bytes, timeout_s
    LIMITS.slow_after_s, LIMITS.slow_rate, LIMITS.slow_slots = slow_after_s, slow_rate, slow_slots


async def read_body(receive: Receive, limits: BodyLimits) -> bytes:
    """The whole body, or BodyTooLarge / BodyTimeout (SlowBodyRefused when no slow-body slot is free); an early
    client disconnect ends it as read so far."""
    start = time.monotonic()
    deadline = start + limits.timeout_s
    slow = False
    parts: list[bytes] = []
    size = 0
    pending: asyncio.Future | None = None  # one receive() at a time, never cancelled mid-message by a timeout
    elapsed = 0.0
    try:
        while True:
            until = deadline if slow else min(deadline, start + max(limits.slow_after_s, elapsed + 0.05))
            pending = pending or asyncio.ensure_future(receive())
            done, _ = await asyncio.wait({pending}, timeout=max(until - time.monotonic(), 0.0))
            elapsed = time.monotonic() - start
            if not done:  # judged only when nothing is waiting to be read: a busy loop makes no client slow
                if elapsed >= limits.timeout_s:
                    raise BodyTimeout(f"the request body was not received within {limits.timeout_s:g} s")
                if not slow and elapsed >= limits.slow_after_s and size < limits.slow_rate * elapsed:
                    if limits.slow_in_use >= limits.slow_slots:
                        raise SlowBodyRefused(f"the body is arriving slower than {limits.slow_rate:g} bytes/s and "
                                              f"every slow-body slot is taken; send it faster or retry later")
                    slow = True
                    limits.slow_in_use += 1
                continue
            message, pending = pending.result(), None
            if message["type"] != "http.request":
                return b"".join(parts)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limits.max_bytes:
                raise BodyTooLarge(f"the body is over the limit of {limits.max_bytes} bytes")
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)
    finally:
        if pending is not None:
            pending.cancel()
        if slow:
            limits.slow_in_use -= 1


def _without_body(send: Send) -> Send:
    """`send` for a HEAD request: the GET answer's status and headers (its length included), no body bytes."""

    async def head(message: Message) -> None:
        if message["type"] == "http.response.body":
            if message.get("more_body", False):
                return
            message = {**message, "body": b""}
        await send(message)

    return head


class BodyGuard:
    """ASGI middleware applying `LIMITS`, then the route's `RouteShapes`, to every HTTP request before the app
    sees it."""

    def __init__(self, app: ASGIApp, shapes: RouteShapes) -> None:
        self.app = app
        self.shapes = shapes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "HEAD":
            scope, send = {**scope, "method": "GET"}, _without_body(send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await error_response(400, "bad_header", "content-length is not a number")(scope, receive, send)
                return
            if int(length) > LIMITS.max_bytes:
                exc = BodyTooLarge(f"the body is {int(length)} bytes; the limit is {LIMITS.max_bytes}")
                await exception_response(exc)(scope, receive, send)
                return
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        bodiless = length in (None, b"0") and b"transfer-encoding" not in headers  # a GET: nothing to wait for
        try:
            body = b"" if bodiless else await read_body(receive, LIMITS)
            await self.shapes.check(scope["method"], path, scope.get("query_string", b""), body)
        except TpvError as exc:
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
        if scope["type"] == "http" and sum(k == b"authorization" for k, _ in scope.get("headers") or []) > 1:
            await error_response(400, "bad_header", "send one Authorization header, not several")(scope, receive, send)
            return
        if scope["type"] == "http" and not auth.KEYRING.open:
            path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
            if path not in OPEN_PATHS:
                try:
                    auth.KEYRING.check(bearer_token(scope))
                except auth.Unauthorized as exc:
                    await exception_response(exc)(scope, receive, send)
                    return
        await self.app(scope, receive, send)
