"""Why a CPU pack gives each prompt its own forward pass: one pack of K real runs (different tasks, so different
input lengths), trained for the same steps with all K prompts in ONE pass per step (`per_pass=K`, what a GPU does)
vs one pass per prompt (`per_pass=1`, the CPU default), in one process, alternating rounds. Evaluation is left out
(one evaluation at the last step on 8 examples).

A CPU step is compute-bound: a shared pass does the same arithmetic in bigger matrix products, which buys nothing
there, and pads every row to the longest input of the pack. Last line JSON:

    {"own_passes_vs_shared_pass": R, ...}    R = shared-pass wall / own-passes wall (> 1: own passes are faster)

    python bench/pack_passes.py [--tasks rotten_tomatoes tweets sms_spam trec] [--steps 6] [--threads 2]
    python bench/pack_passes.py --smoke      # CI: one round of 2 steps (add --model, --tasks)
"""

from __future__ import annotations

import argparse
import json
import time

from grid_args import add_pass_args, loaded_backbone, parse_with_smoke

from tpv.packed import train_pack
from tpv.train import TrainConfig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pass_args(p)
    p.add_argument("--steps", type=int, default=6)
    args = parse_with_smoke(p, argv, {"rounds": 1, "steps": 2})

    backbone = loaded_backbone(args)
    model = backbone.config.model
    configs = [TrainConfig.preset("causal_cpu", task, seed=k, max_steps=args.steps, eval_every=args.steps,
                                  eval_examples=8, progress=False, backbone={"model": model})
               for k, task in enumerate(args.tasks)]
    k = len(configs)
    walls: dict[int, list[float]] = {1: [], k: []}
    results = {}
    train_pack(configs[:1], backbone, per_pass=1)  # warm-up: allocator, data caches
    for r in range(args.rounds):
        for per_pass in (k, 1) if r % 2 == 0 else (1, k):
            start = time.perf_counter()
            results[per_pass] = train_pack(configs, backbone, per_pass=per_pass)
            walls[per_pass].append(time.perf_counter() - start)
            print(f"round {r}: {per_pass} prompt(s) per pass: {walls[per_pass][-1]:.1f} s", flush=True)
    diff = max(float((a.tuned - b.tuned).norm() / b.tuned.norm()) for a, b in zip(results[k], results[1]))
    print(json.dumps({"own_passes_vs_shared_pass": round(sum(walls[k]) / sum(walls[1]), 3),
                      "shared_pass_s": [round(x, 3) for x in walls[k]], "own_passes_s": [round(x, 3) for x in walls[1]],
                      "max_vector_diff": diff, "prompts": k, "steps": args.steps, "threads": args.threads,
                      "model": model}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
