"""What Ray Tune costs: the same small set of prompt-tuning trials through the sweep and serially in one process.

Both sides get the same total CPUs (`--cpus`, default 2): the sweep runs one-thread trials side by side
(`tpv sweep` machinery: Tune trials, checkpoints at every evaluation, vectors written to a store); the serial side
runs the same TrainConfigs one after another in this process with `--cpus` torch threads, loading the model once
and writing the same vectors. The two are alternated (serial, sweep, serial, sweep, ...) in one run so that machine
noise hits both; Ray itself is started once before timing (as a cluster would be). The last line is JSON:

    {"tune_vs_serial_wall": R, ...}     R = total sweep wall time / total serial wall time (target <= 1.15)

    python bench/tune_overhead.py                       # bundled SmolLM2, 4 trials, 2 rounds
    python bench/tune_overhead.py --steps 16 --rounds 3
    python bench/tune_overhead.py --smoke               # CI: one round, 2 steps, 1 seed (add --model, --tasks)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from grid_args import add_grid_args, parse_with_smoke, prepared_model


def serial(configs, store_dir: Path, threads: int) -> float:
    import torch

    from tpv.store import VectorStore
    from tpv.train import train
    from tune_jobs.runtime import load_backbone

    torch.set_num_threads(threads)
    start = time.perf_counter()
    store = VectorStore(store_dir)
    for cfg in configs:
        backbone = load_backbone(cfg.backbone)  # loaded once, cached across configs
        result = train(cfg, backbone=backbone)
        store.put(result.vector(backbone.backbone_id))
    return time.perf_counter() - start


def swept(config, store_dir: Path, results_dir: Path, round_no: int) -> float:
    from tune_jobs.locations import Locations
    from tune_jobs.sweep import run_sweep

    cfg = config.model_copy(update={
        "name": f"bench-r{round_no}", "fresh": True,
        "locations": Locations(store=str(store_dir), storage_path=str(results_dir), out_dir=str(results_dir)),
    })
    start = time.perf_counter()
    outcome = run_sweep(cfg)
    wall = time.perf_counter() - start
    if outcome["failed"]:
        raise SystemExit(f"sweep round {round_no} had failed trials: {outcome['table']}")
    return wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_grid_args(p, ["rotten_tomatoes", "trec"], steps=12, cpus_help="total CPUs of both sides", rounds=2)
    args = parse_with_smoke(p, argv, {"rounds": 1, "steps": 2, "seeds": [0], "eval_examples": 4})

    from tune_jobs.config import Resources
    from tune_jobs.runtime import init_ray
    from tune_jobs.sweep import SweepConfig

    model = prepared_model(args)
    train = {"prompt_length": 10, "max_steps": args.steps, "eval_every": max(1, args.steps // 2),
             "eval_examples": args.eval_examples, "batch_size": 8, "warmup_steps": 2,
             "backbone": {"max_source_tokens": 64}}
    config = SweepConfig(name="bench", tasks=args.tasks, seeds=args.seeds, backbones=[model], train=train,
                         resources=Resources(cpus_per_trial=1.0))
    configs = config.train_configs()
    t0 = time.perf_counter()
    init_ray(num_cpus=args.cpus)
    ray_init = time.perf_counter() - t0
    print(f"{len(configs)} trials of {args.steps} steps on {model}; ray.init {ray_init:.1f}s (not timed below)",
          flush=True)

    work = Path(tempfile.mkdtemp(prefix="tpv-bench-"))
    serial_walls, tune_walls = [], []
    try:
        for r in range(args.rounds):
            s = serial(configs, work / f"serial-store-{r}", args.cpus)
            serial_walls.append(s)
            print(f"round {r}: serial {s:.1f}s", flush=True)
            t = swept(config, work / f"tune-store-{r}", work / "ray_results", r)
            tune_walls.append(t)
            print(f"round {r}: sweep  {t:.1f}s  (ratio {t / s:.3f})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = sum(tune_walls) / sum(serial_walls)
    print(json.dumps({"tune_vs_serial_wall": round(ratio, 3), "serial_s": [round(x, 3) for x in serial_walls],
                      "tune_s": [round(x, 3) for x in tune_walls], "median_ratio": round(
                          statistics.median(t / s for t, s in zip(tune_walls, serial_walls)), 3),
                      "trials": len(configs), "steps": args.steps, "cpus": args.cpus, "model": model}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
