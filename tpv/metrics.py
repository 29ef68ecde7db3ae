"""Task metrics in plain numpy (no sklearn/scipy), so evaluation needs nothing beyond the core install.

Classification metrics compare predictions and references by equality, so they work on class indices or label
strings alike. ``f1`` is binary F1 of the positive class, which is label index 1 (the second entry of
``TaskSpec.labels``, e.g. "positive" or "spam"); pass ``pos_label`` to choose another. ``macro_f1`` averages
per-class F1 over every class seen in either predictions or references. ``pearson``/``spearman`` take numbers;
when either side is constant the correlation is undefined and 0.0 is returned (no signal), so model selection on
validation never compares against NaN.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

CLASSIFICATION_METRICS = ("accuracy", "f1", "macro_f1")
REGRESSION_METRICS = ("pearson", "spearman")
METRICS = CLASSIFICATION_METRICS + REGRESSION_METRICS


def accuracy(preds: Sequence[Any], refs: Sequence[Any]) -> float:
    return float(np.mean([p == r for p, r in zip(preds, refs)]))


def _f1(preds: Sequence[Any], refs: Sequence[Any], positive: Any) -> float:
    tp = sum(p == positive and r == positive for p, r in zip(preds, refs))
    fp = sum(p == positive and r != positive for p, r in zip(preds, refs))
    fn = sum(p != positive and r == positive for p, r in zip(preds, refs))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def f1(preds: Sequence[Any], refs: Sequence[Any], pos_label: Any = 1) -> float:
    return float(_f1(preds, refs, pos_label))


def macro_f1(preds: Sequence[Any], refs: Sequence[Any]) -> float:
    classes = set(refs) | set(preds)
    return float(np.mean([_f1(preds, refs, c) for c in classes]))


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties given their average rank (what Spearman's rho is defined on)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=float)
    ranks[order] = np.arange(len(x), dtype=float)
    _, inverse = np.unique(x, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks)
    counts = np.bincount(inverse)
    return sums[inverse] / counts[inverse]


def pearson(preds: Sequence[float], refs: Sequence[float]) -> float:
    x = np.asarray(preds, dtype=float) - np.mean(preds)
    y = np.asarray(refs, dtype=float) - np.mean(refs)
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return 0.0 if denom == 0 else float((x * y).sum() / denom)


def spearman(preds: Sequence[float], refs: Sequence[float]) -> float:
    return pearson(_ranks(np.asarray(preds, dtype=float)), _ranks(np.asarray(refs, dtype=float)))


_FUNCTIONS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "macro_f1": macro_f1,
    "pearson": pearson,
    "spearman": spearman,
}


def compute_metric(name: str, preds: Sequence[Any], refs: Sequence[Any], **kwargs: Any) -> float:
    """The metric ``name`` (one of ``METRICS``) of predictions against references of the same length."""
    if name not in _FUNCTIONS:
        raise ValueError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}")
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    if len(refs) == 0:
        raise ValueError("cannot compute a metric on zero examples")
    return _FUNCTIONS[name](list(preds), list(refs), **kwargs)
