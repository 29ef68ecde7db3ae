"""The multi-task addition experiment (the paper's third claim) as library functions; Ray drives them in
`tune_jobs.addition`.

For a combination of tasks T and one origin O_s (the origin the vectors were trained from, seed s):

- single-task prompts O_s + tau_t, one per member task t;
- combined prompts O_s + c * sum_t w_t tau_t: with all w_t = 1 and c chosen on the members' validation splits over
  the paper's grid (0..1 in steps of 0.05), or with per-task weights from a search (`tune_jobs.addition`);
- every member task's test metric under both, and the retention combined / single.

Vectors are named by the task-term rule of `tpv.compose` (one vector per task and origin seed, optionally of one
`source`), so the single and the combined prompts read exactly the same vectors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, Field

from tpv.backbone import Backbone
from tpv.compose import Composer, CompositionSpec
from tpv.evaluate import evaluate_many
from tpv.prompt import make_origin
from tpv.store import VectorStore
from tpv.tasks import Example, get_task, load_split

LabelRelation = Literal["same", "overlapping", "disjoint", "regression"]
#: a candidate combination: per-task weights and the coefficient on their weighted sum
Candidate = tuple[Sequence[float], float]


def coefficient_grid(step: float = 0.05) -> list[float]:
    """The paper's grid for the coefficient c: 0, step, ..., 1."""
    n = int(round(1.0 / step))
    return [round(i * step, 10) for i in range(n + 1)]


def label_relation(tasks: Sequence[str]) -> LabelRelation:
    """How the members' label sets relate: the paper's addition keeps performance only when they are compatible."""
    sets = [get_task(t).labels for t in tasks]
    if any(not labels for labels in sets):
        return "regression"
    if all(set(s) == set(sets[0]) for s in sets):
        return "same"
    common = set.intersection(*map(set, sets))
    return "overlapping" if common else "disjoint"


class MemberScore(BaseModel):
    """One member task of a combination: its metric alone and in the combination."""

    task: str
    metric: str
    single: float = Field(description="test metric of O_s + tau_t")
    combined: float = Field(description="test metric of the combined prompt")

    @property
    def retention(self) -> float:
        """combined / single (the paper's 'keeps x% of single-task performance'); NaN when single is 0."""
        return self.combined / self.single if self.single else math.nan


class AdditionResult(BaseModel):
    """A combination on one origin: the chosen coefficient (and weights), the validation grid, the members."""

    tasks: list[str]
    origin_seed: int
    weights: list[float]
    coefficient: float
    labels: LabelRelation
    grid: list[dict[str, float]] = Field(default_factory=list, description="c -> mean validation metric")
    members: list[MemberScore]

    @property
    def mean_retention(self) -> float:
        values = [m.retention for m in self.members if not math.isnan(m.retention)]
        return sum(values) / len(values) if values else math.nan


