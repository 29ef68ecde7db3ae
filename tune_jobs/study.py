"""`tpv study`: which training recipe gives task prompt vectors the paper's properties on a backbone.

Every recipe (TrainConfig fields over a preset: lr, schedule, warmup, prompt length, loss, ...) trains every source
task from every origin seed, as one Ray Tune grid. Each run also stores its prompt as it is at each of `steps`
(`TrialSpec.snapshot_steps`), so training length is a dimension of the study at no extra cost. Then one scoring
trial per (recipe, steps) measures, on the vectors of exactly that recipe and length:

- `val`: the mean single-task validation metric;
- `same_task`, `diff_task`, `same_origin`: mean flat cosine of pairs of one task from different origins, of
  different tasks from different origins, of different tasks from one origin; `gap` = same_task - max(diff_task,
  same_origin), positive when the task dominates the origin (the paper's first claim); `same_task_p`, how often
  task labels shuffled within each origin reach the same-task mean (`tpv.vectors.same_task_permutation_test`:
  is the gap beyond chance on these few vectors?);
- `mean_row_share`: the mean share of |tau|^2 in the vector's mean row (`tpv.vectors.mean_row_share`), the part
  that one task's vectors from different origins agree on most (docs/RESULTS.md §1);
- `tpv_zero_shot` vs `random_zero_shot`: a held-out target's validation metric from O + sum of the sources' vectors
  vs from the bare origin O, on origins no source was trained from (the second claim, zero-shot);
- `retention`: the addition of all source tasks (c on validation), mean combined / single test metric (the third).

The table ranks (recipe, steps) by: shows both the first and second claim in direction (strictly), then gap, then
the zero-shot gain, then the validation metric; the winner's verdict lines say whether each claim is significant
(`tune_jobs.verdicts`). `selection.json` records the data ranked on (`tune_jobs.selections.Selection`): adopt the
winner as a preset (`tpv.train.PRESETS`) and register that record in `tune_jobs.selections.SELECTIONS`, so jobs
refuse or flag this data.

    tpv study --tasks rotten_tomatoes trec --seeds 0 1 --target imdb --steps 30 60 120 \\
        --grid lr=0.3,0.03,0.003 loss=lm,label
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tpv.backbone import BackboneConfig
from tpv.bundled import DEFAULT_BACKBONE
from tpv.names import Name
from tpv.paths import atomic_write
from tpv.tasks import require_data
from tpv.train import PRESETS, PresetName, TrainConfig, snapshot_source
from tpv.vectors import PermutationTest
from tune_jobs.config import (
    JobConfig,
    JobConfigError,
    add_resource_args,
    config_from_args,
    deep_merge,
    parse_overrides,
    start_ray,
)
from tune_jobs.grid import TrialsFailed, plan_packs, run_grid, short_hash, specs_space
from tune_jobs.locations import add_location_args
from tune_jobs.runtime import init_ray, load_backbone, set_threads
from tune_jobs.tables import csv_text, markdown_table, print_result
from tune_jobs.selections import Selection
from tune_jobs.stats import PairedTest, paired_test
from tune_jobs.trial import TrialSpec
from tune_jobs.verdicts import ALPHA, ClaimVerdict, claim1, claim2


class StudyConfig(JobConfig):
    """A recipe study; loadable from YAML, flags override."""

    name: Name = "study"
    tasks: list[str] = Field(min_length=2, description="source tasks")
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=2, description="origin seeds")
    target: str = Field(description="held-out target of the zero-shot test (never one of the tasks)")
    target_sources: list[str] | None = Field(None, description="the tasks whose vectors are summed for the target "
                                             "(default: all tasks)")
    target_seeds: list[int] = Field(default_factory=lambda: [100], min_length=1,
                                    description="origins of the zero-shot test (none of the training seeds)")
    backbone: str = DEFAULT_BACKBONE
    preset: PresetName = Field("causal_cpu", description="the recipe every study recipe overrides")
    train: dict[str, Any] = Field(default_factory=dict, description="TrainConfig fields over the preset, shared by "
                                  "every recipe (a recipe's own fields win)")
    recipes: dict[str, dict[str, Any]] = Field(default_factory=dict, description="name -> TrainConfig fields")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="TrainConfig field -> values; every "
                                       "combination is a recipe (besides `recipes`)")
    steps: list[int] = Field(default_factory=lambda: [30, 60], min_length=1,
                             description="training lengths scored (snapshots of one run per recipe)")
    eval_examples: int = Field(64, ge=1, description="validation examples of each score")
    test_examples: int = Field(64, ge=1, description="test examples of the addition's retention")
    addition_step: float = Field(0.25, gt=0, le=1, description="coefficient grid step of the addition score")

    @field_validator("steps")
    @classmethod
    def _sorted(cls, steps: list[int]) -> list[int]:
        if min(steps) < 1:
            raise ValueError("steps must be >= 1")
        return sorted(set(steps))

    def all_recipes(self) -> dict[str, dict[str, Any]]:
        """The explicit recipes plus one per combination of the grid, named by their values."""
        out = dict(self.recipes)
        keys = list(self.grid)
        for values in itertools.product(*(self.grid[k] for k in keys)) if keys else ():
            out[",".join(f"{k}={v}" for k, v in zip(keys, values))] = dict(zip(keys, values))
        if not out:
            raise JobConfigError("a study needs recipes or a grid (e.g. --grid lr=0.3,0.03)")
        return out

    def train_config(self, overrides: dict[str, Any], task: str, seed: int) -> TrainConfig:
        """One run of a recipe: as long as the longest scored length, evaluated at every scored length."""
        every = math.gcd(*self.steps)
        data = deep_merge(deep_merge(self.train, overrides), {"seed": seed, "max_steps": max(self.steps), "eval_every": every,
                                      "progress": False, "backbone": {"model": self.backbone}})
        return TrainConfig.preset(self.preset, task, **data)


class ScoreSpec(BaseModel):
    """What one scoring trial measures: the vectors of one recipe at one length."""

    model_config = ConfigDict(extra="forbid")

    recipe: str
    steps: int
    source: str = Field(description="VectorMeta.source of the vectors scored")
    tasks: list[str]
    seeds: list[int]
    target: str
    target_sources: list[str]
    target_seeds: list[int]
    store: str
    backbone: BackboneConfig
    eval_examples: int
    test_examples: int
    addition_step: float
    cpus: float = 1.0


def score_vectors(spec: ScoreSpec) -> dict[str, float]:
    """The study's measures for one (recipe, steps) (see the module doc)."""
    from tpv.addition import coefficient_grid, run_addition
    from tpv.compose import Composer, CompositionSpec, task_vectors
    from tpv.evaluate import evaluate
    from tpv.prompt import make_origin
    from tpv.store import VectorStore
    from tpv.tasks import get_task, load_split
    from tpv.vectors import mean_row_share, same_task_permutation_test, similarity_by_pair_kind, similarity_matrix

    set_threads(spec.cpus)
    backbone = load_backbone(spec.backbone)
    store = VectorStore(spec.store)
    bb = backbone.backbone_id
    metas = [m for t in spec.tasks for m in task_vectors(store, bb, t, None, spec.seeds, spec.source)]
    vectors = [store.get(m.vector_id, bb) for m in metas]
    flat = similarity_matrix(vectors, "flat")[1]
    groups = similarity_by_pair_kind(metas, flat)
    out = {kind: sum(v) / len(v) for kind, v in groups.items() if v}
    out["gap"] = out["same_task"] - max(out.get("diff_task", -1.0), out.get("same_origin", -1.0))
    permutation = same_task_permutation_test(metas, flat)
    out |= {"same_task_p": permutation.p, "same_task_p_least": permutation.smallest_p,
            "same_task_arrangements": permutation.arrangements, "same_task_exact": float(permutation.exact)}
    out["val"] = sum(m.metrics[get_task(m.task).metric] for m in metas) / len(metas)
    length = metas[0].prompt_length
    out["tau_norm"] = sum(float(v.tensor.norm()) for v in vectors) / len(vectors)
    out["origin_norm"] = float(make_origin(backbone, length, spec.seeds[0]).norm())
    out["mean_row_share"] = sum(mean_row_share(v) for v in vectors) / len(vectors)

    target = get_task(spec.target)
    dev = load_split(spec.target, "validation", limit=spec.eval_examples, seed=0)
    composer = Composer(store, lambda n, s: make_origin(backbone, n, s))
    tpv, random = [], []
    for seed in spec.target_seeds:
        summed = CompositionSpec(backbone_id=bb, origin_seed=seed, prompt_length=length, method="weighted",
                                 terms=[{"task": t, "seeds": spec.seeds, "source": spec.source}
                                        for t in spec.target_sources])
        tpv.append(evaluate(backbone, composer.compose(summed).to(backbone.device), target, dev)[target.metric])
        origin = make_origin(backbone, length, seed).to(backbone.device)
        random.append(evaluate(backbone, origin, target, dev)[target.metric])
    out["tpv_zero_shot"] = sum(tpv) / len(tpv)
    out["random_zero_shot"] = sum(random) / len(random)
    zero_shot = paired_test(tpv, random)
    out |= {"zero_shot_gain": zero_shot.mean_gain, "zero_shot_t": zero_shot.t, "zero_shot_p": zero_shot.p,
            "zero_shot_spread": float(zero_shot.spread), "zero_shot_n": zero_shot.n}
    added = run_addition(backbone, store, spec.tasks, spec.seeds[0], source=spec.source,
                         grid=coefficient_grid(spec.addition_step), eval_examples=spec.eval_examples,
                         test_examples=spec.test_examples)
    out["retention"] = added.mean_retention
    out["addition_c"] = added.coefficient
    return out


