"""The Ray Tune jobs for real: a local Ray (shared per session), a tiny random model, real stores on disk.

Task data is written as `tpv data fetch` writes it (`data_dir()/<task>/{train,validation,test}.jsonl` +
`meta.json`) into the session's TPV_HOME, which the Ray workers inherit.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError
from task_data import sentiment_rows, write_builtin_task

from tpv.store import VectorStore

pytestmark = pytest.mark.usefixtures("ray_session")

QUESTIONS = [("what is the capital of france?", 4), ("who wrote the book?", 3), ("how many people live there?", 5),
             ("what does the abbreviation mean?", 0), ("why is the sky blue?", 1), ("what animal is it?", 2)]

# small budgets: a trial is ~1 s of compute on the tiny model
TRAIN = {"max_steps": 8, "eval_every": 4, "prompt_length": 4, "eval_examples": 8, "batch_size": 4,
         "warmup_steps": 1}


def dies_once_after_a_checkpoint(task: str, seed: int, marker: str):
    """A test-only trainable: tune_jobs' own trial, whose (task, seed) worker dies once after its first checkpoint
    unless `marker` exists (then it creates it), as a killed worker looks to Ray."""
    from tune_jobs.trial import train_trial

    def trainable(config: dict) -> None:
        def after_checkpoint(spec, step: int) -> None:
            if (spec.train.task, spec.train.seed) == (task, seed) and not Path(marker).exists():
                Path(marker).write_text(f"{spec.label} died after step {step}\n")
                os._exit(17)

        train_trial(config, after_checkpoint=after_checkpoint)

    return trainable


@pytest.fixture(scope="module")
def tasks() -> list[str]:
    write_builtin_task("imdb", sentiment_rows() * 2)
    write_builtin_task("yelp", sentiment_rows(" here") * 2)
    write_builtin_task("trec", [{"text": q, "label": y} for q, y in QUESTIONS] * 3)
    return ["imdb", "trec"]


def sweep_config(model: Path, store: Path, tasks: list[str], seeds: list[int], **extra):
    from tune_jobs.locations import Locations
    from tune_jobs.sweep import SweepConfig

    extra.setdefault("train", TRAIN)
    return SweepConfig(tasks=tasks, seeds=seeds, backbones=[str(model)],
                       locations=Locations(store=str(store), out_dir=str(store.parent / "reports")), **extra)


@pytest.fixture(scope="module")
def swept(tiny_causal_path, tasks, tmp_path_factory):
    """One 2 tasks x 2 seeds sweep, shared by the tests that read its store."""
    from tune_jobs.sweep import run_sweep

    store = tmp_path_factory.mktemp("sweep") / "store"
    config = sweep_config(tiny_causal_path, store, tasks, [0, 1], name="clean")
    return config, run_sweep(config), store


def test_sweep_writes_one_vector_per_task_and_seed(swept, tiny_causal_path):
    config, outcome, store = swept
    metas = VectorStore(store).list()
    assert sorted((m.task, m.origin_seed) for m in metas) == [("imdb", 0), ("imdb", 1), ("trec", 0), ("trec", 1)]
    assert all(m.backbone_id == "tiny-llama" and m.prompt_length == 4 and m.kind == "task" for m in metas)
    assert all(m.source and m.source.startswith("tpv sweep clean-") for m in metas)
    assert all(m.train_config["max_steps"] == 8 and "accuracy" in m.metrics for m in metas)
    assert [r["status"] for r in outcome["rows"]] == ["trained"] * 4 and outcome["failed"] == 0
    assert {r["vector_id"] for r in outcome["rows"]} == {m.vector_id for m in metas}
    # origins are stored once per seed, and each vector reproduces its tuned prompt from the stored origin
    s = VectorStore(store)
    assert s.get_origin("tiny-llama", 4, 0).shape == (4, 32) and s.get_origin("tiny-llama", 4, 1).shape == (4, 32)
    table = Path(outcome["paths"]["table_md"]).read_text()
    assert "imdb/s0" in table and "trec/s1" in table
    assert Path(outcome["paths"]["table_csv"]).read_text().count("\n") == 5
    # Ray Tune's storage_path follows the store: the ray_results folder beside it
    assert outcome["storage_path"] == str(store.parent / "ray_results")
    assert (store.parent / "ray_results" / outcome["experiment"]).is_dir()


def test_rerun_skips_the_stored_pairs(swept, tiny_causal_path, tasks):
    from tune_jobs.sweep import run_sweep

    config, first, store = swept
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    trials_before = sorted((store.parent / "ray_results" / first["experiment"]).iterdir())
    again = run_sweep(config)
    assert [r["status"] for r in again["rows"]] == ["in store"] * 4
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()} == before  # nothing rewritten
    assert sorted((store.parent / "ray_results" / first["experiment"]).iterdir()) == trials_before  # Tune not run
    # a bigger sweep trains only the new pair
    bigger = sweep_config(tiny_causal_path, store, tasks, [0, 1, 2], name="clean")
    grown = run_sweep(bigger)
    statuses = {r["pair"]: r["status"] for r in grown["rows"]}
    assert statuses == {"imdb/s0": "in store", "imdb/s1": "in store", "trec/s0": "in store", "trec/s1": "in store",
                        "imdb/s2": "trained", "trec/s2": "trained"}
    assert len(VectorStore(store).list()) == 6


def test_killed_trial_resumes_from_its_checkpoint(swept, tiny_causal_path, tasks, tmp_path):
    """The imdb/s0 trial dies (os._exit) after its first checkpoint; Tune retries it from that checkpoint and
    the resumed run writes exactly the vector an uninterrupted run wrote: none lost, none duplicated."""
    from tune_jobs.sweep import run_sweep

    _, _, clean_store = swept
    marker = tmp_path / "died-once"
    store = tmp_path / "store"
    config = sweep_config(tiny_causal_path, store, ["imdb"], [0, 1], name="faulty")
    outcome = run_sweep(config, trainable=dies_once_after_a_checkpoint("imdb", 0, str(marker)))
    assert marker.read_text().startswith("imdb/s0 died after step 4")
    rows = {r["pair"]: r for r in outcome["rows"]}
    assert rows["imdb/s0"]["status"] == "trained (resumed at step 4)"
    assert rows["imdb/s1"]["status"] == "trained"
    metas = VectorStore(store).list()
    assert sorted((m.task, m.origin_seed) for m in metas) == [("imdb", 0), ("imdb", 1)]
    uninterrupted = {(m.task, m.origin_seed): m.sha256 for m in VectorStore(clean_store).list(task="imdb")
                     if m.origin_seed in (0, 1)}
    assert {(m.task, m.origin_seed): m.sha256 for m in metas} == uninterrupted  # bit-identical resume


def test_interrupted_sweep_resumes_with_tuner_restore(tiny_causal_path, tasks, tmp_path, ray_session, capsys):
    """A sweep driver killed mid-trial (SIGKILL): running the same sweep again restores the Tune experiment and
    finishes it from the trials' checkpoints, one vector per pair."""
    from tune_jobs.sweep import run_sweep

    store = tmp_path / "store"
    long_train = {**TRAIN, "max_steps": 400, "eval_every": 20}
    config = sweep_config(tiny_causal_path, store, ["imdb"], [0], name="interrupted", train=long_train)
    script = (
        "import sys; from tune_jobs.sweep import SweepConfig, run_sweep; "
        f"run_sweep(SweepConfig.model_validate_json({config.model_dump_json()!r}))"
    )
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    driver = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    results = tmp_path / "ray_results"
    deadline = time.monotonic() + 120
    try:
        while len(list(results.glob("*/*/checkpoint_*"))) < 2:  # two evaluations checkpointed
            assert driver.poll() is None and time.monotonic() < deadline, "the driver ended before checkpointing"
            time.sleep(0.2)
        time.sleep(1.0)  # let Tune snapshot its experiment state
    finally:
        driver.kill()
        driver.wait()
    assert VectorStore(store).list() == []  # killed before the end: nothing stored yet
    outcome = run_sweep(config)
    assert "(Tuner.restore)" in capsys.readouterr().out
    assert outcome["rows"][0]["status"].startswith("trained") and outcome["failed"] == 0
    assert [(m.task, m.origin_seed) for m in VectorStore(store).list()] == [("imdb", 0)]


