"""Packed training and evaluation on a tiny real model: each prompt of a pack ends as it ends alone.

Tolerance: a prompt trained in a pack equals the same run alone bit for bit when each prompt has its own forward
pass (the CPU default), and within atol 1e-5 / rtol 1e-5 when prompts share passes (float32; in practice ~1e-6
relative, from the different batch shapes of the matrix products). Evaluations agree on accuracy exactly and on the
gold label's log-probability within 1e-5.
"""

from __future__ import annotations

import json

import pytest
import torch
from task_data import argmax_accuracy, write_builtin_task

from tpv.backbone import Backbone, BackboneConfig, PromptPrefix
from tpv.evaluate import (PROMPTS_PER_PASS, classification_metrics, evaluate_many, label_groups, label_scores,
                          prompts_per_pass)
from tpv.packed import _start, _step_losses, pass_prompts, train_pack
from tpv.prompt import make_origin
from tpv.tasks import get_task, load_split, register_task_file
from tpv.train import TrainCheckpoint, TrainConfig, train

TOL = {"atol": 1e-5, "rtol": 1e-5}
QUESTIONS = [("what is the capital of france?", 4), ("who wrote the book?", 3), ("how many people live there?", 5),
             ("what does the abbreviation mean?", 0), ("why is the sky blue?", 1), ("what animal is it?", 2)]


def user_task(folder, name: str, labels: list[str], texts: list[str]) -> str:
    """A task whose labels are single tokens of the tiny tokenizer ('no', 'yes', 'film', 'news', 'the')."""
    rows = [{"text": t, "label": labels[i % len(labels)]} for i, t in enumerate(texts)]
    (folder / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (folder / f"{name}.yaml").write_text(
        f"name: {name}\ntemplate: 'text: {{text}} answer:'\nlabels: {json.dumps(labels)}\nmetric: accuracy\n"
        f"data:\n  splits: {{train: {name}.jsonl, validation: {name}.jsonl, test: {name}.jsonl}}\n"
    )
    return register_task_file(folder / f"{name}.yaml", overwrite=True).name


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("tasks")
    short = ["great fun", "a waste of time", "the film was boring", "wonderful acting", "terrible", "great story"]
    long = [f"{t}, and the movie about the economy was news to people who live there" for t in short]
    write_builtin_task("trec", [{"text": q, "label": y} for q, y in QUESTIONS] * 3)
    return {"yesno": user_task(folder, "tiny_yesno", ["no", "yes"], short * 4),
            "topic": user_task(folder, "tiny_topic", ["film", "news", "the"], long * 3), "trec": "trec"}


@pytest.fixture(scope="module")
def causal(tiny_causal_path) -> Backbone:
    return Backbone.load(BackboneConfig(model=str(tiny_causal_path), dtype="float32"))


def config(task: str, bb: Backbone, **kw) -> TrainConfig:
    base = dict(task=task, backbone=BackboneConfig(model=bb.config.model, dtype="float32"), prompt_length=4,
                lr=0.3, warmup_steps=2, batch_size=4, max_steps=12, eval_every=4, eval_examples=None, progress=False,
                loss="label")
    return TrainConfig(**{**base, **kw})


def mixed_pack(tasks: dict[str, str], backbone: Backbone) -> list[TrainConfig]:
    """Tasks with different label sets and source lengths, origin seeds, batch sizes, lengths and losses."""
    return [
        config(tasks["yesno"], backbone, seed=0),
        config(tasks["topic"], backbone, seed=1, batch_size=5, max_steps=8, schedule="linear"),
        config(tasks["trec"], backbone, seed=2, eval_every=3),
        config(tasks["yesno"], backbone, seed=3, loss="lm", batch_size=3, data_seed=7),
    ]


def test_label_sets_of_single_tokens_share_a_pass_others_their_own(tasks, causal):
    labels = [get_task(tasks[k]).labels for k in ("yesno", "topic", "trec", "yesno")]
    groups = label_groups(causal, labels)
    assert [g.members for g in groups] == [[0, 1, 3], [2]]  # trec's labels are several tokens: B x C rows
    assert groups[0].labels == ["no", "yes", "film", "news", "the"]
    assert groups[0].columns == [[0, 1], [2, 3, 4], [0, 1]]


@pytest.mark.parametrize("per_pass", [1, 4], ids=["own-pass", "shared-passes"])
def test_each_packed_prompt_ends_as_it_ends_alone(tasks, causal, per_pass):
    configs = mixed_pack(tasks, causal)
    finished: list[tuple[int, int]] = []
    packed = train_pack(configs, causal, on_finish=lambda i, r: finished.append((i, r.steps)), per_pass=per_pass)
    assert finished[0] == (1, 8) and sorted(finished) == [(0, 12), (1, 8), (2, 12), (3, 12)]  # 8 steps, then left
    for cfg, got in zip(configs, packed):
        alone = train(cfg, causal)
        if per_pass == 1:  # its own pass: exactly the computation of the run alone
            assert torch.equal(got.tuned, alone.tuned)
        torch.testing.assert_close(got.tuned, alone.tuned, **TOL)
        assert not torch.equal(alone.tuned, alone.origin)  # every run moved its prompt
        assert got.steps == alone.steps and got.metrics["best_step"] == alone.metrics["best_step"]
        assert [h["step"] for h in got.history] == [h["step"] for h in alone.history]
        for mine, theirs in zip(got.history, alone.history):
            assert mine["accuracy"] == theirs["accuracy"]
            assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)


