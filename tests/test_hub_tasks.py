"""The paper's hub tasks prepared from mirrors in the hub's layout (and a constructed HF cache), offline: rows,
label mapping, split sizes and the protocol, the offline errors, and `tpv data fetch` then `tpv train` end to end.

Nothing reaches the hub: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set for this module and every subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest

import hub_mirror as M
from tpv import hub_data
from tpv.paths import data_dir
from tpv.tasks import BUILTIN_TASKS, carve, get_task, list_tasks, load_split
from tpv.tasks.paper import HUB_SOURCES, PAPER_TASKS

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module", autouse=True)
def offline():
    saved = {k: os.environ.get(k) for k in OFFLINE}
    os.environ.update(OFFLINE)
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True  # read at import: set them too
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mirror")
    M.build_glue(root)
    M.build_squad_v2(root)
    M.build_math(root)
    return root


@pytest.fixture()
def prepared(mirror, monkeypatch):
    """prepare(name) with the mirror set; each task's folder removed afterwards, so tests do not see each other's."""
    monkeypatch.setenv(hub_data.MIRROR_ENV, str(mirror))
    names = []

    def prepare(name: str, **kwargs) -> Path:
        names.append(name)
        return hub_data.prepare(name, **kwargs)

    yield prepare
    for name in names:
        for path in (data_dir() / name).glob("*"):
            path.unlink()


def jsonl(folder: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]


def test_the_nineteen_datasets_are_registered_with_hub_ids():
    paper = {t.name for t in PAPER_TASKS}
    assert paper == set(HUB_SOURCES) and paper <= set(list_tasks())
    # 19 datasets: TREC gives two tasks (coarse and fine)
    assert len(paper) == 20 and len({HUB_SOURCES[n].hub_id for n in paper}) == 19
    expected = {"mnli": ("nyu-mll/glue", "mnli", 3), "stsb": ("nyu-mll/glue", "stsb", 0),
                "scitail": ("allenai/scitail", "snli_format", 2), "trec_fine_text": ("CogComp/trec", None, 50),
                "dbpedia": ("fancyzhx/dbpedia_14", "dbpedia_14", 14), "yahoo":
                ("community-datasets/yahoo_answers_topics", "yahoo_answers_topics", 10),
                "squad_v2": ("rajpurkar/squad_v2", "squad_v2", 0)}
    for name, (repo, config, n_labels) in expected.items():
        assert (HUB_SOURCES[name].repo, HUB_SOURCES[name].config, len(get_task(name).labels)) == (repo, config, n_labels)
    assert get_task("mnli").labels == ["entailment", "neutral", "contradiction"]
    assert (get_task("stsb").metric, get_task("squad_v2").metric, get_task("math").metric) == (
        "pearson", "squad_f1", "math_exact")


def test_bundled_stand_ins_say_which_paper_task_they_stand_in_for():
    stand_ins = {"rotten_tomatoes": "SST-2", "rotten_tomatoes_5": "SST-5", "boolq": "QNLI", "yelp": "yelp_polarity",
                 "imdb": "imdb_text", "trec": "trec_coarse", "trec_fine": "trec_fine_text", "vitaminc": "MNLI"}
    descriptions = {t.name: t.description for t in BUILTIN_TASKS}
    for name, paper in stand_ins.items():
        assert paper in descriptions[name], name


def test_stratified_carve_keeps_the_class_balance():
    rows = [{"i": i, "label": int(i % 10 < 7)} for i in range(100)]  # 30 of class 0, 70 of class 1
    rest, carved = carve(rows, 10, seed=3, stratify_field="label")
    assert Counter(r["label"] for r in carved) == {1: 7, 0: 3}
    assert sorted(r["i"] for r in rest + carved) == list(range(100))
    rest, carved = carve(rows, 11, seed=3, stratify_field="label")  # 3.3 / 7.7: the larger remainder gets the row
    assert Counter(r["label"] for r in carved) == {1: 8, 0: 3}


def test_sst2_small_set_halves_the_official_validation(prepared):
    folder = prepared("sst2")
    train, validation, test = (jsonl(folder, s) for s in ("train", "validation", "test"))
    assert train == [{"sentence": r["sentence"], "label": r["label"]} for r in M.sst2_rows(40)]  # 40 < 10,000: all
    official = {r["sentence"]: r["label"] for r in M.sst2_rows(12, 10_000)}
    assert len(validation) == len(test) == 6
    assert {r["sentence"] for r in validation} | {r["sentence"] for r in test} == set(official)
    assert all(official[r["sentence"]] == r["label"] for r in validation + test)
    assert Counter(r["label"] for r in validation) == Counter(r["label"] for r in test) == {0: 3, 1: 3}  # stratified
    examples = load_split("sst2", "train")
    assert examples[1].source == "sentence: sentence 1 is good" and examples[1].target == "positive"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["counts"] == {"train": 40, "validation": 6, "test": 6} and meta["hub_id"] == "nyu-mll/glue (sst2)"
    assert set(meta["source_sha256"]) >= {"README.md", "sst2/train-00000-of-00001.parquet"}


def test_mnli_large_set_holds_out_1000_train_rows_and_tests_on_matched(prepared):
    folder = prepared("mnli")
    train, validation, test = (jsonl(folder, s) for s in ("train", "validation", "test"))
    assert (len(train), len(validation)) == (9_030, 1_000)
    assert {r["premise"] for r in train} | {r["premise"] for r in validation} == {
        f"train premise {i}" for i in range(10_030)}
    assert not {r["premise"] for r in train} & {r["premise"] for r in validation}
    # 10,030 rows as 3,344 / 3,343 / 3,343: 1,000 shared in proportion by largest remainder
    assert Counter(r["label"] for r in validation) == {0: 334, 1: 333, 2: 333}
    assert [r["premise"] for r in test] == [f"matched premise {i}" for i in range(30)]  # never the mismatched set
    assert all(r["label"] == int(r["premise"].split()[-1]) % 3 for r in train + validation + test)


def test_stsb_regression_keeps_the_scores(prepared):
    folder = prepared("stsb")
    train = jsonl(folder, "train")
    assert [r["label"] for r in train] == [round(float(np.float32(round(5 * i / 29, 2))), 6) for i in range(30)]
    assert len(jsonl(folder, "validation")) == len(jsonl(folder, "test")) == 5
    example = load_split("stsb", "train")[29]
    assert (example.source, example.target, example.label) == ("sentence1: train a 29 sentence2: train b 29", "5.0", 5.0)


def test_squad_v2_and_math_prepare_answer_targets(prepared):
    squad = jsonl(prepared("squad_v2"), "train")
    assert squad[0] == {"question": "t question 0?", "context": "context 0 says answer 0.", "answers": [],
                        "target": "unanswerable"}
    assert squad[1]["answers"] == ["answer 1", "answer 1."] and squad[1]["target"] == "answer 1"
    examples = load_split("squad_v2", "train")
    assert examples[1].target == examples[1].label == "answer 1"
    math_train = jsonl(prepared("math"), "train")
    assert math_train[3] == {"problem": "t: what is 3 + 3?", "target": "We add: $3 + 3 = \\boxed{6}$.", "answer": "6"}
    assert sum(len(jsonl(data_dir() / "math", s)) for s in ("validation", "test")) == 8  # test split halved


def test_a_second_fetch_writes_the_same_bytes(prepared):
    folder = prepared("sst2")
    first = {p.name: p.read_bytes() for p in folder.iterdir()}
    again = prepared("sst2", force=True)
    assert {p.name: p.read_bytes() for p in again.iterdir()} == first


def build_hf_cache(mirror: Path, repo: str, config: str, cache: Path) -> None:
    """The HF cache an online `datasets.load_dataset(repo, config)` leaves: `<cache>/<owner>___<name>/<config>/..`
    (made by loading the mirror folder into `cache` and naming its folder as the hub loader does)."""
    datasets.load_dataset(str(mirror / repo), config, cache_dir=str(cache))
    owner, name = repo.split("/")
    (cache / name).rename(cache / f"{owner}___{name}")


def test_hf_cache_offline_without_a_mirror(mirror, tmp_path, monkeypatch):
    build_hf_cache(mirror, "nyu-mll/glue", "sst2", tmp_path / "hf")
    monkeypatch.delenv(hub_data.MIRROR_ENV, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    folder = hub_data.prepare("sst2", force=True)
    try:
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["hf_cache"] and meta["counts"] == {"train": 40, "validation": 6, "test": 6}
        assert jsonl(folder, "train")[0] == {"sentence": "sentence 0 is bad", "label": 0}
    finally:
        for path in folder.glob("*"):
            path.unlink()


def tpv(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tpv.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **OFFLINE, **env}, timeout=300)


def test_offline_and_not_cached_is_one_line_and_writes_nothing(mirror, tmp_path):
    home = tmp_path / "home"
    env = {"TPV_HOME": str(home), "HF_HOME": str(tmp_path / "empty-hf"), "TPV_DATASETS_MIRROR": str(mirror)}
    for task, hub in (("qqp", "nyu-mll/glue (qqp)"), ("ag_news", "fancyzhx/ag_news")):  # config / repo not there
        out = tpv("data", "fetch", "--task", task, env=env)
        assert out.returncode == 6, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in out.stderr
        assert lines[0].startswith(f"error: task {task}: dataset {hub} is not available offline")
        assert "TPV_DATASETS_MIRROR" in lines[0] and "HF cache" in lines[0]
        assert not (home / "data" / task).exists()
    assert not any((home / "data").glob(".*"))  # no scratch folder left behind


def test_fetch_then_train_sst2_end_to_end(mirror, tmp_path, tiny_causal_path):
    env = {"TPV_HOME": str(tmp_path / "home"), "TPV_STORE": str(tmp_path / "home" / "store"),
           "TPV_DATASETS_MIRROR": str(mirror)}
    fetched = tpv("data", "fetch", "--task", "sst2", env=env)
    assert fetched.returncode == 0, fetched.stderr
    assert fetched.stdout.strip() == f"sst2: {tmp_path / 'home' / 'data' / 'sst2'}"
    trained = tpv("train", "--task", "sst2", "--backbone", str(tiny_causal_path), "--steps", "3",
                  "--prompt-length", "4", env=env)
    assert trained.returncode == 0, trained.stderr
    result = json.loads(trained.stdout)
    assert result["steps"] == 3 and "f1" in result["metrics"] and len(result["vector_id"]) > 8