@pytest.mark.parametrize("cpus_per_trial", [2, 1], ids=["one-running-one-pending", "both-running"])
def test_a_sweep_stopped_with_ctrl_c_reports_its_unfinished_pairs(tiny_causal_path, tasks, tmp_path, ray_session,
                                                                  capsys, cpus_per_trial):
    """Ctrl-C (SIGINT) while two trials run, or while one runs and the other waits (each holding both CPUs): Tune
    stops, and the sweep stops too (one error line, exit 130, no traceback: a job never goes on to its next stage
    with runs missing), after writing its table with both pairs not finished; running it again finishes both, without
    Ray Tune's warning about a trial that has no results yet. With both running, Tune marks both TERMINATED in memory:
    only the state it saved tells they did not finish."""
    from tune_jobs.config import Resources
    from tune_jobs.sweep import run_sweep

    store = tmp_path / "store"
    config = sweep_config(tiny_causal_path, store, ["imdb"], [0, 1], name="ctrl-c",
                          train={**TRAIN, "max_steps": 400, "eval_every": 20},
                          resources=Resources(cpus_per_trial=cpus_per_trial))
    script = "\n".join([
        "import sys", "from tpv.cli import guarded", "from tune_jobs.sweep import SweepConfig, run_sweep",
        "def sweep():", f"    run_sweep(SweepConfig.model_validate_json({config.model_dump_json()!r}))",
        "sys.exit(guarded(sweep))",
    ])
    running = 2 // cpus_per_trial
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    driver = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    deadline = time.monotonic() + 120
    try:
        while len({c.parent for c in (tmp_path / "ray_results").glob("*/*/checkpoint_*")}) < running:  # training
            assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()[1][-2000:]
            time.sleep(0.2)
        driver.send_signal(signal.SIGINT)
        _, err = driver.communicate(timeout=120)
    finally:
        driver.kill()
    assert driver.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert "error: sweep: stopped before all its trials finished; run the same command again to resume" in err
    table = (tmp_path / "reports" / "ctrl-c" / "sweep.csv").read_text().splitlines()
    unfinished = "not finished (interrupted: run the same command again)"
    assert [row.split(",")[:2] for row in table[1:]] == [["imdb/s0", unfinished], ["imdb/s1", unfinished]]
    assert VectorStore(store).list() == []
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    analysis_log = logging.getLogger("ray.tune.analysis.experiment_analysis")  # Ray's loggers do not propagate
    analysis_log.addHandler(handler)
    try:
        again = run_sweep(config)
    finally:
        analysis_log.removeHandler(handler)
    assert "(Tuner.restore)" in capsys.readouterr().out and warnings == []
    assert [r["status"].startswith("trained") for r in again["rows"]] == [True, True]
    assert sorted(m.origin_seed for m in VectorStore(store).list()) == [0, 1]


