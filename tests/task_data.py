"""Small real task data written where `tpv data fetch` writes it (`data_dir()/<task>/...`), for tests."""

from __future__ import annotations

import json

from tpv.paths import data_dir

POS = ["the movie was great", "wonderful acting and a great story", "great fun", "the acting was wonderful"]
NEG = ["terrible and boring", "a waste of time", "the film was boring", "terrible acting, a waste"]


def write_builtin_task(task: str, rows: list[dict]) -> None:
    """The same rows in train, validation and test of a built-in task, as the fetcher lays them out."""
    folder = data_dir() / task
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "meta.json").write_text(json.dumps({"task": task, "counts": {"train": len(rows)}}))


def sentiment_rows(suffix: str = "") -> list[dict]:
    return [{"text": t + suffix, "label": 1} for t in POS] + [{"text": t + suffix, "label": 0} for t in NEG]


def argmax_accuracy(backbone, prompt, sources: list[str], gold: list[str], labels: list[str]) -> float:
    """The share of `sources` whose highest-scoring label is the gold one: accuracy from the label scores alone, the
    oracle of what the evaluation code (batching, metrics, the CLI and scripts around it) reports."""
    import torch

    with torch.no_grad():
        best = backbone.score_labels(prompt, sources, labels).argmax(1).tolist()
    return sum(labels[i] == g for i, g in zip(best, gold)) / len(gold)
