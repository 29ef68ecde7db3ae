"""Errors -> HTTP: ONE table by exception type (walking the MRO), one JSON shape (`ErrorResponse`) for all.

Messages never carry server paths: store and model locations are replaced before a detail leaves the server,
and store corruption or an unexpected fault answers a fixed text (the real one goes to the replica's log).
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.auth import Forbidden, Unauthorized
from serve.schemas import ErrorResponse
from tpv.errors import ConflictError, CorruptData, InvalidInput, NotFoundError, TpvError, Unavailable

logger = logging.getLogger("ray.serve")


class BodyTooLarge(InvalidInput):
    """The request body passed `max_body_bytes` (counted while reading, with or without Content-Length)."""


class BodyTimeout(InvalidInput):
    """The client did not send its whole body within `body_read_timeout_s`."""


class SlowBodyRefused(BodyTimeout):
    """A body still arriving after `slow_body_after_s` while every slow-body slot is taken: cut off at once, so
    slow clients cannot hold the ingress's request slots for the whole body timeout."""


class MalformedBody(InvalidInput):
    """The body is not JSON."""


class FieldErrors(InvalidInput):
    """An invalid request that names the fields at fault: the first `MAX_ERRORS` of them, and how many more."""

    def __init__(self, detail: str, errors: list[dict], total: int | None = None) -> None:
        super().__init__(detail)
        self.errors = errors[:MAX_ERRORS]
        self.more = (len(errors) if total is None else total) - len(self.errors)


class InvalidRequest(FieldErrors):
    """The body or query string does not fit the route's schema (strict types, no unknown names)."""


class RequestTimeout(Unavailable):
    """The model did not answer within `request_timeout_s`."""


class ModelUnavailable(Unavailable):
    """No model replica could take the request (all retries spent)."""


MAX_ERRORS = 20  # field errors listed in one answer; the rest are counted

#: what a lost model replica raises through a handle, also mid-stream (ActorDiedError and ActorUnavailableError are RayActorErrors): a retry may well succeed
LOST_REPLICA = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError,
                BackPressureError)

#: the one mapping, most specific first; anything else is a 500 `internal_error`
STATUS: dict[type[BaseException], tuple[int, str]] = {
    BodyTooLarge: (413, "body_too_large"),
    BodyTimeout: (408, "body_timeout"),
    RequestTimeout: (504, "timeout"),
    ModelUnavailable: (503, "model_unavailable"),
    **{klass: (503, "unavailable") for klass in LOST_REPLICA},
    MalformedBody: (400, "malformed_json"),
    InvalidRequest: (422, "invalid_request"),
    Unauthorized: (401, "unauthorized"),
    Forbidden: (403, "forbidden"),
    InvalidInput: (422, "invalid_input"),
    NotFoundError: (404, "not_found"),
    ConflictError: (409, "conflict"),
    CorruptData: (500, "store_corrupt"),
    Unavailable: (503, "unavailable"),
    TpvError: (500, "internal_error"),
}
_FIXED = {
    "store_corrupt": "a stored file named by this request failed its check (a server-side problem; see the log)",
    "internal_error": "unexpected server error (see the replica's log)",
}
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:/[\w.+@~-]+){2,}/?")


def status_of(exc: BaseException) -> tuple[int, str]:
    for klass in type(exc).__mro__:
        if klass in STATUS:
            return STATUS[klass]
    return 500, "internal_error"


def unwrap(exc: BaseException) -> BaseException:
    """The replica's own exception behind Ray's wrapper (its type is what the table maps)."""
    cause = getattr(exc, "cause", None) if isinstance(exc, RayTaskError) else None
    return cause if isinstance(cause, BaseException) else exc


def redact(text: str) -> str:
    """Replace anything that looks like an absolute path (store, model, home) by '<path>'."""
    return _PATH.sub("<path>", text)


def error_response(status: int, kind: str, detail: str, errors: list | None = None,
                   headers: dict[str, str] | None = None, more: int = 0) -> JSONResponse:
    body = ErrorResponse(error=kind, detail=redact(detail), errors=errors,
                         more_errors=more or None).model_dump(exclude_none=True)
    return JSONResponse(status_code=status, content=body, headers=headers)


def exception_response(exc: BaseException) -> JSONResponse:
    exc = unwrap(exc)
    status, kind = status_of(exc)
    if status >= 500:
        logger.error("tpv: %s: %s: %s", kind, type(exc).__name__, exc, exc_info=exc)
    detail = _FIXED.get(kind) or str(exc.args[0] if len(exc.args) == 1 else exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    if status == 503:
        headers = {"Retry-After": "1"}
    if isinstance(exc, FieldErrors):
        return error_response(status, kind, detail, exc.errors or None, headers, exc.more)
    return error_response(status, kind, detail, headers=headers)


def plain_errors(errors: list[dict], prefix: tuple[str, ...] = ()) -> list[dict]:
    """The first MAX_ERRORS pydantic errors as JSON-safe dicts (inputs dropped: they may be huge or non-finite)."""
    out = []
    for e in errors[:MAX_ERRORS]:
        loc = [*prefix, *(str(p) for p in e.get("loc", ()))]
        out.append({"loc": loc, "msg": redact(str(e.get("msg", "")).removeprefix("Value error, ")),
                    "type": str(e.get("type", ""))})
    return out


def summary(errors: list[dict], total: int, limit: int = 6) -> str:
    parts = [f"{'.'.join(e['loc']) or 'body'}: {e['msg']}" for e in errors[:limit]]
    more = f" (+{total - limit} more)" if total > limit else ""
    return "; ".join(parts) + more


def install(app: FastAPI) -> None:
    """Every failure of `app` answers the one JSON shape; a 405 keeps its Allow header."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        raw = list(exc.errors())
        errors = plain_errors(raw)
        if any(e["type"] == "json_invalid" for e in errors):
            return exception_response(MalformedBody("the request body is not valid JSON: " + summary(errors, len(raw))))
        return exception_response(InvalidRequest(summary(errors, len(raw)), errors, len(raw)))

    @app.exception_handler(ValidationError)
    async def _pydantic(request: Request, exc: ValidationError) -> JSONResponse:
        errors = plain_errors(exc.errors(include_url=False))
        return exception_response(InvalidRequest(summary(errors, exc.error_count()), errors, exc.error_count()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: "no_such_route", 405: "method_not_allowed"}
        return error_response(exc.status_code, kinds.get(exc.status_code, "http_error"), str(exc.detail),
                              headers=dict(exc.headers or {}))

    async def _mapped(request: Request, exc: Exception) -> JSONResponse:
        return exception_response(exc)

    # TpvError and Ray's task errors are answered by the exception middleware; Exception (anything else) by the
    # server-error middleware, which answers the same shape and then logs the traceback
    for klass in (TpvError, RayTaskError, Exception):
        app.add_exception_handler(klass, _mapped)
