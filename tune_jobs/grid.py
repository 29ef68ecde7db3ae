"""The one grid runner of every job: a list of trial configs (or a search space) as a Ray Tune experiment.

`run_grid` runs trial specs with `tune.with_resources`, FIFO, `FailureConfig` retries from the last checkpoint, one
progress line per event, and resumes an interrupted experiment of the same name with `Tuner.restore`. A search
(Optuna through `ray.tune.search`) goes through the same function with `search`.

Packs: `specs_space(specs, pack=K)` puts the runs in packs of up to K and of even work (`pack_specs`), one Tune
trial per pack (`tpv.packed.train_pack`: the model loaded once, shared passes on a GPU); `run_grid` gives every run of
a pack its own `GridOutcome`, so jobs read packed and unpacked grids alike. `plan_packs` resolves `--pack` (K, and
whether a pack recomputes activations to fit its memory).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import posixpath
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict
from ray.tune import Callback

from tpv.errors import Interrupted, TpvError
from tpv.packed import pack_key
from tune_jobs.config import Resources
from tune_jobs.locations import _is_uri
from tune_jobs.trial import TrialSpec, train_trial


def short_hash(data: Any, n: int = 8) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:n]


def trial_name(trial) -> str:
    """The spec's label; a pack is named by its first run and how many more it holds."""
    pack = trial.config.get("pack")
    spec = pack[0] if pack else trial.config.get("spec", {})
    name = str(spec.get("label", trial.trial_id) if isinstance(spec, dict) else trial.trial_id).replace("/", "-")
    return f"{name}+{len(pack) - 1}" if pack and len(pack) > 1 else name


class Progress(Callback):
    """Prints one line per evaluation and per finished / retried / failed trial (a Ray Tune Callback)."""

    def __init__(self, job: str, name: Callable[[Any], str]):
        self.job = job
        self.name = name
        self.t0 = time.monotonic()

    def _print(self, msg: str) -> None:
        print(f"[{self.job} {time.monotonic() - self.t0:6.0f}s] {msg}", flush=True)

    def _label(self, trial) -> str:
        return self.name(trial)

    @staticmethod
    def _count(trials, trial=None) -> str:
        done = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}
        if trial is not None:
            done.add(trial.trial_id)
        return f"{len(done)}/{len(trials)}"

    def on_trial_result(self, iteration, trials, trial, result, **info):
        label = self._label(trial)
        if "members" in result:  # a pack finished: one line per run
            for member, final in result["members"].items():
                self._line(member, final)
        elif "evals" in result:  # a pack's evaluations at one step
            for member, metrics in result["evals"].items():
                self._line(member, metrics)
        else:
            self._line(label, result)

    def _line(self, label: str, result: dict) -> None:
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


class TrialsFailed(TpvError):
    """Trials of a job failed after their retries; the same command resumes them."""


class GridInterrupted(Interrupted):
    """Tune stopped the experiment (Ctrl-C) before every trial finished. It saved its state, so the same command
    resumes it; `outcomes` holds every run as far as it got, for a job that reports them before stopping."""

    def __init__(self, job: str, outcomes: list[GridOutcome]):
        super().__init__(f"{job}: stopped before all its trials finished; run the same command again to resume them "
                         "(finished runs are kept)")
        self.outcomes = outcomes


class GridOutcome(BaseModel):
    """One finished (or failed) trial, flattened for tables: its config, last metrics, and error if any."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    config: dict[str, Any]
    metrics: dict[str, Any]
    error: str | None = None
    path: str | None = None

    @property
    def spec(self) -> TrialSpec:
        """The trial spec of a training/evaluation trial (grids made of `TrialSpec`s)."""
        return TrialSpec.model_validate(self.config["spec"])


class Search(BaseModel):
    """A search instead of a grid: a `ray.tune.search` algorithm (e.g. OptunaSearch) over a search space."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    algorithm: Any
    metric: str
    mode: str = "max"
    num_samples: int
    scheduler: Any = None


def specs_space(specs: Sequence[TrialSpec], pack: int = 1, recompute: bool = False) -> dict[str, Any]:
    """The param space of a grid of trial specs: one trial per spec, or with `pack` > 1 one trial per pack
    (`recompute`: its layers' activations are recomputed in the backward pass, see `plan_packs`)."""
    from ray import tune

    specs = with_store_ids(specs)
    if pack <= 1:
        return {"spec": tune.grid_search([s.model_dump(mode="json") for s in specs])}
    return {"pack": tune.grid_search([[s.model_dump(mode="json") for s in p] for p in pack_specs(specs, pack)]),
            "recompute": recompute}


