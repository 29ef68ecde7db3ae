"""One prompt-tuning run: a plain PyTorch loop over a frozen backbone, only the soft prompt learns.

The run's config, checkpoint, result, schedule and batch order live here; the loop is `tpv.packed.train_pack`'s (a
single run is a pack of one). Ray Tune drives it through `callback` (metrics + a checkpoint at every evaluation) and `resume`; tpv never imports
Ray. A run is deterministic under (seed, data_seed): batches come from a seeded permutation per epoch, so a resumed
run sees exactly the batches an uninterrupted one would have seen.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file
from torch import Tensor

from tpv.addition import choose_coefficient, coefficient_grid
from tpv.backbone import Backbone, BackboneConfig
from tpv.compose import Composer, CompositionSpec
from tpv.config_merge import deep_merge
from tpv.errors import InvalidInput
from tpv.evaluate import EvalMode, evaluate_many
from tpv.prompt import make_origin
from tpv.store import VectorStore
from tpv.tasks import Example, TaskConfigError, UnknownTaskError, few_shot, get_task, load_split
from tpv.vectors import TaskPromptVector


class InitSpec(BaseModel):
    """Where the prompt starts (`INIT_BUILDERS`): the run's origin, a composition of stored vectors on it (TPV), or
    stored tuned prompts (SPoT)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["origin", "composition", "tuned"] = "origin"
    composition: dict[str, Any] | None = Field(
        None, description="CompositionSpec fields (terms, method, coefficient, params); origin and shape come from the run"
    )
    choose_coefficient: bool = Field(
        False, description="composition: the coefficient c is chosen on this run's validation split over the paper's "
        "grid 0, 0.05, ..., 1 (tpv.addition.coefficient_grid, chosen by tpv.addition.choose_coefficient) instead of "
        "the composition's own",
    )
    vector_ids: list[str] = Field(default_factory=list, description="tuned: stored vectors whose tuned prompts "
                                  "(origin + tau, each on its own origin) are averaged; one id is one run's prompt")

    @model_validator(mode="after")
    def _complete(self) -> InitSpec:
        if self.kind == "composition" and not self.composition:
            raise ValueError("init kind 'composition' needs a composition (terms, weights)")
        if self.kind == "tuned" and not self.vector_ids:
            raise ValueError("init kind 'tuned' needs vector_ids of the source prompts")
        if self.choose_coefficient and self.kind != "composition":
            raise ValueError("choose_coefficient applies to init kind 'composition'")
        return self