def test_a_job_names_every_task_without_data_before_any_trial_starts(tiny_causal_path, tasks, tmp_path):
    """snips and sms_spam (built-in, never prepared in the tests' TPV_HOME): one clear error that names both and the
    command that prepares them, raised before Ray Tune starts (no experiment folder)."""
    from tpv.tasks import TaskDataMissing
    from tune_jobs.sweep import run_sweep

    config = sweep_config(tiny_causal_path, tmp_path / "store", ["imdb", "snips", "sms_spam"], [0], name="no-data")
    with pytest.raises(TaskDataMissing, match=r"snips, sms_spam .*`tpv data fetch --task snips --task sms_spam`"):
        run_sweep(config)
    assert not (tmp_path / "ray_results").exists()


def test_similarity_report_tables_and_heatmap(swept, tmp_path):
    from tune_jobs.report import main, similarity_report

    _, _, store = swept
    result = similarity_report(str(store), tmp_path, tasks=["imdb", "trec"], seeds=[0, 1])
    assert result["labels"] == ["imdb/s0", "imdb/s1", "trec/s0", "trec/s1"]
    assert list(result["matrices"]) == ["flat", "per_row_mean", "row_averaged", "row_centered"]
    assert 0.0 < result["mean_row_share"] < 1.0
    assert f"The mean row holds {result['mean_row_share']:.3f} of |tau|^2" in result["markdown"]
    assert "## Summary (flat cosine of the row-centered vectors" in result["markdown"]
    matrix = result["matrices"]["flat"]
    assert matrix.shape == (4, 4) and abs(matrix[0, 0] - 1.0) < 1e-6 and abs(matrix[0, 1] - matrix[1, 0]) < 1e-9
    kinds = [r["pairs"] for r in result["summary"]["flat"]]
    assert kinds == ["same task, different origin", "different task, different origin", "different task, same origin"]
    assert [r["n"] for r in result["summary"]["flat"]] == [2, 2, 2]
    same_task = (matrix[0, 1] + matrix[2, 3]) / 2
    assert abs(result["summary"]["flat"][0]["mean"] - same_task) < 1e-9
    # 2 tasks x 2 origins: the only other arrangement swaps origin 1's labels, making the diff-task pairs same-task
    test, diff_task = result["same_task_test"], (matrix[0, 3] + matrix[1, 2]) / 2
    assert (test.exact, test.arrangements, test.p) == (True, 2, 0.5 if diff_task < same_task else 1.0)
    assert f"Task labels shuffled within each origin (all 2 arrangements): p = {test.p:.4f}" in result["markdown"]
    png = Path(result["paths"]["heatmap"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "imdb/s1" in Path(result["paths"]["flat_csv"]).read_text()
    assert main(["--store", str(store), "--out", str(tmp_path / "cli"), "--tasks", "imdb", "trec"]) == 0
    assert (tmp_path / "cli" / "similarity" / "similarity.md").is_file()


def test_cross_origin_table(swept, tiny_causal_path, tmp_path, capsys):
    from tune_jobs.report import cross_origin_report

    _, _, store = swept
    result = cross_origin_report(str(store), tmp_path, str(tiny_causal_path), ["imdb"], [0, 1], test_examples=8)
    kinds = sorted(r["kind"] for r in result["rows"])
    assert kinds == ["origin only"] * 2 + ["other origin"] * 2 + ["own origin"] * 2
    assert "imdb: 6 prompts evaluated (1/1 tasks)" in capsys.readouterr().out  # progress, a line per task
    assert result["table"][0]["task"] == "imdb" and "own origin (O_i + tau_i)" in result["markdown"]


def test_cross_origin_table_reads_only_the_named_job_vectors(swept, tiny_causal_path, tmp_path):
    """`--vectors-source` narrows the cross-origin table as it narrows the similarity tables: another job's vector
    of the same (task, seed), a snapshot say, is left out."""
    import shutil

    from tpv.vectors import TaskPromptVector
    from tune_jobs.report import cross_origin_report

    _, _, swept_store = swept
    store = tmp_path / "store"
    shutil.copytree(swept_store, store)
    vectors = VectorStore(store)
    sweep = vectors.list(task="imdb", seed=0)[0]
    origin = vectors.get_origin(sweep.backbone_id, sweep.prompt_length, 0)
    vectors.put(TaskPromptVector.from_prompts(origin + 0.5 * vectors.get(sweep.vector_id).tensor, origin, task="imdb",
                                              backbone_id=sweep.backbone_id, origin_seed=0,
                                              source=f"{sweep.source}@4"))
    everything = cross_origin_report(str(store), tmp_path, str(tiny_causal_path), ["imdb"], [0, 1], test_examples=4)
    named = cross_origin_report(str(store), tmp_path, str(tiny_causal_path), ["imdb"], [0, 1], test_examples=4,
                                source=sweep.source)
    assert everything["table"][0]["vectors"] == 3 and named["table"][0]["vectors"] == 2
    assert {r["vector"] for r in named["rows"] if r["kind"] != "origin only"} == {
        m.vector_id for m in vectors.list(task="imdb") if m.source == sweep.source and m.origin_seed in (0, 1)}


def test_transfer_runs_every_init_and_writes_tables(swept, tiny_causal_path, tmp_path):
    from tune_jobs.locations import Locations
    from tune_jobs.transfer import TransferConfig, run_transfer

    _, _, store = swept
    config = TransferConfig(
        name="tiny-transfer", targets={"yelp": ["imdb", "trec"]}, shots=[0, 2], seeds=[10],
        backbone=str(tiny_causal_path), train=TRAIN, few_shot_steps=4, test_examples=8, auto_k=1, probe_shots=2,
        probe_steps=2, locations=Locations(store=str(store), storage_path=str(tmp_path / "ray_results"),
                                           out_dir=str(tmp_path / "reports")),
    )
    result = run_transfer(config)
    assert result["failed"] == 0
    cells = {(r["init"], r["shots"]) for r in result["rows"]}
    assert cells == {(i, k) for i in ["random", "spot", "multi_spot", "tpv", "tpv_auto"] for k in (0, 2)}
    assert all(0.0 <= r["test"] <= 1.0 for r in result["rows"])
    assert all(r["steps"] == 0 for r in result["rows"] if r["shots"] == 0)  # zero-shot: the init as it is
    assert result["auto_sources"]["yelp/s10"][0][0] in {"imdb", "trec"}
    table = result["tables"]["yelp"]
    assert "| TPV (auto sources) |" in table and "k=2" in table
    assert "seeds [10]; 8 test examples per cell;" in result["markdown"]
    assert Path(result["paths"]["plot_yelp"]).read_bytes()[:4] == b"\x89PNG"
    assert len(VectorStore(store).list()) >= 4  # transfer runs read the store, never add task vectors to it
    assert all(m.source.startswith("tpv sweep") for m in VectorStore(store).list())


def test_transfer_report_says_how_many_test_examples_each_cell_scored(tasks):
    from tpv.tasks import load_split
    from tune_jobs.transfer import scored_examples

    n = len(load_split("yelp", "test"))
    assert n > 3
    assert scored_examples("yelp", 3) == "3 test examples"
    assert scored_examples("yelp", n + 100) == f"{n} test examples (the whole test split)"
    assert scored_examples("yelp", None) == f"{n} test examples (the whole test split)"


def test_transfer_flags_name_the_source_vectors():
    from tune_jobs.transfer import build_parser, config_from_cli

    args = build_parser().parse_args(["--targets", "snips=trec,bbc_news", "--vectors-source", "tpv sweep mid-1a2b",
                                      "--vector-seeds", "0", "2", "--shots", "0", "8"])
    config = config_from_cli(args)
    assert (config.targets, config.vectors_source, config.vector_seeds, config.shots) == (
        {"snips": ["trec", "bbc_news"]}, "tpv sweep mid-1a2b", [0, 2], [0, 8])


def test_clis_have_help(capsys):
    from tune_jobs import addition, main_job, report, study, sweep, transfer, weights

    for module in (sweep, report, transfer, weights, main_job, study, addition):
        with pytest.raises(SystemExit) as exit_info:
            module.main(["--help"])
        assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "tpv sweep" in out and "tpv transfer" in out and "tpv search-weights" in out and "tpv demo" in out
    assert "tpv study" in out and "tpv addition" in out


def test_addition_job_tables_plot_and_weight_search(swept, tiny_causal_path, tmp_path):
    from tune_jobs.addition import AdditionConfig, run_addition_job
    from tune_jobs.locations import Locations

    _, _, store = swept
    paper_only = AdditionConfig(
        name="tiny-addition", tasks=["imdb", "trec"], seeds=[0, 1], backbone=str(tiny_causal_path), grid_step=0.5,
        eval_examples=8, test_examples=8,
        locations=Locations(store=str(store), storage_path=str(tmp_path / "ray_results"),
                            out_dir=str(tmp_path / "reports")),
    )
    first = run_addition_job(paper_only)
    config = paper_only.model_copy(update={"weight_samples": 2})
    result = run_addition_job(config)
    assert result["failed"] == 0
    # the weight search added to a finished addition reuses its paper cells: one experiment of them, same rows
    paper_runs = [p.name for p in (tmp_path / "ray_results").iterdir() if p.name.count("-") == 2]
    assert len(paper_runs) == 1, paper_runs
    assert [r for r in result["rows"] if r["rule"] == "paper"] == first["rows"]
    cells = {(r["combination"], r["rule"], r["task"]) for r in result["rows"]}
    assert cells == {("imdb + trec", rule, task) for rule in ("paper", "weights") for task in ("imdb", "trec")}
    assert all(r["labels"] == "disjoint" for r in result["rows"])  # negative/positive vs question types
    long_rows = result["long_rows"]
    assert {(r["rule"], r["origin_seed"]) for r in long_rows} == {(rule, s) for rule in ("paper", "weights")
                                                                   for s in (0, 1)}
    assert all(r["coefficient"] in (0.0, 0.5, 1.0) for r in long_rows if r["rule"] == "paper")
    assert [r["origin_seed"] for r in long_rows] == [0, 1] * 4  # per rule and task, by origin
    weighted = {r["origin_seed"]: r["weights"].split() for r in long_rows if r["rule"] == "weights"}
    shown = next(r["coefficient / weights"] for r in result["rows"] if r["rule"] == "weights")
    assert shown == "; ".join(f"s{s}: " + ", ".join(f"{float(w):.2f}" for w in weighted[s]) for s in (0, 1))
    for r in long_rows:  # retention is combined / single, per origin
        assert r["retention"] == pytest.approx(r["combined"] / r["single"]) if r["single"] else True
    assert Path(result["paths"]["plot"]).read_bytes()[:4] == b"\x89PNG"
    assert "retention %" in Path(result["paths"]["markdown"]).read_text()


def test_study_scores_every_recipe_and_length(swept, tiny_causal_path, tasks, tmp_path):
    from tpv.vectors import mean_row_share
    from tune_jobs.locations import Locations
    import math

    from tune_jobs.selections import Selection
    from tune_jobs.study import StudyConfig, claims, rank_key, run_study

    config = StudyConfig(
        name="tiny-study", tasks=["imdb", "trec"], seeds=[0, 1], target="yelp", target_seeds=[100],
        backbone=str(tiny_causal_path), train={k: v for k, v in TRAIN.items() if k not in ("max_steps", "eval_every")},
        grid={"lr": [0.3, 0.01]}, steps=[4, 8], eval_examples=8, test_examples=8, addition_step=0.5,
        locations=Locations(store=str(tmp_path / "store"), storage_path=str(tmp_path / "ray_results"),
                            out_dir=str(tmp_path / "reports")),
    )
    result = run_study(config)
    assert result["failed"] == 0
    assert {(r["recipe"], r["steps"]) for r in result["rows"]} == {(f"lr={lr}", s) for lr in (0.3, 0.01) for s in (4, 8)}
    assert [rank_key(r) for r in result["rows"]] == sorted((rank_key(r) for r in result["rows"]), reverse=True)
    store = VectorStore(tmp_path / "store")
    # one final vector per run plus a snapshot per scored length, each set named by its own source
    assert len(store.list(kind="task")) == 2 * 2 * 2 * 3
    for row in result["rows"]:
        assert row["gap"] == pytest.approx(row["same_task"] - max(row["diff_task"], row["same_origin"]))
        assert row["zero_shot_gain"] == pytest.approx(row["tpv_zero_shot"] - row["random_zero_shot"])
        assert 0.0 <= row["val"] <= 1.0 and row["tau_norm"] > 0
        # 2 tasks x 2 origins: the one other arrangement swaps the second origin's labels, which makes the
        # different-task pairs the same-task ones, so p is 1/2 exactly when same-task pairs are the more alike
        assert row["same_task_p"] == (0.5 if row["same_task"] > row["diff_task"] else 1.0)
        snapshots = [m for m in store.list(kind="task") if m.source.endswith(f"/{row['recipe']}@{row['steps']}")]
        assert len(snapshots) == 4
        assert row["mean_row_share"] == pytest.approx(
            sum(mean_row_share(store.get(m.vector_id, m.backbone_id)) for m in snapshots) / 4)
    # a longer run moved further from its origin than its 4-step snapshot (same recipe)
    norms = {(r["recipe"], r["steps"]): r["tau_norm"] for r in result["rows"]}
    assert norms[("lr=0.3", 8)] > norms[("lr=0.3", 4)]
    md = Path(result["paths"]["markdown"]).read_text()
    assert "winner:" in md
    # the winner's claims judged as every job judges them: 2 tasks x 2 origins cannot reach alpha 0.05 (p >= 1/2)
    verdicts = claims(result["rows"][0], config)
    assert [f"- {c.line}" in md for c in verdicts] == [True, True]
    assert verdicts[0].least_p == 0.5 and verdicts[0].verdict != "holds" and "cannot reach alpha" in verdicts[0].line
    assert math.isnan(verdicts[1].p) and "no test is possible" in verdicts[1].line  # one target origin: no test
    # what it selected on, in the registry's schema, beside its table
    recorded = Selection.model_validate_json(Path(result["paths"]["selection"]).read_text())
    assert recorded == Selection(name="tiny-study", backbone=str(tiny_causal_path), tasks=["imdb", "trec"],
                                 seeds=[0, 1], target="yelp", target_sources=["imdb", "trec"], target_seeds=[100])


def test_the_study_ranks_a_zero_shot_tie_as_not_showing_claim_2():
    from tune_jobs.study import rank_key

    row = {"gap": 0.05, "zero_shot_gain": 0.0, "val": 0.8}
    assert rank_key(row)[0] is False and rank_key({**row, "zero_shot_gain": 0.01})[0] is True
    assert rank_key({**row, "gap": 0.0, "zero_shot_gain": 0.01})[0] is False


def test_study_recipes_from_a_grid_and_by_name():
    from tune_jobs.config import JobConfigError
    from tune_jobs.study import StudyConfig

    base = dict(tasks=["imdb", "trec"], target="yelp")
    named = StudyConfig(**base, recipes={"slow": {"lr": 0.003}})
    assert named.all_recipes() == {"slow": {"lr": 0.003}}  # no grid: no extra empty recipe
    grid = StudyConfig(**base, grid={"lr": [0.3, 0.03], "loss": ["lm", "label"]}, recipes={"slow": {"lr": 0.003}})
    assert list(grid.all_recipes()) == ["slow", "lr=0.3,loss=lm", "lr=0.3,loss=label", "lr=0.03,loss=lm",
                                        "lr=0.03,loss=label"]
    with pytest.raises(JobConfigError, match="recipes or a grid"):
        StudyConfig(**base).all_recipes()
    config = StudyConfig(**base, steps=[60, 30], train={"loss": "label", "lr": 0.1}, recipes={"x": {"lr": 0.2}})
    run = config.train_config(config.all_recipes()["x"], "imdb", 3)
    assert (run.max_steps, run.eval_every, run.loss, run.lr, run.seed) == (60, 30, "label", 0.2, 3)
    misspelt = StudyConfig(**base, grid={"lre": [0.3]})  # would otherwise train the preset under the name "lre=0.3"
    with pytest.raises(ValidationError, match="lre"):
        misspelt.train_config(misspelt.all_recipes()["lre=0.3"], "imdb", 0)


def test_packed_sweep_trains_every_pair_in_fewer_trials(swept, tiny_causal_path, tasks, tmp_path):
    """--pack 3: the 4 pairs run as 2 trials (2 + 2, one model load each); every pair writes its own vector, equal
    to the unpacked sweep's within float tolerance (tests/test_packed.py states it)."""
    import torch

    from tune_jobs.config import Resources
    from tune_jobs.sweep import run_sweep

    _, _, clean_store = swept
    store = tmp_path / "store"
    outcome = run_sweep(sweep_config(tiny_causal_path, store, tasks, [0, 1], name="clean", resources=Resources(pack=3)))
    assert [r["status"] for r in outcome["rows"]] == ["trained"] * 4 and outcome["failed"] == 0
    trials = [p for p in (tmp_path / "ray_results" / outcome["experiment"]).iterdir() if p.is_dir()]
    # packs balance work: the two runs of the longer-input task go to different packs, each with a trec run
    assert sorted(p.name.split("_")[0] for p in trials) == ["imdb-s0+1", "imdb-s1+1"]
    packed, plain = VectorStore(store), VectorStore(clean_store)
    assert {r["vector_id"] for r in outcome["rows"]} == {m.vector_id for m in packed.list()}
    for meta in packed.list():
        (twin,) = [m for m in plain.list(task=meta.task, seed=meta.origin_seed)]
        assert meta.source == twin.source  # the same recipe: one vector set
        torch.testing.assert_close(packed.get(meta.vector_id).tensor, plain.get(twin.vector_id).tensor,
                                   atol=1e-5, rtol=1e-5)
    again = run_sweep(sweep_config(tiny_causal_path, store, tasks, [0, 1], name="clean", resources=Resources(pack=3)))
    assert [r["status"] for r in again["rows"]] == ["in store"] * 4


def test_packs_hold_even_work_not_neighbours_in_the_grid(tiny_causal_path, tasks, tmp_path):
    """A tasks x seeds grid in task order, in 2 packs of 3: each pack gets one run of each task, so two packs side
    by side end together (in order they would be [imdb, imdb, trec] and [trec, yelp, yelp]). A run's cost grows with
    its input length and its steps."""
    from tpv.packed import run_costs
    from tpv.train import TrainConfig
    from tune_jobs.grid import pack_specs
    from tune_jobs.trial import TrialSpec

    def spec(task: str, seed: int, **train) -> TrialSpec:
        cfg = TrainConfig(task=task, seed=seed, backbone={"model": str(tiny_causal_path)}, progress=False,
                          **{**TRAIN, **train})
        return TrialSpec(label=f"{task}/s{seed}", train=cfg, output_store=str(tmp_path / "store"))

    grid = [spec(task, seed) for task in ("imdb", "trec", "yelp") for seed in (0, 1)]
    imdb, yelp = run_costs([grid[0].train, grid[4].train])
    assert imdb < yelp  # yelp's reviews are imdb's with " here" added
    # a CPU step computes a causal prompt once for the batch: 6 more prompt positions cost 3 x 6 per step
    longer = spec("imdb", 0, prompt_length=TRAIN["prompt_length"] + 6).train
    assert run_costs([longer])[0] - imdb == pytest.approx(3 * 6 * TRAIN["max_steps"])
    packs = pack_specs(grid, 3)
    assert [[s.label for s in p] for p in packs] == [["imdb/s0", "trec/s0", "yelp/s0"], ["imdb/s1", "trec/s1", "yelp/s1"]]
    assert run_costs([spec("imdb", 0, max_steps=16).train])[0] > imdb
    assert [len(p) for p in pack_specs(grid, 4)] == [3, 3]


def test_a_killed_pack_resumes_each_pair_from_its_checkpoint(tiny_causal_path, tasks, tmp_path):
    """imdb s0 and s1 in one pack; the worker dies after the first checkpoint: both resume at step 4 and write
    exactly the vectors of a pack that never died."""
    from tune_jobs.config import Resources
    from tune_jobs.sweep import run_sweep

    def sweep(name: str, trainable=None):
        config = sweep_config(tiny_causal_path, tmp_path / name / "store", ["imdb"], [0, 1], name="faulty",
                              resources=Resources(pack=2))
        return run_sweep(config, **({"trainable": trainable} if trainable else {}))

    marker = tmp_path / "died-once"
    outcome = sweep("killed", dies_once_after_a_checkpoint("imdb", 0, str(marker)))
    assert marker.read_text().startswith("imdb/s0 died after step 4")
    assert [r["status"] for r in outcome["rows"]] == ["trained (resumed at step 4)"] * 2
    clean = sweep("clean")
    assert [r["status"] for r in clean["rows"]] == ["trained"] * 2
    killed, whole = VectorStore(tmp_path / "killed" / "store").list(), VectorStore(tmp_path / "clean" / "store").list()
    assert sorted((m.origin_seed, m.sha256) for m in killed) == sorted((m.origin_seed, m.sha256) for m in whole)


def test_pack_flag():
    from tune_jobs.config import config_from_args
    from tune_jobs.sweep import SweepConfig, build_parser

    def pack(*flags: str):
        args = build_parser().parse_args(["--tasks", "imdb", *flags])
        return config_from_args(SweepConfig, args, ("tasks",)).resources.pack

    assert (pack(), pack("--pack"), pack("--pack", "4")) == (1, "auto", 4)
    with pytest.raises(SystemExit):
        pack("--pack", "0")
    args = build_parser().parse_args(["--tasks", "imdb", "--trial-resources", "tpv_worker=1", "big_mem=0.5"])
    assert config_from_args(SweepConfig, args, ("tasks",)).resources.custom == {"tpv_worker": 1.0, "big_mem": 0.5}
    for bad in ("tpv_worker", "=1", "tpv_worker=-1", "tpv_worker=lots"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--tasks", "imdb", "--trial-resources", bad])


def test_a_trials_memory_is_measured_where_trials_run_and_shared_by_the_trials_of_a_node(ray_session):
    """The session's Ray node has 2 CPUs: two 1-CPU trials share its available memory, one 2-CPU trial has it all."""
    from tpv.memory import free_memory_bytes
    from tune_jobs.config import Resources
    from tune_jobs.grid import trial_memory

    machine = free_memory_bytes("cpu")
    one, two = trial_memory(Resources(cpus_per_trial=1), "cpu"), trial_memory(Resources(cpus_per_trial=2), "cpu")
    alone = trial_memory(Resources(cpus_per_trial=1, max_concurrent=1), "cpu")
    assert two == pytest.approx(machine, rel=0.2) and alone == pytest.approx(machine, rel=0.2)
    assert one == pytest.approx(two / 2, rel=0.2)


def test_the_memory_probe_reads_a_cpus_memory_without_importing_torch():
    """`trial_memory` runs `free_memory_bytes` in a Ray task: on a CPU it must not pay torch's import (seconds)."""
    import subprocess
    import sys

    code = ("import sys; from tpv.memory import free_memory_bytes; free = free_memory_bytes('cpu'); "
            "print(free > 0, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False"]


def test_a_trial_that_sees_another_store_fails_before_any_work(tiny_causal_path, tasks, tmp_path):
    """What a node without the shared store sees (its own empty folder under the store's path) is refused: the
    trial fails with the store named, instead of training and writing a vector nobody else reads."""
    import shutil

    from tpv.train import TrainConfig
    from tune_jobs.grid import run_grid, specs_space
    from tune_jobs.trial import TrialSpec

    store = tmp_path / "store"
    cfg = TrainConfig(task="imdb", backbone={"model": str(tiny_causal_path)}, progress=False, **TRAIN)
    space = specs_space([TrialSpec(label="imdb/s0", train=cfg, output_store=str(store))])
    assert (store / "store.json").is_file()  # the driver made the store's id
    shutil.rmtree(store)
    (outcome,) = run_grid(space, experiment="unseen-store", storage_path=str(tmp_path / "ray_results"),
                          max_failures=0, restore=False)
    assert outcome.error is not None and "not the one the job started on" in outcome.error
    assert str(store) in outcome.error
    assert not store.exists()  # the trial neither created the folder nor wrote into it


def _permutation(p: float, least: float):
    from tpv.vectors import PermutationTest

    return PermutationTest(p=p, arrangements=round(1 / least), exact=True, smallest_p=least)


def test_claim1_holds_only_when_the_permutation_test_is_significant_on_a_design_that_can_reach_alpha():
    from tune_jobs.verdicts import claim1

    held = claim1(0.062, -0.006, -0.001, _permutation(1 / 36, 1 / 36))
    assert (held.verdict, held.p, held.least_p, held.alpha, held.reachable) == ("holds", 1 / 36, 1 / 36, 0.05, True)
    assert held.line == ("HOLDS: the task dominates the origin (flat cosine: same task 0.062 vs different task -0.006 "
                         "vs same origin -0.001; task-label permutation p 0.0278, the least these vectors allow "
                         "0.0278; significant at alpha 0.05)")
    # the old demo's 3 tasks x 2 origins: the best p it allows is 1/6, so it can never hold, and says so
    small = claim1(0.062, -0.006, -0.001, _permutation(1 / 6, 1 / 6))
    assert (small.verdict, small.reachable) == ("consistent, not significant", False)
    assert small.line.endswith("not significant at alpha 0.05; it cannot reach alpha here: the least possible p is "
                               "0.167)")
    assert small.line.startswith("CONSISTENT, NOT SIGNIFICANT: the task dominates the origin")
    # a design that could reach alpha but did not
    assert claim1(0.062, -0.006, -0.001, _permutation(0.25, 1 / 36)).verdict == "consistent, not significant"
    # a margin of 0.001 is a direction, not evidence
    assert claim1(0.001, 0.0, 0.0, _permutation(0.5, 1 / 36)).verdict == "consistent, not significant"
    # the direction fails (same origin above same task): significance of the same-task mean cannot rescue it
    against = claim1(0.06, 0.01, 0.08, _permutation(1 / 36, 1 / 36))
    assert against.verdict == "does not hold" and against.line.startswith("DOES NOT HOLD: the task dominates")
    assert claim1(0.05, 0.05, 0.0, _permutation(1 / 36, 1 / 36)).verdict == "does not hold"  # a tie is no dominance
    untested = claim1(0.1, 0.0, 0.0, None)  # no two vectors share a task across origins
    assert untested.verdict == "consistent, not significant" and "no test is possible" in untested.line
    assert claim1(0.062, -0.006, -0.001, _permutation(0.02, 1 / 36), alpha=0.01).verdict == (
        "consistent, not significant")


def _claim2(tpv: list[float], random: list[float], target: str):
    from tune_jobs.stats import paired_test
    from tune_jobs.verdicts import claim2

    return claim2(paired_test(tpv, random), sum(random) / len(random), target)


def test_claim2_is_a_strict_paired_test_over_target_origins():
    from tune_jobs.stats import paired_test

    tpv, random = [0.78, 0.74, 0.80], [0.58, 0.55, 0.61]
    held = _claim2(tpv, random, "amazon")
    p = paired_test(tpv, random).p
    assert (held.verdict, held.p) == ("holds", p) and p < 0.05
    assert held.line == ("HOLDS: the TPV init beats a random origin zero-shot on amazon (mean over 3 target origins "
                         f"0.773 vs 0.580, gain +0.193; paired t-test p {p:.3g}; significant at alpha 0.05)")
    noisy = _claim2([0.78, 0.60, 0.80], [0.58, 0.65, 0.61], "amazon")  # one origin the other way: t-test p 0.3
    assert (noisy.verdict, noisy.reachable) == ("consistent, not significant", True)
    tie = _claim2([0.7, 0.7, 0.7], [0.7, 0.7, 0.7], "amazon")  # a tie is not a win
    assert (tie.verdict, tie.p) == ("does not hold", 1.0)
    worse = _claim2([0.5, 0.55, 0.52], [0.7, 0.72, 0.71], "amazon")
    assert worse.verdict == "does not hold" and worse.p < 0.05  # significant, the wrong way
    # one sentence of 100 better on every origin: no spread, the sign test's p 0.25 decides, and 3 origins cannot
    # reach 0.05 that way
    even = _claim2([0.71, 0.71, 0.71], [0.70, 0.70, 0.70], "amazon")
    assert (even.verdict, even.p, even.least_p) == ("consistent, not significant", 0.25, 0.25)
    assert "sign test (no spread) p 0.25" in even.line and "the least possible p is 0.25" in even.line
    one = _claim2([0.9], [0.5], "imdb")  # one target origin: no test at all
    assert one.verdict == "consistent, not significant" and one.line.endswith("no test is possible on this design)")


def test_the_demo_verdict_prints_each_claim_then_the_addition_and_flags_selection_data():
    from tune_jobs.main_job import claim_fields, verdict
    from tune_jobs.verdicts import claim1

    claims = [claim1(0.062, -0.006, -0.001, _permutation(1 / 36, 1 / 36)),
              _claim2([0.71, 0.71, 0.71], [0.70, 0.70, 0.70], "amazon")]
    summary = {"addition_retention": 0.912, "selection_overlap_text": None}
    lines = verdict(summary, claims)
    assert lines[:2] == [c.line for c in claims] and lines[2].startswith("addition keeps 91.2% of single-task")
    assert len(lines) == 3
    flagged = verdict({**summary, "selection_overlap_text": "origin seeds 0 (used by recipe selection x)"}, claims)
    assert flagged[2] == ("FLAGGED: origin seeds 0 (used by recipe selection x): these verdicts are not on held-out "
                          "data")
    assert claim_fields(claims) == {"alpha": 0.05, "claim1_verdict": "holds", "claim1_p": 1 / 36,
                                    "claim1_p_least": 1 / 36, "claim2_verdict": "consistent, not significant",
                                    "claim2_p": 0.25, "claim2_p_least": 0.25}


def test_the_demo_design_is_held_out_from_every_recipe_selection_and_can_reach_significance():
    """Its tasks, origins, target origins and target share nothing with the studies that chose the recipe, and
    3 tasks x 3 origins allow p 1/36."""
    import math

    from tune_jobs.main_job import DEMO_SEEDS, DEMO_TARGET, DEMO_TASKS, TRANSFER
    from tune_jobs.selections import SELECTIONS, selection_overlap

    (target,) = DEMO_TARGET
    overlap = selection_overlap(DEMO_TASKS, [*DEMO_SEEDS, *TRANSFER["seeds"]], target)
    assert overlap.empty and overlap.selections == []
    used = {t for s in SELECTIONS for t in s.data} | {o for s in SELECTIONS for o in s.origins}
    assert used == {"rotten_tomatoes", "trec", "imdb", 0, 1, 100, 101}  # docs/RESULTS.md §1's every study
    assert not used & {*DEMO_TASKS, target, *DEMO_SEEDS, *TRANSFER["seeds"]}
    least = 1 / math.factorial(len(DEMO_TASKS)) ** (len(DEMO_SEEDS) - 1)
    assert least == 1 / 36 and least < 0.05
    assert len(TRANSFER["seeds"]) >= 3 and not set(TRANSFER["seeds"]) & set(DEMO_SEEDS)


def test_selection_data_is_refused_by_the_demo_and_flagged_by_the_other_jobs(capsys):
    """Tasks sharing a source file count as used (rotten_tomatoes_5 is rotten_tomatoes' file), as do target
    origins; the demo refuses before any work, the others warn on stderr."""
    from tune_jobs.main_job import main
    from tune_jobs.selections import SelectionDataError, held_out, selection_overlap

    overlap = selection_overlap(["rotten_tomatoes_5", "tweets", "trec_fine"], [2, 101], "imdb")
    assert (overlap.tasks, overlap.origin_seeds, overlap.target) == (["rotten_tomatoes_5", "trec_fine"], [101],
                                                                      ["imdb"])
    assert "recipes-shape" in overlap.selections and "recipes-gemma" in overlap.selections
    assert selection_overlap(["tweets", "sms_spam"], [2], "amazon").empty
    with pytest.raises(SelectionDataError, match="origin seeds 1"):
        main(["--tasks", "tweets", "yelp", "--seeds", "1", "2", "--target", "amazon", "--sources", "tweets"])
    with pytest.raises(SelectionDataError, match="target imdb"):
        main(["--target", "imdb", "--sources", "tweets"])
    assert held_out("tpv transfer", origin_seeds=[100], target="yelp").origin_seeds == [100]
    err = capsys.readouterr().err
    assert err.startswith("WARNING tpv transfer: origin seeds 100 (used by recipe selection recipes60")
    assert held_out("tpv transfer", origin_seeds=[20], target="amazon").empty
    assert capsys.readouterr().err == ""
