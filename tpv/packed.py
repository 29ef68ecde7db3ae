"""Packed training: K soft prompts tuned at once on one frozen backbone, one forward and one backward per step.

Each prompt is its own run (its TrainConfig: task, origin seed, data order, AdamW state, schedule, evaluations,
best prompt, patience, TrainCheckpoint), exactly as it would run alone; only the model's passes are shared. Every
step stacks the active prompts' batches, each row carrying its own prompt, and the pack's loss is the SUM of each
prompt's own mean loss: only a prompt's own rows depend on it, so its gradient is exactly the gradient of its own
run, and clipping and AdamW then act per prompt. Evaluations due at one step share passes too
(`tpv.evaluate.evaluate_many`). A prompt that finishes (its last step, or its patience) leaves the pack; the pack
goes on. A single run is a pack of one (`tpv.train.train`).

What shares a pack: prompts of one backbone and one prompt length (`pack_key`; the Tune jobs pack by it). What
shares a forward pass: label-loss prompts whose label sets join (`tpv.evaluate.label_groups`: tasks with different
label sets and source lengths do), and LM-loss prompts, up to `runs_per_pass` of them. Each pass is followed by its
own backward, which frees its activations: the pack's activation memory is one pass's, and the gradients are the
same (the loss is a sum over prompts). On a GPU a step is launch-bound, so the whole pack goes in one pass; on a CPU
a step is compute-bound, and a bigger matrix product gains nothing while padding every row to the longest source of
the pack costs (`bench/pack_passes.py`: 4 prompts of 4 tasks, 6 steps, 2 threads on SmolLM2-135M: 34.0 s with a pass
per prompt, 39.9 s in one pass), so each prompt gets its own pass, exactly the computation of its run alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor
from tqdm.auto import tqdm

from tpv.backbone import Backbone, Prompt
from tpv.errors import InvalidInput
from tpv.evaluate import LabelGroup, evaluate_many, label_groups
from tpv.prompt import SoftPrompt, make_origin
from tpv.store import VectorStore
from tpv.tasks import Example, TaskSpec, get_task, load_split
from tpv.train import (
    TrainCheckpoint,
    TrainConfig,
    TrainResult,
    _batches,
    _schedule,
    initial_prompt,
    prompt_length_for,
    total_steps,
    training_examples,
)


class Evaluation(BaseModel):
    """One prompt's evaluation during a pack: which prompt (its index in the pack), the step, its metrics (with
    `best` and `step`) and its state to checkpoint."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    index: int
    step: int
    metrics: dict[str, float]
    state: TrainCheckpoint


#: called once per pack step at which prompts were evaluated (after the prompts that finished left the pack)
PackCallback = Callable[[list[Evaluation]], None]
#: called the moment a prompt finishes: (its index, its result)
FinishCallback = Callable[[int, TrainResult], None]


def pack_key(config: TrainConfig) -> str:
    """Runs with equal keys can share a pack: one backbone (same config) and one prompt length."""
    return f"{config.backbone.model_dump_json()}|L={config.prompt_length}"


@dataclass
class _Run:
    """One prompt of a pack: everything `tpv.train.train` keeps for a run."""

    index: int
    config: TrainConfig
    task: TaskSpec
    train_set: list[Example]
    dev_set: list[Example]
    origin: Tensor
    prompt: SoftPrompt
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    state: TrainCheckpoint
    total: int
    step: int
    batches: Iterator[list[int]]
    losses: list[float] = field(default_factory=list)
    stopped: bool = False

    @property
    def finished(self) -> bool:
        return self.stopped or self.step >= self.total


