"""`tpv demo`: the README's first command, the method and the whole pipeline end to end on the embedded defaults.

Local Ray (or `$RAY_ADDRESS`), the local store, the bundled SmolLM2-135M, real data, the adopted recipe
(`tpv.train.PRESETS["causal_cpu"]`):

1. prepare the data (`tpv data fetch` for the tasks it needs) and the bundled model (once per TPV_HOME);
2. sweep the source tasks x origin seeds (`tpv sweep`), vectors into the store;
3. similarity of those vectors (`tpv report`): same task vs different task vs same origin (flat cosine);
4. multi-task addition (`tpv addition`): pairs and all sources, c on validation, retention per task;
5. few-shot transfer (`tpv transfer`): the target from random origin, SPoT, multi-SPoT and TPV inits;
6. serve: the target's best TPV composition, O + c * sum(tau) with c chosen on the target's validation split (the
   paper's rule, `tpv search-weights --modes paper`), is stored under a name, the Serve app starts on the store,
   classifies the target's test sentences over real HTTP, and the served scores are checked against tpv's offline
   ones;
7. `demo-summary.json` beside the reports, and a verdict on the paper's first two claims (`tune_jobs.verdicts`:
   HOLDS only when significant at alpha) with the figures.

The data are held out from the recipe's selection (`tune_jobs.selections`): none of the tasks, origins or the target
that `tpv study` chose `causal_cpu` on; the job refuses them unless `--allow-selection-data`, and then says so.

Roughly 40 minutes on 2 quiet CPU cores (9 sweep runs of about 3 minutes, c chosen on validation for every TPV
init); every stage prints progress. Re-running it reuses what is done (stored vectors, finished Tune experiments),
so a second run takes a few minutes (the serve stage runs again).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from tpv.bundled import DEFAULT_BACKBONE
from tpv.paths import atomic_write
from tpv.train import PRESETS
from tune_jobs.config import Resources, add_resource_args
from tune_jobs.locations import Locations, add_location_args, locations_from_args
from tune_jobs.runtime import init_ray
from tune_jobs.stats import paired_test
from tune_jobs.tables import markdown_table
from tune_jobs.verdicts import ALPHA, ClaimVerdict, claim1, claim2

# Held out by construction: the recipe (`causal_cpu`) was chosen on rotten_tomatoes + trec, origins 0, 1, 100, 101,
# target imdb (tune_jobs.selections.SELECTIONS); the demo shares none of those tasks, source files, origins or its
# target. 3 tasks x 3 origins allow (3!)^2 = 36 arrangements of task labels, so claim 1 can reach p 1/36 < 0.05;
# claim 2 is paired over 3 target origins.
DEMO_TASKS = ["tweets", "yelp", "sms_spam"]
DEMO_SEEDS = [2, 3, 4]
DEMO_TARGET = {"amazon": ["tweets", "yelp"]}
DEMO_PRESET = "causal_cpu"
TRANSFER = {"shots": [0, 8], "seeds": [20, 21, 22], "few_shot_steps": 12, "test_examples": 100,
            "inits": ["random", "spot", "multi_spot", "tpv"]}
# c on a 6-point grid (0, 0.2, ..., 1; the paper steps by 0.05): the addition stage is pure evaluation, ~0.15 s per
# example row on a CPU core, and the finer grid put the demo over its 20 minutes on 2 cores once the sweep ran 60 steps
ADDITION = {"grid_step": 0.2, "eval_examples": 48, "test_examples": 100}
STAGES = 7


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tpv demo",
        description="The main job on the embedded defaults: a Ray Tune sweep of source tasks x origin seeds on the "
                    f"bundled {DEFAULT_BACKBONE} with real data and the adopted recipe, the similarity report, the "
                    "multi-task addition, few-shot transfer to a held-out target, and the Serve app classifying the "
                    "target over HTTP with the TPV composition. Writes demo-summary.json. About 20 minutes on 2 CPU "
                    "cores; a second run reuses the stored vectors and finished experiments.",
        epilog="Examples:\n  tpv demo\n  tpv demo --tasks tweets yelp sms_spam bbc_news --steps 120\n"
               "  RAY_ADDRESS=auto tpv demo --store /mnt/shared/tpv/store --gpus-per-trial 0.25 --preset causal\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tasks", nargs="+", default=DEMO_TASKS, help=f"source tasks (default {' '.join(DEMO_TASKS)})")
    p.add_argument("--seeds", nargs="+", type=int, default=DEMO_SEEDS,
                   help=f"origin seeds (default {' '.join(map(str, DEMO_SEEDS))})")
    p.add_argument("--target", default=next(iter(DEMO_TARGET)), help=f"transfer target (default {next(iter(DEMO_TARGET))})")
    p.add_argument("--sources", nargs="+",
                   help=f"transfer sources (default {' '.join(next(iter(DEMO_TARGET.values())))})")
    p.add_argument("--preset", choices=list(PRESETS), default=DEMO_PRESET, help=f"the recipe (default {DEMO_PRESET})")
    p.add_argument("--steps", type=int, help="training steps per sweep run (default: the preset's)")
    p.add_argument("--transfer-seeds", nargs="+", type=int, default=TRANSFER["seeds"],
                   help="origins of the transfer runs (claim 2 is paired over them) and, the first, of the served "
                        f"composition (default {' '.join(map(str, TRANSFER['seeds']))})")
    p.add_argument("--alpha", type=float, default=ALPHA, help=f"significance level of the verdicts (default {ALPHA})")
    p.add_argument("--allow-selection-data", action="store_true",
                   help="run on tasks, origins or a target a recipe selection used (flagged in the verdicts and "
                        "the summary) instead of refusing")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"default {DEFAULT_BACKBONE}")
    add_resource_args(p)
    p.add_argument("--skip-serve", action="store_true", help="stop after the transfer (no Serve app)")
    add_location_args(p)
    return p


def stage(n: int, text: str) -> None:
    print(f"\n=== [{n}/{STAGES}] {text}", flush=True)


def verdict(summary: dict[str, Any], claims: list[ClaimVerdict]) -> list[str]:
    """The paper's claims judged by `tune_jobs.verdicts` (significance at alpha, on a design that can reach it),
    then the addition's retention and the serve check."""
    lines = [c.line for c in claims]
    if summary["selection_overlap_text"]:
        lines.append(f"FLAGGED: {summary['selection_overlap_text']}: these verdicts are not on held-out data")
    lines.append(f"addition keeps {100 * summary['addition_retention']:.1f}% of single-task performance on average "
                 "(see the addition table for pairs with disjoint label sets)")
    if summary.get("served_accuracy") is not None:
        same = summary["served_max_prob_diff"] <= 1e-3
        lines.append(("OK" if same else "MISMATCH") + f": served accuracy {summary['served_accuracy']:.3f}, offline "
                     f"{summary['offline_accuracy']:.3f}, largest probability difference "
                     f"{summary['served_max_prob_diff']:.2e}")
    return lines