class TrainConfig(BaseModel):
    """A prompt-tuning run. Defaults are the paper's T5 recipe; `TrainConfig.preset` gives the named recipes."""

    # a misspelt field (`--set lre=0.1`, a study recipe) must fail, not train the preset under a wrong name
    model_config = ConfigDict(extra="forbid")

    task: str
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    prompt_length: int | None = Field(None, ge=1, le=1024, description="None: 50 for seq2seq, 100 for causal (paper)")
    seed: int = Field(0, description="origin seed")
    data_seed: int = Field(0, description="batch order and few-shot sampling")
    lr: float = Field(0.3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    adam_eps: float = Field(
        1e-8, gt=0, description="AdamW's epsilon. Far above an element's gradient RMS, that element moves in "
        "proportion to its gradient (as with SGD) instead of by about lr whatever the gradient's size",
    )
    warmup_steps: int = Field(500, ge=0)
    warmup_ratio: float | None = Field(
        None, ge=0, lt=1, description="warmup as a fraction of the run's steps (ceil(ratio x steps), as transformers "
        "counts it), instead of warmup_steps; None: warmup_steps",
    )
    schedule: Literal["linear", "cosine", "constant"] | None = Field(None, description="None: linear seq2seq, cosine causal")
    batch_size: int = Field(32, ge=1)
    epochs: float = Field(10, gt=0)
    max_steps: int | None = Field(None, ge=1, description="overrides epochs")
    shots: int | None = Field(None, ge=1, description="few-shot: k training examples per class")
    max_train_examples: int | None = Field(None, ge=1, description="subsample of a full-data run (few-shot runs "
                                           "draw their k per class from the whole train split)")
    eval_every: int = Field(200, ge=1)
    eval_examples: int | None = Field(1000, ge=1, description="validation examples per evaluation (None: all)")
    eval_batch_size: int = Field(32, ge=1)
    eval_mode: EvalMode = Field(
        "rank", description="how validation scores classification, and so which prompt is kept: rank (the label "
        "likelihoods) or generate (the paper's: the greedy text matched exactly against the label words); tasks "
        "without labels are generated either way (tpv.evaluate)",
    )
    patience: int | None = Field(None, ge=1, description="stop after this many evaluations without improvement")
    grad_clip: float = Field(1.0, gt=0)
    loss: Literal["lm", "label"] = Field(
        "lm", description="lm: token cross-entropy of the target text (the paper); label: cross-entropy over the "
        "task's label set (classification only)",
    )
    init: InitSpec = Field(default_factory=InitSpec)
    progress: bool = True

    @model_validator(mode="after")
    def _loss_fits_task(self) -> TrainConfig:
        if self.loss == "label":
            try:
                task = get_task(self.task)
            except UnknownTaskError:  # registered later (a worker's own tasks): the run's start checks it again
                return self
            if not task.labels:
                raise ValueError(f"loss 'label' needs a classification task; {self.task!r} has no label set "
                                 "(loss=lm trains on its target text)")
        return self

    @model_validator(mode="after")
    def _one_warmup(self) -> TrainConfig:
        if self.warmup_ratio is not None and "warmup_steps" in self.model_fields_set and self.warmup_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} and warmup_ratio={self.warmup_ratio} both set: give "
                             "one (warmup_ratio=null to count warmup in steps)")
        return self

    @classmethod
    def preset(cls, name: PresetName, task: str, **overrides: Any) -> TrainConfig:
        """A named recipe (PRESETS) for `task`, with TrainConfig fields overriding it."""
        if name not in PRESETS:
            raise InvalidInput(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls.model_validate(deep_merge({**PRESETS[name], "task": task}, overrides))


PresetName = Literal["paper", "t5_paper", "llm_paper", "causal", "causal_cpu"]
#: the paper's T5 recipe (arXiv 2408.01119, its T5-base runs): prompt length 50, AdamW at lr 0.3 with weight decay
#: 1e-5, a linear schedule after 500 warmup steps, batch 32, 10 epochs. These are the TrainConfig defaults too.
T5_PAPER: dict[str, Any] = dict(prompt_length=50, lr=0.3, weight_decay=1e-5, warmup_steps=500, schedule="linear",
                                batch_size=32, epochs=10)
PRESETS: dict[str, dict[str, Any]] = {
    # the paper's T5 recipe, named: the seq2seq preset
    "t5_paper": T5_PAPER,
    # the same recipe by its older name: the TrainConfig defaults, whose prompt length and schedule follow the
    # backbone (50 / linear on seq2seq, 100 / cosine on causal)
    "paper": {},
    # the paper's recipe for its LLMs (Llama-3.1-8B-Instruct, DeepSeek-LLM-7B-Chat): prompt length 100, lr 0.3, a
    # cosine schedule after 3% of the steps as warmup, batch 4, the backbone in bf16 (docs/BACKBONES.md: what an
    # 8B model needs on one GPU); the epochs and weight decay are the T5 recipe's
    "llm_paper": dict(prompt_length=100, lr=0.3, weight_decay=1e-5, warmup_ratio=0.03, schedule="cosine", batch_size=4,
                      epochs=10, backbone={"dtype": "bfloat16"}),
    # the causal-LM recipe `tpv study` adopted on the bundled SmolLM2-135M (docs/RESULTS.md, section 1): the
    # label-set loss, Adam at lr 0.03, a cosine schedule after 20 warmup steps. This mid budget (300 steps) is the
    # same shape over more steps (studied at 300 steps too: RESULTS, "The LM loss at the mid budget"); start a new
    # backbone or budget with `tpv study`
    "causal": dict(prompt_length=10, lr=0.03, warmup_steps=20, schedule="cosine", batch_size=8, max_steps=300,
                   eval_every=100, eval_examples=200, max_train_examples=4000, loss="label",
                   backbone={"max_source_tokens": 64}),
    # the study's winner at the CPU demo budget, exactly as studied (the cosine schedule run to its end at step 60,
    # the prompt at step 60): `tpv demo`
    "causal_cpu": dict(prompt_length=10, lr=0.03, warmup_steps=20, schedule="cosine", batch_size=8, max_steps=60,
                       eval_every=60, eval_examples=64, max_train_examples=2000, loss="label",
                       backbone={"max_source_tokens": 48}),
}


class TrainCheckpoint(BaseModel):
    """Everything needed to resume exactly: tensors go to safetensors, the rest to JSON (nothing is pickled)."""

    model_config = {"arbitrary_types_allowed": True}

    step: int
    best_metric: float
    best_tiebreak: float = -math.inf
    best_step: int
    evals_since_best: int
    history: list[dict[str, float]]
    prompt: Tensor
    best_prompt: Tensor
    exp_avg: Tensor | None = None
    exp_avg_sq: Tensor | None = None
    adam_step: float = 0.0

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"prompt": self.prompt, "best_prompt": self.best_prompt}
        if self.exp_avg is not None:
            tensors |= {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, folder / "state.safetensors")
        scalars = self.model_dump(include={"step", "best_metric", "best_tiebreak", "best_step", "evals_since_best", "history", "adam_step"})
        (folder / "state.json").write_text(json.dumps(scalars))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> TrainCheckpoint:
        folder = Path(folder)
        tensors = load_file(folder / "state.safetensors")
        return cls(**json.loads((folder / "state.json").read_text()), **tensors)


