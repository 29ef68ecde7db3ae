"""`tpv addition`: the paper's multi-task addition experiment with Ray Tune.

For pairs of source tasks and for all of them together, on every origin seed: O_s + c * sum(tau), c chosen on the
members' validation splits over the paper's grid (0..1, step 0.05), and optionally per-task weights searched by
Optuna through Ray Tune (mean member validation metric); each evaluated on every member task's test split against
that task's single-task prompt O_s + tau_t. Output: the paper's table shape (single vs combined per task, retention
in %), combinations whose label sets differ flagged, and a bar plot. One trial per (combination, seed) and search
sample, all through the one grid runner, so an interrupted run resumes.

    tpv addition --tasks rotten_tomatoes tweets trec bbc_news --seeds 0 1 2
    tpv addition --tasks rotten_tomatoes imdb --weight-samples 16 --vectors-source "tpv sweep results-1a2b3c4d"
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tpv.backbone import BackboneConfig, backbone_id_for
from tpv.bundled import DEFAULT_BACKBONE
from tpv.names import Name
from tpv.paths import atomic_write
from tpv.tasks import require_data
from tune_jobs.config import JobConfig, add_resource_args, config_from_args, start_ray
from tune_jobs.grid import Search, run_grid, short_hash
from tune_jobs.locations import add_location_args
from tune_jobs.runtime import init_ray, load_backbone, set_threads
from tune_jobs.selections import held_out
from tune_jobs.tables import (
    csv_text,
    markdown_table,
    mean_std,
    pm,
    print_result,
    save_figure,
)


#: the fields of the per-task weight search, on top of the paper's rule
WEIGHT_SEARCH = ("weight_samples", "weight_range")


class AdditionConfig(JobConfig):
    """An addition experiment; loadable from YAML, flags override."""

    name: Name = "addition"
    tasks: list[str] = Field(min_length=2, description="source tasks with stored vectors")
    combinations: list[list[str]] | None = Field(None, description="default: every pair, and all tasks together")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1,
                             description="origin seeds: the vectors trained from O_s are added on O_s")
    vectors_source: str | None = Field(None, description="only vectors this job wrote (VectorMeta.source)")
    backbone: str = DEFAULT_BACKBONE
    max_source_tokens: int | None = Field(None, description="default: as the vectors were trained")
    grid_step: float = Field(0.05, gt=0, le=1, description="the coefficient grid 0..1 (the paper's: 0.05)")
    weight_samples: int = Field(0, ge=0, description="per-task weights: Optuna trials per combination and seed "
                                "(0: only the paper's single coefficient)")
    weight_range: tuple[float, float] = (0.0, 1.5)
    eval_examples: int | None = Field(200, ge=1, description="validation examples per member task")
    test_examples: int | None = Field(200, ge=1, description="test examples per member task")

    def combos(self) -> list[list[str]]:
        if self.combinations:
            return self.combinations
        pairs = [list(p) for p in itertools.combinations(self.tasks, 2)]
        return pairs + ([list(self.tasks)] if len(self.tasks) > 2 else [])


class AdditionTrial(BaseModel):
    """One trial: a combination on one origin, scored with the paper's rule or with fixed weights, or (search)
    one weighting scored on validation only."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str]
    origin_seed: int
    store: str
    source: str | None
    backbone: BackboneConfig
    grid: list[float] | None = None
    weights: list[float] | None = None
    eval_examples: int | None
    test_examples: int | None
    cpus: float = 1.0

    @property
    def label(self) -> str:
        return f"{'+'.join(self.tasks)}/s{self.origin_seed}"


def _combination(spec: AdditionTrial):
    from tpv.addition import Combination
    from tpv.store import VectorStore

    set_threads(spec.cpus)
    return Combination(load_backbone(spec.backbone), VectorStore(spec.store), spec.tasks, spec.origin_seed,
                       spec.source)


