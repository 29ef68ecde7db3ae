"""A (task x origin seed) grid trained as ONE pack in this process, through the library alone (no Ray): for a single
GPU box where a Ray cluster would only add start-up time, such as a lent GPU with nothing installed but torch.

Every prompt's best vector (source `--source`) and its origin go to `--store` the moment it finishes, and the prompt
as it was at each `--snapshots` step goes there too (source `<source>@<step>`), so `tpv report --vectors-source`
reads the similarity tables at every training length afterwards. Each best prompt is also scored on its task's test
split. One JSON line per finished prompt; the last line is the whole summary, also written to `--out`.

    python scripts/pack_grid.py --tasks rotten_tomatoes tweets trec bbc_news --seeds 0 1 2 --preset causal \
        --set max_steps=3000 batch_size=32 eval_every=500 --snapshots 300 1000 3000 \
        --store /tmp/grid-store --source gpu-grid --test-examples 1000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tpv.backbone import Backbone
from tpv.cli import guarded
from tpv.errors import InvalidInput
from tpv.evaluate import evaluate
from tpv.packed import Evaluation, train_pack
from tpv.prompt import make_origin
from tpv.store import VectorStore
from tpv.tasks import get_task, load_split
from tpv.train import (
    PRESETS,
    TrainConfig,
    TrainResult,
    prompt_length_for,
    snapshot_vector,
)
from tune_jobs.config import parse_overrides


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="origin seeds")
    p.add_argument("--preset", choices=list(PRESETS), default="causal")
    p.add_argument("--set", nargs="+", metavar="KEY=VALUE", default=[], help="TrainConfig overrides (as tpv sweep)")
    p.add_argument("--snapshots", nargs="*", type=int, default=[], help="also store the prompt at these steps "
                   "(each must be an evaluation step: a multiple of eval_every, or the last step)")
    p.add_argument("--store", required=True)
    p.add_argument("--source", default="pack-grid", help="VectorMeta.source of the stored vectors")
    p.add_argument("--test-examples", type=int, default=1000, help="test examples per task (0: no test scores)")
    p.add_argument("--out", default=None, help="also write the summary JSON here")
    args = p.parse_args(argv)

    overrides = {"progress": False, **parse_overrides(args.set)}
    configs = [TrainConfig.preset(args.preset, task, **{**overrides, "seed": seed})
               for task in args.tasks for seed in args.seeds]
    every, last = configs[0].eval_every, configs[0].max_steps
    late = [s for s in args.snapshots if s % every and s != last]
    if late:
        raise InvalidInput(f"--snapshots {late}: a snapshot is taken at an evaluation, so each step must be a "
                           f"multiple of eval_every ({every}) or the last step")
    started = time.perf_counter()
    backbone = Backbone.load(configs[0].backbone)
    store = VectorStore(args.store)
    bb_id = backbone.backbone_id
    length = prompt_length_for(configs[0], backbone)
    origins = {c.seed: make_origin(backbone, length, c.seed) for c in configs}
    tests = {t: load_split(t, "test", limit=args.test_examples or None) for t in args.tasks} if args.test_examples else {}
    rows: list[dict] = []

    def on_eval(evaluations: list[Evaluation]) -> None:
        for e in evaluations:
            if e.step in args.snapshots:
                cfg = configs[e.index]
                store.put(snapshot_vector(cfg, e.state, origins[cfg.seed], bb_id, args.source, e.metrics))

    def on_finish(index: int, result: TrainResult) -> None:
        cfg = configs[index]
        store.put(result.vector(bb_id, source=args.source))
        store.put_origin(bb_id, result.origin.shape[0], cfg.seed, result.origin, embedded_dtype=backbone.dtype)
        task = get_task(cfg.task)
        row = {"task": cfg.task, "seed": cfg.seed, "steps": result.steps, "tau_norm": float(
            (result.tuned - result.origin).norm()), "seconds": round(time.perf_counter() - started, 1),
            **{f"val_{k}": v for k, v in result.metrics.items()}}
        if cfg.task in tests:
            row |= {f"test_{k}": v for k, v in evaluate(backbone, result.tuned, task, tests[cfg.task]).items()
                    if isinstance(v, (int, float))}
        rows.append(row)
        print(json.dumps(row), flush=True)

    train_pack(configs, backbone, on_eval=on_eval, on_finish=on_finish)
    summary = {"runs": rows, "minutes": round((time.perf_counter() - started) / 60, 2), "device": str(backbone.device),
               "dtype": str(backbone.dtype).removeprefix("torch."), "config": configs[0].model_dump(
                   mode="json", exclude={"task", "seed"}), "source": args.source}
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(guarded(main))
