"""Composition: which stored vectors, merged how, applied to which origin -> a prompt tensor [L, d].

prompt = origin(L, seed) + merge(method, taus, weights, coefficient, **params). This module owns the contract every
consumer (CLI, Tune jobs, server) uses, so there is one of each:

- `CompositionBody`: what a client names (terms, method, coefficient, params); `CompositionSpec` adds where it is
  applied (backbone, origin seed, prompt length). The HTTP schemas reuse these classes.
- The task-term rule (`task_vectors`): a term `{"task": t}` means the **seed-mean of t's task vectors**: vectors of
  kind "task" only (never stored compositions), of the spec's prompt length, optionally narrowed to some origin
  `seeds` and to one `source` (the job that wrote them, e.g. "tpv sweep demo-sweep"). At most one vector per origin
  seed may match: two vectors of one (task, seed) are two different trainings, and averaging them silently would
  mix recipes, so that is an error asking for a `source` or a `vector_id`.
- The weight bound `MAX_WEIGHT` and the prompt-length rule (`prompt_length_of`): a composition's L is the one
  shared by the vectors it names.

Specs are validated up front (names, weights, method, parameters) before any file is read, and results are cached
by the spec's canonical JSON, so repeated requests cost one dict lookup + clone.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tpv.cache import BoundedLRU, CacheInfo, StoreWatcher
from tpv.errors import InvalidInput
from tpv.merge import MergeError, check_inputs, get_method, merge, parse_params
from tpv.names import Name
from tpv.store import CorruptVector, UnknownVector, VectorStore
from tpv.vectors import VectorMeta

__all__ = [
    "CompositionBody", "CompositionError", "CompositionSpec", "CompositionTerm", "Composer",
    "MAX_TERMS", "MAX_WEIGHT", "UnknownVector", "prompt_length_of", "task_vectors",
]

MAX_TERMS = 32
MAX_WEIGHT = 100.0

OriginFn = Callable[[int, int], torch.Tensor]


class CompositionError(InvalidInput):
    """A spec that is valid on its own but cannot be built from this store/backbone (mismatched shapes...)."""


class CompositionTerm(BaseModel):
    """One input: a stored vector by id, or a task (the seed-mean of its task vectors, see the module doc)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    task: Name | None = None
    vector_id: Name | None = None
    seeds: list[int] | None = Field(
        None, min_length=1, max_length=64, description="task terms: only vectors of these origin seeds"
    )
    source: str | None = Field(
        None, min_length=1, max_length=200, description="task terms: only vectors this job wrote (VectorMeta.source)"
    )
    weight: float = Field(1.0, ge=-MAX_WEIGHT, le=MAX_WEIGHT)

    @model_validator(mode="after")
    def _exactly_one(self) -> CompositionTerm:
        if (self.task is None) == (self.vector_id is None):
            raise ValueError("a term names exactly one of 'task' or 'vector_id'")
        if self.vector_id is not None and (self.seeds is not None or self.source is not None):
            raise ValueError("'seeds' and 'source' narrow task terms; a vector_id term names one vector already")
        return self


