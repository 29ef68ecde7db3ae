"""Which part of a task prompt vector does the work: its mean row (what all its rows share) or the rest (what each
row adds to it)? Both parts come from `tpv.vectors.split_mean_row`; the similarity report measures how much each part
agrees across origins (row_averaged, row_centered). This script scores them: the test metric of O + tau, O + mean
row, O + rest and O alone, on the vector's own origin and on the other origins, averaged per task. Runs the model
(no Ray); one JSON summary as the last line.

    python scripts/vector_parts.py --store results/gpu/store --vectors-source gpu-grid \
        --tasks rotten_tomatoes tweets trec bbc_news --seeds 0 1 2 --test-examples 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tpv.backbone import Backbone, BackboneConfig, backbone_id_for
from tpv.bundled import DEFAULT_BACKBONE
from tpv.cli import guarded
from tpv.errors import InvalidInput
from tpv.evaluate import evaluate_many
from tpv.prompt import make_origin
from tpv.store import VectorStore
from tpv.tasks import get_task, load_split
from tpv.vectors import split_mean_row
from tune_jobs.report import select_vectors
from tune_jobs.tables import markdown_table

PARTS = ("tau", "mean row", "rest")


def score_task(backbone: Backbone, store: VectorStore, metas: list, seeds: list[int], test_examples: int,
               metric: str | None) -> dict[str, float]:
    """Mean test metric (default the task's own) of each (part, own/other origin) cell for one task's vectors, and
    of the origins alone."""
    spec = get_task(metas[0].task)
    metric = metric or spec.metric
    examples = load_split(spec.name, "test", limit=test_examples, seed=0)
    origins = {s: make_origin(backbone, metas[0].prompt_length, s) for s in seeds}
    cells: list[tuple[str, torch.Tensor]] = [("origin", origin) for origin in origins.values()]
    for meta in metas:
        tau = store.get(meta.vector_id, backbone.backbone_id).tensor
        shared, rest = split_mean_row(tau)
        for seed, origin in origins.items():
            where = "own" if seed == meta.origin_seed else "other"
            for part, delta in zip(PARTS, (tau, shared, rest)):
                cells.append((f"{part}, {where}", origin + delta.to(origin.dtype)))
    scores = evaluate_many(backbone, [p for _, p in cells], [spec] * len(cells), [examples] * len(cells))
    if metric not in scores[0]:
        raise InvalidInput(f"--metric {metric!r}: the evaluation of {spec.name} reports {', '.join(sorted(scores[0]))}")
    by_cell: dict[str, list[float]] = {}
    for (name, _), metrics in zip(cells, scores):
        by_cell.setdefault(name, []).append(metrics[metric])
    return {name: statistics.fmean(values) for name, values in by_cell.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True)
    p.add_argument("--vectors-source", required=True, help="VectorMeta.source of the vectors (`tpv vectors list`)")
    p.add_argument("--tasks", nargs="+", required=True)
    p.add_argument("--seeds", nargs="+", type=int, required=True, help="origin seeds (at least 2)")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE)
    p.add_argument("--test-examples", type=int, default=200)
    p.add_argument("--metric", default=None, help="a metric `tpv.evaluate` reports, e.g. label_logprob (the mean "
                   "log-probability of the gold label: smoother than accuracy on few examples); default each task's")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    if len(set(args.seeds)) < 2:
        raise InvalidInput("--seeds: give at least 2 origin seeds, so every vector has another origin to move to")
    torch.set_num_threads(args.threads)
    store = VectorStore(args.store)
    metas, _ = select_vectors(store, backbone_id_for(args.backbone), args.tasks, args.seeds, args.vectors_source)
    backbone = Backbone.load(BackboneConfig.as_trained(args.backbone, metas[0].train_config))
    started, rows = time.perf_counter(), []
    for task in args.tasks:
        cells = score_task(backbone, store, [m for m in metas if m.task == task], args.seeds, args.test_examples,
                           args.metric)
        gain = cells["tau, own"] - cells["origin"]
        row = {"task": task, "metric": args.metric or get_task(task).metric, **cells}
        for part in PARTS[1:]:
            row[f"{part} kept, own"] = (cells[f"{part}, own"] - cells["origin"]) / gain if gain else float("nan")
        rows.append(row)
        print(json.dumps(row), flush=True)
    columns = ["task", "metric", "origin", *(f"{part}, {where}" for where in ("own", "other") for part in PARTS),
               *(f"{part} kept, own" for part in PARTS[1:])]
    print(markdown_table(rows, columns, 3))
    print(json.dumps({"rows": rows, "vectors": len(metas), "test_examples": args.test_examples,
                      "minutes": round((time.perf_counter() - started) / 60, 2), "source": args.vectors_source}))
    return 0


if __name__ == "__main__":
    raise SystemExit(guarded(main))
