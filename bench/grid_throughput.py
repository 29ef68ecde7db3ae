"""What packing buys a grid: 8 (task, seed) runs of the same steps and batch, packed in ONE Tune trial
(`tpv sweep --pack 8`) vs one trial per run (`tpv sweep`, as before packing), side by side in one run; and, as a
third side, `tpv sweep --pack` (auto: one 1-CPU pack per CPU).

Every side gets the same CPUs (`--cpus`, default 2) on a local Ray started for that side alone (fresh worker
processes, so each side's memory is its own): the per-run side runs one-thread trials side by side, the packed
side one trial with `--cpus` threads, the auto side `--cpus` one-thread packs. Wall time is the sweep's, from
`run_sweep` to its return (Ray's own start excluded). Peak memory is the largest sum, over time, of the resident
memory of the Ray worker processes of that side's Ray (sampled every 0.1 s). Each vector of the packed side is
compared with the same pair's vector of the per-run side: ||difference|| / ||vector|| (D, the largest over pairs
and sides; `vector_diff_by_side` per side), and the stricter max |difference| / max |vector| (`max_abs_diff`). On a
CPU each packed prompt has its own forward pass, so both are 0 at the same thread count (the auto side); the packed
side's `--cpus` threads change the sums of the small matrix products that run the prompt once per step (L rows),
which a lone run shows between 1 and 2 threads too. On a GPU the pack shares passes, and float noise from the
larger matrix products weighs most on the components with the smallest gradients (AdamW normalizes each by its own
gradient's size). The sides take turns over `--rounds`, in a rotating order. `--sides floor` adds the arithmetic
alone (`side_floor`, no Ray): per-run wall / floor wall, `floor_vs_trials_wall`, is the most R that any packing of
the same runs could reach on these CPUs. Last line JSON:

    {"packed_vs_trials_wall": R, "packed_vs_trials_peak_rss": M, "max_vector_diff": D, "auto_vs_trials_wall": ...}
    R = per-run wall / packed wall (target >= 1.3 on CPU, >= 4 on a GPU); M = packed peak / per-run peak
    (target <= 0.6); D relative (target <= 1e-4)

    python bench/grid_throughput.py                        # bundled SmolLM2-135M, 4 tasks x 2 seeds, 8 steps
    python bench/grid_throughput.py --steps 4 --eval-examples 16 --rounds 2
    python bench/grid_throughput.py --smoke   # CI: one round of 2 steps, 1 seed, per-run and packed sides
"""

from __future__ import annotations

import argparse
import json
import math
import queue
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from grid_args import add_grid_args, parse_with_smoke, prepared_model

#: the sides on Ray: name -> its pack (the packed side packs every run into one trial)
SIDES = {"packed": "all", "per-run": 1, "auto": "auto"}
#: each side's name in the JSON (`floor`: `side_floor`, no Ray)
KEYS = {"packed": "packed_vs_trials", "auto": "auto_vs_trials", "floor": "floor_vs_trials"}


class PeakWorkers:
    """The peak, over time, of the summed resident memory of this Ray's worker processes (the raylet's children)."""

    def __init__(self, interval: float = 0.1):
        import psutil
        import ray

        node = ray._private.worker._global_node
        self.raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        total = 0
        for proc in self.raylet.children(recursive=True):
            try:
                if proc.cmdline()[:1] and proc.cmdline()[0].startswith("ray::"):
                    total += proc.memory_info().rss
            except psutil.Error:
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.interval)

    def __enter__(self) -> PeakWorkers:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def side(config, pack: int | str, cpus_per_trial: int, cpus: int, work: Path) -> dict:
    """One side in its own local Ray: wall time, peak worker memory, the vectors it wrote."""
    import ray

    from tpv.store import VectorStore
    from tune_jobs.config import Resources
    from tune_jobs.locations import Locations
    from tune_jobs.runtime import init_ray
    from tune_jobs.sweep import run_sweep

    cfg = config.model_copy(update={
        "name": f"bench-pack{pack}", "fresh": True,
        "resources": Resources(cpus_per_trial=float(cpus_per_trial), pack=pack),
        "locations": Locations(store=str(work / "store"), storage_path=str(work / "ray_results"), out_dir=str(work)),
    })
    init_ray(num_cpus=cpus)
    try:
        with PeakWorkers() as memory:
            start = time.perf_counter()
            outcome = run_sweep(cfg)
            wall = time.perf_counter() - start
    finally:
        ray.shutdown()
    if outcome["failed"]:
        raise SystemExit(f"the pack={pack} side had failed trials:\n{outcome['table']}")
    store = VectorStore(work / "store")
    vectors = {(m.task, m.origin_seed): store.get(m.vector_id).tensor for m in store.list()}
    return {"wall": wall, "peak": memory.peak, "vectors": vectors}


