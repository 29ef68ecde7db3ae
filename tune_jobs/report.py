"""`tpv report`: how similar the stored task prompt vectors are, and whether they work on other origins.

1. Similarity (the paper's figures): cosine similarity of every pair of stored vectors, row-mean (the paper's
   measure: cosine per prompt row, averaged over the L rows) and flattened, as CSV + markdown tables and a heatmap
   PNG, with a summary of same-task / different-origin pairs against different-task pairs.
2. Cross-origin (the paper's Table 1 shape, `--cross-origin`): for every task, the test metric of the tuned prompt
   on its own origin (O_i + tau_i) against the same vector applied to the other origins (O_j + tau_i, j != i), and
   the origins alone. Runs as Ray tasks, one per task.

    tpv report                                  # every vector in the store, for the backbone with most vectors
    tpv report --tasks rotten_tomatoes tweets --cross-origin --test-examples 200
"""

from __future__ import annotations

import argparse
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tpv.paths import atomic_write
from tpv.store import UnknownVector
from tpv.vectors import similarity_by_pair_kind
from tune_jobs.locations import add_location_args, locations_from_args
from tune_jobs.runtime import init_ray
from tune_jobs.selections import held_out
from tune_jobs.tables import csv_text, markdown_table, mean_std, pm, save_figure
from tune_jobs.verdicts import claim1


def pick_backbone(store, backbone_id: str | None) -> str:
    if backbone_id:
        return backbone_id
    counts = Counter(m.backbone_id for m in store.list(kind="task"))
    if not counts:
        raise UnknownVector("no task vectors in the store; run `tpv sweep` first")
    return counts.most_common(1)[0][0]


def select_vectors(store, backbone_id: str, tasks: list[str] | None = None, seeds: list[int] | None = None,
                   source: str | None = None):
    """Stored task vectors of one backbone (one prompt shape: the most common), sorted by task then seed; with
    `source`, only the vectors that job wrote (one per task and seed, the task-term rule of tpv.compose)."""
    if source is not None:
        from tpv.compose import task_vectors

        names = tasks or sorted({m.task for m in store.list(backbone_id, kind="task")})
        metas = [m for t in names for m in task_vectors(store, backbone_id, t, None, seeds, source)]
    else:
        metas = [m for m in store.list(backbone_id, kind="task")
                 if (not tasks or m.task in tasks) and (seeds is None or m.origin_seed in seeds)]
    if not metas:
        raise UnknownVector(f"no task vectors for backbone {backbone_id!r} (tasks {tasks or 'any'})")
    shape = Counter((m.prompt_length, m.hidden_size) for m in metas).most_common(1)[0][0]
    metas = [m for m in metas if (m.prompt_length, m.hidden_size) == shape]
    order = {t: i for i, t in enumerate(tasks or [])}
    metas.sort(key=lambda m: (order.get(m.task, len(order)), m.task, m.origin_seed, m.created_at))
    labels, seen = [], Counter()
    for m in metas:
        base = f"{m.task}/s{m.origin_seed}"
        seen[base] += 1
        labels.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return metas, labels


PAIR_NAMES = {"same_task": "same task, different origin", "diff_task": "different task, different origin",
              "same_origin": "different task, same origin"}


def similarity_summary(metas, matrix) -> list[dict[str, Any]]:
    """Mean +- std of the off-diagonal similarities by kind of pair (tpv.vectors.pair_kind)."""
    rows = []
    for kind, values in similarity_by_pair_kind(metas, matrix).items():
        mean, std = mean_std(values)
        rows.append({"pairs": PAIR_NAMES[kind], "kind": kind, "n": len(values), "mean": mean, "std": std,
                     "min": min(values) if values else math.nan, "max": max(values) if values else math.nan})
    return rows


def per_task_cross_seed(metas, matrix) -> list[dict[str, Any]]:
    rows = []
    for task in dict.fromkeys(m.task for m in metas):
        idx = [i for i, m in enumerate(metas) if m.task == task]
        same = [float(matrix[i, j]) for a, i in enumerate(idx) for j in idx[a + 1:]
                if metas[i].origin_seed != metas[j].origin_seed]
        other = [float(matrix[i, j]) for i in idx for j in range(len(metas)) if metas[j].task != task]
        rows.append({"task": task, "vectors": len(idx), "cross-seed (same task)": pm(same, 3),
                     "vs other tasks": pm(other, 3)})
    return rows


