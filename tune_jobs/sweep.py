"""`tpv sweep`: prompt-tune every task x origin seed (x backbone) with Ray Tune and fill the vector store.

One trial per (backbone, task, seed), FIFO (ASHA across tasks would stop the hard ones early), each with
`tune.with_resources` from the config (CPUs, or a GPU fraction so several small trials share one GPU). A trial
reports metrics and a checkpoint at every evaluation; a trial that dies is retried from its last checkpoint
(`FailureConfig`); Ctrl-C stops it (its table written, exit 130) and the same command resumes it with
`Tuner.restore`; pairs already in the store are skipped (before Tune even starts, and again inside each trial), so
re-running never duplicates vectors.

    tpv sweep --tasks rotten_tomatoes tweets trec sms_spam --seeds 0 1
    tpv sweep --config sweep.yaml --set max_steps=400 --gpus-per-trial 0.25
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from tpv.backbone import backbone_id_for
from tpv.bundled import DEFAULT_BACKBONE
from tpv.names import Name
from tpv.paths import atomic_write
from tpv.tasks import require_data
from tpv.train import PRESETS, PresetName, TrainConfig
from tune_jobs.config import (
    JobConfig,
    add_resource_args,
    config_from_args,
    deep_merge,
    start_ray,
)
from tune_jobs.grid import GridInterrupted, GridOutcome, plan_packs, run_grid, short_hash, specs_space
from tune_jobs.locations import add_location_args
from tune_jobs.runtime import init_ray
from tune_jobs.selections import held_out
from tune_jobs.tables import csv_text, markdown_table
from tune_jobs.trial import TrialSpec, stored_pairs, train_trial


class SweepConfig(JobConfig):
    """A sweep; loadable from YAML (`--config`), every field overridable on the command line."""

    name: Name = "sweep"
    tasks: list[str] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    backbones: list[str] = Field(default_factory=lambda: [DEFAULT_BACKBONE], min_length=1)
    preset: PresetName = Field("causal_cpu", description="the recipe (tpv.train.PRESETS) the train fields override")
    train: dict[str, Any] = Field(default_factory=dict, description="TrainConfig fields over the preset")
    force: bool = Field(False, description="train pairs the store already has (adds vectors)")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        from tpv.tasks import get_task

        for task in tasks:
            get_task(task)  # UnknownTaskError names the known ones
        return list(dict.fromkeys(tasks))

    def train_configs(self) -> list[TrainConfig]:
        """One TrainConfig per (backbone, task, seed); only the origin seed differs between seeds."""
        configs = []
        for model in self.backbones:
            for task in self.tasks:
                for seed in self.seeds:
                    overrides = deep_merge(self.train, {"seed": seed, "progress": False, "backbone": {"model": model}})
                    configs.append(TrainConfig.preset(self.preset, task, **overrides))
        return configs


def experiment_name(config: SweepConfig, configs: list[TrainConfig]) -> str:
    """Same sweep -> same name, so re-running it finds (and restores) the interrupted experiment."""
    return f"{config.name}-{short_hash([c.model_dump(mode='json') for c in configs])}"


def source_tag(name: str, config: TrainConfig) -> str:
    """The VectorMeta.source of the vectors a sweep writes: its name and its recipe (the TrainConfig less task, seed
    and model), so a larger sweep of the same recipe extends the same set; name a task term's vector set with it."""
    recipe = config.model_dump(mode="json", exclude={"task", "seed", "progress"})
    recipe["backbone"].pop("model")
    return f"tpv sweep {name}-{short_hash(recipe)}"


def label(config: TrainConfig, several_backbones: bool) -> str:
    head = f"{backbone_id_for(config.backbone.model)}:" if several_backbones else ""
    return f"{head}{config.task}/s{config.seed}"


def run_sweep(config: SweepConfig, trainable: Callable[[dict], None] = train_trial) -> dict[str, Any]:
    """Run (or resume) the sweep; returns {"rows": [...], "table": markdown, "paths": {...}}.

    `trainable` is the Tune trainable of each pair (`train_trial`, or a wrapper of it)."""
    from tpv.store import VectorStore

    loc = config.locations.resolved()
    store = VectorStore(loc.store)
    configs = config.train_configs()
    several = len(config.backbones) > 1
    experiment = experiment_name(config, configs)
    rows: list[dict[str, Any]] = []
    pending: list[TrainConfig] = []
    for cfg in configs:
        have = stored_pairs(store, backbone_id_for(cfg.backbone.model), cfg.task, cfg.seed, cfg.prompt_length,
                            source_tag(config.name, cfg))
        if have and not config.force:
            rows.append(_stored_row(cfg, have[0], several, "in store"))
        else:
            pending.append(cfg)
    print(f"[sweep] {len(configs)} (task, seed) pairs: {len(configs) - len(pending)} already in the store "
          f"{loc.store}, {len(pending)} to train", flush=True)
    if pending:
        require_data([c.task for c in pending])
        init_ray()
        specs = [
            TrialSpec(
                label=label(cfg, several), train=cfg, output_store=loc.store, skip_if_stored=not config.force,
                source_tag=source_tag(config.name, cfg), cpus=config.resources.cpus_per_trial,
            )
            for cfg in pending
        ]
        pack, recompute = plan_packs(config.resources, specs)
        if pack > 1:
            print(f"[sweep] {len(specs)} pairs in packs of up to {pack}"
                  f"{' (recomputing activations to fit memory)' if recompute else ''}", flush=True)
        try:
            outcomes = run_grid(
                specs_space(specs, pack, recompute), experiment=experiment, job="sweep", trainable=trainable,
                **config.grid_args(),
            )
        except GridInterrupted as stopped:  # the table still tells which pairs are stored and which are not
            _write_table(config, configs, rows + [_outcome_row(o, several) for o in stopped.outcomes], several)
            raise
        rows += [_outcome_row(o, several) for o in outcomes]
    table, paths = _write_table(config, configs, rows, several)
    failed = [r for r in rows if r["status"] == "failed"]
    return {"rows": rows, "table": table, "paths": paths, "failed": len(failed), "experiment": experiment,
            "source": source_tag(config.name, configs[0]),
            "store": loc.store, "storage_path": loc.storage_path}


