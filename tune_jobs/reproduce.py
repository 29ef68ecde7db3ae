"""`tpv reproduce`: the paper's grid (arXiv 2408.01119) as one resumable job.

    tpv reproduce --plan --backbone t5-base          # every run, its steps, and the hours they take here
    tpv reproduce --backbone /models/t5-base         # sweep -> similarity -> addition -> few-shot transfer
    tpv reproduce --scale 0.05                       # the same plan at 5% of the budget (laptop: bundled model)

The plan (`build_plan`) is the paper's design as its official code configures it (`paper_figures.json`,
`design`): every task x origin of the sweep (10 origins for a seq2seq backbone such as T5, 3 for causal LLMs), the
addition pairs of the six source tasks, and few-shot transfer to the five targets at the paper's shots
{0, 5, ..., 1000}, 1,000 steps each, with the inits random / SPoT / multi-SPoT / TPV. On the bundled backbone the
tasks are the bundled stand-ins (`STAND_INS`), each standing in for its paper task.

Counting needs no weights: sweep steps come from the preset (`tpv.train.total_steps`) and the training rows (the
prepared data when it is there, else `PAPER_TRAIN_POOL` through the paper's split protocol). The hours need one
real step: `estimate` loads the chosen backbone, times training steps on the present device and multiplies out,
labelled GPU-hours or CPU-hours with the device's name. A backbone that is not on this machine (a hub name: tpv
never downloads weights) gets its step counts and a line saying the estimate needs the model; no stand-in model is
timed in its place (another model's step says nothing about this one's).

Running calls the existing jobs with their own resume (`tpv sweep` skips stored pairs and restores its Tune
experiment, `tpv addition` and `tpv transfer` reuse finished trials), so running the same command again after an
interruption continues where it stopped. The report (`reproduce.md`, `reproduce.json`) sets our figures beside
the paper's published ones from `paper_figures.json`, with their table and page; figures the file lacks say so.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tpv.bundled import BUNDLED, DEFAULT_BACKBONE
from tpv.errors import InvalidInput
from tpv.paths import atomic_write
from tune_jobs.config import JobConfig, JobConfigError, add_resource_args, resources_from_args
from tune_jobs.locations import add_location_args, locations_from_args
from tune_jobs.tables import markdown_table

FIGURES_FILE = Path(__file__).with_name("paper_figures.json")

Kind = Literal["seq2seq", "causal", "bundled"]

#: the paper's backbones (aliases included) and their kind; any other name is read from its config.json
PAPER_BACKBONES: dict[str, Kind] = {
    "t5-base": "seq2seq", "google-t5/t5-base": "seq2seq",
    "llama-3.1-8b": "causal", "meta-llama/Llama-3.1-8B-Instruct": "causal",
    "meta-llama/Meta-Llama-3.1-8B-Instruct": "causal",
    "deepseek-7b": "causal", "deepseek-ai/deepseek-llm-7b-chat": "causal",
}
#: origins of the sweep per kind: the paper's 10 for T5, 3 for the LLMs (and the bundled causal model)
ORIGINS: dict[Kind, int] = {"seq2seq": 10, "causal": 3, "bundled": 3}
#: the named recipes per kind (tpv.train.PRESETS; referred to by name, checked when a plan is built)
PRESET_FOR: dict[Kind, str] = {"seq2seq": "t5_paper", "causal": "llm_paper", "bundled": "causal_cpu"}
#: addition on at most this many origins (the official configs/addition.toml: origin_0 .. origin_4)
ADDITION_ORIGINS = 5
#: the transfer runs start from fresh origins (not the sweep's), so TPV inits also test the cross-origin claim
TRANSFER_SEED_BASE = 100
INITS = ["random", "spot", "multi_spot", "tpv"]

#: paper task -> its bundled stand-in (the stand-ins' descriptions name these paper tasks, tpv.tasks.builtin)
STAND_INS: dict[str, str] = {
    "mnli": "vitaminc", "qnli": "boolq", "rte": "epistemic_reasoning", "scitail": "epistemic_reasoning",
    "snli": "presuppositions_nli", "sst2": "rotten_tomatoes", "sst5": "rotten_tomatoes_5", "yelp_polarity": "yelp",
    "imdb_text": "imdb", "trec_coarse": "trec", "trec_fine_text": "trec_fine", "dbpedia": "bbc_news",
    "ag_news": "bbc_news",
}

#: rows of each paper task's official train split (the hub dataset cards), the pool the paper's protocol splits:
#: a pool of 10,000 or more gives 1,000 rows to validation (tpv.tasks.paper). Used only when the task's data is not
#: prepared on this machine; prepared data is counted.
PAPER_TRAIN_POOL: dict[str, int] = {
    "mnli": 392_702, "qqp": 363_846, "qnli": 104_743, "sst2": 67_349, "stsb": 5_749, "mrpc": 3_668, "rte": 2_490,
    "cola": 8_551, "scitail": 23_596, "snli": 549_367, "dbpedia": 560_000, "trec_coarse": 5_452,
    "trec_fine_text": 5_452, "ag_news": 120_000, "yahoo": 1_400_000, "yelp_polarity": 560_000, "sst5": 8_544,
    "imdb_text": 25_000, "squad_v2": 130_319, "math": 7_500,
}


class ReproduceError(JobConfigError):
    """The reproduction's configuration cannot be planned (an unknown preset, too few origins)."""


