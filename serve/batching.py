"""Heterogeneous batching without Serve: per-composition prompt cache + one forward for many compositions.

Plain Python (no Ray import) so it is tested directly; `serve.app` wraps it in `@serve.batch`.

- `prompt_cache`: the `tpv.cache.BoundedLRU` of `PromptEntry` (the composed prompt [L, d] on the model's device,
  and for causal backbones its attention keys/values `PromptPrefix`), bounded in entries AND bytes, keyed by
  (store version, the composition's canonical spec). A composition is composed and its prefix computed once per
  store version, never per row or per request.
- `tpv.cache.StoreWatcher`: polls `store.version()` at most every `interval_s`; on a change the composer's cache and
  the prompt cache are dropped, so a vector or named composition replaced in the store is never served stale after
  the reload window.
- `score_batch`: many (composition, sources, labels) requests -> ONE `backbone.score_labels` forward per prompt
  length, rows of different compositions stacked with a per-row prefix (causal, on a CPU) or a per-row prompt
  tensor (seq2seq, and causal on a GPU: `gathers_prefixes`). Different label sets share that forward when every
  label is one token (causal: all scores come from the last position); otherwise each label set is its own group
  (one forward each).
- `generate_batch`: many generation requests -> ONE decoding loop (`tpv.generate.decode`), every row started from
  its composition's cached keys/values whatever its prompt length, each row with its own sampling params; yields
  each request's new text per step (streaming) and rows leave as they finish.
- `PromptServer`: the above wired to one backbone and one store (what a replica holds).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from tpv.backbone import Backbone, PromptPrefix
from tpv.cache import BoundedLRU, StoreWatcher
from tpv.compose import Composer, CompositionSpec
from tpv.generate import Delta, SamplingParams, decode
from tpv.prompt import make_origin
from tpv.store import VectorStore
from tpv.vectors import VectorMeta

__all__ = [
    "BatchReport", "GenerateItem", "PromptEntry", "PromptServer", "ScoreItem", "prompt_cache",
    "generate_batch", "score_batch",
]


# ---- the per-composition cache ---------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PromptEntry:
    """One composition ready to serve: the composed prompt and (causal) its keys/values for one row."""

    key: str  # the composition's canonical spec
    version: str  # the store version it was built at
    prompt: Tensor  # [L, d], on the backbone's device and dtype
    prefix: PromptPrefix | None  # 1 row; None for seq2seq backbones

    @property
    def prompt_length(self) -> int:
        return int(self.prompt.shape[0])

    def nbytes(self) -> int:
        size = self.prompt.numel() * self.prompt.element_size()
        return size + (self.prefix.nbytes() if self.prefix is not None else 0)


def prompt_cache(max_entries: int, max_bytes: int) -> BoundedLRU[tuple[str, str], PromptEntry]:
    """The replica's one prompt cache: PromptEntry by (store version, canonical spec), bounded in entries and bytes."""
    return BoundedLRU(max_entries, max_bytes, PromptEntry.nbytes)


# ---- one forward for many compositions -------------------------------------------------------------------------


@dataclass
class ScoreItem:
    """One request's rows: every source is scored against `labels` under the request's composition."""

    entry: PromptEntry
    sources: list[str]
    labels: tuple[str, ...]

    @property
    def rows(self) -> int:
        return len(self.sources)


@dataclass
class GenerateItem:
    """One request's rows: row r continues sources[r] under the request's composition, following params[r]."""

    entry: PromptEntry
    sources: list[str]
    params: list[SamplingParams]

    @property
    def rows(self) -> int:
        return len(self.sources)


@dataclass
class BatchReport:
    """What one batch did: requests, rows, distinct compositions, forward passes (one per group)."""

    requests: int = 0
    rows: int = 0
    compositions: int = 0
    forwards: int = 0
    seconds: float = 0.0
    groups: list[dict] = field(default_factory=list)


def gathers_prefixes(device: str) -> bool:
    """Whether a batch of several compositions gathers their cached keys/values (a CPU) or recomputes their prompts
    in the batch's forward (a GPU). A CPU pass is compute-bound: the cache saves the prompt's arithmetic. A GPU pass
    of a small model is launch-bound: gathering costs a concatenation per layer for keys and values, which was slower
    than recomputing the prompt rows (`bench/serve_batching.py` on an H100, bf16: the cache 0.81x of recomputing)."""
    return not device.startswith("cuda")


