"""Evaluation modes: rank (label likelihoods) and generate (the paper's: greedy text matched exactly), side by side,
and generation-scored tasks (SQuAD-style, MATH-style) on a tiny model whose greedy output is worked out by hand.

The oracle runs the model's own forward on [prompt embeddings][source embeddings][tokens so far], takes the argmax
of the last logits, and stops at EOS: no cache, no batching, none of tpv's decoding code.
"""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from tiny_models import build_sharp_causal

from tpv.backbone import Backbone, BackboneConfig
from tpv.evaluate import (
    EVAL_MODES,
    UNMATCHED,
    evaluate,
    evaluate_many,
    evaluate_modes,
    generated_metrics,
    label_scores,
    modes_for,
)
from tpv.errors import InvalidInput
from tpv.metrics import NO_ANSWER, compute_metric, normalize_answer
from tpv.prompt import make_origin
from tpv.tasks import TaskSpec, get_task, load_split, register_task, task_data_dir
from tpv.train import TrainConfig, train

NEW_TOKENS = 3
CANDIDATES = [
    "the movie was great", "a waste of time", "what is the capital?", "the film was terrible and boring",
    "premise hypothesis", "who wrote the book?", "business sport politics", "how many people live there?",
    "the acting was wonderful", "sentence label review", "news about the economy", "true false neither",
]


@pytest.fixture(scope="module")
def sharp(tmp_path_factory, tiny_causal_path) -> Backbone:
    """The tiny model with sharpened weights: its greedy text depends on the source (at random init it does not)."""
    path = build_sharp_causal(tmp_path_factory.mktemp("models") / "sharp-eval", base=tiny_causal_path)
    return Backbone.load(BackboneConfig(model=str(path), dtype="float32", device="cpu",
                                        max_target_tokens=NEW_TOKENS))