@lru_cache(maxsize=1)
def paper_figures() -> dict[str, Any]:
    """`paper_figures.json`: the paper's published figures (with table/figure and page), its design, what is missing."""
    return json.loads(FIGURES_FILE.read_text())


def design(key: str) -> Any:
    return paper_figures()["design"][key]["value"]


def backbone_kind(name: str) -> Kind:
    """bundled, seq2seq or causal, without loading weights: the bundled list, a local folder's config.json, or
    the paper's backbones; any other name is taken as causal."""
    if name in BUNDLED:
        return "bundled"
    folder = Path(name).expanduser()
    if (folder / "config.json").is_file():
        return "seq2seq" if json.loads((folder / "config.json").read_text()).get("is_encoder_decoder") else "causal"
    return PAPER_BACKBONES.get(name, "seq2seq" if "t5" in name.lower() else "causal")


class ReproduceConfig(JobConfig):
    """The reproduction: a backbone, the task set (default the paper's for hub backbones, the stand-ins for the
    bundled one), origins, shots and a scale. Every None field takes the paper's value for the backbone's kind."""

    name: str = Field("reproduce", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    backbone: str = DEFAULT_BACKBONE
    preset: str | None = Field(None, description="tpv.train.PRESETS name; default t5_paper / llm_paper / causal_cpu")
    tasks: list[str] | None = Field(None, description="sweep tasks; default the paper's (stand-ins on bundled)")
    origins: int | None = Field(None, ge=1, description="sweep origins (seeds 0..n-1); default 10 T5, 3 LLMs")
    addition_tasks: list[str] | None = Field(None, description="default the paper's six source tasks")
    targets: dict[str, list[str]] | None = Field(None, description="few-shot target -> sources; default the paper's")
    shots: list[int] | None = Field(None, description="few-shot shots; default the paper's 0, 5, ..., 1000")
    few_shot_steps: int | None = Field(None, ge=1, description="steps per few-shot run; default the paper's 1000")
    transfer_origins: int | None = Field(None, ge=2, description="origins of the transfer runs (the t-tests pair "
                                         "them); default as many as the sweep's")
    inits: list[Literal["random", "spot", "multi_spot", "tpv"]] = Field(default_factory=lambda: list(INITS))
    scale: float = Field(1.0, gt=0, le=1, description="fraction of the budget: steps, examples and origins")
    eval_examples: int = Field(200, ge=1, description="addition: validation examples per task at scale 1")
    test_examples: int = Field(200, ge=1, description="addition and transfer: test examples per cell at scale 1")
    alpha: float = Field(0.05, gt=0, lt=1)

    def kind(self) -> Kind:
        return backbone_kind(self.backbone)

    def preset_name(self) -> str:
        from tpv.train import PRESETS

        name = self.preset or PRESET_FOR[self.kind()]
        if name not in PRESETS:
            raise ReproduceError(f"preset {name!r} (the {self.kind()} default) is not in tpv.train.PRESETS "
                                 f"({', '.join(PRESETS)}): pass --preset")
        return name

    def _paper_or_stand_in(self, tasks: list[str]) -> list[str]:
        if self.kind() != "bundled":
            return list(tasks)
        return list(dict.fromkeys(STAND_INS[t] for t in tasks if t in STAND_INS))

    def sweep_tasks(self) -> list[str]:
        """The sweep's tasks: given, else the paper's (every paper task for T5, the LLM task set for causal
        backbones, the stand-ins of every paper task on the bundled backbone)."""
        if self.tasks:
            tasks = list(dict.fromkeys(self.tasks))
        else:
            from tpv.tasks.paper import PAPER_TASKS

            tasks = self._paper_or_stand_in([t.name for t in PAPER_TASKS] if self.kind() != "causal"
                                            else design("llm_tasks"))
        missing = sorted({s for srcs in self.transfer_targets().values() for s in srcs} - set(tasks))
        if missing:
            raise ReproduceError(f"transfer sources {missing} are not among the sweep tasks {tasks}")
        return tasks

    def addition_set(self) -> list[str]:
        if self.addition_tasks:
            return list(self.addition_tasks)
        if self.tasks:
            return list(self.tasks)
        return self._paper_or_stand_in(design("addition_tasks"))

    def transfer_targets(self) -> dict[str, list[str]]:
        if self.targets is not None:
            return dict(self.targets)
        groups: dict[str, list[str]] = {}
        for target, sources in design("few_shot_groups").items():
            if self.kind() == "bundled":
                target = STAND_INS.get(target)
                sources = self._paper_or_stand_in(sources)
                if target is None or target in sources or target in groups:
                    continue  # a stand-in that is also one of its sources is no transfer
            groups[target] = list(sources)
        return groups

    def seeds(self) -> list[int]:
        return list(range(self.scaled_count(self.origins or ORIGINS[self.kind()])))

    def transfer_seeds(self) -> list[int]:
        n = self.transfer_origins or self.scaled_count(self.origins or ORIGINS[self.kind()])
        return [TRANSFER_SEED_BASE + i for i in range(n)]

    def scaled_count(self, n: int) -> int:
        """Origins at the scale: at least 2, so that similarity across origins (and a paired t-test) is defined."""
        return max(2, round(n * self.scale)) if n >= 2 else n

    def scaled_shots(self) -> list[int]:
        shots = self.shots if self.shots is not None else design("few_shot_shots")
        if self.shots is not None or self.scale == 1:
            return list(shots)
        scaled = [0] if 0 in shots else []
        return scaled + sorted({max(1, round(k * self.scale)) for k in shots if k})

    def scaled_few_shot_steps(self) -> int:
        return max(1, math.ceil((self.few_shot_steps or design("few_shot_steps")) * self.scale))

    def scaled_examples(self, n: int) -> int:
        return max(8, math.ceil(n * self.scale))


# --------------------------------------------------------------------------------------------------------- plan
class PlanRow(BaseModel):
    """One line of the plan: a stage's runs for one task (sweep), pair (addition) or target and shot count
    (transfer), with the origins they use and the training steps of each."""

    model_config = ConfigDict(extra="forbid")

    stage: Literal["sweep", "similarity", "addition", "transfer"]
    task: str
    sources: list[str] = []
    seeds: list[int]
    shots: int | None = None
    runs: int
    steps_per_run: int | None = Field(description="None: unknown (the task's training rows are not known here)")
    batch_size: int | None = None
    note: str = ""

    @property
    def steps(self) -> int | None:
        return None if self.steps_per_run is None else self.runs * self.steps_per_run


class StepTiming(BaseModel):
    """What one training step costs on the present device (or why it was not measured)."""

    device: str | None = None
    unit: str | None = None  # "GPU-hours" or "CPU-hours"
    seconds_per_example: float | None = None
    timed_batch: int | None = None
    reason: str | None = None  # why there is no timing


class Plan(BaseModel):
    backbone: str
    kind: Kind
    preset: str
    scale: float
    rows: list[PlanRow]
    timing: StepTiming | None = None

    def stage_totals(self) -> list[dict[str, Any]]:
        out = []
        for stage in ("sweep", "similarity", "addition", "transfer"):
            rows = [r for r in self.rows if r.stage == stage]
            known = [r.steps for r in rows if r.steps is not None]
            out.append({"stage": stage, "lines": len(rows), "runs": sum(r.runs for r in rows),
                        "steps": sum(known), "unknown": sum(1 for r in rows if r.steps is None),
                        "hours": self.hours(rows)})
        return out

    def total_steps(self) -> int:
        return sum(r.steps for r in self.rows if r.steps is not None)

    def hours(self, rows: list[PlanRow] | None = None) -> float | None:
        t = self.timing
        if t is None or t.seconds_per_example is None:
            return None
        rows = self.rows if rows is None else rows
        return sum(r.steps * (r.batch_size or 1) * t.seconds_per_example for r in rows if r.steps) / 3600.0

    def text(self) -> str:
        rows = [{"stage": r.stage, "task": r.task + (f" <- {'+'.join(r.sources)}" if r.sources else ""),
                 "origins": _seed_range(r.seeds), "shots": "" if r.shots is None else r.shots, "runs": r.runs,
                 "steps/run": "?" if r.steps_per_run is None else r.steps_per_run,
                 "batch": r.batch_size or "", "steps": "?" if r.steps is None else r.steps, "note": r.note}
                for r in self.rows]
        totals = self.stage_totals()
        unit = self.timing.unit if self.timing and self.timing.unit else "hours"
        for t in totals:
            t["hours"] = "" if t["hours"] is None else f"{t['hours']:.2f}"
        lines = [f"# tpv reproduce plan: {self.backbone} ({self.kind}), preset {self.preset}, scale {self.scale:g}",
                 "", markdown_table(rows, ["stage", "task", "origins", "shots", "runs", "steps/run", "batch",
                                           "steps", "note"]),
                 "", "## Totals", "", markdown_table(totals, ["stage", "lines", "runs", "steps", "unknown", "hours"]),
                 "", f"total training steps: {self.total_steps():,}"]
        t = self.timing
        if t is not None and t.seconds_per_example is not None:
            lines.append(f"estimate: {self.hours():.2f} {unit} on {t.device} ({1000 * t.seconds_per_example:.2f} ms "
                         f"per training example per step, timed at batch {t.timed_batch} and taken linear in the "
                         "batch; evaluation passes not included)")
        elif t is not None:
            lines.append(f"estimate: none ({t.reason})")
        return "\n".join(lines)


def _seed_range(seeds: list[int]) -> str:
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}..{seeds[-1]} ({len(seeds)})"
    return " ".join(map(str, seeds))


