"""The model deployment: one frozen backbone, the store, the prompt cache, and `@serve.batch` across compositions.

Called only through a DeploymentHandle by the ingress. Every request's composition is resolved (validated, its
prompt length read from the metadata of the vectors it names only, composed, prefix computed) once per store
version; `@serve.batch` then gathers concurrent requests, whatever their compositions, into one forward pass.
All store, tokenizer and torch work runs on one worker thread, so the event loop keeps taking and batching
requests and answers `info()` (the health check) at once.
"""

# no `from __future__ import annotations`: Serve inspects the deployment's signatures
import asyncio
import copy
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from ray import serve

from serve.batching import BatchReport, GenerateItem, PromptEntry, PromptServer, ScoreItem, generate_batch, score_batch
from serve.limits import LimitExceeded
from serve.jobs import GenerateJob, GenerateResult, GenerationHead, ModelName, ScoreJob, ScoreResult
from serve.metrics import ModelMetrics
from serve.schemas import InlineComposition
from serve.settings import ModelSettings
from serve.similarity import similarity_groups
from tpv.backbone import Backbone, BackboneConfig
from tpv.compose import CompositionBody, CompositionSpec, prompt_length_of
from tpv.errors import InvalidInput, NotFoundError, Unavailable
from tpv.generate import Transcript
from tpv.paths import default_store
from tpv.store import NotFound, VectorStore
from tpv.vectors import VectorMeta

logger = logging.getLogger("ray.serve")


class BackboneMismatch(InvalidInput):
    """An inline composition made for another backbone."""


class NotReady(Unavailable):
    """The replica has not loaded its backbone yet."""


def _rows(items: list) -> int:
    """Batch size in rows (inputs), not requests: `max_batch_size` bounds the forward pass."""
    return sum(item.rows for item in items)


