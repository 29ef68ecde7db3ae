"""The one registry of merge methods (after mergekit's `merge_methods`: name -> callable + a params model).

Every method maps N stacked vectors [N, L, d] and per-input weights [N] to one [L, d] delta; `merge` then
scales by `coefficient` (the paper's single coefficient on the sum, TIES' lambda). Keeping one registry means
the CLI, the composer, the weight search and the server all accept exactly the same names and parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tpv.errors import InvalidInput
from tpv.vectors import TaskPromptVector


class MergeError(InvalidInput):
    """Unknown method, bad parameters, or inputs that cannot be merged."""


class MergeParams(BaseModel):
    """Parameters every method takes; subclasses add their own. Non-finite numbers are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    coefficient: float = 1.0


class TiesParams(MergeParams):
    density: float = Field(0.2, gt=0.0, le=1.0, description="fraction of entries kept per vector (TIES k=20%)")


class DareParams(MergeParams):
    p: float = Field(0.9, ge=0.0, lt=1.0, description="drop probability (DARE paper's usual 0.9)")
    seed: int = Field(0, ge=0, lt=2**63)


MergeFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MergeFn
    params: type[MergeParams]
    weighted: bool  # accepts per-input weights other than 1
    commutative: bool  # result independent of input order (lets specs sort their terms)
    negative_weights: bool = True  # accepts weights below 0
    min_inputs: int = 1
    max_inputs: int | None = None
    doc: str = ""


MERGE_METHODS: dict[str, MergeMethod] = {}


def _register(
    name: str, *, params: type[MergeParams] = MergeParams, weighted: bool, commutative: bool = True,
    max_inputs: int | None = None, negative_weights: bool = True,
) -> Callable[[MergeFn], MergeFn]:
    def deco(fn: MergeFn) -> MergeFn:
        MERGE_METHODS[name] = MergeMethod(
            name, fn, params, weighted, commutative, negative_weights, max_inputs=max_inputs,
            doc=(fn.__doc__ or "").strip(),
        )
        return fn

    return deco


