"""The metric of a prompt on a list of examples, and of many prompts at once.

Two evaluation modes (`EvalMode`), reported side by side by `evaluate_modes`:

- ``rank`` (tpv's default): classification is rank classification: every label string is scored by likelihood and
  the best one wins, which also gives calibrated per-label probabilities for serving (and `label_logprob`, the
  mean log-probability of the gold label, a tie-break between equally accurate prompts).
- ``generate`` (the paper's): the target text is generated greedily and matched exactly against the label words;
  a generation that is no label counts as wrong (its prediction is the class -1, which no reference holds: for
  ``macro_f1`` it is one more class, of F1 0, as sklearn's macro average counts a stray prediction). Reports the
  task's metric on those predictions, ``accuracy``, ``exact_match`` (the generation is the gold target text) and
  ``unmatched`` (the share of generations that are no label).

Tasks without labels have nothing to rank: they are generated in either mode. Regression parses the number
(``pearson`` and ``spearman``, ``parse_failures``); text tasks (SQuAD v2, MATH) score the generated text against the
example's target (``squad_em`` and ``squad_f1``; ``math_exact``), a SQuAD target of ``tpv.metrics.NO_ANSWER``
matched only by an empty or "unanswerable" answer. On causal backbones the prompt's keys/values are computed once
for the whole evaluation.

`evaluate_many` evaluates many prompts at once (cross-origin tables, weight-search candidates, the addition's
coefficient grid, the evaluations of a training pack), many per forward pass on a GPU (`prompts_per_pass`): each
row carries its own prompt's cached keys/values, and prompts of different tasks share a pass by scoring the union
of their label sets (see `label_groups`). Each
prompt's metrics are exactly what `evaluate` gives it alone (one implementation: `evaluate` is a pack of one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import Tensor

from tpv.backbone import Backbone, BackboneInputError, Prompt
from tpv.errors import InvalidInput
from tpv.metrics import compute_metric
from tpv.tasks import Example, TaskSpec

#: how a classification task is scored: `rank` the label likelihoods (tpv's), `generate` the greedy text matched
#: exactly against the label words (the paper's); tasks without labels are generated in either mode
EvalMode = Literal["rank", "generate"]
EVAL_MODES: tuple[EvalMode, ...] = get_args(EvalMode)

#: what a label-less task reports beside its own metric: both correlations of a regression, both SQuAD scores
REPORTED_WITH: dict[str, tuple[str, ...]] = {
    "pearson": ("pearson", "spearman"), "spearman": ("spearman", "pearson"),
    "squad_em": ("squad_em", "squad_f1"), "squad_f1": ("squad_f1", "squad_em"), "math_exact": ("math_exact",),
}

#: the prediction of a generation that is none of the task's label words: a class no reference holds
UNMATCHED = -1


def modes_for(task: TaskSpec) -> tuple[EvalMode, ...]:
    """The modes that differ on `task`: both for classification, `generate` alone for a task without labels."""
    return EVAL_MODES if task.labels else ("generate",)


def shared_prompt(backbone: Backbone, prompt: Tensor) -> Prompt:
    """A prompt ready for many batches: its prefix on causal backbones, the tensor itself on seq2seq."""
    return prompt if backbone.is_seq2seq else backbone.prefix(prompt)


def label_scores(backbone: Backbone, prompt: Prompt, sources: list[str], labels: list[str], batch_size: int = 32) -> Tensor:
    """[N, C] summed log-likelihoods, in batches."""
    parts = [backbone.score_labels(prompt, sources[i : i + batch_size], labels) for i in range(0, len(sources), batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, len(labels))


#: the most prompts one evaluation pass holds on a GPU (each brings `batch_size` rows, each row a vocabulary of logits)
PROMPTS_PER_PASS = 16


def prompts_per_pass(device: str) -> int:
    """Prompts per evaluation pass by default: up to PROMPTS_PER_PASS on a GPU, where a pass is launch-bound; one on
    a CPU, where a pass is compute-bound, so a shared pass buys nothing and pads every row to the pass's longest
    input (measured by `bench/eval_passes.py` on 2 cores: one prompt per pass is 1.9x faster on a training pack's
    mixed tasks, and 1.3x faster even on prompts sharing their rows)."""
    return PROMPTS_PER_PASS if device.startswith("cuda") else 1


@dataclass
class LabelGroup:
    """Prompts whose label sets are scored in one forward pass: `labels` is the union of their sets, `columns[i]`
    the union's columns of member `members[i]`'s own labels, in its own order."""

    labels: list[str]
    members: list[int] = field(default_factory=list)
    columns: list[list[int]] = field(default_factory=list)


def _joins(backbone: Backbone, union: list[str], sets: Sequence[Sequence[str]]) -> bool:
    """True when scoring `union` gives every set's labels exactly the scores that set alone gives them, at no
    extra cost.

    A label's score depends on its token ids, and those on the whole set (EOS is appended only when one label
    begins another): the union must leave every set's ids as they are. Single-token labels on a causal backbone are
    all scored from one forward of B rows, so any number of them share it for free; otherwise every (row, label)
    pair is a row (B x C), so only identical sets share a pass (a union would score every row on every label).
    """
    try:
        union_ids = backbone.label_token_ids(union)
    except BackboneInputError:
        return False
    by_label = dict(zip(union, union_ids))
    one_pass = not backbone.is_seq2seq and all(len(t) == 1 for t in union_ids)
    for labels in sets:
        if [by_label[label] for label in labels] != backbone.label_token_ids(list(labels)):
            return False
        if not one_pass and set(labels) != set(union):
            return False
    return True


def label_groups(backbone: Backbone, label_sets: Sequence[Sequence[str]]) -> list[LabelGroup]:
    """Partition label sets (one per prompt) into groups that each share one forward pass, greedily in order."""
    groups: list[LabelGroup] = []
    for i, labels in enumerate(label_sets):
        for group in groups:
            union = group.labels + [label for label in labels if label not in group.labels]
            if _joins(backbone, union, [label_sets[j] for j in group.members] + [labels]):
                group.labels, group.members = union, group.members + [i]
                break
        else:
            groups.append(LabelGroup(labels=list(dict.fromkeys(labels)), members=[i]))
    for group in groups:
        group.columns = [[group.labels.index(label) for label in label_sets[i]] for i in group.members]
    return groups


def classification_metrics(task: TaskSpec, scores: Tensor, refs: list) -> dict[str, float]:
    """The task's metric, accuracy, and the mean log-probability of the gold label from [N, C] label scores."""
    preds = scores.argmax(dim=1).tolist()
    results = {task.metric: compute_metric(task.metric, preds, refs)}
    results.setdefault("accuracy", compute_metric("accuracy", preds, refs))
    # mean log-probability of the right label among the labels: breaks ties between equally accurate prompts
    gold = torch.log_softmax(scores, dim=1)[torch.arange(len(refs)), torch.tensor(refs, dtype=torch.long)]
    results["label_logprob"] = gold.mean().item()
    return results


