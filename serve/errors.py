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
from ray.exceptions import RayTaskError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.auth import Forbidden, Unauthorized
from serve.schemas import ErrorResponse
from tpv.errors import ConflictError, CorruptData, InvalidInput, NotFoundError, TpvError, Unavailable

logger = logging.getLogger("ray.serve")


class BodyTooLarge(InvalidInput):
    """The request body passed `max_body_bytes` (counted while reading, with or without Content-Length)."""


class BodyTimeout(InvalidInput):
    """The client did not send its whole body within `body_read_timeout_s`."""


class RequestTimeout(Unavailable):
    """The model did not answer within `request_timeout_s`."""


class ModelUnavailable(Unavailable):
    """No model replica could take the request (all retries spent)."""


#: the one mapping, most specific first; anything else is a 500 `internal_error`
STATUS: dict[type[BaseException], tuple[int, str]] = {
    BodyTooLarge: (413, "body_too_large"),
    BodyTimeout: (408, "body_timeout"),
    RequestTimeout: (504, "timeout"),
    ModelUnavailable: (503, "model_unavailable"),
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
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=kind, detail=redact(detail), errors=errors).model_dump(exclude_none=True)
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
    return error_response(status, kind, detail, headers=headers)


def _plain_errors(errors: list[dict]) -> list[dict]:
    """Pydantic errors as JSON-safe dicts (inputs dropped: they may be huge or non-finite)."""
    out = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ())]
        out.append({"loc": loc, "msg": redact(str(e.get("msg", "")).removeprefix("Value error, ")),
                    "type": str(e.get("type", ""))})
    return out


def _summary(errors: list[dict], limit: int = 6) -> str:
    parts = [f"{'.'.join(e['loc']) or 'body'}: {e['msg']}" for e in errors[:limit]]
    more = f" (+{len(errors) - limit} more)" if len(errors) > limit else ""
    return "; ".join(parts) + more


def install(app: FastAPI) -> None:
    """Every failure of `app` answers the one JSON shape; a 405 keeps its Allow header."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _plain_errors(list(exc.errors()))
        if any(e["type"] == "json_invalid" for e in errors):
            return error_response(400, "malformed_json", "the request body is not valid JSON: " + _summary(errors),
                                  errors)
        return error_response(422, "invalid_request", _summary(errors), errors)

    @app.exception_handler(ValidationError)
    async def _pydantic(request: Request, exc: ValidationError) -> JSONResponse:
        errors = _plain_errors(exc.errors())
        return error_response(422, "invalid_request", _summary(errors), errors)

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
