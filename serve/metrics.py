"""The service's own metrics, exported with `ray.serve.metrics` so they appear on Ray's Prometheus endpoint.

Every node's metrics agent serves them at `http://<node>:<metrics export port>/metrics` (`ray start
--metrics-export-port`, `ray.init(_metrics_export_port=...)`, else a free port: `ray.nodes()[i]["MetricsExportPort"]`)
with the prefix `ray_`, beside Serve's own metrics; Serve adds the `deployment`, `replica` and `application` labels.
The metric list with labels and meaning is in docs/ARCHITECTURE.md ("Metrics").

- `RequestMetrics` (ASGI middleware, the ingress): one count and one latency per HTTP request, by route (the
  route's template, never the raw path), status and composition. It is the outermost middleware, so requests
  refused by the key or body guards are counted too; a route names its composition with `note_composition`.
- `ModelMetrics` (the model replica): rows, requests and compositions per batch, and the prompt cache's hits,
  misses and evictions, read from the prompt cache's own counters (`tpv.cache.BoundedLRU`, which stays Ray-free).

Label values are bounded, so a client cannot grow Prometheus' series: unknown paths are one route value
(`unmatched`); a composition gets its own value once it has been served (before that an error is `unserved`), for
at most `MAX_COMPOSITION_LABELS` compositions per process (then `other`).
"""

from __future__ import annotations

import hashlib
import re
import time
from contextvars import ContextVar
from typing import Any

from ray.serve.metrics import Counter, Gauge, Histogram
from starlette.routing import Router, compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.batching import BatchReport
from serve.schemas import InlineComposition
from tpv.cache import BoundedLRU

MAX_COMPOSITION_LABELS = 512
MAX_LABEL_CHARS = 120
NO_COMPOSITION = "none"  # the request named none (a listing, or refused before its body was read)
LATENCY_MS = [1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000, 60_000, 120_000]
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]

# One dict per HTTP request, set by the middleware; a route fills it. A dict (not the value) so that a route running
# in a copied context still writes where the middleware reads.
_REQUEST: ContextVar[dict[str, str] | None] = ContextVar("tpv_request_labels", default=None)
_seen: set[str] = set()


def composition_label(ref: InlineComposition | str) -> str:
    """A stored composition's name; an inline one as its terms (`task=w`, `vector_id=w`, then origin seed, method
    and coefficient when not the defaults), cut to MAX_LABEL_CHARS with a digest of the whole when longer or when
    a term narrows its task by seeds or source."""
    if isinstance(ref, str):
        return ref
    parts = [f"{t.task or t.vector_id}={t.weight:g}" for t in ref.terms]
    if ref.origin_seed:
        parts.append(f"seed={ref.origin_seed}")
    if ref.method != "weighted":
        parts.append(f"method={ref.method}")
    if ref.coefficient != 1.0:
        parts.append(f"coefficient={ref.coefficient:g}")
    text = ",".join(parts)
    if len(text) > MAX_LABEL_CHARS or any(t.seeds or t.source for t in ref.terms):
        digest = hashlib.sha256(ref.model_dump_json().encode()).hexdigest()[:12]
        text = f"{text[: MAX_LABEL_CHARS - 13]}#{digest}"
    return text


def note_composition(ref: InlineComposition | str) -> None:
    """Label the current HTTP request with its composition (a no-op outside `RequestMetrics`)."""
    labels = _REQUEST.get()
    if labels is not None:
        labels["composition"] = composition_label(ref)


def _admitted(composition: str, status: int) -> str:
    """The label value to export: a new composition gets its own only when served (a client naming unknown
    compositions cannot use up the budget) and while fewer than MAX_COMPOSITION_LABELS have one."""
    if composition == NO_COMPOSITION or composition in _seen:
        return composition
    if status >= 400:
        return "unserved"
    if len(_seen) >= MAX_COMPOSITION_LABELS:
        return "other"
    _seen.add(composition)
    return composition


