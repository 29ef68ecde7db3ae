"""Decoding from cached prompt keys/values (tpv.generate) against the uncached reference: transformers' own
`generate` over the whole [prompt][source] embedding, recomputing the prompt, as tpv generated before."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_sharp_causal

from tpv.backbone import Backbone, BackboneConfig
from tpv.generate import SamplingParams, complete, decode
from tpv.prompt import make_origin

SOURCES = ["the movie was great", "boring and a waste of time, the film was terrible", "what is the capital?", ""]


@pytest.fixture(scope="module")
def causal(tmp_path_factory) -> Backbone:
    path = build_sharp_causal(tmp_path_factory.mktemp("models") / "sharp-llama")
    return Backbone.load(BackboneConfig(model=str(path), dtype="float32"))


@pytest.fixture(scope="module")
def t5(tiny_t5_path) -> Backbone:
    return Backbone.load(BackboneConfig(model=str(tiny_t5_path), dtype="float32"))


def reference_tokens(bb: Backbone, prompt: torch.Tensor, source: str, max_new: int) -> list[int]:
    """transformers' greedy `generate` on one row: the soft prompt embedded with the source, nothing cached."""
    ids = bb.tokenizer(source, add_special_tokens=bb.is_seq2seq)["input_ids"]
    ids = (bb.bos_ids + ids) if not bb.is_seq2seq else ids
    embeds = torch.cat([prompt.unsqueeze(0), bb.embed(torch.tensor([ids], dtype=torch.long))], 1)
    out = bb.model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                            max_new_tokens=max_new, do_sample=False, pad_token_id=bb.pad_id, eos_token_id=bb.eos_id)
    tokens = out[0].tolist()[1:] if bb.is_seq2seq else out[0].tolist()  # seq2seq: after the decoder start token
    return tokens[: tokens.index(bb.eos_id)] if bb.eos_id in tokens else tokens


def test_greedy_from_cached_prefixes_equals_uncached_reference_mixed_lengths(causal):
    """Rows of four compositions with three prompt lengths and sources of different lengths (one empty) share one
    loop, each started from its own 1-row cached prefix; every row's tokens equal the uncached reference."""
    prompts = [make_origin(causal, n, seed) for seed, n in enumerate((4, 7, 4, 9))]
    prefixes = [causal.prefix(p.unsqueeze(0)) for p in prompts]
    max_new = 12
    params = [SamplingParams(max_new_tokens=max_new)] * len(SOURCES)
    done = complete(causal, causal.start_decoding(prefixes, SOURCES), params)
    assert len({c.text for c in done}) == len(done)  # the rows' texts differ: the comparison below can fail
    for prompt, source, got in zip(prompts, SOURCES, done):
        ref = reference_tokens(causal, prompt, source, max_new)
        assert got.token_ids == ref
        assert got.text == causal.tokenizer.decode(ref, skip_special_tokens=True)
        assert got.finish_reason == ("length" if len(ref) == max_new else "stop")
    assert [c.prompt_tokens for c in done] == [len(causal.tokenizer(s)["input_ids"]) for s in SOURCES]


def test_seq2seq_greedy_equals_reference_mixed_lengths(t5):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randn(n, t5.hidden_size, generator=g) * 10 for n in (4, 6, 3)]  # * 10: varied outputs
    done = complete(t5, t5.start_decoding(prompts, SOURCES[:3]), [SamplingParams(max_new_tokens=6)] * 3)
    assert len({tuple(c.token_ids) for c in done}) > 1
    for prompt, source, got in zip(prompts, SOURCES, done):
        assert got.token_ids == reference_tokens(t5, prompt, source, 6)


def test_rows_leave_the_batch_and_each_row_equals_itself_alone(causal):
    prompt = make_origin(causal, 5, 1)
    prefix = causal.prefix(prompt.unsqueeze(0))
    params = [SamplingParams(max_new_tokens=n) for n in (2, 9, 5)]
    decoding = causal.start_decoding([prefix] * 3, SOURCES[:3])
    sizes = []
    step = decoding.step

    def counting(tokens):
        sizes.append(len(tokens))
        return step(tokens)

    decoding.step = counting
    together = complete(causal, decoding, params)
    assert sizes[0] == 3 and sizes[-1] == 1 and sizes == sorted(sizes, reverse=True)
    for source, p, got in zip(SOURCES, params, together):
        alone = complete(causal, causal.start_decoding(prefix, [source]), [p])[0]
        assert got == alone


def test_seq2seq_rows_leave_the_batch_and_each_equals_itself_alone(t5):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randn(n, t5.hidden_size, generator=g) * 10 for n in (4, 5, 4)]
    params = [SamplingParams(max_new_tokens=n) for n in (2, 7, 4)]
    together = complete(t5, t5.start_decoding(prompts, SOURCES[:3]), params)
    assert [len(c.token_ids) for c in together] == [2, 7, 4]
    for prompt, source, p, got in zip(prompts, SOURCES, params, together):
        assert got == complete(t5, t5.start_decoding(prompt.unsqueeze(0), [source]), [p])[0]


def test_stop_strings_end_the_text_before_them_even_when_streamed(causal):
    prompt = causal.prefix(make_origin(causal, 5, 1).unsqueeze(0))
    free = complete(causal, causal.start_decoding(prompt, SOURCES[:1]), [SamplingParams(max_new_tokens=16)])[0]
    assert len(free.text) > 6, free
    stop = free.text[4:7]  # a string the free text contains
    params = [SamplingParams(max_new_tokens=16, stop=("never-there", stop))]
    streamed = list(decode(causal, causal.start_decoding(prompt, SOURCES[:1]), params))
    text = "".join(d.text for news in streamed for d in news)
    assert text == free.text[: free.text.find(stop)]
    assert streamed[-1][-1].finish_reason == "stop"
    assert all(stop not in d.text for news in streamed for d in news)


def test_sampling_is_seeded_top_p_and_temperature_zero_is_greedy(causal):
    prompt = causal.prefix(make_origin(causal, 5, 1).unsqueeze(0))

    def run(**kw):
        return complete(causal, causal.start_decoding(prompt, SOURCES[:1]),
                        [SamplingParams(max_new_tokens=12, **kw)])[0].text

    greedy = run()
    assert run(temperature=1.5, seed=1) == run(temperature=1.5, seed=1)
    assert len({run(temperature=1.5, seed=s) for s in range(4)}) > 1
    assert run(temperature=1.5, top_p=1e-6, seed=3) == greedy  # only the most likely token stays
    assert run(temperature=0.0, seed=9) == greedy


def test_backbone_generate_uses_the_loop_and_checks_rows(causal):
    prompt = make_origin(causal, 5, 2)
    assert causal.generate(prompt, SOURCES[:2], 6) == [c.text.strip() for c in complete(
        causal, causal.start_decoding(prompt, SOURCES[:2]), [SamplingParams(max_new_tokens=6)] * 2)]
    with pytest.raises(ValueError, match="2 prompt prefixes for a batch of 3"):
        causal.start_decoding([causal.prefix(prompt.unsqueeze(0))] * 2, SOURCES[:3])
    with pytest.raises(ValueError, match="empty batch"):
        causal.start_decoding(prompt, [])