@torch.no_grad()
def greedy_by_hand(bb: Backbone, prompt: torch.Tensor, source: str, new_tokens: int = NEW_TOKENS) -> str:
    embed = bb.model.get_input_embeddings()
    ids = bb.tokenizer(source, add_special_tokens=False)["input_ids"]
    assert bb.bos_ids == [] and len(ids) < bb.config.max_source_tokens  # the source as the model reads it
    inputs = torch.cat([prompt.to(bb.dtype), embed(torch.tensor(ids, dtype=torch.long))])
    out: list[int] = []
    for _ in range(new_tokens):
        token = int(bb.model(inputs_embeds=inputs.unsqueeze(0)).logits[0, -1].argmax())
        if token == bb.tokenizer.eos_token_id:
            break
        out.append(token)
        inputs = torch.cat([inputs, embed(torch.tensor([token]))])
    return bb.tokenizer.decode(out, skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def prompt(sharp) -> torch.Tensor:
    return make_origin(sharp, 4, 0)


@pytest.fixture(scope="module")
def oracle(sharp, prompt) -> dict[str, str]:
    """Candidate source -> its hand-computed greedy text, for the sources whose text is plain, distinct words (usable
    as label words and SQuAD/MATH answers: ASCII, no braces, something left after SQuAD's normalisation)."""
    found: dict[str, str] = {}
    for source in CANDIDATES:
        text = greedy_by_hand(sharp, prompt, source)
        plain = text.isascii() and text.isprintable() and not set(text) & set("{}$\\")
        if plain and normalize_answer(text) and text not in found.values() and text != NO_ANSWER:
            found[source] = text
    assert len(found) >= 3, f"the sharp model gave too few usable texts: {found}"
    return found


def classification_task(labels: list[str], metric: str = "macro_f1") -> TaskSpec:
    return TaskSpec(name="tiny_generated_labels", template="{text}", labels=labels, metric=metric)


def test_generate_mode_matches_the_hand_computed_greedy_text(sharp, prompt, oracle):
    (a, text_a), (b, text_b), (c, _) = list(oracle.items())[:3]
    task = classification_task([text_a, text_b])
    # right (a -> label 0), right (b -> 1), wrong (a generates label 0, gold 1), no label at all (c)
    rows = [(a, 0), (b, 1), (a, 1), (c, 0)]
    examples = [task.example({"text": s, "label": y}) for s, y in rows]
    found = evaluate(sharp, prompt, task, examples, mode="generate")
    assert sharp.generate(prompt, [s for s, _ in rows], NEW_TOKENS) == [oracle[s] for s, _ in rows]
    assert found["accuracy"] == found["exact_match"] == 0.5
    assert found["unmatched"] == 0.25
    # macro-F1 over classes 0, 1 and the stray prediction: (2/(2+1+1) + 2/(2+0+1) + 0) / 3
    assert found["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0) / 3)
    preds = [0, 1, 0, UNMATCHED]
    assert found["macro_f1"] == compute_metric("macro_f1", preds, [y for _, y in rows])
    assert "label_logprob" not in found  # a rank-mode quantity


def test_rank_and_generate_side_by_side(sharp, prompt, oracle):
    (a, text_a), (b, text_b), (c, _) = list(oracle.items())[:3]
    task = classification_task([text_a, text_b], metric="accuracy")
    examples = [task.example({"text": s, "label": y}) for s, y in [(a, 0), (b, 1), (a, 1), (c, 0), (b, 0)]]
    both = evaluate_modes(sharp, prompt, task, examples)
    assert list(both) == list(EVAL_MODES) == ["rank", "generate"] == list(modes_for(task))
    assert both["generate"] == evaluate(sharp, prompt, task, examples, mode="generate")
    assert both["rank"] == evaluate(sharp, prompt, task, examples)  # rank stays the default
    generated = [oracle[e.source] for e in examples]
    assert both["generate"]["accuracy"] == sum(g == e.target for g, e in zip(generated, examples)) / len(examples)
    scores = label_scores(sharp, prompt, [e.source for e in examples], task.labels)
    ranked = scores.argmax(dim=1).tolist()
    assert both["rank"]["accuracy"] == sum(p == e.label for p, e in zip(ranked, examples)) / len(examples)
    assert "label_logprob" in both["rank"] and "unmatched" not in both["rank"]
    # per-prompt modes in one call are what each mode gives alone
    assert evaluate_many(sharp, [prompt, prompt], [task, task], [examples, examples],
                         modes=["generate", "rank"]) == [both["generate"], both["rank"]]


def test_unknown_modes_are_refused(sharp, prompt, oracle):
    (a, text_a), (b, text_b) = list(oracle.items())[:2]
    task = classification_task([text_a, text_b])
    examples = [task.example({"text": a, "label": 0})]
    with pytest.raises(InvalidInput, match="unknown evaluation mode 'beam'"):
        evaluate(sharp, prompt, task, examples, mode="beam")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="1 evaluation modes for 2 prompts"):
        evaluate_many(sharp, [prompt, prompt], [task, task], [examples, examples], modes=["rank"])
    with pytest.raises(ValidationError, match="eval_mode"):
        TrainConfig(task="x", eval_mode="beam")


def register_text_task(name: str, template: str, metric: str, rows: list[dict]) -> TaskSpec:
    """A user task without labels, its rows (template fields + `target`) as prepared JSONL splits."""
    spec = register_task(TaskSpec(name=name, template=template, metric=metric), overwrite=True)
    folder = task_data_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "meta.json").write_text(json.dumps({"task": name}))
    return spec


@pytest.fixture(scope="module")
def squad_task(oracle) -> TaskSpec:
    (a, text_a), (b, _), (c, text_c) = list(oracle.items())[:3]
    # answered exactly; 'unanswerable' while the model answers; the answer plus a word the model did not say
    rows = [{"question": a, "target": text_a}, {"question": b, "target": NO_ANSWER},
            {"question": c, "target": f"{text_c} zebra"}]
    return register_text_task("tiny_squad", "{question}", "squad_f1", rows)


@pytest.fixture(scope="module")
def math_task(oracle) -> TaskSpec:
    (a, text_a), (b, _) = list(oracle.items())[:2]
    rows = [{"problem": a, "target": f"So the answer is $\\boxed{{{text_a}}}$."},
            {"problem": b, "target": "We add: $3 + 4 = \\boxed{7}$."}]
    return register_text_task("tiny_math", "{problem}", "math_exact", rows)


def test_squad_style_task_scores_its_generations(sharp, prompt, oracle, squad_task):
    examples = load_split(squad_task.name, "test")
    assert [e.label for e in examples] == [e.target for e in examples]  # the answer text is the reference
    generated = [greedy_by_hand(sharp, prompt, e.source) for e in examples]
    assert modes_for(squad_task) == ("generate",)
    found = evaluate(sharp, prompt, squad_task, examples, mode="generate")
    assert found == evaluate(sharp, prompt, squad_task, examples, mode="rank")  # nothing to rank: generated anyway
    assert evaluate_modes(sharp, prompt, squad_task, examples) == {"generate": found}
    refs = [e.label for e in examples]
    assert found == {"squad_f1": compute_metric("squad_f1", generated, refs),
                     "squad_em": compute_metric("squad_em", generated, refs)}
    words = len(normalize_answer(generated[2]).split())
    assert found["squad_em"] == pytest.approx(1 / 3)
    assert found["squad_f1"] == pytest.approx((1 + 0 + 2 * words / (2 * words + 1)) / 3)


