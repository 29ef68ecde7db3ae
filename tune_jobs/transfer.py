"""`tpv transfer`: few-shot transfer from stored source vectors to target tasks, every init side by side.

For each target, each number of shots (k examples per class; 0 = evaluate the init as it is) and each origin
seed, one Ray Tune trial per init:

- `random`      the run's own origin (plain prompt tuning)
- `spot`        SPoT: the tuned prompt of the group's first source (its best stored vector on validation)
- `multi_spot`  multi-source SPoT: the mean of the sources' tuned prompts
- `tpv`         TPV: a fresh origin + coefficient * sum of the sources' task prompt vectors (each source task is the
                mean of its stored vectors over origin seeds)
- `tpv_auto`    TPV whose sources are picked automatically: a short probe run on the target (probe_shots per class,
                probe_steps steps) gives a probe vector; the `auto_k` stored tasks most similar to it (row-mean
                cosine) are combined as in `tpv`

The runs use fresh origin seeds (default 10, 11, 12: not the sweep's), so TPV inits also test the cross-origin
claim. Each cell's test metric is reported as mean +- std over seeds in markdown/CSV tables, with a
shots-vs-metric plot per target. Default source -> target groups follow DATA.md.

    tpv transfer --targets imdb --shots 0 8 32 --seeds 10 11
    tpv transfer --config transfer.yaml
"""

from __future__ import annotations

import argparse
import math
import posixpath
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tpv.bundled import DEFAULT_BACKBONE
from tpv.train import InitSpec, TrainConfig
from tpv.backbone import backbone_id_for
from tune_jobs.common import (
    Locations,
    TrialSpec,
    add_location_args,
    csv_text,
    deep_merge,
    init_ray,
    load_yaml_config,
    locations_from_args,
    resources_from_args,
    markdown_table,
    print_result,
    mean_std,
    parse_overrides,
    pm,
    run_grid,
    short_hash,
    write_text,
)
from tune_jobs.sweep import Resources

Init = Literal["random", "spot", "multi_spot", "tpv", "tpv_auto"]
INITS: list[str] = ["random", "spot", "multi_spot", "tpv", "tpv_auto"]
INIT_NAMES = {"random": "random origin", "spot": "SPoT", "multi_spot": "multi-source SPoT", "tpv": "TPV",
              "tpv_auto": "TPV (auto sources)"}

#: source -> target groups of DATA.md (in the paper's spirit: MNLI+QNLI -> SciTail/SNLI, SST-2+Yelp -> IMDB...)
DEFAULT_GROUPS: dict[str, list[str]] = {
    "epistemic_reasoning": ["vitaminc", "boolq"],
    "presuppositions_nli": ["vitaminc", "boolq"],
    "imdb": ["rotten_tomatoes", "tweets"],
    "yelp": ["rotten_tomatoes", "tweets"],
    "snips": ["trec", "bbc_news"],
}


