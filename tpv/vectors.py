"""Task prompt vectors: tau = tuned prompt - origin, with the metadata needed to trust and reuse them.

A vector is only meaningful relative to a backbone and a prompt shape, so both travel with the tensor in
`VectorMeta`, and the sha256 of the tensor bytes lets the store detect corruption. Merge arithmetic lives in
`tpv.merge` (one registry); this module holds the value type and the similarity measures of the paper.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tpv.errors import InvalidInput

SimilarityMode = Literal["flat", "per_row_mean", "row_averaged", "row_centered"]
SIMILARITY_MODES: tuple[SimilarityMode, ...] = ("flat", "per_row_mean", "row_averaged", "row_centered")
"""flat: cosine of the flattened [L*d] vectors (the paper's measure, from the authors' analysis scripts);
per_row_mean: the mean over the L rows of the row-wise cosines; row_averaged: the cosine of the two vectors'
mean rows [d]; row_centered: the flat cosine of what is left once each vector's mean row is taken from every row.
They can differ widely on one pair; flat is the default everywhere. Flat splits exactly into the last two:
flat = sqrt(s_a s_b) x row_averaged + sqrt((1 - s_a)(1 - s_b)) x row_centered, s being each vector's
`mean_row_share`, so they tell whether vectors agree in what all their rows share or in what each row adds."""


class VectorError(InvalidInput):
    """A tensor or metadata that cannot form a valid task prompt vector, or vectors that cannot be combined."""


def tensor_sha256(tensor: torch.Tensor) -> str:
    """Hex sha256 of the float32, contiguous, little-endian bytes: the identity of a vector's content."""
    arr = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    return hashlib.sha256(arr.astype("<f4", copy=False).tobytes()).hexdigest()


def make_vector_id(task: str, origin_seed: int, sha256: str, source: str | None = None) -> str:
    """Default id: readable (task, seed) plus a digest of the content and of the job that wrote it (its `source`),
    so re-training never collides silently and two jobs whose (deterministic) runs produce the same tensor keep two
    entries, each in its own set. Without a source the digest is the content's."""
    digest = sha256 if source is None else hashlib.sha256(f"{sha256}\0{source}".encode()).hexdigest()
    return f"{task}-s{origin_seed}-{digest[:12]}"


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


class VectorMeta(BaseModel):
    """Everything needed to find, verify and apply a vector without loading its tensor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vector_id: str = Field(min_length=1)
    kind: Literal["task", "composition"] = "task"
    task: str = Field(min_length=1)
    backbone_id: str = Field(min_length=1)
    prompt_length: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    origin_seed: int
    train_config: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    created_at: str = Field(default_factory=_now_iso)
    source: str | None = None
    notes: str | None = None
    parents: list[str] = Field(default_factory=list)

    @field_validator("created_at")
    @classmethod
    def _iso(cls, value: str) -> str:
        try:
            datetime.fromisoformat(value)
        except ValueError as exc:
            raise ValueError(f"created_at must be an ISO 8601 timestamp, got {value!r}") from exc
        return value


class TaskPromptVector:
    """A validated [L, d] float32 CPU tensor plus its metadata.

    The tensor is cloned on construction so later edits to the caller's tensor cannot desynchronise it from
    `meta.sha256`; treat `.tensor` as read-only (the store re-hashes on `put` and refuses a mismatch).
    """

    __slots__ = ("tensor", "meta")

    def __init__(self, tensor: torch.Tensor, meta: VectorMeta) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise VectorError(f"vector {meta.vector_id!r}: expected a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise VectorError(f"vector {meta.vector_id!r}: expected a floating tensor, got {tensor.dtype}")
        expected = (meta.prompt_length, meta.hidden_size)
        if tuple(tensor.shape) != expected:
            raise VectorError(
                f"vector {meta.vector_id!r}: tensor shape {tuple(tensor.shape)} does not match "
                f"meta (prompt_length, hidden_size) = {expected}"
            )
        t = tensor.detach().to("cpu", torch.float32).contiguous().clone()
        _check_finite(t, meta.vector_id)
        digest = tensor_sha256(t)
        if digest != meta.sha256:
            raise VectorError(f"vector {meta.vector_id!r}: tensor sha256 {digest} != meta.sha256 {meta.sha256}")
        self.tensor = t
        self.meta = meta

    @classmethod
    def create(
        cls,
        tensor: torch.Tensor,
        *,
        task: str,
        backbone_id: str,
        origin_seed: int,
        vector_id: str | None = None,
        **meta_fields: Any,
    ) -> TaskPromptVector:
        """Build a vector from tau directly, filling in shape, sha256 and the default id."""
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise VectorError(f"a task prompt vector is a 2-D [L, d] tensor, got {shape}")
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        _check_finite(t, vector_id or task)
        digest = tensor_sha256(t)
        meta = VectorMeta(
            vector_id=vector_id or make_vector_id(task, origin_seed, digest, meta_fields.get("source")),
            task=task,
            backbone_id=backbone_id,
            prompt_length=t.shape[0],
            hidden_size=t.shape[1],
            origin_seed=origin_seed,
            sha256=digest,
            **meta_fields,
        )
        return cls(t, meta)

    @classmethod
    def from_prompts(
        cls, tuned: torch.Tensor, origin: torch.Tensor, *, task: str, backbone_id: str, origin_seed: int,
        **meta_fields: Any,
    ) -> TaskPromptVector:
        """tau = tuned - origin (computed in float32); the paper's definition of a task prompt vector."""
        if tuned.shape != origin.shape:
            raise VectorError(f"tuned prompt shape {tuple(tuned.shape)} != origin shape {tuple(origin.shape)}")
        tau = tuned.detach().to("cpu", torch.float32) - origin.detach().to("cpu", torch.float32)
        return cls.create(tau, task=task, backbone_id=backbone_id, origin_seed=origin_seed, **meta_fields)

    @property
    def vector_id(self) -> str:
        return self.meta.vector_id

    @property
    def shape(self) -> tuple[int, int]:
        return (self.meta.prompt_length, self.meta.hidden_size)

    def apply(self, origin: torch.Tensor) -> torch.Tensor:
        """origin + tau on any origin of the same shape (the cross-origin claim), in origin's dtype/device."""
        if tuple(origin.shape) != self.shape:
            raise VectorError(f"vector {self.vector_id!r} has shape {self.shape}, origin has {tuple(origin.shape)}")
        out = origin.detach().to(torch.float32) + self.tensor.to(origin.device)
        return out.to(origin.dtype)

    def check_compatible(self, others: Sequence[TaskPromptVector]) -> None:
        """Raise VectorError unless every other vector shares this backbone and [L, d] shape."""
        for other in others:
            if other.meta.backbone_id != self.meta.backbone_id:
                raise VectorError(
                    f"backbone mismatch: {self.vector_id!r} is for {self.meta.backbone_id!r}, "
                    f"{other.vector_id!r} is for {other.meta.backbone_id!r}"
                )
            if other.shape != self.shape:
                raise VectorError(
                    f"shape mismatch: {self.vector_id!r} is {self.shape}, {other.vector_id!r} is {other.shape}"
                )

    def __repr__(self) -> str:
        m = self.meta
        return f"TaskPromptVector({m.vector_id!r}, task={m.task!r}, backbone={m.backbone_id!r}, shape={self.shape})"


