"""The Ray Serve app: one frozen backbone per replica, a FastAPI ingress, compositions batched per request row.

    serve run serve/config.yaml          # or: tpv serve [--store DIR] [--port 8000] ...
    curl -s localhost:8000/v1/health
    open http://localhost:8000/docs      # OpenAPI

Each request's composition is resolved (validated, composed, prefix computed) once and cached per store version
(`serve.batching.PromptServer`); `@serve.batch` then gathers concurrent requests, whatever their compositions,
and `serve.batching.score_batch` answers them in one forward pass (per prompt length; label sets share it when their
labels are one token each, else one forward per label set). Every bad input is a 4xx with a message naming what
is accepted; the replica keeps serving. `user_config` changes are applied by `reconfigure` without a restart.
"""

# no `from __future__ import annotations`: Serve's class-based FastAPI views need the real annotation objects
import argparse
import asyncio
import copy
import logging
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.batching import GenerateItem, PromptEntry, PromptServer, ScoreItem, generate_batch, score_batch
from serve.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    ClassifyResult,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    GenerateResult,
    HealthResponse,
    InlineComposition,
    Limits,
    Name,
    ServeSettings,
    VectorInfo,
    VectorsResponse,
)
from tpv.backbone import Backbone, BackboneConfig
from tpv.compose import CompositionError, CompositionSpec
from tpv.merge import MergeError
from tpv.paths import default_store
from tpv.store import CorruptVector, NotFound, StoreError, VectorStore
from tpv.tasks import TaskConfigError, TaskSpec, UnknownTaskError, get_task
from tpv.tasks.spec import template_fields
from tpv.vectors import VectorError

logger = logging.getLogger("ray.serve")

DEFAULT_CONFIG = Path(__file__).with_name("config.yaml")


# ---- errors -------------------------------------------------------------------------------------------------------


class RequestError(Exception):
    """A bad request the app itself detects (limits, templates, backbone mismatch...)."""

    def __init__(self, status: int, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.kind, self.detail = status, kind, detail


def _error(status: int, kind: str, detail: str, errors: list | None = None) -> JSONResponse:
    body = ErrorResponse(error=kind, detail=detail, errors=errors).model_dump(exclude_none=True)
    return JSONResponse(status_code=status, content=body)


def _plain_errors(errors: list[dict]) -> list[dict]:
    """Pydantic errors as JSON-safe dicts (inputs dropped: they may be huge or non-finite)."""
    out = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ())]
        out.append({"loc": loc, "msg": str(e.get("msg", "")).removeprefix("Value error, "), "type": e.get("type", "")})
    return out


def _summary(errors: list[dict], limit: int = 6) -> str:
    parts = [f"{'.'.join(e['loc']) or 'body'}: {e['msg']}" for e in errors[:limit]]
    more = f" (+{len(errors) - limit} more)" if len(errors) > limit else ""
    return "; ".join(parts) + more


