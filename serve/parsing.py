"""A request checked against its route before FastAPI reads it: strict types, no unknown names, capped errors.

JSON bodies are validated in strict mode (`"4"` is not an int, `true` not a number, `"yes"` not a bool), objects
with more keys than any request schema has and duplicate keys are refused while parsing, and a validation answer
lists the first `MAX_ERRORS` fields at fault plus a count. Bodies over `INLINE_BYTES` are parsed and validated on
one worker thread, so a costly body (130,000 unknown keys) never stalls the event loop that answers everyone
else; small ones cost microseconds and are checked inline. Query strings may carry only the route's parameters,
each once. FastAPI then parses the (valid) request as usual.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qsl

from pydantic import BaseModel, ValidationError

from serve.errors import MalformedBody, InvalidRequest, plain_errors, summary

INLINE_BYTES = 64 * 1024
MAX_OBJECT_KEYS = 64  # no request object has more fields than this
_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tpv-parse")


class _ObjectRefused(ValueError):
    pass


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len(pairs) > MAX_OBJECT_KEYS:
        raise _ObjectRefused(f"an object with {len(pairs)} keys; no request object takes more than {MAX_OBJECT_KEYS}")
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _ObjectRefused(f"the key {twice[:64]!r} appears twice in one object")
    return out


def check_body(model: type[BaseModel], body: bytes) -> None:
    """MalformedBody (400) or InvalidRequest (422, capped field errors) unless `body` is a valid `model`."""
    try:
        json.loads(body, object_pairs_hook=_object)
    except _ObjectRefused as exc:
        raise InvalidRequest(f"body: {exc}", [{"loc": ["body"], "msg": str(exc), "type": "object_refused"}]) from None
    except ValueError as exc:  # JSONDecodeError and undecodable bytes
        raise MalformedBody(f"the request body is not valid JSON: {exc}") from None
    try:
        model.model_validate_json(body, strict=True)
    except ValidationError as exc:
        total = exc.error_count()
        errors = plain_errors(exc.errors(include_url=False, include_context=False, include_input=False), ("body",))
        raise InvalidRequest(summary(errors, total), errors, total) from None


def check_query(query: bytes, allowed: frozenset[str]) -> None:
    """InvalidRequest naming every query parameter the route does not take, or takes once and got twice."""
    names = [k for k, _ in parse_qsl(query.decode("latin-1"), keep_blank_values=True)]
    unknown = sorted({k for k in names if k not in allowed})
    twice = sorted({k for k in names if k in allowed and names.count(k) > 1})
    errors = [{"loc": ["query", k], "msg": "unknown query parameter", "type": "extra_forbidden"} for k in unknown]
    errors += [{"loc": ["query", k], "msg": "given more than once", "type": "duplicate"} for k in twice]
    if errors:
        raise InvalidRequest(summary(errors, len(errors)), errors)


class RouteShapes:
    """What each route takes: its body model (POST) and its query parameters; paths outside are not checked."""

    def __init__(self, bodies: Mapping[str, type[BaseModel]], queries: Mapping[str, frozenset[str]],
                 prefix: str = "/v1/") -> None:
        self.bodies, self.queries, self.prefix = dict(bodies), dict(queries), prefix

    async def check(self, method: str, path: str, query: bytes, body: bytes) -> None:
        if not path.startswith(self.prefix):
            return
        check_query(query, self.queries.get(path, frozenset()))
        model = self.bodies.get(path)
        if model is None or method != "POST":
            return
        if len(body) <= INLINE_BYTES:
            check_body(model, body)
        else:
            await asyncio.get_running_loop().run_in_executor(_WORKER, check_body, model, body)
