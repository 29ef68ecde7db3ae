"""One prompt-tuning run on a tiny real model: learning, determinism, resume, init kinds, PEFT interop."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from tpv.backbone import Backbone, BackboneConfig
from tpv.compose import Composer
from tpv.evaluate import evaluate, label_scores
from tpv.peft_io import PeftAdapterError, export_peft, import_peft, read_peft_prompt
from tpv.prompt import make_origin
from tpv.store import VectorStore
from tpv.tasks import get_task, load_split, register_task_file
from tpv.train import InitSpec, TrainCheckpoint, TrainConfig, _batches, steps_per_epoch, train, training_examples

POS = ["the movie was great", "wonderful acting and a great story", "great fun", "the acting was wonderful"]
NEG = ["terrible and boring", "a waste of time", "the film was boring", "terrible acting, a waste"]


def write_sentiment_task(folder, name: str) -> str:
    rows = [{"text": t, "label": "positive"} for t in POS] + [{"text": t, "label": "negative"} for t in NEG]
    data = folder / f"{name}.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows * 4))
    config = folder / f"{name}.yaml"
    config.write_text(
        f"name: {name}\ntemplate: 'review: {{text}} sentiment:'\nlabels: [negative, positive]\nmetric: accuracy\n"
        f"data:\n  splits: {{train: {data.name}, validation: {data.name}, test: {data.name}}}\n"
    )
    return register_task_file(config, overwrite=True).name


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> str:
    return write_sentiment_task(tmp_path_factory.mktemp("task"), "tiny_sentiment")


@pytest.fixture(scope="module")
def causal(tiny_causal_path) -> Backbone:
    return Backbone.load(BackboneConfig(model=str(tiny_causal_path), dtype="float32"))


def gold_loglik(backbone: Backbone, prompt: torch.Tensor, spec, examples) -> float:
    """Mean log-likelihood of the right label: what training must raise, even where a random model's argmax does not move."""
    scores = label_scores(backbone, prompt, [e.source for e in examples], spec.labels)
    return scores[torch.arange(len(examples)), torch.tensor([e.label for e in examples])].mean().item()


def config(task: str, backbone: Backbone, **kw) -> TrainConfig:
    base = dict(task=task, backbone=BackboneConfig(model=backbone.config.model), prompt_length=4, lr=0.3,
                warmup_steps=2, batch_size=8, max_steps=12, eval_every=4, eval_examples=None, progress=False)
    return TrainConfig(**{**base, **kw})


def test_training_learns_and_is_deterministic(task, causal):
    cfg = config(task, causal)
    first = train(cfg, causal)
    dev = load_split(task, "validation")
    spec = get_task(task)
    assert first.metrics["accuracy"] >= evaluate(causal, first.origin, spec, dev)["accuracy"]
    assert gold_loglik(causal, first.tuned, spec, dev) > gold_loglik(causal, first.origin, spec, dev)
    assert first.history[-1]["train_loss"] < first.history[0]["train_loss"]
    second = train(cfg, causal)
    assert torch.equal(first.tuned, second.tuned)
    vector = first.vector(causal.backbone_id)
    torch.testing.assert_close(vector.tensor, first.tuned - first.origin)
    assert vector.meta.task == task and vector.meta.train_config["max_steps"] == 12


def test_adam_eps_far_above_the_gradient_moves_elements_in_proportion_to_it(task, causal):
    # one AdamW step moves each element by lr * g / (|g| + eps): with the default eps every element moves by about
    # lr whatever its gradient; with eps far above |g| the moves keep the gradient's signs but scale with |g|
    sign_like = train(config(task, causal, max_steps=1, weight_decay=0), causal)
    scaled = train(config(task, causal, max_steps=1, weight_decay=0, adam_eps=1e3), causal)
    moved, moved_scaled = (sign_like.tuned - sign_like.origin).abs(), (scaled.tuned - scaled.origin)
    assert moved.max() / moved.median() < 1.01
    assert moved_scaled.abs().max() < 1e-3 * moved.median()
    assert moved_scaled.abs().max() / moved_scaled.abs().median() > 3
    agree = (torch.sign(moved_scaled) == torch.sign(sign_like.tuned - sign_like.origin)).float().mean()
    assert agree > 0.99


def test_resume_from_checkpoint_gives_the_same_prompt(task, causal, tmp_path):
    cfg = config(task, causal)
    saved = {}

    def keep(step, metrics, checkpoint):
        assert set(metrics) >= {"accuracy", "best", "step"}
        if step == 4:
            checkpoint.save(tmp_path / "ckpt")
            saved["step"] = step

    full = train(cfg, causal, callback=keep)
    assert saved == {"step": 4}
    resumed = train(cfg, causal, resume=TrainCheckpoint.load(tmp_path / "ckpt"))
    torch.testing.assert_close(resumed.tuned, full.tuned, atol=1e-6, rtol=1e-5)
    assert [h["step"] for h in resumed.history] == [4, 8, 12]


def test_few_shot_and_early_stopping(task, causal):
    # at lr 1e-12 the prompt cannot move, so no evaluation improves on the first
    result = train(config(task, causal, shots=2, patience=2, eval_every=2, max_steps=40, lr=1e-12), causal)
    assert result.steps == 6 and result.metrics["early_stopped"] == 1.0 and result.metrics["best_step"] == 2.0


