"""`tpv transfer`: few-shot transfer from stored source vectors to target tasks, every init side by side.

For each target, each number of shots (k examples per class; 0 = evaluate the init as it is) and each origin
seed, one Ray Tune trial per init (`TRANSFER_INITS`, the starting prompt of each):

- `random`      the run's own origin O (plain prompt tuning)
- `spot`        SPoT: the tuned prompt of ONE run of the group's first source, O_s + tau_s as that run ended; which
                run is `spot_run` (best on the source's validation, or the run on the target run's origin seed as
                the paper's scripts pair them)
- `multi_spot`  multi-source SPoT, approximated: the mean of the sources' SPoT prompts (each one run, as `spot`
                picks it). The paper trains one prompt on the sources' joint data instead; tpv has no multi-task run
- `tpv`         TPV: the run's fresh origin O + c * sum of the sources' task prompt vectors (each source task is the
                mean of its stored vectors over origin seeds), c chosen on the target's validation split over the
                paper's grid 0..1 step 0.05 unless `tpv_coefficient` fixes it
- `tpv_auto`    TPV whose sources are picked automatically: a short probe run on the target (probe_shots per class,
                probe_steps steps) gives a probe vector; the `auto_k` stored tasks most similar to it (flat cosine,
                the paper's measure, mean over their seeds) are combined as in `tpv`

The runs use fresh origin seeds (default 10, 11, 12: not the sweep's), so TPV inits also test the cross-origin
claim. Each cell's test metric is reported as mean +- std over seeds in markdown/CSV tables, with a
shots-vs-metric plot per target. Default source -> target groups: `DEFAULT_GROUPS`.

    tpv transfer --targets imdb --shots 0 8 32 --seeds 10 11
    tpv transfer --config transfer.yaml
"""

from __future__ import annotations

import argparse
import math
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from tpv.backbone import backbone_id_for
from tpv.bundled import DEFAULT_BACKBONE
from tpv.names import Name
from tpv.paths import atomic_write
from tpv.tasks import require_data
from tpv.train import PRESETS, InitSpec, PresetName, TrainConfig
from tune_jobs.config import (
    JobConfig,
    JobConfigError,
    add_resource_args,
    config_from_args,
    deep_merge,
    start_ray,
)
from tune_jobs.grid import plan_packs, run_grid, short_hash, specs_space
from tune_jobs.locations import add_location_args
from tune_jobs.runtime import init_ray
from tune_jobs.selections import held_out
from tune_jobs.tables import (
    csv_text,
    markdown_table,
    mean_std,
    pm,
    print_result,
    save_figure,
)
from tune_jobs.trial import TrialSpec

Init = Literal["random", "spot", "multi_spot", "tpv", "tpv_auto"]
SpotRun = Literal["best_validation", "same_seed"]

#: source -> target groups of the built-in tasks (in the paper's spirit: MNLI+QNLI -> SciTail/SNLI, SST-2+Yelp -> IMDB...)
DEFAULT_GROUPS: dict[str, list[str]] = {
    "epistemic_reasoning": ["vitaminc", "boolq"],
    "presuppositions_nli": ["vitaminc", "boolq"],
    "imdb": ["rotten_tomatoes", "tweets"],
    "yelp": ["rotten_tomatoes", "tweets"],
    "snips": ["trec", "bbc_news"],
}


