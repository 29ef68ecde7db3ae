"""What chose the recipes: the data every `tpv study` ranked recipes on, and the one check every job runs against it.

A recipe picked on some tasks, origins and target is tuned to them: a job that re-measures the paper's claims on
that data measures the selection, not the method. `tpv study` writes its `Selection` beside its table
(`selection.json`); `SELECTIONS` is the committed registry of the studies behind the shipped presets (docs/RESULTS.md
§1), so a job can check without the study's output folder. `held_out` is the check: the demo refuses data a
selection used, the other jobs flag it loudly. Tasks read from one source file (rotten_tomatoes and
rotten_tomatoes_5, trec and trec_fine) count as one: they share sentences.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence

from pydantic import BaseModel, ConfigDict, Field

from tune_jobs.config import JobConfigError


class Selection(BaseModel):
    """The data one recipe study ranked recipes on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="the study's --name")
    backbone: str
    tasks: list[str] = Field(description="the source tasks trained and scored")
    seeds: list[int] = Field(description="the origin seeds the sources were trained from")
    target: str = Field(description="the held-out target of the zero-shot score")
    target_sources: list[str]
    target_seeds: list[int] = Field(description="the origins of the zero-shot score")
    chose: list[str] = Field(default_factory=list, description="shipped presets this study's ranking chose")

    @property
    def data(self) -> list[str]:
        return [*self.tasks, self.target]

    @property
    def origins(self) -> list[int]:
        return [*self.seeds, *self.target_seeds]


def _study(name: str, chose: list[str], backbone: str = "smollm2-135m-instruct") -> Selection:
    """Every study of docs/RESULTS.md §1 ranked on the same data (only name, backbone and what it chose differ)."""
    return Selection(name=name, backbone=backbone, tasks=["rotten_tomatoes", "trec"], seeds=[0, 1], target="imdb",
                     target_sources=["rotten_tomatoes"], target_seeds=[100, 101], chose=chose)


SELECTIONS: tuple[Selection, ...] = (
    *(_study(name, ["causal_cpu", "causal"]) for name in
      ("recipes60", "recipes-lr", "recipes-shape", "recipes-eps", "recipes-batch", "recipes-l100")),
    *(_study(name, ["causal"]) for name in ("recipes-loss300", "recipes-lr03-300")),
    *(_study(name, [], "gemma3-270m") for name in ("recipes-gemma", "recipes-gemma-lr")),
)
"""The registry: the studies (docs/RESULTS.md §1 commands) whose rankings chose presets `causal_cpu` and `causal`."""


class SelectionOverlap(BaseModel):
    """What of a job's data some selection already used (empty lists: held out)."""

    model_config = ConfigDict(frozen=True)

    tasks: list[str] = Field(default_factory=list)
    origin_seeds: list[int] = Field(default_factory=list)
    target: list[str] = Field(default_factory=list)
    selections: list[str] = Field(default_factory=list, description="the studies that used them")

    @property
    def empty(self) -> bool:
        return not (self.tasks or self.origin_seeds or self.target)

    def describe(self) -> str:
        parts = [f"{what} {', '.join(map(str, items))}" for what, items in
                 (("tasks", self.tasks), ("origin seeds", self.origin_seeds), ("target", self.target)) if items]
        return f"{'; '.join(parts)} (used by recipe selection {', '.join(self.selections)})"


class SelectionDataError(JobConfigError):
    """A job meant to test the method on held-out data was given data a recipe selection used."""


def sources_of(task: str) -> set[str]:
    """The source files a task's sentences come from (its own name when the task is not a fetched one)."""
    from tpv.data_fetch import RECIPES

    recipe = RECIPES.get(task)
    return {f"{recipe.archive}:{member}" for member in recipe.members} if recipe else {task}


def selection_overlap(tasks: Iterable[str] = (), origin_seeds: Iterable[int] = (), target: str | None = None,
                      selections: Sequence[Selection] = SELECTIONS) -> SelectionOverlap:
    """Which of these tasks (sharing a source file counts), origin seeds and target some selection used."""
    tasks, seeds = list(dict.fromkeys(tasks)), list(dict.fromkeys(origin_seeds))
    hit_tasks, hit_seeds, hit_target, names = [], [], [], []
    for s in selections:
        used = set().union(*(sources_of(t) for t in s.data))
        t_hits = [t for t in tasks if sources_of(t) & used]
        o_hits = [o for o in seeds if o in s.origins]
        g_hits = [target] if target is not None and sources_of(target) & used else []
        if t_hits or o_hits or g_hits:
            names.append(s.name)
            hit_tasks += [t for t in t_hits if t not in hit_tasks]
            hit_seeds += [o for o in o_hits if o not in hit_seeds]
            hit_target += [g for g in g_hits if g not in hit_target]
    return SelectionOverlap(tasks=hit_tasks, origin_seeds=hit_seeds, target=hit_target, selections=names)


def held_out(job: str, tasks: Iterable[str] = (), origin_seeds: Iterable[int] = (), target: str | None = None,
             refuse: bool = False, selections: Sequence[Selection] = SELECTIONS) -> SelectionOverlap:
    """The jobs' one check: refuse (SelectionDataError) or flag on stderr data a recipe selection used."""
    overlap = selection_overlap(tasks, origin_seeds, target, selections)
    if not overlap.empty:
        text = (f"{job}: {overlap.describe()}: the recipe was chosen on this data, so results on it measure the "
                "selection, not held-out performance")
        if refuse:
            raise SelectionDataError(text)
        print(f"WARNING {text}", file=sys.stderr, flush=True)
    return overlap