def _parse_number(text: str) -> float | None:
    token = text.strip().split()[0] if text.strip() else ""
    try:
        value = float(token.rstrip(".,"))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


@torch.no_grad()
def _group_scores(backbone: Backbone, prompts: list[Tensor], group: LabelGroup, examples: list[list[Example]],
                  batch_size: int) -> list[Tensor]:
    """Each member's [N_i, C_i] label scores; every forward takes up to `batch_size` rows of every member, each row
    with its own prompt (cached keys/values on causal backbones, computed once for the whole group)."""
    stacked = torch.stack([prompts[i].detach() for i in group.members])
    shared = shared_prompt(backbone, stacked)
    parts: list[list[Tensor]] = [[] for _ in group.members]
    longest = max(len(examples[i]) for i in group.members)
    for start in range(0, longest, batch_size):
        owners, sources = [], []
        for k, i in enumerate(group.members):
            chunk = examples[i][start : start + batch_size]
            owners += [k] * len(chunk)
            sources += [e.source for e in chunk]
        index = torch.tensor(owners, dtype=torch.long)
        rows = shared.select(index) if not backbone.is_seq2seq else shared[index.to(shared.device)]
        scores = backbone.score_labels(rows, sources, group.labels)
        for k, cols in enumerate(group.columns):
            mine = index == k
            if mine.any():
                parts[k].append(scores[mine][:, cols])
    return [torch.cat(p) for p in parts]


def _per_prompt(modes: EvalMode | Sequence[EvalMode], n: int) -> list[EvalMode]:
    found = [modes] * n if isinstance(modes, str) else list(modes)
    if len(found) != n:
        raise InvalidInput(f"{len(found)} evaluation modes for {n} prompts")
    for mode in found:
        if mode not in EVAL_MODES:
            raise InvalidInput(f"unknown evaluation mode {mode!r}; choose one of {', '.join(EVAL_MODES)}")
    return found


