import json
import os
from collections import Counter
from pathlib import Path

import datasets
import pytest
import yaml

from tpv import tasks as T
from tpv.metrics import compute_metric
from tpv.tasks import registry


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Own TPV_HOME, and a registry copy so user tasks registered here do not leak into other tests."""
    monkeypatch.setenv("TPV_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


SENT_ROWS = [{"sentence": f"review number {i} was {'good' if i % 2 else 'bad'}", "sentiment": ["neg", "pos"][i % 2],
              "id": i} for i in range(60)]


def write_config(folder: Path, config: dict, name: str = "task.yaml") -> Path:
    path = folder / name
    path.write_text(json.dumps(config) if name.endswith(".json") else yaml.safe_dump(config))
    return path


def sentiment_config(data: dict, **extra) -> dict:
    return {"name": "my_sent", "template": "review: {text} sentiment:", "labels": ["neg", "pos"],
            "metric": "accuracy", "data": {"columns": {"text": "sentence"}, "label_column": "sentiment", **data},
            **extra}


# ------------------------------------------------------------------------------------------------ built-ins

def test_builtin_tasks_listed_with_short_distinct_labels():
    names = T.list_tasks()
    for expected in ("vitaminc", "epistemic_reasoning", "presuppositions_nli", "boolq", "rotten_tomatoes",
                     "rotten_tomatoes_5", "yelp", "imdb", "amazon", "tweets", "trec", "trec_fine", "bbc_news",
                     "snips", "sms_spam"):
        assert expected in names
    for spec in T.BUILTIN_TASKS:
        assert spec.source and spec.licence and spec.data is None
        assert len(set(spec.labels)) == len(spec.labels) >= 2
        assert all(label == label.lower() and len(label.split()) <= 2 for label in spec.labels)
    assert len(T.get_task("trec_fine").labels) == 50
    assert T.get_task("sms_spam").labels[1] == "spam"  # f1's positive class


def test_unknown_task_and_missing_data_errors():
    with pytest.raises(T.UnknownTaskError, match="unknown task 'nope'.*vitaminc"):
        T.get_task("nope")
    with pytest.raises(T.TaskDataMissing, match="tpv data fetch --task trec"):
        T.load_split("trec", "train")
    with pytest.raises(T.BadSplitRequest, match="split must be one of"):
        T.load_split("trec", "dev")


def test_builtin_reads_prepared_jsonl():
    folder = T.task_data_dir("yelp")
    folder.mkdir(parents=True)
    for split, n in (("train", 30), ("validation", 5), ("test", 0)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n"
                                                       for i in range(n)))
    (folder / "meta.json").write_text("{}")
    train = T.load_split("yelp", "train")
    assert len(train) == 30
    assert train[1] == T.Example(source="sentence: t1 sentiment:", target="positive", label=1)
    assert T.load_split("yelp", "test") == []
    sub = T.load_split("yelp", "train", limit=10, seed=3)
    assert len(sub) == 10 and sub == T.load_split("yelp", "train", limit=10, seed=3)
    assert set(e.source for e in sub) <= set(e.source for e in train)
    assert sub != T.load_split("yelp", "train", limit=10, seed=4)


# -------------------------------------------------------------------------------------------- spec pieces

def test_render_truncates_fields_at_word_boundary():
    spec = T.TaskSpec(name="t", template="q: {q} p: {p} a:", labels=["no", "yes"], metric="accuracy",
                      max_chars={"p": 12})
    ex = spec.example({"q": "why", "p": "alpha beta gamma delta", "label": 1})
    assert ex.source == "q: why p: alpha beta a:" and ex.target == "yes" and ex.label == 1


def test_regression_example_target_has_one_decimal():
    spec = T.TaskSpec(name="r", template="{a} || {b}", metric="pearson")
    ex = spec.example({"a": "x", "b": "y", "label": 3.14159})
    assert ex.target == "3.1" and ex.label == pytest.approx(3.14159) and spec.is_regression


# ------------------------------------------------------------------------------------------------ splits

def rows(n, groups=None):
    return [{"text": f"r{i}", "g": f"g{i % groups}" if groups else None, "label": i % 3} for i in range(n)]


def test_split_protocol_small_large_and_official():
    proto = T.SplitProtocol(seed=7)
    small = T.make_splits(rows(2000), None, proto)
    assert {k: len(v) for k, v in small.items()} == {"train": 1600, "validation": 200, "test": 200}
    large = T.make_splits(rows(20000), None, proto)
    assert {k: len(v) for k, v in large.items()} == {"train": 17000, "validation": 1000, "test": 2000}
    official = rows(300)
    small_official = T.make_splits(rows(5000), official, proto)
    assert len(small_official["train"]) == 5000
    assert len(small_official["validation"]) + len(small_official["test"]) == 300
    large_official = T.make_splits(rows(12000), official, proto)
    assert large_official["test"] == official and len(large_official["validation"]) == 1000


def test_splits_deterministic_disjoint_and_grouped():
    proto = T.SplitProtocol(seed=1, group_field="g")
    data = rows(3000, groups=400)
    a = T.make_splits(data, None, proto)
    b = T.make_splits(data, None, proto)
    assert a == b
    texts = {k: {r["text"] for r in v} for k, v in a.items()}
    assert sum(len(t) for t in texts.values()) == 3000
    assert not (texts["train"] & texts["validation"] or texts["train"] & texts["test"]
                or texts["validation"] & texts["test"])
    groups = {k: {r["g"] for r in v} for k, v in a.items()}
    assert not (groups["train"] & groups["validation"] or groups["train"] & groups["test"]
                or groups["validation"] & groups["test"])
    other = T.make_splits(data, None, T.SplitProtocol(seed=2, group_field="g"))
    assert other["test"] != a["test"]


def test_carve_keeps_input_order():
    rest, carved = T.carve(rows(50), 10, seed=0)
    assert len(carved) == 10 and len(rest) == 40
    assert [r["text"] for r in carved] == sorted((r["text"] for r in carved), key=lambda t: int(t[1:]))


# ------------------------------------------------------------------------------------------------ few-shot

def test_few_shot_counts_and_seed():
    examples = [T.Example(source=f"s{i}", target="x", label=label)
                for i, label in enumerate([0] * 20 + [1] * 20 + [2] * 3)]
    shots = T.few_shot(examples, 5, seed=0)
    assert Counter(e.label for e in shots) == {0: 5, 1: 5, 2: 3}
    assert len({e.source for e in shots}) == 13
    assert shots == T.few_shot(examples, 5, seed=0)
    assert shots != T.few_shot(examples, 5, seed=1)
    regression = [T.Example(source=f"s{i}", target="1.0", label=float(i)) for i in range(30)]
    assert len(T.few_shot(regression, 8, seed=0)) == 8
    with pytest.raises(T.BadSplitRequest, match="k_per_class"):
        T.few_shot(examples, 0)


# ------------------------------------------------------------------------------------------------ user tasks

def check_sentiment_task(spec: T.TaskSpec, n_rows: int = 60):
    splits = {s: T.load_split(spec.name, s) for s in T.SPLITS}
    assert sum(len(v) for v in splits.values()) == n_rows
    assert all(splits.values())
    ex = splits["train"][0]
    assert ex.source.startswith("review: review number ") and ex.source.endswith(" sentiment:")
    assert ex.target == spec.labels[ex.label]
    assert {e.source for e in splits["train"]}.isdisjoint({e.source for e in splits["test"]})


def test_user_task_from_csv(tmp_path):
    datasets.Dataset.from_list(SENT_ROWS).to_csv(tmp_path / "sent.csv", index=False)
    spec = T.register_task_file(write_config(tmp_path, sentiment_config({"path": "sent.csv"})))
    assert spec.data.path == str(tmp_path / "sent.csv")  # resolved against the config's folder
    check_sentiment_task(spec)
    # 60 rows, small: 80 / 10 / 10 by the protocol
    assert [len(T.load_split("my_sent", s)) for s in T.SPLITS] == [48, 6, 6]


def test_user_task_from_jsonl_with_index_labels_and_json_config(tmp_path):
    with open(tmp_path / "sent.jsonl", "w") as f:
        for r in SENT_ROWS:
            f.write(json.dumps({**r, "sentiment": r["id"] % 2}) + "\n")
    spec = T.register_task_file(write_config(tmp_path, sentiment_config({"path": "sent.jsonl"}), "task.json"))
    check_sentiment_task(spec)


def test_user_task_from_parquet_split_files(tmp_path):
    datasets.Dataset.from_list(SENT_ROWS[:50]).to_parquet(tmp_path / "train.parquet")
    datasets.Dataset.from_list(SENT_ROWS[50:]).to_parquet(tmp_path / "test.parquet")
    spec = T.register_task_file(write_config(
        tmp_path, sentiment_config({"splits": {"train": "train.parquet", "test": "test.parquet"}})))
    check_sentiment_task(spec)
    # an official held-out set of a small task is halved into validation and test; train stays whole
    assert [len(T.load_split("my_sent", s)) for s in T.SPLITS] == [50, 5, 5]


def test_user_task_from_saved_hf_dataset(tmp_path):
    datasets.Dataset.from_list(SENT_ROWS).save_to_disk(str(tmp_path / "ds"))
    spec = T.register_task_file(write_config(tmp_path, sentiment_config({"path": "ds"})))
    check_sentiment_task(spec)
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(SENT_ROWS[:40]),
                               "validation": datasets.Dataset.from_list(SENT_ROWS[40:50]),
                               "test": datasets.Dataset.from_list(SENT_ROWS[50:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    T.register_task_file(write_config(tmp_path, sentiment_config({"path": "dd"}, name="my_dd"), "dd.yaml"))
    assert [len(T.load_split("my_dd", s)) for s in T.SPLITS] == [40, 10, 10]


def test_regression_pair_task_with_pearson(tmp_path):
    pairs = [{"sentence1": f"a cat sat {i}", "sentence2": f"a cat stood {i}", "score": round(i * 0.05, 2)}
             for i in range(100)]
    datasets.Dataset.from_list(pairs).to_csv(tmp_path / "sts.csv", index=False)
    config = {"name": "my_sts", "family": "similarity", "template": "sentence1: {s1} sentence2: {s2} similarity:",
              "metric": "pearson", "split": {"seed": 3},
              "data": {"path": "sts.csv", "columns": {"s1": "sentence1", "s2": "sentence2"}, "label_column": "score"}}
    spec = T.register_task_file(write_config(tmp_path, config))
    assert spec.is_regression
    test = T.load_split("my_sts", "test")
    assert test and all(isinstance(e.label, float) and e.target == f"{e.label:.1f}" for e in test)
    labels = [e.label for e in test]
    assert compute_metric("pearson", labels, labels) == pytest.approx(1.0)
    assert compute_metric("spearman", [float(e.target) for e in test], labels) > 0.99


def test_register_collisions(tmp_path):
    datasets.Dataset.from_list(SENT_ROWS).to_csv(tmp_path / "sent.csv", index=False)
    path = write_config(tmp_path, sentiment_config({"path": "sent.csv"}))
    T.register_task_file(path)
    with pytest.raises(T.TaskConfigError, match="name: a registered task"):
        T.register_task_file(path)
    T.register_task_file(path, overwrite=True)
    builtin = write_config(tmp_path, sentiment_config({"path": "sent.csv"}, name="yelp"), "b.yaml")
    with pytest.raises(T.TaskConfigError, match="name: a built-in task"):
        T.register_task_file(builtin, overwrite=True)


BAD_CONFIGS = [
    (sentiment_config({"path": "sent.csv", "columns": {"text": "review"}}), r"data\.columns\.text: column 'review'"),
    (sentiment_config({"path": "sent.csv", "columns": {}}), r"template field \{text\}.*column 'text' not in"),
    (sentiment_config({"path": "sent.csv", "columns": {"text": "sentence", "other": "id"}}),
     r"data\.columns\.other: not a template field"),
    (sentiment_config({"path": "sent.csv", "label_column": "stars"}), r"data\.label_column: column 'stars'"),
    (sentiment_config({"path": "sent.csv"}, labels=[]), r"labels: metric 'accuracy' is for classification"),
    (sentiment_config({"path": "sent.csv"}, labels=["good", "bad"]),
     r"label_column: row 0 of sent.csv: label 'neg' is neither"),
    (sentiment_config({"path": "missing.csv"}), r"data\.path: file not found"),
    (sentiment_config({"splits": {"train": "sent.csv", "test": "nope.csv"}}), r"data\.splits\.test: file not found"),
    (sentiment_config({"splits": {"test": "sent.csv"}}), r"data\.splits: a train file is required"),
    (sentiment_config({"path": "sent.csv", "splits": {"train": "sent.csv"}}), r"exactly one of data\.path"),
    (sentiment_config({"path": "sent.txt"}), r"data\.format: cannot tell"),
    (sentiment_config({"path": "sent.csv"}, metric="bleu"), r"metric: Input should be 'accuracy'"),
    (sentiment_config({"path": "sent.csv"}, metric="pearson"), r"labels: metric 'pearson' is for regression"),
    (sentiment_config({"path": "sent.csv"}, metric="f1", labels=["a", "b", "c"]), r"metric: f1 is binary"),
    (sentiment_config({"path": "sent.csv"}, labels=["neg", "neg"]), r"labels: duplicates"),
    (sentiment_config({"path": "sent.csv"}, template="review: {} sentiment"), r"template: field \{\} must be"),
    (sentiment_config({"path": "sent.csv"}, template="review: {text"), r"template: "),
    (sentiment_config({"path": "sent.csv"}, template="no fields"), r"template: it names no field"),
    (sentiment_config({"path": "sent.csv"}, max_chars={"body": 10}), r"max_chars: 'body' is not a template field"),
    (sentiment_config({"path": "sent.csv"}, lables=["neg", "pos"]), r"lables: Extra inputs are not permitted"),
    (sentiment_config({"path": "sent.csv"}, name="../evil"), r"name: .*invalid name '../evil'"),
    (sentiment_config({"path": "sent.csv"}, name="a..b"), r"name: .*invalid name 'a\.\.b'"),
    (sentiment_config({"path": "sent.csv"}, split={"group_field": "user"}), r"split\.group_field: column 'user'"),
    ({"name": "x", "template": "{text}", "metric": "accuracy", "labels": ["a", "b"]}, r"data: Field required"),
]


@pytest.mark.parametrize("config, message", BAD_CONFIGS)
def test_bad_config_errors_name_the_field(tmp_path, config, message):
    datasets.Dataset.from_list(SENT_ROWS).to_csv(tmp_path / "sent.csv", index=False)
    (tmp_path / "sent.txt").write_text("x")
    path = write_config(tmp_path, config)
    with pytest.raises(T.TaskConfigError, match=message):
        T.register_task_file(path)
    assert "my_sent" not in T.list_tasks()


def test_regression_values_must_be_numbers(tmp_path):
    (tmp_path / "r.jsonl").write_text('{"t": "a", "y": 1.5}\n{"t": "b", "y": "high"}\n{"t": "c", "y": "nan"}\n')
    config = {"name": "reg", "template": "{t}", "metric": "spearman", "data": {"path": "r.jsonl", "label_column": "y"}}
    with pytest.raises(T.TaskConfigError, match=r"row 1 .*'high' is not a number"):
        T.register_task_file(write_config(tmp_path, config))


def test_unreadable_data_file(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"text": "a", "label": "pos"}\n{not json\n')
    config = sentiment_config({"path": "broken.jsonl", "columns": {}, "label_column": "label"})
    with pytest.raises(T.TaskConfigError, match=r"data\.path: cannot read .*broken\.jsonl as jsonl"):
        T.register_task_file(write_config(tmp_path, config))


def test_config_file_problems(tmp_path):
    with pytest.raises(T.TaskConfigError, match="task config file not found"):
        T.register_task_file(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(T.TaskConfigError, match="not valid YAML"):
        T.register_task_file(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(T.TaskConfigError, match="mapping of task fields"):
        T.register_task_file(tmp_path / "list.yaml")


def test_persisted_user_task_is_seen_by_a_fresh_process(tmp_path, monkeypatch):
    """`tpv tasks add` persists the spec under TPV_HOME, so other processes (Ray workers) find the task."""
    import subprocess
    import sys

    home = tmp_path / "home"
    monkeypatch.setenv("TPV_HOME", str(home))
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"t{i}", "label": ["a", "b"][i % 2]}) for i in range(20)))
    config = tmp_path / "t.yaml"
    config.write_text(f"name: shared_task\ntemplate: '{{text}} ->'\nlabels: [a, b]\nmetric: accuracy\ndata:\n  path: {data}\n")
    out = subprocess.run([sys.executable, "-m", "tpv.cli", "tasks", "add", str(config)], capture_output=True, text=True,
                         env={**os.environ, "TPV_HOME": str(home)})
    assert out.returncode == 0, out.stderr
    probe = "from tpv.tasks import load_split; print(len(load_split('shared_task', 'train')))"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env={**os.environ, "TPV_HOME": str(home)})
    assert run.returncode == 0 and int(run.stdout) > 0, run.stderr
    again = subprocess.run([sys.executable, "-m", "tpv.cli", "tasks", "add", str(config)], capture_output=True, text=True,
                           env={**os.environ, "TPV_HOME": str(home)})
    assert again.returncode == 2 and "already called 'shared_task'" in again.stderr
