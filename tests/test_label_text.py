"""Labels are scored as the text they are: stripped, and tokenized jointly with the source, as a SentencePiece
tokenizer (Llama-2, Mistral) reads them, where a label tokenized alone after a space gains a spurious word-start token.

The reference is the full-sequence log-likelihood of the joint tokenization of `source + " " + label`: the plain
model on [prompt] + those tokens, summing the log-probabilities of the tokens after the ones the source alone has."""

from __future__ import annotations

import pytest
import torch
from tiny_models import CORPUS

from tpv.backbone import Backbone, BackboneConfig
from tpv.prompt import make_origin

SOURCES = ["review: the movie was great sentiment:", "review: a waste of time sentiment: ", "what is it? answer:"]
LABELS = ["positive", "negative", "true story"]


def build_sentencepiece_causal(path, split: bool):
    """A tiny Llama with a tokenizer laid out as Llama-2's tokenizer.json is: the text normalized to "▁" word-start
    marks with one prepended ("▁▁positive" for " positive"), then BPE; `split=True` splits at the marks first (no
    token spans two words), `split=False` lets merges cross them."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    if split:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(CORPUS + SOURCES, trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="</s>")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None, tie_word_embeddings=True)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Backbone.load(BackboneConfig(model=str(path), dtype="float32"))


@pytest.fixture(scope="module", params=[True, False], ids=["split", "merging"])
def sentencepiece(request, tmp_path_factory) -> Backbone:
    return build_sentencepiece_causal(tmp_path_factory.mktemp("sp") / "tiny-sp", split=request.param)


def joint_loglik(bb: Backbone, prompt: torch.Tensor, source: str, label: str) -> float:
    tok = bb.tokenizer
    joint = tok(source + " " + label, add_special_tokens=False)["input_ids"]
    alone = tok(source, add_special_tokens=False)["input_ids"]
    k = next((j for j, (a, b) in enumerate(zip(alone, joint)) if a != b), len(alone))
    logp = bb.model(inputs_embeds=torch.cat([prompt.unsqueeze(0), bb.embed(torch.tensor([joint]))], 1)
                    ).logits.float().log_softmax(-1)[0]
    start = prompt.shape[0]  # logp[start + j - 1] predicts joint token j
    return float(sum(logp[start + j - 1, joint[j]] for j in range(k, len(joint))))


def test_a_label_alone_gains_a_token_the_joint_text_has_not(sentencepiece):
    """The premise: " positive" alone is a lone word-start mark plus "▁positive"; in the text it is one token."""
    tok = sentencepiece.tokenizer
    alone = tok(" positive", add_special_tokens=False)["input_ids"]
    joint = tok(SOURCES[0] + " positive", add_special_tokens=False)["input_ids"]
    assert joint[: len(alone)] != alone and joint[-len(alone):] != alone


def test_scores_are_the_joint_tokenizations_log_likelihood(sentencepiece):
    prompt = make_origin(sentencepiece, 3, seed=1)
    with torch.no_grad():
        ref = torch.tensor([[joint_loglik(sentencepiece, prompt, s, lab) for lab in LABELS] for s in SOURCES])
        plain = sentencepiece.score_labels(prompt, SOURCES, LABELS)
        cached = sentencepiece.score_labels(sentencepiece.prefix(prompt), SOURCES, LABELS)
        spaced = sentencepiece.score_labels(prompt, SOURCES, [" positive ", "negative\n", " true story"])
    torch.testing.assert_close(plain, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cached, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(spaced, ref, atol=1e-4, rtol=1e-4)  # stray spaces: the same text, the same score