def train_rows(task: str, max_train_examples: int | None) -> tuple[int | None, str]:
    """The training rows of a full-data run of `task`, and where the number comes from."""
    from tpv.errors import TpvError
    from tpv.tasks import load_split

    try:
        n, where = len(load_split(task, "train")), "prepared data"
    except (TpvError, OSError):
        pool = PAPER_TRAIN_POOL.get(task)
        if pool is None:
            return None, "data not prepared"
        n, where = (pool - 1000 if pool >= 10_000 else pool), "official split size"
    if max_train_examples is not None and n > max_train_examples:
        return max_train_examples, f"{where}, capped at max_train_examples"
    return n, where


def sweep_train(config: ReproduceConfig, preset: str) -> dict[str, Any]:
    """TrainConfig overrides of the sweep at the scale: the preset's steps (or epochs) times the scale."""
    from tpv.train import PRESETS, TrainConfig

    if config.scale == 1:
        return {}
    base = PRESETS[preset]
    if base.get("max_steps"):
        return {"max_steps": max(1, math.ceil(base["max_steps"] * config.scale))}
    return {"epochs": TrainConfig.model_fields["epochs"].default * config.scale if "epochs" not in base
            else base["epochs"] * config.scale}


def build_plan(config: ReproduceConfig) -> Plan:
    """Every run of the reproduction, counted without loading the model."""
    from tpv.train import TrainConfig, total_steps

    preset = config.preset_name()
    seeds, tseeds = config.seeds(), config.transfer_seeds()
    train = sweep_train(config, preset)
    rows: list[PlanRow] = []
    for task in config.sweep_tasks():
        cfg = TrainConfig.preset(preset, task, backbone={"model": config.backbone}, **train)
        n, where = train_rows(task, cfg.max_train_examples)
        steps = cfg.max_steps or (None if n is None else total_steps(cfg, n))
        rows.append(PlanRow(stage="sweep", task=task, seeds=seeds, runs=len(seeds), steps_per_run=steps,
                            batch_size=cfg.batch_size,
                            note=(f"{cfg.max_steps} steps" if cfg.max_steps else
                                  f"{cfg.epochs:g} epochs x {n} rows ({where})" if n else where)))
    rows.append(PlanRow(stage="similarity", task="all swept tasks", seeds=seeds, runs=0, steps_per_run=0,
                        note="flat cosine + permutation test; no training"))
    add_seeds = seeds[:ADDITION_ORIGINS]
    for pair in itertools.combinations(config.addition_set(), 2):
        rows.append(PlanRow(stage="addition", task=" + ".join(pair), seeds=add_seeds, runs=len(add_seeds),
                            steps_per_run=0, note="evaluation only: c on validation, grid 0..1 step 0.05"))
    few_steps = config.scaled_few_shot_steps()
    for target, sources in config.transfer_targets().items():
        batch = TrainConfig.preset(preset, target).batch_size
        for k in config.scaled_shots():
            rows.append(PlanRow(stage="transfer", task=target, sources=sources, seeds=tseeds, shots=k,
                                runs=len(config.inits) * len(tseeds), steps_per_run=few_steps if k else 0,
                                batch_size=batch, note=f"inits {', '.join(config.inits)}"
                                + ("; zero-shot: the inits evaluated as they are" if not k else "")))
    return Plan(backbone=config.backbone, kind=config.kind(), preset=preset, scale=config.scale, rows=rows)