class TransferConfig(JobConfig):
    """A transfer experiment; loadable from YAML, flags override."""

    name: Name = "transfer"
    targets: dict[str, list[str]] = Field(default_factory=lambda: dict(DEFAULT_GROUPS),
                                          description="target task -> its source tasks")
    shots: list[int] = Field(default_factory=lambda: [0, 8, 32, 128], description="examples per class; 0 = none")
    inits: list[Init] = Field(default_factory=lambda: list(INITS))
    seeds: list[int] = Field(default_factory=lambda: [10, 11, 12], min_length=1,
                             description="origin (and few-shot sample) seeds of the target runs")
    backbone: str = DEFAULT_BACKBONE
    preset: PresetName = Field("causal_cpu", description="the recipe (tpv.train.PRESETS) the train fields override")
    train: dict[str, Any] = Field(default_factory=dict, description="TrainConfig fields over the preset")
    few_shot_steps: int = Field(40, ge=1, description="steps per few-shot run")
    test_examples: int | None = Field(200, ge=1, description="test examples per cell (None: all)")
    spot_run: SpotRun = Field(
        "best_validation", description="SPoT's one source run: 'best_validation', the source's stored run with the "
        "best validation metric (SPoT's own rule: the best source checkpoint); 'same_seed', the source's run on the "
        "target run's origin seed, as the paper's scripts pair them (soft_prompts/origin_k/<source>.bin for a target "
        "run on origin_k): the sources need vectors of the target seeds")
    tpv_coefficient: float | None = Field(
        None, description="TPV inits: the coefficient c on the sum of source vectors; None: chosen per run on the "
        "target's validation split over the paper's grid 0..1 step 0.05 (tpv.addition's rule)")
    auto_k: int = Field(2, ge=1, description="tpv_auto: number of stored tasks combined")
    probe_shots: int = Field(16, ge=1, description="tpv_auto: examples per class of the probe run")
    probe_steps: int = Field(20, ge=1, description="tpv_auto: steps of the probe run")
    vectors_source: str | None = Field(None, description="which stored source vectors: the VectorMeta.source of "
                                       "the job that wrote them (e.g. 'tpv sweep demo-sweep-1a2b3c4d'); see "
                                       "tpv.compose.task_vectors")
    vector_seeds: list[int] | None = Field(None, description="only source vectors of these origin seeds")