def route_templates(router: Router, prefix: str = "") -> list[str]:
    """Every route's path template, through included routers (FastAPI nests those, and Serve's class views)."""
    out = []
    for route in router.routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            out += route_templates(inner, prefix + getattr(getattr(route, "include_context", None), "prefix", ""))
        elif isinstance(getattr(route, "path", None), str):
            out.append(prefix + route.path)
    return out


class RouteLabels:
    """The path template a request is for (`/v1/classify`, whatever its method), or `unmatched`. Matched by path
    alone, so requests the guards refuse before routing get their route too."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self._compiled: list[tuple[re.Pattern, str]] | None = None

    def __call__(self, scope: Scope) -> str:
        if self._compiled is None:  # on the first request: every route is registered by then
            self._compiled = [(compile_path(t)[0], t) for t in route_templates(self.router)]
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        return next((t for pattern, t in self._compiled if pattern.match(path)), "unmatched")


class RequestMetrics:
    """ASGI middleware: counts and times every HTTP request, from its first byte in to its last byte out."""

    def __init__(self, app: ASGIApp, router: Router) -> None:
        self.app = app
        self.route = RouteLabels(router)
        tags = ("route", "composition", "status")
        self.requests = Counter("tpv_requests", description="HTTP requests answered, by route, composition and "
                                "status code", tag_keys=tags)
        self.latency = Histogram("tpv_request_latency_ms", description="time from a request's arrival to its "
                                 "response's last byte, in milliseconds", boundaries=LATENCY_MS, tag_keys=tags)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        labels = {"route": self.route(scope), "composition": NO_COMPOSITION, "status": "500"}
        token = _REQUEST.set(labels)

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                labels["status"] = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            _REQUEST.reset(token)
            labels["composition"] = _admitted(labels["composition"], int(labels["status"]))
            self.requests.inc(1, tags=labels)
            self.latency.observe((time.perf_counter() - start) * 1000.0, tags=labels)


class ModelMetrics:
    """A model replica's batch sizes and prompt-cache counters; `record` after every batch."""

    def __init__(self) -> None:
        kind = ("kind",)
        self.rows = Histogram("tpv_batch_rows", description="inputs (rows) per batch", boundaries=BATCH_SIZES,
                              tag_keys=kind)
        self.requests = Histogram("tpv_batch_requests", description="requests per batch", boundaries=BATCH_SIZES,
                                  tag_keys=kind)
        self.compositions = Histogram("tpv_batch_compositions", description="distinct compositions per batch",
                                      boundaries=BATCH_SIZES, tag_keys=kind)
        self.cache_counters = {
            name: Counter(f"tpv_prompt_cache_{name}", description=text)
            for name, text in (("hits", "compositions served from the prompt cache"),
                               ("misses", "compositions composed (and their keys/values computed) on a cache miss"),
                               ("evictions", "entries dropped to keep the cache within its bounds"))
        }
        self.cache_gauges = {
            name: Gauge(f"tpv_prompt_cache_{name}", description=text)
            for name, text in (("entries", "compositions held in the prompt cache"),
                               ("bytes", "bytes the prompt cache holds (prompts and keys/values)"))
        }
        self._cache: BoundedLRU | None = None
        self._exported: dict[str, int] = {}

    def record(self, kind: str, report: BatchReport, cache: BoundedLRU) -> None:
        tags = {"kind": kind}
        self.rows.observe(report.rows, tags=tags)
        self.requests.observe(report.requests, tags=tags)
        self.compositions.observe(report.compositions, tags=tags)
        self.sync_cache(cache)

    def sync_cache(self, cache: BoundedLRU) -> None:
        """Add what the cache counted since the last call (a new cache, after a reconfigure, starts from zero)."""
        info: dict[str, Any] = cache.info().model_dump()
        if cache is not self._cache:
            self._cache, self._exported = cache, {}
        for name, counter in self.cache_counters.items():
            delta = info[name] - self._exported.get(name, 0)
            if delta > 0:
                counter.inc(delta)
            self._exported[name] = info[name]
        for name, gauge in self.cache_gauges.items():
            gauge.set(info[name])