def test_the_pack_gradient_is_each_prompts_own(tasks, causal):
    """The pack's loss is the sum of each prompt's mean loss: each prompt gets exactly its own run's gradient."""
    configs = mixed_pack(tasks, causal)
    runs = [_start(i, c, causal, None, None) for i, c in enumerate(configs)]
    rows = [[run.train_set[i] for i in next(run.batches)] for run in runs]
    groups = {r.index: None for r in runs}
    labelled = [r for r in runs if r.config.loss == "label"]
    for group in label_groups(causal, [r.task.labels for r in labelled]):
        group.members = [labelled[k].index for k in group.members]
        groups |= {i: group for i in group.members}
    # passes of two: the label group of three is split, so shared and single passes both run
    losses = _step_losses(causal, runs, groups, rows, per_pass=2, recompute=False)
    for run, batch, loss_in_pack in zip(runs, rows, losses):
        alone = run.prompt.weight.detach().clone().requires_grad_(True)
        sources = [e.source for e in batch]
        if run.config.loss == "label":
            loss = causal.label_loss(alone.unsqueeze(0), sources, run.task.labels, [int(e.label) for e in batch])
        else:
            loss = causal.loss(alone.unsqueeze(0), sources, [e.target for e in batch])
        loss.backward()
        assert loss.item() == pytest.approx(loss_in_pack, rel=1e-5)
        assert alone.grad.abs().sum() > 0
        torch.testing.assert_close(run.prompt.weight.grad, alone.grad, **TOL)


def test_a_causal_pass_on_a_cpu_runs_each_prompt_once_for_all_its_rows(tiny_causal_path, tiny_t5_path):
    """The gradient test above compares these passes with a prompt per row; this one pins that they are prefixes:
    each prompt computed once (K rows of keys/values), its rows attending to it, on causal backbones only."""
    causal = Backbone.load(BackboneConfig(model=str(tiny_causal_path), device="cpu", dtype="float32"))
    prompts = [make_origin(causal, 4, seed).unsqueeze(0) for seed in (0, 1)]
    shared = pass_prompts(causal, prompts, [3, 2])
    assert isinstance(shared, PromptPrefix) and shared.rows == 5 and shared.length == 4
    prefix = causal.prefix(torch.cat(prompts))
    for row, k in enumerate([0, 0, 0, 1, 1]):
        torch.testing.assert_close(shared.layers[-1][0][row], prefix.layers[-1][0][k])
    t5 = Backbone.load(BackboneConfig(model=str(tiny_t5_path), device="cpu", dtype="float32"))
    t5_prompts = [make_origin(t5, 4, seed).unsqueeze(0) for seed in (0, 1)]
    assert torch.equal(pass_prompts(t5, t5_prompts, [3, 2]),  # seq2seq: a prompt per row, into the encoder
                       torch.cat([t5_prompts[0].expand(3, -1, -1), t5_prompts[1].expand(2, -1, -1)]))