def permutation_line(test) -> str:
    """`tpv.vectors.same_task_permutation_test` in one sentence (None: no two vectors share a task)."""
    if test is None:
        return "No two vectors share a task across origins: nothing to test."
    how = f"all {test.arrangements} arrangements" if test.exact else f"{test.arrangements} random arrangements"
    return (f"Task labels shuffled within each origin ({how}): p = {test.p:.4f} that same-task pairs are this alike "
            f"by chance (the least these vectors allow: {test.smallest_p:.4f}).")


def heatmap(path: Path, labels: list[str], matrices: dict[str, Any], tasks: list[str], title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    size = max(4.0, 0.45 * n + 2.0)
    fig, axes = plt.subplots(1, len(matrices), figsize=(size * len(matrices) + 1.0, size), squeeze=False)
    bounds = [i for i in range(1, n) if tasks[i] != tasks[i - 1]]
    for ax, (name, matrix) in zip(axes[0], matrices.items()):
        im = ax.imshow(matrix, vmin=-1.0, vmax=1.0, cmap="RdBu_r")
        ax.set_xticks(range(n), labels, rotation=90, fontsize=8)
        ax.set_yticks(range(n), labels, fontsize=8)
        for b in bounds:
            ax.axhline(b - 0.5, color="black", lw=0.8)
            ax.axvline(b - 0.5, color="black", lw=0.8)
        if n <= 24:
            for i in range(n):
                for j in range(n):
                    v = matrix[i, j]
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6 if n > 12 else 8,
                            color="white" if abs(v) > 0.6 else "black")
        ax.set_title(f"{name} cosine")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def similarity_report(store_uri: str, out_dir: str | Path, backbone_id: str | None = None,
                      tasks: list[str] | None = None, seeds: list[int] | None = None,
                      name: str = "similarity", source: str | None = None) -> dict[str, Any]:
    """Tables (markdown + CSV) and a heatmap PNG of the stored vectors' cosine similarities, every measure of
    tpv.vectors.SIMILARITY_MODES (flat, the paper's, first)."""
    from tpv.store import VectorStore
    from tpv.vectors import SIMILARITY_MODES, mean_row_share, same_task_permutation_test, similarity_matrix

    store = VectorStore(store_uri)
    backbone_id = pick_backbone(store, backbone_id)
    metas, labels = select_vectors(store, backbone_id, tasks, seeds, source)
    vectors = {label: store.get(m.vector_id, backbone_id) for label, m in zip(labels, metas)}
    matrices = {mode: similarity_matrix(vectors, mode)[1] for mode in SIMILARITY_MODES}
    out = Path(out_dir) / name
    paths: dict[str, str] = {}
    for mode, matrix in matrices.items():
        rows = [{"vector": labels[i], **{labels[j]: float(matrix[i, j]) for j in range(len(labels))}}
                for i in range(len(labels))]
        paths[f"{mode}_csv"] = str(atomic_write(out / f"similarity_{mode}.csv", csv_text(rows, ["vector", *labels])))
    summary = {mode: similarity_summary(metas, m) for mode, m in matrices.items()}
    per_task = per_task_cross_seed(metas, matrices["flat"])
    permutation = same_task_permutation_test(metas, matrices["flat"])
    means = {row["kind"]: row["mean"] for row in summary["flat"]}
    verdict = (claim1(means["same_task"], means["diff_task"], means["same_origin"], permutation).line
               if {"same_task", "diff_task", "same_origin"} <= means.keys() else
               "Claim 1 needs same-task, different-task and same-origin pairs: no verdict on these vectors.")
    shares = [mean_row_share(v) for v in vectors.values()]
    share = sum(shares) / len(shares)
    flat_table = markdown_table(
        [{"vector": labels[i], **{labels[j]: float(matrices["flat"][i, j]) for j in range(len(labels))}}
         for i in range(len(labels))], ["vector", *labels], digits=2)
    shape = f"L={metas[0].prompt_length}, d={metas[0].hidden_size}"
    columns = ["pairs", "n", "mean", "std", "min", "max"]
    md = [f"# Task prompt vector similarity ({backbone_id}, {len(metas)} vectors, {shape})", "",
          "## Summary (flat cosine of the flattened vectors, the paper's measure)", "",
          markdown_table(summary["flat"], columns, 3), "", permutation_line(permutation), "", verdict, "",
          "## Summary (mean of per-row cosines)", "", markdown_table(summary["per_row_mean"], columns, 3), "",
          "## Summary (cosine of the row-averaged vectors)", "", markdown_table(summary["row_averaged"], columns, 3),
          "", "## Summary (flat cosine of the row-centered vectors: each row less the vector's mean row)", "",
          markdown_table(summary["row_centered"], columns, 3), "",
          f"The mean row holds {share:.3f} of |tau|^2 on average (min {min(shares):.3f}, max {max(shares):.3f}); a flat "
          "cosine is sqrt(s_a s_b) x row-averaged + sqrt((1 - s_a)(1 - s_b)) x row-centered, s the mean row's share.",
          "", "## Per task (flat cosine)", "",
          markdown_table(per_task, ["task", "vectors", "cross-seed (same task)", "vs other tasks"]),
          "", "## Flat cosine matrix", "", flat_table, ""]
    paths["markdown"] = str(atomic_write(out / "similarity.md", "\n".join(md)))
    paths["heatmap"] = str(heatmap(out / "similarity.png", labels, matrices, [m.task for m in metas],
                                   f"Task prompt vectors, {backbone_id} ({shape})"))
    return {"backbone_id": backbone_id, "labels": labels, "matrices": matrices, "summary": summary,
            "mean_row_share": share, "same_task_test": permutation, "per_task": per_task, "paths": paths,
            "markdown": "\n".join(md)}


