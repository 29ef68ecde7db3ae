"""A model replica killed (ray.kill: its process dies as in a crash) under load over real HTTP: no request is lost, every answer equals the answer
without the fault, and when no replica can answer the client still gets the one JSON error shape."""

from __future__ import annotations

import threading
import time

import pytest
import requests
import torch
from test_serve_http import TEXTS, _ll, _vector, deploy

from tpv.backbone import Backbone, BackboneConfig
from tpv.store import VectorStore

APP = "tpv-faults-test"
PREFIX = "/faults"
WAIT_S = 2.0  # the batch window: requests sit on a replica this long, so a kill finds some in flight


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_causal_path) -> VectorStore:
    backbone = Backbone.load(BackboneConfig(model=str(tiny_causal_path), device="cpu"))
    store = VectorStore(tmp_path_factory.mktemp("faults-store"))
    for seed in range(2):
        store.put(_vector("rotten_tomatoes", backbone, seed, origin_seed=seed))
    store.put(_vector("trec", backbone, 20, vector_id="trec-v1"))
    return store


def _ingress(**kw) -> dict:
    return {"model_retries": 6, "retry_backoff_s": 0.1, "request_timeout_s": 60.0, **kw}


@pytest.fixture(scope="module")
def url(ray_session, tiny_causal_path, store):
    from ray import serve

    from serve.app import build

    model = {"store_uri": store.uri, "backbone": str(tiny_causal_path), "device": "cpu", "torch_threads": 1,
             "max_batch_size": 64, "batch_wait_timeout_s": WAIT_S, "max_input_tokens": 64}
    app = build({"user_config": model, "num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5},
                 "health_check_period_s": 1, "health_check_timeout_s": 5},
                {"user_config": _ingress(), "ray_actor_options": {"num_cpus": 0}})
    base = deploy(app, APP, PREFIX)
    _until_replicas(2)
    yield base
    serve.delete(APP)


def _model_replicas() -> list[str]:
    """Actor names of the live model replicas (Serve names them SERVE_REPLICA::<app>#<deployment>#<id>)."""
    import ray

    names = ray.util.list_named_actors(all_namespaces=True)
    return sorted(a["name"] for a in names if a["name"].startswith(f"SERVE_REPLICA::{APP}#TPVModel#"))


def _kill(name: str) -> None:
    """Kill the replica's process as a crash would (no graceful shutdown; Serve must replace it)."""
    import ray

    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def _until_in_flight(names: list[str], at_least: int = 1, timeout: float = 60) -> None:
    """Until the named model replicas hold `at_least` requests (Serve's own count of their ongoing requests): from
    then a kill cuts requests off mid-batch, however long the machine took to deliver them. The count includes
    slots the router reserved for a request not yet sent; a request killed there is re-routed by Serve itself, so a
    test that needs the ingress to re-send waits for more than one."""
    import ray

    actors = [ray.get_actor(name, namespace="serve") for name in names]
    deadline = time.time() + timeout
    while time.time() < deadline:
        if sum(ray.get([a.get_num_ongoing_requests.remote() for a in actors])) >= at_least:
            return
        time.sleep(0.02)
    raise AssertionError(f"no request reached {names} within {timeout} s")


def _until_replicas(n: int, timeout: float = 120) -> list[int]:
    from ray import serve

    deadline = time.time() + timeout
    while time.time() < deadline:
        status = serve.status().applications.get(APP)
        dep = status.deployments["TPVModel"] if status is not None else None
        if dep is not None and dep.replica_states.get("RUNNING", 0) == n == sum(dep.replica_states.values()):
            names = _model_replicas()
            if len(names) == n:
                return names
        time.sleep(0.2)
    raise AssertionError(f"{n} model replicas were not running within {timeout} s")


def _bodies(n: int) -> list[dict]:
    return [{"inputs": TEXTS[i % 4 : i % 4 + 1], "task": "rotten_tomatoes",
             "composition": {"terms": [{"task": "rotten_tomatoes", "weight": 0.1 * (i % 7 + 1)},
                                       {"vector_id": "trec-v1", "weight": 0.2}], "origin_seed": i % 3}}
            for i in range(n)]


def _send_all(url: str, bodies: list[dict], during=None) -> list[requests.Response]:
    out: list = [None] * len(bodies)

    def send(i):
        out[i] = requests.post(f"{url}/v1/classify", json=bodies[i], timeout=90)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    if during is not None:
        during()
    for t in threads:
        t.join()
    return out


def test_no_request_is_lost_when_a_model_replica_dies(url):
    bodies = _bodies(24)
    alone = [_ll(r.json()) for r in _send_all(url, bodies)]
    victim = _model_replicas()[0]
    resent = requests.get(f"{url}/v1/health", timeout=10).json()["resent"]

    def kill():
        _until_in_flight([victim], at_least=4)  # of the 24 requests, about 12 go to each replica
        _kill(victim)

    answers = _send_all(url, bodies, during=kill)
    assert [r.status_code for r in answers] == [200] * len(bodies), [r.text for r in answers if r.status_code != 200]
    for a, r in zip(alone, answers):
        torch.testing.assert_close(_ll(r.json()), a, atol=1e-4, rtol=0)
    # the kill did cut requests off mid-batch: the ingress re-sent them (and none failed, above)
    assert requests.get(f"{url}/v1/health", timeout=10).json()["resent"] > resent
    assert victim not in _until_replicas(2)  # Serve replaced the dead replica


def test_without_a_model_replica_the_error_is_the_json_shape(url):
    from ray import serve

    ingress = serve.get_deployment_handle("TPVIngress", APP)
    ingress.reconfigure.remote(_ingress(model_retries=1, retry_backoff_s=0.05, request_timeout_s=5.0)).result()
    try:
        names = _until_replicas(2)

        def kill_all():
            _until_in_flight(names)
            for name in names:
                _kill(name)

        answers = _send_all(url, _bodies(8), during=kill_all)
        failed = [r for r in answers if r.status_code != 200]
        assert failed, "every request was answered although every model replica was killed mid-batch"
        for r in failed:
            assert r.status_code in (503, 504) and r.headers["content-type"] == "application/json", r.text
            assert set(r.json()) == {"error", "detail"} and r.json()["error"] in ("model_unavailable", "timeout")
    finally:
        ingress.reconfigure.remote(_ingress()).result()
    _until_replicas(2)
    r = requests.post(f"{url}/v1/classify", json=_bodies(1)[0], timeout=60)
    assert r.status_code == 200, r.text