def _stacked_prompt(backbone: Backbone, entries: Sequence[PromptEntry], row_of: list[int]) -> Tensor | PromptPrefix:
    """The per-row prompt of a batch: row r uses entries[row_of[r]]. One composition broadcasts its cached
    keys/values (causal); several gather theirs where `gathers_prefixes`, else stack their prompts."""
    if not backbone.is_seq2seq and all(e.prefix is not None for e in entries):
        if len(entries) == 1:
            return entries[0].prefix  # a 1-row prefix broadcasts to every row
        if gathers_prefixes(str(backbone.device)):
            return PromptPrefix.cat([entries[j].prefix for j in row_of])  # type: ignore[misc]  # one copy, row order
    if len(entries) == 1:
        return entries[0].prompt.unsqueeze(0)
    return torch.stack([entries[j].prompt for j in row_of])


def _groups(items: Sequence, key: Callable) -> OrderedDict:
    out: OrderedDict = OrderedDict()
    for i, item in enumerate(items):
        out.setdefault(key(item), []).append(i)
    return out


def _single_token(backbone: Backbone, labels: Sequence[str]) -> bool:
    """Causal backbones score one-token labels from the last source position alone (`Backbone.score_labels`' fast
    path), so any label sets can share that one forward: the union of labels is scored and each row keeps its own."""
    if backbone.is_seq2seq:
        return False
    return all(len(ids) == 1 for ids in backbone.label_token_ids(list(labels)))


def score_batch(backbone: Backbone, items: Sequence[ScoreItem]) -> tuple[list[Tensor], BatchReport]:
    """Label log-likelihoods [rows_i, C_i] for every request, in order, in ONE forward per group of requests that
    share a prompt length and either a label set or (causal) only one-token labels, whatever the compositions."""
    start = time.perf_counter()
    results: list[Tensor | None] = [None] * len(items)
    report = BatchReport(requests=len(items), rows=sum(i.rows for i in items))
    report.compositions = len({id(i.entry) for i in items})
    fast: dict[tuple[str, ...], bool] = {}
    for it in items:
        if it.labels not in fast:
            fast[it.labels] = _single_token(backbone, it.labels)

    def group_key(it: ScoreItem):
        return (None if fast[it.labels] else it.labels, it.entry.prompt_length)

    for (label_key, _length), members in _groups(items, group_key).items():
        if label_key is None:  # union of one-token label sets, first-seen order
            labels = list(dict.fromkeys(lab for i in members for lab in items[i].labels))
        else:
            labels = list(label_key)
        column = {lab: j for j, lab in enumerate(labels)}
        entries: list[PromptEntry] = []
        slot: dict[int, int] = {}
        row_of: list[int] = []
        sources: list[str] = []
        for i in members:
            e = items[i].entry
            if id(e) not in slot:
                slot[id(e)] = len(entries)
                entries.append(e)
            row_of.extend([slot[id(e)]] * items[i].rows)
            sources.extend(items[i].sources)
        scores = backbone.score_labels(_stacked_prompt(backbone, entries, row_of), sources, labels)
        report.forwards += 1
        report.groups.append({"labels": labels, "label_sets": len({items[i].labels for i in members}),
                              "requests": len(members), "rows": len(sources), "compositions": len(entries)})
        offset = 0
        for i in members:
            cols = [column[lab] for lab in items[i].labels]
            results[i] = scores[offset : offset + items[i].rows][:, cols].float()
            offset += items[i].rows
    report.seconds = time.perf_counter() - start
    return results, report  # type: ignore[return-value]


def generate_batch(backbone: Backbone, items: Sequence[GenerateItem], report: BatchReport
                   ) -> Iterator[list[list[Delta] | None]]:
    """Decode every request's rows in one loop; after each step yield, per request, its rows' deltas (rows numbered
    within the request), or None once all its rows are done. `report` is filled in as the loop runs."""
    start = time.perf_counter()
    report.requests, report.rows = len(items), sum(i.rows for i in items)
    report.compositions = len({id(i.entry) for i in items})
    owner = [(k, r) for k, item in enumerate(items) for r in range(item.rows)]
    prompts = [item.entry.prefix if item.entry.prefix is not None else item.entry.prompt
               for item in items for _ in item.sources]
    decoding = backbone.start_decoding(prompts, [s for item in items for s in item.sources])
    left = [item.rows for item in items]
    report.groups.append({"rows": report.rows, "compositions": report.compositions,
                          "prompt_lengths": sorted({i.entry.prompt_length for i in items})})
    for news in decode(backbone, decoding, [p for item in items for p in item.params]):
        out: list[list[Delta] | None] = [[] if n else None for n in left]
        for d in news:
            k, r = owner[d.row]
            out[k].append(replace(d, row=r))  # type: ignore[union-attr]
            left[k] -= d.finish_reason is not None
        report.forwards += 1
        report.seconds = time.perf_counter() - start
        yield out


