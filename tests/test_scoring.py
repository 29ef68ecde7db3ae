"""Label scores against a full-logits reference: BOS placement, empty sources, labels that begin other labels.

The reference runs the plain HF model on the whole text, laid out as PEFT prompt tuning lays it out
(`[prompt] + tokenizer(source)` with the tokenizer's special tokens, then the label), and sums log-probs by hand.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_tiny_causal

from tpv.backbone import Backbone, BackboneConfig
from tpv.packed import recomputed_layers
from tpv.prompt import make_origin

SOURCES = ["the movie was great", "", "what is the capital of france?"]
# (labels, whether they are scored as complete strings, i.e. followed by EOS)
LABEL_SETS = [
    (["positive", "negative"], False),
    (["true story", "no", "what is"], False),
    (["true", "true story", "no"], True),  # 'true' begins 'true story'
]


@pytest.fixture(scope="module", params=["plain", "bos"])
def causal(request, tiny_causal_path, tmp_path_factory) -> Backbone:
    path = tiny_causal_path if request.param == "plain" else build_tiny_causal(tmp_path_factory.mktemp("bos") / "tiny-bos", bos=True)
    return Backbone.load(BackboneConfig(model=str(path), dtype="float32"))


def reference_score(bb: Backbone, prompt: torch.Tensor, source: str, label: str, end: bool) -> torch.Tensor:
    tok = bb.tokenizer
    src = tok(source)["input_ids"]  # with the tokenizer's own special tokens, as a PEFT user's input
    lab = tok(" " + label, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if end else [])
    embeds = torch.cat([prompt.unsqueeze(0), bb.embed(torch.tensor([src + lab]))], 1)
    logp = bb.model(inputs_embeds=embeds).logits.float().log_softmax(-1)[0]
    start = prompt.shape[0] + len(src)  # the position of the label's first token
    return sum(logp[start + j - 1, t] for j, t in enumerate(lab))


def test_bos_follows_the_tokenizer(causal):
    adds_bos = causal.tokenizer("a")["input_ids"][0] == causal.tokenizer.bos_token_id
    assert causal.bos_ids == ([causal.tokenizer.bos_token_id] if adds_bos else [])
    assert causal._source_ids(["", "great"])[0] == causal.bos_ids


@pytest.mark.parametrize("labels,end", LABEL_SETS)
def test_scores_match_full_logits(causal, labels, end):
    prompt = make_origin(causal, 5, seed=2)
    with torch.no_grad():
        ref = torch.tensor([[reference_score(causal, prompt, s, lab, end).item() for lab in labels] for s in SOURCES])
        plain = causal.score_labels(prompt, SOURCES, labels)
        cached = causal.score_labels(causal.prefix(prompt), SOURCES, labels)
    torch.testing.assert_close(plain, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cached, ref, atol=1e-4, rtol=1e-4)
    assert [ids[-1] == causal.eos_id for ids in causal.label_token_ids(labels)] == [end] * len(labels)


def test_only_empty_sources_in_a_prefix_batch(causal):
    prompt = make_origin(causal, 4, seed=1)
    with torch.no_grad():
        got = causal.score_labels(causal.prefix(prompt), ["", ""], ["positive", "negative"])
        ref = torch.tensor([[reference_score(causal, prompt, "", lab, False).item() for lab in ["positive", "negative"]]] * 2)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_a_label_that_begins_another_can_win(causal):
    """Without an end marker P(begins with 'true') >= P('true false') whatever the model, so the longer label could
    never win. A copy of the tiny model taught that 'true' is followed by ' false' then EOS must rank it first."""
    from transformers import AutoModelForCausalLM

    path = causal.config.model
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = causal.tokenizer
    text = tok("the movie was great")["input_ids"] + tok(" true false", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([text])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    taught = Backbone(model, tok, causal.config)
    with torch.no_grad():
        scores = taught.score_labels(make_origin(taught, 4, 0), ["the movie was great"], ["true", "true false"])
    assert scores.argmax().item() == 1


@pytest.mark.parametrize("recompute", [False, True], ids=["cached-tails", "recomputed-layers"])
@pytest.mark.parametrize("labels,end", LABEL_SETS)
def test_label_loss_trains_on_the_same_scores(causal, labels, end, recompute):
    """The loss and its gradient: multi-token labels run after each source's keys/values, one source pass; with
    layers recomputed in the backward pass (activation checkpointing) as (source, label) rows instead."""
    prompt = make_origin(causal, 4, seed=3).requires_grad_(True)
    gold = [1, 0, 2 % len(labels)]
    with recomputed_layers(causal, on=recompute):
        assert causal.recomputing is recompute
        loss = causal.label_loss(prompt, SOURCES, labels, gold)
        (grad,) = torch.autograd.grad(loss, prompt)
    assert not causal.recomputing
    ref = torch.stack([torch.stack([reference_score(causal, prompt, s, lab, end) for lab in labels]) for s in SOURCES])
    ref_loss = torch.nn.functional.cross_entropy(ref, torch.tensor(gold))
    (ref_grad,) = torch.autograd.grad(ref_loss, prompt)
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-3)
    assert grad.abs().sum() > 0


def test_lm_loss_matches_full_logits(causal):
    """The training loss: mean cross-entropy of target tokens + EOS after [prompt][BOS?][source]."""
    prompt = make_origin(causal, 4, seed=4)
    sources, targets = ["great fun", ""], ["positive", "no answer"]
    with torch.no_grad():
        tok = causal.tokenizer
        logps, count = 0.0, 0
        for s, t in zip(sources, targets):
            n = len(tok(" " + t, add_special_tokens=False)["input_ids"]) + 1
            logps += reference_score(causal, prompt, s, t, end=True).item()
            count += n
        got = causal.loss(prompt, sources, targets)
    torch.testing.assert_close(got, torch.tensor(-logps / count), atol=1e-4, rtol=1e-4)