def addition_trial(config: dict[str, Any]) -> None:
    """Tune trainable: the whole addition of one combination on one origin (paper rule or fixed weights)."""
    from ray import tune

    from tpv.addition import run_addition

    spec = AdditionTrial.model_validate(config["spec"])
    started = time.perf_counter()
    combo = _combination(spec)
    result = run_addition(combo.backbone, combo.store, spec.tasks, spec.origin_seed, source=spec.source,
                          grid=spec.grid, weights=spec.weights, eval_examples=spec.eval_examples,
                          test_examples=spec.test_examples)
    tune.report({"done": 1.0, "seconds": time.perf_counter() - started, "result": result.model_dump(mode="json"),
                 "mean_retention": result.mean_retention})


def weight_sample_trial(config: dict[str, Any]) -> None:
    """Tune trainable of the per-task weight search: one weighting's mean member metric on validation."""
    from ray import tune

    spec = AdditionTrial.model_validate(config["spec"])
    weights = [float(config[f"w{i}"]) for i in range(len(spec.tasks))]
    scores = _combination(spec).score(weights, 1.0, "validation", spec.eval_examples)
    tune.report({"done": 1.0, "objective": scores["mean"] + 1e-4 * max(scores["label_logprob"], -50.0),
                 "weights": weights, **{f"val_{t}": scores[t] for t in spec.tasks}})


def _trial_label(trial) -> str:
    spec = trial.config.get("spec", {})
    ws = [trial.config[k] for k in sorted(trial.config) if k.startswith("w") and k[1:].isdigit()]
    head = f"{'+'.join(spec.get('tasks', []))}-s{spec.get('origin_seed')}"
    return head + ("-w=" + ",".join(f"{w:.2f}" for w in ws) if ws else "")


def run_addition_job(config: AdditionConfig) -> dict[str, Any]:
    """Every combination x seed with the paper's rule (and the weight search when asked); tables and a plot."""
    from ray import tune

    from tpv.addition import AdditionResult, coefficient_grid
    from tpv.compose import task_vectors
    from tpv.store import VectorStore

    loc = config.locations.resolved()
    store = VectorStore(loc.store)
    bb_id = backbone_id_for(config.backbone)
    first = task_vectors(store, bb_id, config.tasks[0], None, [config.seeds[0]], config.vectors_source)[0]
    backbone = BackboneConfig.as_trained(config.backbone, first.train_config, config.max_source_tokens)
    for task in config.tasks:  # fail before Ray starts when a vector is missing or ambiguous
        task_vectors(store, bb_id, task, first.prompt_length, config.seeds, config.vectors_source)
    # the paper's cells do not depend on the weight search: adding `--weight-samples` to a finished addition reuses
    # them (keyed as with the search's defaults, so experiments run before this rule are found too)
    without_search = config.model_copy(update={f: AdditionConfig.model_fields[f].default for f in WEIGHT_SEARCH})
    key = short_hash(without_search.model_dump(mode="json", exclude=set(config.RUN_ONLY)))
    search_key = short_hash(config.model_dump(mode="json", exclude=set(config.RUN_ONLY)))
    run = dict(config.grid_args(), reuse_finished=True, name=_trial_label)
    base = dict(store=loc.store, source=config.vectors_source, backbone=backbone, eval_examples=config.eval_examples,
                test_examples=config.test_examples, cpus=config.resources.cpus_per_trial)
    cells = [(combo, seed) for combo in config.combos() for seed in config.seeds]
    require_data(config.tasks)
    init_ray()
    print(f"[addition] {len(cells)} cells: {len(config.combos())} combination(s) x {len(config.seeds)} origin(s), "
          f"c on a {len(coefficient_grid(config.grid_step))}-point grid", flush=True)
    specs = [AdditionTrial(tasks=combo, origin_seed=seed, grid=coefficient_grid(config.grid_step), **base)
             for combo, seed in cells]
    outcomes = run_grid({"spec": tune.grid_search([s.model_dump(mode="json") for s in specs])},
                        experiment=f"{config.name}-{key}", job="addition", trainable=addition_trial, **run)
    results = {"paper": [AdditionResult.model_validate(o.metrics["result"]) for o in outcomes if not o.error]}
    failed = [o.error for o in outcomes if o.error]
    if config.weight_samples:
        results["weights"] = _weight_search(config, cells, base, search_key, run)
    return summarize(config, results, failed, Path(loc.out_dir) / config.name)


