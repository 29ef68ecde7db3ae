"""The paper's significance test for few-shot transfer: a paired t-test (inits compared on the same seeds) with a
Bonferroni correction, and the exact sign test where the differences do not spread. Written out here (Student's t
through the regularized incomplete beta function) rather than adding scipy for a few functions."""

from __future__ import annotations

import math
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field


class PairedTest(BaseModel):
    """A paired comparison of a against b: Student's t when the differences spread, else the exact sign test (a gain
    that is the same on every pair has an infinite t and a t-test p of 0, which says nothing about its size)."""

    model_config = ConfigDict(frozen=True)

    n: int = Field(description="pairs compared")
    mean_gain: float = Field(description="mean of a - b (NaN without pairs)")
    t: float = Field(description="Student's t (+-inf without spread, NaN under 2 pairs or without any gain)")
    p: float = Field(description="two-sided p: the t-test's, or the sign test's without spread (NaN under 2 pairs)")
    spread: bool = Field(description="False when every difference is the same, up to rounding")

    @property
    def method(self) -> str:
        return "paired t-test" if self.spread else "sign test (no spread)"

    @property
    def least_p(self) -> float:
        """The least p this design allows: a t-test can reach any p from 2 pairs on; a sign test no less than
        2^(1 - n); no test under 2 pairs."""
        if self.n < 2:
            return math.nan
        return 0.0 if self.spread else sign_test_p(self.n, self.n)


def paired_test(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """Compare paired samples: t-test over the differences, or the sign test when they do not spread."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    if n < 2:
        return PairedTest(n=n, mean_gain=diffs[0] if diffs else math.nan, t=math.nan, p=math.nan, spread=True)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    # Equal gains differ by the rounding of a - b, about 1e-16 of the values, not 0: that spread would make t
    # astronomically large rather than infinite. Below 1e-12 of the values' size the spread is no spread.
    scale = max(abs(x) for x in (*a, *b))
    if math.sqrt(var) <= 1e-12 * scale:
        if abs(mean) <= 1e-12 * scale:  # every pair tied: no gain, no test can favour either side
            return PairedTest(n=n, mean_gain=0.0, t=math.nan, p=1.0, spread=False)
        return PairedTest(n=n, mean_gain=mean, t=math.copysign(math.inf, mean), p=sign_test_p(n, n), spread=False)
    t = mean / math.sqrt(var / n)
    return PairedTest(n=n, mean_gain=mean, t=t, p=student_t_two_sided_p(t, n - 1), spread=True)


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(t, two-sided p) of `paired_test`: NaN under 2 pairs; without spread t is +-inf and p the sign test's."""
    test = paired_test(a, b)
    return test.t, test.p


def sign_test_p(wins: int, n: int) -> float:
    """Two-sided exact sign test: P(a split of n fair coin flips at least as uneven as wins : n - wins)."""
    tail = min(wins, n - wins)
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(tail + 1)) / 2 ** n)


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