# ----------------------------------------------------------------------------------------- cross-origin (Table 1)

def _cross_origin_for_task(store_uri: str, backbone: dict, task: str, vector_ids: list[str], seeds: list[int],
                           test_examples: int | None, cpus: float) -> list[dict[str, Any]]:
    """Test metric of every stored vector of `task` on every origin in `seeds`, and of the origins alone: every
    prompt in one `tpv.evaluate.evaluate_many` (shared passes on a GPU)."""
    from tpv.backbone import BackboneConfig
    from tpv.evaluate import evaluate_many
    from tpv.prompt import make_origin
    from tpv.store import VectorStore
    from tpv.tasks import get_task, load_split
    from tune_jobs.runtime import load_backbone, set_threads

    set_threads(cpus)
    bb = load_backbone(BackboneConfig.model_validate(backbone))
    store = VectorStore(store_uri)
    spec = get_task(task)
    examples = load_split(task, "test", limit=test_examples, seed=0)
    vectors = [store.get(v, bb.backbone_id) for v in vector_ids]
    length = vectors[0].meta.prompt_length
    origins = {s: make_origin(bb, length, s) for s in seeds}
    cells = [(None, s, origin) for s, origin in origins.items()]
    cells += [(v, s, v.apply(origin)) for v in vectors for s, origin in origins.items()]
    scores = evaluate_many(bb, [prompt for _, _, prompt in cells], [spec] * len(cells), [examples] * len(cells))
    rows = []
    for (v, s, _), metrics in zip(cells, scores):
        kind = "origin only" if v is None else "own origin" if s == v.meta.origin_seed else "other origin"
        rows.append({"task": task, "vector": v and v.vector_id, "vector_seed": v and v.meta.origin_seed,
                     "origin_seed": s, "kind": kind, "metric": spec.metric, "value": metrics[spec.metric]})
    return rows