class TrainResult(BaseModel):
    """The best prompt of the run, its origin, and the vector between them."""

    model_config = {"arbitrary_types_allowed": True}

    config: TrainConfig
    tuned: Tensor
    origin: Tensor
    metrics: dict[str, float]
    history: list[dict[str, float]]
    steps: int
    seconds: float

    def vector(self, backbone_id: str, **meta_fields: Any) -> TaskPromptVector:
        """tau = tuned - origin with the run's config and metrics; extra VectorMeta fields (source, notes) pass through."""
        return TaskPromptVector.from_prompts(
            self.tuned, self.origin, task=self.config.task, backbone_id=backbone_id, origin_seed=self.config.seed,
            train_config=self.config.model_dump(mode="json"), metrics=self.metrics, **meta_fields,
        )


def snapshot_source(source_tag: str | None, step: int) -> str:
    """The VectorMeta.source of a run's snapshot at `step` (its prompt as it was then, not its best)."""
    return f"{source_tag}@{step}"


def snapshot_vector(config: TrainConfig, state: TrainCheckpoint, origin: Tensor, backbone_id: str,
                    source_tag: str | None, metrics: dict[str, float]) -> TaskPromptVector:
    """The prompt at `state.step` as a vector tagged `snapshot_source(source_tag, step)`: training length becomes a
    dimension of a study or grid at no extra training."""
    return TaskPromptVector.from_prompts(
        state.prompt, origin, task=config.task, backbone_id=backbone_id, origin_seed=config.seed,
        source=snapshot_source(source_tag, state.step), train_config=config.model_dump(mode="json"),
        metrics={**metrics, "step": float(state.step)},
    )


Callback = Callable[[int, dict[str, float], TrainCheckpoint], None]


def prompt_length_for(config: TrainConfig, backbone: Backbone) -> int:
    return config.prompt_length or (50 if backbone.is_seq2seq else 100)


InitBuilder = Callable[["TrainConfig", Backbone, Tensor, VectorStore], Tensor]


def _composed_init(config: TrainConfig, backbone: Backbone, origin: Tensor, store: VectorStore) -> Tensor:
    """TPV: this run's origin + c * the composition; with `choose_coefficient`, c is the paper's grid point whose
    prompt scores best on this run's validation split (the addition experiment's rule, `tpv.addition`)."""
    composer = Composer(store, lambda length, seed: make_origin(backbone, length, seed))
    fields = {**config.init.composition, "backbone_id": backbone.backbone_id, "origin_seed": config.seed,
              "prompt_length": origin.shape[0]}
    if not config.init.choose_coefficient:
        return composer.compose(CompositionSpec(**fields))
    grid = coefficient_grid()
    prompts = [composer.compose(CompositionSpec(**{**fields, "coefficient": c})) for c in grid]
    task, dev = get_task(config.task), load_split(config.task, "validation", limit=config.eval_examples, seed=0)
    scores = evaluate_many(backbone, [p.to(backbone.device) for p in prompts], [task] * len(grid), [dev] * len(grid),
                           config.eval_batch_size, modes=config.eval_mode)
    best = choose_coefficient([{"coefficient": c, "mean": m[task.metric], "label_logprob": m.get("label_logprob", 0.0)}
                               for c, m in zip(grid, scores)])
    return prompts[grid.index(best["coefficient"])]