class TransferConfig(BaseModel):
    """A transfer experiment; loadable from YAML, flags override."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("transfer", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    targets: dict[str, list[str]] = Field(default_factory=lambda: dict(DEFAULT_GROUPS),
                                          description="target task -> its source tasks")
    shots: list[int] = Field(default_factory=lambda: [0, 8, 32, 128], description="examples per class; 0 = none")
    inits: list[Init] = Field(default_factory=lambda: list(INITS))
    seeds: list[int] = Field(default_factory=lambda: [10, 11, 12], min_length=1,
                             description="origin (and few-shot sample) seeds of the target runs")
    backbone: str = DEFAULT_BACKBONE
    budget: Literal["cpu_demo", "paper"] = "cpu_demo"
    train: dict[str, Any] = Field(default_factory=dict, description="TrainConfig fields over the budget preset")
    few_shot_steps: int | None = Field(None, ge=1, description="steps per few-shot run (default: cpu_demo 40, "
                                       "paper 1000)")
    test_examples: int | None = Field(200, ge=1, description="test examples per cell (None: all)")
    tpv_coefficient: float = Field(1.0, description="coefficient on the sum of source vectors (TPV inits); "
                                   "`tpv search-weights` picks one on validation")
    auto_k: int = Field(2, ge=1, description="tpv_auto: number of stored tasks combined")
    probe_shots: int = Field(16, ge=1, description="tpv_auto: examples per class of the probe run")
    probe_steps: int = Field(20, ge=1, description="tpv_auto: steps of the probe run")
    resources: Resources = Field(default_factory=Resources)
    max_failures: int = Field(2, ge=0)
    locations: Locations = Field(default_factory=Locations)
    fresh: bool = False
    verbose: int = Field(0, ge=0, le=3)


def base_config(config: TransferConfig, task: str, seed: int, prompt_length: int, **extra: Any) -> TrainConfig:
    preset = TrainConfig.cpu_demo(task) if config.budget == "cpu_demo" else TrainConfig(task=task)
    steps = config.few_shot_steps or (40 if config.budget == "cpu_demo" else 1000)
    data = deep_merge(preset.model_dump(), {"max_steps": steps, "eval_every": max(1, steps // 2)})
    data = deep_merge(data, config.train)
    data = deep_merge(data, {"task": task, "seed": seed, "data_seed": seed, "prompt_length": prompt_length,
                             "progress": False, "backbone": {"model": config.backbone}, **extra})
    return TrainConfig.model_validate(data)


def _best_vector(store, backbone_id: str, task: str, prompt_length: int):
    from tpv.tasks import get_task

    metric = get_task(task).metric
    metas = [m for m in store.list(backbone_id, task=task, kind="task") if m.prompt_length == prompt_length]
    if not metas:
        return None
    return max(metas, key=lambda m: (m.metrics.get(metric, -math.inf), -m.origin_seed))


def source_prompt_length(store, backbone_id: str, config: TransferConfig) -> int:
    if config.train.get("prompt_length"):
        return int(config.train["prompt_length"])
    lengths = [m.prompt_length for srcs in config.targets.values() for s in srcs
               for m in store.list(backbone_id, task=s, kind="task")]
    if not lengths:
        missing = sorted({s for srcs in config.targets.values() for s in srcs})
        raise SystemExit(f"no stored vectors for the source tasks {missing} (backbone {backbone_id}); run "
                         f"`tpv sweep --tasks {' '.join(missing)}` first")
    return max(set(lengths), key=lengths.count)


def check_sources(store, backbone_id: str, config: TransferConfig, length: int) -> None:
    missing = sorted({s for srcs in config.targets.values() for s in srcs
                      if _best_vector(store, backbone_id, s, length) is None})
    if missing:
        raise SystemExit(f"no stored vectors (L={length}) for source task(s) {missing} on {backbone_id}; run "
                         f"`tpv sweep --tasks {' '.join(missing)}` first")


def pick_similar_tasks(store, backbone_id: str, probe, exclude: set[str], k: int) -> list[tuple[str, float]]:
    """The k stored tasks whose vectors are most similar to the probe (mean row-mean cosine over their seeds)."""
    from tpv.vectors import cosine_similarity

    scores: dict[str, list[float]] = {}
    for meta in store.list(backbone_id, kind="task"):
        if meta.task in exclude or meta.prompt_length != probe.meta.prompt_length:
            continue
        vector = store.get(meta.vector_id, backbone_id)
        scores.setdefault(meta.task, []).append(cosine_similarity(probe, vector))
    ranked = sorted(((t, sum(v) / len(v)) for t, v in scores.items()), key=lambda x: -x[1])
    return ranked[:k]


def _composition(tasks: list[str], coefficient: float) -> InitSpec:
    return InitSpec(kind="composition", composition={
        "terms": [{"task": t, "weight": 1.0} for t in tasks], "method": "weighted", "coefficient": coefficient})


def run_transfer(config: TransferConfig) -> dict[str, Any]:
    """Probe runs (tpv_auto), then every cell; returns tables, chosen sources and file paths."""
    from tpv.store import VectorStore

    loc = config.locations.resolved()
    store = VectorStore(loc.store)
    bb_id = backbone_id_for(config.backbone)
    length = source_prompt_length(store, bb_id, config)
    check_sources(store, bb_id, config, length)
    key = short_hash(config.model_dump(mode="json", exclude={"locations", "fresh", "verbose", "resources",
                                                            "max_failures"}))
    experiment = f"{config.name}-{key}"
    cpus, gpus = config.resources.cpus_per_trial, config.resources.gpus_per_trial
    common = dict(storage_path=loc.storage_path, cpus=cpus, gpus=gpus, max_failures=config.max_failures,
                  max_concurrent=config.resources.max_concurrent, restore=not config.fresh, verbose=config.verbose)
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
        run_grid(probe_specs, experiment=f"{experiment}-probe", job="transfer probe", reuse_finished=True, **common)
        probes = VectorStore(probe_store_uri)
        for target in config.targets:
            for seed in config.seeds:
                metas = probes.list(bb_id, task=target, seed=seed)
                if not metas:
                    raise SystemExit(f"the probe run for {target}/s{seed} left no vector in {probe_store_uri}")
                probe = probes.get(metas[0].vector_id, bb_id)
                picked = pick_similar_tasks(store, bb_id, probe, {target}, config.auto_k)
                if not picked:
                    raise SystemExit(f"tpv_auto: no stored task vectors besides {target} to pick from")
                auto_sources[(target, seed)] = picked
                print(f"[transfer] tpv_auto {target}/s{seed}: "
                      + ", ".join(f"{t} (cos {c:.2f})" for t, c in picked), flush=True)

    # 2. the cells
    specs = []
    for target, sources in config.targets.items():
        best = {s: _best_vector(store, bb_id, s, length) for s in sources}
        for shots in config.shots:
            for init in config.inits:
                for seed in config.seeds:
                    if init == "random":
                        init_spec = InitSpec()
                    elif init == "spot":
                        init_spec = InitSpec(kind="tuned", vector_ids=[best[sources[0]].vector_id])
                    elif init == "multi_spot":
                        init_spec = InitSpec(kind="tuned", vector_ids=[best[s].vector_id for s in sources])
                    elif init == "tpv":
                        init_spec = _composition(sources, config.tpv_coefficient)
                    else:
                        init_spec = _composition([t for t, _ in auto_sources[(target, seed)]], config.tpv_coefficient)
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
    outcomes = run_grid(specs, experiment=experiment, job="transfer", reuse_finished=True, **common)
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
                     f"seeds {config.seeds}; mean ± std over seeds; k = training examples per class", "", table, ""]
        if auto_text:
            sections += [f"tpv_auto picked (cosine to the probe): {auto_text}", ""]
        plots[target] = str(plot_target(out / f"{target}.png", target, metric, config, long_rows))
    errors = [r for r in long_rows if r["error"]]
    md = "\n".join([f"# Few-shot transfer `{config.name}` ({config.backbone}, {config.budget} budget)", "",
                    f"store: `{store_uri}`", "", *sections])
    paths = {"markdown": str(write_text(out / "transfer.md", md)),
             "csv": str(write_text(out / "transfer.csv", csv_text(
                 long_rows, ["target", "init", "shots", "seed", "metric", "test", "val", "steps", "seconds",
                             "error"]))),
             **{f"plot_{t}": p for t, p in plots.items()}}
    return {"rows": long_rows, "tables": tables, "markdown": md, "paths": paths, "failed": len(errors),
            "auto_sources": {f"{t}/s{s}": v for (t, s), v in auto_sources.items()}}


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
                   help="targets, each with its sources after '=' (default: the DATA.md groups)")
    p.add_argument("--shots", nargs="+", type=int, help="examples per class (default 0 8 32 128)")
    p.add_argument("--inits", nargs="+", choices=INITS, help="inits to compare (default all)")
    p.add_argument("--seeds", nargs="+", type=int, help="origin seeds of the target runs (default 10 11 12)")
    p.add_argument("--backbone", help=f"bundled name or model folder (default {DEFAULT_BACKBONE})")
    p.add_argument("--budget", choices=["cpu_demo", "paper"], help="training budget preset (default cpu_demo)")
    p.add_argument("--few-shot-steps", type=int, help="training steps per few-shot run")
    p.add_argument("--test-examples", type=int, help="test examples per cell (default 200)")
    p.add_argument("--tpv-coefficient", type=float, help="coefficient on the sum of source vectors (default 1)")
    p.add_argument("--auto-k", type=int, help="tpv_auto: how many similar tasks to combine (default 2)")
    p.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="TrainConfig overrides, e.g. lr=0.1")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (default 1)")
    p.add_argument("--gpus-per-trial", type=float, help="GPU fraction per trial (default 0)")
    p.add_argument("--max-concurrent", type=int, help="at most this many trials at once")
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
            raise SystemExit(f"no default sources for target {name!r}: write {name}=SOURCE1,SOURCE2")
    return targets


def config_from_args(args: argparse.Namespace) -> TransferConfig:
    data = load_yaml_config(args.config)
    for key in ("name", "shots", "inits", "seeds", "backbone", "budget", "few_shot_steps", "test_examples",
                "tpv_coefficient", "auto_k", "verbose"):
        if getattr(args, key, None) is not None:
            data[key] = getattr(args, key)
    if args.targets:
        data["targets"] = parse_targets(args.targets)
    if args.set:
        data["train"] = deep_merge(data.get("train", {}), parse_overrides(args.set))
    data["resources"] = resources_from_args(args, data)
    data["fresh"] = args.fresh or data.get("fresh", False)
    config = TransferConfig.model_validate(data)
    config.locations = locations_from_args(args, config.locations)
    return config


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    if args.address or args.num_cpus:
        init_ray(args.address, args.num_cpus)
    result = run_transfer(config)
    print_result(result)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
