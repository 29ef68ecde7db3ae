"""Load, hostile-client and fault test of the Serve app on a local Ray: the split app (HTTP ingress -> model
deployment) against a one-deployment baseline, valid and malformed requests mixed, floods of costly bodies and
crowds of dripping clients, then a model replica killed under load.

Phase 0 (split overhead): the same valid requests, one at a time, alternately to the split app and to a
one-deployment baseline (the same ingress code with the model object in its own process, no handle hop);
p50/p99 of each and their difference are what the split adds.
Phase 1 (steady): valid requests (classify under 16 different compositions and a stored one, some generate,
some listings) at concurrency 32 with malformed ones shuffled in. Must hold: 0 errors on valid requests, every
malformed one answered 4xx. p50/p99 latency of the valid ones reported.
Phase 2 (hostile): /v1/health polled and valid classify requests sent one after another (each ~0.1 s after the
last answer), first with nothing else going on (the unloaded p99s), then during each attack:
  FLOOD: `--flood-bodies` in-limit but costly bodies (~1.7 MB, 130,000 unknown keys in one object) posted to
  /v1/classify at concurrency `--flood-concurrency`; each must be refused with a short (capped) 422.
  DRIP: the ingress's slow_body_slots + `--drip-extra` connections, each dripping a byte of its body every
  `--drip-every-s` for `--drip-s` seconds and reconnecting when cut off; the ones without a slot are cut off
  (408) once they fall behind, the rest after body_read_timeout_s.
Targets (printed, not asserted): health p99 <= 1 s and valid p99 <= 3x the unloaded valid p99 during each attack.
Must hold: every valid request and health check of the phase answered 200.
Phase 3 (fault): valid requests at concurrency 32; after the first `--kill-after` answers one MODEL replica is
killed (`ray.kill`, the process dies as in a crash). Requests in flight on it are re-sent by the ingress to the
other replica: every request of the phase must succeed (`errors_during_fault` 0), before and after Serve
replaces the replica. Then one more burst checks the recovered app.

Only 127.0.0.1 is contacted. The real default backbone is used (prepared under TPV_HOME on first load).

    python bench/serve_load.py [--requests 1000] [--malformed 200] [--concurrency 32] [--replicas 2]
                               [--fault-requests 400] [--overhead-requests 100] [--backbone smollm2-135m-instruct]
                               [--unloaded-requests 50] [--flood-bodies 32] [--flood-concurrency 16]
                               [--drip-extra 4] [--drip-s 25] [--drip-every-s 0.5]
    python bench/serve_load.py --smoke --backbone DIR    # CI: every phase once, small counts (well under a minute)

Last line: {"valid_errors": .., "malformed_not_4xx": .., "p50_ms": .., "p99_ms": .., "throughput_rps": ..,
"recovery_s": .., "errors_during_fault": .., "errors_after_recovery": .., "resent_after_kill": .., "split_p50_ms": .., "split_p99_ms": ..,
"one_deployment_p50_ms": .., "one_deployment_p99_ms": .., "split_added_p50_ms": .., "split_added_p99_ms": ..,
"unloaded_valid_p99_s": .., "unloaded_health_p99_s": .., "flood_valid_p99_s": .., "flood_health_p99_s": ..,
"drip_valid_p99_s": .., "drip_health_p99_s": .., "hostile_valid_errors": .., "hostile_health_errors": ..,
"flood_bodies": .., "flood_not_422": .., "drips": .., "slow_body_slots": .., "drip_cut_off": .., "drip_not_408": ..}
(the hostile phase's valid requests are counted in hostile_valid_errors, not valid_errors, which is phase 1's)
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

from grid_args import parse_with_smoke  # noqa: E402
from serve.settings import IngressSettings  # noqa: E402
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


UNKNOWN_KEYS = 130_000  # one object with this many unknown keys: ~1.7 MB, under max_body_bytes, costly to parse


def flood_body(max_body_bytes: int) -> bytes:
    """A valid classify request plus UNKNOWN_KEYS unknown keys: in the byte limit, refused (422) by the parser."""
    base = {"inputs": TEXTS[:2], "composition": "sentiment-mix", "task": "rotten_tomatoes"}
    body = json.dumps({**base, **{f"k{i}": 1 for i in range(UNKNOWN_KEYS)}}).encode()
    if not 1_500_000 < len(body) < max_body_bytes:
        raise SystemExit(f"the flood body is {len(body)} bytes; it must be costly (> 1.5 MB) yet under the ingress's "
                         f"max_body_bytes ({max_body_bytes})")
    return body


async def pressure(client, comps: list, attack=None, valid_count: int = 0) -> tuple[list, list]:
    """Health polled and valid classify requests sent one after another (each ~0.1 s after the last answer) until
    `attack()` returns (or, with no attack, until `valid_count` valid requests were answered): ([(status, s)] of
    the health checks, [(status, s)] of the valid requests). Each measurer's last request, started during the
    attack, is awaited and counted."""
    done = asyncio.Event()
    health: list[tuple[int, float]] = []
    valid: list[tuple[int, float]] = []

    async def pause() -> None:
        try:
            await asyncio.wait_for(done.wait(), 0.1)
        except asyncio.TimeoutError:
            pass

    async def poll_health() -> None:
        while not done.is_set():
            health.append(await send(client, "GET", "/v1/health", None))
            await pause()

    async def send_valid() -> None:
        while not done.is_set():
            body = json.dumps({"inputs": [TEXTS[len(valid) % len(TEXTS)]], "task": "rotten_tomatoes",
                               "composition": comps[len(valid) % len(comps)]})
            valid.append(await send(client, "POST", "/v1/classify", body))
            if attack is None and len(valid) >= valid_count:
                done.set()
            await pause()

    measurers = [asyncio.create_task(poll_health()), asyncio.create_task(send_valid())]
    try:
        if attack is not None:
            await attack()
            done.set()
        await asyncio.gather(*measurers)
    finally:
        done.set()
        for t in measurers:
            t.cancel()
    return health, valid


async def flood(port: int, body: bytes, count: int, concurrency: int) -> list[tuple[int, bytes]]:
    """`count` posts of `body` to /v1/classify, `concurrency` at a time, on their own connections: (status, answer)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    answers: list[tuple[int, bytes]] = []
    queue: asyncio.Queue = asyncio.Queue()
    for _ in range(count):
        queue.put_nowait(body)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120, limits=limits) as attacker:
        async def worker():
            while not queue.empty():
                content = queue.get_nowait()
                try:
                    r = await attacker.post("/v1/classify", content=content,
                                            headers={"content-type": "application/json"})
                    answers.append((r.status_code, r.content))
                except httpx.HTTPError as exc:
                    answers.append((-1, repr(exc).encode()))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return answers


