"""End to end on the real bundled SmolLM2-135M: prepare it, train a few steps, store, compose, score, generate."""

from __future__ import annotations

import time

import pytest
import torch

from task_data import argmax_accuracy
from test_train import write_sentiment_task
from tpv.backbone import Backbone
from tpv.bundled import DEFAULT_BACKBONE, resolve_model_path
from tpv.compose import Composer
from tpv.evaluate import evaluate
from tpv.prompt import make_origin
from tpv.store import VectorStore
from tpv.tasks import get_task, load_split
from tpv.train import TrainConfig, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol() -> Backbone:
    return Backbone.load(DEFAULT_BACKBONE)


def test_prepared_copy_reloads_fast(smol):
    folder = resolve_model_path(DEFAULT_BACKBONE)
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    start = time.perf_counter()
    again = Backbone.load(DEFAULT_BACKBONE)
    assert time.perf_counter() - start < 5.0  # the GGUF dequantization (~20 s) happens once, not per load
    ids = smol.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids).logits, smol.model(ids).logits)
    assert smol.backbone_id == DEFAULT_BACKBONE and smol.hidden_size == 576 and not smol.is_seq2seq


def test_train_store_compose_score_on_the_real_model(smol, tmp_path):
    task = write_sentiment_task(tmp_path, "real_model_sentiment")
    config = TrainConfig(task=task, prompt_length=8, lr=0.3, warmup_steps=1, batch_size=4, max_steps=6,
                         eval_every=3, eval_examples=None, progress=False)
    result = train(config, smol)
    labels = get_task(task).labels
    rows = load_split(task, "validation")
    assert result.steps == 6 and result.metrics["accuracy"] == pytest.approx(argmax_accuracy(
        smol, result.tuned, [e.source for e in rows], [labels[e.label] for e in rows], labels))
    store = VectorStore(tmp_path / "store")
    vector_id = store.put(result.vector(smol.backbone_id))
    stored = store.get(vector_id)
    assert stored.meta.backbone_id == DEFAULT_BACKBONE and stored.shape == (8, 576)

    composer = Composer(store, lambda length, seed: make_origin(smol, length, seed))
    prompt = composer.compose({"backbone_id": smol.backbone_id, "terms": [{"task": task}], "origin_seed": 0, "prompt_length": 8})
    torch.testing.assert_close(prompt, result.tuned, atol=1e-5, rtol=1e-5)  # own origin + tau = the tuned prompt
    metrics = evaluate(smol, prompt, get_task(task), load_split(task, "test"))
    assert metrics["accuracy"] == pytest.approx(result.metrics["accuracy"])
    prefix_scores = smol.score_labels(smol.prefix(prompt), ["review: great fun sentiment:"], ["negative", "positive"])
    plain_scores = smol.score_labels(prompt, ["review: great fun sentiment:"], ["negative", "positive"])
    torch.testing.assert_close(prefix_scores, plain_scores, atol=1e-4, rtol=1e-4)
    assert isinstance(smol.generate(prompt, ["review: great fun sentiment:"], 3)[0], str)