def _start(index: int, config: TrainConfig, backbone: Backbone, store: VectorStore | None,
           resume: TrainCheckpoint | None) -> _Run:
    task = get_task(config.task)
    if config.loss == "label" and not task.labels:
        raise ValueError(f"loss 'label' needs a classification task; {config.task!r} has no label set")
    train_set = training_examples(config)
    dev_set = load_split(config.task, "validation", limit=config.eval_examples, seed=0)
    origin = make_origin(backbone, prompt_length_for(config, backbone), config.seed)
    init = resume.prompt if resume else initial_prompt(config, backbone, origin, store)
    prompt = SoftPrompt(init).to(backbone.device)
    optimizer = torch.optim.AdamW(prompt.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  eps=config.adam_eps)
    total = total_steps(config, len(train_set))
    factor, start = _schedule(config, backbone, total), resume.step if resume else 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: factor(s + start))
    state = resume or TrainCheckpoint(
        step=0, best_metric=-math.inf, best_step=0, evals_since_best=0, history=[],
        prompt=prompt.weight.detach().cpu(), best_prompt=prompt.weight.detach().cpu(),
    )
    if resume is not None and resume.exp_avg is not None:
        optimizer.state[prompt.weight] = {"step": torch.tensor(resume.adam_step),
                                          "exp_avg": resume.exp_avg.to(backbone.device),
                                          "exp_avg_sq": resume.exp_avg_sq.to(backbone.device)}
    run = _Run(index, config, task, train_set, dev_set, origin, prompt, optimizer, scheduler, state, total,
               state.step, _batches(len(train_set), config.batch_size, config.data_seed, state.step))
    # a run checkpointed after its patience ran out had stopped: it stays stopped
    run.stopped = config.patience is not None and state.evals_since_best >= config.patience and state.history != []
    return run


def _adam_state(run: _Run) -> tuple[Tensor | None, Tensor | None, float]:
    st = run.optimizer.state.get(run.prompt.weight)
    if not st:
        return None, None, 0.0
    return st["exp_avg"].detach().cpu().clone(), st["exp_avg_sq"].detach().cpu().clone(), float(st["step"])


@contextmanager
def recomputed_layers(backbone: Backbone, on: bool = True):
    """Within this context the model's layers keep only their inputs for the backward pass and recompute the rest
    (activation checkpointing): a pack's activation memory drops from every layer's activations of every row to the
    layer boundaries, for one more forward in the backward. Recomputation is exact: the gradients are the same."""
    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in backbone.model.modules() if isinstance(m, GradientCheckpointingLayer)] if on else []
    for layer in layers:
        forward = layer.forward
        layer.forward = lambda *args, _forward=forward, **kwargs: checkpoint(
            partial(_forward, **kwargs), *args, use_reentrant=False)
    backbone.recomputing = bool(layers)
    try:
        yield
    finally:
        backbone.recomputing = False
        for layer in layers:
            del layer.forward


def runs_per_pass(device: str) -> int:
    """How many prompts share a forward pass by default: the whole pack on a GPU, one on a CPU (module docstring)."""
    return MAX_AUTO_PACK if device.startswith("cuda") else 1


def _passes(runs: list[_Run], groups: dict[int, LabelGroup | None], per_pass: int) -> list[list[int]]:
    """The runs (indices into `runs`) of each forward pass: one group (a label group, or LM loss), <= per_pass runs."""
    by_group: dict[int, list[int]] = {}
    for k, run in enumerate(runs):
        group = groups[run.index]
        by_group.setdefault(-1 if group is None else id(group), []).append(k)
    return [members[i : i + per_pass] for members in by_group.values() for i in range(0, len(members), per_pass)]


def prompt_once(device: str, seq2seq: bool, recomputing: bool = False) -> bool:
    """Whether a training pass computes each prompt once for all its rows (`pass_prompts`, which says why): on a
    causal backbone on a CPU without recomputed layers. The cost and memory estimates of packs read it too."""
    return not (seq2seq or recomputing or device.startswith("cuda"))