def test_a_stopped_prompt_leaves_and_the_pack_goes_on(tasks, causal):
    stuck = config(tasks["yesno"], causal, seed=4, lr=1e-12, patience=2, eval_every=2, max_steps=40)
    other = config(tasks["topic"], causal, seed=5, max_steps=16)
    evaluated: list[tuple[int, int]] = []
    stopped, rest = train_pack([stuck, other], causal,
                               on_eval=lambda evs: evaluated.extend((e.index, e.step) for e in evs))
    assert stopped.steps == 6 and stopped.metrics["early_stopped"] == 1.0 and rest.steps == 16
    assert [s for i, s in evaluated if i == 0] == [2, 4, 6] and [s for i, s in evaluated if i == 1] == [4, 8, 12, 16]
    torch.testing.assert_close(rest.tuned, train(other, causal).tuned, **TOL)


def test_a_pack_resumes_per_prompt_from_its_checkpoints(tasks, causal, tmp_path):
    """Checkpoints taken at step 6 (prompts last evaluated at steps 4, 6 and 3) resume each prompt where it was."""
    configs = mixed_pack(tasks, causal)[:3]
    latest: dict[int, TrainCheckpoint] = {}

    def keep(evaluations) -> None:
        for e in evaluations:
            if e.step <= 6:
                e.state.save(tmp_path / str(e.index))
                latest[e.index] = e.step

    full = train_pack(configs, causal, on_eval=keep)
    assert latest == {0: 4, 1: 4, 2: 6}
    resumed = train_pack(configs, causal, resume=[TrainCheckpoint.load(tmp_path / str(i)) for i in range(3)])
    for got, want in zip(resumed, full):
        torch.testing.assert_close(got.tuned, want.tuned, **TOL)
        assert [h["step"] for h in got.history] == [h["step"] for h in want.history]


def test_a_pack_needs_one_prompt_length_and_one_backbone(tasks, causal):
    from tpv.errors import InvalidInput

    with pytest.raises(InvalidInput, match="prompt length"):
        train_pack([config(tasks["yesno"], causal), config(tasks["yesno"], causal, prompt_length=5)], causal)
    with pytest.raises(InvalidInput, match="backbone"):
        train_pack([config(tasks["yesno"], causal), TrainConfig(task=tasks["yesno"], backbone={"model": "x"})], causal)


@pytest.mark.parametrize("per_pass", [None, 7, PROMPTS_PER_PASS])
def test_evaluate_many_gives_each_prompt_its_own_metrics(tasks, causal, per_pass):
    """25 prompts of three tasks, on splits of different sizes: one prompt per pass (the CPU default), and shared
    passes (a GPU's: more prompts than one pass holds)."""
    names = [tasks["yesno"], tasks["topic"], tasks["trec"], tasks["yesno"], tasks["topic"]] * 5
    prompts = [make_origin(causal, 4, seed) + 0.3 * torch.randn(4, 32, generator=torch.Generator().manual_seed(seed))
               for seed in range(len(names))]
    specs = [get_task(n) for n in names]
    examples = [load_split(n, "validation", limit=limit, seed=0) for n, limit in zip(names, [24, 7, 18, 5, None] * 5)]
    many = evaluate_many(causal, prompts, specs, examples, batch_size=4, per_pass=per_pass)
    for prompt, spec, rows, got in zip(prompts, specs, examples, many):
        # alone: the prompt tensor through the backbone's forward (no cached keys/values), its own labels only
        scores = label_scores(causal, prompt, [e.source for e in rows], spec.labels, batch_size=4)
        alone = classification_metrics(spec, scores, [e.label for e in rows])
        assert got["accuracy"] == alone["accuracy"]
        assert got["label_logprob"] == pytest.approx(alone["label_logprob"], abs=1e-5)


def test_evaluation_shares_passes_on_a_gpu_only():
    """A CPU pass is compute-bound (bench/eval_passes.py): each prompt gets its own; a GPU's passes are shared."""
    assert prompts_per_pass("cpu") == 1
    assert prompts_per_pass("cuda:0") == PROMPTS_PER_PASS > 1