async def drip(port: int, stop: asyncio.Event, every_s: float, statuses: list[int]) -> None:
    """One client dripping a byte of a 5000-byte body every `every_s`, reconnecting when the server answers (its
    status is recorded; -1 for a connection dropped without an answer) until `stop` is set."""
    head = (f"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            "Content-Length: 5000\r\n\r\n").encode()
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            statuses.append(-1)
            return  # the port refuses connections: recorded, no retry loop
        answer = b""
        try:
            writer.write(head)
            await writer.drain()
            while not stop.is_set():
                try:  # the answer, or after every_s the next byte
                    answer = await asyncio.wait_for(reader.read(65536), every_s)
                    break
                except asyncio.TimeoutError:
                    writer.write(b" ")
                    await writer.drain()
        except (ConnectionError, OSError):  # cut off while writing: the answer may be waiting to be read
            try:
                answer = await asyncio.wait_for(reader.read(65536), every_s)
            except (asyncio.TimeoutError, ConnectionError, OSError):
                pass
        finally:
            writer.close()
        if not stop.is_set():
            parts = answer.split(b" ", 2)
            statuses.append(int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1)


def p99_s(samples: list[tuple[int, float]]) -> float:
    return round(pct([seconds for _, seconds in samples], 99), 4)


async def hostile(client, port: int, comps: list, args, ingress: IngressSettings) -> dict:
    """Phase 2: the unloaded p99s, then health and valid p99 during a FLOOD of costly bodies and a DRIP crowd."""
    health, valid = await pressure(client, comps, valid_count=args.unloaded_requests)
    samples = {"unloaded": (health, valid)}

    body = flood_body(ingress.limits.max_body_bytes)
    answers: list[tuple[int, bytes]] = []

    async def flood_attack():
        answers.extend(await flood(port, body, args.flood_bodies, args.flood_concurrency))

    start = time.perf_counter()
    samples["flood"] = await pressure(client, comps, flood_attack)
    flood_wall = time.perf_counter() - start
    # refused as it must be: 422, a short (capped) answer naming the key count, not the 130,000 field errors
    refused = [a for s, a in answers if s == 422 and len(a) < 2000 and b"keys" in a]
    flood_not_422 = len(answers) - len(refused)
    print(f"phase 2 flood: {len(answers)} bodies of {len(body) / 1e6:.2f} MB at concurrency {args.flood_concurrency} "
          f"in {flood_wall:.1f}s; {len(refused)} refused with a capped 422 (statuses "
          f"{sorted({s for s, _ in answers})}, longest answer {max(len(a) for _, a in answers)} bytes)", flush=True)

    slots = ingress.slow_body_slots
    drips = slots + args.drip_extra
    stop = asyncio.Event()
    statuses: list[int] = []

    async def drip_attack():
        crowd = [asyncio.create_task(drip(port, stop, args.drip_every_s, statuses)) for _ in range(drips)]
        try:
            await asyncio.wait_for(stop.wait(), args.drip_s)
        except asyncio.TimeoutError:
            pass
        stop.set()
        await asyncio.gather(*crowd)

    samples["drip"] = await pressure(client, comps, drip_attack)
    cut_off = statuses.count(408)
    print(f"phase 2 drip: {drips} clients (slow_body_slots {slots}) dripping a byte every {args.drip_every_s:g}s "
          f"for {args.drip_s:g}s: {cut_off} cut off with 408, other answers {sorted(set(statuses) - {408})}",
          flush=True)

    out: dict = {}
    for name, (health, valid) in samples.items():
        out[f"{name}_valid_p99_s"], out[f"{name}_health_p99_s"] = p99_s(valid), p99_s(health)
    base = out["unloaded_valid_p99_s"]
    for name in ("unloaded", "flood", "drip"):
        health, valid = samples[name]
        line = (f"phase 2 {name}: {len(valid)} valid requests, p99 {out[f'{name}_valid_p99_s']:.3f}s; "
                f"{len(health)} health checks, p99 {out[f'{name}_health_p99_s']:.3f}s")
        if name != "unloaded":
            ok_h, ok_v = out[f"{name}_health_p99_s"] <= 1.0, out[f"{name}_valid_p99_s"] <= 3 * base
            line += (f"  [target health <= 1 s: {'met' if ok_h else 'MISSED'}; valid <= 3x unloaded "
                     f"({3 * base:.3f}s): {'met' if ok_v else 'MISSED'}]")
        print(line, flush=True)
    out["hostile_valid_errors"] = sum(s != 200 for h, v in samples.values() for s, _ in v)
    out["hostile_health_errors"] = sum(s != 200 for h, v in samples.values() for s, _ in h)
    out.update(flood_bodies=len(answers), flood_not_422=flood_not_422, drips=drips, slow_body_slots=slots,
               drip_cut_off=cut_off, drip_not_408=len(statuses) - cut_off)
    return out


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
    ingress_settings = IngressSettings.model_validate(ingress)  # what the ingress enforces (the slots, the limits)
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

        # ---- phase 2: hostile clients, health and valid latency measured during each attack ----
        attacks = await hostile(client, port, comps, args, ingress_settings)

        # ---- phase 3: kill a replica under load ----
        before = model_replicas()
        victim = before[0]
        state: dict = {"killed_at": None, "recovered_at": None}

        async def on_done(done: int):
            if done == args.kill_after and state["killed_at"] is None:
                ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
                state["killed_at"] = time.time()
                print(f"phase 3: killed model replica {victim} after {done} answers", flush=True)

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
        print(f"phase 3: {resent} requests re-sent by the ingress after the kill", flush=True)
        print(f"phase 3: {len(fault)} valid requests; replica replaced in {recovered - killed:.1f}s "
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
        **split, **attacks,
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
    parser.add_argument("--unloaded-requests", type=int, default=50,
                        help="phase 2: valid requests sent with no attack (the unloaded p99)")
    parser.add_argument("--flood-bodies", type=int, default=32, help="phase 2: costly 1.7 MB bodies posted")
    parser.add_argument("--flood-concurrency", type=int, default=16)
    parser.add_argument("--drip-extra", type=int, default=4, help="phase 2: drippers beyond the slow-body slots")
    parser.add_argument("--drip-s", type=float, default=25.0, help="phase 2: how long the drip crowd runs")
    parser.add_argument("--drip-every-s", type=float, default=0.5, help="phase 2: seconds between dripped bytes")
    args = parse_with_smoke(parser, None, {
        "requests": 40, "malformed": len(MALFORMED), "concurrency": 8, "fault_requests": 40, "kill_after": 10,
        "burst": 10, "overhead_requests": 5, "unloaded_requests": 10, "flood_bodies": 4, "flood_concurrency": 4,
        "drip_s": 4.0})
    result = asyncio.run(main_async(args))
    ok = (result["valid_errors"] == 0 and result["malformed_not_4xx"] == 0 and result["errors_during_fault"] == 0
          and result["errors_after_recovery"] == 0 and result["overhead_errors"] == 0
          and result["hostile_valid_errors"] == 0 and result["hostile_health_errors"] == 0)
    print("PASS" if ok else "FAIL")
    print(json.dumps(result))
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