def score_trial(config: dict[str, Any]) -> None:
    """Tune trainable: `config = {"spec": ScoreSpec}`."""
    from ray import tune

    spec = ScoreSpec.model_validate(config["spec"])
    started = time.perf_counter()
    scores = score_vectors(spec)
    tune.report({"done": 1.0, "seconds": time.perf_counter() - started, **scores})


def _score_label(trial) -> str:
    spec = trial.config.get("spec", {})
    return f"{spec.get('recipe')}@{spec.get('steps')}".replace("/", "-")


def claims(row: dict[str, Any], config: StudyConfig, alpha: float = ALPHA) -> list[ClaimVerdict]:
    """The first two claims on one scored (recipe, steps), judged as every job judges them (`tune_jobs.verdicts`)."""
    permutation = PermutationTest(p=row["same_task_p"], arrangements=int(row["same_task_arrangements"]),
                                  exact=bool(row["same_task_exact"]), smallest_p=row["same_task_p_least"])
    zero_shot = PairedTest(n=int(row["zero_shot_n"]), mean_gain=row["zero_shot_gain"], t=row["zero_shot_t"],
                           p=row["zero_shot_p"], spread=bool(row["zero_shot_spread"]))
    return [claim1(row["same_task"], row["diff_task"], row["same_origin"], permutation, alpha),
            claim2(zero_shot, row["random_zero_shot"], config.target, alpha)]