def install_error_handlers(app: FastAPI) -> None:
    """Bad input -> 4xx with a clear message; only a real server fault is a 5xx."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _plain_errors(list(exc.errors()))
        if any(e["type"] == "json_invalid" for e in errors):
            return _error(400, "malformed_json", "the request body is not valid JSON: " + _summary(errors), errors)
        return _error(422, "invalid_request", _summary(errors), errors)

    @app.exception_handler(ValidationError)
    async def _pydantic(request: Request, exc: ValidationError) -> JSONResponse:
        errors = _plain_errors(exc.errors())
        return _error(422, "invalid_request", _summary(errors), errors)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return _error(exc.status, exc.kind, exc.detail)

    @app.exception_handler(UnknownTaskError)
    async def _unknown_task(request: Request, exc: UnknownTaskError) -> JSONResponse:
        return _error(404, "unknown_task", str(exc.args[0] if exc.args else exc))

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
        return _error(404, "not_found", str(exc))

    @app.exception_handler(CorruptVector)
    async def _corrupt(request: Request, exc: CorruptVector) -> JSONResponse:
        logger.error("corrupt store entry: %s", exc)
        return _error(500, "store_corrupt", f"a stored file failed its check (server-side problem): {exc}")

    @app.exception_handler(StoreError)
    async def _store_error(request: Request, exc: StoreError) -> JSONResponse:
        return _error(422, "invalid_name", str(exc))

    for exc_type in (CompositionError, MergeError, VectorError, TaskConfigError):
        app.add_exception_handler(exc_type, _unprocessable)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: "no_such_route", 405: "method_not_allowed", 413: "body_too_large"}
        kind = kinds.get(exc.status_code, "http_error")
        return _error(exc.status_code, kind, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error on %s", request.url.path)
        return _error(500, "internal_error", f"{type(exc).__name__}: {exc}")


async def _unprocessable(request: Request, exc: Exception) -> JSONResponse:
    kind = "backbone_mismatch" if "backbone mismatch" in str(exc) else "invalid_composition"
    return _error(422, kind, str(exc))


# ---- the FastAPI app ----------------------------------------------------------------------------------------------

api = FastAPI(
    title="tpv: composed task prompt vectors on one frozen model",
    version="0.1.0",
    description=(
        "Classify or generate with a soft prompt composed per request from stored task prompt vectors "
        "(prompt = origin + sum_i w_i tau_i). Concurrent requests with different compositions share one forward "
        "pass. The store is polled for new or replaced vectors every `reload_interval_s`."
    ),
)
install_error_handlers(api)
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in ((400, "malformed JSON"), (404, "unknown task, vector or composition"),
                       (413, "body too large"), (422, "invalid request (limits, weights, names, backbone)"),
                       (503, "replica not ready"))
}


@api.middleware("http")
async def _body_limit(request: Request, call_next):
    limit = _BODY_LIMIT[0]
    length = request.headers.get("content-length")
    if length is not None:
        try:
            too_big = int(length) > limit
        except ValueError:
            return _error(400, "bad_header", f"content-length {length!r} is not a number")
        if too_big:
            return _error(413, "body_too_large", f"the body is {length} bytes; the limit is {limit}")
    return await call_next(request)


_BODY_LIMIT = [Limits().max_body_bytes]


def _set_body_limit(n: int) -> None:
    # Serve pickles the deployment class by value (its methods see copies of module globals) while the middleware
    # stays this module's function: set the limit through a module-level function so both see the same list.
    _BODY_LIMIT[0] = n


def _rows(items: list) -> int:
    """Batch size in rows (inputs), not requests: `max_batch_size` bounds the forward pass."""
    return sum(item.rows for item in items)


@serve.deployment(
    name="TPVServer",
    max_ongoing_requests=64,
    ray_actor_options={"num_cpus": 1},
    user_config=ServeSettings().model_dump(mode="json"),
    health_check_period_s=10,
)
@serve.ingress(api)
class TPVServer:
    """One replica: the backbone loaded once, the store polled, requests batched across compositions."""

    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        self.settings: ServeSettings | None = None
        self.server: PromptServer | None = None
        self._model_key: tuple | None = None
        # all torch work on one thread, off the event loop, so requests keep arriving and batching meanwhile
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tpv-torch")
        self._stats: dict[str, Any] = {"batches": 0, "requests": 0, "rows": 0, "forwards": 0,
                                       "max_requests_in_batch": 0, "max_compositions_in_forward": 0,
                                       "max_compositions_in_batch": 0, "batch_seconds": 0.0, "last": None}
        if settings is not None:
            self.reconfigure(settings)

    # ---- lifecycle --------------------------------------------------------------------------------------------

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply `user_config` (start-up and every lightweight update): reload the model only if it changed."""
        settings = ServeSettings.model_validate(user_config or {})
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        model_key = (settings.backbone, settings.device, settings.dtype, settings.limits.max_input_tokens)
        backbone = self.server.backbone if self.server is not None and model_key == self._model_key else None
        if backbone is None:
            t0 = time.perf_counter()
            backbone = Backbone.load(BackboneConfig(
                model=settings.backbone, device=settings.device, dtype=settings.dtype,
                max_source_tokens=settings.limits.max_input_tokens,
            ))
            logger.info("tpv: loaded %s on %s in %.1fs", backbone.backbone_id, backbone.device,
                        time.perf_counter() - t0)
        store_uri = settings.store_uri or default_store()
        cache = dict(reload_interval_s=settings.reload_interval_s, cache_max_entries=settings.cache_max_entries,
                     cache_max_bytes=settings.cache_max_bytes)
        if self.server is not None and self.server.backbone is backbone and self.server.store.uri == store_uri:
            self.server.configure(**cache)
            self.server.version(force=True)  # a reconfigure is also a reload of the store
        else:
            self.server = PromptServer(backbone, VectorStore(store_uri), **cache)
        self._model_key = model_key
        self._classify_batch.set_max_batch_size(settings.max_batch_size)
        self._classify_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self._generate_batch.set_max_batch_size(settings.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        _set_body_limit(settings.limits.max_body_bytes)
        self.settings = settings

    def check_health(self) -> None:
        if self.server is None:
            raise RuntimeError("the backbone is not loaded")

    def _ready(self) -> tuple[PromptServer, ServeSettings]:
        if self.server is None or self.settings is None:
            raise RequestError(503, "not_ready", "the replica has not loaded its backbone yet")
        return self.server, self.settings

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ---- request -> composition, sources ------------------------------------------------------------------------

    def _spec(self, server: PromptServer, ref: InlineComposition | str, limits: Limits) -> CompositionSpec:
        bb = server.backbone.backbone_id
        if isinstance(ref, str):
            return server.named(ref)  # NotFound names the stored ones
        if ref.backbone_id is not None and ref.backbone_id != bb:
            raise RequestError(422, "backbone_mismatch", f"backbone mismatch: the composition is for "
                                                         f"{ref.backbone_id!r}, this server runs {bb!r}")
        if len(ref.terms) > limits.max_terms:
            raise RequestError(422, "too_many_vectors",
                               f"the composition has {len(ref.terms)} terms; the limit is {limits.max_terms}")
        for i, term in enumerate(ref.terms):
            if abs(term.weight) > limits.max_abs_weight:
                raise RequestError(422, "weight_out_of_range",
                                   f"terms[{i}].weight = {term.weight} is outside +-{limits.max_abs_weight}")
        if abs(ref.coefficient) > limits.max_abs_weight:
            raise RequestError(422, "weight_out_of_range",
                               f"coefficient = {ref.coefficient} is outside +-{limits.max_abs_weight}")
        length = ref.prompt_length if ref.prompt_length is not None else self._infer_length(server, ref)
        if length > limits.max_prompt_length:
            raise RequestError(422, "prompt_too_long",
                               f"prompt_length {length} is over the limit {limits.max_prompt_length}")
        data = ref.model_dump(exclude={"backbone_id", "prompt_length"})
        return CompositionSpec.model_validate({**data, "backbone_id": bb, "prompt_length": length})

    @staticmethod
    def _infer_length(server: PromptServer, ref: InlineComposition) -> int:
        """The prompt length of the named vectors when they agree; unknown names are left for the composer to
        report (it names what the store holds)."""
        metas = server.metas()
        lengths: set[int] = set()
        for term in ref.terms:
            found = [m.prompt_length for m in metas
                     if (term.vector_id is not None and m.vector_id == term.vector_id)
                     or (term.task is not None and m.task == term.task)]
            lengths.update(found)
        if len(lengths) > 1:
            raise RequestError(422, "ambiguous_prompt_length",
                               f"the stored vectors of this composition have prompt lengths {sorted(lengths)}; "
                               "set 'prompt_length'")
        return lengths.pop() if lengths else 1

    @staticmethod
    def _template(req: ClassifyRequest | GenerateRequest) -> tuple[str, TaskSpec | None]:
        task = get_task(req.task) if req.task is not None else None
        if req.template is not None:
            return req.template, task
        if task is not None:
            return task.template, task
        pair = any(isinstance(x, list) and len(x) == 2 for x in req.inputs)
        return ("{text} {text_pair}" if pair else "{text}"), None

    @staticmethod
    def _sources(server: PromptServer, inputs: list, template: str, task: TaskSpec | None, limits: Limits) -> list[str]:
        if len(inputs) > limits.max_inputs:
            raise RequestError(422, "too_many_inputs", f"{len(inputs)} inputs; the limit is {limits.max_inputs}")
        try:
            fields = template_fields(template)
        except ValueError as exc:
            raise RequestError(422, "invalid_template", str(exc)) from None
        use_task = task is not None and template == task.template
        sources = []
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                if len(fields) != 1:
                    raise RequestError(422, "input_shape",
                                       f"inputs[{i}] is one text but the template needs fields {fields}: send a list "
                                       f"of {len(fields)} texts or an object with those keys")
                row = {fields[0]: item}
            elif isinstance(item, list):
                if len(item) != len(fields):
                    raise RequestError(422, "input_shape",
                                       f"inputs[{i}] has {len(item)} texts; the template needs {len(fields)}: {fields}")
                row = dict(zip(fields, item))
            else:
                if set(item) != set(fields):
                    raise RequestError(422, "input_shape",
                                       f"inputs[{i}] has keys {sorted(item)}; the template needs {fields}")
                row = dict(item)
            for name, value in row.items():
                if len(value) > limits.max_input_chars:
                    raise RequestError(422, "input_too_long",
                                       f"inputs[{i}].{name} is {len(value)} characters; the limit is "
                                       f"{limits.max_input_chars}")
            sources.append(task.render(row) if use_task else template.format(**row))
        tok = server.backbone.tokenizer
        lengths = [len(ids) for ids in tok(sources, add_special_tokens=server.backbone.is_seq2seq)["input_ids"]]
        for i, n in enumerate(lengths):
            if n > limits.max_input_tokens:
                raise RequestError(422, "input_too_long", f"inputs[{i}] is {n} tokens with the template; the limit "
                                                          f"is {limits.max_input_tokens}")
        return sources

    async def _entry(self, server: PromptServer, spec: CompositionSpec) -> PromptEntry:
        cached = server.cached(spec)
        return cached if cached is not None else await self._run(server.entry, spec)

    def _chunks(self, sources: list[str], size: int) -> list[list[str]]:
        return [sources[i : i + size] for i in range(0, len(sources), size)]

    # ---- batch handlers -----------------------------------------------------------------------------------------

    def _record(self, report) -> None:
        s = self._stats
        s["batches"] += 1
        s["requests"] += report.requests
        s["rows"] += report.rows
        s["forwards"] += report.forwards
        s["batch_seconds"] += report.seconds
        s["max_requests_in_batch"] = max(s["max_requests_in_batch"], report.requests)
        s["max_compositions_in_batch"] = max(s["max_compositions_in_batch"], report.compositions)
        in_forward = max((g.get("compositions", 1) for g in report.groups), default=0)
        s["max_compositions_in_forward"] = max(s["max_compositions_in_forward"], in_forward)
        s["last"] = {"requests": report.requests, "rows": report.rows, "compositions": report.compositions,
                     "forwards": report.forwards, "seconds": round(report.seconds, 4), "groups": report.groups}

    async def _isolated(self, fn, items: list) -> list:
        """Run a batch; if it fails, run each request alone so one bad request cannot fail the others."""
        server, _ = self._ready()
        try:
            results, report = await self._run(fn, server.backbone, items)
            self._record(report)
            return results
        except Exception as exc:  # noqa: BLE001 - reported per request below
            if len(items) == 1:
                logger.exception("tpv: batch of one failed")
                return [exc]
        out = []
        for item in items:
            try:
                results, report = await self._run(fn, server.backbone, [item])
                self._record(report)
                out.append(results[0])
            except Exception as exc:  # noqa: BLE001
                logger.exception("tpv: request failed alone")
                out.append(exc)
        return out

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=_rows)
    async def _classify_batch(self, items: list[ScoreItem]) -> list:
        return await self._isolated(score_batch, items)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=_rows)
    async def _generate_batch(self, items: list[GenerateItem]) -> list:
        return await self._isolated(generate_batch, items)

    async def _gather(self, batch_fn, items: list) -> list:
        results = await asyncio.gather(*(batch_fn(item) for item in items))
        for r in results:
            if isinstance(r, Exception):
                raise r
        return results

    # ---- routes -------------------------------------------------------------------------------------------------

    @api.post("/v1/classify", response_model=ClassifyResponse, responses=_ERRORS)
    async def classify(self, req: ClassifyRequest) -> ClassifyResponse:
        """Label each input under the composed prompt: per-label probabilities and log-likelihoods."""
        server, settings = self._ready()
        limits = settings.limits
        spec = self._spec(server, req.composition, limits)
        template, task = self._template(req)
        if req.labels is not None:
            labels = list(req.labels)
        elif task is not None and task.labels:
            labels = list(task.labels)
        else:
            raise RequestError(422, "no_labels",
                               f"task {req.task!r} is a regression task with no labels; give 'labels'")
        if len(labels) > limits.max_labels:
            raise RequestError(422, "too_many_labels", f"{len(labels)} labels; the limit is {limits.max_labels}")
        long = [x for x in labels if len(x) > limits.max_label_chars]
        if long:
            raise RequestError(422, "label_too_long", f"label {long[0][:40]!r}... is {len(long[0])} characters; "
                                                      f"the limit is {limits.max_label_chars}")
        sources = self._sources(server, req.inputs, template, task, limits)
        entry = await self._entry(server, spec)
        chunks = self._chunks(sources, settings.max_batch_size)
        parts = await self._gather(self._classify_batch, [ScoreItem(entry, c, tuple(labels)) for c in chunks])
        scores = torch.cat(parts)
        probs = torch.softmax(scores.double(), dim=-1)
        results = []
        for row, prow in zip(scores.tolist(), probs.tolist()):
            best = max(range(len(labels)), key=lambda j: row[j])
            results.append(ClassifyResult(
                label=labels[best], scores=dict(zip(labels, prow)),
                log_likelihoods={lab: (v if math.isfinite(v) else -1e30) for lab, v in zip(labels, row)},
            ))
        return ClassifyResponse(backbone_id=server.backbone.backbone_id, labels=labels,
                                composition=spec.model_dump(mode="json"), results=results)

    @api.post("/v1/generate", response_model=GenerateResponse, responses=_ERRORS)
    async def generate(self, req: GenerateRequest) -> GenerateResponse:
        """Greedy generation (at most `max_new_tokens`) after the composed prompt."""
        server, settings = self._ready()
        limits = settings.limits
        max_new = req.max_new_tokens if req.max_new_tokens is not None else min(16, limits.max_new_tokens)
        if max_new > limits.max_new_tokens:
            raise RequestError(422, "too_many_tokens",
                               f"max_new_tokens {max_new} is over the limit {limits.max_new_tokens}")
        spec = self._spec(server, req.composition, limits)
        template, task = self._template(req)
        sources = self._sources(server, req.inputs, template, task, limits)
        entry = await self._entry(server, spec)
        chunks = self._chunks(sources, settings.max_batch_size)
        parts = await self._gather(self._generate_batch, [GenerateItem(entry, c, max_new) for c in chunks])
        texts = [t for part in parts for t in part]
        return GenerateResponse(backbone_id=server.backbone.backbone_id, composition=spec.model_dump(mode="json"),
                                results=[GenerateResult(text=t) for t in texts])

    @api.get("/v1/vectors", response_model=VectorsResponse, responses=_ERRORS)
    async def vectors(self, task: Name | None = Query(None, description="only this task's vectors")) -> VectorsResponse:
        """What the store holds for the served backbone (vectors and named compositions)."""
        server, _ = self._ready()
        version = server.version()
        metas = server.metas()
        tasks: dict[str, int] = {}
        for m in metas:
            tasks[m.task] = tasks.get(m.task, 0) + 1
        shown = [m for m in metas if task is None or m.task == task]
        return VectorsResponse(
            backbone_id=server.backbone.backbone_id, store_version=version, tasks=tasks,
            compositions=server.store.list_compositions(server.backbone.backbone_id),
            vectors=[VectorInfo(vector_id=m.vector_id, task=m.task, kind=m.kind, prompt_length=m.prompt_length,
                                hidden_size=m.hidden_size, origin_seed=m.origin_seed, created_at=m.created_at,
                                metrics=m.metrics) for m in shown],
        )

    @api.get("/v1/health", response_model=HealthResponse, responses=_ERRORS)
    async def health(self) -> HealthResponse:
        """Liveness plus what this replica serves: backbone, store version, cache and batching counters."""
        server, settings = self._ready()
        try:
            replica = str(serve.get_replica_context().replica_id.unique_id)
        except Exception:  # noqa: BLE001 - outside a replica
            replica = "local"
        return HealthResponse(
            status="ok", backbone_id=server.backbone.backbone_id, is_seq2seq=server.backbone.is_seq2seq,
            device=str(server.backbone.device), store_uri=server.store.uri, store_version=server.version(),
            reloads=server.watcher.reloads, pid=os.getpid(), replica=replica,
            settings=settings.model_dump(mode="json"), prompt_cache=server.cache.info(),
            batching=copy.deepcopy(self._stats),
        )


