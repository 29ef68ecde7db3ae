"""Load and fault test of the Serve app on a local Ray: valid and malformed requests mixed, then a replica killed.

Phase 1 (steady): 1,000 valid requests (classify under 16 different compositions and a stored one, some generate,
some listings) at concurrency 32 with 200 malformed ones shuffled in. Must hold: 0 errors on valid requests,
every malformed one answered 4xx. p50/p99 latency of the valid ones reported.
Phase 2 (fault): valid requests at concurrency 32; after the first 100 answers one replica process is killed
(SIGKILL by pid). Serve must replace it; requests that started after recovery (the deployment HEALTHY again with
all replicas running, a new replica answering) must all succeed. Then one more burst checks the recovered app.

Only 127.0.0.1 is contacted. The real default backbone is used (prepared under TPV_HOME on first load).

    python bench/serve_load.py [--requests 1000] [--malformed 200] [--concurrency 32] [--replicas 2]
                               [--fault-requests 400] [--backbone smollm2-135m-instruct]

Last line: {"valid_errors": .., "malformed_not_4xx": .., "p50_ms": .., "p99_ms": .., "throughput_rps": ..,
"recovery_s": .., "errors_during_fault": .., "errors_after_recovery": ..}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tpv.store import VectorStore  # noqa: E402
from tpv.vectors import TaskPromptVector  # noqa: E402

APP = "tpv-load"
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


async def replica_pids(client, replicas: int, tries: int = 200) -> set[int]:
    pids: set[int] = set()
    for _ in range(tries):
        r = await client.get("/v1/health")
        if r.status_code == 200:
            pids.add(r.json()["pid"])
        if len(pids) >= replicas:
            break
    return pids


def deployment_healthy(replicas: int) -> bool:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None:
        return False
    dep = next(iter(app.deployments.values()))
    running = dep.replica_states.get("RUNNING", 0)
    return str(dep.status).endswith("HEALTHY") and running >= replicas and sum(dep.replica_states.values()) == running


async def main_async(args) -> dict:
    import ray
    from ray import serve

    from serve.app import TPVServer
    from tpv.backbone import Backbone, BackboneConfig

    t0 = time.perf_counter()
    probe = Backbone.load(BackboneConfig(model=args.backbone, device="cpu"))  # prepares the bundled model once
    store = make_store(probe.backbone_id, probe.hidden_size)
    del probe
    env = {k: os.environ[k] for k in ("TPV_HOME",) if k in os.environ}
    env["TOKENIZERS_PARALLELISM"] = "false"
    ray.init(num_cpus=args.num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = {"store_uri": store.uri, "backbone": args.backbone, "device": "cpu", "max_batch_size": 32,
              "batch_wait_timeout_s": 0.02, "reload_interval_s": 2.0, "torch_threads": args.threads}
    serve.run(TPVServer.options(user_config=config, num_replicas=args.replicas, max_ongoing_requests=64,
                                ray_actor_options={"num_cpus": 1}).bind(), name=APP, route_prefix="/")
    print(f"app up on 127.0.0.1:{port} with {args.replicas} replicas in {time.perf_counter() - t0:.1f}s", flush=True)

    rng = random.Random(0)
    comps = compositions()
    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120, limits=limits) as client:
        # warm every composition's cached prefix on every replica (not timed)
        warm = [("valid", "POST", "/v1/classify", json.dumps({"inputs": ["hi"], "composition": c,
                                                               "task": "rotten_tomatoes"}))
                for c in comps for _ in range(args.replicas * 2)]
        await run_load(client, warm, args.concurrency)

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
        pids = await replica_pids(client, args.replicas)
        victim = sorted(pids)[0]
        state: dict = {"killed_at": None, "recovered_at": None}

        async def on_done(done: int):
            if done == args.kill_after and state["killed_at"] is None:
                os.kill(victim, signal.SIGKILL)
                state["killed_at"] = time.time()
                print(f"phase 2: killed replica pid {victim} after {done} answers", flush=True)

        async def watch_recovery():
            while state["killed_at"] is None:
                await asyncio.sleep(0.1)
            while True:
                await asyncio.sleep(0.25)
                healthy = await asyncio.get_running_loop().run_in_executor(None, deployment_healthy, args.replicas)
                if healthy:
                    now = await replica_pids(client, args.replicas, tries=50)
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
        pids_after = await replica_pids(client, args.replicas)
        print(f"phase 2: {len(fault)} valid requests; replica replaced in {recovered - killed:.1f}s "
              f"(pids {sorted(pids)} -> {sorted(pids_after)}); {len(during)} failed before recovery "
              f"(statuses {sorted({r['status'] for r in during})}), {len(after)} failed after recovery "
              f"(incl. a {args.burst}-request burst)", flush=True)
    serve.delete(APP)
    serve.shutdown()
    ray.shutdown()
    return {
        "valid_errors": len(valid_errors), "malformed_not_4xx": len(not_4xx),
        "p50_ms": round(pct(lat, 50), 1), "p99_ms": round(pct(lat, 99), 1),
        "throughput_rps": round(len(records) / wall, 2), "recovery_s": round(recovered - killed, 2),
        "errors_during_fault": len(during), "errors_after_recovery": len(after),
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
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    ok = result["valid_errors"] == 0 and result["malformed_not_4xx"] == 0 and result["errors_after_recovery"] == 0
    print("PASS" if ok else "FAIL")
    print(json.dumps(result))
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
