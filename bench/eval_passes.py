"""How many prompts an evaluation pass should hold on this device: K real prompts evaluated with all K in ONE
pass per batch (`per_pass=K`) vs one pass per prompt (`per_pass=1`), in one process, alternating rounds, on the two
shapes the jobs produce:

- `mixed`: K prompts of different tasks, each on its own validation rows (a training pack's evaluation), so a
  shared pass pads every row to the longest input of the pass;
- `shared`: K prompts of one task on the same rows (the addition's coefficient grid, the weight search's
  candidates, the cross-origin table), where sharing pads nothing.

Last line JSON:

    {"mixed_own_vs_shared": R1, "shared_own_vs_shared": R2, ...}    R = shared-pass wall / own-passes wall
                                                                     (> 1: one prompt per pass is faster)

    python bench/eval_passes.py [--tasks rotten_tomatoes tweets sms_spam trec] [--examples 64] [--threads 2]
    python bench/eval_passes.py --smoke      # CI: one round, 4 rows, one prompt per task (add --model, --tasks)
"""

from __future__ import annotations

import argparse
import json
import time

from grid_args import add_pass_args, loaded_backbone, parse_with_smoke

from tpv.evaluate import evaluate_many
from tpv.prompt import make_origin


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pass_args(p)
    p.add_argument("--prompts-per-task", type=int, default=2, help="K = tasks x this (default 2)")
    p.add_argument("--examples", type=int, default=64, help="validation rows per prompt (default 64)")
    args = parse_with_smoke(p, argv, {"rounds": 1, "examples": 4, "prompts_per_task": 1})

    from tpv.tasks import get_task, load_split

    backbone = loaded_backbone(args)
    model = backbone.config.model
    specs = [get_task(t) for t in args.tasks]
    rows = {t.name: load_split(t.name, "validation", args.examples) for t in specs}
    n = len(specs) * args.prompts_per_task
    prompts = [make_origin(backbone, 10, seed=k) for k in range(n)]
    shapes = {
        "mixed": ([specs[k % len(specs)] for k in range(n)], [rows[specs[k % len(specs)].name] for k in range(n)]),
        "shared": ([specs[0]] * n, [rows[specs[0].name]] * n),
    }
    evaluate_many(backbone, prompts[:1], shapes["shared"][0][:1], shapes["shared"][1][:1], per_pass=1)  # warm-up
    walls = {(shape, per_pass): [] for shape in shapes for per_pass in (n, 1)}
    for r in range(args.rounds):
        for shape, (tasks, examples) in shapes.items():
            for per_pass in (n, 1) if r % 2 == 0 else (1, n):
                start = time.perf_counter()
                evaluate_many(backbone, prompts, tasks, examples, per_pass=per_pass)
                walls[shape, per_pass].append(time.perf_counter() - start)
                print(f"round {r}, {shape}: {per_pass} prompt(s) per pass: {walls[shape, per_pass][-1]:.1f} s",
                      flush=True)
    out = {f"{shape}_own_vs_shared": round(sum(walls[shape, n]) / sum(walls[shape, 1]), 3) for shape in shapes}
    out |= {f"{shape}_{'shared' if per_pass == n else 'own'}_s": [round(x, 3) for x in w]
            for (shape, per_pass), w in walls.items()}
    print(json.dumps(out | {"prompts": n, "examples": args.examples, "threads": args.threads, "model": model}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