@serve.deployment(
    name="TPVModel",
    max_ongoing_requests=64,
    ray_actor_options={"num_cpus": 1},
    user_config=ModelSettings().model_dump(mode="json"),
    health_check_period_s=10,
)
class TPVModel:
    """One replica: the backbone loaded once, the store polled, requests batched across compositions."""

    def __init__(self) -> None:
        self.settings: ModelSettings | None = None
        self.server: PromptServer | None = None
        self._model_key: tuple | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tpv-torch")
        self._stats: dict[str, Any] = {"batches": 0, "requests": 0, "rows": 0, "forwards": 0,
                                       "max_requests_in_batch": 0, "max_compositions_in_forward": 0,
                                       "max_compositions_in_batch": 0, "batch_seconds": 0.0, "last": None}
        self.metrics = ModelMetrics()
        self._similarity: tuple[str, list] | None = None  # (store version, groups): the heatmap, once per version

    # ---- lifecycle --------------------------------------------------------------------------------------------

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply `user_config` (start-up and every lightweight update): reload the model only if it changed."""
        settings = ModelSettings.model_validate(user_config or {})
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        model_key = (settings.backbone, settings.device, settings.dtype, settings.max_input_tokens)
        backbone = self.server.backbone if self.server is not None and model_key == self._model_key else None
        if backbone is None:
            t0 = time.perf_counter()
            backbone = Backbone.load(BackboneConfig(
                model=settings.backbone, device=settings.device, dtype=settings.dtype,
                max_source_tokens=settings.max_input_tokens,
            ))
            logger.info("tpv: loaded %s on %s in %.1fs", backbone.backbone_id, backbone.device,
                        time.perf_counter() - t0)
        store_uri = settings.store_uri or default_store()
        cache = {"reload_interval_s": settings.reload_interval_s, "cache_max_entries": settings.cache_max_entries,
                 "cache_max_bytes": settings.cache_max_bytes}
        if self.server is not None and self.server.backbone is backbone and self.server.store.uri == store_uri:
            self.server.configure(**cache)
            self.server.version(force=True)  # a reconfigure is also a reload of the store
        else:
            self.server = PromptServer(backbone, VectorStore(store_uri), **cache)
        self._model_key = model_key
        for batch in (self._score_batch, self._generate_batch):
            batch.set_max_batch_size(settings.max_batch_size)
            batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self.settings = settings

    def check_health(self) -> None:
        if self.server is None:
            raise RuntimeError("the backbone is not loaded")

    def _ready(self) -> tuple[PromptServer, ModelSettings]:
        if self.server is None or self.settings is None:
            raise NotReady("the model replica has not loaded its backbone yet")
        return self.server, self.settings

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ---- job -> spec and entry (worker thread) -------------------------------------------------------------------

    def _spec(self, ref: InlineComposition | str | ModelName) -> CompositionSpec:
        server, settings = self._ready()
        bb = server.backbone.backbone_id
        if isinstance(ref, ModelName):
            try:
                return self._spec(self._model_name(ref))
            except NotFoundError:  # neither a stored composition nor a task with vectors
                raise NotFound(f"the model {ref.name!r} does not exist: it is neither a stored composition nor a "
                               f"task with vectors for backbone {bb!r} (see /v1/models)") from None
        if isinstance(ref, str):
            try:
                return server.named(ref)
            except NotFoundError:  # the store's message lists what it holds: not for clients
                raise NotFound(f"no stored composition {ref!r} for backbone {bb!r}") from None
        if ref.backbone_id is not None and ref.backbone_id != bb:
            raise BackboneMismatch(f"backbone mismatch: the composition is for {ref.backbone_id!r}, this server runs "
                                   f"{bb!r}")
        body = CompositionBody.model_validate(ref.model_dump(exclude={"origin_seed", "backbone_id"}))
        length = prompt_length_of(server.store, bb, body)
        if length > settings.max_prompt_length:
            raise LimitExceeded(f"prompt_length {length} is over the limit {settings.max_prompt_length}")
        return body.applied(bb, ref.origin_seed, length)

    def _check_tokens(self, sources: list[str], field: str) -> list[int]:
        """Each source's token count (LimitExceeded over `max_input_tokens`, naming the request's `field`)."""
        server, settings = self._ready()
        tok = server.backbone.tokenizer
        lengths = [len(ids) for ids in tok(sources, add_special_tokens=server.backbone.is_seq2seq)["input_ids"]]
        for i, n in enumerate(lengths):
            if n > settings.max_input_tokens:
                raise LimitExceeded(f"{field}[{i}] is {n} tokens with the template; the limit is "
                                    f"{settings.max_input_tokens}", field)
        return lengths

    def _prepare(self, ref: InlineComposition | str | ModelName, sources: list[str],
                 field: str = "inputs") -> tuple[CompositionSpec, PromptEntry, list[int]]:
        """The spec, its cached prompt entry, and each source's token count (limits checked)."""
        spec = self._spec(ref)
        lengths = self._check_tokens(sources, field)
        return spec, self._ready()[0].entry(spec), lengths

    def _chunks(self, item_type, entry: PromptEntry, sources: list[str], *extra) -> list:
        size = self._ready()[1].max_batch_size
        return [item_type(entry, sources[i : i + size], *extra) for i in range(0, len(sources), size)]

    # ---- generation: model names, chat templates, rows (worker thread) ----------------------------------------------

    def _model_name(self, ref: ModelName) -> InlineComposition | str:
        """A stored composition of that name, else the task's vectors, resolved as the native routes resolve them
        (a corrupt entry is a 500 there and here). The scope check comes first and says the same whatever the
        name is, so a scoped key learns nothing about what is stored."""
        server, _ = self._ready()
        ref.caller.allow_model(ref.name)
        try:
            server.named(ref.name)
        except NotFoundError:
            ref.caller.allow_model(ref.name, as_task=True)
            return InlineComposition(terms=[{"task": ref.name}])
        ref.caller.allow_model(ref.name, as_task=False)
        return ref.name

    def _chat_texts(self, conversations: list[list[dict[str, str]]]) -> list[str]:
        """Each conversation through the backbone's own chat template, ready for the assistant's turn."""
        from jinja2 import TemplateError

        backbone = self._ready()[0].backbone
        tok = backbone.tokenizer
        if not getattr(tok, "chat_template", None):
            raise InvalidInput(f"the served backbone {backbone.backbone_id!r} has no chat template: use "
                               f"/v1/completions")
        texts = []
        for i, conversation in enumerate(conversations):
            try:
                text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
            except TemplateError as exc:
                raise InvalidInput(f"messages of conversation {i} do not fit the backbone's chat template: "
                                   f"{exc}") from None
            if backbone.bos_ids and tok.bos_token and text.startswith(tok.bos_token):
                text = text[len(tok.bos_token) :]  # the backbone puts BOS after the soft prompt itself
            texts.append(text)
        return texts

    def _prepare_generation(self, job: GenerateJob) -> tuple[CompositionSpec, list[GenerateItem], list[int]]:
        """The job's spec, its rows (each source n times, seeds spread over the choices) in chunks of at most
        `max_batch_size` rows, and each source's token count."""
        sources = self._chat_texts(job.conversations) if job.conversations else job.sources
        spec, entry, prompt_tokens = self._prepare(job.composition, sources, job.source_field)
        settings = self._ready()[1]
        seed = job.params.seed
        params = [job.params if seed is None else job.params.model_copy(update={"seed": seed + k})
                  for k in range(job.n)]
        rows = [(s, p) for s in sources for p in params]
        size = settings.max_batch_size
        items = [GenerateItem(entry, [s for s, _ in rows[i : i + size]], [p for _, p in rows[i : i + size]])
                 for i in range(0, len(rows), size)]
        return spec, items, prompt_tokens

    # ---- batches ------------------------------------------------------------------------------------------------

    def _record(self, report, fn) -> None:
        self.metrics.record(fn.__name__.removesuffix("_batch"), report, self._ready()[0].cache)
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
            self._record(report, fn)
            return results
        except Exception as exc:  # noqa: BLE001 - reported per request below
            if len(items) == 1:
                return [exc]
        out = []
        for item in items:
            try:
                results, report = await self._run(fn, server.backbone, [item])
                self._record(report, fn)
                out.append(results[0])
            except Exception as exc:  # noqa: BLE001
                out.append(exc)
        return out

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=_rows)
    async def _score_batch(self, items: list[ScoreItem]) -> list:
        return await self._isolated(score_batch, items)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=_rows, max_concurrent_batches=4)
    async def _generate_batch(self, items: list[GenerateItem]):
        """One decoding loop for the whole batch; per step, each request's deltas (StopIteration once it is done).
        Requests that arrive while a loop runs start their own (up to 4 loops, their steps taking turns on the
        torch thread) instead of waiting for it to end."""
        server, _ = self._ready()
        report = BatchReport()
        steps = generate_batch(server.backbone, items, report)
        try:
            while (out := await self._run(next, steps, None)) is not None:
                yield [StopIteration if news is None else news for news in out]
        except Exception as exc:  # noqa: BLE001 - every request still running gets it (and maps it by type)
            yield [exc] * len(items)
        self._record(report, generate_batch)

    @staticmethod
    async def _gather(batch_fn, items: list) -> list:
        results = await asyncio.gather(*(batch_fn(item) for item in items))
        for r in results:
            if isinstance(r, Exception):
                raise r
        return results

    # ---- what the ingress calls ---------------------------------------------------------------------------------

    async def score(self, job: ScoreJob) -> ScoreResult:
        """Label log-likelihoods of every source under the job's composition."""
        spec, entry, _ = await self._run(self._prepare, job.composition, job.sources)
        parts = await self._gather(self._score_batch, self._chunks(ScoreItem, entry, job.sources, tuple(job.labels)))
        scores = torch.cat(parts)
        return ScoreResult(composition=spec.model_dump(mode="json"), log_likelihoods=scores.tolist())

    async def generate_stream(self, job: GenerateJob):
        """Streamed generation (`handle.options(stream=True)`): a GenerationHead, then per decoding step a list of
        `tpv.generate.Delta`s numbered by row (source i, choice k = row i * n + k). Errors before the head are the
        request's (bad names, limits); rows of the job beyond `max_batch_size` run as further batch items."""
        spec, items, prompt_tokens = await self._run(self._prepare_generation, job)
        yield GenerationHead(composition=spec.model_dump(mode="json"), prompt_tokens=prompt_tokens)
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(offset: int, item: GenerateItem) -> None:
            try:
                async for news in self._generate_batch(item):
                    await queue.put(news if isinstance(news, Exception) else
                                    [dataclasses.replace(d, row=d.row + offset) for d in news])
            except Exception as exc:  # noqa: BLE001 - handed to the consumer below
                await queue.put(exc)
            finally:
                await queue.put(None)

        offsets = [sum(it.rows for it in items[:i]) for i in range(len(items))]
        pumps = [asyncio.create_task(pump(o, it)) for o, it in zip(offsets, items)]
        try:
            running = len(pumps)
            while running:
                news = await queue.get()
                if news is None:
                    running -= 1
                elif isinstance(news, Exception):
                    raise news
                else:
                    yield news
        finally:
            for task in pumps:
                task.cancel()

    async def generate(self, job: GenerateJob) -> GenerateResult:
        """`generate_stream` collected: every row's whole completion."""
        stream = self.generate_stream(job)
        head = await anext(stream)
        transcript = Transcript(len(head.prompt_tokens) * job.n)
        async for news in stream:
            transcript.add(news)
        return GenerateResult(composition=head.composition, completions=transcript.completions(
            [n for n in head.prompt_tokens for _ in range(job.n)]))

    def _listing(self) -> tuple[str, list[VectorMeta], list[str]]:
        server, _ = self._ready()
        # forced: a listing is rare and must show what requests are served from (no stale poll after a restore)
        return server.version(force=True), server.metas(), server.store.list_compositions(server.backbone.backbone_id)

    async def vectors(self) -> dict[str, Any]:
        """The served backbone's vectors and named compositions (metadata only)."""
        version, metas, compositions = await self._run(self._listing)
        server, _ = self._ready()
        return {"backbone_id": server.backbone.backbone_id, "store_version": version, "metas": metas,
                "compositions": compositions}

    def _similarity_groups(self) -> tuple[str, list]:
        server, _ = self._ready()
        version = server.version()
        if self._similarity is None or self._similarity[0] != version:
            self._similarity = (version, similarity_groups(server.store, server.backbone.backbone_id, server.metas()))
        return self._similarity

    async def similarity(self) -> dict[str, Any]:
        """The playground's heatmap: flat cosine of the served backbone's vectors, per shape (`serve.similarity`)."""
        version, groups = await self._run(self._similarity_groups)
        return {"backbone_id": self._ready()[0].backbone.backbone_id, "store_version": version, "groups": groups}

    async def info(self) -> dict[str, Any]:
        """What this replica serves, answered from memory (no store or model work): the health check's body."""
        server, _ = self._ready()
        try:
            replica = str(serve.get_replica_context().replica_id.unique_id)
        except Exception:  # noqa: BLE001 - outside a replica
            replica = "local"
        return {"backbone_id": server.backbone.backbone_id, "is_seq2seq": server.backbone.is_seq2seq,
                "store_version": server.watcher.version, "reloads": server.watcher.reloads, "replica": replica,
                "prompt_cache": server.cache.info().model_dump(), "batching": copy.deepcopy(self._stats)}
