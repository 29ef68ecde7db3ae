"""`tpv reproduce`: the plan counted by hand, the paper's figures file, and a tiny end-to-end run on a real local Ray
with the tiny causal model and two user tasks."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import write_sentiment_task

from tpv.tasks import get_task, register_task
from tune_jobs.reproduce import (
    PAPER_TRAIN_POOL,
    ReproduceConfig,
    ReproduceError,
    build_plan,
    paper_figures,
)


def test_t5_plan_counts_the_papers_grid_without_weights():
    """20 paper tasks x 10 origins; 15 addition pairs x 5 origins; 5 targets x 10 shots x 4 inits x 10 origins,
    1,000 steps per few-shot run (0 at k=0). MNLI: (392,702 - 1,000 validation rows) / 32 -> 12,241 steps an
    epoch, 10 epochs."""
    plan = build_plan(ReproduceConfig(backbone="t5-base"))
    totals = {t["stage"]: t for t in plan.stage_totals()}
    assert plan.kind == "seq2seq" and plan.preset == "t5_paper"
    assert (totals["sweep"]["lines"], totals["sweep"]["runs"]) == (20, 200)
    assert (totals["addition"]["lines"], totals["addition"]["runs"], totals["addition"]["steps"]) == (15, 75, 0)
    assert (totals["transfer"]["lines"], totals["transfer"]["runs"]) == (50, 2000)
    assert totals["transfer"]["steps"] == 5 * 9 * 4 * 10 * 1000
    mnli = next(r for r in plan.rows if r.stage == "sweep" and r.task == "mnli")
    assert mnli.seeds == list(range(10)) and mnli.steps_per_run == 10 * math.ceil((392_702 - 1_000) / 32)
    rte = next(r for r in plan.rows if r.stage == "sweep" and r.task == "rte")  # < 10,000 rows: the whole pool
    assert rte.steps_per_run == 10 * math.ceil(PAPER_TRAIN_POOL["rte"] / 32)
    shots = sorted({r.shots for r in plan.rows if r.stage == "transfer"})
    assert shots == [0, 5, 10, 25, 50, 100, 250, 500, 750, 1000]
    assert all(r.seeds[0] >= 100 for r in plan.rows if r.stage == "transfer")  # fresh origins, not the sweep's
    assert plan.total_steps() == totals["sweep"]["steps"] + totals["transfer"]["steps"]


def test_llm_plans_use_three_origins_and_the_llm_task_set():
    for name in ("llama-3.1-8b", "deepseek-7b"):
        plan = build_plan(ReproduceConfig(backbone=name))
        totals = {t["stage"]: t for t in plan.stage_totals()}
        assert plan.kind == "causal" and plan.preset == "llm_paper"
        assert (totals["sweep"]["lines"], totals["sweep"]["runs"]) == (13, 39)
        assert totals["addition"]["runs"] == 15 * 3 and totals["transfer"]["runs"] == 5 * 10 * 4 * 3


def test_scale_shrinks_steps_shots_and_origins_but_keeps_two_origins():
    full = build_plan(ReproduceConfig(backbone="t5-base"))
    small = build_plan(ReproduceConfig(backbone="t5-base", scale=0.05))
    assert {tuple(r.seeds) for r in small.rows if r.stage == "sweep"} == {(0, 1)}  # round(10 x 0.05) = 0 -> 2
    few = [r for r in small.rows if r.stage == "transfer" and r.shots]
    assert {r.steps_per_run for r in few} == {50}
    assert sorted({r.shots for r in small.rows if r.stage == "transfer"}) == [0, 1, 2, 5, 12, 25, 38, 50]
    assert small.total_steps() < full.total_steps() / 20


def test_bundled_plan_runs_on_the_stand_ins():
    config = ReproduceConfig()
    assert config.kind() == "bundled" and build_plan(config).preset == "causal_cpu"
    assert {"vitaminc", "boolq", "rotten_tomatoes", "yelp", "trec", "bbc_news"} <= set(config.sweep_tasks())
    assert config.addition_set() == ["boolq", "vitaminc", "trec", "bbc_news", "rotten_tomatoes", "yelp"]
    assert config.transfer_targets() == {"epistemic_reasoning": ["vitaminc", "boolq"],
                                         "rotten_tomatoes_5": ["rotten_tomatoes", "yelp"],
                                         "imdb": ["rotten_tomatoes", "yelp"]}


def test_an_unknown_preset_and_missing_sources_are_errors():
    with pytest.raises(ReproduceError, match="not in tpv.train.PRESETS"):
        build_plan(ReproduceConfig(backbone="t5-base", preset="nope"))
    with pytest.raises(ReproduceError, match="not among the sweep tasks"):
        ReproduceConfig(tasks=["imdb"], targets={"yelp": ["trec"]}).sweep_tasks()


def test_paper_figures_say_where_each_comes_from():
    figures = paper_figures()
    assert figures["paper"]["arxiv"] == "2408.01119"
    for f in figures["figures"]:
        assert f["page"] >= 1 and f["location"] and (f["value"] is not None or f["claim"])
    assert figures["missing"]  # what could not be sourced is listed, not invented


def test_plan_cli_for_a_backbone_not_on_this_machine_gives_steps_and_says_the_estimate_needs_the_model():
    out = subprocess.run([sys.executable, "-m", "tpv.cli", "reproduce", "--plan", "--backbone", "t5-base"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "| sweep | mnli | 0..9 (10) |" in out.stdout
    assert f"total training steps: {build_plan(ReproduceConfig(backbone='t5-base')).total_steps():,}" in out.stdout
    assert "the estimate needs the model" in out.stdout


@pytest.mark.usefixtures("ray_session")
def test_tiny_reproduction_end_to_end_writes_our_figures_beside_the_papers(tiny_causal_path, tmp_path):
    """A real run at a small scale: 2 user tasks x 2 origins, the pair added, transfer with 2 inits and its
    t-tests, one report; an estimate timed on the present CPU."""
    from tune_jobs import reproduce

    folder = tmp_path / "tasks"
    folder.mkdir()
    a, b = write_sentiment_task(folder, "repro_a"), write_sentiment_task(folder, "repro_b")
    for name in (a, b):  # persisted under the session's TPV_HOME, so the Ray trials find them
        register_task(get_task(name), overwrite=True, persist=True)
    common = ["--backbone", str(tiny_causal_path), "--preset", "causal_cpu", "--tasks", a, b,
              "--transfer", f"{b}={a}", "--scale", "0.05", "--shots", "0", "2", "--inits", "random", "tpv",
              "--store", str(tmp_path / "store"), "--out", str(tmp_path / "reports"),
              "--storage-path", str(tmp_path / "ray_results")]
    config = reproduce.config_from_cli(reproduce.build_parser().parse_args(common))
    plan = build_plan(config)
    assert {r.steps_per_run for r in plan.rows if r.stage == "sweep"} == {3}  # 60 steps x 0.05
    timing = reproduce.estimate(config, plan)
    assert timing.unit == "CPU-hours" and timing.seconds_per_example > 0
    assert reproduce.main(common) == 0
    report = tmp_path / "reports" / "reproduce" / "reproduce.md"
    text = report.read_text()
    assert "| stage | figure | ours | paper |" in text
    summary = json.loads((report.parent / "reproduce.json").read_text())
    stages = {r["stage"] for r in summary["rows"]}
    assert stages == {"similarity", "addition", "transfer"}
    same = next(r for r in summary["rows"] if r["figure"].startswith("cosine, same task"))
    assert same["ours"][0].isdigit() or same["ours"][0] == "-"
    assert "Abstract, p. 1" in same["paper"]
    assert any(r["stage"] == "transfer" and f"{b} k=2: TPV" in r["figure"] for r in summary["rows"])
    assert Path(summary["paths"]["transfer"]).exists()