def _check_finite(t: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise VectorError(f"vector {name!r}: {bad} non-finite value(s) (NaN/inf); a diverged run?")


def _as_tensor(x: TaskPromptVector | torch.Tensor) -> torch.Tensor:
    if isinstance(x, TaskPromptVector):
        return x.tensor
    if isinstance(x, torch.Tensor):
        if x.dim() != 2:
            raise VectorError(f"expected a 2-D [L, d] tensor, got shape {tuple(x.shape)}")
        t = x.detach().to("cpu", torch.float64)
        _check_finite(t, "tensor")
        return t
    raise VectorError(f"expected a TaskPromptVector or a tensor, got {type(x).__name__}")


def _check_mode(mode: str) -> None:
    if mode not in SIMILARITY_MODES:
        raise VectorError(f"unknown similarity mode {mode!r}; use one of {', '.join(SIMILARITY_MODES)}")


PAIR_KINDS = ("same_task", "diff_task", "same_origin")
"""same_task: one task, different origins; diff_task: different tasks, different origins; same_origin: different
tasks, one origin. The paper's first claim is same_task well above both others."""


def pair_kind(a: VectorMeta, b: VectorMeta) -> str | None:
    """Which kind of pair two vectors form (None for one task on one origin: two trainings of the same thing)."""
    if a.task == b.task:
        return "same_task" if a.origin_seed != b.origin_seed else None
    return "same_origin" if a.origin_seed == b.origin_seed else "diff_task"


def similarity_by_pair_kind(metas: Sequence[VectorMeta], matrix: np.ndarray) -> dict[str, list[float]]:
    """The off-diagonal entries of a similarity matrix of these vectors, grouped by `pair_kind`."""
    groups: dict[str, list[float]] = {kind: [] for kind in PAIR_KINDS}
    for i in range(len(metas)):
        for j in range(i + 1, len(metas)):
            kind = pair_kind(metas[i], metas[j])
            if kind is not None:
                groups[kind].append(float(matrix[i, j]))
    return groups


class PermutationTest(BaseModel):
    """How often shuffled task labels give same-task pairs a mean similarity at least the observed one."""

    model_config = ConfigDict(frozen=True)

    p: float = Field(description="P(same-task mean >= observed) under the null that the task does not matter")
    arrangements: int = Field(description="label arrangements counted (all of them when exact)")
    exact: bool
    smallest_p: float = Field(description="the least p these vectors allow (exact: 1 / arrangements)")


def same_task_permutation_test(metas: Sequence[VectorMeta], matrix: np.ndarray, samples: int = 10_000,
                               seed: int = 0) -> PermutationTest | None:
    """Is the same-task mean above what task labels assigned at random would give? Labels are shuffled WITHIN each
    origin, so same-origin pairs stay same-origin and only which cross-origin pairs count as one task changes (the
    pairs share vectors, so a t-test over them would overstate the evidence). Exact over every arrangement when
    there are at most `samples` (the first origin's labels held when every origin holds the same distinct tasks:
    relabeling every origin alike changes nothing), else `samples` seeded random ones (p = (1 + hits) / (1 + samples)). None when no pair shares
    a task."""
    tasks = sorted({m.task for m in metas})
    labels = np.array([tasks.index(m.task) for m in metas])
    origins = np.array([m.origin_seed for m in metas])
    cross = origins[:, None] != origins[None, :]
    upper = np.triu(np.ones(len(metas), dtype=bool), 1) & cross

    def same_task_mean(assigned: np.ndarray) -> float:
        pairs = upper & (assigned[:, None] == assigned[None, :])
        return float(matrix[pairs].mean()) if pairs.any() else math.nan

    observed = same_task_mean(labels)
    if math.isnan(observed):
        return None
    groups = [np.flatnonzero(origins == o) for o in dict.fromkeys(origins.tolist())]
    if _relabeling_holds(labels, groups):
        groups = groups[1:]
    total = math.prod(math.factorial(len(g)) for g in groups)
    tolerance = 1e-12 * max(1.0, abs(observed))
    if total <= samples:
        hits = 0
        for orders in itertools.product(*(itertools.permutations(labels[g]) for g in groups)):
            assigned = labels.copy()
            for g, order in zip(groups, orders):
                assigned[g] = order
            hits += same_task_mean(assigned) >= observed - tolerance
        return PermutationTest(p=hits / total, arrangements=total, exact=True, smallest_p=1 / total)
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(samples):
        assigned = labels.copy()
        for g in groups:
            assigned[g] = rng.permutation(labels[g])
        hits += same_task_mean(assigned) >= observed - tolerance
    return PermutationTest(p=(1 + hits) / (1 + samples), arrangements=samples, exact=False,
                           smallest_p=1 / (1 + samples))


def _relabeling_holds(labels: np.ndarray, groups: list[np.ndarray]) -> bool:
    """May the first origin's labels stay fixed? Only when every origin holds the same set of distinct tasks: then
    each arrangement is one of k! relabelings of one with the first origin as observed, all with the same statistic.
    With different task sets a relabeling is no arrangement, and fixing the first origin drops some."""
    first = labels[groups[0]].tolist()
    return len(set(first)) == len(first) and all(sorted(labels[g].tolist()) == sorted(first) for g in groups)


def cosine_similarity(
    a: TaskPromptVector | torch.Tensor, b: TaskPromptVector | torch.Tensor, mode: SimilarityMode = "flat"
) -> float:
    """Cosine of two vectors under one of SIMILARITY_MODES. A zero row or vector counts as cosine 0."""
    return float(similarity_matrix({"a": a, "b": b}, mode)[1][0, 1])


def similarity_matrix(
    vectors: Sequence[TaskPromptVector] | Mapping[str, TaskPromptVector | torch.Tensor],
    mode: SimilarityMode = "flat",
) -> tuple[list[str], np.ndarray]:
    """Pairwise cosine of N vectors as (labels, [N, N] float64 array); labels are vector ids or mapping keys."""
    _check_mode(mode)
    if isinstance(vectors, Mapping):
        labels, items = list(vectors.keys()), list(vectors.values())
    else:
        items = list(vectors)
        labels = [v.vector_id if isinstance(v, TaskPromptVector) else str(i) for i, v in enumerate(items)]
    if not items:
        raise VectorError("similarity_matrix needs at least one vector")
    typed = [v for v in items if isinstance(v, TaskPromptVector)]
    if typed:
        typed[0].check_compatible(typed[1:])
    tensors = [_as_tensor(v).to(torch.float64) for v in items]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise VectorError(f"cannot compare vectors of different shapes: {sorted(shapes)}")
    x = torch.stack(tensors)  # [N, L, d]
    eps = 1e-8
    if mode == "per_row_mean":
        rows = x / x.norm(dim=2, keepdim=True).clamp_min(eps)
        sim = torch.einsum("ild,jld->ij", rows, rows) / x.shape[1]
    else:
        if mode == "row_averaged":
            x = x.mean(dim=1)
        elif mode == "row_centered":
            x = split_mean_row(x)[1]
        flat = x.flatten(1)
        flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(eps)
        sim = flat @ flat.T
    return labels, sim.numpy().clip(-1.0, 1.0)


def split_mean_row(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., L, d] -> (the mean row repeated on every row, the rest): two orthogonal parts that sum to the input, what
    all rows share and what each row adds to it (the row_averaged and row_centered measures compare them)."""
    shared = tensor.mean(dim=-2, keepdim=True).expand_as(tensor)
    return shared, tensor - shared


def mean_row_share(vector: TaskPromptVector | torch.Tensor) -> float:
    """The share of |tau|^2 in the component every row has in common (L x |mean row|^2 / |tau|^2): 1 when all rows
    are equal, 0 when they cancel. It weighs row_averaged against row_centered in the flat cosine."""
    t = _as_tensor(vector).to(torch.float64)
    total = float(t.pow(2).sum())
    return float(split_mean_row(t)[0].pow(2).sum()) / total if total > 0 else 0.0