def rank_key(row: dict[str, Any]) -> tuple:
    """Shows the first two claims in direction, strictly (task dominates origin, TPV zero-shot above random), then
    gap, gain, val. Significance is the verdicts' business: on a study's few vectors it is rarely reachable, and the
    ranking must still order recipes."""
    shows = row["gap"] > 0 and row["zero_shot_gain"] > 0
    return (shows, round(row["gap"], 3), round(row["zero_shot_gain"], 3), row["val"])


def run_study(config: StudyConfig) -> dict[str, Any]:
    from ray import tune

    if config.target in config.tasks:
        raise JobConfigError(f"the target {config.target!r} must be held out: it is one of the source tasks")
    if not set(config.target_sources or config.tasks) <= set(config.tasks):
        raise JobConfigError(f"target_sources {config.target_sources} must be among the tasks {config.tasks}")
    if set(config.target_seeds) & set(config.seeds):
        raise JobConfigError("target_seeds must differ from the training seeds (the zero-shot test uses origins "
                             "no source vector was trained from)")
    loc = config.locations.resolved()
    recipes = config.all_recipes()
    key = short_hash(config.model_dump(mode="json", exclude=set(config.RUN_ONLY)))
    tags = {name: f"tpv study {config.name}-{key}/{name}" for name in recipes}
    specs = [
        TrialSpec(label=f"{name}/{task}/s{seed}", train=config.train_config(overrides, task, seed),
                  output_store=loc.store, source_tag=tags[name], snapshot_steps=config.steps,
                  cpus=config.resources.cpus_per_trial)
        for name, overrides in recipes.items() for task in config.tasks for seed in config.seeds
    ]
    run = dict(config.grid_args(), reuse_finished=True)
    require_data([*config.tasks, config.target])
    init_ray()
    print(f"[study] {len(recipes)} recipe(s) x {len(config.tasks)} tasks x {len(config.seeds)} origins = "
          f"{len(specs)} runs of {max(config.steps)} steps, scored at {config.steps}", flush=True)
    trained = run_grid(specs_space(specs, *plan_packs(config.resources, specs)),
                       experiment=f"{config.name}-{key}-train", job="study train", **run)
    failed = [o.error for o in trained if o.error]
    if failed:
        raise TrialsFailed(f"{len(failed)} study run(s) failed ({failed[0]}); run the same command again to "
                           "resume them")
    first = specs[0].train
    scores = [
        ScoreSpec(recipe=name, steps=steps, source=snapshot_source(tags[name], steps), tasks=config.tasks,
                  seeds=config.seeds, target=config.target, target_sources=config.target_sources or config.tasks,
                  target_seeds=config.target_seeds, store=loc.store,
                  backbone=first.backbone, eval_examples=config.eval_examples, test_examples=config.test_examples,
                  addition_step=config.addition_step, cpus=config.resources.cpus_per_trial)
        for name in recipes for steps in config.steps
    ]
    scored = run_grid({"spec": tune.grid_search([s.model_dump(mode="json") for s in scores])},
                      experiment=f"{config.name}-{key}-score", job="study score", trainable=score_trial,
                      name=_score_label, **run)
    rows = []
    for o in scored:
        if o.error:
            failed.append(o.error)
            continue
        spec = ScoreSpec.model_validate(o.config["spec"])
        rows.append({"recipe": spec.recipe, "steps": spec.steps,
                     **{k: o.metrics.get(k) for k in [*SCORE_COLUMNS, *TEST_FIELDS]}})
    rows.sort(key=rank_key, reverse=True)
    return summarize(config, rows, failed, Path(loc.out_dir) / config.name)