def side_without_ray(configs, packed: bool) -> dict:
    """`--without-ray`: the same two sides in this process, for a box with torch but no Ray (a lent GPU). The
    per-run side loads the model and trains one run at a time, as one trial per run does on one GPU; the packed side
    loads it once and trains every run as one pack. Ray's actor start-up is left out of both, so R here is a lower
    bound of the sweep's. Peak memory is the GPU's peak allocation (None on a CPU, where one process cannot tell the
    sides apart)."""
    import torch

    from tpv.backbone import Backbone
    from tpv.packed import train_pack

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    vectors = {}
    for group in ([configs] if packed else [[c] for c in configs]):
        backbone = Backbone.load(group[0].backbone)  # every trial loads its own model
        for config, result in zip(group, train_pack(group, backbone)):
            vectors[(config.task, config.seed)] = (result.tuned - result.origin).float().cpu()
        del backbone
    if cuda:
        torch.cuda.synchronize()
    return {"wall": time.perf_counter() - start, "vectors": vectors,
            "peak": torch.cuda.max_memory_allocated() if cuda else None}


def _floor_share(configs: list[dict], ready, results) -> None:
    """One CPU's share of `side_floor`: one torch thread, its model loaded before the clock starts."""
    import torch

    from tpv.backbone import Backbone
    from tpv.packed import train_pack
    from tpv.train import TrainConfig

    torch.set_num_threads(1)
    configs = [TrainConfig.model_validate(c) for c in configs]
    backbone = Backbone.load(configs[0].backbone)
    ready.wait()  # every share starts its clock together, after every model load
    start = time.perf_counter()
    trained = train_pack(configs, backbone)
    wall = time.perf_counter() - start
    results.put((wall, [((c.task, c.seed), (r.tuned - r.origin).float().numpy()) for c, r in zip(configs, trained)]))