def pass_prompts(backbone: Backbone, prompts: Sequence[Tensor], counts: Sequence[int]) -> Prompt:
    """The prompt of every row of a training pass: prompt k ([1, L, d]) for its `counts[k]` rows.

    On a causal backbone on a CPU each prompt's positions are computed once per pass and its rows attend to their
    keys and values (`Backbone.prefix`): those states do not depend on a row's input, so a batch of B rows runs the
    prompt once instead of B times (L of every L + T positions per row) and backpropagates through one copy
    (`bench/train_step.py` on 2 cores, batch 8, 64-token sources: 1.9x the step throughput at L 100). Elsewhere each
    row carries its prompt through the model: on a GPU (a small model's pass is launch-bound, and the prefix adds a
    forward and a gather per layer, which serving measured slower than recomputing: `serve.batching.gathers_prefixes`),
    on seq2seq backbones (the prompt goes through the encoder with the input), and with layers recomputed (a
    checkpointed layer that appends to a cache would append again when recomputed). A prompt alone in its pass
    computes exactly what it computes alone (bit-identical gradients)."""
    stacked = torch.cat(list(prompts))
    if not prompt_once(str(backbone.device), backbone.is_seq2seq, backbone.recomputing):
        return stacked if len(counts) == 1 else torch.cat([p.expand(n, -1, -1) for p, n in zip(prompts, counts)])
    rows = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return backbone.prefix(stacked).select(rows)


def _pass_losses(backbone: Backbone, runs: list[_Run], group: LabelGroup | None,
                 rows: list[list[Example]]) -> list[Tensor]:
    """Each run's own mean loss on its rows, from one forward of all of them (one group: `_passes`)."""
    prompts = pass_prompts(backbone, [run.prompt() for run in runs], [len(mine) for mine in rows])
    sources = [e.source for mine in rows for e in mine]
    offsets = [0]
    for mine in rows:
        offsets.append(offsets[-1] + len(mine))
    if group is not None:
        scores = backbone.label_scores(prompts, sources, group.labels)
        losses = []
        for j, (run, mine) in enumerate(zip(runs, rows)):
            cols = group.columns[group.members.index(run.index)]
            gold = torch.tensor([int(e.label) for e in mine], dtype=torch.long, device=scores.device)
            losses.append(torch.nn.functional.cross_entropy(scores[offsets[j] : offsets[j + 1], cols], gold))
        return losses
    logp, row_of = backbone.target_logprobs(prompts, sources, [e.target for mine in rows for e in mine])
    return [-logp[(row_of >= offsets[j]) & (row_of < offsets[j + 1])].mean() for j in range(len(runs))]


def _step_losses(backbone: Backbone, runs: list[_Run], groups: dict[int, LabelGroup | None],
                 rows: list[list[Example]], per_pass: int, recompute: bool) -> list[float]:
    """One training step's forwards and backwards: every pass's loss (the sum of its runs' own mean losses) is
    backpropagated before the next pass runs, so only one pass's activations are alive at a time. Returns each
    run's loss."""
    losses: list[float] = [math.nan] * len(runs)
    with recomputed_layers(backbone, recompute):
        for members in _passes(runs, groups, per_pass):
            found = _pass_losses(backbone, [runs[k] for k in members], groups[runs[members[0]].index],
                                 [rows[k] for k in members])
            torch.stack(found).sum().backward()
            for k, loss in zip(members, found):
                losses[k] = loss.item()
    return losses


