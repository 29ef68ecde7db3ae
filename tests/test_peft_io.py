"""PEFT interop on tiny real models: an exported adapter loads on its own and PEFT computes what tpv computes.

The BOS variant checks the input layout: PEFT prompt tuning runs `[virtual tokens] + tokenizer(text)`, so with a
tokenizer that adds BOS the BOS sits between the prompt and the text, and tpv must put it there too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import build_tiny_causal

from tpv.backbone import Backbone, BackboneConfig
from tpv.peft_io import PeftAdapterError, export_peft, import_peft, read_peft_prompt
from tpv.prompt import make_origin

peft = pytest.importorskip("peft")

SOURCE = "review: the movie was great sentiment:"


@pytest.fixture(scope="module", params=["plain", "bos"])
def causal(request, tiny_causal_path, tmp_path_factory) -> Backbone:
    path = tiny_causal_path if request.param == "plain" else build_tiny_causal(tmp_path_factory.mktemp("bos") / "tiny-bos", bos=True)
    return Backbone.load(BackboneConfig(model=str(path), dtype="float32"))


@pytest.fixture(scope="module")
def t5(tiny_t5_path) -> Backbone:
    return Backbone.load(BackboneConfig(model=str(tiny_t5_path), dtype="float32"))


def tuned_prompt(backbone: Backbone) -> torch.Tensor:
    """An origin moved off the vocabulary (as a trained prompt is), so a misplaced prompt cannot go unnoticed."""
    noise = torch.randn(5, backbone.hidden_size, generator=torch.Generator().manual_seed(0))
    return make_origin(backbone, 5, 1) + 0.5 * noise


def peft_label_scores(model, tok, source: str, labels: list[str]) -> torch.Tensor:
    """Sum of the label tokens' log-probs from PEFT's own forward on the full text."""
    src = tok(source)["input_ids"]
    out = []
    for label in labels:
        lab = tok(" " + label, add_special_tokens=False)["input_ids"]
        logp = model(input_ids=torch.tensor([src + lab])).logits.float().log_softmax(-1)[0]
        start = model.active_peft_config.num_virtual_tokens + len(src)
        out.append(sum(logp[start + j - 1, t] for j, t in enumerate(lab)))
    return torch.stack(out).unsqueeze(0)


def test_exported_adapter_loads_alone_and_matches_tpv(causal, tmp_path):
    prompt = tuned_prompt(causal)
    folder = export_peft(prompt, causal, tmp_path / "adapter")
    base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str(Path(causal.config.model).resolve())
    model = peft.AutoPeftModelForCausalLM.from_pretrained(folder).eval()
    tok = causal.tokenizer
    labels = ["positive", "negative", "true story"]
    with torch.no_grad():
        expected = peft_label_scores(model, tok, SOURCE, labels)
        torch.testing.assert_close(causal.score_labels(prompt, [SOURCE], labels), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(causal.score_labels(causal.prefix(prompt), [SOURCE], labels), expected, atol=1e-4, rtol=1e-4)
        # the training loss: PEFT's mean cross-entropy over target + EOS, source masked
        src, tgt = tok(SOURCE)["input_ids"], tok(" positive", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([src + tgt])
        peft_loss = model(input_ids=ids, labels=torch.tensor([[-100] * len(src) + tgt])).loss
        torch.testing.assert_close(causal.loss(prompt, [SOURCE], ["positive"]), peft_loss, atol=1e-4, rtol=1e-4)
        # greedy generation
        out = model.generate(input_ids=torch.tensor([src]), max_new_tokens=4, do_sample=False,
                             pad_token_id=causal.pad_id, eos_token_id=causal.eos_id)
        text = tok.decode(out[0, len(src):], skip_special_tokens=True).strip()
        assert causal.generate(prompt, [SOURCE], max_new_tokens=4) == [text]


def test_export_names_a_folder_that_loads_from_anywhere(tiny_causal_path, tmp_path, monkeypatch):
    """A backbone named relatively (like a bundled name) still exports the absolute folder PEFT can load."""
    monkeypatch.chdir(tiny_causal_path.parent)
    backbone = Backbone.load(BackboneConfig(model=tiny_causal_path.name, dtype="float32"))
    folder = export_peft(tuned_prompt(backbone), backbone, tmp_path / "adapter")
    base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str(tiny_causal_path.resolve())
    monkeypatch.chdir(tmp_path)
    assert isinstance(peft.AutoPeftModelForCausalLM.from_pretrained(folder), peft.PeftModel)


def test_round_trip_and_bad_folders(causal, tmp_path):
    prompt = tuned_prompt(causal)
    folder = export_peft(prompt, causal, tmp_path / "adapter")
    torch.testing.assert_close(read_peft_prompt(folder), prompt)
    vector = import_peft(folder, causal, "some_task", origin_seed=1)
    torch.testing.assert_close(vector.tensor, prompt - make_origin(causal, 5, 1))
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "num_virtual_tokens": 4}))
    with pytest.raises(PeftAdapterError, match="not num_virtual_tokens=4 rows"):
        read_peft_prompt(folder)
    (folder / "adapter_config.json").write_text(json.dumps({**config, "task_type": "SEQ_2_SEQ_LM"}))
    with pytest.raises(PeftAdapterError, match="needs CAUSAL_LM"):
        import_peft(folder, causal, "some_task", origin_seed=1)


def _peft_seq2seq(t5: Backbone, folder, **config):
    from transformers import AutoModelForSeq2SeqLM

    base = AutoModelForSeq2SeqLM.from_pretrained(t5.config.model)
    cfg = peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4, **config)
    model = peft.get_peft_model(base, cfg)
    with torch.no_grad():  # a prompt unlike PEFT's random init, so the comparison below means something
        model.prompt_encoder["default"].embedding.weight.normal_(generator=torch.Generator().manual_seed(0))
    model.save_pretrained(folder)
    return model.eval()


def test_seq2seq_adapter_with_a_decoder_prompt_is_refused(t5, tmp_path):
    _peft_seq2seq(t5, tmp_path / "two")  # PEFT's default for seq2seq: encoder and decoder prompts, 8 rows
    with pytest.raises(PeftAdapterError, match="num_transformer_submodules=2"):
        import_peft(tmp_path / "two", t5, "some_task", origin_seed=0)


def test_seq2seq_encoder_only_adapter_imports_and_scores_as_peft(t5, tiny_causal_path, tmp_path):
    model = _peft_seq2seq(t5, tmp_path / "one", num_transformer_submodules=1)
    prompt = read_peft_prompt(tmp_path / "one")
    torch.testing.assert_close(prompt, model.get_prompt_embedding_to_save("default"))
    tok = t5.tokenizer
    label = tok("positive")["input_ids"]
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([tok(SOURCE)["input_ids"]]), labels=torch.tensor([label])).logits.log_softmax(-1)[0]
        expected = sum(logp[j, t] for j, t in enumerate(label))
        got = t5.score_labels(prompt, [SOURCE], ["positive"])[0, 0]
    torch.testing.assert_close(got, expected.float(), atol=1e-4, rtol=1e-4)
    with pytest.raises(PeftAdapterError, match="needs CAUSAL_LM"):
        import_peft(tmp_path / "one", Backbone.load(BackboneConfig(model=str(tiny_causal_path))), "t", 0)