def claim_fields(claims: list[ClaimVerdict]) -> dict[str, Any]:
    """demo-summary.json's claim1_verdict / claim1_p / claim2_verdict / claim2_p / alpha."""
    out: dict[str, Any] = {"alpha": claims[0].alpha}
    for n, c in enumerate(claims, 1):
        out |= {f"claim{n}_verdict": c.verdict, f"claim{n}_p": c.p, f"claim{n}_p_least": c.least_p}
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    loc = locations_from_args(args)
    sources = args.sources or DEMO_TARGET.get(args.target) or args.tasks[:2]
    from tune_jobs.config import JobConfigError, resources_from_args

    missing = [s for s in sources if s not in args.tasks]
    if missing:
        raise JobConfigError(f"transfer sources {missing} are not among the sweep tasks {args.tasks}")
    if len(set(args.seeds)) < 2 or len(set(args.tasks)) < 2:
        raise JobConfigError("the demo compares vectors across origins and across tasks: give at least 2 --seeds "
                             "and 2 --tasks")
    from tune_jobs.selections import held_out

    overlap = held_out("tpv demo", args.tasks, [*args.seeds, *args.transfer_seeds], args.target,
                       refuse=not args.allow_selection_data)
    where = Locations(**loc.model_dump())
    resources = Resources(**resources_from_args(args, {}))

    stage(1, "data and model")
    from tpv.bundled import resolve_model_path
    from tpv.data_fetch import fetch
    from tpv.tasks import get_task

    needed = list(dict.fromkeys([*args.tasks, args.target]))
    t0 = time.perf_counter()
    fetch([t for t in needed if get_task(t).data is None])
    print(f"data ready for {', '.join(needed)} ({time.perf_counter() - t0:.0f}s)", flush=True)
    t0 = time.perf_counter()
    path = resolve_model_path(args.backbone)  # converts the bundled GGUF once per TPV_HOME, before trials race
    print(f"model {args.backbone} ready at {path} ({time.perf_counter() - t0:.0f}s)", flush=True)
    init_ray(args.address, args.num_cpus)

    stage(2, f"sweep: {len(args.tasks)} tasks x {len(args.seeds)} origin seeds, preset {args.preset}")
    from tune_jobs.sweep import SweepConfig, run_sweep

    train = {"max_steps": args.steps} if args.steps else {}
    sweep_cfg = SweepConfig(name="demo-sweep", tasks=args.tasks, seeds=args.seeds, backbones=[args.backbone],
                            preset=args.preset, train=train, resources=resources, locations=where)
    swept = run_sweep(sweep_cfg)
    print("\n" + swept["table"], flush=True)
    if swept["failed"]:
        print(f"{swept['failed']} sweep trial(s) failed; run `tpv demo` again to retry them", flush=True)
        return 1
    vectors = swept["source"]

    stage(3, "similarity of the swept vectors (flat cosine, the paper's measure)")
    from tune_jobs.report import similarity_report

    sim = similarity_report(loc.store, loc.out_dir, tasks=args.tasks, seeds=args.seeds, name="demo-similarity",
                            source=vectors)
    print(markdown_table(sim["summary"]["flat"], ["pairs", "n", "mean", "std", "min", "max"], 3), flush=True)
    by_kind = {row["kind"]: row["mean"] for row in sim["summary"]["flat"]}

    stage(4, f"multi-task addition: pairs and all of {', '.join(args.tasks)} on origin {args.seeds[0]}")
    from tune_jobs.addition import AdditionConfig, run_addition_job

    added = run_addition_job(AdditionConfig(
        name="demo-addition", tasks=args.tasks, seeds=[args.seeds[0]], vectors_source=vectors, backbone=args.backbone,
        resources=resources, locations=where, **ADDITION))
    print("\n" + added["markdown"], flush=True)

    stage(5, f"few-shot transfer: {args.target} <- {', '.join(sources)}")
    from tune_jobs.transfer import TransferConfig, run_transfer

    moved = run_transfer(TransferConfig(
        name="demo-transfer", targets={args.target: sources}, shots=TRANSFER["shots"], seeds=args.transfer_seeds,
        inits=TRANSFER["inits"], backbone=args.backbone, preset=args.preset, train=train,
        few_shot_steps=TRANSFER["few_shot_steps"], test_examples=TRANSFER["test_examples"], vectors_source=vectors,
        vector_seeds=args.seeds, resources=resources, locations=where))
    print("\n" + moved["markdown"], flush=True)
    zero = {(r["init"], r["seed"]): r["test"] for r in moved["rows"] if r["shots"] == 0 and r["test"] is not None}
    paired = [s for s in args.transfer_seeds if ("tpv", s) in zero and ("random", s) in zero]
    tpv_zero, random_zero = [zero[("tpv", s)] for s in paired], [zero[("random", s)] for s in paired]
    claims = [claim1(by_kind["same_task"], by_kind["diff_task"], by_kind["same_origin"], sim["same_task_test"],
                     args.alpha),
              claim2(paired_test(tpv_zero, random_zero), sum(random_zero) / len(random_zero), args.target,
                     args.alpha)]

    summary: dict[str, Any] = {
        "backbone": args.backbone, "preset": args.preset, "tasks": args.tasks, "seeds": args.seeds,
        "target": args.target, "sources": sources, "transfer_seeds": paired, "vectors_source": vectors,
        "same_task_cos": by_kind["same_task"], "diff_task_cos": by_kind["diff_task"],
        "same_origin_cos": by_kind["same_origin"],
        "tpv_zero_shot": sum(tpv_zero) / len(tpv_zero), "random_zero_shot": sum(random_zero) / len(random_zero),
        "tpv_zero_shot_by_origin": tpv_zero, "random_zero_shot_by_origin": random_zero,
        **claim_fields(claims),
        "selection_overlap": overlap.model_dump(exclude={"selections"}),
        "selection_overlap_text": None if overlap.empty else overlap.describe(),
        "addition_retention": added["mean_retention"]["paper"] / 100.0,
        "served_accuracy": None, "offline_accuracy": None, "served_max_prob_diff": None,
    }
    name = f"{args.target}-tpv"
    if args.skip_serve:
        stage(6, "serve skipped (--skip-serve)")
    else:
        stage(6, f"serve: the TPV composition `{name}` (c on {args.target}'s validation) classifies "
                 f"{args.target} test sentences over HTTP")
        summary |= serve_stage(args, sources, vectors, name, resources, where)
    summary["minutes"] = round((time.perf_counter() - started) / 60, 2)

    stage(7, f"done in {summary['minutes']:.1f} min")
    out = Path(loc.out_dir)
    summary_path = atomic_write(out / "demo-summary.json", json.dumps(summary, indent=2))
    for line in verdict(summary, claims):
        print(line)
    print(f"\nvectors (store):      {loc.store}   (source {vectors!r})")
    print(f"similarity heatmap:   {sim['paths']['heatmap']}")
    print(f"addition table/plot:  {added['paths']['markdown']}  {added['paths']['plot']}")
    print(f"transfer table:       {moved['paths']['markdown']}")
    print(f"summary:              {summary_path}")
    print(f"Ray Tune experiments: {loc.storage_path}")
    print(f"next: `tpv serve` then POST /v1/classify with \"composition\": \"{name}\"; `tpv study --help`", flush=True)
    return 0


