"""Generation through the live service: 32 streaming requests with 32 DIFFERENT compositions, 32 new tokens each,
batched on cached prompt keys/values in one decoding loop, side by side with the same 32 requests one at a time
with the prompt recomputed for each (the prompt cache off, one row per batch: what generation cost before).

Two Serve apps side by side on a local Ray (the default bundled backbone, one model replica each), the same code,
only their `user_config` differs. Requests go over HTTP to /v1/completions with `stream: true`, greedy, so both
modes produce the same tokens (checked). Modes alternate round
by round so machine noise hits both; figures are medians over rounds.

    python bench/serve_generate.py [--backbone smollm2-135m-instruct] [--requests 32] [--tokens 32]
                                   [--prompt-length 50] [--rounds 3] [--threads 2]
    python bench/serve_generate.py --smoke    # CI: one round of 2 requests x 2 tokens on 2 CPUs (add --backbone)

Last line: {"generate_mixed_vs_per_request": R, "first_token_ms_p50": T, "median_s": {mode: S}, "same_texts": B}:
R = throughput (requests/s) of the batched mode over the one-at-a-time mode (the ratio of their median seconds S);
T = median time from sending a request to its first streamed text in the batched mode, in ms (all requests sent at
once: the batch's prefill is in it); B: both modes generated the same texts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx2 as httpx  # huggingface_hub (via transformers) installs it: no extra dependency
import torch
from grid_args import parse_with_smoke

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tpv.store import VectorStore  # noqa: E402
from tpv.vectors import TaskPromptVector  # noqa: E402

APP = "tpv-bench-generate"
TASKS = [f"task{i}" for i in range(8)]
TEXTS = [
    "review: a gripping, beautifully acted story that stays with you long after the credits roll. sentiment:",
    "review: the plot drags, the jokes fall flat and the ending makes no sense at all. sentiment:",
    "question: what is the name of the river that runs through the capital of egypt? answer:",
    "news: the committee approved the budget after a long debate about schools and roads. topic:",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_store(backbone_id: str, hidden: int, scale: float, length: int) -> VectorStore:
    store = VectorStore(tempfile.mkdtemp(prefix="tpv-bench-generate-"))
    g = torch.Generator().manual_seed(0)
    for task in TASKS:
        tau = torch.randn(length, hidden, generator=g) * 0.3 * scale
        store.put(TaskPromptVector.create(tau, task=task, backbone_id=backbone_id, origin_seed=0))
    return store


def compositions(n: int) -> list[dict]:
    return [{"terms": [{"task": TASKS[i % 8], "weight": 0.5 + 0.05 * i}, {"task": TASKS[(i + 3) % 8],
                                                                           "weight": 0.25 - 0.02 * i}],
             "origin_seed": i} for i in range(n)]


async def one(client: httpx.AsyncClient, composition: dict, prompt: str, tokens: int) -> tuple[float, float, str]:
    """(seconds to the first streamed text, seconds to [DONE], the text) of one streaming completion."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "composition": composition}
    start = time.perf_counter()
    first, text = None, ""
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            for choice in event["choices"]:
                if choice["text"] and first is None:
                    first = time.perf_counter() - start
                text += choice["text"]
    done = time.perf_counter() - start
    return (first if first is not None else done), done, text


async def mixed(client, comps, prompts, tokens) -> tuple[float, list[float], list[str]]:
    start = time.perf_counter()
    out = await asyncio.gather(*(one(client, c, p, tokens) for c, p in zip(comps, prompts)))
    return time.perf_counter() - start, [o[0] for o in out], [o[2] for o in out]