class Combination:
    """Scores prompts made of a fixed set of task vectors on one origin (compositions cached by the Composer, each
    split read once, every candidate prompt in one `evaluate_many`)."""

    def __init__(self, backbone: Backbone, store: VectorStore, tasks: Sequence[str], origin_seed: int,
                 source: str | None = None, prompt_length: int | None = None):
        from tpv.compose import task_vectors

        self.backbone, self.store, self.tasks, self.origin_seed = backbone, store, list(tasks), origin_seed
        self.source = source
        metas = [task_vectors(store, backbone.backbone_id, t, prompt_length, [origin_seed], source)[0] for t in tasks]
        self.prompt_length = metas[0].prompt_length
        self.composer = Composer(store, lambda length, seed: make_origin(backbone, length, seed))
        self._splits: dict[tuple[str, str, int | None], list[Example]] = {}

    def spec(self, weights: Sequence[float], coefficient: float) -> CompositionSpec:
        narrow = {"seeds": [self.origin_seed], **({"source": self.source} if self.source else {})}
        return CompositionSpec(
            backbone_id=self.backbone.backbone_id, origin_seed=self.origin_seed, prompt_length=self.prompt_length,
            terms=[{"task": t, "weight": float(w), **narrow} for t, w in zip(self.tasks, weights)],
            method="weighted", coefficient=float(coefficient),
        )

    def examples(self, task: str, split: str, limit: int | None) -> list[Example]:
        """A member's split, read once per combination."""
        key = (task, split, limit)
        if key not in self._splits:
            self._splits[key] = load_split(task, split, limit=limit, seed=0)
        return self._splits[key]

    def metrics_many(self, candidates: Sequence[Candidate], task: str, split: str,
                     limit: int | None) -> list[dict[str, float]]:
        """All metrics of each candidate's composed prompt on one member task's split, many prompts per pass."""
        prompts = [self.composer.compose(self.spec(w, c)).to(self.backbone.device) for w, c in candidates]
        examples = self.examples(task, split, limit)
        return evaluate_many(self.backbone, prompts, [get_task(task)] * len(prompts), [examples] * len(prompts))

    def metrics(self, weights: Sequence[float], coefficient: float, task: str, split: str,
                limit: int | None) -> dict[str, float]:
        """All metrics of the composed prompt on one member task's split."""
        return self.metrics_many([(weights, coefficient)], task, split, limit)[0]

    def score_many(self, candidates: Sequence[Candidate], split: str, limit: int | None) -> list[dict[str, float]]:
        """Per candidate: the members' metric on `split`, plus their mean ('mean') and mean gold-label
        log-probability."""
        per_task = {task: self.metrics_many(candidates, task, split, limit) for task in self.tasks}
        out = []
        for i in range(len(candidates)):
            row = {task: per_task[task][i][get_task(task).metric] for task in self.tasks}
            row["mean"] = sum(row[t] for t in self.tasks) / len(self.tasks)
            row["label_logprob"] = sum(per_task[t][i].get("label_logprob", 0.0) for t in self.tasks) / len(self.tasks)
            out.append(row)
        return out

    def score(self, weights: Sequence[float], coefficient: float, split: str, limit: int | None) -> dict[str, float]:
        """The members' metric on `split`, plus their mean ('mean') and mean gold-label log-probability."""
        return self.score_many([(weights, coefficient)], split, limit)[0]

    def single(self, task: str, split: str, limit: int | None) -> float:
        """One member alone: O_s + tau_t."""
        weights = [1.0 if t == task else 0.0 for t in self.tasks]
        return self.metrics(weights, 1.0, task, split, limit)[get_task(task).metric]


def choose_coefficient(grid_scores: Sequence[dict[str, float]]) -> dict[str, float]:
    """The grid row with the best mean validation metric; ties go to the better label log-probability, then to
    the smaller coefficient (the least change to the origin)."""
    return max(grid_scores, key=lambda r: (r["mean"], r["label_logprob"], -r["coefficient"]))


def run_addition(
    backbone: Backbone, store: VectorStore, tasks: Sequence[str], origin_seed: int, *, source: str | None = None,
    grid: Sequence[float] | None = None, weights: Sequence[float] | None = None, eval_examples: int | None = 200,
    test_examples: int | None = 200,
) -> AdditionResult:
    """The paper's addition on one origin: with `weights=None`, c on `grid` (default the paper's) with all w = 1;
    with `weights`, that fixed weighting at c = 1. Returns every member's single and combined test metric."""
    combo = Combination(backbone, store, tasks, origin_seed, source)
    if weights is None:
        ones = [1.0] * len(tasks)
        coefficients = grid if grid is not None else coefficient_grid()
        scores = combo.score_many([(ones, c) for c in coefficients], "validation", eval_examples)  # one pack
        rows = [{"coefficient": c, **score} for c, score in zip(coefficients, scores)]
        best = choose_coefficient(rows)
        chosen_weights, coefficient = ones, best["coefficient"]
    else:
        rows, chosen_weights, coefficient = [], [float(w) for w in weights], 1.0
    members = [
        MemberScore(task=t, metric=get_task(t).metric, single=combo.single(t, "test", test_examples),
                    combined=combo.metrics(chosen_weights, coefficient, t, "test", test_examples)[get_task(t).metric])
        for t in tasks
    ]
    return AdditionResult(tasks=list(tasks), origin_seed=origin_seed, weights=chosen_weights, coefficient=coefficient,
                          labels=label_relation(tasks), grid=rows, members=members)