def _evaluate(backbone: Backbone, runs: list[_Run]) -> list[Evaluation]:
    """Evaluate the due runs in shared passes; keep each one's best prompt and patience count."""
    found = evaluate_many(backbone, [r.prompt.weight.detach() for r in runs], [r.task for r in runs],
                          [r.dev_set for r in runs], max(r.config.eval_batch_size for r in runs),
                          modes=[r.config.eval_mode for r in runs])
    evaluations = []
    for run, metrics in zip(runs, found):
        state = run.state
        score, tiebreak = metrics[run.task.metric], metrics.get("label_logprob", 0.0)
        metrics["train_loss"] = sum(run.losses) / len(run.losses) if run.losses else math.nan
        run.losses.clear()
        state.history.append({"step": run.step, **metrics})
        if (score, tiebreak) > (state.best_metric, state.best_tiebreak):
            state.best_metric, state.best_tiebreak, state.best_step = score, tiebreak, run.step
            state.evals_since_best = 0
            state.best_prompt = run.prompt.weight.detach().cpu().clone()
        else:
            state.evals_since_best += 1
        state.step, state.prompt = run.step, run.prompt.weight.detach().cpu().clone()
        state.exp_avg, state.exp_avg_sq, state.adam_step = _adam_state(run)
        if run.config.patience is not None and state.evals_since_best >= run.config.patience:
            run.stopped = True
        evaluations.append(Evaluation(index=run.index, step=run.step,
                                      metrics={**metrics, "best": state.best_metric, "step": run.step}, state=state))
    return evaluations


def _result(run: _Run, started: float) -> TrainResult:
    state = run.state
    best = next(h for h in state.history if h["step"] == state.best_step) if state.history else {}
    metrics = {k: v for k, v in best.items() if k != "step"} | {"best_step": float(state.best_step),
                                                                "early_stopped": float(run.stopped)}
    return TrainResult(config=run.config, tuned=state.best_prompt, origin=run.origin, metrics=metrics,
                       history=state.history, steps=state.step, seconds=time.perf_counter() - started)


def train_pack(
    configs: Sequence[TrainConfig], backbone: Backbone | None = None, store: VectorStore | None = None,
    on_eval: PackCallback | None = None, on_finish: FinishCallback | None = None,
    resume: Sequence[TrainCheckpoint | None] | None = None, recompute: bool = False, per_pass: int | None = None,
) -> list[TrainResult]:
    """Tune `configs` as one pack; return each prompt's result (the best prompt it saw on validation), in order.

    `resume[i]` restarts prompt i from its checkpoint (None: from its start); `on_eval` gets every step's
    evaluations, `on_finish` each prompt the moment it finishes. `recompute`: activation checkpointing
    (`recomputed_layers`), for passes whose activations would not fit, and always when the backbone config asks
    for `gradient_checkpointing`. `per_pass`: prompts per forward pass (default `runs_per_pass` of the backbone's
    device)."""
    started = time.perf_counter()
    if not configs:
        raise InvalidInput("a pack needs at least one run")
    if len({c.backbone.model_dump_json() for c in configs}) != 1:
        raise InvalidInput("the runs of a pack share one backbone: their backbone configs differ")
    recompute = recompute or configs[0].backbone.gradient_checkpointing
    backbone = backbone or Backbone.load(configs[0].backbone)
    per_pass = per_pass or runs_per_pass(str(backbone.device))
    resume = list(resume) if resume is not None else [None] * len(configs)
    if len(resume) != len(configs):
        raise InvalidInput(f"{len(resume)} checkpoints for a pack of {len(configs)} runs")
    runs = [_start(i, c, backbone, store, r) for i, (c, r) in enumerate(zip(configs, resume))]
    if len({r.origin.shape[0] for r in runs}) != 1:
        raise InvalidInput("the runs of a pack share one prompt length: their prompt lengths differ")
    labelled = [r for r in runs if r.config.loss == "label"]
    groups: dict[int, LabelGroup | None] = {r.index: None for r in runs}
    for group in label_groups(backbone, [r.task.labels for r in labelled]):
        group.members = [labelled[k].index for k in group.members]
        groups |= {i: group for i in group.members}

    results: list[TrainResult | None] = [None] * len(runs)

    def finish(done: list[_Run]) -> None:
        for run in done:
            results[run.index] = _result(run, started)
            if on_finish is not None:
                on_finish(run.index, results[run.index])

    # resumed at their very end (or past their patience): still report a metric, then leave
    ended = [r for r in runs if r.finished]
    unscored = [r for r in ended if not r.state.history]
    late = _evaluate(backbone, unscored) if unscored else []
    finish(ended)
    if late and on_eval is not None:
        on_eval(late)
    active = [r for r in runs if not r.finished]
    solo = runs[0].config if len(runs) == 1 else None
    bar = tqdm(total=max((r.total for r in runs), default=0), initial=min((r.step for r in active), default=0),
               desc=f"{solo.task} s{solo.seed}" if solo else f"pack of {len(runs)}",
               disable=not any(c.progress for c in configs))
    while active:
        rows = [[run.train_set[i] for i in next(run.batches)] for run in active]
        for run in active:
            run.optimizer.zero_grad(set_to_none=True)
        losses = _step_losses(backbone, active, groups, rows, per_pass, recompute)
        for run, loss in zip(active, losses):
            torch.nn.utils.clip_grad_norm_(run.prompt.parameters(), run.config.grad_clip)
            run.optimizer.step()
            run.scheduler.step()
            run.losses.append(loss)
            run.step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{sum(r.losses[-1] for r in active) / len(active):.3f}", active=len(active))
        due = [r for r in active if r.step % r.config.eval_every == 0 or r.step == r.total]
        evaluations = _evaluate(backbone, due) if due else []
        finish([r for r in active if r.finished])
        if evaluations and on_eval is not None:
            on_eval(evaluations)
        active = [r for r in active if not r.finished]
    bar.close()
    return results  # type: ignore[return-value]


