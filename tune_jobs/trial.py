"""The trial every training job runs: one run, or a pack of runs (`tpv.packed.train_pack`), inside Ray Tune.

`train_trial` skips each (backbone, task, seed) pair already in the output store, resumes each run from its own
state in `tune.get_checkpoint()`, reports metrics with a `tune.Checkpoint` at every step where runs were evaluated,
and as each run finishes evaluates it on the test split (transfer) and/or writes its vector to the store (sweep),
the moment it finishes. Training logic lives only in `tpv.train` / `tpv.packed`.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from tpv.backbone import Backbone, backbone_id_for
from tpv.train import TrainConfig, snapshot_source, snapshot_vector
from tune_jobs.runtime import load_backbone, set_threads

if TYPE_CHECKING:
    from tpv.train import TrainCheckpoint


class TrialSpec(BaseModel):
    """One trial: a TrainConfig plus where it reads source vectors and writes its own, and what it reports."""

    model_config = ConfigDict(extra="forbid")

    label: str = Field(description="short human name, e.g. 'trec/s0'")
    train: TrainConfig
    source_store: str | None = Field(None, description="store the init reads vectors from (SPoT / TPV inits)")
    output_store: str | None = Field(None, description="store the finished vector is written to (None: not kept)")
    source_tag: str | None = Field(None, description="VectorMeta.source of the written vector")
    store_ids: dict[str, str] = Field(default_factory=dict, description="VectorStore.identity() of each store above, "
                                      "as the driver saw it (`grid.specs_space` fills it); the trial refuses to run "
                                      "where it sees another store under that URI")
    skip_if_stored: bool = Field(True, description="skip when output_store already has this (backbone, task, seed, "
                                 "L) from this source_tag")
    snapshot_steps: list[int] = Field(default_factory=list, description="also store the prompt as it is at these "
                                      "evaluation steps, tagged '<source_tag>@<step>' (studies of training length)")
    eval_only: bool = Field(False, description="zero-shot: evaluate the initial prompt, train nothing")
    test_split: bool = Field(False, description="evaluate the final prompt on the test split")
    test_examples: int | None = Field(None, ge=1, description="test examples (None: all)")
    cpus: float = Field(1.0, gt=0, description="torch threads = max(1, round(cpus))")
    tags: dict[str, Any] = Field(default_factory=dict, description="free-form fields for result tables")


def stored_pairs(store, backbone_id: str, task: str, seed: int, prompt_length: int | None, source: str | None) -> list:
    """Task vectors already stored for (backbone, task, origin seed[, L]) by the job tagged `source`."""
    metas = store.list(backbone_id, task=task, seed=seed, kind="task")
    return [m for m in metas if (prompt_length is None or m.prompt_length == prompt_length) and m.source == source]


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool):
            out[k] = float(v)
        elif isinstance(v, (int, float)):
            out[k] = float(v)
    return out


def _test_metrics(backbone: Backbone, prompts: list, task_names: list[str],
                  limits: list[int | None]) -> list[dict[str, float]]:
    """Each prompt's metrics on its task's test split, in one `evaluate_many`."""
    from tpv.evaluate import evaluate_many
    from tpv.tasks import get_task, load_split

    tasks = [get_task(name) for name in task_names]
    examples = [load_split(name, "test", limit=limit, seed=0) for name, limit in zip(task_names, limits)]
    found = evaluate_many(backbone, prompts, tasks, examples)
    return [{f"test_{k}": v for k, v in m.items()} | {"test_metric": m[t.metric]} for m, t in zip(found, tasks)]


def planned_steps(config: TrainConfig) -> int:
    """The step count `tpv.train.train` will run (for progress lines)."""
    from tpv.train import total_steps, training_examples

    return config.max_steps or total_steps(config, len(training_examples(config)))


def trial_specs(config: dict[str, Any]) -> list[TrialSpec]:
    """The runs of a trial: `{"spec": TrialSpec}` is one run, `{"pack": [TrialSpec, ...]}` a pack of runs."""
    return [TrialSpec.model_validate(s) for s in config["pack"]] if "pack" in config else \
        [TrialSpec.model_validate(config["spec"])]


def save_pack(folder: str, states: dict[int, TrainCheckpoint], finals: dict[int, dict[str, Any]]) -> None:
    """A trial's checkpoint: each run's TrainCheckpoint in `<index>/`, and the final metrics of the runs that
    finished (their vectors are already in the store) in `finished.json`."""
    for index, state in states.items():
        state.save(Path(folder) / str(index))
    (Path(folder) / "finished.json").write_text(json.dumps({str(i): m for i, m in finals.items()}))


def load_pack(folder: str) -> tuple[dict[int, TrainCheckpoint], dict[int, dict[str, Any]]]:
    from tpv.train import TrainCheckpoint

    root = Path(folder)
    states = {int(p.name): TrainCheckpoint.load(p) for p in root.iterdir() if p.is_dir() and p.name.isdigit()}
    finals = {int(i): m for i, m in json.loads((root / "finished.json").read_text()).items()}
    return states, finals


def train_trial(config: dict[str, Any], after_checkpoint: Callable[[TrialSpec, int], None] | None = None) -> None:
    """The Ray Tune function trainable of every training job: one run (`{"spec": ...}`) or a pack of runs
    (`{"pack": [...], "recompute": bool}`, `tpv.packed.train_pack`: the model loaded once, passes shared on a GPU).

    Every run is skipped when already stored, resumes from its own state in the trial's checkpoint, and writes its
    vector the moment it finishes. A checkpoint is reported at every step where runs were evaluated.
    `after_checkpoint(spec, step)` runs once per evaluated run after its checkpoint is reported (a wrapper's place
    to watch or, in the fault-tolerance tests, to kill the worker)."""
    from ray import tune

    from tpv.packed import train_pack
    from tpv.prompt import make_origin
    from tpv.store import VectorStore
    from tpv.tasks import get_task
    from tpv.train import initial_prompt, prompt_length_for

    specs = trial_specs(config)
    for uri, store_id in {u: i for spec in specs for u, i in spec.store_ids.items()}.items():
        VectorStore(uri).check_identity(store_id)  # a node without the shared store fails here, before any work
    packed = "pack" in config
    set_threads(specs[0].cpus)
    started = time.perf_counter()
    finals: dict[int, dict[str, Any]] = {}
    stores = {s.output_store: VectorStore(s.output_store) for s in specs if s.output_store}
    for i, spec in enumerate(specs):
        cfg = spec.train
        if spec.output_store and spec.skip_if_stored:
            existing = stored_pairs(stores[spec.output_store], backbone_id_for(cfg.backbone.model), cfg.task, cfg.seed,
                                    cfg.prompt_length, spec.source_tag)
            if existing:
                finals[i] = {"done": 1.0, "skipped": 1.0, "vector_id": existing[0].vector_id,
                             "val_metric": float(existing[0].metrics.get(get_task(cfg.task).metric, math.nan))}
    states: dict[int, TrainCheckpoint] = {}
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            states, earlier = load_pack(folder)
        finals = earlier | finals
    resumed_from = {i: float(state.step) for i, state in states.items()}
    todo = [i for i in range(len(specs)) if i not in finals]
    backbone = load_backbone(specs[todo[0]].train.backbone) if todo else None

    zero_shot = [i for i in todo if specs[i].eval_only]
    if zero_shot:  # evaluate the initial prompts, train nothing
        prompts = []
        for i in zero_shot:
            cfg, spec = specs[i].train, specs[i]
            origin = make_origin(backbone, prompt_length_for(cfg, backbone), cfg.seed)
            source = VectorStore(spec.source_store) if spec.source_store else None
            prompts.append(initial_prompt(cfg, backbone, origin, source))
        tested = _test_metrics(backbone, prompts, [specs[i].train.task for i in zero_shot],
                               [specs[i].test_examples for i in zero_shot])
        for i, metrics in zip(zero_shot, tested):
            finals[i] = {"done": 1.0, "steps": 0.0, "seconds": time.perf_counter() - started, **metrics}

    training = [i for i in todo if not specs[i].eval_only]
    totals = {i: float(planned_steps(specs[i].train)) for i in training}

    def finish(k: int, result) -> None:
        """A run ended: its final metrics, its test metrics, its vector in the store, now."""
        i, spec = training[k], specs[training[k]]
        cfg = spec.train
        final = {"done": 1.0, "steps": float(result.steps), "seconds": time.perf_counter() - started,
                 "resumed_from": resumed_from.get(i, 0.0), "total_steps": totals[i],
                 "val_metric": float(result.metrics.get(get_task(cfg.task).metric, math.nan)),
                 **{f"val_{name}": v for name, v in numeric(result.metrics).items()}}
        if spec.test_split:
            final |= _test_metrics(backbone, [result.tuned], [cfg.task], [spec.test_examples])[0]
        if spec.output_store:
            out = stores[spec.output_store]
            final["vector_id"] = out.put(result.vector(backbone.backbone_id, source=spec.source_tag))
            out.put_origin(backbone.backbone_id, result.origin.shape[0], cfg.seed, result.origin,
                           embedded_dtype=backbone.dtype)
        finals[i] = final

    def report(evaluations) -> None:
        """Snapshots at chosen steps, then one Tune report with the pack's checkpoint."""
        shown = {}
        for e in evaluations:
            i = training[e.index]
            spec, cfg = specs[i], specs[i].train
            states[i] = e.state
            out = stores.get(spec.output_store)
            if out is not None and e.step in spec.snapshot_steps:
                tag = snapshot_source(spec.source_tag, e.step)
                bb_id, length = backbone.backbone_id, e.state.prompt.shape[0]
                if not stored_pairs(out, bb_id, cfg.task, cfg.seed, length, tag):  # once, even on retry
                    out.put(snapshot_vector(cfg, e.state, make_origin(backbone, length, cfg.seed), bb_id,
                                            spec.source_tag, numeric(e.metrics)))
            shown[spec.label] = {**numeric(e.metrics), "total_steps": totals[i],
                                 "resumed_from": resumed_from.get(i, 0.0)}
        with tempfile.TemporaryDirectory(prefix="tpv-ckpt-") as folder:
            save_pack(folder, states, finals)
            metrics = {"evals": shown, "step": float(max(e.step for e in evaluations))} if packed else \
                next(iter(shown.values()))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
        if after_checkpoint is not None:
            for e in evaluations:
                after_checkpoint(specs[training[e.index]], e.step)

    if training:
        sources = {s.source_store: VectorStore(s.source_store) for s in specs if s.source_store}
        source_store = next(iter(sources.values()), None)
        if len(sources) > 1:
            raise ValueError("the runs of a pack read source vectors from one store")
        train_pack([specs[i].train for i in training], backbone, source_store, on_eval=report, on_finish=finish,
                   resume=[states.get(i) for i in training], recompute=bool(config.get("recompute")))
    if packed:
        tune.report({"done": 1.0, "seconds": time.perf_counter() - started,
                     "members": {specs[i].label: finals[i] for i in range(len(specs))}})
    else:
        tune.report(finals[0])