# ----------------------------------------------------------------------------------------------------- estimate
def estimate(config: ReproduceConfig, plan: Plan, steps: int = 3) -> StepTiming:
    """Time real training steps of the plan's backbone on the present device: a short run of 1 and of 1 + steps
    steps (the same load, start and evaluation) on the first sweep task whose data is here; their difference over
    `steps` is one step. Tiny batch (at most 4), taken linear in the batch."""
    from tpv.backbone import Backbone
    from tpv.bundled import BackboneNotFound, resolve_model_path
    from tpv.errors import TpvError
    from tpv.tasks import load_split
    from tpv.train import TrainConfig, train

    try:
        resolve_model_path(config.backbone)
    except BackboneNotFound:
        return StepTiming(reason=f"the estimate needs the model: {config.backbone!r} is not on this machine (pass "
                          "a local folder with --backbone); the step counts above need no weights")
    sweep = [r.task for r in plan.rows if r.stage == "sweep"]
    task = None
    for name in sweep:
        try:
            load_split(name, "train", limit=1, seed=0)
            task = name
            break
        except (TpvError, OSError):
            continue
    if task is None:
        return StepTiming(reason="the estimate times a real step on a task's data: none of the sweep tasks has "
                          "prepared data here (`tpv data fetch`)")
    cfg = TrainConfig.preset(plan.preset, task, backbone={"model": config.backbone}, progress=False)
    batch = min(cfg.batch_size, 4)
    backbone = Backbone.load(cfg.backbone)

    def run(n: int) -> float:
        short = cfg.model_copy(update={"max_steps": n, "eval_every": n, "eval_examples": 1, "batch_size": batch,
                                       "warmup_steps": 0, "patience": None})
        started = time.perf_counter()
        train(TrainConfig.model_validate(short.model_dump()), backbone)
        return time.perf_counter() - started

    run(1)  # warm-up: kernels, allocator, tokenizer caches
    one = run(1)
    more = run(1 + steps)
    per_step = max(more - one, 1e-6) / steps
    device = backbone.device
    if device.type == "cuda":
        import torch

        name, unit = torch.cuda.get_device_name(device), "GPU-hours"
    else:
        import torch

        name, unit = f"{device.type} ({torch.get_num_threads()} threads)", f"{device.type.upper()}-hours"
    return StepTiming(device=name, unit=unit, seconds_per_example=per_step / batch, timed_batch=batch)


