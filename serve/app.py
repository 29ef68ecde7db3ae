"""The Ray Serve app: a light HTTP ingress in front of the model deployment (`serve.model.TPVModel`).

    serve run serve/config.yaml          # or: tpv serve [--store DIR] [--port 8000] ...
    curl -s localhost:8000/v1/health
    open http://localhost:8000/docs      # OpenAPI

`TPVIngress` (FastAPI) does HTTP: body size and read-time bounds, API keys, validation, limits and templates,
then calls the model deployment through a DeploymentHandle. Scoring is idempotent, so a request whose model
replica dies is re-sent to another (bounded retries with backoff); every failure, a lost replica included,
answers the one JSON error shape (`serve.errors`). `app` is the import path of serve/config.yaml.
"""

# no `from __future__ import annotations`: Serve's class-based FastAPI views need the real annotation objects
import asyncio
import logging
import math
import time
from typing import Any

from fastapi import Depends, FastAPI, Query
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve import auth, errors, guards, metrics, openai_api, playground, similarity
from serve.auth import Principal, principal
from serve.cli import main  # noqa: F401 - `tpv serve` runs serve.app:main
from serve.inputs import pick_template, render
from serve.jobs import GenerateJob, ScoreJob
from serve.limits import check_labels, check_request
from serve.model import TPVModel
from serve.parsing import RouteShapes
from serve.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    ClassifyResult,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    GenerateResult,
    HealthResponse,
    SimilarityResponse,
    VectorInfo,
    VectorsResponse,
)
from serve.settings import IngressSettings
from tpv.errors import InvalidInput
from tpv.generate import SamplingParams
from tpv.names import Name
from tpv.tasks import TaskSpec, get_task
from tpv.tasks.registry import UnknownTaskError

logger = logging.getLogger("ray.serve")

api = FastAPI(
    title="tpv: composed task prompt vectors on one frozen model",
    version="0.2.0",
    description=(
        "Classify or generate with a soft prompt composed per request from stored task prompt vectors "
        "(prompt = origin + sum_i w_i tau_i). Concurrent requests with different compositions share one forward "
        "pass. The store is polled for new or replaced vectors every `reload_interval_s`. When API keys are "
        "configured every route but /v1/health needs `Authorization: Bearer <key>`."
    ),
)
errors.install(api)
#: what each route takes, checked strictly before FastAPI reads the request (`serve.parsing`)
SHAPES = RouteShapes({"/v1/classify": ClassifyRequest, "/v1/generate": GenerateRequest, **openai_api.BODIES},
                     {"/v1/vectors": frozenset({"task"})})
api.add_middleware(guards.BodyGuard, shapes=SHAPES)
api.add_middleware(guards.KeyGuard)  # added after BodyGuard: runs first, so no body is read without a key
api.add_middleware(openai_api.OpenAIErrors)  # re-shapes the errors of the OpenAI routes, the guards' included
api.add_middleware(metrics.RequestMetrics, router=api.router)  # outermost: guarded refusals are counted too
api.include_router(openai_api.router)  # /v1/models, /v1/completions, /v1/chat/completions (TPVIngress inherits them)
api.include_router(playground.router)  # the page at `/` (open, like /docs: it calls the routes below with a key)
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in ((400, "malformed JSON"), (401, "missing or wrong API key"), (403, "outside the key's scope"),
                       (404, "unknown task, vector or composition"), (408, "body not sent in time"),
                       (413, "body too large"), (422, "invalid request (limits, weights, names, backbone)"),
                       (500, "server-side fault (e.g. a corrupt store entry this request names)"),
                       (503, "no model replica available"), (504, "the model did not answer in time"))
}


def _task(name: str | None) -> TaskSpec | None:
    if name is None:
        return None
    try:
        return get_task(name)
    except UnknownTaskError:  # the registry's message lists every task: not for clients
        raise UnknownTaskError(f"unknown task {name!r}") from None


async def _awaited(response):
    return await response


async def _first(stream):
    return await anext(stream), stream


def _results(labels: list[str], rows: list[list[float]]) -> list[ClassifyResult]:
    out = []
    for row in rows:
        top = max(row)
        logz = top + math.log(sum(math.exp(v - top) for v in row))
        best = max(range(len(labels)), key=lambda j: row[j])
        out.append(ClassifyResult(
            label=labels[best], scores={lab: math.exp(v - logz) for lab, v in zip(labels, row)},
            log_likelihoods={lab: (v if math.isfinite(v) else -1e30) for lab, v in zip(labels, row)},
        ))
    return out