def with_store_ids(specs: Sequence[TrialSpec]) -> list[TrialSpec]:
    """The specs with the identity of every store they name, read here on the driver, so each trial can check that
    its node sees the same store (a node with its own folder under that path would fill a store nobody reads)."""
    from tpv.store import VectorStore

    uris = {uri for s in specs for uri in (s.output_store, s.source_store) if uri}
    ids = {uri: VectorStore(uri).identity() for uri in uris}
    return [s.model_copy(update={"store_ids": {u: ids[u] for u in (s.output_store, s.source_store) if u}})
            for s in specs]


def pack_specs(specs: Sequence[TrialSpec], size: int) -> list[list[TrialSpec]]:
    """Runs that can share a pack (one backbone and prompt length, `tpv.packed.pack_key`; one source store; one CPU
    count) in packs of at most `size`, as even as possible in count (n such runs make ceil(n / size) packs) and in
    work: longest runs first, each to the pack with the least work so far (`tpv.packed.run_costs`), so packs that
    run side by side end together. A pack lists its runs in their given order."""
    from tpv.packed import run_costs

    groups: dict[tuple, list[TrialSpec]] = {}
    for spec in specs:
        groups.setdefault((pack_key(spec.train), spec.source_store, spec.cpus), []).append(spec)
    packs = []
    for members in groups.values():
        n = math.ceil(len(members) / size)
        # one pack, or one run per pack: nothing to balance, so no tokenizer or data to read for the costs
        costs = run_costs([s.train for s in members]) if 1 < n < len(members) else [0.0] * len(members)
        room = [len(members) // n + (k < len(members) % n) for k in range(n)]
        work, chosen = [0.0] * n, [[] for _ in range(n)]
        for i in sorted(range(len(members)), key=lambda i: -costs[i]):
            k = min((k for k in range(n) if len(chosen[k]) < room[k]), key=lambda k: work[k])
            chosen[k].append(i)
            work[k] += costs[i]
        packs += [[members[i] for i in sorted(pack)] for pack in chosen]
    return packs


def plan_packs(resources: Resources, specs: Sequence[TrialSpec]) -> tuple[int, bool]:
    """(K, recompute) for `specs_space`: K is `resources.pack`, or for "auto" what a trial's share of the device's
    memory holds (`tpv.packed.auto_pack_size`), no more than keeps every trial slot of the cluster busy
    (ceil(runs / slots)); a pack whose activations would not fit its share recomputes them (`tpv.packed.pack_fits`).
    The memory is measured where trials run (`trial_memory`), not on the driver."""
    import ray

    from tpv.packed import auto_pack_size, pack_fits

    if resources.pack == 1 or not specs:
        return 1, False
    cluster = ray.cluster_resources()
    slots = int(cluster.get("CPU", 1) // resources.cpus_per_trial)
    if resources.gpus_per_trial:
        slots = min(slots, int(cluster.get("GPU", 0) // resources.gpus_per_trial))
    slots = max(1, min(slots, resources.max_concurrent or slots))
    device = "cuda" if resources.gpus_per_trial else "cpu"
    free = trial_memory(resources, device)
    configs = [s.train for s in specs]
    if resources.pack == "auto":
        return auto_pack_size(configs, slots, free, device), False
    size = min(resources.pack, len(specs))
    return size, not pack_fits(configs, size, free, device)


def trial_memory(resources: Resources, device: str) -> int:
    """Bytes of memory one trial may use, measured on a node trials run on (the driver's machine may be a head
    without the trials' GPU, or smaller than the workers) by a task that holds one trial's resources: a GPU trial
    gets its GPU fraction of the device's free memory; a CPU trial its share of the machine's available memory, shared
    by the trials that node runs at once."""
    import ray

    from tpv.memory import free_memory_bytes

    @ray.remote(**resources.remote_options())
    def measure() -> tuple[int, float]:
        node = ray.get_runtime_context().get_node_id()
        return free_memory_bytes(device), next(n["Resources"].get("CPU", 1.0) for n in ray.nodes()
                                               if n["NodeID"] == node)

    free, node_cpus = ray.get(measure.remote())
    if resources.gpus_per_trial:
        return int(free * min(resources.gpus_per_trial, 1.0))
    at_once = max(1, min(int(node_cpus // resources.cpus_per_trial), resources.max_concurrent or math.inf))
    return int(free / at_once)


def run_grid(
    param_space: dict[str, Any], *, experiment: str, storage_path: str, resources: Resources | None = None,
    max_failures: int = 2, restore: bool = True, reuse_finished: bool = False,
    verbose: int = 0, job: str = "tune", trainable: Callable[[dict], None] = train_trial,
    search: Search | None = None, name: Callable[[Any], str] | None = None,
) -> list[GridOutcome]:
    """Run `param_space` (e.g. `specs_space(specs)`) as a Tune experiment, or resume the interrupted experiment
    `experiment` if one exists.

    A finished experiment of that name is reused as it is when `reuse_finished` (its results come back without
    running anything), else run again in the same folder (the sweep does that when the store lost vectors).
    `name(trial)` names trials in progress lines and folders (default: the spec's label). Raises `GridInterrupted`
    when Tune was stopped (Ctrl-C) before every trial finished.
    """
    from ray import tune

    resources = resources or Resources()
    trainable = tune.with_resources(trainable, resources.tune_resources())
    path = posixpath.join(storage_path, experiment) if _is_uri(storage_path) else str(Path(storage_path) / experiment)
    namer = name or trial_name
    tuner = None
    if restore and tune.Tuner.can_restore(path):
        with _quiet_about_unstarted_trials():
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
            earlier = tuner.get_results()
        finished = all(r.error is None and (r.metrics or {}).get("done") for r in earlier)
        if finished and not reuse_finished:
            print(f"[{job}] the experiment at {path} already finished; starting it again", flush=True)
            tuner = None
        else:
            print(f"[{job}] resuming the experiment at {path} (Tuner.restore)", flush=True)
    if tuner is None:
        searching = dict(search_alg=search.algorithm, metric=search.metric, mode=search.mode,
                         num_samples=search.num_samples, scheduler=search.scheduler) if search else {}
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                max_concurrent_trials=resources.max_concurrent, reuse_actors=True, trial_name_creator=namer,
                trial_dirname_creator=lambda trial: f"{namer(trial).replace(',', '_')}_{trial.trial_id}", **searching,
            ),
            run_config=tune.RunConfig(
                name=experiment, storage_path=storage_path, verbose=verbose,
                failure_config=tune.FailureConfig(max_failures=max_failures),
                # keep every checkpoint (each is a few prompt-sized tensors): with num_to_keep, a driver killed
                # between deleting an old checkpoint and snapshotting its state cannot be restored
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
                callbacks=[Progress(job, namer)],
            ),
        )
    outcomes = []
    for result in tuner.fit():
        if result.config is None:  # a trial that never started: the run was interrupted first (_never_started)
            continue
        config, metrics = dict(result.config), dict(result.metrics or {})
        error = None if result.error is None else _one_line(result.error)
        if "pack" in config:  # one outcome per run of the pack
            members = metrics.get("members", {})
            outcomes += [GridOutcome(config={"spec": spec}, metrics=members.get(spec["label"], {}), error=error,
                                     path=str(result.path)) for spec in config["pack"]]
        else:
            outcomes.append(GridOutcome(config=config, metrics=metrics, error=error, path=str(result.path)))
    never = _never_started(param_space, outcomes)
    # Tune stopped by Ctrl-C returns normally: without this, a job would go on to its next stage with runs missing
    if never or _unfinished_trials(path, trainable, search.num_samples if search else 0):
        raise GridInterrupted(job, outcomes + never)
    return outcomes


def _unfinished_trials(path: str, trainable: Any, samples: int) -> int:
    """Trials of the experiment at `path` that neither finished nor failed, by the state Tune saved, plus the
    `samples` of a search it never started. After Ctrl-C, `fit` marks the trials it stops TERMINATED in memory, but
    the state it saved just before still holds them as unfinished (read back as PENDING, what a restore resumes)."""
    from ray import tune

    with _quiet_about_unstarted_trials():
        saved = tune.Tuner.restore(path, trainable=trainable).get_results()
    return max(samples - len(saved), 0) + len(saved) - saved.num_terminated - saved.num_errors


@contextmanager
def _quiet_about_unstarted_trials() -> Iterator[None]:
    """Ray Tune warns, with a FileNotFoundError line per trial, about every trial of a restored experiment that has
    no results yet; on a resume those are simply the runs still to do (their errors still reach `result.error`)."""
    log = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _never_started(param_space: dict[str, Any], outcomes: list[GridOutcome]) -> list[GridOutcome]:
    """The runs of a grid of specs (`specs_space`) that have no outcome, with no metrics: a run interrupted (Ctrl-C)
    before their trials started; running the job again starts them."""
    grid = param_space.get("spec", param_space.get("pack"))
    if not isinstance(grid, dict) or "grid_search" not in grid:
        return []
    specs = grid["grid_search"] if "spec" in param_space else [s for pack in grid["grid_search"] for s in pack]
    seen = {json.dumps(o.config["spec"], sort_keys=True) for o in outcomes if "spec" in o.config}
    return [GridOutcome(config={"spec": s}, metrics={}) for s in specs if json.dumps(s, sort_keys=True) not in seen]


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[-1] if text else type(error).__name__)[:300]