app = TPVServer.bind()


# ---- `tpv serve` ----------------------------------------------------------------------------------------------------


def build_app(deployment: dict[str, Any] | None = None):
    """The app with a Serve config's deployment options (num_replicas, autoscaling_config, ray_actor_options,
    user_config, ...) applied, as `serve run config.yaml` would."""
    options = {k: v for k, v in (deployment or {}).items() if k != "name"}
    return TPVServer.options(**options).bind()


def load_config(path: str | Path = DEFAULT_CONFIG, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Serve config file with command-line overrides applied to its first application's first deployment."""
    import yaml

    with open(path) as f:
        config = yaml.safe_load(f)
    if not isinstance(config, dict) or not config.get("applications"):
        raise ValueError(f"{path}: not a Serve config (no 'applications')")
    o = {k: v for k, v in (overrides or {}).items() if v is not None}
    http = config.setdefault("http_options", {})
    for key in ("host", "port"):
        if key in o:
            http[key] = o[key]
    deployment = config["applications"][0].setdefault("deployments", [{"name": "TPVServer"}])[0]
    user = deployment.setdefault("user_config", {})
    for key in ("store_uri", "backbone", "device", "dtype", "max_batch_size", "batch_wait_timeout_s",
                "reload_interval_s"):
        if key in o:
            user[key] = o[key]
    user["store_uri"] = user.get("store_uri") or default_store()
    env = {k: os.environ[k] for k in ("TPV_HOME", "TPV_STORE") if k in os.environ}
    if env:  # replicas on other nodes read the same caches
        app_env = config["applications"][0].setdefault("runtime_env", {}) or {}
        app_env.setdefault("env_vars", {}).update(env)
        config["applications"][0]["runtime_env"] = app_env
    if "replicas" in o:
        deployment.pop("autoscaling_config", None)
        deployment["num_replicas"] = o["replicas"]
    actor = deployment.setdefault("ray_actor_options", {})
    if "num_cpus" in o:
        actor["num_cpus"] = o["num_cpus"]
    if "num_gpus" in o:
        actor["num_gpus"] = o["num_gpus"]
    ServeSettings.model_validate(user)  # fail here, not in a replica
    from ray.serve.schema import ServeDeploySchema

    validate = getattr(ServeDeploySchema, "model_validate", None) or ServeDeploySchema.parse_obj
    validate(config)
    return config


def main(argv: list[str] | None = None) -> int:
    """`tpv serve`: the Serve config (default serve/config.yaml) with command-line overrides, run exactly as
    `serve run CONFIG` runs it (same import path, so later `serve deploy` updates of user_config are lightweight)."""
    parser = argparse.ArgumentParser(prog="tpv serve", description="Serve composed task prompt vectors over HTTP.")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="Serve config YAML (default: serve/config.yaml)")
    parser.add_argument("--store", dest="store_uri", help="vector store folder or URI")
    parser.add_argument("--backbone", help="bundled backbone name or local model folder")
    parser.add_argument("--device")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--replicas", type=int, help="fixed replica count (replaces autoscaling)")
    parser.add_argument("--num-cpus", type=float, help="CPUs per replica")
    parser.add_argument("--num-gpus", type=float, help="GPUs per replica")
    parser.add_argument("--max-batch-size", type=int)
    parser.add_argument("--batch-wait-timeout-s", type=float)
    parser.add_argument("--reload-interval-s", type=float)
    parser.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a new local cluster)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved Serve config and exit")
    parser.add_argument("--non-blocking", action="store_true", help="return once deployed (needs --address)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, vars(args))
    except Exception as exc:  # noqa: BLE001 - YAML, pydantic and Serve schema errors alike: report, exit 2
        print(f"tpv serve: {args.config}: {exc}", file=sys.stderr)
        return 2
    import tempfile

    import yaml

    text = yaml.safe_dump(config, sort_keys=False)
    if args.print_config:
        print(text)
        return 0
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="tpv-serve-", delete=False) as f:
        f.write(text)
    http = config.get("http_options", {})
    route = config["applications"][0].get("route_prefix", "/").rstrip("/")
    base = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}{route}"
    print(f"tpv serve: {f.name} -> {base}/v1/health (OpenAPI: {base}/docs)", flush=True)
    from ray.serve.scripts import cli

    cli_args = ["run", f.name] + (["--address", args.address] if args.address else [])
    cli_args += ["--non-blocking"] if args.non_blocking else []
    try:
        cli.main(cli_args, prog_name="serve", standalone_mode=False)
    except KeyboardInterrupt:
        pass
    return 0