def _weight_search(config: AdditionConfig, cells, base, key, run) -> list:
    """Per (combination, seed): Optuna over per-task weights on validation, then the best weights on test."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from tpv.addition import AdditionResult

    chosen = []
    low, high = config.weight_range
    for combo, seed in cells:
        spec = AdditionTrial(tasks=combo, origin_seed=seed, **base)
        space = {f"w{i}": tune.uniform(low, high) for i in range(len(combo))}
        start = [{f"w{i}": 1.0 for i in range(len(combo))}]  # the plain sum first
        search = Search(algorithm=OptunaSearch(seed=seed, points_to_evaluate=start), metric="objective",
                        num_samples=config.weight_samples)
        found = run_grid({"spec": spec.model_dump(mode="json"), **space}, search=search,
                         experiment=f"{config.name}-{key}-weights-{'+'.join(combo)}-s{seed}",
                         job="addition weights", trainable=weight_sample_trial, **run)
        best = max((o for o in found if not o.error), key=lambda o: o.metrics["objective"])
        chosen.append(AdditionTrial(tasks=combo, origin_seed=seed, weights=best.metrics["weights"], **base))
    outcomes = run_grid({"spec": tune.grid_search([s.model_dump(mode="json") for s in chosen])},
                        experiment=f"{config.name}-{key}-weighted", job="addition weighted",
                        trainable=addition_trial, **run)
    return [AdditionResult.model_validate(o.metrics["result"]) for o in outcomes if not o.error]


COLUMNS = ["combination", "labels", "rule", "coefficient / weights", "task", "metric", "single", "combined",
           "retention %"]


def summarize(config: AdditionConfig, results: dict[str, list], failed: list[str], out: Path) -> dict[str, Any]:
    """The paper's table shape (mean ± std over origins), a long CSV, and a retention bar plot."""
    rows, long_rows = [], []
    for rule, found in results.items():
        for combo in config.combos():
            # by origin: Tune returns trials in finishing order, which a resumed experiment does not keep
            cell = sorted((r for r in found if r.tasks == combo), key=lambda r: r.origin_seed)
            if not cell:
                continue
            shown = (pm([r.coefficient for r in cell], 2) if rule == "paper" else
                     "; ".join(f"s{r.origin_seed}: " + ", ".join(f"{w:.2f}" for w in r.weights) for r in cell))
            for i, task in enumerate(combo):
                single = [r.members[i].single for r in cell]
                combined = [r.members[i].combined for r in cell]
                retention = [100 * r.members[i].retention for r in cell]
                rows.append({"combination": " + ".join(combo), "labels": cell[0].labels, "rule": rule,
                             "coefficient / weights": shown, "task": task, "metric": cell[0].members[i].metric,
                             "single": pm(single), "combined": pm(combined), "retention %": pm(retention, 1),
                             "_retention": mean_std(retention)[0]})
                for r in cell:
                    m = r.members[i]
                    long_rows.append({"combination": "+".join(combo), "rule": rule, "origin_seed": r.origin_seed,
                                      "coefficient": r.coefficient, "weights": " ".join(f"{w:.4f}" for w in r.weights),
                                      "task": task, "metric": m.metric, "single": m.single, "combined": m.combined,
                                      "retention": m.retention, "labels": r.labels})
    mean_retention = {rule: mean_std([100 * r.mean_retention for r in found])[0] for rule, found in results.items()}
    md = [f"# Multi-task addition ({config.backbone}, origins {config.seeds}, test split)", "",
          "single: O_s + tau_t; combined: O_s + c * sum tau (paper: c on validation, grid step "
          f"{config.grid_step}) or per-task weights (weights: Optuna on validation). labels: whether the members' "
          "label sets are the same, overlapping or disjoint (the paper's addition collapses on disjoint ones).", "",
          markdown_table(rows, COLUMNS), "",
          "mean retention over combinations and tasks: "
          + ", ".join(f"{rule} {value:.1f}%" for rule, value in mean_retention.items()), ""]
    if failed:
        md += [f"{len(failed)} trial(s) failed: {failed[:3]}", ""]
    text = "\n".join(md)
    paths = {"markdown": str(atomic_write(out / "addition.md", text)),
             "csv": str(atomic_write(out / "addition.csv", csv_text(long_rows, list(long_rows[0]) if long_rows else []))),
             "plot": str(plot(out / "addition.png", rows))}
    return {"rows": rows, "long_rows": long_rows, "mean_retention": mean_retention, "markdown": text,
            "paths": paths, "failed": len(failed)}


