"""What every Tune job shares: where things live, starting Ray, the one trial function, running a grid.

- Locations. The vector store is a URI (a local folder by default, `$TPV_STORE` or `<TPV_HOME>/store`; any
  `pyarrow.fs` URI such as `s3://bucket/tpv/store` or a shared mount on a cluster). Ray Tune's `storage_path`
  (experiment state + trial checkpoints) follows the same setting: the `ray_results` folder next to the store
  (`$TPV_RAY_RESULTS` overrides), so a cluster whose store is on shared storage checkpoints there too. Tables and
  plots go to a local folder (`<TPV_HOME>/reports`).
- Ray. `init_ray` connects to `$RAY_ADDRESS` (or `--address`) when set, else starts a local Ray, and passes
  TPV_HOME & co. to the workers so they read the same data and model caches.
- The trial. `train_trial` wraps `tpv.train.train`: it skips a (backbone, task, seed) pair already in the output
  store, resumes from `tune.get_checkpoint()`, reports metrics with a `tune.Checkpoint` at every evaluation, and at
  the end evaluates on the test split (transfer) and/or writes the vector to the store (sweep). Training logic
  lives only in `tpv.train`.
- The grid. `run_grid` runs a list of trial specs with `tune.with_resources`, FIFO, `FailureConfig` retries from
  the last checkpoint, and resumes an interrupted experiment of the same name with `Tuner.restore`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import posixpath
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray.tune import Callback

from tpv.backbone import Backbone, BackboneConfig, backbone_id_for
from tpv.paths import default_store, tpv_home
from tpv.train import TrainConfig

#: environment variables a worker needs to see the driver's data, models and store
WORKER_ENV = ("TPV_HOME", "TPV_ARCHIVE_DIR", "TPV_STORE", "TPV_RAY_RESULTS", "HF_HOME", "HF_HUB_OFFLINE",
              "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM")


# ------------------------------------------------------------------------------------------------- locations

def _is_uri(location: str) -> bool:
    return "://" in location


def default_storage_path(store: str) -> str:
    """`$TPV_RAY_RESULTS`, else the `ray_results` folder beside the store (same filesystem, local or remote)."""
    if os.environ.get("TPV_RAY_RESULTS"):
        return absolute(os.environ["TPV_RAY_RESULTS"])
    if _is_uri(store):
        scheme, rest = store.split("://", 1)
        parent = posixpath.dirname(rest.rstrip("/"))
        return f"{scheme}://{parent}/ray_results" if parent else f"{scheme}://ray_results"
    return str(Path(store).expanduser().absolute().parent / "ray_results")


def default_out_dir() -> Path:
    return tpv_home() / "reports"


def absolute(location: str) -> str:
    """Ray wants absolute local paths; URIs pass through."""
    return location if _is_uri(location) else str(Path(location).expanduser().absolute())


class Locations(BaseModel):
    """Where a job reads and writes. Empty fields take the defaults above."""

    store: str = Field(default_factory=default_store, description="vector store: local folder or pyarrow URI")
    storage_path: str | None = Field(None, description="Ray Tune storage_path (default: beside the store)")
    out_dir: str | None = Field(None, description="local folder for tables and plots (default <TPV_HOME>/reports)")

    def resolved(self) -> Locations:
        store = absolute(self.store)
        return Locations(
            store=store,
            storage_path=absolute(self.storage_path) if self.storage_path else default_storage_path(store),
            out_dir=str(Path(self.out_dir).expanduser().absolute()) if self.out_dir else str(default_out_dir()),
        )


def add_location_args(parser) -> None:
    parser.add_argument("--store", help="vector store: a folder or a pyarrow URI (s3://..., gs://..., hdfs://...); "
                        "default $TPV_STORE or <TPV_HOME>/store")
    parser.add_argument("--storage-path", help="Ray Tune storage_path for experiment state and checkpoints "
                        "(default: the ray_results folder beside the store)")
    parser.add_argument("--out", help="folder for tables and plots (default <TPV_HOME>/reports)")
    parser.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS; unset: start a local Ray)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all); ignored on a cluster")


def resources_from_args(args, data: dict[str, Any]) -> dict[str, Any]:
    """The `resources` section of a job config with --cpus-per-trial/--gpus-per-trial/--max-concurrent applied."""
    resources = dict(data.get("resources", {}))
    for key in ("cpus_per_trial", "gpus_per_trial", "max_concurrent"):
        if getattr(args, key, None) is not None:
            resources[key] = getattr(args, key)
    return resources


def locations_from_args(args, base: Locations | None = None) -> Locations:
    data = (base or Locations()).model_dump()
    for key, attr in (("store", "store"), ("storage_path", "storage_path"), ("out_dir", "out")):
        if getattr(args, attr, None):
            data[key] = getattr(args, attr)
    return Locations(**data).resolved()


# --------------------------------------------------------------------------------------------------------- ray

def init_ray(address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = False):
    """Connect to `address` / `$RAY_ADDRESS` if given, else start a local Ray; no-op if Ray is already up."""
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    env = {k: os.environ[k] for k in WORKER_ENV if os.environ.get(k)}
    kwargs: dict[str, Any] = dict(runtime_env={"env_vars": env}, log_to_driver=log_to_driver,
                                  logging_level=logging.WARNING)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
    return ray


# ------------------------------------------------------------------------------------------------- the trial

class TrialSpec(BaseModel):
    """One trial: a TrainConfig plus where it reads source vectors and writes its own, and what it reports."""

    model_config = ConfigDict(extra="forbid")

    label: str = Field(description="short human name, e.g. 'trec/s0'")
    train: TrainConfig
    source_store: str | None = Field(None, description="store the init reads vectors from (SPoT / TPV inits)")
    output_store: str | None = Field(None, description="store the finished vector is written to (None: not kept)")
    source_tag: str | None = Field(None, description="VectorMeta.source of the written vector")
    skip_if_stored: bool = Field(True, description="skip when output_store already has (backbone, task, seed, L)")
    eval_only: bool = Field(False, description="zero-shot: evaluate the initial prompt, train nothing")
    test_split: bool = Field(False, description="evaluate the final prompt on the test split")
    test_examples: int | None = Field(None, ge=1, description="test examples (None: all)")
    cpus: float = Field(1.0, gt=0, description="torch threads = max(1, round(cpus))")
    crash_marker: str | None = Field(None, description="fault injection for tests: die once after the first "
                                     "checkpoint unless this file exists (then create it)")
    tags: dict[str, Any] = Field(default_factory=dict, description="free-form fields for result tables")


_BACKBONES: dict[str, Backbone] = {}


def load_backbone(config: BackboneConfig) -> Backbone:
    """One backbone per worker process and config (Tune reuses actors across trials)."""
    key = config.model_dump_json()
    if key not in _BACKBONES:
        _BACKBONES.clear()  # one model in memory per worker
        _BACKBONES[key] = Backbone.load(config)
    return _BACKBONES[key]


def set_threads(cpus: float) -> None:
    import torch

    n = max(1, int(round(cpus)))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def stored_pairs(store, backbone_id: str, task: str, seed: int, prompt_length: int | None) -> list:
    """Task vectors already stored for (backbone, task, origin seed[, L])."""
    try:
        metas = store.list(backbone_id, task=task, seed=seed, kind="task")
    except Exception:  # noqa: BLE001  a missing folder lists as empty; a bad name is not stored either
        return []
    return [m for m in metas if prompt_length is None or m.prompt_length == prompt_length]


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool):
            out[k] = float(v)
        elif isinstance(v, (int, float)):
            out[k] = float(v)
    return out


def _test_metrics(backbone: Backbone, prompt, task_name: str, limit: int | None) -> dict[str, float]:
    from tpv.evaluate import evaluate
    from tpv.tasks import get_task, load_split

    task = get_task(task_name)
    examples = load_split(task_name, "test", limit=limit, seed=0)
    metrics = evaluate(backbone, prompt, task, examples)
    return {f"test_{k}": v for k, v in metrics.items()} | {"test_metric": metrics[task.metric]}


def total_steps(config) -> int:
    """The step count `tpv.train.train` will run (for progress lines)."""
    if config.max_steps:
        return config.max_steps
    from tpv.train import training_examples

    n = len(training_examples(config))
    return max(1, math.ceil(config.epochs * math.ceil(n / config.batch_size)))


def train_trial(config: dict[str, Any]) -> None:
    """The Ray Tune function trainable of every job: `config = {"spec": TrialSpec as a dict}`."""
    from ray import tune

    from tpv.prompt import make_origin
    from tpv.store import VectorStore
    from tpv.tasks import get_task
    from tpv.train import TrainCheckpoint, initial_prompt, prompt_length_for, train

    spec = TrialSpec.model_validate(config["spec"])
    set_threads(spec.cpus)
    cfg = spec.train
    metric_name = get_task(cfg.task).metric
    bb_id = backbone_id_for(cfg.backbone.model)
    out = VectorStore(spec.output_store) if spec.output_store else None
    if out is not None and spec.skip_if_stored:
        existing = stored_pairs(out, bb_id, cfg.task, cfg.seed, cfg.prompt_length)
        if existing:
            tune.report({"done": 1.0, "skipped": 1.0, "vector_id": existing[0].vector_id,
                         "val_metric": float(existing[0].metrics.get(metric_name, math.nan))})
            return
    started = time.perf_counter()
    backbone = load_backbone(cfg.backbone)
    source = VectorStore(spec.source_store) if spec.source_store else None

    if spec.eval_only:
        origin = make_origin(backbone, prompt_length_for(cfg, backbone), cfg.seed)
        prompt = initial_prompt(cfg, backbone, origin, source)
        final = {"done": 1.0, "steps": 0.0, "seconds": time.perf_counter() - started}
        final |= _test_metrics(backbone, prompt, cfg.task, spec.test_examples)
        tune.report(final)
        return

    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume = TrainCheckpoint.load(folder)
    resumed_from = float(resume.step) if resume is not None else 0.0
    total = float(total_steps(cfg))

    def report(step: int, metrics: dict[str, float], state: TrainCheckpoint) -> None:
        with tempfile.TemporaryDirectory(prefix="tpv-ckpt-") as folder:
            state.save(folder)
            tune.report({**numeric(metrics), "total_steps": total, "resumed_from": resumed_from},
                        checkpoint=tune.Checkpoint.from_directory(folder))
        if spec.crash_marker and not Path(spec.crash_marker).exists():
            Path(spec.crash_marker).write_text(f"{spec.label} died after step {step}\n")
            os._exit(17)  # a killed worker, as far as Ray can tell

    result = train(cfg, backbone=backbone, store=source, callback=report, resume=resume)
    final = {"done": 1.0, "steps": float(result.steps), "seconds": time.perf_counter() - started,
             "resumed_from": resumed_from, "total_steps": total,
             "val_metric": float(result.metrics.get(metric_name, math.nan)),
             **{f"val_{k}": v for k, v in numeric(result.metrics).items()}}
    if spec.test_split:
        final |= _test_metrics(backbone, result.tuned, cfg.task, spec.test_examples)
    if out is not None:
        vector = result.vector(backbone.backbone_id, source=spec.source_tag)
        final["vector_id"] = out.put(vector)
        out.put_origin(backbone.backbone_id, result.origin.shape[0], cfg.seed, result.origin)
    tune.report(final)


# -------------------------------------------------------------------------------------------------- the grid

def short_hash(data: Any, n: int = 8) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:n]


def trial_name(trial) -> str:
    return str(trial.config.get("spec", {}).get("label", trial.trial_id)).replace("/", "-")


def trial_dirname(trial) -> str:
    return f"{trial_name(trial)}_{trial.trial_id}"


class Progress(Callback):
    """Prints one line per evaluation and per finished / retried / failed trial (a Ray Tune Callback)."""

    def __init__(self, job: str):
        self.job = job
        self.t0 = time.monotonic()

    def _print(self, msg: str) -> None:
        print(f"[{self.job} {time.monotonic() - self.t0:6.0f}s] {msg}", flush=True)

    @staticmethod
    def _label(trial) -> str:
        return str(trial.config.get("spec", {}).get("label", trial.trial_id))

    @staticmethod
    def _count(trials, trial=None) -> str:
        done = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}
        if trial is not None:
            done.add(trial.trial_id)
        return f"{len(done)}/{len(trials)}"

    def on_trial_result(self, iteration, trials, trial, result, **info):
        label = self._label(trial)
        if result.get("skipped"):
            self._print(f"{label}: already in the store ({result.get('vector_id')}), skipped")
        elif result.get("done"):
            parts = [f"done in {result.get('seconds', 0):.0f}s"]
            if "val_metric" in result:
                parts.append(f"val {result['val_metric']:.3f}")
            if "test_metric" in result:
                parts.append(f"test {result['test_metric']:.3f}")
            if result.get("vector_id"):
                parts.append(f"-> {result['vector_id']}")
            self._print(f"{label}: " + ", ".join(parts))
        elif "step" in result:
            # the task's metric: accuracy is always reported, so any other one is the task's
            metric = next((k for k in ("f1", "macro_f1", "pearson", "spearman", "accuracy") if k in result), None)
            shown = f" {metric}={result[metric]:.3f}" if metric else ""
            resumed = f" (resumed at {int(result['resumed_from'])})" if result.get("resumed_from") else ""
            self._print(f"{label}: step {int(result['step'])}/{int(result.get('total_steps', 0))}"
                        f"{shown} best={result.get('best', float('nan')):.3f}{resumed}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._print(f"{self._count(trials, trial)} trials finished")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._print(f"{self._label(trial)}: the trial died; retrying from its last checkpoint")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._print(f"{self._label(trial)}: FAILED (no retries left); see {trial.local_path}")


class GridOutcome(BaseModel):
    """One finished (or failed) trial of a grid, flattened for tables."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    spec: TrialSpec
    metrics: dict[str, Any]
    error: str | None = None
    path: str | None = None