# ------------------------------------------------------------------------------------------------------ running
def run_reproduce(config: ReproduceConfig) -> dict[str, Any]:
    """The four stages with each job's own resume, then the report beside the paper's figures."""
    from tune_jobs.addition import AdditionConfig, run_addition_job
    from tune_jobs.report import similarity_report
    from tune_jobs.runtime import init_ray
    from tune_jobs.selections import held_out
    from tune_jobs.sweep import SweepConfig, run_sweep
    from tune_jobs.transfer import TransferConfig, run_transfer

    plan = build_plan(config)
    loc = config.locations.resolved()
    seeds, tseeds = config.seeds(), config.transfer_seeds()
    overlap = held_out("tpv reproduce", plan_tasks(plan), [*seeds, *tseeds])
    common = dict(resources=config.resources, locations=config.locations, max_failures=config.max_failures,
                  fresh=config.fresh, verbose=config.verbose)
    init_ray()
    print(f"\n=== [1/4] sweep: {len(config.sweep_tasks())} tasks x {len(seeds)} origins", flush=True)
    swept = run_sweep(SweepConfig(name=f"{config.name}-sweep", tasks=config.sweep_tasks(), seeds=seeds,
                                  backbones=[config.backbone], preset=plan.preset,
                                  train=sweep_train(config, plan.preset), **common))
    print("\n" + swept["table"], flush=True)
    if swept["failed"]:
        raise ReproduceError(f"{swept['failed']} sweep trial(s) failed; run the same command again to retry them")
    source = swept["source"]

    print("\n=== [2/4] similarity across origins (flat cosine, the paper's measure)", flush=True)
    sim = similarity_report(loc.store, loc.out_dir, tasks=config.sweep_tasks(), seeds=seeds,
                            name=f"{config.name}-similarity", source=source)

    print(f"\n=== [3/4] addition: pairs of {', '.join(config.addition_set())}", flush=True)
    added = run_addition_job(AdditionConfig(
        name=f"{config.name}-addition", tasks=config.addition_set(),
        combinations=[list(p) for p in itertools.combinations(config.addition_set(), 2)],
        seeds=seeds[:ADDITION_ORIGINS], vectors_source=source, backbone=config.backbone,
        eval_examples=config.scaled_examples(config.eval_examples),
        test_examples=config.scaled_examples(config.test_examples), **common))

    print("\n=== [4/4] few-shot transfer with the paper's t-tests", flush=True)
    moved = run_transfer(TransferConfig(
        name=f"{config.name}-transfer", targets=config.transfer_targets(), shots=config.scaled_shots(),
        seeds=tseeds, inits=config.inits, backbone=config.backbone, preset=plan.preset,
        few_shot_steps=config.scaled_few_shot_steps(), test_examples=config.scaled_examples(config.test_examples),
        vectors_source=source, vector_seeds=seeds, **common))
    return write_report(config, plan, sim, added, moved, overlap)


