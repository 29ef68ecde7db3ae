"""Load and fault test of the Serve app on a local Ray: the split app (HTTP ingress -> model deployment) against a
one-deployment baseline, valid and malformed requests mixed, then a model replica killed under load.

Phase 0 (split overhead): the same valid requests, one at a time, alternately to the split app and to a
one-deployment baseline (the same ingress code with the model object in its own process, no handle hop);
p50/p99 of each and their difference are what the split adds.
Phase 1 (steady): valid requests (classify under 16 different compositions and a stored one, some generate,
some listings) at concurrency 32 with malformed ones shuffled in. Must hold: 0 errors on valid requests, every
malformed one answered 4xx. p50/p99 latency of the valid ones reported.
Phase 2 (fault): valid requests at concurrency 32; after the first `--kill-after` answers one MODEL replica is
killed (`ray.kill`, the process dies as in a crash). Requests in flight on it are re-sent by the ingress to the
other replica: every request of the phase must succeed (`errors_during_fault` 0), before and after Serve
replaces the replica. Then one more burst checks the recovered app.

Only 127.0.0.1 is contacted. The real default backbone is used (prepared under TPV_HOME on first load).

    python bench/serve_load.py [--requests 1000] [--malformed 200] [--concurrency 32] [--replicas 2]
                               [--fault-requests 400] [--overhead-requests 100] [--backbone smollm2-135m-instruct]

Last line: {"valid_errors": .., "malformed_not_4xx": .., "p50_ms": .., "p99_ms": .., "throughput_rps": ..,
"recovery_s": .., "errors_during_fault": .., "errors_after_recovery": .., "resent_after_kill": .., "split_p50_ms": .., "split_p99_ms": ..,
"one_deployment_p50_ms": .., "one_deployment_p99_ms": .., "split_added_p50_ms": .., "split_added_p99_ms": ..}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import sys
import tempfile
import time
import types
from pathlib import Path

import httpx2 as httpx  # huggingface_hub (via transformers) installs it: no extra dependency
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tpv.store import VectorStore  # noqa: E402
from tpv.vectors import TaskPromptVector  # noqa: E402

APP = "tpv-load"
MONO = "tpv-load-mono"
L = 50
TASKS = ["rotten_tomatoes", "tweets", "trec", "sms_spam"]
TEXTS = [
    "a gripping, beautifully acted story", "the plot drags and the jokes fall flat", "what a waste of two hours",
    "an honest, warm and very funny film", "where is the eiffel tower?", "who wrote the odyssey?",
    "win a free cruise, text now", "see you at lunch tomorrow", "the best thing i have seen all year",
    "i want my money back", "how many people live in tokyo?", "call me when you land",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_store(backbone_id: str, hidden: int) -> VectorStore:
    store = VectorStore(tempfile.mkdtemp(prefix="tpv-load-store-"))
    g = torch.Generator().manual_seed(0)
    for task in TASKS:
        for seed in range(2):
            tau = torch.randn(L, hidden, generator=g) * 0.01
            store.put(TaskPromptVector.create(tau, task=task, backbone_id=backbone_id, origin_seed=seed))
    store.put_composition(backbone_id, "sentiment-mix", {
        "backbone_id": backbone_id, "origin_seed": 0, "prompt_length": L,
        "terms": [{"task": "rotten_tomatoes", "weight": 0.6}, {"task": "tweets", "weight": 0.4}]})
    return store


def compositions() -> list:
    comps: list = ["sentiment-mix"]
    for i in range(16):
        comps.append({"terms": [{"task": TASKS[i % 4], "weight": round(0.4 + 0.05 * i, 2)},
                                {"task": TASKS[(i + 1) % 4], "weight": round(0.3 - 0.02 * i, 2)}],
                      "origin_seed": i % 3})
    return comps


def valid_request(rng: random.Random, comps: list) -> tuple[str, str, str | None]:
    """(method, path, json body)"""
    r = rng.random()
    comp = rng.choice(comps)
    texts = rng.sample(TEXTS, rng.choice([1, 1, 1, 2]))
    if r < 0.04:
        return "GET", "/v1/vectors", None
    if r < 0.08:
        return "POST", "/v1/generate", json.dumps({"inputs": texts[:1], "composition": comp, "task": "trec",
                                                   "max_new_tokens": 3})
    if r < 0.3:
        return "POST", "/v1/classify", json.dumps({"inputs": texts, "composition": comp,
                                                   "labels": ["no", "yes"], "template": "is this good? {text} answer:"})
    task = rng.choice(["rotten_tomatoes", "tweets", "sms_spam"])
    return "POST", "/v1/classify", json.dumps({"inputs": texts, "composition": comp, "task": task})


MALFORMED = [
    '{"inputs": ["x"], "task": "rotten_tomatoes", "composition": ',  # truncated JSON
    '{"inputs": ["x"], "task": "rotten_tomatoes", "composition": {"terms": [{"task": "tweets", "weight": NaN}]}}',
    '{"inputs": ["x"], "task": "rotten_tomatoes", "composition": {"terms": [{"task": "tweets", "weight": Infinity}]}}',
    json.dumps({"inputs": ["x"], "task": "rotten_tomatoes",
                "composition": {"terms": [{"task": "tweets", "weight": 1e9}]}}),
    json.dumps({"inputs": ["x"], "task": "rotten_tomatoes", "composition": {"terms": [{"task": "no_such_task"}]}}),
    json.dumps({"inputs": ["x"], "task": "rotten_tomatoes", "composition": {"terms": [{"vector_id": "nope-s0-1"}]}}),
    json.dumps({"inputs": ["x"], "task": "no_such_task", "composition": "sentiment-mix"}),
    json.dumps({"inputs": ["x"], "task": "rotten_tomatoes", "composition": "no-such-composition"}),
    json.dumps({"inputs": ["x"], "task": "rotten_tomatoes", "composition": {"terms": [{"task": "tweets"}] * 20}}),
    json.dumps({"inputs": [], "task": "rotten_tomatoes", "composition": "sentiment-mix"}),
    json.dumps({"inputs": [""], "task": "rotten_tomatoes", "composition": "sentiment-mix"}),
    json.dumps({"inputs": ["word " * 2000], "task": "rotten_tomatoes", "composition": "sentiment-mix"}),
    json.dumps({"inputs": ["x"] * 500, "task": "rotten_tomatoes", "composition": "sentiment-mix"}),
    json.dumps({"inputs": ["x"], "task": "rotten_tomatoes", "composition": "../../etc/passwd"}),
    json.dumps({"inputs": ["x"], "task": "rotten_tomatoes", "composition": {"terms": [{"task": "a/b"}]}}),
    json.dumps({"inputs": ["x"], "task": "rotten_tomatoes",
                "composition": {"terms": [{"task": "tweets"}], "backbone_id": "gemma3-270m"}}),
    json.dumps({"inputs": ["x"], "task": "rotten_tomatoes", "composition": {"terms": [{"task": "tweets"}],
                                                                           "method": "magic"}}),
    json.dumps({"inputs": ["x"], "labels": ["a", "a"], "composition": "sentiment-mix"}),
    json.dumps({"inputs": ["x"], "task": "trec", "composition": "sentiment-mix", "max_new_tokens": 100000}),
    "[1, 2, 3]",
]


async def send(client: httpx.AsyncClient, method: str, path: str, body: str | None) -> tuple[int, float]:
    start = time.perf_counter()
    try:
        if method == "GET":
            r = await client.get(path)
        else:
            r = await client.post(path, content=body, headers={"content-type": "application/json"})
        status = r.status_code
    except httpx.HTTPError:
        status = -1  # connection-level failure
    return status, time.perf_counter() - start


async def run_load(client, jobs: list, concurrency: int, on_done=None) -> list[dict]:
    """jobs: (kind, method, path, body); returns one record per job with start/end times and status."""
    queue: asyncio.Queue = asyncio.Queue()
    for j in jobs:
        queue.put_nowait(j)
    records: list[dict] = []

    async def worker():
        while True:
            try:
                kind, method, path, body = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            started = time.time()
            status, seconds = await send(client, method, path, body)
            records.append({"kind": kind, "path": path, "status": status, "seconds": seconds, "started": started,
                            "ended": time.time()})
            if on_done is not None:
                await on_done(len(records))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def model_replicas() -> list[str]:
    """Actor names of the live model replicas (Serve names them SERVE_REPLICA::<app>#<deployment>#<id>)."""
    import ray

    names = ray.util.list_named_actors(all_namespaces=True)
    return sorted(a["name"] for a in names if a["name"].startswith(f"SERVE_REPLICA::{APP}#TPVModel#"))


def deployment_healthy(replicas: int) -> bool:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or "TPVModel" not in app.deployments:
        return False
    dep = app.deployments["TPVModel"]
    running = dep.replica_states.get("RUNNING", 0)
    return str(dep.status).endswith("HEALTHY") and running >= replicas and sum(dep.replica_states.values()) == running


def one_deployment_app(model_config: dict, ingress_config: dict):
    """The baseline: the same ingress code and model class in ONE deployment (the model object lives in the
    ingress's process and is awaited directly, with no handle hop)."""
    from ray import serve

    from serve.app import TPVIngress
    from serve.model import TPVModel

    class Local:
        """The model object called like a handle: `.method.remote(*args)` is the coroutine itself."""

        def __init__(self, model) -> None:
            self.model = model

        def __getattr__(self, name: str):
            return types.SimpleNamespace(remote=getattr(self.model, name))

    class OneDeployment(TPVIngress.func_or_class):
        async def __init__(self, model_config: dict) -> None:  # Serve's ingress classes initialise asynchronously
            model = TPVModel.func_or_class()
            model.reconfigure(model_config)
            await super().__init__(Local(model))

    deployment = serve.deployment(OneDeployment, name="TPVOneDeployment", max_ongoing_requests=64,
                                  ray_actor_options={"num_cpus": 1}, user_config=ingress_config)
    return deployment.bind(model_config)


async def wait_healthy(client, path: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if (await client.get(path)).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.5)
    raise SystemExit(f"{path} did not become healthy within {timeout}s")


async def overhead(client, rng: random.Random, comps: list, n: int) -> dict:
    """The same requests, sequentially, alternating between the split app and the one-deployment baseline."""
    lat: dict[str, list[float]] = {"split": [], "one": []}
    errors = 0
    for i in range(n):
        texts = rng.sample(TEXTS, 1)
        body = json.dumps({"inputs": texts, "composition": rng.choice(comps), "task": "rotten_tomatoes"})
        order = [("split", ""), ("one", "/mono")][:: 1 if i % 2 else -1]
        for name, prefix in order:
            status, seconds = await send(client, "POST", f"{prefix}/v1/classify", body)
            errors += status != 200
            lat[name].append(seconds * 1000)
    out = {f"{k}_p{q}_ms": round(pct(v, q), 1) for k, v in lat.items() for q in (50, 99)}
    print(f"phase 0: {n} requests each, one at a time: split p50 {out['split_p50_ms']} / p99 {out['split_p99_ms']} ms, "
          f"one deployment p50 {out['one_p50_ms']} / p99 {out['one_p99_ms']} ms ({errors} errors)", flush=True)
    return {"split_p50_ms": out["split_p50_ms"], "split_p99_ms": out["split_p99_ms"],
            "one_deployment_p50_ms": out["one_p50_ms"], "one_deployment_p99_ms": out["one_p99_ms"],
            "split_added_p50_ms": round(out["split_p50_ms"] - out["one_p50_ms"], 1),
            "split_added_p99_ms": round(out["split_p99_ms"] - out["one_p99_ms"], 1), "overhead_errors": errors}


async def main_async(args) -> dict:
    import ray
    from ray import serve

    from serve.app import build
    from tpv.backbone import Backbone, BackboneConfig

    t0 = time.perf_counter()
    probe = Backbone.load(BackboneConfig(model=args.backbone, device="cpu"))  # prepares the bundled model once
    store = make_store(probe.backbone_id, probe.hidden_size)
    del probe
    env = {k: os.environ[k] for k in ("TPV_HOME",) if k in os.environ}
    env["TOKENIZERS_PARALLELISM"] = "false"
    ray.init(num_cpus=args.num_cpus or max(os.cpu_count(), args.replicas + 1), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = {"store_uri": store.uri, "backbone": args.backbone, "device": "cpu", "max_batch_size": 32,
              "batch_wait_timeout_s": 0.02, "reload_interval_s": 2.0, "torch_threads": args.threads}
    ingress = {"model_retries": args.retries}
    serve.run(build({"user_config": config, "num_replicas": args.replicas, "max_ongoing_requests": 64,
                     "ray_actor_options": {"num_cpus": 1}},
                    {"user_config": ingress, "ray_actor_options": {"num_cpus": 0}}), name=APP, route_prefix="/")
    serve.run(one_deployment_app(config, ingress), name=MONO, route_prefix="/mono")
    print(f"split app (ingress + {args.replicas} model replicas) and one-deployment baseline up on 127.0.0.1:{port} "
          f"in {time.perf_counter() - t0:.1f}s", flush=True)

    rng = random.Random(0)
    comps = compositions()
    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120, limits=limits) as client:
        # warm every composition's cached prefix on every replica (not timed)
        warm = [("valid", "POST", "/v1/classify", json.dumps({"inputs": ["hi"], "composition": c,
                                                               "task": "rotten_tomatoes"}))
                for c in comps for _ in range(args.replicas * 2)]
        await run_load(client, warm, args.concurrency)
        await wait_healthy(client, "/mono/v1/health")
        await run_load(client, [("valid", "POST", f"/mono{p}", b) for _, _, p, b in warm], args.concurrency)

        # ---- phase 0: what the split adds, against one deployment, side by side ----
        split = await overhead(client, rng, comps, args.overhead_requests)
        serve.delete(MONO)  # its CPU goes back to the load phases

        # ---- phase 1: steady load, valid and malformed mixed ----
        jobs = [("valid", *valid_request(rng, comps)) for _ in range(args.requests)]
        jobs += [("malformed", "POST", "/v1/classify" if "max_new_tokens" not in m else "/v1/generate", m)
                 for m in (MALFORMED * (args.malformed // len(MALFORMED) + 1))[: args.malformed]]
        rng.shuffle(jobs)
        start = time.perf_counter()
        records = await run_load(client, jobs, args.concurrency)
        wall = time.perf_counter() - start
        valid = [r for r in records if r["kind"] == "valid"]
        bad = [r for r in records if r["kind"] == "malformed"]
        valid_errors = [r for r in valid if r["status"] != 200]
        not_4xx = [r for r in bad if not 400 <= r["status"] < 500]
        lat = [r["seconds"] * 1000 for r in valid]
        health = (await client.get("/v1/health")).json()["batching"]
        print(f"phase 1: {len(valid)} valid ({len(valid_errors)} errors), {len(bad)} malformed "
              f"({len(not_4xx)} not 4xx; statuses {sorted({r['status'] for r in bad})}), {wall:.1f}s, "
              f"{len(records) / wall:.1f} req/s; latency p50 {pct(lat, 50):.0f} ms, p99 {pct(lat, 99):.0f} ms, "
              f"max {max(lat):.0f} ms", flush=True)
        print(f"  one replica's batching: {health['batches']} batches, {health['requests']} requests, "
              f"{health['forwards']} forwards, up to {health['max_requests_in_batch']} requests and "
              f"{health['max_compositions_in_forward']} compositions in one forward", flush=True)
        for r in valid_errors[:5]:
            print("  valid error:", r, flush=True)

        # ---- phase 2: kill a replica under load ----
        before = model_replicas()
        victim = before[0]
        state: dict = {"killed_at": None, "recovered_at": None}

        async def on_done(done: int):
            if done == args.kill_after and state["killed_at"] is None:
                ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
                state["killed_at"] = time.time()
                print(f"phase 2: killed model replica {victim} after {done} answers", flush=True)

        async def watch_recovery():
            while state["killed_at"] is None:
                await asyncio.sleep(0.1)
            while True:
                await asyncio.sleep(0.25)
                healthy = await asyncio.get_running_loop().run_in_executor(None, deployment_healthy, args.replicas)
                if healthy:
                    now = model_replicas()
                    if len(now) >= args.replicas and victim not in now:
                        state["recovered_at"] = time.time()
                        return
                if time.time() - state["killed_at"] > args.recovery_timeout:
                    return

        fault_jobs = [("valid", *valid_request(rng, comps)) for _ in range(args.fault_requests)]
        watcher = asyncio.create_task(watch_recovery())
        fault = await run_load(client, fault_jobs, args.concurrency, on_done)
        await watcher
        killed, recovered = state["killed_at"], state["recovered_at"]
        if recovered is None:
            raise SystemExit(f"the replica killed at {killed} was not replaced within {args.recovery_timeout}s")
        during = [r for r in fault if r["status"] != 200 and r["started"] < recovered]
        after = [r for r in fault if r["status"] != 200 and r["started"] >= recovered]
        # a burst started after recovery: every request must succeed
        burst = await run_load(client, [("valid", *valid_request(rng, comps)) for _ in range(args.burst)],
                               args.concurrency)
        after += [r for r in burst if r["status"] != 200]
        resent = (await client.get("/v1/health")).json()["resent"]
        print(f"phase 2: {resent} requests re-sent by the ingress after the kill", flush=True)
        print(f"phase 2: {len(fault)} valid requests; replica replaced in {recovered - killed:.1f}s "
              f"({before} -> {model_replicas()}); {len(during)} failed before recovery "
              f"(statuses {sorted({r['status'] for r in during})}), {len(after)} failed after recovery "
              f"(incl. a {args.burst}-request burst)", flush=True)
    serve.delete(APP)
    serve.shutdown()
    ray.shutdown()
    return {
        "valid_errors": len(valid_errors), "malformed_not_4xx": len(not_4xx),
        "p50_ms": round(pct(lat, 50), 1), "p99_ms": round(pct(lat, 99), 1),
        "throughput_rps": round(len(records) / wall, 2), "recovery_s": round(recovered - killed, 2),
        "errors_during_fault": len(during), "errors_after_recovery": len(after), "resent_after_kill": resent,
        **split,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--malformed", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--num-cpus", type=int, default=None, help="Ray CPUs (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    parser.add_argument("--fault-requests", type=int, default=400)
    parser.add_argument("--kill-after", type=int, default=100)
    parser.add_argument("--burst", type=int, default=100)
    parser.add_argument("--recovery-timeout", type=float, default=180)
    parser.add_argument("--overhead-requests", type=int, default=100, help="phase 0 requests per app")
    parser.add_argument("--retries", type=int, default=4, help="the ingress's model_retries")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    ok = (result["valid_errors"] == 0 and result["malformed_not_4xx"] == 0 and result["errors_during_fault"] == 0
          and result["errors_after_recovery"] == 0 and result["overhead_errors"] == 0)
    print("PASS" if ok else "FAIL")
    print(json.dumps(result))
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