def run_grid(
    specs: Sequence[TrialSpec], *, experiment: str, storage_path: str, cpus: float = 1.0, gpus: float = 0.0,
    max_failures: int = 2, max_concurrent: int | None = None, restore: bool = True, reuse_finished: bool = False,
    verbose: int = 0, job: str = "tune", trainable: Callable[[dict], None] | None = None,
) -> list[GridOutcome]:
    """Run `specs` as a Tune grid (FIFO), or resume the interrupted experiment `experiment` if one exists.

    A finished experiment of that name is reused as it is when `reuse_finished` (its results come back without
    running anything), else run again in the same folder (the sweep does that when the store lost vectors).
    """
    from ray import tune

    trainable = tune.with_resources(trainable or train_trial, {"cpu": cpus, "gpu": gpus})
    path = posixpath.join(storage_path, experiment) if _is_uri(storage_path) else str(Path(storage_path) / experiment)
    tuner = None
    if restore and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
        earlier = tuner.get_results()
        finished = all(r.error is None and (r.metrics or {}).get("done") for r in earlier)
        if finished and not reuse_finished:
            print(f"[{job}] the experiment at {path} already finished; starting it again", flush=True)
            tuner = None
        else:
            print(f"[{job}] resuming the experiment at {path} (Tuner.restore)", flush=True)
    if tuner is None:
        tuner = tune.Tuner(
            trainable,
            param_space={"spec": tune.grid_search([s.model_dump(mode="json") for s in specs])},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=max_concurrent, reuse_actors=True,
                trial_name_creator=trial_name, trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=experiment, storage_path=storage_path, verbose=verbose,
                failure_config=tune.FailureConfig(max_failures=max_failures),
                # keep every checkpoint (each is a few prompt-sized tensors): with num_to_keep, a driver killed
                # between deleting an old checkpoint and snapshotting its state cannot be restored
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
                callbacks=[Progress(job)],
            ),
        )
    grid = tuner.fit()
    outcomes = []
    for result in grid:
        spec = TrialSpec.model_validate(result.config["spec"])
        outcomes.append(GridOutcome(spec=spec, metrics=dict(result.metrics or {}),
                                    error=None if result.error is None else _one_line(result.error),
                                    path=str(result.path)))
    return outcomes


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[-1] if text else type(error).__name__)[:300]


# ------------------------------------------------------------------------------------------------- tables

def fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.{digits}f}"
    return "" if value is None else str(value)


def print_result(result: dict[str, Any]) -> None:
    """A job's markdown table and where its files are, at the end of a command."""
    print()
    print(result["markdown"])
    width = max(map(len, result["paths"]), default=0)
    for key, path in result["paths"].items():
        print(f"{key:>{width}}: {path}")


def markdown_table(rows: Iterable[dict[str, Any]], columns: Sequence[str], digits: int = 3) -> str:
    rows = list(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c), digits) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def csv_text(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c) for c in columns})
    return buffer.getvalue()


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std


def pm(values: Sequence[float], digits: int = 3) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def parse_overrides(pairs: Sequence[str] | None) -> dict[str, Any]:
    """`key=value` pairs (values parsed as YAML, dotted keys nest): `--set max_steps=100 backbone.dtype=float32`."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml_config(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: expected a mapping at the top level")
    return data


def eprint(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)