def base_config(config: TransferConfig, task: str, seed: int, prompt_length: int, **extra: Any) -> TrainConfig:
    steps = config.few_shot_steps
    data = deep_merge({"max_steps": steps, "eval_every": max(1, steps // 2)}, config.train)
    data = deep_merge(data, {"seed": seed, "data_seed": seed, "prompt_length": prompt_length, "progress": False,
                             "backbone": {"model": config.backbone}, **extra})
    return TrainConfig.preset(config.preset, task, **data)


def source_vectors(store, backbone_id: str, config: TransferConfig, task: str, length: int | None = None) -> list:
    """The source vectors every init of this job reads (the one task-term rule: tpv.compose.task_vectors)."""
    from tpv.compose import task_vectors

    return task_vectors(store, backbone_id, task, length, config.vector_seeds, config.vectors_source)


def source_prompt_length(store, backbone_id: str, config: TransferConfig) -> int:
    """The sources' prompt length L (every source must have vectors of it); the target runs use it too."""
    sources = sorted({s for srcs in config.targets.values() for s in srcs})
    lengths = {s: source_vectors(store, backbone_id, config, s)[0].prompt_length for s in sources}
    if len(set(lengths.values())) != 1:
        raise JobConfigError(f"the source tasks have vectors of different prompt lengths {lengths}")
    return next(iter(lengths.values()))


def pick_similar_tasks(store, backbone_id: str, config: TransferConfig, probe, exclude: set[str],
                       k: int) -> list[tuple[str, float]]:
    """The k stored tasks whose vectors (the task-term rule's set) are most similar to the probe (flat cosine,
    mean over their seeds)."""
    from tpv.vectors import cosine_similarity

    scores: dict[str, float] = {}
    for task in sorted({m.task for m in store.list(backbone_id, kind="task")} - exclude):
        try:
            metas = source_vectors(store, backbone_id, config, task, probe.meta.prompt_length)
        except (LookupError, ValueError):  # no vectors of this set, length or seeds: not a candidate
            continue
        cosines = [cosine_similarity(probe, store.get(m.vector_id, backbone_id)) for m in metas]
        scores[task] = sum(cosines) / len(cosines)
    return sorted(scores.items(), key=lambda x: -x[1])[:k]


@dataclass(frozen=True)
class Cell:
    """What an init builder reads: the job, its store, the target with its sources, and the run's origin seed."""

    config: TransferConfig
    store: Any
    backbone_id: str
    length: int
    target: str
    sources: list[str]
    seed: int
    auto_sources: dict[tuple[str, int], list[tuple[str, float]]]


def spot_run(cell: Cell, task: str) -> str:
    """The vector id of the one stored run of `task` whose tuned prompt SPoT starts from (`spot_run`)."""
    from tpv.tasks import get_task

    metas = source_vectors(cell.store, cell.backbone_id, cell.config, task, cell.length)
    if cell.config.spot_run == "same_seed":
        same = [m for m in metas if m.origin_seed == cell.seed]
        if not same:
            raise JobConfigError(f"spot_run 'same_seed': source {task!r} has no vector of origin seed {cell.seed} "
                                 f"(it has seeds {[m.origin_seed for m in metas]})")
        return same[0].vector_id
    metric = get_task(task).metric
    return max(metas, key=lambda m: (m.metrics.get(metric, -math.inf), m.metrics.get("label_logprob", -math.inf),
                                     -m.origin_seed)).vector_id


def _composition(cell: Cell, tasks: list[str]) -> InitSpec:
    config = cell.config
    narrow = {"seeds": config.vector_seeds, "source": config.vectors_source}
    return InitSpec(kind="composition", choose_coefficient=config.tpv_coefficient is None, composition={
        "terms": [{"task": t, "weight": 1.0, **{k: v for k, v in narrow.items() if v is not None}} for t in tasks],
        "method": "weighted", "coefficient": 1.0 if config.tpv_coefficient is None else config.tpv_coefficient})


@dataclass(frozen=True)
class TransferInit:
    name: str  # as the tables print it
    build: Callable[[Cell], InitSpec]


#: the one registry of the transfer's inits: name -> its table name and the InitSpec of its starting prompt
TRANSFER_INITS: dict[str, TransferInit] = {
    "random": TransferInit("random origin", lambda cell: InitSpec()),
    "spot": TransferInit("SPoT", lambda cell: InitSpec(kind="tuned", vector_ids=[spot_run(cell, cell.sources[0])])),
    "multi_spot": TransferInit("multi-source SPoT", lambda cell: InitSpec(
        kind="tuned", vector_ids=[spot_run(cell, s) for s in cell.sources])),
    "tpv": TransferInit("TPV", lambda cell: _composition(cell, cell.sources)),
    "tpv_auto": TransferInit("TPV (auto sources)", lambda cell: _composition(
        cell, [t for t, _ in cell.auto_sources[(cell.target, cell.seed)]])),
}
INITS: list[str] = list(TRANSFER_INITS)
INIT_NAMES = {k: v.name for k, v in TRANSFER_INITS.items()}


def run_transfer(config: TransferConfig) -> dict[str, Any]:
    """Probe runs (tpv_auto), then every cell; returns tables, chosen sources and file paths."""
    from tpv.store import VectorStore

    loc = config.locations.resolved()
    store = VectorStore(loc.store)
    bb_id = backbone_id_for(config.backbone)
    length = source_prompt_length(store, bb_id, config)
    key = short_hash(config.model_dump(mode="json", exclude=set(config.RUN_ONLY)))
    experiment = f"{config.name}-{key}"
    cpus = config.resources.cpus_per_trial
    common = config.grid_args()
    require_data(list(config.targets))
    init_ray()

    # 1. probes for tpv_auto: a short run on each (target, seed), its vector kept in a scratch store
    auto_sources: dict[tuple[str, int], list[tuple[str, float]]] = {}
    if "tpv_auto" in config.inits:
        probe_store_uri = posixpath.join(loc.storage_path, f"{experiment}-probes") if "://" in loc.storage_path \
            else str(Path(loc.storage_path) / f"{experiment}-probes")
        probe_specs = [
            TrialSpec(label=f"{target}/probe/s{seed}", output_store=probe_store_uri, cpus=cpus,
                      source_tag=f"tpv transfer probe {experiment}",
                      train=base_config(config, target, seed, length, shots=config.probe_shots,
                                        max_steps=config.probe_steps, eval_every=config.probe_steps))
            for target in config.targets for seed in config.seeds
        ]
        print(f"[transfer] {len(probe_specs)} probe runs for tpv_auto", flush=True)
        run_grid(specs_space(probe_specs, *plan_packs(config.resources, probe_specs)),
                 experiment=f"{experiment}-probe", job="transfer probe", reuse_finished=True, **common)
        probes = VectorStore(probe_store_uri)
        for target in config.targets:
            for seed in config.seeds:
                metas = probes.list(bb_id, task=target, seed=seed)
                if not metas:
                    raise JobConfigError(f"the probe run for {target}/s{seed} left no vector in {probe_store_uri}")
                probe = probes.get(metas[0].vector_id, bb_id)
                picked = pick_similar_tasks(store, bb_id, config, probe, {target}, config.auto_k)
                if not picked:
                    raise JobConfigError(f"tpv_auto: no stored task vectors besides {target} to pick from")
                auto_sources[(target, seed)] = picked
                print(f"[transfer] tpv_auto {target}/s{seed}: "
                      + ", ".join(f"{t} (cos {c:.2f})" for t, c in picked), flush=True)

    # 2. the cells
    specs = []
    for target, sources in config.targets.items():
        for shots in config.shots:
            for init in config.inits:
                for seed in config.seeds:
                    init_spec = TRANSFER_INITS[init].build(Cell(config, store, bb_id, length, target, sources, seed,
                                                                auto_sources))
                    extra: dict[str, Any] = {"init": init_spec.model_dump()}
                    if shots:
                        extra["shots"] = shots
                    specs.append(TrialSpec(
                        label=f"{target}/{init}/k{shots}/s{seed}", train=base_config(config, target, seed, length,
                                                                                     **extra),
                        source_store=loc.store, eval_only=shots == 0, test_split=True,
                        test_examples=config.test_examples, cpus=cpus,
                        tags={"target": target, "init": init, "shots": shots, "seed": seed},
                    ))
    print(f"[transfer] {len(specs)} cells: {len(config.targets)} target(s) x {len(config.shots)} shot counts x "
          f"{len(config.inits)} inits x {len(config.seeds)} seeds", flush=True)
    outcomes = run_grid(specs_space(specs, *plan_packs(config.resources, specs)), experiment=experiment,
                        job="transfer", reuse_finished=True, **common)
    return summarize(config, outcomes, auto_sources, Path(loc.out_dir) / config.name, loc.store)


def summarize(config: TransferConfig, outcomes, auto_sources, out: Path, store_uri: str) -> dict[str, Any]:
    from tpv.tasks import get_task

    long_rows = []
    for o in outcomes:
        t = o.spec.tags
        long_rows.append({"target": t["target"], "init": t["init"], "shots": t["shots"], "seed": t["seed"],
                          "metric": get_task(t["target"]).metric, "test": o.metrics.get("test_metric"),
                          "val": o.metrics.get("val_metric"), "steps": o.metrics.get("steps"),
                          "seconds": o.metrics.get("seconds"), "error": o.error})
    sections, tables, plots = [], {}, {}
    for target, sources in config.targets.items():
        metric = get_task(target).metric
        rows = []
        for init in config.inits:
            row = {"init": INIT_NAMES[init]}
            for shots in config.shots:
                vals = [r["test"] for r in long_rows if (r["target"], r["init"], r["shots"]) == (target, init, shots)
                        and r["test"] is not None]
                row[f"k={shots}"] = pm(vals)
            rows.append(row)
        columns = ["init", *[f"k={s}" for s in config.shots]]
        table = markdown_table(rows, columns)
        tables[target] = table
        auto = {s: auto_sources.get((target, s)) for s in config.seeds if (target, s) in auto_sources}
        auto_text = "; ".join(f"s{s}: " + ", ".join(f"{t} ({c:.2f})" for t, c in picked)
                              for s, picked in auto.items())
        sections += [f"## {target} ({metric}, test) <- sources {', '.join(sources)}", "",
                     f"seeds {config.seeds}; {scored_examples(target, config.test_examples)} per cell; mean ± std over "
                     "seeds; k = training examples per class", "", table, ""]
        tests = significance(config, target, long_rows)
        if tests:
            sections += ["Each init vs the random origin, paired by seed: t-test, Bonferroni over the "
                         f"{len(tests)} comparisons of this target.", "",
                         markdown_table(tests, ["shots", "init", "gain", "t", "p", "p (Bonferroni)", "significant"]),
                         ""]
        if auto_text:
            sections += [f"tpv_auto picked (cosine to the probe): {auto_text}", ""]
        plots[target] = str(plot_target(out / f"{target}.png", target, metric, config, long_rows))
    errors = [r for r in long_rows if r["error"]]
    md = "\n".join([f"# Few-shot transfer `{config.name}` ({config.backbone}, preset {config.preset})", "",
                    f"store: `{store_uri}`", "", *sections])
    paths = {"markdown": str(atomic_write(out / "transfer.md", md)),
             "csv": str(atomic_write(out / "transfer.csv", csv_text(
                 long_rows, ["target", "init", "shots", "seed", "metric", "test", "val", "steps", "seconds",
                             "error"]))),
             **{f"plot_{t}": p for t, p in plots.items()}}
    return {"rows": long_rows, "tables": tables, "markdown": md, "paths": paths, "failed": len(errors),
            "auto_sources": {f"{t}/s{s}": v for (t, s), v in auto_sources.items()}}


def scored_examples(target: str, limit: int | None) -> str:
    """How many test examples each cell scored (one of them is the resolution of every figure in the table), saying
    so when the split is smaller than asked."""
    from tpv.tasks import load_split

    n = len(load_split(target, "test", limit=limit, seed=0))
    return f"{n} test examples" + (" (the whole test split)" if limit is None or n < limit else "")


def significance(config: TransferConfig, target: str, long_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The paper's test: each init against the random origin at each k, paired by seed, Bonferroni-corrected."""
    from tune_jobs.stats import bonferroni, paired_t_test

    if "random" not in config.inits or len(config.seeds) < 2:
        return []
    value = {(r["init"], r["shots"], r["seed"]): r["test"] for r in long_rows
             if r["target"] == target and r["test"] is not None}
    pairs = [(k, init) for k in config.shots for init in config.inits if init != "random"]
    rows = []
    for k, init in pairs:
        seeds = [s for s in config.seeds if (init, k, s) in value and ("random", k, s) in value]
        a, b = [value[(init, k, s)] for s in seeds], [value[("random", k, s)] for s in seeds]
        t, p = paired_t_test(a, b) if len(seeds) >= 2 else (math.nan, math.nan)
        corrected = bonferroni(p, len(pairs))
        rows.append({"shots": k, "init": INIT_NAMES[init], "gain": (sum(a) - sum(b)) / len(seeds) if seeds else None,
                     "t": t, "p": p, "p (Bonferroni)": corrected,
                     "significant": ("no" if not corrected < 0.05 else
                                     "yes, the same gain on every seed" if math.isinf(t) else "yes")})
    return rows


def plot_target(path: Path, target: str, metric: str, config: TransferConfig, rows) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = list(range(len(config.shots)))
    for init in config.inits:
        means, stds = [], []
        for shots in config.shots:
            vals = [r["test"] for r in rows if (r["target"], r["init"], r["shots"]) == (target, init, shots)
                    and r["test"] is not None]
            mean, std = mean_std(vals)
            means.append(mean)
            stds.append(std)
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=INIT_NAMES[init])
    ax.set_xticks(xs, [str(s) for s in config.shots])
    ax.set_xlabel("training examples per class (k)")
    ax.set_ylabel(f"test {metric}")
    ax.set_title(f"{target}: few-shot transfer ({config.backbone})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tpv transfer",
        description="Few-shot transfer to target tasks from stored source vectors: random / SPoT / multi-source "
                    "SPoT / TPV / TPV with automatically picked sources, over shots and seeds; tables (mean ± std) "
                    "and a shots-vs-metric plot per target.",
        epilog="Default groups (target <- sources):\n" + "\n".join(f"  {t} <- {', '.join(s)}"
                                                                   for t, s in DEFAULT_GROUPS.items())
               + "\n\nExamples:\n  tpv transfer --targets imdb --shots 0 8 32 --seeds 10 11\n"
                 "  tpv transfer --targets snips=trec,bbc_news --inits random tpv tpv_auto\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML file with TransferConfig fields; flags override it")
    p.add_argument("--name", help="experiment name (folder of its tables)")
    p.add_argument("--targets", nargs="+", metavar="TARGET[=SRC,SRC]",
                   help="targets, each with its sources after '=' (default: "
                        + " ".join(f"{target}={','.join(sources)}" for target, sources in DEFAULT_GROUPS.items()) + ")")
    p.add_argument("--shots", nargs="+", type=int, help="examples per class (default 0 8 32 128)")
    p.add_argument("--inits", nargs="+", choices=INITS, help="inits to compare (default all)")
    p.add_argument("--seeds", nargs="+", type=int, help="origin seeds of the target runs (default 10 11 12)")
    p.add_argument("--backbone", help=f"bundled name or model folder (default {DEFAULT_BACKBONE})")
    p.add_argument("--preset", choices=list(PRESETS), help="the recipe (tpv.train.PRESETS; default causal_cpu)")
    p.add_argument("--few-shot-steps", type=int, help="training steps per few-shot run")
    p.add_argument("--test-examples", type=int, help="test examples per cell (default 200)")
    p.add_argument("--tpv-coefficient", type=float, help="coefficient on the sum of source vectors (default: chosen "
                   "per run on the target's validation over the paper's grid 0..1 step 0.05)")
    p.add_argument("--spot-run", choices=["best_validation", "same_seed"], help="SPoT's one source run: the best on "
                   "the source's validation (default), or the run on the target run's origin seed (the paper's pairing)")
    p.add_argument("--auto-k", type=int, help="tpv_auto: how many similar tasks to combine (default 2)")
    p.add_argument("--vectors-source", help="only source vectors one job wrote (their VectorMeta.source, e.g. "
                   "'tpv sweep mid-1a2b3c4d')")
    p.add_argument("--vector-seeds", nargs="+", type=int, help="only source vectors of these origin seeds")
    p.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="TrainConfig overrides, e.g. lr=0.1")
    add_resource_args(p)
    p.add_argument("--fresh", action="store_true", help="do not reuse an earlier run of the same experiment")
    p.add_argument("--verbose", type=int, help="Ray Tune console verbosity 0-3")
    add_location_args(p)
    return p


def parse_targets(items: list[str]) -> dict[str, list[str]]:
    targets = {}
    for item in items:
        name, _, sources = item.partition("=")
        if sources:
            targets[name] = [s for s in sources.split(",") if s]
        elif name in DEFAULT_GROUPS:
            targets[name] = DEFAULT_GROUPS[name]
        else:
            raise JobConfigError(f"no default sources for target {name!r}: write {name}=SOURCE1,SOURCE2")
    return targets


def config_from_cli(args) -> TransferConfig:
    """The TransferConfig that `tpv transfer` flags (and its --config file) describe."""
    return config_from_args(TransferConfig, args, ("name", "shots", "inits", "seeds", "backbone", "preset",
                                                   "few_shot_steps", "test_examples", "tpv_coefficient", "spot_run", "auto_k",
                                                   "vectors_source", "vector_seeds", "verbose"),
                            targets=parse_targets(args.targets) if args.targets else None)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_cli(args)
    for target in config.targets:
        held_out("tpv transfer", origin_seeds=[*config.seeds, *(config.vector_seeds or [])], target=target)
    start_ray(args)
    result = run_transfer(config)
    print_result(result)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
