"""`tpv search-weights`: choose how to combine stored task prompt vectors for a target task, on validation.

Two searches, both through Ray Tune, both scoring the composed prompt O + c * sum_i w_i tau_i on the target's
validation split:

- `paper`: the paper's rule. One coefficient c on the plain sum (all w_i = 1), grid 0..1 in steps of 0.05.
  Zero-shot, the whole grid is one trial whose candidate prompts share every forward pass (packed evaluation).
- `per_vector`: one weight per source vector in a continuous range, searched by Optuna (TPE) through
  `ray.tune.search.optuna.OptunaSearch`; with the few-shot objective, ASHA can stop poor trials early.

The objective is the target's metric on validation, zero-shot (the composed prompt as it is) or after k few-shot
training steps from it (`--objective few_shot`). Ties on the metric are broken by the mean log-probability of the
right label (objective = metric + 1e-4 * label_logprob), or give `--metric label_logprob` to optimise it directly.
The best composition is saved in the store under a name the serving app can use (`<name>`, plus `<name>-paper`
and `<name>-weights` for each search's own best).

    tpv search-weights --target imdb --sources rotten_tomatoes tweets
    tpv search-weights --target snips --sources trec bbc_news --modes per_vector --samples 40 --objective few_shot
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tpv.backbone import BackboneConfig, backbone_id_for
from tpv.bundled import DEFAULT_BACKBONE
from tpv.names import Name
from tpv.paths import atomic_write
from tpv.tasks import require_data
from tune_jobs.config import JobConfig, add_resource_args, config_from_args, start_ray
from tune_jobs.grid import GridOutcome, Search, TrialsFailed, run_grid, short_hash
from tune_jobs.locations import add_location_args
from tune_jobs.runtime import init_ray, load_backbone, set_threads
from tune_jobs.tables import csv_text, markdown_table, print_result

Mode = Literal["paper", "per_vector"]
TIE_BREAK = 1e-4


class ObjectiveSpec(BaseModel):
    """What one weight trial evaluates (everything except the weights themselves)."""

    model_config = ConfigDict(extra="forbid")

    target: str
    terms: list[dict[str, Any]] = Field(description="CompositionTerm fields without weights, one per source")
    backbone: BackboneConfig
    store: str
    origin_seed: int = 0
    prompt_length: int
    metric: str | None = None
    eval_examples: int | None = 200
    objective: Literal["zero_shot", "few_shot"] = "zero_shot"
    shots: int = 16
    few_shot_steps: int = 20
    lr: float = 0.3
    cpus: float = 1.0


class WeightSearchConfig(JobConfig):
    """A weight search; loadable from YAML, flags override."""

    target: str
    sources: list[str] = Field(min_length=1, description="source task names (their task vectors, by the task-term "
                               "rule of tpv.compose) or stored vector ids")
    vectors_source: str | None = Field(None, description="task sources: only vectors this job wrote "
                                       "(VectorMeta.source)")
    vector_seeds: list[int] | None = Field(None, description="task sources: only vectors of these origin seeds")
    name: Name | None = Field(None,
                             description="composition name in the store (default '<target>-tpv')")
    backbone: str = DEFAULT_BACKBONE
    max_source_tokens: int | None = Field(None, description="default: as the source vectors were trained")
    origin_seed: int = Field(0, ge=0, description="origin the composition is applied to (and saved with)")
    modes: list[Mode] = Field(default_factory=lambda: ["paper", "per_vector"], min_length=1)
    grid_step: float = Field(0.05, gt=0, le=1, description="paper rule: coefficient grid 0..1 in these steps")
    weight_min: float = -0.5
    weight_max: float = 1.5
    samples: int = Field(24, ge=1, description="per_vector: Optuna trials")
    seed: int = Field(0, description="Optuna sampler seed")
    objective: Literal["zero_shot", "few_shot"] = "zero_shot"
    shots: int = Field(16, ge=1, description="few_shot objective: examples per class")
    few_shot_steps: int = Field(20, ge=1)
    asha: bool = Field(False, description="per_vector + few_shot: stop poor trials early with ASHA")
    metric: str | None = Field(None, description="validation metric to maximise (default: the task's)")
    eval_examples: int | None = Field(200, ge=1)
    save: bool = True

    @model_validator(mode="after")
    def _range(self) -> WeightSearchConfig:
        if self.weight_max <= self.weight_min:
            raise ValueError("weight_max must be above weight_min")
        return self


def objective_value(metrics: dict[str, float], task_metric: str, metric: str | None) -> float:
    if metric:
        return float(metrics[metric])
    tie = max(float(metrics.get("label_logprob", 0.0)), -50.0)
    return float(metrics[task_metric]) + TIE_BREAK * tie


def composition_spec(spec: ObjectiveSpec, backbone_id: str, weights: list[float], coefficient: float):
    from tpv.compose import CompositionSpec

    return CompositionSpec(
        backbone_id=backbone_id, terms=[{**t, "weight": float(w)} for t, w in zip(spec.terms, weights)],
        origin_seed=spec.origin_seed, prompt_length=spec.prompt_length, method="weighted",
        coefficient=float(coefficient),
    )


def zero_shot_scores(spec: ObjectiveSpec, candidates: list[tuple[list[float], float]]) -> list[dict[str, float]]:
    """Validation metrics of each candidate's composed prompt as it is: every candidate in one
    `tpv.evaluate.evaluate_many` (shared passes on a GPU), the validation split read once."""
    from tpv.compose import Composer
    from tpv.evaluate import evaluate_many
    from tpv.prompt import make_origin
    from tpv.store import VectorStore
    from tpv.tasks import get_task, load_split

    set_threads(spec.cpus)
    backbone = load_backbone(spec.backbone)
    task = get_task(spec.target)
    composer = Composer(VectorStore(spec.store), lambda length, seed: make_origin(backbone, length, seed))
    prompts = [composer.compose(composition_spec(spec, backbone.backbone_id, w, c)) for w, c in candidates]
    dev = load_split(spec.target, "validation", limit=spec.eval_examples, seed=0)
    found = evaluate_many(backbone, prompts, [task] * len(prompts), [dev] * len(prompts))
    return [{**m, "objective": objective_value(m, task.metric, spec.metric),
             "metric_value": float(m.get(spec.metric or task.metric, math.nan))} for m in found]


def score(spec: ObjectiveSpec, weights: list[float], coefficient: float, report=None) -> dict[str, float]:
    """Validation metrics of the composed prompt (zero-shot) or of the best prompt after few-shot steps."""
    from tpv.store import VectorStore
    from tpv.tasks import get_task
    from tpv.train import InitSpec, TrainConfig, train

    if spec.objective == "zero_shot":
        return zero_shot_scores(spec, [(weights, coefficient)])[0]
    set_threads(spec.cpus)
    backbone = load_backbone(spec.backbone)
    task = get_task(spec.target)
    comp = composition_spec(spec, backbone.backbone_id, weights, coefficient)
    init = InitSpec(kind="composition", composition=comp.model_dump(
        mode="json", include={"terms", "method", "coefficient", "params"}))
    config = TrainConfig(
        task=spec.target, backbone=spec.backbone, prompt_length=spec.prompt_length, seed=spec.origin_seed,
        lr=spec.lr, warmup_steps=0, batch_size=8, max_steps=spec.few_shot_steps, shots=spec.shots,
        eval_every=max(1, spec.few_shot_steps // 4), eval_examples=spec.eval_examples, schedule="constant",
        init=init, progress=False,
    )

    def callback(step, metrics, checkpoint):
        if report is not None:
            report({"objective": objective_value(metrics, task.metric, spec.metric), "step": step})

    result = train(config, backbone=backbone, store=VectorStore(spec.store), callback=callback)
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    return {**metrics, "objective": objective_value(metrics, task.metric, spec.metric), "metric_value":
            float(metrics.get(spec.metric or task.metric, math.nan))}


def coefficient_grid_trial(config: dict[str, Any]) -> None:
    """Tune trainable of the paper rule, zero-shot: `config = {"spec": ObjectiveSpec, "coefficients": [...]}`,
    every coefficient scored in one trial, all their prompts in one `evaluate_many`."""
    from ray import tune

    spec = ObjectiveSpec.model_validate(config["spec"])
    started = time.perf_counter()
    ones = [1.0] * len(spec.terms)
    scores = zero_shot_scores(spec, [(ones, c) for c in config["coefficients"]])
    tune.report({"done": 1.0, "seconds": time.perf_counter() - started,
                 "rows": [{"coefficient": float(c), **m} for c, m in zip(config["coefficients"], scores)]})


def weight_trial(config: dict[str, Any]) -> None:
    """Tune trainable: `config = {"spec": ObjectiveSpec, "coefficient": c, "w0": ..., "w1": ...}`."""
    from ray import tune

    spec = ObjectiveSpec.model_validate(config["spec"])
    weights = [float(config.get(f"w{i}", 1.0)) for i in range(len(spec.terms))]
    coefficient = float(config.get("coefficient", 1.0))
    started = time.perf_counter()
    metrics = score(spec, weights, coefficient, report=lambda m: tune.report(m))
    tune.report({**metrics, "done": 1.0, "seconds": time.perf_counter() - started})


def weight_trial_name(trial) -> str:
    cfg = trial.config
    ws = [cfg[k] for k in sorted(cfg) if k.startswith("w") and k[1:].isdigit()]
    if ws:
        return "w=" + ",".join(f"{w:.2f}" for w in ws)
    return f"c={cfg.get('coefficient', 1.0):.2f}"


def resolve_terms(store, backbone_id: str, config: WeightSearchConfig) -> tuple[list[dict[str, Any]], int, dict]:
    """Task names become task terms (narrowed by vectors_source / vector_seeds), anything else a stored vector id;
    returns (terms, L, the training config the vectors were trained with)."""
    from tpv.compose import CompositionBody, prompt_length_of, task_vectors

    tasks = {m.task for m in store.list(backbone_id, kind="task")}
    narrow = {k: v for k, v in (("seeds", config.vector_seeds), ("source", config.vectors_source)) if v is not None}
    terms = [{"task": s, **narrow} if s in tasks else {"vector_id": s} for s in config.sources]
    length = prompt_length_of(store, backbone_id, CompositionBody(terms=terms))
    first = terms[0]
    meta = (task_vectors(store, backbone_id, first["task"], length, config.vector_seeds, config.vectors_source)[0]
            if "task" in first else store.get(first["vector_id"], backbone_id).meta)
    return terms, length, meta.train_config


def run_search(config: WeightSearchConfig) -> dict[str, Any]:
    from ray import tune

    from tpv.compose import Composer
    from tpv.store import VectorStore

    loc = config.locations.resolved()
    store = VectorStore(loc.store)
    bb_id = backbone_id_for(config.backbone)
    terms, length, trained = resolve_terms(store, bb_id, config)
    backbone = BackboneConfig.as_trained(config.backbone, trained, config.max_source_tokens)
    spec = ObjectiveSpec(
        target=config.target, terms=terms, backbone=backbone, store=loc.store, origin_seed=config.origin_seed,
        prompt_length=length, metric=config.metric, eval_examples=config.eval_examples,
        objective=config.objective, shots=config.shots, few_shot_steps=config.few_shot_steps,
        cpus=config.resources.cpus_per_trial,
    )
    name = config.name or f"{config.target}-tpv"
    key = short_hash(config.model_dump(mode="json", exclude={*config.RUN_ONLY, "save"}))
    require_data([config.target])
    init_ray()
    run = dict(config.grid_args(), trainable=weight_trial, name=weight_trial_name)
    found: dict[str, dict[str, Any]] = {}
    tables: dict[str, list[dict[str, Any]]] = {}
    n_terms = len(terms)
    if "paper" in config.modes:
        steps = int(round(1.0 / config.grid_step))
        grid = [round(i * config.grid_step, 10) for i in range(steps + 1)]
        print(f"[search-weights] paper rule: {len(grid)} coefficients on the sum of {config.sources}", flush=True)
        if config.objective == "zero_shot":  # one trial, every coefficient's prompt in one evaluate_many
            grid_run = {**run, "trainable": coefficient_grid_trial, "name": lambda trial: "coefficient-grid"}
            (outcome,) = run_grid({"spec": spec.model_dump(mode="json"), "coefficients": grid},
                                  experiment=f"{name}-paper-grid-{key}", job="search-weights paper",
                                  reuse_finished=True, **grid_run)
            if outcome.error:
                raise TrialsFailed(f"the coefficient grid failed ({outcome.error}); run the same command again")
            rows = [{"coefficient": r["coefficient"], "weights": [1.0] * n_terms, "objective": r["objective"],
                     "metric_value": r["metric_value"], "label_logprob": r.get("label_logprob"), "done": True,
                     "error": None} for r in outcome.metrics["rows"]]
        else:
            outcomes = run_grid(
                {"spec": spec.model_dump(mode="json"), "coefficient": tune.grid_search(grid)},
                experiment=f"{name}-paper-{key}", job="search-weights paper", reuse_finished=True, **run,
            )
            rows = _rows(outcomes, n_terms)
        rows.sort(key=lambda r: r["coefficient"])
        best = max(rows, key=lambda r: (r["objective"], -r["coefficient"]))  # ties: the smaller coefficient
        found["paper"] = best
        tables["paper"] = rows
    if "per_vector" in config.modes:
        from ray.tune.schedulers import ASHAScheduler
        from ray.tune.search.optuna import OptunaSearch

        space = {f"w{i}": tune.uniform(config.weight_min, config.weight_max) for i in range(n_terms)}
        start = [{f"w{i}": 1.0 for i in range(n_terms)}]  # the plain sum first
        scheduler = None
        if config.asha and config.objective == "few_shot":
            scheduler = ASHAScheduler(time_attr="training_iteration", max_t=5, grace_period=2, reduction_factor=2)
        print(f"[search-weights] per-vector weights in [{config.weight_min}, {config.weight_max}]: "
              f"{config.samples} Optuna trials{' with ASHA' if scheduler else ''}", flush=True)
        search = Search(algorithm=OptunaSearch(seed=config.seed, points_to_evaluate=start), metric="objective",
                        num_samples=config.samples, scheduler=scheduler)
        outcomes = run_grid(
            {"spec": spec.model_dump(mode="json"), "coefficient": 1.0, **space}, experiment=f"{name}-weights-{key}",
            job="search-weights per_vector", reuse_finished=True, search=search,
            **(run | {"resources": config.resources.model_copy(  # Optuna learns from finished trials: 2 at a time
                update={"max_concurrent": config.resources.max_concurrent or 2})}),
        )
        rows = [r for r in _rows(outcomes, n_terms) if r.get("done")]
        rows.sort(key=lambda r: -r["objective"])
        found["per_vector"] = rows[0]
        tables["per_vector"] = rows
    overall_mode = max(found, key=lambda m: found[m]["objective"])
    saved: dict[str, str] = {}
    composer = Composer(store, lambda length, seed: None)  # saving only: no origins needed
    specs = {}
    for mode, row in found.items():
        comp = composition_spec(spec, bb_id, row["weights"], row["coefficient"])
        specs[mode] = comp
        if config.save:
            suffix = {"paper": "paper", "per_vector": "weights"}[mode]
            composer.save_named(f"{name}-{suffix}", comp, overwrite=True)
            saved[mode] = f"{name}-{suffix}"
    if config.save:
        composer.save_named(name, specs[overall_mode], overwrite=True)
        saved["best"] = name
    return _write(config, loc, name, found, tables, saved, overall_mode, n_terms)


def _rows(outcomes: list[GridOutcome], n_terms: int) -> list[dict[str, Any]]:
    rows = []
    for result in outcomes:
        m, cfg = result.metrics, result.config
        if "objective" not in m:
            continue
        weights = [float(cfg.get(f"w{i}", 1.0)) for i in range(n_terms)]
        rows.append({"coefficient": float(cfg.get("coefficient", 1.0)), "weights": weights,
                     "objective": float(m["objective"]), "metric_value": float(m.get("metric_value", math.nan)),
                     "label_logprob": m.get("label_logprob"), "done": bool(m.get("done")),
                     "error": result.error})
    return rows


def _write(config, loc, name, found, tables, saved, overall_mode, n_terms) -> dict[str, Any]:
    from tpv.tasks import get_task

    metric = config.metric or get_task(config.target).metric
    lines = [f"# Combination weights for `{config.target}` from {config.sources} ({config.objective}, validation)",
             ""]
    summary = []
    for mode, row in found.items():
        summary.append({"search": mode, "coefficient": row["coefficient"],
                        "weights": ", ".join(f"{w:.3f}" for w in row["weights"]), metric: row["metric_value"],
                        "objective": row["objective"], "saved as": saved.get(mode, "")})
    lines += [markdown_table(summary, ["search", "coefficient", "weights", metric, "objective", "saved as"]), ""]
    if saved.get("best"):
        lines += [f"best overall ({overall_mode}) saved as composition `{saved['best']}`", ""]
    csv_rows = []
    for mode, rows in tables.items():
        for r in rows:
            csv_rows.append({"search": mode, "coefficient": r["coefficient"],
                             **{f"w{i}": r["weights"][i] for i in range(n_terms)}, "objective": r["objective"],
                             metric: r["metric_value"], "label_logprob": r["label_logprob"]})
        shown = rows if mode == "paper" else rows[:10]
        lines += [f"## {mode}", "", markdown_table(
            [{"coefficient": r["coefficient"], "weights": ", ".join(f"{w:.3f}" for w in r["weights"]),
              metric: r["metric_value"], "label_logprob": r["label_logprob"], "objective": r["objective"]}
             for r in shown], ["coefficient", "weights", metric, "label_logprob", "objective"]), ""]
    out = Path(loc.out_dir) / name
    md = "\n".join(lines)
    paths = {"markdown": str(atomic_write(out / "weights.md", md)),
             "csv": str(atomic_write(out / "weights.csv", csv_text(csv_rows, list(csv_rows[0]) if csv_rows else [])))}
    return {"found": found, "tables": tables, "saved": saved, "best_mode": overall_mode, "markdown": md,
            "paths": paths}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tpv search-weights",
        description="Search how to combine stored task prompt vectors for a target task on its validation split: "
                    "the paper's single coefficient (grid 0..1, step 0.05) and per-vector weights (Optuna through "
                    "Ray Tune). The best composition is saved in the store under a name for serving.",
        epilog="Examples:\n  tpv search-weights --target imdb --sources rotten_tomatoes tweets\n"
               "  tpv search-weights --target snips --sources trec bbc_news --objective few_shot --asha\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML file with WeightSearchConfig fields; flags override it")
    p.add_argument("--target", help="target task (scored on its validation split)")
    p.add_argument("--sources", nargs="+", help="source task names or stored vector ids")
    p.add_argument("--name", help="composition name in the store (default <target>-tpv)")
    p.add_argument("--backbone", help=f"bundled name or model folder (default {DEFAULT_BACKBONE})")
    p.add_argument("--origin-seed", type=int, help="origin of the composed prompt (default 0)")
    p.add_argument("--modes", nargs="+", choices=["paper", "per_vector"], help="searches to run (default both)")
    p.add_argument("--grid-step", type=float, help="paper rule grid step (default 0.05)")
    p.add_argument("--weight-range", nargs=2, type=float, metavar=("MIN", "MAX"),
                   help="per-vector weight range (default -0.5 1.5)")
    p.add_argument("--samples", type=int, help="per-vector: number of Optuna trials (default 24)")
    p.add_argument("--seed", type=int, help="Optuna sampler seed (default 0)")
    p.add_argument("--objective", choices=["zero_shot", "few_shot"], help="score the composed prompt as it is "
                   "(default) or after --few-shot-steps steps on --shots examples per class")
    p.add_argument("--shots", type=int)
    p.add_argument("--few-shot-steps", type=int)
    p.add_argument("--asha", action="store_true", help="per-vector few-shot search: ASHA early stopping")
    p.add_argument("--metric", help="validation metric to maximise, e.g. label_logprob (default: the task's)")
    p.add_argument("--eval-examples", type=int, help="validation examples per evaluation (default 200)")
    p.add_argument("--no-save", action="store_true", help="do not save the compositions in the store")
    add_resource_args(p)
    p.add_argument("--verbose", type=int)
    add_location_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    weights = dict(zip(("weight_min", "weight_max"), args.weight_range)) if args.weight_range else {}
    config = config_from_args(WeightSearchConfig, args, ("target", "sources", "name", "backbone", "origin_seed", "modes",
                                                         "grid_step", "samples", "seed", "objective", "shots",
                                                         "few_shot_steps", "metric", "eval_examples", "verbose"),
                              required=("target", "sources"), asha=args.asha or None,
                              save=False if args.no_save else None, **weights)
    start_ray(args)
    result = run_search(config)
    print_result(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
