"""The paper's significance test for few-shot transfer: a paired t-test (inits compared on the same seeds) with a
Bonferroni correction. Written out here (Student's t through the regularized incomplete beta function) rather than
adding scipy for one function."""

from __future__ import annotations

import math
from collections.abc import Sequence


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(t, two-sided p) of mean(a - b) != 0 over paired samples; NaN when there are under 2 pairs or no spread."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    if n < 2:
        return math.nan, math.nan
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    # Equal gains differ by the rounding of a - b, about 1e-16 of the values, not 0: that spread would make t
    # astronomically large rather than infinite. Below 1e-12 of the values' size the spread is no spread.
    scale = max(abs(x) for x in (*a, *b))
    if math.sqrt(var) <= 1e-12 * scale:
        return (math.nan, math.nan) if abs(mean) <= 1e-12 * scale else (math.copysign(math.inf, mean), 0.0)
    t = mean / math.sqrt(var / n)
    return t, student_t_two_sided_p(t, n - 1)


def student_t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom: I_{df/(df+t^2)}(df/2, 1/2)."""
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def bonferroni(p: float, comparisons: int) -> float:
    return min(1.0, p * comparisons) if not math.isnan(p) else p


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side only
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-14:
            break
    return math.exp(log_front) * f / a