def evaluate_many(
    backbone: Backbone, prompts: Sequence[Tensor], tasks: Sequence[TaskSpec], examples: Sequence[list[Example]],
    batch_size: int = 32, per_pass: int | None = None, modes: EvalMode | Sequence[EvalMode] = "rank",
    max_new_tokens: int | None = None,
) -> list[dict[str, float]]:
    """`evaluate(backbone, prompts[i], tasks[i], examples[i], mode=modes[i])` for every i, in shared forward passes
    where they pay.

    `modes`: one mode for all prompts or one per prompt. Ranked classification prompts of one prompt length whose
    label sets join (`label_groups`) share passes, up to `per_pass` prompts each (default `prompts_per_pass` of the
    backbone's device); the others are generated one prompt at a time, up to `max_new_tokens` new tokens (default
    the backbone's `max_target_tokens`)."""
    if not len(prompts) == len(tasks) == len(examples):
        raise ValueError("evaluate_many needs one task and one example list per prompt")
    modes = _per_prompt(modes, len(prompts))
    results: list[dict[str, float] | None] = [None] * len(prompts)
    for i, (task, rows) in enumerate(zip(tasks, examples)):
        if not rows:
            raise ValueError(f"no examples to evaluate task {task.name!r} on")
    classified = [i for i, task in enumerate(tasks) if task.labels and modes[i] == "rank"]
    for i in range(len(prompts)):
        if i not in classified:
            texts = generations(backbone, prompts[i], examples[i], batch_size, max_new_tokens)
            results[i] = generated_metrics(tasks[i], texts, examples[i])
    per_pass = per_pass or prompts_per_pass(str(backbone.device))
    for length in dict.fromkeys(prompts[i].shape[-2] for i in classified):
        same = [i for i in classified if prompts[i].shape[-2] == length]
        for group in label_groups(backbone, [tasks[i].labels for i in same]):
            for start in range(0, len(group.members), per_pass):
                part = LabelGroup(group.labels, [same[k] for k in group.members[start : start + per_pass]],
                                  group.columns[start : start + per_pass])
                scores = _group_scores(backbone, [p.reshape(p.shape[-2:]) for p in prompts], part, list(examples),
                                       batch_size)
                for i, member_scores in zip(part.members, scores):
                    results[i] = classification_metrics(tasks[i], member_scores, [e.label for e in examples[i]])
    return results  # type: ignore[return-value]


@torch.no_grad()
def generations(backbone: Backbone, prompt: Tensor, examples: list[Example], batch_size: int = 32,
                max_new_tokens: int | None = None) -> list[str]:
    """The greedy text after `prompt` and each example's source (stripped), `max_new_tokens` at most (default the
    backbone's `max_target_tokens`, the length training cuts targets to)."""
    prompt = prompt.detach().reshape(prompt.shape[-2:])
    budget = max_new_tokens or backbone.config.max_target_tokens
    sources = [e.source for e in examples]
    texts: list[str] = []
    for i in range(0, len(sources), batch_size):
        texts += backbone.generate(prompt, sources[i : i + batch_size], max_new_tokens=budget)
    return texts


def generated_metrics(task: TaskSpec, texts: list[str], examples: list[Example]) -> dict[str, float]:
    """The metrics of generated texts, one per example (see the module docstring for what each task reports)."""
    if len(texts) != len(examples):
        raise ValueError(f"{len(texts)} generations for {len(examples)} examples")
    if not examples:
        raise ValueError(f"no examples to evaluate task {task.name!r} on")
    refs = [e.label for e in examples]
    if task.labels:
        index = {label.strip(): k for k, label in enumerate(task.labels)}
        preds = [index.get(text.strip(), UNMATCHED) for text in texts]
        results = {task.metric: compute_metric(task.metric, preds, refs)}
        results.setdefault("accuracy", compute_metric("accuracy", preds, refs))
        results["exact_match"] = sum(t.strip() == e.target.strip() for t, e in zip(texts, examples)) / len(examples)
        results["unmatched"] = sum(p == UNMATCHED for p in preds) / len(preds)
        return results
    if task.is_regression:
        parsed = [_parse_number(t) for t in texts]
        fallback = sum(refs) / len(refs)  # an unparsable answer counts as the mean, not as a crash
        values = [fallback if p is None else p for p in parsed]
        results = {name: compute_metric(name, values, refs) for name in REPORTED_WITH[task.metric]}
        results["parse_failures"] = float(sum(p is None for p in parsed))
        return results
    return {name: compute_metric(name, texts, refs) for name in REPORTED_WITH[task.metric]}


def evaluate(
    backbone: Backbone, prompt: Tensor, task: TaskSpec, examples: list[Example], batch_size: int = 32,
    mode: EvalMode = "rank", max_new_tokens: int | None = None,
) -> dict[str, float]:
    """{task.metric: value, ...} of one prompt in one mode (`EvalMode`): a pack of one (`evaluate_many`)."""
    return evaluate_many(backbone, [prompt], [task], [examples], batch_size, modes=mode,
                         max_new_tokens=max_new_tokens)[0]


def evaluate_modes(
    backbone: Backbone, prompt: Tensor, task: TaskSpec, examples: list[Example], batch_size: int = 32,
    modes: Sequence[EvalMode] | None = None, max_new_tokens: int | None = None,
) -> dict[EvalMode, dict[str, float]]:
    """Rank and generate side by side: {mode: evaluate(..., mode=mode)} for each of `modes` (default `modes_for`
    the task: both for classification; `generate` alone for a task without labels, whose modes coincide)."""
    chosen = list(modes_for(task) if modes is None else dict.fromkeys(modes))
    found = evaluate_many(backbone, [prompt] * len(chosen), [task] * len(chosen), [examples] * len(chosen),
                          batch_size, modes=chosen, max_new_tokens=max_new_tokens)
    return dict(zip(chosen, found))
