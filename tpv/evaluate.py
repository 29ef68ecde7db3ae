"""The metric of a prompt on a list of examples.

Classification is rank classification: every label string is scored by likelihood and the best one wins, which
also gives calibrated per-label probabilities for serving. Regression generates the number and parses it. On
causal backbones the prompt's keys/values are computed once for the whole evaluation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tpv.backbone import Backbone, Prompt
from tpv.metrics import compute_metric
from tpv.tasks import Example, TaskSpec


def shared_prompt(backbone: Backbone, prompt: Tensor) -> Prompt:
    """A prompt ready for many batches: its prefix on causal backbones, the tensor itself on seq2seq."""
    return prompt if backbone.is_seq2seq else backbone.prefix(prompt)


def label_scores(backbone: Backbone, prompt: Prompt, sources: list[str], labels: list[str], batch_size: int = 32) -> Tensor:
    """[N, C] summed log-likelihoods, in batches."""
    parts = [backbone.score_labels(prompt, sources[i : i + batch_size], labels) for i in range(0, len(sources), batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, len(labels))


def _parse_number(text: str) -> float | None:
    token = text.strip().split()[0] if text.strip() else ""
    try:
        value = float(token.rstrip(".,"))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


@torch.no_grad()
def evaluate(
    backbone: Backbone, prompt: Tensor, task: TaskSpec, examples: list[Example], batch_size: int = 32,
    exact_match: bool = False,
) -> dict[str, float]:
    """{task.metric: value, ...}; `exact_match` adds the paper's generate-and-match accuracy (slower)."""
    if not examples:
        raise ValueError(f"no examples to evaluate task {task.name!r} on")
    sources = [e.source for e in examples]
    refs = [e.label for e in examples]
    results: dict[str, float] = {}
    if task.labels:
        scores = label_scores(backbone, shared_prompt(backbone, prompt), sources, task.labels, batch_size)
        preds = scores.argmax(dim=1).tolist()
        results[task.metric] = compute_metric(task.metric, preds, refs)
        results.setdefault("accuracy", compute_metric("accuracy", preds, refs))
        # mean log-probability of the right label among the labels: breaks ties between equally accurate prompts
        gold = torch.log_softmax(scores, dim=1)[torch.arange(len(refs)), torch.tensor(refs, dtype=torch.long)]
        results["label_logprob"] = gold.mean().item()
    if exact_match or not task.labels:
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