class CompositionBody(BaseModel):
    """What a composition is made of, independent of where it is applied. `params` are the merge method's own
    parameters (normalised to their full set, defaults included, so equivalent specs share one cache key);
    `coefficient` scales the merged delta."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    terms: list[CompositionTerm] = Field(min_length=1, max_length=MAX_TERMS)
    method: str = "weighted"
    coefficient: float = Field(1.0, ge=-MAX_WEIGHT, le=MAX_WEIGHT)
    params: dict[str, Any] = Field(default_factory=dict, validate_default=True)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        get_method(value)  # MergeError is a ValueError: becomes a validation error naming the known methods
        return value

    @field_validator("params")
    @classmethod
    def _valid_params(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "coefficient" in value:
            raise ValueError("set 'coefficient' on the spec, not in params")
        method = info.data.get("method")
        if method is None:  # the method itself failed validation; that error is reported
            return value
        return parse_params(method, value).model_dump(exclude={"coefficient"})

    @model_validator(mode="after")
    def _inputs_fit_method(self) -> CompositionBody:
        check_inputs(self.method, len(self.terms), [t.weight for t in self.terms])
        return self

    def applied(self, backbone_id: str, origin_seed: int, prompt_length: int) -> CompositionSpec:
        """This body on one backbone, origin and prompt length."""
        return CompositionSpec(
            **self.model_dump(), backbone_id=backbone_id, origin_seed=origin_seed, prompt_length=prompt_length
        )


class CompositionSpec(CompositionBody):
    """A body applied: the origin (backbone, seed, prompt length) the merged delta is added to."""

    backbone_id: Name
    origin_seed: int = Field(ge=0)
    prompt_length: int = Field(gt=0)

    def canonical(self) -> str:
        """Sorted-key compact JSON; terms are sorted too when the method is order-independent."""
        data = self.model_dump(mode="json")
        if get_method(self.method).commutative:
            data["terms"] = sorted(data["terms"], key=lambda t: json.dumps(t, sort_keys=True))
        return json.dumps(data, sort_keys=True, separators=(",", ":"))


def task_vectors(
    store: VectorStore, backbone_id: str, task: str, prompt_length: int | None = None,
    seeds: list[int] | None = None, source: str | None = None,
) -> list[VectorMeta]:
    """The vectors a task term means (the rule in the module doc), one per origin seed, sorted by seed.

    `prompt_length=None` accepts any length as long as all matches share one. Raises UnknownVector when nothing
    matches and CompositionError when the match is ambiguous (several vectors of one seed, or mixed lengths).
    """
    metas = [m for m in store.list(backbone_id, task=task, kind="task")
             if (seeds is None or m.origin_seed in seeds) and (source is None or m.source == source)]
    narrowed = " and ".join(x for x in (
        f"seeds {seeds}" if seeds is not None else "", f"source {source!r}" if source is not None else "") if x)
    if not metas and store.problems(backbone_id, task):  # only unreadable entries: the store's fault, not "none"
        raise CorruptVector(f"the stored vectors of task {task!r} on backbone {backbone_id!r} are unreadable")
    if not metas:
        raise UnknownVector(f"no task vectors for task {task!r} on backbone {backbone_id!r}"
                            + (f" with {narrowed}" if narrowed else ""))
    if prompt_length is not None:
        fitting = [m for m in metas if m.prompt_length == prompt_length]
        if not fitting:
            lengths = sorted({m.prompt_length for m in metas})
            raise CompositionError(f"task {task!r} has vectors of prompt_length {lengths}, none of {prompt_length}")
        metas = fitting
    lengths = sorted({m.prompt_length for m in metas})
    if len(lengths) > 1:
        raise CompositionError(f"task {task!r} has vectors of prompt lengths {lengths}; name one length")
    by_seed: dict[int, list[VectorMeta]] = {}
    for m in metas:
        by_seed.setdefault(m.origin_seed, []).append(m)
    clashes = {seed: sorted(m.source or "(no source)" for m in ms) for seed, ms in by_seed.items() if len(ms) > 1}
    if clashes:
        raise CompositionError(
            f"task {task!r} has several vectors for one origin seed {clashes}: name a 'source' (the job that wrote "
            "them) or a vector_id, so vectors of different trainings are never averaged by accident"
        )
    return [by_seed[seed][0] for seed in sorted(by_seed)]


def _term_metas(store: VectorStore, backbone_id: str, term: CompositionTerm, prompt_length: int | None) -> list[VectorMeta]:
    """The metadata of the stored vectors one term names (no tensors read)."""
    if term.task is not None:
        return task_vectors(store, backbone_id, term.task, prompt_length, term.seeds, term.source)
    try:
        return [store.meta(term.vector_id, backbone_id)]
    except UnknownVector:
        try:
            elsewhere = store.meta(term.vector_id).backbone_id
        except UnknownVector:
            raise UnknownVector(f"no vector {term.vector_id!r} for backbone {backbone_id!r}") from None
        raise CompositionError(
            f"backbone mismatch: vector {term.vector_id!r} belongs to {elsewhere!r}, the spec is for {backbone_id!r}"
        ) from None


def prompt_length_of(store: VectorStore, backbone_id: str, body: CompositionBody) -> int:
    """The prompt length L a composition applies at: the one shared by every vector its terms name."""
    lengths = sorted({m.prompt_length for t in body.terms for m in _term_metas(store, backbone_id, t, None)})
    if len(lengths) != 1:
        raise CompositionError(f"the terms name vectors of different prompt lengths {lengths}")
    return lengths[0]


class Composer:
    """Builds prompts from specs against one store, with an LRU cache bounded in entries and bytes.

    `origin_fn(L, seed)` returns the origin [L, d] (the backbone's `make_origin`); cache it there if it is
    costly, the composer calls it once per cache miss. `compose` returns a fresh clone each time, so callers may
    modify the result without corrupting the cache. Task terms resolve to the mean of the stored vectors at the
    time of the miss: with `watch_interval_s` set, the cache is dropped whenever `store.version()` changes
    (checked at most every `watch_interval_s` seconds, 0 = every call); otherwise call `invalidate()`.
    Thread-safe: the cache is locked, building runs outside the lock.
    """

    def __init__(
        self,
        store: VectorStore,
        origin_fn: OriginFn,
        *,
        max_entries: int = 1024,
        max_bytes: int = 256 * 2**20,
        watch_interval_s: float | None = None,
    ) -> None:
        if watch_interval_s is not None and not watch_interval_s >= 0:
            raise ValueError(f"watch_interval_s must be None or >= 0, got {watch_interval_s}")
        self.store = store
        self.origin_fn = origin_fn
        self._cache: BoundedLRU[str, torch.Tensor] = BoundedLRU(max_entries, max_bytes, _tensor_bytes)
        self._generation = 0  # bumped by invalidate: a build started before it must not insert its prompt
        self._lock = threading.Lock()
        self._watcher = (StoreWatcher(store, watch_interval_s, lambda _version: self.invalidate())
                         if watch_interval_s is not None else None)

    # ---- cache --------------------------------------------------------------------------------------------------

    def invalidate(self) -> None:
        """Drop every cached prompt (and make builds already in flight not insert theirs)."""
        with self._lock:
            self._cache.clear()
            self._generation += 1

    def cache_info(self) -> CacheInfo:
        return self._cache.info()

    # ---- building -----------------------------------------------------------------------------------------------

    def _resolve(self, spec: CompositionSpec, term: CompositionTerm) -> tuple[torch.Tensor, list[str]]:
        metas = _term_metas(self.store, spec.backbone_id, term, spec.prompt_length)
        vectors = [self.store.get(m.vector_id, backbone_id=spec.backbone_id) for m in metas]
        for v in vectors:
            if v.meta.prompt_length != spec.prompt_length:
                raise CompositionError(
                    f"vector {v.vector_id!r} has prompt_length {v.meta.prompt_length}, the spec asks for "
                    f"{spec.prompt_length}"
                )
        tau = vectors[0].tensor if len(vectors) == 1 else merge("mean", vectors)
        return tau, [v.vector_id for v in vectors]

    def delta(self, spec: CompositionSpec | Mapping[str, Any]) -> tuple[torch.Tensor, list[str]]:
        """The merged task vector (without origin) and the ids of the stored vectors it was built from; useful to
        store a composition as a vector of kind 'composition' with those ids as parents."""
        spec = self._spec(spec)
        resolved = [self._resolve(spec, t) for t in spec.terms]
        hidden = {tau.shape[1] for tau, _ in resolved}
        if len(hidden) != 1:
            raise CompositionError(f"terms have different hidden sizes {sorted(hidden)}")
        try:
            out = merge(
                spec.method, [tau for tau, _ in resolved], [t.weight for t in spec.terms],
                coefficient=spec.coefficient, **spec.params,
            )
        except MergeError as exc:
            raise CompositionError(str(exc)) from None
        return out, [vid for _, ids in resolved for vid in ids]

    def compose(self, spec: CompositionSpec | Mapping[str, Any]) -> torch.Tensor:
        """origin(L, seed) + merged delta, in the origin's dtype and device; a fresh tensor on every call."""
        spec = self._spec(spec)
        if self._watcher is not None:
            self._watcher.check()
        key = spec.canonical()
        with self._lock:
            generation = self._generation
        cached = self._cache.get(key)
        if cached is not None:
            return cached.clone()
        delta, _ = self.delta(spec)
        origin = self.origin_fn(spec.prompt_length, spec.origin_seed)
        if not isinstance(origin, torch.Tensor) or origin.dim() != 2 or origin.shape[0] != spec.prompt_length:
            got = tuple(origin.shape) if isinstance(origin, torch.Tensor) else type(origin).__name__
            raise CompositionError(f"origin_fn({spec.prompt_length}, {spec.origin_seed}) returned {got}, not [L, d]")
        if origin.shape != delta.shape:
            raise CompositionError(
                f"vectors have hidden size {delta.shape[1]} but the origin has {origin.shape[1]}: wrong backbone?"
            )
        out = (origin.detach().to(torch.float32) + delta.to(origin.device)).to(origin.dtype)
        with self._lock:
            if generation == self._generation:
                self._cache.put(key, out)
        return out.clone()

    # ---- named compositions -------------------------------------------------------------------------------------

    def named(self, backbone_id: str, name: str) -> CompositionSpec:
        """The spec stored under `name` (store.get_composition), validated."""
        raw = self.store.get_composition(backbone_id, name)
        try:
            spec = CompositionSpec.model_validate(raw)
        except ValidationError as exc:
            raise CompositionError(f"stored composition {name!r} is not a valid spec: {exc}") from None
        if spec.backbone_id != backbone_id:
            raise CompositionError(
                f"composition {name!r} is stored under {backbone_id!r} but names {spec.backbone_id!r}"
            )
        return spec

    def compose_named(self, backbone_id: str, name: str) -> torch.Tensor:
        return self.compose(self.named(backbone_id, name))

    def save_named(self, name: str, spec: CompositionSpec, overwrite: bool = False) -> None:
        self.store.put_composition(spec.backbone_id, name, spec.model_dump(mode="json"), overwrite=overwrite)

    @staticmethod
    def _spec(spec: CompositionSpec | Mapping[str, Any]) -> CompositionSpec:
        return spec if isinstance(spec, CompositionSpec) else CompositionSpec.model_validate(dict(spec))


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
