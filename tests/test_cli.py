"""The `tpv` command end to end on a tiny model and a real store; bad input is one clear line and exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from task_data import argmax_accuracy
from test_train import write_sentiment_task


def tpv(*args: str, home) -> subprocess.CompletedProcess:
    env = {**os.environ, "TPV_HOME": str(home), "TPV_STORE": str(home / "store")}
    return subprocess.run([sys.executable, "-m", "tpv.cli", *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_causal_path):
    """A home with a persisted user task and two stored vectors (two origin seeds), made through the CLI."""
    home = tmp_path_factory.mktemp("cli-home")
    write_sentiment_task(home, "cli_sentiment")
    assert tpv("tasks", "add", str(home / "cli_sentiment.yaml"), home=home).returncode == 0
    ids = []
    for seed in ("0", "1"):
        out = tpv("train", "--task", "cli_sentiment", "--backbone", str(tiny_causal_path), "--seed", seed,
                  "--steps", "4", "--prompt-length", "4", home=home)
        assert out.returncode == 0, out.stderr
        ids.append(json.loads(out.stdout)["vector_id"])
    return home, ids


def direct_accuracy(home, model, name: str) -> float:
    """The stored composition's accuracy on the task's rows, from the data file and the label scores alone (the
    oracle of `tpv eval`: the task, template and metric code out of it)."""
    from tpv.backbone import Backbone, BackboneConfig
    from tpv.compose import Composer
    from tpv.prompt import make_origin
    from tpv.store import VectorStore

    backbone = Backbone.load(BackboneConfig(model=str(model)))
    prompt = Composer(VectorStore(home / "store"), lambda n, seed: make_origin(backbone, n, seed)).compose_named(
        backbone.backbone_id, name)
    rows = [json.loads(line) for line in (home / "cli_sentiment.jsonl").read_text().splitlines()]
    return argmax_accuracy(backbone, prompt, [f"review: {r['text']} sentiment:" for r in rows],
                           [r["label"] for r in rows], ["negative", "positive"])


def test_train_list_show_similarity_compose_eval(trained, tiny_causal_path):
    home, ids = trained
    listed = tpv("vectors", "list", home=home)
    assert listed.returncode == 0 and all(i in listed.stdout for i in ids) and "2 vector(s)" in listed.stdout
    shown = json.loads(tpv("vectors", "show", ids[0], home=home).stdout)
    assert shown["vector_id"] == ids[0] and shown["prompt_length"] == 4
    sim = tpv("vectors", "similarity", home=home)
    assert sim.returncode == 0 and "1.000" in sim.stdout and "cli_sentiment/s1" in sim.stdout
    composed = tpv("compose", "--term", "cli_sentiment=0.5", "--backbone", str(tiny_causal_path), "--save-name", "half",
                   "--out", str(home / "p.safetensors"), home=home)
    assert composed.returncode == 0, composed.stderr
    assert (home / "p.safetensors").is_file() and "saved composition 'half'" in composed.stdout
    evaluated = tpv("eval", "--task", "cli_sentiment", "--name", "half", "--backbone", str(tiny_causal_path), home=home)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["accuracy"] == direct_accuracy(home, tiny_causal_path, "half")
    exported = tpv("export-peft", ids[0], "--out", str(home / "adapter"), "--backbone", str(tiny_causal_path), home=home)
    assert exported.returncode == 0 and (home / "adapter" / "adapter_config.json").is_file()
    imported = tpv("import-peft", str(home / "adapter"), "--task", "cli_sentiment", "--origin-seed", "0",
                   "--backbone", str(tiny_causal_path), home=home)
    assert imported.returncode == 0 and imported.stdout.strip() == ids[0]  # same content, same id: no duplicate


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [  # exit codes by error category (tpv.errors.EXIT_CODES): 2 invalid input, 3 not found, 6 not prepared
        (["vectors", "show", "no-such-vector"], "no-such-vector", 3),
        (["vectors", "show", "../../etc/passwd"], "../../etc/passwd", 2),
        (["compose", "--term", "cli_sentiment=nan"], "finite", 2),
        (["compose", "--term", "cli_sentiment=x"], "must be a number", 2),
        (["compose", "--term", "nothing_stored=1"], "nothing_stored", 3),
        (["compose", "--term", "cli_sentiment=1", "--method", "bogus"], "bogus", 2),
        (["eval", "--task", "unknown_task", "--term", "cli_sentiment=1"], "unknown task 'unknown_task'", 3),
        (["train", "--task", "rotten_tomatoes", "--steps", "1"], "tpv data fetch", 6),
        (["tasks", "add", "/no/such/config.yaml"], "not found", 2),
        (["compose", "--spec", "{not json"], "not JSON", 2),
        (["sweep", "--tasks", "no_such_task"], "unknown task 'no_such_task'", 3),
        (["sweep", "--tasks", "cli_sentiment", "--set", "lre=0.5"], "lre: Extra inputs are not permitted", 2),
        (["addition", "--tasks", "cli_sentiment"], "at least 2", 2),
        (["study", "--tasks", "a", "b"], "--target", 2),
        (["demo", "--seeds", "0", "0"], "at least 2 --seeds", 2),
    ],
)
def test_bad_input_is_one_clear_line(trained, tiny_causal_path, args, message, code):
    home, _ = trained
    if args[0] in ("compose", "eval", "train"):
        args = [*args, "--backbone", str(tiny_causal_path)]
    out = tpv(*args, home=home)
    assert out.returncode == code, (out.stdout, out.stderr)
    assert out.stderr.startswith("error: ") and message in out.stderr and "Traceback" not in out.stderr


def test_train_config_file_keeps_its_backbone_block(trained, tiny_causal_path):
    """`--config` merges the flags into the file field by field: the file's backbone (model and input length)
    survives a flag that sets other fields, and a --backbone flag replaces only the model."""
    home, _ = trained
    config = home / "run.yaml"
    config.write_text(f"task: cli_sentiment\nprompt_length: 4\nmax_steps: 1\nprogress: false\n"
                      f"backbone:\n  model: {tiny_causal_path}\n  max_source_tokens: 17\n")
    out = tpv("train", "--config", str(config), "--seed", "7", home=home)
    assert out.returncode == 0, out.stderr
    shown = json.loads(tpv("vectors", "show", json.loads(out.stdout)["vector_id"], home=home).stdout)
    assert shown["origin_seed"] == 7
    assert shown["train_config"]["backbone"]["model"] == str(tiny_causal_path)
    assert shown["train_config"]["backbone"]["max_source_tokens"] == 17


def test_eval_reports_rank_and_generate_side_by_side(trained, tiny_causal_path):
    """`--eval both`: the label-likelihood figures exactly as `--eval rank` prints them, and the paper's generate-and-
    match accuracy equal to greedy generations compared with the gold label words by hand."""
    from tpv.backbone import Backbone, BackboneConfig
    from tpv.compose import Composer
    from tpv.prompt import make_origin
    from tpv.store import VectorStore

    home, _ = trained
    common = ("--task", "cli_sentiment", "--name", "half", "--backbone", str(tiny_causal_path))
    both = tpv("eval", *common, "--eval", "both", home=home)
    assert both.returncode == 0, both.stderr
    found = json.loads(both.stdout)
    assert set(found) == {"rank", "generate"}
    assert found["rank"] == json.loads(tpv("eval", *common, home=home).stdout)
    backbone = Backbone.load(BackboneConfig(model=str(tiny_causal_path)))
    prompt = Composer(VectorStore(home / "store"), lambda n, seed: make_origin(backbone, n, seed)).compose_named(
        backbone.backbone_id, "half")
    rows = [json.loads(line) for line in (home / "cli_sentiment.jsonl").read_text().splitlines()]
    texts = backbone.generate(prompt, [f"review: {r['text']} sentiment:" for r in rows], 16)
    gold = [r["label"] for r in rows]
    assert found["generate"]["accuracy"] == sum(t == g for t, g in zip(texts, gold)) / len(rows)
    assert found["generate"]["unmatched"] == sum(t not in ("negative", "positive") for t in texts) / len(rows)