# ---- how many prompts a pack holds ----------------------------------------------------------------------------------
#: the most prompts `auto_pack_size` puts in one pack (beyond it, per-step bookkeeping grows and nothing is gained)
MAX_AUTO_PACK = 64


def activation_bytes(config: TrainConfig, model_config, dtype_bytes: int, device: str) -> int:
    """One prompt's activation memory in a training step on `device`: its batch's tokens (source and target per row;
    the prompt per row, or once where the pass computes it once: `prompt_once`) x layers x (16 x hidden + 3 x
    intermediate) values. Measured on SmolLM2-135M (fp32, batch 8 of ~60 tokens, the prompt on every row): +0.7 GB
    of peak memory per prompt, about 1.5 MB a token; this estimate gives 1.66 MB. (Computed once, the prompt's keys
    and values are still gathered for every row: 2 x the key/value width per position, small beside this.)"""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    hidden = text.hidden_size  # T5 configs map hidden_size and num_hidden_layers to d_model and num_layers
    layers = text.num_hidden_layers + (getattr(text, "num_decoder_layers", 0) or 0)
    inner = getattr(text, "intermediate_size", None) or getattr(text, "d_ff", None) or 4 * hidden
    length = config.prompt_length or 100
    prompt = length if prompt_once(device, model_config.is_encoder_decoder) else config.batch_size * length
    tokens = config.batch_size * (config.backbone.max_source_tokens + config.backbone.max_target_tokens) + prompt
    return tokens * layers * (16 * hidden + 3 * inner) * dtype_bytes


def _estimate(configs: Sequence[TrainConfig], device: str) -> tuple[int, int]:
    """(the model's weight bytes, the largest activation bytes of one of `configs`' prompts) on `device`."""
    from pathlib import Path

    from transformers import AutoConfig

    from tpv.bundled import resolve_model_path

    path = resolve_model_path(configs[0].backbone.model)
    model_config = AutoConfig.from_pretrained(path)
    dtype_bytes = 4 if configs[0].backbone.dtype == "float32" or (
        configs[0].backbone.dtype == "auto" and not device.startswith("cuda")) else 2
    # the files hold the checkpoint's own dtype (bf16 for the paper's LLMs): parameters = file bytes / its width
    stored = str(getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None) or "float32")
    stored_bytes = 2 if stored.removeprefix("torch.") in ("bfloat16", "float16") else 4
    weights = sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) * dtype_bytes // stored_bytes
    return weights, max(activation_bytes(c, model_config, dtype_bytes, device) for c in configs)