def plan_tasks(plan: Plan) -> list[str]:
    return list(dict.fromkeys(r.task for r in plan.rows if r.stage == "sweep"))


def paper_cell(stage: str) -> str:
    """The paper's published figure(s) for a stage, with table/figure and page, or that the file lacks them."""
    found = [f for f in paper_figures()["figures"] if f["stage"] == stage]
    if not found:
        return "not in paper_figures.json"
    parts = []
    for f in found:
        where = ", ".join(x for x in (f.get("table") and f"Table {f['table']}", f.get("figure") and
                                      f"Figure {f['figure']}", f.get("location"), f"p. {f['page']}") if x)
        value = f["value"] if f.get("value") is not None else f["claim"]
        parts.append(f"{value} ({where})")
    return "; ".join(parts)


def write_report(config: ReproduceConfig, plan: Plan, sim: dict[str, Any], added: dict[str, Any],
                 moved: dict[str, Any], overlap) -> dict[str, Any]:
    """`reproduce.md` and `reproduce.json`: each of our figures beside the paper's."""
    flat = {row["kind"]: row for row in sim["summary"]["flat"]}
    perm = sim["same_task_test"]
    rows: list[dict[str, Any]] = []

    def add(stage: str, what: str, ours: str, paper: str | None = None) -> None:
        rows.append({"stage": stage, "figure": what, "ours": ours,
                     "paper": paper if paper is not None else paper_cell(stage)})

    for kind in ("same_task", "diff_task", "same_origin"):
        if kind in flat:
            r = flat[kind]
            add("similarity", f"cosine, {kind.replace('_', ' ')} pairs (n {r['n']})",
                f"{r['mean']:.3f} ± {r['std']:.3f} (min {r['min']:.3f}, max {r['max']:.3f})")
    add("similarity", "same task across origins beyond chance (permutation test)",
        f"p = {getattr(perm, 'p', float('nan')):.4g}")
    add("addition", "mean retention over pairs (paper rule, c on validation)",
        f"{added['mean_retention'].get('paper', float('nan')):.1f}%")
    for r in added["rows"]:
        if r["rule"] == "paper":
            add("addition", f"{r['combination']}: {r['task']} ({r['metric']}) single -> combined",
                f"{r['single']} -> {r['combined']} ({r['retention %']}%)", "not in paper_figures.json")
    from tune_jobs.transfer import significance

    transfer_cfg = _TransferView(config)
    for target in config.transfer_targets():
        for t in significance(transfer_cfg, target, moved["rows"]):
            gain = "n/a" if t["gain"] is None else f"{t['gain']:+.3f}"
            add("transfer", f"{target} k={t['shots']}: {t['init']} vs random (paired t-test, Bonferroni)",
                f"gain {gain}, p {t['p (Bonferroni)']:.3g}, significant: {t['significant']}",
                "not in paper_figures.json")
    add("transfer", "claim: TPV inits help in few-shot settings", "see the t-test lines above")
    out = Path(config.locations.resolved().out_dir) / config.name
    md = "\n".join([
        f"# tpv reproduce: {config.backbone}, preset {plan.preset}, scale {config.scale:g}", "",
        f"Our figures beside the paper's (arXiv {paper_figures()['paper']['arxiv']}, from "
        "`tune_jobs/paper_figures.json` with their table/figure and page). Missing from that file: "
        + "; ".join(paper_figures()["missing"]) + ".", "",
        *([f"FLAGGED: {overlap.describe()}", ""] if not overlap.empty else []),
        markdown_table(rows, ["stage", "figure", "ours", "paper"]), "",
        f"similarity: {sim['paths']['markdown']}", f"addition: {added['paths']['markdown']}",
        f"transfer: {moved['paths']['markdown']}", ""])
    summary = {"backbone": config.backbone, "preset": plan.preset, "scale": config.scale, "rows": rows,
               "plan": plan.model_dump(mode="json"), "paths": {"similarity": sim["paths"]["markdown"],
                                                              "addition": added["paths"]["markdown"],
                                                              "transfer": moved["paths"]["markdown"]}}
    paths = {"markdown": str(atomic_write(out / "reproduce.md", md)),
             "json": str(atomic_write(out / "reproduce.json", json.dumps(summary, indent=2, default=str)))}
    return {"rows": rows, "markdown": md, "paths": paths, "failed": added["failed"] + moved["failed"]}