def test_math_style_task_scores_the_final_answer(sharp, prompt, oracle, math_task):
    examples = load_split(math_task.name, "test")
    generated = [greedy_by_hand(sharp, prompt, e.source) for e in examples]
    found = evaluate(sharp, prompt, math_task, examples, mode="generate")
    assert found == {"math_exact": compute_metric("math_exact", generated, [e.label for e in examples])} == {
        "math_exact": 0.5}


def test_regression_reports_both_correlations(sharp, prompt, oracle):
    task = TaskSpec(name="tiny_similarity", template="{text}", metric="pearson")
    examples = [task.example({"text": s, "label": float(i)}) for i, s in enumerate(oracle)]
    found = evaluate(sharp, prompt, task, examples, mode="generate")
    assert set(found) == {"pearson", "spearman", "parse_failures"}
    texts = ["1.5", "0.5 is it", "nonsense", "4."]
    refs = [1.0, 2.0, 3.0, 4.0]
    rows = [task.example({"text": "x", "label": r}) for r in refs]
    values = [1.5, 0.5, 2.5, 4.0]  # the unparsable answer counts as the mean of the references
    assert generated_metrics(task, texts, rows) == {
        "pearson": compute_metric("pearson", values, refs), "spearman": compute_metric("spearman", values, refs),
        "parse_failures": 1.0}
    assert compute_metric("spearman", values, refs) == pytest.approx(0.8)  # ranks 2,1,3,4 against 1,2,3,4


def test_label_loss_on_a_task_without_labels_is_refused_at_config_time(squad_task):
    with pytest.raises(ValidationError, match="loss 'label' needs a classification task; 'tiny_squad' has no label"):
        TrainConfig(task=squad_task.name, loss="label")
    assert TrainConfig(task=squad_task.name, loss="lm").loss == "lm"


def test_training_a_squad_style_task_selects_on_its_generated_metric(sharp, squad_task):
    cfg = TrainConfig(task=squad_task.name, backbone=BackboneConfig(model=sharp.config.model, device="cpu",
                      max_target_tokens=NEW_TOKENS), prompt_length=4, lr=0.3, warmup_steps=1, batch_size=3,
                      max_steps=2, eval_every=1, eval_examples=None, progress=False)
    result = train(cfg, sharp)
    assert [h["step"] for h in result.history] == [1, 2]
    assert all({"squad_f1", "squad_em"} <= set(h) for h in result.history)
    assert result.metrics["squad_f1"] == max(h["squad_f1"] for h in result.history)
    dev = load_split(squad_task.name, "validation")
    assert result.metrics["squad_f1"] == evaluate(sharp, result.tuned, get_task(squad_task.name), dev)["squad_f1"]


@pytest.fixture(scope="module")
def generated_label_task(oracle) -> TaskSpec:
    """A classification task whose label words are texts the sharp model generates, so generate mode can score."""
    (a, text_a), (b, text_b), (c, _) = list(oracle.items())[:3]
    rows = [{"text": a, "label": 0}, {"text": b, "label": 1}, {"text": c, "label": 1}, {"text": a, "label": 1}]
    spec = register_task(TaskSpec(name="tiny_generated", template="{text}", labels=[text_a, text_b],
                                  metric="accuracy"), overwrite=True)
    folder = task_data_dir(spec.name)
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "meta.json").write_text(json.dumps({"task": spec.name}))
    return spec


def test_training_can_select_on_the_generated_metric(sharp, generated_label_task):
    cfg = TrainConfig(task=generated_label_task.name, backbone=BackboneConfig(model=sharp.config.model, device="cpu",
                      max_target_tokens=NEW_TOKENS), prompt_length=4, lr=0.3, warmup_steps=1, batch_size=4,
                      max_steps=2, eval_every=1, eval_examples=None, progress=False, eval_mode="generate")
    result = train(cfg, sharp)
    assert all({"exact_match", "unmatched"} <= set(h) and "label_logprob" not in h for h in result.history)
    dev = load_split(generated_label_task.name, "validation")
    assert result.metrics["accuracy"] == evaluate(sharp, result.tuned, generated_label_task, dev,
                                                  mode="generate")["accuracy"]
