"""The metric of a prompt on a list of examples, and of many prompts at once.

Classification is rank classification: every label string is scored by likelihood and the best one wins, which
also gives calibrated per-label probabilities for serving. Regression generates the number and parses it. On
causal backbones the prompt's keys/values are computed once for the whole evaluation.

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

import torch
from torch import Tensor

from tpv.backbone import Backbone, BackboneInputError, Prompt
from tpv.metrics import compute_metric
from tpv.tasks import Example, TaskSpec


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


def evaluate_many(
    backbone: Backbone, prompts: Sequence[Tensor], tasks: Sequence[TaskSpec], examples: Sequence[list[Example]],
    batch_size: int = 32, per_pass: int | None = None,
) -> list[dict[str, float]]:
    """`evaluate(backbone, prompts[i], tasks[i], examples[i])` for every i, in shared forward passes where they pay.

    Classification prompts of one prompt length whose label sets join (`label_groups`) share passes, up to
    `per_pass` prompts each (default `prompts_per_pass` of the backbone's device); regression prompts are evaluated
    one by one (generation)."""
    if not len(prompts) == len(tasks) == len(examples):
        raise ValueError("evaluate_many needs one task and one example list per prompt")
    results: list[dict[str, float] | None] = [None] * len(prompts)
    for i, (task, rows) in enumerate(zip(tasks, examples)):
        if not rows:
            raise ValueError(f"no examples to evaluate task {task.name!r} on")
        if not task.labels:
            results[i] = evaluate(backbone, prompts[i], task, rows, batch_size)
    per_pass = per_pass or prompts_per_pass(str(backbone.device))
    classified = [i for i, task in enumerate(tasks) if task.labels]
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
def evaluate(
    backbone: Backbone, prompt: Tensor, task: TaskSpec, examples: list[Example], batch_size: int = 32,
    exact_match: bool = False,
) -> dict[str, float]:
    """{task.metric: value, ...}; `exact_match` adds the paper's generate-and-match accuracy (slower)."""
    if not examples:
        raise ValueError(f"no examples to evaluate task {task.name!r} on")
    results: dict[str, float] = {}
    if task.labels:
        results = evaluate_many(backbone, [prompt], [task], [examples], batch_size)[0]
    if exact_match or not task.labels:
        sources = [e.source for e in examples]
        refs = [e.label for e in examples]
        texts: list[str] = []
        for i in range(0, len(sources), batch_size):
            texts += backbone.generate(prompt, sources[i : i + batch_size], max_new_tokens=backbone.config.max_target_tokens)
        if task.labels:
            results["exact_match"] = sum(t == e.target for t, e in zip(texts, examples)) / len(examples)
        else:
            parsed = [_parse_number(t) for t in texts]
            results["parse_failures"] = float(sum(p is None for p in parsed))
            fallback = sum(refs) / len(refs)  # an unparsable answer counts as the mean, not as a crash
            results[task.metric] = compute_metric(task.metric, [fallback if p is None else p for p in parsed], refs)
    return results
