"""Heterogeneous batching throughput: 32 requests with 32 DIFFERENT compositions in one forward, side by side with
the same 32 requests under ONE composition, with one forward pass per request (the per-adapter pattern, prompt
recomputed for every request as PEFT does), and with the bare model (same inputs, a one-token prompt: the floor).

Everything is the serving path of `serve.batching` (PromptServer entries with cached prompt keys/values,
`score_batch`) on the real default backbone, without Ray. Modes alternate round by round so machine noise hits all
alike; each figure is the median over rounds. Scores of the mixed batch are checked against per-request scoring.

    python bench/serve_batching.py [--backbone smollm2-135m-instruct] [--batch 32] [--prompt-length 50]
                                   [--input-tokens 40] [--rounds 7] [--device cpu|cuda]
    python bench/serve_batching.py --smoke    # CI: one round of a batch of 4 (add --backbone)

Last line: {"mixed_vs_single": R1, "mixed_vs_per_request": R2, "mixed_vs_bare_model": R3, "compose_8_vectors_ms": T,
"batch_ms": {mode: median ms per batch}, "max_mixed_vs_per_request_diff": D} (throughput ratios; T = warm time to get
an 8-vector composition ready to serve, in ms; D = max |score difference| of the mixed batch from per-request scoring).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from grid_args import parse_with_smoke

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve.batching import PromptServer, ScoreItem, score_batch  # noqa: E402
from tpv.backbone import Backbone, BackboneConfig  # noqa: E402
from tpv.compose import CompositionSpec  # noqa: E402
from tpv.merge import merge  # noqa: E402
from tpv.store import VectorStore  # noqa: E402
from tpv.vectors import TaskPromptVector  # noqa: E402

TEXTS = [
    "a gripping, beautifully acted story that stays with you long after the credits roll",
    "the plot drags, the jokes fall flat and the ending makes no sense at all",
    "what is the name of the river that runs through the capital of egypt",
    "the committee approved the budget after a long debate about schools and roads",
    "free entry in a weekly competition to win tickets, text now to claim your prize",
    "an honest, warm and very funny film about growing up in a small town",
]
LABELS = ["negative", "positive"]
TASKS = [f"task{i}" for i in range(8)]


def sources(n: int, tokens: int, tokenizer) -> list[str]:
    """n different inputs of about `tokens` tokens each (template included)."""
    out = []
    for i in range(n):
        words = f"{TEXTS[i % len(TEXTS)]} ({i})"
        text = ""
        j = i
        while len(tokenizer(f"sentence: {text} sentiment:", add_special_tokens=False)["input_ids"]) < tokens:
            text = (text + " " + words).strip()
            j += 1
            words = TEXTS[j % len(TEXTS)]
        body = tokenizer(text, add_special_tokens=False)["input_ids"]
        extra = len(tokenizer("sentence:  sentiment:", add_special_tokens=False)["input_ids"])
        out.append(f"sentence: {tokenizer.decode(body[: max(1, tokens - extra)])} sentiment:")
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-length", type=int, default=50)
    parser.add_argument("--input-tokens", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = cores)")
    args = parse_with_smoke(parser, None, {"rounds": 1, "batch": 4, "prompt_length": 4, "input_tokens": 8})
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    backbone = Backbone.load(BackboneConfig(model=args.backbone, device=args.device, dtype=args.dtype))
    print(f"loaded {backbone.backbone_id} on {backbone.device} ({backbone.dtype}) in {time.perf_counter() - t0:.1f}s, "
          f"torch threads {torch.get_num_threads()}", flush=True)
    device, n, L = backbone.device, args.batch, args.prompt_length

    store = VectorStore(tempfile.mkdtemp(prefix="tpv-bench-store-"))
    g = torch.Generator().manual_seed(0)
    scale = float(backbone.model.get_input_embeddings().weight.float().std())
    for task in TASKS:
        tau = torch.randn(L, backbone.hidden_size, generator=g) * 0.3 * scale
        store.put(TaskPromptVector.create(tau, task=task, backbone_id=backbone.backbone_id, origin_seed=0))
    server = PromptServer(backbone, store, reload_interval_s=3600, cache_max_entries=4 * n)
    bb = backbone.backbone_id
    specs = [
        CompositionSpec(backbone_id=bb, origin_seed=i, prompt_length=L,
                        terms=[{"task": TASKS[i % 8], "weight": 0.5 + 0.05 * i},
                               {"task": TASKS[(i + 3) % 8], "weight": 0.25 - 0.02 * i}])
        for i in range(n)
    ]
    t0 = time.perf_counter()
    entries = [server.entry(s) for s in specs]
    sync(device)
    build_ms = (time.perf_counter() - t0) * 1000 / n
    srcs = sources(n, args.input_tokens, backbone.tokenizer)
    lengths = [len(x) for x in backbone.tokenizer(srcs, add_special_tokens=False)["input_ids"]]
    # the backbone takes no prompt-less input: the floor is a one-token prompt, recomputed (1 of ~40 input tokens)
    bare_prompt = torch.zeros(1, 1, backbone.hidden_size, device=device, dtype=backbone.dtype)

    mixed_items = [ScoreItem(entries[i], [srcs[i]], tuple(LABELS)) for i in range(n)]
    single_items = [ScoreItem(entries[0], [srcs[i]], tuple(LABELS)) for i in range(n)]
    stacked = torch.stack([e.prompt for e in entries])
    out: dict[str, torch.Tensor] = {}

    def mixed():
        res, report = score_batch(backbone, mixed_items)
        assert report.forwards == 1 and report.compositions == n
        out["mixed"] = torch.cat(res)

    def single():
        res, report = score_batch(backbone, single_items)
        assert report.forwards == 1
        out["single"] = torch.cat(res)

    def per_request():  # one forward per request, the whole prompt recomputed each time (PEFT / per-adapter pattern)
        out["per_request"] = torch.cat([
            backbone.score_labels(entries[i].prompt.unsqueeze(0), [srcs[i]], LABELS) for i in range(n)
        ])

    def batched_no_cache():  # one forward, per-row prompt tensors: the prompt rows recomputed in the batch
        out["batched_no_cache"] = backbone.score_labels(stacked, srcs, LABELS)

    def bare():
        out["bare"] = backbone.score_labels(bare_prompt, srcs, LABELS)

    modes = {"mixed": mixed, "single": single, "per_request": per_request, "batched_no_cache": batched_no_cache,
             "bare": bare}
    for fn in modes.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for m, fn in modes.items():
            times[m].append(timed(fn, device))
        line = ", ".join(f"{m} {n / times[m][-1]:.1f} req/s" for m in modes)
        print(f"round {r}: {line}", flush=True)
    med = {m: statistics.median(t) for m, t in times.items()}
    thr = {m: n / med[m] for m in med}

    diff_alone = float((out["mixed"] - out["per_request"]).abs().max())
    diff_nocache = float((out["mixed"] - out["batched_no_cache"]).abs().max())

    # composing 8 vectors: cold (store read + merge + prefix), merge only, and warm (the serving lookup)
    spec8 = CompositionSpec(backbone_id=bb, origin_seed=99, prompt_length=L,
                            terms=[{"task": t, "weight": 0.1 * (k + 1)} for k, t in enumerate(TASKS)])
    cold_ms = timed(lambda: server.entry(spec8), device) * 1000
    taus = [store.get(m.vector_id).tensor for m in store.list(bb)]
    weights = [0.1 * (k + 1) for k in range(8)]
    merge_ms = statistics.median(timed(lambda: merge("weighted", taus, weights), device) for _ in range(50)) * 1000
    warm = []
    for _ in range(2000):
        start = time.perf_counter()
        server.entry(spec8)
        warm.append(time.perf_counter() - start)
    warm_ms = statistics.median(warm) * 1000
    composer_warm_ms = statistics.median(
        timed(lambda: server.composer.compose(spec8), device) for _ in range(500)
    ) * 1000

    print(f"device {device}, dtype {backbone.dtype}, batch {n}, prompt length {L}, input tokens "
          f"{min(lengths)}-{max(lengths)}, labels {LABELS}, rounds {args.rounds}")
    for m in modes:
        print(f"  {m:>17}: {thr[m]:8.1f} req/s  ({med[m] * 1000:.1f} ms per {n} requests)")
    print(f"  prompt keys/values cache vs recomputing the prompt in the same batch: "
          f"{med['batched_no_cache'] / med['mixed']:.2f}x; batching alone (no cache) vs one forward per request: "
          f"{med['per_request'] / med['batched_no_cache']:.2f}x")
    print(f"  max |mixed - per request| = {diff_alone:.2e}, max |mixed - batched without cache| = {diff_nocache:.2e}")
    print(f"  composition build (compose + keys/values) {build_ms:.1f} ms each; 8 vectors: cold {cold_ms:.1f} ms, "
          f"merge only {merge_ms:.3f} ms, Composer.compose warm {composer_warm_ms:.3f} ms, serving lookup warm "
          f"{warm_ms:.3f} ms; prefix bytes per composition {entries[0].nbytes() / 2**20:.2f} MiB")
    if diff_alone > 1e-3 if backbone.dtype != torch.float32 else diff_alone > 1e-4:
        print(f"WARNING: mixed-batch scores differ from per-request scores by {diff_alone:.2e}")
    print(json.dumps({
        "mixed_vs_single": round(thr["mixed"] / thr["single"], 3),
        "mixed_vs_per_request": round(thr["mixed"] / thr["per_request"], 3),
        "mixed_vs_bare_model": round(thr["mixed"] / thr["bare"], 3),
        "compose_8_vectors_ms": round(warm_ms, 4),
        "batch_ms": {m: round(med[m] * 1000, 3) for m in modes},
        "max_mixed_vs_per_request_diff": diff_alone,
    }))


if __name__ == "__main__":
    main()