# ---- a replica's state ------------------------------------------------------------------------------------------


class PromptServer:
    """One backbone + one store: compositions -> cached PromptEntry, with hot reload by polling the store."""

    def __init__(
        self,
        backbone: Backbone,
        store: VectorStore,
        *,
        reload_interval_s: float = 2.0,
        cache_max_entries: int = 256,
        cache_max_bytes: int = 1 << 30,
    ) -> None:
        self.backbone = backbone
        self.store = store
        self._origins: BoundedLRU[tuple[int, int], Tensor] = BoundedLRU(64)  # (L, seed) -> origin [L, d]
        # ONE cache per replica: the prompt cache keeps the finished entries (prompt + prefix); the composer's own
        # cache is switched off, else the same byte bound would be spent twice
        self.composer = Composer(store, self._origin, max_entries=0, max_bytes=0)
        self.cache = prompt_cache(cache_max_entries, cache_max_bytes)
        self._lock = threading.Lock()
        self._named: BoundedLRU[tuple[str, str], CompositionSpec] = BoundedLRU(1024)  # (version, name) -> spec
        self._metas: tuple[str, list[VectorMeta]] | None = None
        self.watcher = StoreWatcher(store, reload_interval_s, self._on_store_change)

    def _origin(self, length: int, seed: int) -> Tensor:
        origin = self._origins.get((length, seed))
        if origin is None:
            origin = make_origin(self.backbone, length, seed)
            self._origins.put((length, seed), origin)
        return origin

    def _on_store_change(self, version: str) -> None:
        self.composer.invalidate()
        for cache in (self.cache, self._named):  # entries of other versions can never be hit again
            cache.drop(lambda key: key[0] != version)
        with self._lock:
            self._metas = None

    def configure(self, *, reload_interval_s: float, cache_max_entries: int, cache_max_bytes: int) -> None:
        self.watcher.interval_s = float(reload_interval_s)
        self.cache.resize(cache_max_entries, cache_max_bytes)

    def version(self, force: bool = False) -> str:
        return self.watcher.check(force=force)

    def cached(self, spec: CompositionSpec) -> PromptEntry | None:
        """The cached entry at the current store version, or None (cheap: no model or file work)."""
        return self.cache.get((self.version(), spec.canonical()))

    @torch.no_grad()
    def entry(self, spec: CompositionSpec) -> PromptEntry:
        """The cached prompt (and prefix) of a composition at the current store version; builds it on a miss.
        Raises the composer's errors (UnknownVector, NotFound, CompositionError) for bad specs."""
        version = self.version()
        key = spec.canonical()
        cached = self.cache.get((version, key))
        if cached is not None:
            return cached
        prompt = self.composer.compose(spec).to(self.backbone.device, self.backbone.dtype)
        prefix = None if self.backbone.is_seq2seq else self.backbone.prefix(prompt.unsqueeze(0))
        entry = PromptEntry(key=key, version=version, prompt=prompt, prefix=prefix)
        if version == self.watcher.version:  # the store moved on while building: serve it, do not keep it
            self.cache.put((version, key), entry)
        return entry

    def named(self, name: str) -> CompositionSpec:
        """A stored composition's spec, read once per store version."""
        version = self.version()
        spec = self._named.get((version, name))
        if spec is None:
            spec = self.composer.named(self.backbone.backbone_id, name)
            self._named.put((version, name), spec)
        return spec

    def metas(self) -> list[VectorMeta]:
        """Metadata of the served backbone's vectors, listed once per store version."""
        version = self.version()
        with self._lock:
            if self._metas is not None and self._metas[0] == version:
                return self._metas[1]
        bb = self.backbone.backbone_id
        metas = self.store.list(bb) if bb in self.store.backbones() else []
        with self._lock:
            self._metas = (version, metas)
        return metas