def _bcast(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return w.view(-1, *([1] * (x.dim() - 1)))


@_register("sum", weighted=False)
def _sum(x: torch.Tensor, w: torch.Tensor, p: MergeParams) -> torch.Tensor:
    """sum_i tau_i."""
    return x.sum(0)


@_register("weighted", weighted=True)
def _weighted(x: torch.Tensor, w: torch.Tensor, p: MergeParams) -> torch.Tensor:
    """sum_i w_i tau_i (times coefficient: the paper's rule)."""
    return (x * _bcast(w, x)).sum(0)


@_register("negate", weighted=False, max_inputs=1)
def _negate(x: torch.Tensor, w: torch.Tensor, p: MergeParams) -> torch.Tensor:
    """-tau of a single vector (forgetting a task)."""
    return -x[0]


@_register("mean", weighted=False)
def _mean(x: torch.Tensor, w: torch.Tensor, p: MergeParams) -> torch.Tensor:
    """(1/N) sum_i tau_i, e.g. one task's vectors over origin seeds."""
    return x.mean(0)


def _trim(x: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ceil(density * numel) largest-magnitude entries of each vector (at least one); ties at the
    threshold are broken by torch.topk."""
    flat = x.flatten(1)
    n = flat.shape[1]
    k = min(n, max(1, math.ceil(density * n - 1e-9)))
    idx = flat.abs().topk(k, dim=1).indices
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)
    return (flat * mask).view_as(x)


@_register("ties", params=TiesParams, weighted=True, negative_weights=False)
def _ties(x: torch.Tensor, w: torch.Tensor, p: TiesParams) -> torch.Tensor:
    """TIES, weighted as mergekit's `ties` defines it: trim each vector to its top-density magnitudes, multiply by
    its weight, elect each entry's sign from the sum of the weighted values (a zero sum elects +), then take the
    disjoint weighted mean: sum of the agreeing weighted values / sum of their weights (0 where none agree).
    E.g. x = [+1, -1], w = [1, 3]: weighted [+1, -3] elect -, so -3 / 3 = -1. Unlike mergekit, trimming keeps
    ceil(density * n) entries (at least one) where mergekit keeps floor(density * n). A negative weight is refused
    (`check_inputs`): the sign election and the division by the agreeing weights would turn -w * tau into +tau."""
    ws = _bcast(w, x)
    u = _trim(x, p.density) * ws
    elected = torch.where(u.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(u) == elected
    divisor = (ws * agree).sum(0)
    return (u * agree).sum(0) / torch.where(divisor == 0, torch.ones_like(divisor), divisor)


@_register("dare", params=DareParams, weighted=True, commutative=False)
def _dare(x: torch.Tensor, w: torch.Tensor, p: DareParams) -> torch.Tensor:
    """DARE: drop each entry with probability p, rescale survivors by 1/(1-p), then sum_i w_i tau_i.
    Masks come from a CPU generator seeded by `seed`, drawn in input order (so order matters)."""
    gen = torch.Generator().manual_seed(p.seed)
    keep = (torch.rand(x.shape, generator=gen) >= p.p).to(x.device)
    return (x * keep * _bcast(w, x)).sum(0) / (1.0 - p.p)


def get_method(name: str) -> MergeMethod:
    try:
        return MERGE_METHODS[name]
    except (KeyError, TypeError):
        raise MergeError(f"unknown merge method {name!r}; known: {', '.join(sorted(MERGE_METHODS))}") from None


def parse_params(method: str, params: Mapping[str, Any]) -> MergeParams:
    """Validate `params` against the method's model; errors name the method and the offending field."""
    m = get_method(method)
    try:
        return m.params.model_validate(dict(params))
    except ValidationError as exc:
        raise MergeError(f"bad parameters for merge method {method!r}: {exc}") from None


def check_inputs(method: str, n_inputs: int, weights: Sequence[float] | None) -> None:
    """Input-count and weight checks shared by `merge` and spec validation (fail before loading anything)."""
    m = get_method(method)
    if n_inputs < m.min_inputs:
        raise MergeError(f"merge method {method!r} needs at least {m.min_inputs} input(s), got {n_inputs}")
    if m.max_inputs is not None and n_inputs > m.max_inputs:
        raise MergeError(f"merge method {method!r} takes at most {m.max_inputs} input(s), got {n_inputs}")
    if weights is None:
        return
    if len(weights) != n_inputs:
        raise MergeError(f"{len(weights)} weight(s) for {n_inputs} input(s)")
    if not all(math.isfinite(float(x)) for x in weights):
        raise MergeError(f"weights must be finite, got {list(map(float, weights))}")
    if not m.negative_weights and any(float(x) < 0 for x in weights):
        raise MergeError(f"merge method {method!r} takes no negative weights, got {list(map(float, weights))}; "
                         "subtract a vector with 'weighted' or 'negate'")
    if not m.weighted and any(float(x) != 1.0 for x in weights):
        raise MergeError(f"merge method {method!r} takes no weights; use 'weighted', 'ties' or 'dare'")


def merge(
    method: str,
    tensors: Sequence[torch.Tensor | TaskPromptVector],
    weights: Sequence[float] | torch.Tensor | None = None,
    **params: Any,
) -> torch.Tensor:
    """Merge same-shape vectors with a registered method; returns a new float32 tensor on the inputs' device."""
    m = get_method(method)
    parsed = parse_params(method, params)
    items = list(tensors)
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().flatten().tolist()
    check_inputs(method, len(items), weights)
    xs = [v.tensor if isinstance(v, TaskPromptVector) else v for v in items]
    if not all(isinstance(t, torch.Tensor) for t in xs):
        raise MergeError("merge inputs must be tensors or TaskPromptVectors")
    shapes = {tuple(t.shape) for t in xs}
    if len(shapes) != 1:
        raise MergeError(f"cannot merge tensors of different shapes: {sorted(shapes)}")
    device = xs[0].device
    x = torch.stack([t.detach().to(device, torch.float32) for t in xs])
    if not bool(torch.isfinite(x).all()):
        raise MergeError("merge inputs contain NaN/inf")
    w = torch.tensor([1.0] * len(xs) if weights is None else [float(v) for v in weights], device=device)
    return m.fn(x, w, parsed) * parsed.coefficient
