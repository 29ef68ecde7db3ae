import math

import numpy as np
import pytest

from tpv.metrics import CLASSIFICATION_METRICS, REGRESSION_METRICS, compute_metric


def test_accuracy_on_indices_and_strings():
    assert compute_metric("accuracy", [0, 1, 1, 2], [0, 1, 2, 2]) == 0.75
    assert compute_metric("accuracy", ["yes", "no"], ["yes", "yes"]) == 0.5


def test_binary_f1_scores_class_one():
    # tp=2 (idx 0,1), fp=1 (idx 2), fn=1 (idx 3): f1 = 4 / (4 + 1 + 1)
    preds = [1, 1, 1, 0, 0]
    refs = [1, 1, 0, 1, 0]
    assert compute_metric("f1", preds, refs) == pytest.approx(4 / 6)
    # the other class: tp=1, fp=1, fn=1
    assert compute_metric("f1", preds, refs, pos_label=0) == pytest.approx(0.5)
    assert compute_metric("f1", [0, 0], [0, 0]) == 0.0  # no positives anywhere


def test_macro_f1_averages_classes_in_preds_or_refs():
    preds = [0, 1, 2, 2]
    refs = [0, 1, 1, 2]
    # class 0: 1.0; class 1: tp=1, fn=1 -> 2/3; class 2: tp=1, fp=1 -> 2/3
    assert compute_metric("macro_f1", preds, refs) == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert compute_metric("macro_f1", [3, 3], [0, 0]) == 0.0  # class 3 only predicted, class 0 never hit


def test_pearson_matches_numpy():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=50), rng.normal(size=50)
    assert compute_metric("pearson", x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert compute_metric("pearson", [1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert compute_metric("pearson", [1, 2, 3], [5, 5, 5]) == 0.0  # constant side: no signal, not NaN


def test_spearman_is_rank_correlation_with_average_ties():
    assert compute_metric("spearman", [1, 2, 3, 4], [10, 100, 1000, 10000]) == pytest.approx(1.0)
    assert compute_metric("spearman", [1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties: ranks x = [1, 2.5, 2.5, 4], y = [1, 2, 3, 4]; pearson of those
    expected = np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1]
    assert compute_metric("spearman", [0.1, 0.5, 0.5, 0.9], [1, 2, 3, 4]) == pytest.approx(expected)


def test_all_label_and_number_metrics_are_finite_floats():
    for name in CLASSIFICATION_METRICS + REGRESSION_METRICS:  # the text metrics: tests/test_paper_metrics.py
        value = compute_metric(name, [0, 1, 1, 0], [0, 1, 0, 0])
        assert isinstance(value, float) and math.isfinite(value)


@pytest.mark.parametrize(
    "name, preds, refs, message",
    [
        ("bleu", [0], [0], "unknown metric"),
        ("accuracy", [0, 1], [0], "2 predictions for 1 references"),
        ("accuracy", [], [], "zero examples"),
    ],
)
def test_bad_calls(name, preds, refs, message):
    with pytest.raises(ValueError, match=message):
        compute_metric(name, preds, refs)
