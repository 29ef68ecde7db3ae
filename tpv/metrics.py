"""Task metrics in plain numpy (no sklearn/scipy), so evaluation needs nothing beyond the core install.

Classification metrics compare predictions and references by equality, so they work on class indices or label
strings alike. ``f1`` is binary F1 of the positive class, which is label index 1 (the second entry of
``TaskSpec.labels``, e.g. "positive" or "spam"); pass ``pos_label`` to choose another. ``macro_f1`` averages
per-class F1 over every class seen in either predictions or references. ``pearson``/``spearman`` take numbers;
when either side is constant the correlation is undefined and 0.0 is returned (no signal), so model selection on
validation never compares against NaN.

Generation metrics score answer text. ``squad_em``/``squad_f1`` are SQuAD's: answers lower-cased, punctuation and
the articles a/an/the dropped, whitespace collapsed; each prediction takes its best score over the reference's gold
answers (a reference is one answer or a list of them); a reference with no gold answer (SQuAD v2's unanswerable
questions) is matched only by an empty prediction or ``NO_ANSWER``. ``math_exact`` compares the final answers of
MATH solutions: the last ``\\boxed{...}`` of each (the whole text when there is none), with spaces, ``$``,
``\\left``/``\\right`` and a trailing period dropped.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

CLASSIFICATION_METRICS = ("accuracy", "f1", "macro_f1")
REGRESSION_METRICS = ("pearson", "spearman")
GENERATION_METRICS = ("squad_em", "squad_f1", "math_exact")
METRICS = CLASSIFICATION_METRICS + REGRESSION_METRICS + GENERATION_METRICS
NO_ANSWER = "unanswerable"  # the target text of a SQuAD v2 question whose context holds no answer


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


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation; the no-answer word normalises to the empty answer."""
    text = " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())
    return "" if text == NO_ANSWER else text


def _golds(ref: str | Sequence[str]) -> list[str]:
    golds = [normalize_answer(g) for g in ([ref] if isinstance(ref, str) else ref)]
    return [g for g in golds if g] or [""]


def _token_f1(pred: str, gold: str) -> float:
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred.split()) & Counter(gold.split())).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred.split()), common / len(gold.split())
    return 2 * precision * recall / (precision + recall)


def squad_em(preds: Sequence[str], refs: Sequence[str | Sequence[str]]) -> float:
    return float(np.mean([max(float(normalize_answer(p) == g) for g in _golds(r)) for p, r in zip(preds, refs)]))


def squad_f1(preds: Sequence[str], refs: Sequence[str | Sequence[str]]) -> float:
    return float(np.mean([max(_token_f1(normalize_answer(p), g) for g in _golds(r)) for p, r in zip(preds, refs)]))


def boxed_answer(text: str) -> str:
    """The content of the last ``\\boxed{...}`` (braces balanced), or the text itself when there is none."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return text
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return text[i + 1 :]


def _math_normal(text: str) -> str:
    answer = boxed_answer(text)
    for junk in ("\\left", "\\right", "$", " "):
        answer = answer.replace(junk, "")
    return answer.rstrip(".")


def math_exact(preds: Sequence[str], refs: Sequence[str]) -> float:
    return float(np.mean([_math_normal(p) == _math_normal(r) for p, r in zip(preds, refs)]))


_FUNCTIONS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "macro_f1": macro_f1,
    "pearson": pearson,
    "spearman": spearman,
    "squad_em": squad_em,
    "squad_f1": squad_f1,
    "math_exact": math_exact,
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