def test_few_shot_draws_k_per_class_before_the_subsample(tmp_path):
    """2 positives among 62 rows: a 5-row subsample first would almost never keep both."""
    rows = [{"text": f"{NEG[i % 4]} {i}", "label": "negative"} for i in range(60)]
    rows += [{"text": t, "label": "positive"} for t in POS[:2]]
    data = tmp_path / "rare.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "rare.yaml").write_text(
        "name: tiny_rare\ntemplate: 'review: {text} sentiment:'\nlabels: [negative, positive]\nmetric: accuracy\n"
        "data:\n  splits: {train: rare.jsonl, validation: rare.jsonl, test: rare.jsonl}\n"
    )
    name = register_task_file(tmp_path / "rare.yaml", overwrite=True).name
    for seed in range(3):
        shots = training_examples(TrainConfig(task=name, shots=2, max_train_examples=5, data_seed=seed))
        assert Counter(e.label for e in shots) == {0: 2, 1: 2}
    assert len(training_examples(TrainConfig(task=name, max_train_examples=5))) == 5


def test_an_epoch_is_one_pass_and_a_resumed_stream_is_the_same():
    n, size = 32, 5
    assert steps_per_epoch(n, size) == 7 and steps_per_epoch(3, 8) == 1 and steps_per_epoch(40, 5) == 8
    stream = _batches(n, size, seed=3, start_step=0)
    batches = [next(stream) for _ in range(3 * 7)]
    for epoch in range(3):  # every example exactly once per epoch, the last batch short
        seen = [i for batch in batches[7 * epoch : 7 * epoch + 7] for i in batch]
        assert sorted(seen) == list(range(n)) and len(batches[7 * epoch + 6]) == 2
    for start in range(len(batches)):
        resumed = _batches(n, size, seed=3, start_step=start)
        assert [next(resumed) for _ in range(len(batches) - start)] == batches[start:]


def test_epochs_count_the_same_steps_and_resume_across_a_short_batch(task, causal, tmp_path):
    cfg = config(task, causal, batch_size=5, max_steps=None, epochs=2, eval_every=5)  # 32 examples: 7 steps an epoch
    saved = {}

    def keep(step, metrics, checkpoint):
        if step == 5:
            checkpoint.save(tmp_path / "ckpt")
            saved["step"] = step

    full = train(cfg, causal, callback=keep)
    assert full.steps == 14 and saved == {"step": 5}
    resumed = train(cfg, causal, resume=TrainCheckpoint.load(tmp_path / "ckpt"))
    torch.testing.assert_close(resumed.tuned, full.tuned, atol=1e-6, rtol=1e-5)


def test_init_from_stored_vectors(task, causal, tmp_path):
    store = VectorStore(tmp_path / "store")
    source = train(config(task, causal), causal)
    vector_id = store.put(source.vector(causal.backbone_id))
    tuned = train(config(task, causal, seed=5, max_steps=1, lr=1e-9, init=InitSpec(kind="tuned", vector_ids=[vector_id])), causal, store)
    # SPoT: starts from the source's own tuned prompt (origin seed 0 + tau), whatever this run's origin
    torch.testing.assert_close(tuned.tuned, source.tuned, atol=1e-5, rtol=1e-4)
    spec = {"terms": [{"task": task, "weight": 1.0}]}
    composed = train(config(task, causal, seed=5, max_steps=1, lr=1e-9, init=InitSpec(kind="composition", composition=spec)), causal, store)
    cross_origin = make_origin(causal, 4, 5) + source.vector(causal.backbone_id).tensor
    torch.testing.assert_close(composed.tuned, cross_origin, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="pass a store"):
        train(config(task, causal, init=InitSpec(kind="tuned", vector_ids=[vector_id])), causal)
    with pytest.raises(ValueError, match="needs a composition"):
        InitSpec(kind="composition")


def test_peft_export_loads_in_peft_and_imports_back(task, causal, tmp_path):
    peft = pytest.importorskip("peft")
    result = train(config(task, causal), causal)
    folder = export_peft(result.tuned, causal, tmp_path / "adapter")
    from transformers import AutoModelForCausalLM

    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(causal.config.model), folder)
    model = model.to(causal.device, causal.dtype)
    ids = causal.tokenizer("review: great fun sentiment:", return_tensors="pt")["input_ids"].to(causal.device)
    ours = torch.cat([result.tuned.unsqueeze(0).to(causal.device, causal.dtype), causal.embed(ids)], 1)
    with torch.no_grad():
        expected = causal.model(inputs_embeds=ours).logits[:, -1].float()
        got = model(input_ids=ids).logits[:, -1].float()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    back = import_peft(folder, causal, task, origin_seed=0)
    torch.testing.assert_close(back.tensor, result.vector(causal.backbone_id).tensor, atol=1e-6, rtol=1e-6)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(PeftAdapterError, match="safetensors"):
        read_peft_prompt(folder)


def test_composer_with_real_origins(task, causal, tmp_path):
    store = VectorStore(tmp_path / "store")
    vec = train(config(task, causal), causal).vector(causal.backbone_id)
    store.put(vec)
    composer = Composer(store, lambda length, seed: make_origin(causal, length, seed))
    prompt = composer.compose({"backbone_id": causal.backbone_id, "terms": [{"vector_id": vec.vector_id, "weight": 0.5}],
                               "origin_seed": 9, "prompt_length": 4})
    torch.testing.assert_close(prompt, make_origin(causal, 4, 9) + 0.5 * vec.tensor)