@serve.deployment(
    name="TPVIngress",
    max_ongoing_requests=256,
    ray_actor_options={"num_cpus": 0},
    user_config=IngressSettings().model_dump(mode="json"),
)
@serve.ingress(api)
class TPVIngress(openai_api.OpenAIRoutes):
    """HTTP in front of the model deployment; holds no model, so it stays up when a model replica dies."""

    def __init__(self, model: DeploymentHandle) -> None:
        self.model = model
        self.settings = IngressSettings()
        self.resent = 0  # requests re-sent after their model replica was lost (shown by /v1/health)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.settings = IngressSettings.model_validate(user_config or {})
        s = self.settings
        guards.configure(s.limits.max_body_bytes, s.body_read_timeout_s, s.slow_body_after_s, s.slow_body_bytes_per_s,
                         s.slow_body_slots)
        auth.configure(self.settings.auth)

    async def _call(self, method: str, *args, timeout_s: float | None = None, stream: bool = False):
        """The model deployment's `method`, re-sent (with backoff) while replicas are lost, within one deadline.
        `stream`: a generator method; returns (its first item, the rest) once the first item came (until then a
        lost replica is retried like any call)."""
        s = self.settings
        budget = timeout_s if timeout_s is not None else s.request_timeout_s
        deadline = time.monotonic() + budget
        for attempt in range(s.model_retries + 1):
            response = getattr(self.model.options(stream=True) if stream else self.model, method).remote(*args)
            try:
                first = _first(response) if stream else _awaited(response)
                return await asyncio.wait_for(first, max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                response.cancel()
                raise errors.RequestTimeout(f"the model did not answer within {budget:g} s") from None
            except errors.LOST_REPLICA as exc:  # a dead or unreachable replica: re-sent
                logger.warning("tpv: model call %s lost (%s), attempt %d", method, type(exc).__name__, attempt + 1)
                self.resent += 1
                wait = min(s.retry_backoff_s * 2**attempt, deadline - time.monotonic())
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            except Exception as exc:  # noqa: BLE001 - the replica's own error, mapped by its type
                raise errors.unwrap(exc) from None
        raise errors.ModelUnavailable("no model replica could answer this request; retry shortly")

    # ---- routes -------------------------------------------------------------------------------------------------

    @api.post("/v1/classify", response_model=ClassifyResponse, responses=ERRORS)
    async def classify(self, req: ClassifyRequest, who: Principal = Depends(principal)) -> ClassifyResponse:
        """Label each input under the composed prompt: per-label probabilities and log-likelihoods."""
        limits = self.settings.limits
        who.allow_composition(req.composition, req.task)
        metrics.note_composition(req.composition)
        check_request(req, limits)
        task = _task(req.task)
        if req.labels is not None:
            labels = list(req.labels)
        elif task is not None and task.labels:
            labels = list(task.labels)
        else:
            raise InvalidInput(f"task {req.task!r} is a regression task with no labels; give 'labels'")
        check_labels(labels, limits)
        sources = render(req.inputs, pick_template(req.template, task, req.inputs), task, limits.max_input_chars)
        result = await self._call("score", ScoreJob(req.composition, sources, labels))
        return ClassifyResponse(backbone_id=result.composition["backbone_id"], labels=labels,
                                composition=result.composition, results=_results(labels, result.log_likelihoods))

    @api.post("/v1/generate", response_model=GenerateResponse, responses=ERRORS)
    async def generate(self, req: GenerateRequest, who: Principal = Depends(principal)) -> GenerateResponse:
        """Greedy generation (at most `max_new_tokens`) after the composed prompt."""
        limits = self.settings.limits
        who.allow_composition(req.composition, req.task)
        metrics.note_composition(req.composition)
        check_request(req, limits)
        task = _task(req.task)
        max_new = req.max_new_tokens if req.max_new_tokens is not None else min(16, limits.max_new_tokens)
        sources = render(req.inputs, pick_template(req.template, task, req.inputs), task, limits.max_input_chars)
        job = GenerateJob(req.composition, sources, SamplingParams(max_new_tokens=max_new))
        result = await self._call("generate", job)
        return GenerateResponse(backbone_id=result.composition["backbone_id"], composition=result.composition,
                                results=[GenerateResult(text=c.text.strip()) for c in result.completions])

    @api.get("/v1/vectors", response_model=VectorsResponse, responses=ERRORS)
    async def vectors(self, task: Name | None = Query(None, description="only this task's vectors"),
                      who: Principal = Depends(principal)) -> VectorsResponse:
        """What the store holds for the served backbone (vectors and named compositions) that the key may see."""
        listing = await self._call("vectors")
        metas = [m for m in listing["metas"] if who.visible(m.task)]
        tasks: dict[str, int] = {}
        for m in metas:
            tasks[m.task] = tasks.get(m.task, 0) + 1
        allowed = who.key.compositions if who.key is not None else None
        return VectorsResponse(
            backbone_id=listing["backbone_id"], store_version=listing["store_version"], tasks=tasks,
            compositions=[c for c in listing["compositions"] if allowed is None or c in allowed],
            vectors=[VectorInfo(vector_id=m.vector_id, task=m.task, kind=m.kind, prompt_length=m.prompt_length,
                                hidden_size=m.hidden_size, origin_seed=m.origin_seed, created_at=m.created_at,
                                metrics=m.metrics) for m in metas if task is None or m.task == task],
        )

    @api.get("/v1/similarity", response_model=SimilarityResponse, responses=ERRORS)
    async def similarity_matrices(self, who: Principal = Depends(principal)) -> SimilarityResponse:
        """Pairwise cosine (flat) of the stored vectors the key may see, one matrix per vector shape."""
        out = await self._call("similarity")
        return SimilarityResponse(backbone_id=out["backbone_id"], store_version=out["store_version"],
                                  groups=similarity.visible(out["groups"], who.visible))

    @api.get("/v1/health", response_model=HealthResponse, responses=ERRORS)
    async def health(self) -> HealthResponse:
        """Open (no key): the ingress is up and a model replica answers; what that replica serves."""
        info = await self._call("info", timeout_s=self.settings.health_timeout_s)
        return HealthResponse(status="ok", auth="open" if auth.KEYRING.open else "keys", resent=self.resent, **info)


def build(model_options: dict[str, Any] | None = None, ingress_options: dict[str, Any] | None = None):
    """The app with Serve deployment options (num_replicas, ray_actor_options, user_config, ...) applied."""
    model = TPVModel.options(**(model_options or {})).bind()
    return TPVIngress.options(**(ingress_options or {})).bind(model)


app = build()