def test_auto_pack_size_fills_the_trial_slots_within_half_the_free_memory(tiny_causal_path):
    """On a GPU the whole pack is one pass, so its activations grow with K; on a CPU each prompt has its own pass and
    only one prompt's activations are alive at a time. (Only the device's name is read: no GPU is needed.)"""
    from transformers import AutoConfig

    from tpv.packed import activation_bytes, auto_pack_size, pack_fits

    configs = [TrainConfig(task="imdb", backbone={"model": str(tiny_causal_path), "dtype": "float32"},
                           prompt_length=4, batch_size=4, seed=s) for s in range(10)]
    model_config = AutoConfig.from_pretrained(tiny_causal_path)
    per_prompt = activation_bytes(configs[0], model_config, 4, "cuda")
    # a CPU pass computes the causal prompt once for its 4 rows: 3 of every 4 rows' prompt positions are not held
    per_row = model_config.num_hidden_layers * (16 * model_config.hidden_size + 3 * model_config.intermediate_size) * 4
    cpu_per_prompt = activation_bytes(configs[0], model_config, 4, "cpu")
    assert per_prompt - cpu_per_prompt == 3 * 4 * per_row
    weights = sum(f.stat().st_size for f in tiny_causal_path.glob("*.safetensors"))
    plenty, three, one = 10**15, 2 * (weights + 3 * per_prompt), 2 * (weights + per_prompt)
    for device in ("cpu", "cuda"):
        assert auto_pack_size(configs, slots=1, free_bytes=plenty, device=device) == 10
        assert auto_pack_size(configs, slots=3, free_bytes=plenty, device=device) == 4  # ceil(10 / 3): slots busy
        assert auto_pack_size(configs, slots=1, free_bytes=0, device=device) == 1
    assert auto_pack_size(configs, slots=1, free_bytes=one - 1, device="cuda") == 1
    assert auto_pack_size(configs, slots=1, free_bytes=2 * (weights + cpu_per_prompt) - 1, device="cpu") == 1
    assert auto_pack_size(configs, slots=1, free_bytes=three, device="cuda") == 3
    assert auto_pack_size(configs, slots=1, free_bytes=three - 1, device="cuda") == 2
    assert pack_fits(configs, 3, three, "cuda")
    assert not pack_fits(configs, 4, three, "cuda")  # then it recomputes activations
    cpu_one = 2 * (weights + cpu_per_prompt)
    assert auto_pack_size(configs, slots=1, free_bytes=cpu_one, device="cpu") == 10
    assert pack_fits(configs, 10, cpu_one, "cpu") and not pack_fits(configs, 10, cpu_one - 1, "cpu")


def test_a_recomputing_pack_ends_where_a_plain_one_does(tasks, causal):
    """Activation recompute (for packs that would not fit in memory) changes nothing but memory."""
    configs = mixed_pack(tasks, causal)[:3]
    plain = train_pack(configs, causal, per_pass=3)
    for got, want in zip(train_pack(configs, causal, recompute=True, per_pass=3), plain):
        torch.testing.assert_close(got.tuned, want.tuned, **TOL)


