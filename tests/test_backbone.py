"""The one forward path: per-row prompts, prefix reuse, scoring against a naive reference, generation."""

from __future__ import annotations

import pytest
import torch

from tpv.backbone import Backbone, BackboneConfig, PromptPrefix
from tpv.bundled import BackboneNotFound
from tpv.prompt import SoftPrompt, make_origin, origin_token_ids

SOURCES = ["the movie was great", "boring and a waste of time", "what is the capital of france?"]


@pytest.fixture(scope="module")
def causal(tiny_causal_path) -> Backbone:
    return Backbone.load(BackboneConfig(model=str(tiny_causal_path), dtype="float32"))  # exact comparisons on GPU too


@pytest.fixture(scope="module")
def t5(tiny_t5_path) -> Backbone:
    return Backbone.load(BackboneConfig(model=str(tiny_t5_path), dtype="float32"))


def naive_label_loglik(bb: Backbone, prompt: torch.Tensor, source: str, label: str) -> float:
    """Full logits over every position from the plain HF forward: what the fast path must agree with."""
    tok = bb.tokenizer
    if bb.is_seq2seq:
        ids = torch.tensor([tok(source)["input_ids"]])
        embeds = torch.cat([prompt.unsqueeze(0), bb.embed(ids)], 1)
        labels = torch.tensor([tok(label)["input_ids"]], device=bb.device)
        logp = bb.model(inputs_embeds=embeds, labels=labels).logits.log_softmax(-1)[0]
        return sum(logp[j, t].item() for j, t in enumerate(labels[0].tolist()))
    src = tok(source, add_special_tokens=False)["input_ids"]
    lab = tok(" " + label, add_special_tokens=False)["input_ids"]
    embeds = torch.cat([prompt.unsqueeze(0), bb.embed(torch.tensor([src + lab]))], 1)
    logp = bb.model(inputs_embeds=embeds).logits.log_softmax(-1)[0]
    start = prompt.shape[0] + len(src)
    return sum(logp[start + j - 1, t].item() for j, t in enumerate(lab))


@pytest.mark.parametrize("which", ["causal", "t5"])
@pytest.mark.parametrize("labels", [["positive", "negative", "neutral"], ["true story", "no", "what is"]])
def test_label_scores_match_full_logits(which, labels, request):
    bb = request.getfixturevalue(which)
    origin = make_origin(bb, 6, seed=3)
    origin = origin.to(bb.device)
    with torch.no_grad():
        fast = bb.score_labels(origin, SOURCES, labels)
        ref = torch.tensor([[naive_label_loglik(bb, origin, s, lab) for lab in labels] for s in SOURCES])
    assert fast.shape == (len(SOURCES), len(labels))
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("labels", [["positive", "negative"], ["true story", "no"]])
def test_prefix_matches_full_forward_and_mixes_rows(causal, labels):
    a, b = make_origin(causal, 5, 0), make_origin(causal, 5, 1)
    per_row = torch.stack([a, b, a])
    full = causal.score_labels(per_row, SOURCES, labels)
    mixed = PromptPrefix.cat([causal.prefix(a), causal.prefix(b)]).select(torch.tensor([0, 1, 0]))
    torch.testing.assert_close(causal.score_labels(mixed, SOURCES, labels), full, atol=1e-4, rtol=1e-4)
    alone = causal.score_labels(b, SOURCES[1:2], labels)
    torch.testing.assert_close(full[1:2], alone, atol=1e-5, rtol=1e-5)
    broadcast = causal.score_labels(causal.prefix(a), SOURCES, labels)
    torch.testing.assert_close(broadcast[[0, 2]], full[[0, 2]], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("which", ["causal", "t5"])
def test_backbone_frozen_only_prompt_gets_gradients(which, request):
    bb = request.getfixturevalue(which)
    assert not any(p.requires_grad for p in bb.model.parameters())
    prompt = SoftPrompt(make_origin(bb, 4, 0))
    loss = bb.loss(prompt(), SOURCES[:2], ["positive", "negative"])
    loss.backward()
    assert torch.isfinite(loss) and prompt.weight.grad is not None and prompt.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in bb.model.parameters())


@pytest.mark.parametrize("which", ["causal", "t5"])
def test_generate_per_row_prompts(which, request):
    bb = request.getfixturevalue(which)
    a, b = make_origin(bb, 4, 0), make_origin(bb, 4, 7)
    together = bb.generate(torch.stack([a, b]), SOURCES[:2], max_new_tokens=4)
    assert together == [bb.generate(a, SOURCES[:1], 4)[0], bb.generate(b, SOURCES[1:2], 4)[0]]


def test_origin_is_reproducible_and_seeded(causal):
    assert torch.equal(make_origin(causal, 8, 5), make_origin(causal, 8, 5))
    assert not torch.equal(make_origin(causal, 8, 5), make_origin(causal, 8, 6))
    ids = origin_token_ids(1000, 0, vocab_size=50_000)
    assert int(ids.max()) < 5000 and torch.equal(ids, origin_token_ids(1000, 0, vocab_size=50_000))
    assert make_origin(causal, 8, 5).dtype == torch.float32


def test_bad_inputs_raise_clear_errors(causal, t5, tmp_path):
    with pytest.raises(ValueError, match="prompts must be"):
        causal.score_labels(torch.zeros(3, 5, causal.hidden_size + 1), SOURCES, ["a", "b"])
    with pytest.raises(ValueError, match="2 prompts for a batch of 3"):
        causal.score_labels(torch.zeros(2, 5, causal.hidden_size), SOURCES, ["a", "b"])
    with pytest.raises(ValueError, match="causal"):
        t5.prefix(make_origin(t5, 4, 0))
    with pytest.raises(ValueError, match="prompt length"):
        make_origin(causal, 0, 0)
    with pytest.raises(BackboneNotFound, match="neither a bundled model"):
        Backbone.load(BackboneConfig(model=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="finite"):
        SoftPrompt(torch.full((2, 3), float("nan")))


def test_a_stored_vector_is_scored_on_inputs_cut_as_in_its_training_run():
    trained = {"backbone": {"model": "elsewhere", "max_source_tokens": 64}, "lr": 0.03}
    assert BackboneConfig.as_trained("here", trained) == BackboneConfig(model="here", max_source_tokens=64)
    assert BackboneConfig.as_trained("here", trained, max_source_tokens=32).max_source_tokens == 32
    assert BackboneConfig.as_trained("here", {"lr": 0.03}) == BackboneConfig(model="here")
