"""tpv beside what users would run instead: Hugging Face PEFT with prompt-tuning adapters swapped per request, the
bare model's own batched `generate` (the floor: no soft prompt at all), and on a GPU vLLM's `prompt_embeds` input.

One run, one backbone (the bundled SmolLM2-135M by default, fp32 on a CPU), the same inputs, the same 32 composed
prompts and the same greedy settings for every side; each side is warmed first, the sides alternate by round (the
order reversed every other round, so machine noise hits all alike) and every figure is a median over rounds.

- classification: 32 requests, one input each, 32 different compositions, one-token labels;
- generation: 32 requests, 32 compositions, 32 new tokens each (greedy, stopping at the tokens tpv stops at).

Sides:
- `tpv_http`: the live service (a local Ray, one model replica; `/v1/classify` and streaming `/v1/completions`),
  all requests sent at once, as `bench/serve_generate.py` starts and calls it;
- `tpv_library`: the same batch without HTTP or Ray: `serve.batching.score_batch` and `tpv.generate.decode` over
  the compositions' cached prompt keys/values (http / library is what the service layer costs);
- `peft`: ONE `PeftModel` with the 32 composed prompts loaded as named prompt-tuning adapters (exported by
  `tpv.peft_io.export_peft`), `set_adapter` then `generate` (or a forward) per request, one request at a time.
  PEFT cannot put two prompt-tuning adapters in one batch. Its docs (developer guide "LoRA", section "Inference with
  different LoRA adapters in the same batch"): "Normally, each inference batch has to use the same adapter(s) in
  PEFT"; the `adapter_names` escape is LoRA's (`_mixed_batch_forward` in `peft/tuners/lora/layer.py`). Its code
  (peft 0.21.2, `peft_model.py`): for prompt learning `PeftModelForCausalLM.generate` calls the base model's
  `generate` without the forward hooks that read `adapter_names`, and `PeftModel.get_prompt(batch_size)` builds the
  prompt from `self.prompt_encoder[self.active_adapter]` expanded to the whole batch: one adapter per batch, its
  prompt recomputed through the model on every call. The forward is given `logits_to_keep=1` (the lm head on the
  last position only), which PEFT passes to the base model: PEFT is not charged for a full-vocabulary head;
- `bare_batched`: the 32 inputs left-padded in one `model.generate`, no prompt (classification: one forward);
- `vllm` (`--vllm`, only where vllm and a GPU exist; never needed on a CPU): `LLM(enable_prompt_embeds=True)` fed
  `{"prompt_embeds": [composed prompt; embedded input tokens]}` per request, all 32 in one `generate`
  (docs.vllm.ai, features/prompt_embeds: a tensor of shape (sequence_length, hidden_size) per prompt). Pinned:
  vllm==0.33.0. On a GPU box with it installed: `python bench/peers.py --device cuda --dtype bfloat16 --vllm
  --many 0` (a few minutes: the comparisons alone, bf16).

Outputs are checked where they must agree: tpv (HTTP and library) vs PEFT on the same composed prompt, greedy: the
same tokens, and label probabilities within `--tolerance`; the HTTP texts equal the library's.

`many_vs_one_composition`: `--many` (1,000) distinct compositions, random weights over the stored vectors, each sent
`--many-repeats` times in a shuffled stream at concurrency `--many-concurrency` (32) to ONE model replica whose
prompt cache holds `--many-cache` (250) of them (`cache_max_bytes`), beside the same stream naming one composition:
throughput ratio, cache hits / misses / evictions (the replica's `/v1/health` counters, as serve/metrics.py exports
them), p50/p99 latency, and the replica's RSS at the end beside the configured cache size.

    python bench/peers.py [--model smollm2-135m-instruct] [--requests 32] [--tokens 32] [--rounds 3]
                          [--many 1000] [--many-cache 250] [--many-repeats 2] [--threads 2]
    python bench/peers.py --smoke [--model TINY_FOLDER]      # CI: 4 requests, 4 tokens, one round, 12 compositions

Last line (JSON): classify_vs_peft, generate_vs_peft, generate_vs_bare_batched (tpv_http's throughput over the
peer's), their library counterparts, http_vs_library, first_token_ms_p50 per side, outputs_equal, seconds per side
and round, many_vs_one_composition, `targets` (each target ratio, its value and whether it holds: >= 3x PEFT
for classify and generate, >= 0.8x the bare model's batched generate, many/one >= 0.9) and `profile`: where a target
is missed (`--profile auto`, the default) the library sides, PEFT and the bare model run once more under
torch.profiler, each with its wall time, the time no torch op accounts for (Python between ops) and its top ops by
self CPU time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx2 as httpx  # huggingface_hub (via transformers) installs it: no extra dependency
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve.batching import PromptServer, ScoreItem, score_batch  # noqa: E402
from serve_batching import LABELS, sources  # noqa: E402 - bench/ is the script's folder, first on sys.path
from serve_generate import TASKS, TEXTS, compositions, free_port, make_store, mixed  # noqa: E402
from serve_load import pct, run_load  # noqa: E402
from tpv.backbone import Backbone, BackboneConfig  # noqa: E402
from tpv.compose import CompositionSpec  # noqa: E402
from tpv.generate import SamplingParams, Transcript, _eos_ids, decode  # noqa: E402
from tpv.peft_io import export_peft  # noqa: E402

APP = f"tpv-bench-peers-{os.getpid()}"
SMOKE = {"requests": 4, "tokens": 4, "rounds": 1, "prompt_length": 8, "input_tokens": 12, "many": 12,
         "many_cache": 4, "many_repeats": 2, "many_concurrency": 4, "labels": ["no", "yes"]}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", "--backbone", dest="model", default="smollm2-135m-instruct",
                   help="bundled name or local from_pretrained folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--requests", type=int, default=32, help="requests per side, each its own composition")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per generation request")
    p.add_argument("--prompt-length", type=int, default=50)
    p.add_argument("--input-tokens", type=int, default=40, help="tokens of each classification input")
    p.add_argument("--labels", nargs="+", default=LABELS, help="one token each on the backbone")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads of each side (the replica's too)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="label probabilities tpv vs PEFT (fp32)")
    p.add_argument("--many", type=int, default=1000, help="distinct compositions of the stream (0: skip it)")
    p.add_argument("--many-cache", type=int, default=250, help="compositions the replica's prompt cache holds")
    p.add_argument("--many-repeats", type=int, default=2, help="times each composition is in the stream")
    p.add_argument("--many-concurrency", type=int, default=32)
    p.add_argument("--many-rounds", type=int, default=1)
    p.add_argument("--profile", choices=["auto", "always", "never"], default="auto",
                   help="torch.profiler over one more round of the library and bare sides (auto: when a target "
                        "is missed)")
    p.add_argument("--profile-top", type=int, default=8, help="ops listed per profiled side")
    p.add_argument("--vllm", action="store_true", help="add vLLM's prompt_embeds side (needs vllm and a GPU)")
    p.add_argument("--vllm-memory", type=float, default=0.3, help="vLLM's gpu_memory_utilization")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, one round: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in SMOKE.items()))
    if p.parse_args(argv).smoke:
        p.set_defaults(**SMOKE)
    args = p.parse_args(argv)
    if args.vllm and not torch.cuda.is_available():
        p.error("--vllm needs a GPU (and vllm installed); the other sides run without it")
    return args


# ---- the peers, in this process --------------------------------------------------------------------------------


class FirstToken:
    """A transformers streamer that notes when `generate` hands out its first new token (its first `put` is the
    prompt's ids)."""

    def __init__(self) -> None:
        self.puts = 0
        self.at: float | None = None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def until_eos(tokens: list[int], eos: set[int], pad: int | None = None) -> list[int]:
    """The generated tokens before the first stop token (HF pads finished rows; tpv drops them)."""
    out = []
    for t in tokens:
        if t in eos or t == pad:
            break
        out.append(t)
    return out


def peft_model(config: BackboneConfig, prompts: list[torch.Tensor], folder: Path):
    """One PeftModel on its own copy of the backbone (PEFT wraps the model it is given) with every prompt loaded
    as the named adapter c0, c1, ..."""
    from peft import PeftModel

    base = Backbone.load(config)
    for i, prompt in enumerate(prompts):
        export_peft(prompt, base, folder / f"c{i}")
    model = PeftModel.from_pretrained(base.model, str(folder / "c0"), adapter_name="c0")
    for i in range(1, len(prompts)):
        model.load_adapter(str(folder / f"c{i}"), adapter_name=f"c{i}")
    return model.eval(), base


@torch.no_grad()
def peft_classify(model, base: Backbone, srcs: list[str], label_ids: list[int]) -> tuple[float, list[list[float]]]:
    """One request at a time: its adapter set, one forward (prompt + input), the labels' log-probabilities."""
    start = time.perf_counter()
    rows = []
    for i, src in enumerate(srcs):
        model.set_adapter(f"c{i}")
        enc = base.tokenizer(src, return_tensors="pt").to(base.device)
        logits = model(**enc, logits_to_keep=1).logits[0, -1]
        rows.append(torch.log_softmax(logits.float(), -1)[label_ids].cpu())
    return time.perf_counter() - start, [torch.softmax(r, -1).tolist() for r in rows]


@torch.no_grad()
def peft_generate(model, base: Backbone, texts: list[str], tokens: int, eos: set[int]
                  ) -> tuple[float, list[float], list[list[int]]]:
    """One request at a time: its adapter set, greedy `generate`. First-token times count from the start (every
    request arrived at once and waits for those before it)."""
    start = time.perf_counter()
    firsts, out = [], []
    for i, text in enumerate(texts):
        model.set_adapter(f"c{i}")
        enc = base.tokenizer(text, return_tensors="pt").to(base.device)
        timer = FirstToken()
        ids = model.generate(**enc, max_new_tokens=tokens, do_sample=False, eos_token_id=sorted(eos),
                             pad_token_id=base.pad_id, streamer=timer)
        out.append(until_eos(ids[0, enc["input_ids"].shape[1]:].tolist(), eos))
        firsts.append((timer.at or time.perf_counter()) - start)
    return time.perf_counter() - start, firsts, out


@torch.no_grad()
def bare_classify(backbone: Backbone, srcs: list[str], label_ids: list[int]) -> float:
    """The floor of classification: the inputs in one left-padded forward, no prompt."""
    start = time.perf_counter()
    enc = backbone.tokenizer(srcs, return_tensors="pt", padding=True, padding_side="left").to(backbone.device)
    backbone.model(**enc, logits_to_keep=1).logits[:, -1].float().log_softmax(-1)[:, label_ids].cpu()
    return time.perf_counter() - start


@torch.no_grad()
def bare_generate(backbone: Backbone, texts: list[str], tokens: int, eos: set[int]
                  ) -> tuple[float, list[float], list[list[int]]]:
    """The floor of generation: the inputs left-padded in one greedy `generate`, no prompt."""
    start = time.perf_counter()
    enc = backbone.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left").to(backbone.device)
    timer = FirstToken()
    ids = backbone.model.generate(**enc, max_new_tokens=tokens, do_sample=False, eos_token_id=sorted(eos),
                                  pad_token_id=backbone.pad_id, streamer=timer)
    took = time.perf_counter() - start
    width = enc["input_ids"].shape[1]
    return took, [timer.at - start] * len(texts), [until_eos(row[width:].tolist(), eos) for row in ids]


def library_classify(backbone: Backbone, entries, srcs: list[str], labels: list[str]) -> tuple[float, list]:
    """tpv without HTTP: every request in one `score_batch` over the compositions' cached keys/values."""
    start = time.perf_counter()
    scores, _ = score_batch(backbone, [ScoreItem(e, [s], tuple(labels)) for e, s in zip(entries, srcs)])
    took = time.perf_counter() - start
    return took, [torch.softmax(s[0], -1).tolist() for s in scores]


def library_generate(backbone: Backbone, entries, texts: list[str], tokens: int
                     ) -> tuple[float, list[float], list[list[int]], list[str]]:
    """tpv without HTTP: one `tpv.generate.decode` loop, each row from its composition's cached keys/values."""
    start = time.perf_counter()
    first = None
    transcript = Transcript(len(texts))
    decoding = backbone.start_decoding([e.prefix for e in entries], texts)
    for news in decode(backbone, decoding, [SamplingParams(max_new_tokens=tokens)] * len(texts)):
        if first is None:
            first = time.perf_counter() - start
        transcript.add(news)
    return time.perf_counter() - start, [first] * len(texts), transcript.tokens, transcript.texts


def vllm_engine(args: argparse.Namespace):
    from vllm import LLM

    from tpv.bundled import resolve_model_path

    return LLM(model=str(resolve_model_path(args.model)), dtype="bfloat16", enable_prompt_embeds=True,
               gpu_memory_utilization=args.vllm_memory, seed=0)


@torch.no_grad()
def vllm_embeds(backbone: Backbone, entries, texts: list[str]) -> list[torch.Tensor]:
    """Each request's whole prompt as embeddings: its composed soft prompt, then its input tokens embedded as the
    model embeds them (tpv's layout: the tokenizer's own special tokens after the soft prompt)."""
    out = []
    for e, text in zip(entries, texts):
        ids = torch.tensor(backbone.tokenizer(text)["input_ids"])
        out.append(torch.cat([e.prompt.to(backbone.dtype), backbone.embed(ids).to(e.prompt.device)]).cpu())
    return out


def vllm_generate(llm, embeds: list[torch.Tensor], tokens: int) -> tuple[float, list[float], list[list[int]]]:
    """All requests in one `LLM.generate`: vLLM schedules them together (continuous batching). First-token times
    from the request metrics where this vLLM reports them."""
    from vllm import SamplingParams as VllmParams

    start = time.perf_counter()
    outs = llm.generate([{"prompt_embeds": e} for e in embeds], VllmParams(temperature=0.0, max_tokens=tokens),
                        use_tqdm=False)
    took = time.perf_counter() - start
    firsts = []
    for o in outs:
        m = getattr(o, "metrics", None)
        ft, arrived = getattr(m, "first_token_time", None), getattr(m, "arrival_time", None)
        firsts.append(ft - arrived if ft is not None and arrived is not None else took)
    return took, firsts, [list(o.outputs[0].token_ids) for o in outs]


# ---- the service ------------------------------------------------------------------------------------------------


async def http_classify(client: httpx.AsyncClient, comps: list, srcs: list[str], labels: list[str]
                        ) -> tuple[float, list[list[float]]]:
    """Every request at once to /v1/classify; each one's label probabilities."""

    async def one(comp, src) -> list[float]:
        r = await client.post("/v1/classify", json={"inputs": [src], "composition": comp, "labels": labels})
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {r.text[:300]}")
        scores = r.json()["results"][0]["scores"]
        return [scores[lab] for lab in labels]

    start = time.perf_counter()
    rows = await asyncio.gather(*(one(c, s) for c, s in zip(comps, srcs)))
    return time.perf_counter() - start, list(rows)


def replica_rss(app: str) -> int:
    """RSS bytes of this app's model replica (Ray titles the process `ray::ServeReplica:<app>:TPVModel`)."""
    title = f"ServeReplica:{app}:TPVModel"
    for proc in psutil.process_iter(["cmdline"]):
        if any(title in part for part in proc.info["cmdline"] or []):
            return proc.memory_info().rss
    raise RuntimeError(f"no process titled {title}")


def many_compositions(n: int, seed: int = 0) -> list[dict]:
    """n distinct compositions: random weights over every stored task vector, one origin."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        comp = {"terms": [{"task": t, "weight": round(rng.uniform(-0.5, 1.0), 4)} for t in TASKS], "origin_seed": 0}
        key = json.dumps(comp, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(comp)
    return out


async def stream(client: httpx.AsyncClient, comps: list, srcs: list[str], labels: list[str], concurrency: int
                 ) -> dict:
    """The requests (one per composition given, in that order) at `concurrency`; throughput, latency and the
    replica's cache counters over the stream."""
    jobs = [("classify", "POST", "/v1/classify",
             json.dumps({"inputs": [srcs[k % len(srcs)]], "composition": c, "labels": labels}))
            for k, c in enumerate(comps)]
    before = (await client.get("/v1/health")).json()["prompt_cache"]
    start = time.perf_counter()
    records = await run_load(client, jobs, concurrency)
    took = time.perf_counter() - start
    after = (await client.get("/v1/health")).json()["prompt_cache"]
    ms = [r["seconds"] * 1000 for r in records]
    return {"seconds": took, "requests_per_s": len(comps) / took, "p50_ms": pct(ms, 50), "p99_ms": pct(ms, 99),
            "errors": sum(r["status"] != 200 for r in records),
            **{k: after[k] - before[k] for k in ("hits", "misses", "evictions")}, "cache_entries": after["entries"],
            "cache_bytes": after["bytes"]}


async def many_vs_one(args, client: httpx.AsyncClient, srcs: list[str], entry_bytes: int, cache_bytes: int) -> dict:
    comps = many_compositions(args.many)
    rng = random.Random(1)
    many = comps * args.many_repeats
    rng.shuffle(many)
    one = [comps[0]] * len(many)
    await stream(client, comps[:2], srcs, args.labels, 2)  # warm: the model's first batches
    rss_start = replica_rss(f"{APP}-many")
    runs: dict[str, list[dict]] = {"many": [], "one": []}
    for r in range(args.many_rounds):
        for name in (["many", "one"] if r % 2 == 0 else ["one", "many"]):
            out = await stream(client, many if name == "many" else one, srcs, args.labels, args.many_concurrency)
            runs[name].append(out)
            print(f"many round {r} {name}: {out['requests_per_s']:.2f} req/s, p50 {out['p50_ms']:.0f} ms, p99 "
                  f"{out['p99_ms']:.0f} ms, hits {out['hits']} misses {out['misses']} evictions "
                  f"{out['evictions']}, errors {out['errors']}", flush=True)
    rss_end = replica_rss(f"{APP}-many")
    med = {k: statistics.median(o["seconds"] for o in v) for k, v in runs.items()}

    def summary(outs: list[dict]) -> dict:
        keys = ("requests_per_s", "p50_ms", "p99_ms")
        return {**{k: round(statistics.median(o[k] for o in outs), 2) for k in keys},
                **{k: sum(o[k] for o in outs) for k in ("hits", "misses", "evictions", "errors")}}

    return {"throughput_ratio": round(med["one"] / med["many"], 3), "compositions": args.many,
            "requests": len(many), "concurrency": args.many_concurrency,
            "many": summary(runs["many"]), "one": summary(runs["one"]),
            "seconds": {k: [round(o["seconds"], 3) for o in v] for k, v in runs.items()},
            "cache_max_bytes": cache_bytes, "cache_holds_compositions": args.many_cache, "entry_bytes": entry_bytes,
            "cache_bytes_end": runs["many"][-1]["cache_bytes"], "rss_mib_start": round(rss_start / 2**20, 1),
            "rss_mib_end": round(rss_end / 2**20, 1), "rss_growth_mib": round((rss_end - rss_start) / 2**20, 1),
            "cache_max_mib": round(cache_bytes / 2**20, 1)}


def start_apps(args, store_uri: str, many_cache_bytes: int) -> int:
    """A local Ray with two apps of one model replica each: `main` (every composition cached) and `many` (a cache
    of `many_cache_bytes`). Returns the HTTP port."""
    import ray
    from ray import serve

    from serve.app import build

    env = {k: os.environ[k] for k in ("TPV_HOME",) if k in os.environ}
    env["TOKENIZERS_PARALLELISM"] = "false"
    for attempt in range(3):
        try:
            ray.init(num_cpus=max(os.cpu_count() or 2, 2), include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": env})
            break
        except Exception as e:  # Ray gives its raylet 30 s (hard-coded) to register: a loaded machine can miss it
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            print(f"ray.init: {e} (attempt {attempt + 1} of 3; retrying)", file=sys.stderr, flush=True)
            ray.shutdown()
            # the failed start's GCS and raylet are this process's children (nothing else is yet): end them
            children = psutil.Process().children(recursive=True)
            for child in children:
                child.terminate()
            psutil.wait_procs(children, timeout=30)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    n = args.requests
    base = {"store_uri": store_uri, "backbone": args.model, "device": args.device, "dtype": args.dtype,
            "reload_interval_s": 3600.0, "torch_threads": args.threads,
            "max_prompt_length": max(512, args.prompt_length),
            # a burst of n requests fills one batch and starts it; the wait only bounds a batch that cannot fill
            "max_batch_size": max(n, args.many_concurrency), "batch_wait_timeout_s": 1.0}
    configs = {"main": {**base, "cache_max_entries": 4 * n},
               "many": {**base, "cache_max_entries": max(args.many, 1), "cache_max_bytes": many_cache_bytes}}
    ingress = {"limits": {"max_new_tokens": max(64, args.tokens), "max_inputs": max(64, n)}, "request_timeout_s": 600}
    gpus = 0.25 if args.device.startswith("cuda") else 0
    for name, config in configs.items():
        if name == "many" and not args.many:
            continue
        model = {"user_config": config, "max_ongoing_requests": 4 * max(n, args.many_concurrency),
                 "ray_actor_options": {"num_cpus": 1, "num_gpus": gpus}}
        serve.run(build(model, {"user_config": ingress, "ray_actor_options": {"num_cpus": 0}}), name=f"{APP}-{name}",
                  route_prefix=f"/{name}")
    return port


# ---- where the time goes ----------------------------------------------------------------------------------------

#: the issue's targets on the 2-core CPU: tpv over HTTP vs each peer (throughput ratios)
TARGETS = {"classify_vs_peft": 3.0, "generate_vs_peft": 3.0, "generate_vs_bare_batched": 0.8,
           "many_vs_one_composition": 0.9}


def profiled(fn, top: int) -> dict:
    """One call of `fn` under torch.profiler (CPU): its wall seconds there and the `top` ops by self CPU time, each
    with its share of the summed self time of all ops (what the process spent in torch, Python glue between ops
    excluded: `untraced_s` is the wall time no op accounts for)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        fn()
        wall = time.perf_counter() - start
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total_us = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return {"wall_s": round(wall, 4), "ops_self_s": round(total_us / 1e6, 4),
            "untraced_s": round(max(wall - total_us / 1e6, 0.0), 4),
            "top": [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 2), "calls": e.count,
                     "share": round(e.self_cpu_time_total / total_us, 3)} for e in events[:top]]}


# ---- the run ----------------------------------------------------------------------------------------------------


def max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def same_rows(a: list, b: list) -> int:
    return sum(x == y for x, y in zip(a, b))


async def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    load_start = os.getloadavg()[0]  # the machine may be shared: its load before and after the run is in the JSON
    torch.set_num_threads(args.threads)
    n = args.requests
    t0 = time.perf_counter()
    config = BackboneConfig(model=args.model, device=args.device, dtype=args.dtype)
    backbone = Backbone.load(config)
    label_ids = backbone.label_token_ids(list(args.labels))
    if any(len(ids) != 1 for ids in label_ids):
        raise SystemExit(f"labels {args.labels} must be one token each on {backbone.backbone_id} (--labels)")
    label_ids = [ids[0] for ids in label_ids]
    eos = _eos_ids(backbone)
    scale = float(backbone.model.get_input_embeddings().weight.float().std())
    store = make_store(backbone.backbone_id, backbone.hidden_size, scale, args.prompt_length)
    comps = compositions(n)
    server = PromptServer(backbone, store, reload_interval_s=3600, cache_max_entries=4 * n)
    entries = [server.entry(CompositionSpec(backbone_id=backbone.backbone_id, origin_seed=c["origin_seed"],
                                            prompt_length=args.prompt_length, terms=c["terms"])) for c in comps]
    entry_bytes = entries[0].nbytes()
    many_cache_bytes = args.many_cache * entry_bytes + entry_bytes // 2  # room for --many-cache entries, no more
    srcs = sources(n, args.input_tokens, backbone.tokenizer)
    texts = [TEXTS[i % len(TEXTS)] for i in range(n)]
    peft, peft_base = peft_model(config, [e.prompt.float().cpu() for e in entries],
                                 Path(tempfile.mkdtemp(prefix="tpv-bench-peers-peft-")))
    llm = vllm_engine(args) if args.vllm else None
    embeds = vllm_embeds(backbone, entries, texts) if args.vllm else None
    port = start_apps(args, store.uri, many_cache_bytes)
    print(f"{backbone.backbone_id} on {backbone.device} ({backbone.dtype}), {n} requests, {n} compositions, prompt "
          f"length {args.prompt_length}; apps up on 127.0.0.1:{port} in {time.perf_counter() - t0:.1f}s", flush=True)
    limits = httpx.Limits(max_connections=4 * max(n, args.many_concurrency),
                          max_keepalive_connections=4 * max(n, args.many_concurrency))
    main_client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/main", timeout=1200, limits=limits)

    classify_sides = {
        "tpv_http": lambda: http_classify(main_client, comps, srcs, args.labels),
        "tpv_library": lambda: library_classify(backbone, entries, srcs, args.labels),
        "peft": lambda: peft_classify(peft, peft_base, srcs, label_ids),
        "bare_batched": lambda: bare_classify(backbone, srcs, label_ids),
    }

    generate_sides = {
        "tpv_http": lambda tokens: mixed(main_client, comps, texts, tokens),
        "tpv_library": lambda tokens: library_generate(backbone, entries, texts, tokens),
        "peft": lambda tokens: peft_generate(peft, peft_base, texts, tokens, eos),
        "bare_batched": lambda tokens: bare_generate(backbone, texts, tokens, eos),
    }
    if llm is not None:
        generate_sides["vllm"] = lambda tokens: vllm_generate(llm, embeds, tokens)

    async def call(fn, *a):
        out = fn(*a)
        return await out if asyncio.iscoroutine(out) else out

    for side, fn in classify_sides.items():  # warm-up: every composition cached, the first batches run
        start = time.perf_counter()
        await call(fn)
        print(f"  warm-up classify {side}: {time.perf_counter() - start:.3f} s", flush=True)
    for side, fn in generate_sides.items():
        start = time.perf_counter()
        await call(fn, 2)
        print(f"  warm-up generate {side}: {time.perf_counter() - start:.3f} s", flush=True)
    seconds = {"classify": {s: [] for s in classify_sides}, "generate": {s: [] for s in generate_sides}}
    first_ms: dict[str, list[float]] = {s: [] for s in generate_sides}
    probs: dict[str, list] = {}
    gen: dict[str, list] = {}
    for r in range(args.rounds):
        for side in (list(classify_sides) if r % 2 == 0 else list(classify_sides)[::-1]):
            out = await call(classify_sides[side])
            took = out if isinstance(out, float) else out[0]
            seconds["classify"][side].append(took)
            print(f"  round {r} classify {side}: {took:.3f} s", flush=True)  # a slow machine's run shows progress
            if not isinstance(out, float):
                probs[side] = out[1]
        for side in (list(generate_sides) if r % 2 == 0 else list(generate_sides)[::-1]):
            out = await call(generate_sides[side], args.tokens)
            seconds["generate"][side].append(out[0])
            print(f"  round {r} generate {side}: {out[0]:.3f} s", flush=True)
            first_ms[side] += [f * 1000 for f in out[1]]
            gen[side] = out[2:]
        line = "; ".join(f"{task} " + ", ".join(f"{s} {n / v[-1]:.2f}" for s, v in sides.items())
                         for task, sides in seconds.items())
        print(f"round {r} (req/s): {line}", flush=True)

    # the HTTP side returns texts; the library its tokens and texts; PEFT, bare and vLLM their tokens
    lib_tokens, lib_texts = gen["tpv_library"]
    http_texts = gen["tpv_http"][0]
    equal = {
        "classify_max_prob_diff_http_vs_peft": max_diff(probs["tpv_http"], probs["peft"]),
        "classify_max_prob_diff_library_vs_peft": max_diff(probs["tpv_library"], probs["peft"]),
        "generate_rows_equal_library_vs_peft": same_rows(lib_tokens, gen["peft"][0]),
        "generate_rows_equal_http_vs_library": same_rows(http_texts, lib_texts),
        "rows": n, "tolerance": args.tolerance,
    }
    if "vllm" in gen:
        equal["generate_rows_equal_vllm_vs_library"] = same_rows(gen["vllm"][0], lib_tokens)
    equal["all"] = (equal["classify_max_prob_diff_http_vs_peft"] <= args.tolerance
                    and equal["classify_max_prob_diff_library_vs_peft"] <= args.tolerance
                    and equal["generate_rows_equal_library_vs_peft"] == n
                    and equal["generate_rows_equal_http_vs_library"] == n)
    equal = {k: (round(v, 8) if isinstance(v, float) else v) for k, v in equal.items()}

    many = None
    if args.many:
        many_client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/many", timeout=1200, limits=limits)
        many = await many_vs_one(args, many_client, srcs, entry_bytes, many_cache_bytes)
        await many_client.aclose()
    await main_client.aclose()
    import ray

    ray.shutdown()

    med = {task: {s: statistics.median(v) for s, v in sides.items()} for task, sides in seconds.items()}
    c, g = med["classify"], med["generate"]
    ratios = {"classify_vs_peft": c["peft"] / c["tpv_http"], "generate_vs_peft": g["peft"] / g["tpv_http"],
              "generate_vs_bare_batched": g["bare_batched"] / g["tpv_http"]}
    if many is not None:
        ratios["many_vs_one_composition"] = many["throughput_ratio"]
    targets = {k: {"target": TARGETS[k], "value": round(v, 3), "holds": round(v, 3) >= TARGETS[k]}
               for k, v in ratios.items()}
    profile = None
    if args.profile == "always" or (args.profile == "auto" and not all(t["holds"] for t in targets.values())):
        # the library sides and their peers once more, each under the profiler, Ray gone (nothing else running)
        profile = {
            "classify_tpv_library": profiled(classify_sides["tpv_library"], args.profile_top),
            "classify_peft": profiled(classify_sides["peft"], args.profile_top),
            "generate_tpv_library": profiled(lambda: generate_sides["tpv_library"](args.tokens), args.profile_top),
            "generate_peft": profiled(lambda: generate_sides["peft"](args.tokens), args.profile_top),
            "generate_bare_batched": profiled(lambda: generate_sides["bare_batched"](args.tokens), args.profile_top),
        }
        for side, prof in profile.items():
            ops = ", ".join(f"{o['op']} {o['self_ms']:.0f} ms ({o['share']:.0%})" for o in prof["top"][:5])
            print(f"  profile {side}: {prof['wall_s']:.3f} s wall, {prof['untraced_s']:.3f} s outside ops; {ops}")
    new_tokens = {s: sum(len(t) for t in gen[s][0]) for s in gen if s != "tpv_http"}
    print(f"{args.rounds} rounds, torch threads {args.threads}, load average {os.getloadavg()[0]:.2f}")
    for task, sides in med.items():
        for s, v in sides.items():
            extra = f", first token p50 {statistics.median(first_ms[s]):.0f} ms" if task == "generate" else ""
            print(f"  {task:>8} {s:>12}: {n / v:7.2f} req/s ({v:.3f} s){extra}")
    print(f"  new tokens generated: {new_tokens}; outputs: {equal}")
    if not equal["all"]:
        print("WARNING: tpv and PEFT disagree beyond the tolerance (see outputs_equal)")
    result = {
        **{k: round(v, 3) for k, v in ratios.items() if k != "many_vs_one_composition"},
        "classify_vs_bare_batched": round(c["bare_batched"] / c["tpv_http"], 3),
        "classify_library_vs_peft": round(c["peft"] / c["tpv_library"], 3),
        "generate_library_vs_peft": round(g["peft"] / g["tpv_library"], 3),
        "generate_library_vs_bare_batched": round(g["bare_batched"] / g["tpv_library"], 3),
        "http_vs_library": {"classify": round(c["tpv_library"] / c["tpv_http"], 3),
                            "generate": round(g["tpv_library"] / g["tpv_http"], 3)},
        "first_token_ms_p50": {s: round(statistics.median(v), 1) for s, v in first_ms.items()},
        "outputs_equal": equal,
        "new_tokens": new_tokens,
        "seconds": {task: {s: [round(x, 3) for x in v] for s, v in sides.items()} for task, sides in seconds.items()},
        "many_vs_one_composition": many,
        "targets": targets,
        "profile": profile,
        "peft_mixes_prompt_adapters_in_one_batch": False,
        "model": backbone.backbone_id, "device": str(backbone.device), "requests": n, "tokens": args.tokens,
        "rounds": args.rounds, "threads": args.threads, "load_average_1m_start": round(load_start, 2),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    if "vllm" in g:
        import vllm

        result["generate_vs_vllm_prompt_embeds"] = round(g["vllm"] / g["tpv_http"], 3)
        result["vllm_version"] = vllm.__version__
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
