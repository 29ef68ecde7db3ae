"""The trial every training job runs: `tpv.train.train` inside Ray Tune.

`train_trial` skips a (backbone, task, seed) pair already in the output store, resumes from `tune.get_checkpoint()`,
reports metrics with a `tune.Checkpoint` at every evaluation, and at the end evaluates on the test split (transfer)
and/or writes the vector to the store (sweep) the moment the run finishes. Training logic lives only in `tpv.train`.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tpv.backbone import Backbone, backbone_id_for
from tpv.train import TrainConfig
from tune_jobs.runtime import load_backbone, set_threads


class TrialSpec(BaseModel):
    """One trial: a TrainConfig plus where it reads source vectors and writes its own, and what it reports."""

    model_config = ConfigDict(extra="forbid")

    label: str = Field(description="short human name, e.g. 'trec/s0'")
    train: TrainConfig
    source_store: str | None = Field(None, description="store the init reads vectors from (SPoT / TPV inits)")
    output_store: str | None = Field(None, description="store the finished vector is written to (None: not kept)")
    source_tag: str | None = Field(None, description="VectorMeta.source of the written vector")
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


def snapshot_source(source_tag: str | None, step: int) -> str:
    """The VectorMeta.source of a trial's snapshot at `step`."""
    return f"{source_tag}@{step}"


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


def planned_steps(config: TrainConfig) -> int:
    """The step count `tpv.train.train` will run (for progress lines)."""
    from tpv.train import total_steps, training_examples

    return config.max_steps or total_steps(config, len(training_examples(config)))


def train_trial(config: dict[str, Any], after_checkpoint: Callable[[TrialSpec, int], None] | None = None) -> None:
    """The Ray Tune function trainable of every job: `config = {"spec": TrialSpec as a dict}`.

    `after_checkpoint(spec, step)` runs once each checkpoint is reported (a wrapper's place to watch or, in the
    fault-tolerance tests, to kill the worker)."""
    from ray import tune

    from tpv.prompt import make_origin
    from tpv.store import VectorStore
    from tpv.tasks import get_task
    from tpv.train import TrainCheckpoint, initial_prompt, prompt_length_for, train
    from tpv.vectors import TaskPromptVector

    spec = TrialSpec.model_validate(config["spec"])
    set_threads(spec.cpus)
    cfg = spec.train
    metric_name = get_task(cfg.task).metric
    bb_id = backbone_id_for(cfg.backbone.model)
    out = VectorStore(spec.output_store) if spec.output_store else None
    if out is not None and spec.skip_if_stored:
        existing = stored_pairs(out, bb_id, cfg.task, cfg.seed, cfg.prompt_length, spec.source_tag)
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
    total = float(planned_steps(cfg))

    def report(step: int, metrics: dict[str, float], state: TrainCheckpoint) -> None:
        if out is not None and step in spec.snapshot_steps:
            tag = snapshot_source(spec.source_tag, step)
            if not stored_pairs(out, bb_id, cfg.task, cfg.seed, state.prompt.shape[0], tag):  # once, even on retry
                origin = make_origin(backbone, state.prompt.shape[0], cfg.seed)
                out.put(TaskPromptVector.from_prompts(
                    state.prompt, origin, task=cfg.task, backbone_id=bb_id, origin_seed=cfg.seed, source=tag,
                    train_config=cfg.model_dump(mode="json"), metrics={**numeric(metrics), "step": float(step)}))
        with tempfile.TemporaryDirectory(prefix="tpv-ckpt-") as folder:
            state.save(folder)
            tune.report({**numeric(metrics), "total_steps": total, "resumed_from": resumed_from},
                        checkpoint=tune.Checkpoint.from_directory(folder))
        if after_checkpoint is not None:
            after_checkpoint(spec, step)

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
        out.put_origin(backbone.backbone_id, result.origin.shape[0], cfg.seed, result.origin,
                       embedded_dtype=backbone.dtype)
    tune.report(final)