async def per_request(client, comps, prompts, tokens) -> tuple[float, list[float], list[str]]:
    start = time.perf_counter()
    out = [await one(client, c, p, tokens) for c, p in zip(comps, prompts)]
    return time.perf_counter() - start, [o[0] for o in out], [o[2] for o in out]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt-length", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the model replica")
    parser.add_argument("--num-cpus", type=int, default=None)
    args = parse_with_smoke(parser, None, {"rounds": 1, "requests": 2, "tokens": 2, "prompt_length": 4,
                                           "num_cpus": 2, "threads": 1})

    import ray
    from ray import serve

    from serve.app import build
    from tpv.backbone import Backbone, BackboneConfig

    t0 = time.perf_counter()
    probe = Backbone.load(BackboneConfig(model=args.backbone, device="cpu"))  # prepares the bundled model once
    scale = float(probe.model.get_input_embeddings().weight.float().std())
    store = make_store(probe.backbone_id, probe.hidden_size, scale, args.prompt_length)
    del probe
    env = {k: os.environ[k] for k in ("TPV_HOME",) if k in os.environ}
    env["TOKENIZERS_PARALLELISM"] = "false"
    ray.init(num_cpus=args.num_cpus or max(os.cpu_count() or 2, 2), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    n = args.requests
    base = {"store_uri": store.uri, "backbone": args.backbone, "device": "cpu", "reload_interval_s": 3600.0,
            "torch_threads": args.threads, "max_prompt_length": max(512, args.prompt_length)}
    modes = {
        # batched: the requests in one decoding loop, each composition's keys/values cached once (the wait only
        # bounds how long a batch waits to fill: all requests are sent at once, so it fills and starts)
        "mixed": {**base, "max_batch_size": n, "batch_wait_timeout_s": 1.0, "cache_max_entries": 4 * n},
        # one at a time, the prompt composed and its keys/values recomputed for every request
        "per_request": {**base, "max_batch_size": 1, "batch_wait_timeout_s": 0.0, "cache_max_entries": 0},
    }
    ingress = {"limits": {"max_new_tokens": max(64, args.tokens), "max_inputs": max(64, n)}, "request_timeout_s": 600}
    for mode, config in modes.items():  # two apps side by side: switching modes restarts nothing
        model = {"user_config": config, "max_ongoing_requests": 4 * n, "ray_actor_options": {"num_cpus": 1}}
        serve.run(build(model, {"user_config": ingress, "ray_actor_options": {"num_cpus": 0}}), name=f"{APP}-{mode}",
                  route_prefix=f"/{mode}")
    print(f"apps up on 127.0.0.1:{port} in {time.perf_counter() - t0:.1f}s", flush=True)
    comps = compositions(n)
    prompts = [TEXTS[i % len(TEXTS)] for i in range(n)]
    runners = {"mixed": mixed, "per_request": per_request}
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    first_ms: dict[str, list[float]] = {m: [] for m in modes}
    texts: dict[str, list[str]] = {}
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    clients = {m: httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/{m}", timeout=1200, limits=limits)
               for m in modes}
    await mixed(clients["mixed"], comps, prompts, 2)  # warm-up: every composition cached, first batches run
    await per_request(clients["per_request"], comps[:2], prompts[:2], 2)
    for r in range(args.rounds):
        for mode, run in runners.items():
            took, firsts, texts[mode] = await run(clients[mode], comps, prompts, args.tokens)
            seconds[mode].append(took)
            first_ms[mode] += [f * 1000 for f in firsts]
            print(f"round {r} {mode}: {n / took:.2f} req/s ({took:.1f} s for {n} requests), first text p50 "
                  f"{statistics.median(firsts) * 1000:.0f} ms", flush=True)
    stats = (await clients["mixed"].get("/v1/health")).json()["batching"]
    for client in clients.values():
        await client.aclose()
    for mode in modes:
        serve.delete(f"{APP}-{mode}")
    ray.shutdown()

    same = texts["mixed"] == texts["per_request"]
    med = {m: statistics.median(s) for m, s in seconds.items()}
    ratio = med["per_request"] / med["mixed"]
    chars = sum(len(t) for t in texts["mixed"])
    print(f"backbone {args.backbone}, {n} requests x {args.tokens} new tokens, prompt length {args.prompt_length}, "
          f"{args.rounds} rounds, torch threads {args.threads}; {chars} characters generated")
    for m in modes:
        print(f"  {m:>12}: {n / med[m]:6.2f} req/s ({med[m]:.1f} s), first text p50 "
              f"{statistics.median(first_ms[m]):.0f} ms, p90 {statistics.quantiles(first_ms[m], n=10)[-1]:.0f} ms")
    print(f"  same texts in both modes: {same}; batched mode: {stats['batches']} batches, at most "
          f"{stats['max_requests_in_batch']} requests and {stats['max_compositions_in_batch']} compositions in one")
    if not same:
        print("WARNING: the batched texts differ from the one-at-a-time texts")
    print(json.dumps({"generate_mixed_vs_per_request": round(ratio, 3),
                      "first_token_ms_p50": round(statistics.median(first_ms["mixed"]), 1),
                      "median_s": {m: round(s, 4) for m, s in med.items()}, "same_texts": same}))


if __name__ == "__main__":
    asyncio.run(main())