def side_floor(configs, cpus: int) -> dict:
    """`--sides floor`: the arithmetic alone, a lower bound on any side's wall, so per-run wall / floor wall bounds
    the R that any arrangement of the same runs could reach. No Ray, no Tune, no checkpoints or store: `cpus`
    processes of one torch thread, each with its model already loaded, train a share of the runs balanced by work
    (`tune_jobs.grid.pack_specs`, as the auto side's packs); the wall is the slowest share's."""
    import multiprocessing

    import torch

    from tune_jobs.grid import pack_specs
    from tune_jobs.trial import TrialSpec

    specs = [TrialSpec(label=f"{c.task}/s{c.seed}", train=c) for c in configs]
    shares = pack_specs(specs, math.ceil(len(specs) / cpus))
    ctx = multiprocessing.get_context("spawn")
    ready, results = ctx.Barrier(len(shares)), ctx.Queue()
    workers = [ctx.Process(target=_floor_share, args=([s.train.model_dump() for s in share], ready, results))
               for share in shares]
    for worker in workers:
        worker.start()
    done = []
    while len(done) < len(workers):
        try:
            done.append(results.get(timeout=5))
        except queue.Empty:
            if any(w.exitcode for w in workers):
                raise SystemExit("a floor share failed: its error is above") from None
    for worker in workers:
        worker.join()
    return {"wall": max(wall for wall, _ in done), "peak": None,
            "vectors": {key: torch.from_numpy(v) for _, vectors in done for key, v in vectors}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_grid_args(p, ["rotten_tomatoes", "tweets", "sms_spam", "trec"], steps=8, cpus_help="CPUs of each side", rounds=1)
    p.add_argument("--sides", nargs="+", choices=[*SIDES, "floor"], default=list(SIDES),
                   help="which sides to run (per-run always runs: the others are compared with it; floor: the "
                   "arithmetic alone, `side_floor`)")
    p.add_argument("--without-ray", action="store_true", help="packed vs per-run in this process, no Ray "
                   "(`side_without_ray`): for a machine without Ray")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="the backbone's dtype (auto: bfloat16 on a GPU, float32 on a CPU)")
    args = parse_with_smoke(p, argv, {"rounds": 1, "steps": 2, "seeds": [0], "eval_examples": 4,
                                      "sides": ["packed"]})

    model = prepared_model(args)
    train = {"max_steps": args.steps, "eval_every": args.steps, "eval_examples": args.eval_examples,
             "backbone": {"dtype": args.dtype}}
    work = Path(tempfile.mkdtemp(prefix="tpv-bench-grid-"))
    if args.without_ray:  # the sweep's own configs would import Ray: the same preset and overrides, built here
        from tpv.train import TrainConfig

        configs = [TrainConfig.preset("causal_cpu", task, **{**train, "seed": seed, "progress": False,
                                                             "backbone": {**train["backbone"], "model": model}})
                   for task in args.tasks for seed in args.seeds]
        sides = ["per-run", "packed"]
        print(f"{len(configs)} runs of {args.steps} steps in this process (no Ray) on {model}", flush=True)

        def run_side(name: str, r: int) -> dict:
            return side_without_ray(configs, packed=name == "packed")
    else:
        from tune_jobs.sweep import SweepConfig

        config = SweepConfig(name="bench", tasks=args.tasks, seeds=args.seeds, backbones=[model], train=train)
        configs = config.train_configs()
        print(f"{len(configs)} runs of {args.steps} steps (preset {config.preset}: batch 8) on {model}, "
              f"{args.cpus} CPUs a side", flush=True)
        # (pack, CPUs per trial) of each side
        plan = {name: (len(configs) if name == "packed" else SIDES[name], args.cpus if name == "packed" else 1)
                for name in SIDES if name in args.sides or name == "per-run"}
        sides = list(plan) + ["floor"] * ("floor" in args.sides)

        def run_side(name: str, r: int) -> dict:
            if name == "floor":
                return side_floor(configs, args.cpus)
            return side(config, *plan[name], args.cpus, work / f"r{r}-{name}")

    walls: dict[str, list[float]] = {name: [] for name in sides}
    peaks: dict[str, list[int | None]] = {name: [] for name in sides}
    diffs: dict[str, list[float]] = {name: [] for name in sides if name != "per-run"}
    abs_diffs: list[float] = []
    try:
        for r in range(args.rounds):
            found = {}
            for name in sides[r % len(sides):] + sides[:r % len(sides)]:
                found[name] = run_side(name, r)
                walls[name].append(found[name]["wall"])
                peaks[name].append(found[name]["peak"])
                memory = "" if found[name]["peak"] is None else f", peak memory {found[name]['peak'] / 2**30:.2f} GiB"
                print(f"round {r}: {name} {found[name]['wall']:.1f}s{memory}", flush=True)
            single = found["per-run"]["vectors"]
            for other in set(sides) - {"per-run"}:
                packed = found[other]["vectors"]
                assert packed.keys() == single.keys() and len(packed) == len(configs), "every side has every pair"
                diffs[other] += [float((packed[k] - single[k]).norm() / single[k].norm()) for k in single]
                abs_diffs += [float((packed[k] - single[k]).abs().max() / single[k].abs().max()) for k in single]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    measured = [name for name in sides if all(x is not None for x in peaks[name])]
    print(json.dumps({
        **{f"{KEYS[name]}_wall": round(sum(walls["per-run"]) / sum(walls[name]), 3) for name in KEYS if name in sides},
        **{f"{KEYS[name]}_peak_rss": round(statistics.mean(peaks[name]) / statistics.mean(peaks["per-run"]), 3)
           if "per-run" in measured and name in measured else None for name in ("packed", "auto") if name in sides},
        "max_vector_diff": max((d for ds in diffs.values() for d in ds), default=None),
        "max_abs_diff": max(abs_diffs, default=None),
        "vector_diff_by_side": {name: max(ds, default=None) for name, ds in diffs.items()},
        **{f"{name}_s": [round(x, 3) for x in walls[name]] for name in sides},
        **{f"{name}_peak_gib": [round(x / 2**30, 2) for x in peaks[name]] for name in measured},
        "runs": len(configs), "steps": args.steps, "cpus": args.cpus, "model": model, "dtype": args.dtype,
        "ray": not args.without_ray,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