def _tuned_init(config: TrainConfig, backbone: Backbone, origin: Tensor, store: VectorStore) -> Tensor:
    """SPoT: stored runs' tuned prompts (each its origin + tau), whatever this run's origin; several are averaged."""
    tuned = []
    for vector_id in config.init.vector_ids:
        vector = store.get(vector_id, backbone.backbone_id)
        if vector.shape != tuple(origin.shape):
            raise ValueError(f"vector {vector_id!r} has shape {vector.shape}, this run's prompt is {tuple(origin.shape)}")
        tuned.append(vector.apply(make_origin(backbone, vector.meta.prompt_length, vector.meta.origin_seed)))
    return torch.stack(tuned).mean(0)


#: InitSpec.kind -> the builder of the tensor a run starts from (kind 'origin' is the run's own origin)
INIT_BUILDERS: dict[str, InitBuilder] = {
    "origin": lambda config, backbone, origin, store: origin,
    "composition": _composed_init,
    "tuned": _tuned_init,
}


def initial_prompt(config: TrainConfig, backbone: Backbone, origin: Tensor, store: VectorStore | None) -> Tensor:
    """The tensor training starts from (random origin, SPoT, multi-source SPoT and TPV all land here)."""
    if config.init.kind != "origin" and store is None:
        raise ValueError(f"init kind {config.init.kind!r} reads stored vectors: pass a store")
    return INIT_BUILDERS[config.init.kind](config, backbone, origin, store)


def training_examples(config: TrainConfig) -> list[Example]:
    """The run's training set. Few-shot draws `shots` per class from the WHOLE train split (subsampling first could
    leave a rare class short of k); `max_train_examples` subsamples full-data runs only."""
    if config.shots:
        examples = few_shot(load_split(config.task, "train"), config.shots, seed=config.data_seed)
    else:
        examples = load_split(config.task, "train", limit=config.max_train_examples, seed=config.data_seed)
    if not examples:
        raise TaskConfigError(f"task {config.task!r} has no training examples")
    return examples


def _schedule(config: TrainConfig, backbone: Backbone, total: int) -> Callable[[int], float]:
    kind = config.schedule or ("linear" if backbone.is_seq2seq else "cosine")
    warmup = min(warmup_steps_for(config, total), max(total - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        done = (step - warmup) / max(total - warmup, 1)
        if kind == "linear":
            return max(0.0, 1.0 - done)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))
        return 1.0

    return factor


def warmup_steps_for(config: TrainConfig, total: int) -> int:
    """The warmup of a run of `total` steps: ceil(warmup_ratio x total) when a ratio is set, else warmup_steps."""
    if config.warmup_ratio is not None:
        return math.ceil(config.warmup_ratio * total)
    return config.warmup_steps


def total_steps(config: TrainConfig, n_train: int) -> int:
    """The steps a run takes: max_steps, else `epochs` passes over its n_train training examples."""
    return config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch(n_train, config.batch_size)))


def steps_per_epoch(n: int, batch_size: int) -> int:
    """One epoch sees every example once: ceil(n / batch_size) batches, the last one short when n % batch_size."""
    return max(1, math.ceil(n / batch_size))


def _batches(n: int, batch_size: int, seed: int, start_step: int):
    """Seeded epoch permutations as an endless stream of index batches, starting at `start_step`."""
    per_epoch = steps_per_epoch(n, batch_size)
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        yield order[offset * batch_size : offset * batch_size + batch_size].tolist()
        step += 1


def train(
    config: TrainConfig, backbone: Backbone | None = None, store: VectorStore | None = None,
    callback: Callback | None = None, resume: TrainCheckpoint | None = None,
) -> TrainResult:
    """Tune a soft prompt on one task; return the best prompt seen on validation.

    The loop is `tpv.packed.train_pack`'s: a single run is a pack of one, so a run alone and the same run in a pack
    are one implementation."""
    from tpv.packed import train_pack  # imported here: tpv.packed builds on this module


    def report(evaluations) -> None:
        for e in evaluations:
            callback(e.step, e.metrics, e.state)

    return train_pack([config], backbone, store, on_eval=report if callback is not None else None,
                      resume=[resume])[0]