class _TransferView:
    """The fields `tune_jobs.transfer.significance` reads, from the reproduction's config."""

    def __init__(self, config: ReproduceConfig):
        self.inits, self.seeds, self.shots = config.inits, config.transfer_seeds(), config.scaled_shots()


# ---------------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tpv reproduce",
        description="The paper's grid as one resumable job: sweep (tasks x origins) -> cross-origin similarity -> "
                    "addition -> few-shot transfer with the paper's t-tests, and one report with the paper's "
                    "published figures beside ours. --plan prints every run, its steps and the estimated hours.",
        epilog="Examples:\n  tpv reproduce --plan --backbone t5-base\n  tpv reproduce --plan --scale 0.05\n"
               "  RAY_ADDRESS=auto tpv reproduce --backbone /models/t5-base --gpus-per-trial 0.25\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--plan", action="store_true", help="print the plan and the estimate, then exit")
    p.add_argument("--no-estimate", action="store_true", help="with --plan: count steps only, time nothing")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"bundled name, local folder or a paper backbone "
                   f"name (t5-base, llama-3.1-8b, deepseek-7b) for --plan (default {DEFAULT_BACKBONE})")
    p.add_argument("--preset", help="the recipe (tpv.train.PRESETS; default t5_paper / llm_paper / causal_cpu)")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the budget (steps, examples, origins; "
                   "at least 2 origins)")
    p.add_argument("--tasks", nargs="+", help="sweep tasks (default the paper's; the stand-ins on bundled)")
    p.add_argument("--addition-tasks", nargs="+", help="tasks whose pairs are added (default the paper's six)")
    p.add_argument("--transfer", nargs="+", metavar="TARGET=SRC+SRC", help="few-shot target and its sources")
    p.add_argument("--origins", type=int, help="sweep origins (default 10 seq2seq, 3 causal)")
    p.add_argument("--transfer-origins", type=int, help="origins of the transfer runs (default as the sweep's)")
    p.add_argument("--shots", nargs="+", type=int, help="few-shot shots (default the paper's 0 5 ... 1000)")
    p.add_argument("--few-shot-steps", type=int, help="steps per few-shot run (default 1000)")
    p.add_argument("--inits", nargs="+", choices=INITS, help=f"transfer inits (default {' '.join(INITS)})")
    p.add_argument("--name", help="job name (folder of the report; default reproduce)")
    p.add_argument("--fresh", action="store_true", help="do not resume interrupted experiments")
    add_resource_args(p)
    add_location_args(p)
    return p


