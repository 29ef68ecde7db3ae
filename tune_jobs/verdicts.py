"""The one place a job's verdict on the paper's claims comes from (demo, study, report, reproduce).

A claim HOLDS only when its direction holds AND its test is significant at alpha; "consistent, not significant" when
the direction holds without that; DOES NOT HOLD otherwise. A line also says when the design itself cannot reach
alpha (its least possible p is above it), so a reader never takes a verdict on too few vectors or origins for
evidence.

- Claim 1, the task dominates the origin: same-task flat cosine above both different-task and same-origin pairs;
  the test is the task-label permutation test (`tpv.vectors.same_task_permutation_test`).
- Claim 2, the TPV init beats a random origin zero-shot: over several target origins, paired by origin
  (`tune_jobs.stats.paired_test`: a t-test, the sign test without spread), strict: a tie is not a win.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tpv.vectors import PermutationTest
from tune_jobs.stats import PairedTest

ALPHA = 0.05
VerdictName = Literal["holds", "consistent, not significant", "does not hold"]


class ClaimVerdict(BaseModel):
    """One claim judged: the verdict, its evidence, and the sentence a job prints."""

    model_config = ConfigDict(frozen=True)

    claim: str = Field(description="what is claimed, as printed")
    verdict: VerdictName
    p: float = Field(description="the test's p (NaN: no test possible)")
    least_p: float = Field(description="the least p this design allows (NaN: no test possible)")
    alpha: float
    figures: str = Field(description="the figures that decide it, as printed")

    @property
    def reachable(self) -> bool:
        """Can this design reach alpha at all?"""
        return not math.isnan(self.least_p) and self.least_p <= self.alpha

    @property
    def line(self) -> str:
        level = {"holds": "significant at", "consistent, not significant": "not significant at",
                 "does not hold": "at"}[self.verdict]
        floor = ("" if self.reachable else
                 "; no test is possible on this design" if math.isnan(self.least_p) else
                 f"; it cannot reach alpha here: the least possible p is {self.least_p:.3g}")
        return f"{self.verdict.upper()}: {self.claim} ({self.figures}; {level} alpha {self.alpha:g}{floor})"


def judge(direction: bool, p: float, alpha: float = ALPHA) -> VerdictName:
    """HOLDS needs both the direction and p <= alpha; a NaN p is never significant."""
    if not direction:
        return "does not hold"
    return "holds" if p <= alpha else "consistent, not significant"


def claim1(same_task: float, diff_task: float, same_origin: float, test: PermutationTest | None,
           alpha: float = ALPHA) -> ClaimVerdict:
    """The task dominates the origin: same-task pairs above both others, beyond chance by the permutation test."""
    p, least = (test.p, test.smallest_p) if test is not None else (math.nan, math.nan)
    figures = (f"flat cosine: same task {same_task:.3f} vs different task {diff_task:.3f} vs same origin "
               f"{same_origin:.3f}; task-label permutation p {p:.3g}, the least these vectors allow {least:.3g}")
    return ClaimVerdict(claim="the task dominates the origin", p=p, least_p=least, alpha=alpha, figures=figures,
                        verdict=judge(same_task > max(diff_task, same_origin), p, alpha))


def claim2(test: PairedTest, random_mean: float, target: str, alpha: float = ALPHA) -> ClaimVerdict:
    """The TPV init beats a random origin zero-shot on a target: `test` pairs TPV against the random origin over
    target origins (`tune_jobs.stats.paired_test(tpv, random)`); a tie is no win."""
    n = test.n
    figures = (f"mean over {n} target origin{'s' if n != 1 else ''} {random_mean + test.mean_gain:.3f} vs "
               f"{random_mean:.3f}, gain {test.mean_gain:+.3f}; {test.method} p {test.p:.3g}")
    return ClaimVerdict(claim=f"the TPV init beats a random origin zero-shot on {target}", p=test.p,
                        least_p=test.least_p, alpha=alpha, figures=figures,
                        verdict=judge(test.mean_gain > 0, test.p, alpha))
