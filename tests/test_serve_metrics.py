"""The service's metrics on Ray's real Prometheus endpoint: a fresh app on the session's local Ray, real HTTP
requests, then the node's metrics export port is scraped (with a deadline: Ray exports every few seconds) until
the counts moved by exactly what the test sent. Tiny real model, real store on disk."""

from __future__ import annotations

import itertools
import time
from collections import defaultdict

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from test_serve_http import TEXTS, L, _vector, deploy

from serve.metrics import composition_label
from serve.schemas import InlineComposition
from tpv.store import VectorStore

EXPORT_DEADLINE_S = 90
_APPS = itertools.count()
OUR_LABELS = ("route", "composition", "status", "kind", "le")


@pytest.fixture(scope="module")
def store(tmp_path_factory, backbone) -> VectorStore:
    store = VectorStore(tmp_path_factory.mktemp("metrics-store"))
    store.put(_vector("rotten_tomatoes", backbone, 0))
    store.put(_vector("trec", backbone, 20, vector_id="trec-v1"))
    bb = backbone.backbone_id
    store.put_composition(bb, "mix", {"backbone_id": bb, "origin_seed": 2, "prompt_length": L,
                                      "terms": [{"task": "rotten_tomatoes", "weight": 0.5}, {"vector_id": "trec-v1"}]})
    return store


def _serve(name: str, store, model_path, **model) -> str:
    from serve.app import build

    model_config = {"store_uri": store.uri, "backbone": str(model_path), "device": "cpu", "torch_threads": 1,
                    "reload_interval_s": 60.0, "max_input_tokens": 64, "batch_wait_timeout_s": 0.0, **model}
    app = build({"user_config": model_config, "ray_actor_options": {"num_cpus": 1}, "num_replicas": 1},
                {"user_config": {"request_timeout_s": 30.0}, "ray_actor_options": {"num_cpus": 0}})
    return deploy(app, name, f"/{name}")


@pytest.fixture
def app(request, ray_session, tiny_causal_path, store):
    """A fresh app per test (fresh replicas: every counter starts at zero), deleted afterwards."""
    from ray import serve

    name = f"tpv-metrics-{next(_APPS)}"
    params = getattr(request, "param", {})
    yield name, _serve(name, store, tiny_causal_path, **params)
    serve.delete(name)


def _endpoint(ray) -> str:
    """Ray's Prometheus endpoint on this (single) node: the metrics agent's export port."""
    node = next(n for n in ray.nodes() if n["Alive"])
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def scrape(endpoint: str, application: str) -> dict[str, dict[frozenset, float]]:
    """{sample name: {our labels: value summed over replicas}} of one application (Ray's and OpenTelemetry's own
    labels dropped)."""
    text = requests.get(endpoint, timeout=10).text
    out: dict[str, dict[frozenset, float]] = defaultdict(lambda: defaultdict(float))
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("ray_tpv_") and s.labels.get("application") == application:
                labels = {k: v for k, v in s.labels.items() if k in OUR_LABELS}
                out[s.name][frozenset(labels.items())] += s.value
    return out


def value(samples, name: str, **labels) -> float:
    return samples.get(name, {}).get(frozenset(labels.items()), 0.0)


def until_exported(endpoint: str, application: str, expected: dict[tuple, float]):
    """Scrape until every expected (name, labels) sample has reached its value, or the deadline; then the scrape."""
    deadline = time.time() + EXPORT_DEADLINE_S
    while True:
        samples = scrape(endpoint, application)
        got = {key: value(samples, key[0], **dict(key[1])) for key in expected}
        if all(got[k] >= v for k, v in expected.items()) or time.time() > deadline:
            return samples, got
        time.sleep(1.0)


def _key(name: str, **labels) -> tuple:
    return name, tuple(sorted(labels.items()))


def test_request_counts_and_latency_per_route_and_composition(app, ray_session):
    name, url = app
    inline = {"terms": [{"task": "rotten_tomatoes", "weight": 0.5}, {"vector_id": "trec-v1", "weight": -1}],
              "origin_seed": 3}
    inline_label = composition_label(InlineComposition.model_validate(inline))
    assert inline_label == "rotten_tomatoes=0.5,trec-v1=-1,seed=3"
    sent = [("post", "/v1/classify", {"inputs": TEXTS[:2], "composition": "mix", "task": "rotten_tomatoes"}, 200)] * 3
    sent += [("post", "/v1/classify", {"inputs": TEXTS[:1], "composition": inline, "task": "rotten_tomatoes"}, 200)] * 2
    sent += [("post", "/v1/generate", {"inputs": TEXTS[:1], "composition": inline, "max_new_tokens": 2}, 200)]
    sent += [("post", "/v1/classify", {"inputs": TEXTS[:1], "composition": "no-such-mix", "task": "trec"}, 404)]
    sent += [("post", "/v1/classify", {"inputs": [], "composition": "mix", "task": "trec"}, 422)] * 2
    sent += [("get", "/v1/vectors", None, 200), ("get", "/v1/nowhere", None, 404)]
    for method, path, body, status in sent:
        r = requests.request(method, url + path, json=body, timeout=30)
        assert r.status_code == status, r.text

    requests_total, latency = "ray_tpv_requests_total", "ray_tpv_request_latency_ms"
    counts = {
        ("/v1/classify", "mix", "200"): 3,
        ("/v1/classify", inline_label, "200"): 2,
        ("/v1/generate", inline_label, "200"): 1,
        ("/v1/classify", "unserved", "404"): 1,  # a name never served does not get its own series
        ("/v1/classify", "none", "422"): 2,  # refused before the route ran
        ("/v1/vectors", "none", "200"): 1,
        ("unmatched", "none", "404"): 1,
    }
    expected = {}
    for (route, comp, status), n in counts.items():
        labels = {"route": route, "composition": comp, "status": status}
        expected[_key(requests_total, **labels)] = n
        expected[_key(latency + "_count", **labels)] = n
    samples, got = until_exported(_endpoint(ray_session), name, expected)
    assert got == expected, {k: (got[k], v) for k, v in expected.items() if got[k] != v}
    # every classify answered: latencies are positive and below the bucket bounds' top
    for (route, comp, status), n in counts.items():
        labels = {"route": route, "composition": comp, "status": status}
        assert value(samples, latency + "_sum", **labels) > 0
        assert value(samples, latency + "_bucket", **labels, le="+Inf") == n
    routes = {dict(k)["route"] for k in samples[requests_total]}
    assert routes <= {"/v1/classify", "/v1/generate", "/v1/vectors", "/v1/health", "unmatched"}, routes