COLUMNS = ["pair", "status", "metric", "val", "test", "best_step", "steps", "seconds", "vector_id"]


def _write_table(config: SweepConfig, configs: list[TrainConfig], rows: list[dict[str, Any]],
                 several: bool) -> tuple[str, dict[str, str]]:
    """Sort the rows in the sweep's order and write them as `sweep.md` and `sweep.csv`; returns (markdown, paths)."""
    order = {(label(c, several)): i for i, c in enumerate(configs)}
    rows.sort(key=lambda r: order.get(r["pair"], math.inf))
    loc = config.locations.resolved()
    out = Path(loc.out_dir) / config.name
    table = markdown_table(rows, COLUMNS)
    return table, {
        "table_md": str(atomic_write(out / "sweep.md", f"# Sweep `{config.name}`\n\nstore: `{loc.store}`\n\n{table}\n")),
        "table_csv": str(atomic_write(out / "sweep.csv", csv_text(rows, COLUMNS))),
    }


def _int(value: Any) -> int | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else int(round(value))


def _stored_row(cfg: TrainConfig, meta, several: bool, status: str) -> dict[str, Any]:
    from tpv.tasks import get_task

    metric = get_task(cfg.task).metric
    return {"pair": label(cfg, several), "status": status, "metric": metric,
            "val": meta.metrics.get(metric), "best_step": _int(meta.metrics.get("best_step")),
            "vector_id": meta.vector_id}


def _outcome_row(outcome: GridOutcome, several: bool) -> dict[str, Any]:
    from tpv.tasks import get_task

    cfg, m = outcome.spec.train, outcome.metrics
    status = ("failed" if outcome.error else "in store" if m.get("skipped") else "trained" if m.get("done")
              else "not finished (interrupted: run the same command again)")
    if m.get("resumed_from") and status == "trained":
        status = f"trained (resumed at step {int(m['resumed_from'])})"
    return {"pair": label(cfg, several), "status": status, "metric": get_task(cfg.task).metric,
            "val": m.get("val_metric"), "test": m.get("test_metric"), "best_step": _int(m.get("val_best_step")),
            "steps": _int(m.get("steps")), "seconds": _int(m.get("seconds")), "vector_id": m.get("vector_id") or outcome.error}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tpv sweep",
        description="Prompt-tune every task x origin seed with Ray Tune and write the task prompt vectors to the "
                    "store. Pairs already stored are skipped; an interrupted sweep resumes from its checkpoints.",
        epilog="Examples:\n  tpv sweep --tasks rotten_tomatoes tweets trec sms_spam --seeds 0 1\n"
               "  tpv sweep --config sweep.yaml --preset causal --gpus-per-trial 0.25\n"
               "  tpv sweep --tasks rotten_tomatoes tweets trec sms_spam --seeds 0 1 --pack 4\n"
               "  RAY_ADDRESS=auto tpv sweep --config sweep.yaml --store /mnt/shared/tpv/store\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML file with SweepConfig fields (tasks, seeds, backbones, preset, train, "
                   "resources, ...); command-line flags override it")
    p.add_argument("--name", help="sweep name (folder of its tables; with a hash, the Tune experiment name)")
    p.add_argument("--tasks", nargs="+", help="task names (see `tpv tasks list`)")
    p.add_argument("--seeds", nargs="+", type=int, help="origin seeds (default 0 1)")
    p.add_argument("--backbones", nargs="+", help=f"bundled names or local model folders (default {DEFAULT_BACKBONE})")
    p.add_argument("--preset", choices=list(PRESETS), help="the recipe (tpv.train.PRESETS; default causal_cpu)")
    p.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="TrainConfig overrides, e.g. max_steps=200 "
                   "prompt_length=20 backbone.max_source_tokens=128")
    add_resource_args(p)
    p.add_argument("--max-failures", type=int, help="retries of a dead trial from its checkpoint (default 2)")
    p.add_argument("--force", action="store_true", help="train pairs that the store already has")
    p.add_argument("--fresh", action="store_true", help="do not resume an interrupted experiment of this sweep")
    p.add_argument("--verbose", type=int, help="Ray Tune console verbosity 0-3 (default 0: tpv's progress lines)")
    add_location_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(SweepConfig, args, ("name", "tasks", "seeds", "backbones", "preset", "max_failures",
                                                  "verbose"), required=("tasks",))
    config.train_configs()  # a bad --set is one clear error before any warning
    held_out("tpv sweep", config.tasks, config.seeds)
    start_ray(args)
    outcome = run_sweep(config)
    print()
    print(outcome["table"])
    print(f"\nvectors: {outcome['store']}\ntables:  {outcome['paths']['table_md']}\n"
          f"         {outcome['paths']['table_csv']}\nTune:    {outcome['storage_path']}/{outcome['experiment']}")
    if outcome["failed"]:
        print(f"{outcome['failed']} trial(s) failed; run the same command again to retry them from their "
              "checkpoints", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