def _script(name: str):
    """A module of scripts/ (they are run as files, not imported as a package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pack_grid_script_stores_every_best_vector_and_snapshot(causal, tasks, tmp_path):
    """scripts/pack_grid.py (the grid without Ray, for a lent GPU): one pack, every prompt's best vector, origin and
    snapshots in the store, test scores in the summary."""
    from tpv.store import VectorStore

    pack_grid = _script("pack_grid")
    store, out = tmp_path / "store", tmp_path / "summary.json"
    assert pack_grid.main([
        "--tasks", tasks["yesno"], tasks["topic"], "--seeds", "0", "1", "--snapshots", "2", "--store", str(store),
        "--source", "grid", "--test-examples", "6", "--out", str(out), "--set", f"backbone.model={causal.config.model}",
        "backbone.dtype=float32", "prompt_length=4", "max_steps=4", "eval_every=2", "eval_examples=null",
        "batch_size=4", "warmup_steps=1", "lr=0.3"]) == 0
    summary = json.loads(out.read_text())
    assert sorted((r["task"], r["seed"]) for r in summary["runs"]) == sorted(
        (t, s) for t in (tasks["yesno"], tasks["topic"]) for s in (0, 1))
    metas = VectorStore(store).list()
    best = {(m.task, m.origin_seed): VectorStore(store).get(m.vector_id).tensor for m in metas if m.source == "grid"}
    for r in summary["runs"]:
        labels, rows = get_task(r["task"]).labels, load_split(r["task"], "test", limit=6)
        prompt = make_origin(causal, 4, r["seed"]) + best[r["task"], r["seed"]]
        assert r["steps"] == 4 and r["test_accuracy"] == pytest.approx(argmax_accuracy(
            causal, prompt, [e.source for e in rows], [labels[e.label] for e in rows], labels)), r
    by_source = {src: sorted((m.task, m.origin_seed) for m in metas if m.source == src) for src in ("grid", "grid@2")}
    assert by_source["grid"] == by_source["grid@2"] and len(by_source["grid"]) == 4
    assert len(metas) == 8
    vectors = VectorStore(store)
    snap = {(m.task, m.origin_seed): vectors.get(m.vector_id) for m in metas if m.source == "grid@2"}
    assert all(v.meta.metrics["step"] == 2.0 for v in snap.values())
    origin = vectors.get_origin(causal.backbone_id, 4, 0)
    torch.testing.assert_close(origin, make_origin(causal, 4, 0))


def test_vector_parts_script_scores_each_part_on_own_and_other_origins(causal, tasks, tmp_path, capsys):
    """scripts/vector_parts.py: every cell is the task's test metric of origin + that part of each vector, averaged
    over the vectors (own origin) or over vectors x other origins, as one evaluation of that prompt gives it."""
    from tpv.evaluate import evaluate
    from tpv.store import VectorStore
    from tpv.vectors import split_mean_row

    store = tmp_path / "store"
    assert _script("pack_grid").main([
        "--tasks", tasks["topic"], "--seeds", "0", "1", "--store", str(store), "--source", "grid",
        "--test-examples", "0", "--set", f"backbone.model={causal.config.model}", "backbone.dtype=float32",
        "prompt_length=4", "max_steps=6", "eval_every=6", "eval_examples=null", "batch_size=4", "warmup_steps=1",
        "lr=0.3"]) == 0
    capsys.readouterr()
    assert _script("vector_parts").main([
        "--store", str(store), "--vectors-source", "grid", "--tasks", tasks["topic"], "--seeds", "0", "1",
        "--backbone", str(causal.config.model), "--test-examples", "12", "--threads", "1", "--metric",
        "label_logprob"]) == 0
    [row] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    spec = get_task(tasks["topic"])
    examples = load_split(spec.name, "test", limit=12, seed=0)
    vectors = {m.origin_seed: VectorStore(store).get(m.vector_id) for m in VectorStore(store).list()}
    origins = {s: make_origin(causal, 4, s) for s in (0, 1)}

    def score(prompt):  # a smooth metric: the tiny model's accuracy is the same for every prompt here
        return evaluate(causal, prompt, spec, examples)["label_logprob"]

    parts = {s: dict(zip(("tau", "mean row", "rest"), (v.tensor, *split_mean_row(v.tensor)))) for s, v in vectors.items()}
    assert row["metric"] == "label_logprob"
    assert row["origin"] == pytest.approx((score(origins[0]) + score(origins[1])) / 2)
    for part in ("tau", "mean row", "rest"):
        own = [score(origins[s] + parts[s][part]) for s in (0, 1)]
        other = [score(origins[1 - s] + parts[s][part]) for s in (0, 1)]
        assert row[f"{part}, own"] == pytest.approx(sum(own) / 2), part
        assert row[f"{part}, other"] == pytest.approx(sum(other) / 2), part
    cells = [row[f"{part}, {where}"] for part in ("tau", "mean row", "rest") for where in ("own", "other")]
    assert len({round(c, 6) for c in [row["origin"], *cells]}) == 7  # every cell a different prompt
