"""Throughput of one tpv prompt-tuning step vs PEFT's PromptTuning on the same model, batch and prompt length.

Both sides train the same soft prompt shape on the same examples with AdamW; the runs alternate in one process so
machine noise hits both alike. PEFT computes logits over every position and the whole vocabulary; tpv only at the
target positions, and it runs each prompt's positions once per step for all rows (`tpv.packed.pass_prompts`). A
third side is tpv with the prompt carried through the model on every row, as PEFT does (and tpv did before). Last line:
{"tpv_vs_peft_step_throughput": R, "prompt_once_vs_per_row": P, ...} (examples/s ratios, > 1 means tpv is faster;
the median over rounds of each round's ratio of the seconds per step in `tpv_s`, `peft_s`, `per_row_s`).

    python bench/train_step.py [--backbone smollm2-135m-instruct] [--batch 8] [--prompt-length 20] [--rounds 5]
                               [--prompts K]    # K prompts in one tpv step (a pack) vs K PEFT steps
    python bench/train_step.py --smoke                # CI: one round of one step on a batch of 2 (add --backbone)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from grid_args import parse_with_smoke

from tpv.backbone import Backbone, BackboneConfig
from tpv.packed import pass_prompts
from tpv.prompt import SoftPrompt, make_origin

SOURCES = [
    "Review: a gripping, beautifully acted story that stays with you long after the credits. Sentiment:",
    "Review: the plot drags, the jokes fall flat and the ending makes no sense at all. Sentiment:",
    "Question: what is the name of the river that runs through the capital of Egypt? Type:",
    "Premise: the committee approved the budget after a long debate. Hypothesis: the budget was rejected. Answer:",
]
TARGETS = ["positive", "negative", "location", "false"]


def batch(size: int, source_tokens: int, tokenizer) -> tuple[list[str], list[str]]:
    """`size` examples whose sources are about `source_tokens` tokens long."""
    sources, targets = [], []
    for i in range(size):
        text = SOURCES[i % len(SOURCES)]
        while len(tokenizer(text)["input_ids"]) < source_tokens:
            text = text + " " + SOURCES[(i + 1) % len(SOURCES)]
        ids = tokenizer(text)["input_ids"][-source_tokens:]
        sources.append(tokenizer.decode(ids))
        targets.append(TARGETS[i % len(TARGETS)])
    return sources, targets


def tpv_step(backbone: Backbone, length: int, sources: list[str], targets: list[str], prompts: int = 1,
             once: bool = True):
    """One step of `prompts` prompts (different origins) in ONE forward and backward, as a pack steps on a GPU.

    `once`: the training pass's prompts (`tpv.packed.pass_prompts`: on a causal backbone each prompt's positions run
    once for all its rows); else each row carries its prompt tensor through the whole model, as before."""
    soft = [SoftPrompt(make_origin(backbone, length, seed)).to(backbone.device) for seed in range(prompts)]
    optimizer = torch.optim.AdamW([p.weight for p in soft], lr=0.3)

    def step() -> None:
        counts = [len(sources)] * prompts
        stacked = pass_prompts(backbone, [p() for p in soft], counts) if once else \
            torch.cat([p().expand(n, -1, -1) for p, n in zip(soft, counts)])
        loss = backbone.loss(stacked, sources * prompts, targets * prompts)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def peft_step(backbone_config: BackboneConfig, length: int, sources: list[str], targets: list[str]):
    from peft import PromptTuningConfig, get_peft_model

    base = Backbone.load(backbone_config)
    tokenizer = base.tokenizer
    model = get_peft_model(base.model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=length))
    rows, labels = [], []
    for s, t in zip(sources, targets):
        src = tokenizer(s, add_special_tokens=False)["input_ids"]
        tgt = tokenizer(" " + t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(src + tgt)
        labels.append([-100] * len(src) + tgt)
    width = max(map(len, rows))
    pad = base.pad_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=base.device)
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=base.device)
    label_ids = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels], device=base.device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.3)

    def step() -> None:
        loss = model(input_ids=input_ids, attention_mask=attention, labels=label_ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def timed(step, repeats: int) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--source-tokens", type=int, default=64)
    parser.add_argument("--prompt-length", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=1, help="K prompts per tpv step (a pack), against K PEFT "
                        "steps (PEFT trains one active adapter per forward)")
    args = parse_with_smoke(parser, None, {"rounds": 1, "steps_per_round": 1, "batch": 2, "source_tokens": 8,
                                           "prompt_length": 4})

    config = BackboneConfig(model=args.backbone)
    backbone = Backbone.load(config)
    sources, targets = batch(args.batch, args.source_tokens, backbone.tokenizer)
    ours = tpv_step(backbone, args.prompt_length, sources, targets, args.prompts)
    per_row = tpv_step(backbone, args.prompt_length, sources, targets, args.prompts, once=False)
    theirs = peft_step(config, args.prompt_length, sources, targets)
    ours(), per_row(), theirs()  # warm-up
    ratios, once_ratios = [], []
    seconds: dict[str, list[float]] = {"tpv_s": [], "peft_s": [], "per_row_s": []}
    for r in range(args.rounds):
        t_ours = timed(ours, args.steps_per_round) / args.prompts  # per prompt-step
        t_rows = timed(per_row, args.steps_per_round) / args.prompts
        t_theirs = timed(theirs, args.steps_per_round)
        for key, t in zip(seconds, (t_ours, t_theirs, t_rows)):
            seconds[key].append(round(t, 6))
        ratios.append(t_theirs / t_ours)
        once_ratios.append(t_rows / t_ours)
        print(f"round {r}: tpv {args.batch / t_ours:.1f} ex/s, tpv with a prompt per row {args.batch / t_rows:.1f} ex/s, "
              f"peft {args.batch / t_theirs:.1f} ex/s, ratio {ratios[-1]:.2f}", flush=True)
    print(f"device {backbone.device}, dtype {backbone.dtype}, batch {args.batch}, source tokens {args.source_tokens}, "
          f"prompt {args.prompt_length}, prompts per tpv step {args.prompts}")
    print(json.dumps({"tpv_vs_peft_step_throughput": round(statistics.median(ratios), 3),
                      "prompt_once_vs_per_row": round(statistics.median(once_ratios), 3), **seconds}))


if __name__ == "__main__":
    main()