@pytest.mark.parametrize("app", [{"cache_max_entries": 2}], indirect=True)
def test_batch_sizes_and_prompt_cache_hits_and_evictions(app, ray_session):
    name, url = app

    def classify(seed: int, rows: int) -> None:
        body = {"inputs": TEXTS[:rows], "task": "rotten_tomatoes",
                "composition": {"terms": [{"task": "rotten_tomatoes"}], "origin_seed": seed}}
        r = requests.post(f"{url}/v1/classify", json=body, timeout=30)
        assert r.status_code == 200, r.text

    # one request at a time: one batch each. A cache of 2 entries, compositions A, B, C (their origin seeds):
    # A miss, A hit, B miss, C miss (evicts A), A miss (evicts B), C hit
    plan = [(0, 3), (0, 1), (1, 1), (2, 2), (0, 1), (2, 1)]
    for seed, rows in plan:
        classify(seed, rows)
    score = {"kind": "score"}
    rows_at_most = {"1.0": 4, "2.0": 5, "4.0": 6, "+Inf": 6}  # rows per batch 3, 1, 1, 2, 1, 1: cumulative buckets
    expected = {
        _key("ray_tpv_prompt_cache_hits_total"): 2,
        _key("ray_tpv_prompt_cache_misses_total"): 4,
        _key("ray_tpv_prompt_cache_evictions_total"): 2,
        _key("ray_tpv_batch_rows_count", **score): len(plan),
        **{_key("ray_tpv_batch_rows_bucket", **score, le=le): n for le, n in rows_at_most.items()},
        _key("ray_tpv_batch_requests_bucket", **score, le="1.0"): len(plan),
        _key("ray_tpv_batch_compositions_bucket", **score, le="1.0"): len(plan),
    }
    samples, got = until_exported(_endpoint(ray_session), name, expected)
    assert got == expected, {k: (got[k], v) for k, v in expected.items() if got[k] != v}
    assert value(samples, "ray_tpv_prompt_cache_entries") == 2
    assert value(samples, "ray_tpv_prompt_cache_bytes") > 0
    assert not any(dict(k).get("kind") == "generate" for k in samples["ray_tpv_batch_rows_count"])  # none sent


def test_composition_labels_are_bounded(monkeypatch):
    from serve import metrics

    monkeypatch.setattr(metrics, "_seen", set())
    monkeypatch.setattr(metrics, "MAX_COMPOSITION_LABELS", 3)
    long = InlineComposition.model_validate({"terms": [{"vector_id": "v" * 60, "weight": 0.25}] * 3})
    label = composition_label(long)
    assert len(label) == metrics.MAX_LABEL_CHARS and label.startswith("v" * 60 + "=0.25,") and "#" in label
    narrowed = composition_label(InlineComposition.model_validate({"terms": [{"task": "trec", "seeds": [1]}]}))
    assert narrowed.startswith("trec=1#") and narrowed != composition_label(
        InlineComposition.model_validate({"terms": [{"task": "trec", "seeds": [2]}]}))
    assert [metrics._admitted(c, 200) for c in ("a", "b", "none", "c", "d")] == ["a", "b", "none", "c", "other"]
    assert metrics._admitted("fresh", 404) == "unserved" and metrics._admitted("a", 404) == "a"


def test_route_labels_are_the_apps_route_templates():
    from serve.app import api
    from serve.metrics import RouteLabels

    label = RouteLabels(api.router)
    cases = {("/v1/classify", ""): "/v1/classify", ("/tpv/v1/classify", "/tpv"): "/v1/classify",
             ("/tpv/", "/tpv"): "/", ("/tpv", "/tpv"): "/", ("/v1/classify/x", ""): "unmatched",
             ("/v1/" + "a" * 50, ""): "unmatched", ("/playground/app.js", ""): "/playground/app.js"}
    assert {key: label({"type": "http", "path": key[0], "root_path": key[1]}) for key in cases} == cases