def plot(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Retention (%) per member task, one group of bars per combination and rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["combination"], r["rule"]) for r in rows))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(groups) + 2), 4))
    x = 0.0
    ticks, names = [], []
    for combo, rule in groups:
        members = [r for r in rows if (r["combination"], r["rule"]) == (combo, rule)]
        width = 0.8 / len(members)
        for i, r in enumerate(members):
            value = r["_retention"]
            ax.bar(x + i * width, 0 if math.isnan(value) else value, width,
                   color="tab:red" if r["labels"] == "disjoint" else "tab:blue")
            ax.text(x + i * width, 2, r["task"], rotation=90, fontsize=7, ha="center", va="bottom", color="white")
        ticks.append(x + 0.4 - width / 2)
        names.append(f"{combo} ({rule})")
        x += 1.0
    ax.axhline(100, color="black", lw=0.8, ls="--")
    ax.set_xticks(ticks, names, fontsize=7, rotation=25, ha="right")  # long names would overlap side by side
    ax.set_ylabel("retention (% of single-task test metric)")
    ax.set_title("Multi-task addition (red: disjoint label sets)")
    fig.tight_layout()
    return save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tpv addition",
        description="The paper's multi-task addition: origin + c * sum of stored task prompt vectors (c on "
                    "validation), optionally per-task weights searched with Optuna, evaluated on every member "
                    "task's test split against its single-task prompt. Writes the table, a CSV and a plot.",
        epilog="Examples:\n  tpv addition --tasks rotten_tomatoes tweets trec bbc_news --seeds 0 1\n"
               "  tpv addition --tasks rotten_tomatoes imdb --weight-samples 16\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML file with AdditionConfig fields; flags override it")
    p.add_argument("--name", help="experiment name (folder of its tables; default addition)")
    p.add_argument("--tasks", nargs="+", help="source tasks (every pair and all together are combined)")
    p.add_argument("--combination", action="append", nargs="+", dest="combinations", metavar="TASK",
                   help="an explicit combination (repeatable); default every pair and all tasks")
    p.add_argument("--seeds", nargs="+", type=int, help="origin seeds (default 0)")
    p.add_argument("--vectors-source", help="only vectors this job wrote (VectorMeta.source)")
    p.add_argument("--backbone", help=f"bundled name or model folder (default {DEFAULT_BACKBONE})")
    p.add_argument("--grid-step", type=float, help="coefficient grid step (default 0.05, the paper's)")
    p.add_argument("--weight-samples", type=int, help="per-task weight search: Optuna trials (default 0: off)")
    p.add_argument("--eval-examples", type=int, help="validation examples per task (default 200)")
    p.add_argument("--test-examples", type=int, help="test examples per task (default 200)")
    add_resource_args(p)
    p.add_argument("--fresh", action="store_true", help="do not resume an interrupted experiment")
    add_location_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(AdditionConfig, args, ("name", "tasks", "combinations", "seeds", "vectors_source",
                                                     "backbone", "grid_step", "weight_samples", "eval_examples",
                                                     "test_examples"), required=("tasks",))
    held_out("tpv addition", config.tasks, config.seeds)
    start_ray(args)
    result = run_addition_job(config)
    print_result(result)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