def auto_pack_size(configs: Sequence[TrainConfig], slots: int, free_bytes: int, device: str) -> int:
    """K for `--pack auto`: the fewest packs that keep every one of `slots` concurrent trials busy
    (ceil(N / slots)), no more prompts than the pack's memory budget holds (`pack_fits`), and at most
    MAX_AUTO_PACK."""
    if not configs:
        return 1
    weights, per_prompt = _estimate(configs, device)
    budget, per_pass = free_bytes // 2 - weights, runs_per_pass(device)
    # only one pass's activations are alive at a time: when a full pass fits, any K does
    by_memory = MAX_AUTO_PACK if per_pass * per_prompt <= budget else max(1, budget // per_prompt)
    return int(max(1, min(by_memory, math.ceil(len(configs) / max(1, slots)), MAX_AUTO_PACK)))


def run_costs(configs: Sequence[TrainConfig], sample: int = 256) -> list[float]:
    """Each run's compute on a CPU in token positions through the model: per training step 3 x (a forward and its
    backward) its batch's sources (its task's mean source length over up to `sample` training examples, tokenized
    and cut as the backbone does) and its prompt, once per pass on a causal backbone (`prompt_once`) and on every
    row on a seq2seq one; plus its evaluations' sources (a causal prompt's keys/values are reused for every row,
    `tpv.evaluate`; a seq2seq prompt goes with each row). Only ratios matter: packs run their prompts one after
    another on a CPU, so a pack lasts the sum of its runs' costs, and `tune_jobs.grid.pack_specs` balances packs by
    them (a trial slot whose pack ends early idles until the slowest pack ends)."""
    from transformers import AutoConfig, AutoTokenizer

    from tpv.bundled import resolve_model_path

    models: dict[str, tuple[object, bool]] = {}
    lengths: dict[tuple, tuple[int, float]] = {}
    costs = []
    for config in configs:
        if config.backbone.model not in models:
            path = resolve_model_path(config.backbone.model)
            models[config.backbone.model] = (AutoTokenizer.from_pretrained(path),
                                             AutoConfig.from_pretrained(path).is_encoder_decoder)
        tokenizer, seq2seq = models[config.backbone.model]
        cut = config.backbone.max_source_tokens
        key = (config.backbone.model, cut, config.task, config.shots, config.max_train_examples, config.data_seed)
        if key not in lengths:
            train_set = training_examples(config)
            ids = tokenizer([e.source for e in train_set[:sample]])["input_ids"]
            lengths[key] = len(train_set), sum(min(len(row), cut) for row in ids) / len(ids)
        n_train, source_tokens = lengths[key]
        steps, length = total_steps(config, n_train), config.prompt_length or 100
        prompt = length if prompt_once("cpu", seq2seq) else config.batch_size * length
        n_dev = len(load_split(config.task, "validation", limit=config.eval_examples, seed=0))
        evaluated = n_dev * math.ceil(steps / config.eval_every) * (source_tokens + (length if seq2seq else 0))
        costs.append(3 * steps * (config.batch_size * source_tokens + prompt) + evaluated)
    return costs


def pack_fits(configs: Sequence[TrainConfig], size: int, free_bytes: int, device: str) -> bool:
    """Whether the activations of one forward pass of a pack of `size` (`runs_per_pass` of its prompts) fit the
    pack's memory budget: half of `free_bytes` (the rest is headroom for evaluation, the allocator and the runtime)
    less the model's weights. A pack that does not fit recomputes its layers' activations in the backward pass
    (`recomputed_layers`)."""
    weights, per_prompt = _estimate(configs, device)
    return min(size, runs_per_pass(device)) * per_prompt <= free_bytes // 2 - weights