def config_from_cli(args) -> ReproduceConfig:
    data: dict[str, Any] = {k: getattr(args, k) for k in ("backbone", "preset", "scale", "tasks", "addition_tasks",
                                                         "origins", "transfer_origins", "shots", "few_shot_steps",
                                                         "inits", "name") if getattr(args, k) is not None}
    if args.transfer:
        data["targets"] = {}
        for item in args.transfer:
            target, _, sources = item.partition("=")
            if not target or not sources:
                raise ReproduceError(f"--transfer takes TARGET=SOURCE+SOURCE, got {item!r}")
            data["targets"][target] = sources.split("+")
    data["resources"] = resources_from_args(args, {})
    data["fresh"] = args.fresh
    config = ReproduceConfig.model_validate(data)
    config.locations = locations_from_args(args, config.locations)
    return config


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_cli(args)
    plan = build_plan(config)
    if args.plan:
        if not args.no_estimate:
            plan.timing = estimate(config, plan)
        print(plan.text())
        return 0
    from tune_jobs.config import start_ray

    start_ray(args)
    try:
        plan.timing = estimate(config, plan)
    except InvalidInput as exc:
        print(f"[reproduce] no estimate: {exc}", flush=True)
    print(plan.text(), flush=True)
    result = run_reproduce(config)
    print("\n" + result["markdown"])
    print(f"report: {result['paths']['markdown']}\n        {result['paths']['json']}")
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