def cross_origin_report(store_uri: str, out_dir: str | Path, backbone_model: str | None = None,
                        tasks: list[str] | None = None, seeds: list[int] | None = None,
                        test_examples: int | None = 200, cpus: float = 1.0, gpus: float = 0.0,
                        max_source_tokens: int | None = None, name: str = "similarity",
                        source: str | None = None) -> dict[str, Any]:
    """Own-origin vs other-origin test metric per task (the paper's Table 1 shape), one Ray task per task; with
    `source`, only the vectors that job wrote (`select_vectors`, as the similarity tables)."""
    import ray

    from tpv.backbone import BackboneConfig, backbone_id_for
    from tpv.bundled import DEFAULT_BACKBONE
    from tpv.store import VectorStore

    store = VectorStore(store_uri)
    model = backbone_model or DEFAULT_BACKBONE
    metas, _ = select_vectors(store, backbone_id_for(model), tasks, seeds, source)
    by_task: dict[str, list] = {}
    for m in metas:
        by_task.setdefault(m.task, []).append(m)
    all_seeds = sorted({m.origin_seed for m in metas}) if seeds is None else list(seeds)
    backbone = BackboneConfig.as_trained(model, metas[0].train_config, max_source_tokens)
    init_ray()
    remote = ray.remote(num_cpus=cpus, num_gpus=gpus)(_cross_origin_for_task)
    pending = {remote.remote(store_uri, backbone.model_dump(), task, [m.vector_id for m in ms], all_seeds,
                             test_examples, cpus): task for task, ms in by_task.items()}
    by_task_rows, start = {}, time.monotonic()
    while pending:  # a line per finished task: a table of many tasks takes minutes
        [ready], _ = ray.wait(list(pending), num_returns=1)
        task = pending.pop(ready)
        by_task_rows[task] = ray.get(ready)
        print(f"[cross-origin {time.monotonic() - start:6.0f}s] {task}: {len(by_task_rows[task])} prompts evaluated "
              f"({len(by_task_rows)}/{len(by_task)} tasks)", flush=True)
    rows = [r for task in by_task for r in by_task_rows[task]]
    table = []
    for task in by_task:
        cell = {kind: [r["value"] for r in rows if r["task"] == task and r["kind"] == kind]
                for kind in ("origin only", "own origin", "other origin")}
        table.append({"task": task, "metric": rows[[r["task"] for r in rows].index(task)]["metric"],
                      "origins alone": pm(cell["origin only"]), "own origin (O_i + tau_i)": pm(cell["own origin"]),
                      "other origins (O_j + tau_i)": pm(cell["other origin"]),
                      "vectors": len(by_task[task]), "origins": len(all_seeds)})
    columns = ["task", "metric", "origins alone", "own origin (O_i + tau_i)", "other origins (O_j + tau_i)",
               "vectors", "origins"]
    md = markdown_table(table, columns)
    out = Path(out_dir) / name
    paths = {
        "cross_origin_md": str(atomic_write(out / "cross_origin.md",
                                          f"# Own origin vs other origins (test split, {test_examples or 'all'} "
                                          f"examples)\n\n{md}\n")),
        "cross_origin_csv": str(atomic_write(out / "cross_origin.csv", csv_text(
            rows, ["task", "vector", "vector_seed", "origin_seed", "kind", "metric", "value"]))),
    }
    return {"rows": rows, "table": table, "markdown": md, "paths": paths}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tpv report",
        description="Cosine similarity of the stored task prompt vectors (tables + heatmap PNG); with "
                    "--cross-origin also the own-origin vs other-origin test metric per task.",
        epilog="Examples:\n  tpv report\n  tpv report --tasks rotten_tomatoes tweets trec --cross-origin\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--backbone", help="backbone: a bundled name or model folder (default: the backbone with the "
                   "most vectors in the store for the similarity; the bundled default for --cross-origin)")
    p.add_argument("--tasks", nargs="+", help="only these tasks (default: all), in this order")
    p.add_argument("--seeds", nargs="+", type=int, help="only vectors of these origin seeds")
    p.add_argument("--vectors-source", help="only the vectors one job wrote (their VectorMeta.source, e.g. "
                   "'tpv sweep demo-sweep-1a2b3c4d'; see `tpv vectors list`)")
    p.add_argument("--name", default="similarity", help="sub-folder of --out for the files (default similarity)")
    p.add_argument("--cross-origin", action="store_true", help="also evaluate every vector on every origin "
                   "(own vs other origins, the paper's Table 1 shape); runs the model")
    p.add_argument("--test-examples", type=int, default=200, help="test examples per evaluation (default 200)")
    p.add_argument("--cpus-per-task", type=float, default=1.0, help="CPUs per Ray task for --cross-origin")
    p.add_argument("--gpus-per-task", type=float, default=0.0, help="GPU (fraction) per Ray task for --cross-origin")
    p.add_argument("--max-source-tokens", type=int, help="input length for --cross-origin (default: as trained)")
    add_location_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    loc = locations_from_args(args)
    from tpv.backbone import backbone_id_for

    bb_id = backbone_id_for(args.backbone) if args.backbone else None
    held_out("tpv report", args.tasks or (), args.seeds or ())
    result = similarity_report(loc.store, loc.out_dir, bb_id, args.tasks, args.seeds, args.name,
                               args.vectors_source)
    print(result["markdown"])
    for key, path in result["paths"].items():
        print(f"{key:>14}: {path}")
    if args.cross_origin:
        if args.address or args.num_cpus:
            init_ray(args.address, args.num_cpus)
        cross = cross_origin_report(loc.store, loc.out_dir, args.backbone, args.tasks, args.seeds,
                                    args.test_examples, args.cpus_per_task, args.gpus_per_task,
                                    args.max_source_tokens, name=args.name, source=args.vectors_source)
        print("\n" + cross["markdown"])
        for key, path in cross["paths"].items():
            print(f"{key:>14}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