def serve_stage(args, sources: list[str], vectors: str, name: str, resources: Resources,
                where: Locations) -> dict[str, Any]:
    """Store the target's best TPV composition (the sources' seed-mean vectors summed on the first transfer origin,
    times the c that scores best on the target's validation split), serve it, and compare the served scores with
    tpv's own."""
    from tpv.tasks import load_split
    from tune_jobs.serve_check import serve_and_check
    from tune_jobs.weights import WeightSearchConfig, run_search

    searched = run_search(WeightSearchConfig(
        name=name, target=args.target, sources=sources, vectors_source=vectors, vector_seeds=args.seeds,
        backbone=args.backbone, origin_seed=args.transfer_seeds[0], modes=["paper"],
        grid_step=ADDITION["grid_step"], eval_examples=ADDITION["eval_examples"], resources=resources,
        locations=where))
    best = searched["found"]["paper"]
    print(f"c = {best['coefficient']:.2f} scores best on {args.target}'s validation "
          f"({best['metric_value']:.3f}); saved as `{name}`", flush=True)
    examples = load_split(args.target, "test", limit=TRANSFER["test_examples"], seed=0)
    check = serve_and_check(where.resolved().store, args.backbone, name, args.target, examples,
                            num_cpus=resources.cpus_per_trial)
    print(f"served {check.examples} sentences at {check.url} in {check.seconds:.0f}s: accuracy "
          f"{check.served_accuracy:.3f} (offline {check.offline_accuracy:.3f}), largest probability difference "
          f"{check.max_prob_diff:.2e}", flush=True)
    return {"served_accuracy": check.served_accuracy, "offline_accuracy": check.offline_accuracy,
            "served_max_prob_diff": check.max_prob_diff, "served_composition": name,
            "served_coefficient": best["coefficient"]}


if __name__ == "__main__":
    raise SystemExit(main())