SCORE_COLUMNS = ["val", "same_task", "diff_task", "same_origin", "gap", "same_task_p", "tpv_zero_shot",
                 "random_zero_shot", "zero_shot_gain", "zero_shot_p", "retention", "addition_c", "tau_norm",
                 "origin_norm", "mean_row_share"]
TEST_FIELDS = ["same_task_p_least", "same_task_arrangements", "same_task_exact", "zero_shot_t", "zero_shot_spread",
               "zero_shot_n"]
"""What the verdicts need beyond the table's columns (kept in the rows, not printed)."""


def selection_of(config: StudyConfig) -> Selection:
    """What this study ranks recipes on: a recipe it chooses is tuned to this data (`tune_jobs.selections`)."""
    return Selection(name=config.name, backbone=config.backbone, tasks=config.tasks, seeds=config.seeds,
                     target=config.target, target_sources=config.target_sources or config.tasks,
                     target_seeds=config.target_seeds)


def summarize(config: StudyConfig, rows: list[dict[str, Any]], failed: list[str], out: Path) -> dict[str, Any]:
    columns = ["recipe", "steps", *SCORE_COLUMNS]
    best = rows[0] if rows else None
    if best is None:
        verdict = ["no recipe scored"]
    else:
        verdict = [f"winner: `{best['recipe']}` at {best['steps']} steps "
                   + ("(task dominates origin and TPV zero-shot above random origin, in direction)" if rank_key(best)[0]
                      else "(NO recipe shows both claims at this budget: the best by gap is shown)"),
                   *(f"- {c.line}" for c in claims(best, config))]
    selection = selection_of(config)
    md = "\n".join([
        f"# Recipe study `{config.name}` ({config.backbone}, preset {config.preset})", "",
        f"sources {config.tasks} x origins {config.seeds}; held-out target `{config.target}` on origins "
        f"{config.target_seeds}; {config.eval_examples} validation / {config.test_examples} test examples per score; "
        "cosines are flat (the paper's measure).", "", *verdict, "",
        "A recipe chosen here is tuned to these tasks, origins and target (selection.json): measure it on others.", "",
        markdown_table(rows, columns), "",
        *([f"{len(failed)} scoring trial(s) failed: {failed[:3]}", ""] if failed else []),
    ])
    paths = {"markdown": str(atomic_write(out / "study.md", md)),
             "csv": str(atomic_write(out / "study.csv", csv_text(rows, columns))),
             "selection": str(atomic_write(out / "selection.json", selection.model_dump_json(indent=2)))}
    return {"rows": rows, "best": best, "markdown": md, "paths": paths, "failed": len(failed),
            "selection": selection}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tpv study",
        description="Find the training recipe under which task prompt vectors have the paper's properties on a "
                    "backbone: every recipe trains every source task from every origin (Ray Tune), and each "
                    "(recipe, training length) is scored on validation metric, task-vs-origin cosine gap, "
                    "zero-shot TPV init vs random origin on a held-out target, and addition retention.",
        epilog="Examples:\n  tpv study --tasks rotten_tomatoes trec --target imdb --steps 30 60 120 "
               "--grid lr=0.3,0.03,0.003 loss=lm,label\n"
               "  tpv study --config study.yaml --backbone /models/my-llm --gpus-per-trial 0.25\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML file with StudyConfig fields (recipes, grid, ...); flags override it")
    p.add_argument("--name", help="study name (default study)")
    p.add_argument("--tasks", nargs="+", help="source tasks (at least 2)")
    p.add_argument("--seeds", nargs="+", type=int, help="origin seeds (at least 2; default 0 1)")
    p.add_argument("--target", help="held-out target task of the zero-shot test")
    p.add_argument("--target-sources", nargs="+", help="tasks whose vectors are summed for the target (default all)")
    p.add_argument("--target-seeds", nargs="+", type=int, help="origins of the zero-shot test (default 100)")
    p.add_argument("--backbone", help=f"bundled name or model folder (default {DEFAULT_BACKBONE})")
    p.add_argument("--preset", choices=list(PRESETS), help="the base recipe (default causal_cpu)")
    p.add_argument("--grid", nargs="+", metavar="FIELD=V1,V2", help="TrainConfig field and values; every "
                   "combination is a recipe, e.g. lr=0.3,0.03 loss=lm,label warmup_steps=0,50")
    p.add_argument("--steps", nargs="+", type=int, help="training lengths scored (default 30 60)")
    p.add_argument("--eval-examples", type=int, help="validation examples per score (default 64)")
    p.add_argument("--test-examples", type=int, help="test examples per score (default 64)")
    add_resource_args(p)
    p.add_argument("--fresh", action="store_true", help="do not resume an interrupted study")
    add_location_args(p)
    return p


def parse_grid(items: list[str] | None) -> dict[str, list[Any]]:
    """`lr=0.3,0.03 loss=lm,label` -> {"lr": [0.3, 0.03], "loss": ["lm", "label"]} (values parsed as YAML)."""
    grid: dict[str, list[Any]] = {}
    for item in items or []:
        if "=" not in item:
            raise JobConfigError(f"--grid expects FIELD=V1,V2, got {item!r}")
        key, values = item.split("=", 1)
        grid[key.strip()] = [parse_overrides([f"v={v}"])["v"] for v in values.split(",")]
    return grid


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(StudyConfig, args, ("name", "tasks", "seeds", "target", "target_sources", "target_seeds",
                                                  "backbone", "preset", "steps", "eval_examples", "test_examples"),
                              required=("tasks", "target"), grid=parse_grid(args.grid) if args.grid else None)
    start_ray(args)
    result = run_study(config)
    print_result(result)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
