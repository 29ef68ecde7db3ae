"""The Serve app over real HTTP on the session's local Ray: tiny real model, real store in a temp folder.

Expected values come from the library the plain way (compose offline, `backbone.score_labels` / `generate`).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from tpv.backbone import Backbone
from tpv.compose import Composer, CompositionSpec
from tpv.prompt import make_origin
from tpv.store import VectorStore
from tpv.tasks import get_task
from tpv.vectors import TaskPromptVector

L = 6
RELOAD_S = 0.5
APP = "tpv-http-test"
TEXTS = ["the movie was great and the acting was wonderful", "the film was terrible and boring, a waste of time",
         "what is the capital of france?", "business sport politics tech"]
LIMITS = {"max_inputs": 8, "max_input_chars": 1000, "max_labels": 8, "max_label_chars": 40, "max_terms": 4,
          "max_abs_weight": 10.0, "max_new_tokens": 8, "max_body_bytes": 200_000}


def _vector(task: str, bb: Backbone, seed: int, vector_id: str | None = None, backbone_id: str | None = None,
            origin_seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return TaskPromptVector.create(torch.randn(L, bb.hidden_size, generator=g) * 0.5, task=task, origin_seed=origin_seed,
                                   backbone_id=backbone_id or bb.backbone_id, vector_id=vector_id)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory, backbone) -> VectorStore:
    store = VectorStore(tmp_path_factory.mktemp("serve-store"))
    for seed in range(2):
        store.put(_vector("rotten_tomatoes", backbone, seed, origin_seed=seed))  # one vector per origin seed
    store.put(_vector("presuppositions_nli", backbone, 10))
    store.put(_vector("trec", backbone, 20, vector_id="trec-v1"))
    store.put(_vector("alien", backbone, 30, vector_id="alien-v1", backbone_id="other-backbone"))
    bb = backbone.backbone_id
    store.put_composition(bb, "mix", {"backbone_id": bb, "origin_seed": 2, "prompt_length": L,
                                      "terms": [{"task": "rotten_tomatoes", "weight": 0.5}, {"vector_id": "trec-v1"}]})
    return store


def _model_config(store, model_path) -> dict:
    return {"store_uri": store.uri, "backbone": str(model_path), "device": "cpu", "max_batch_size": 16,
            "batch_wait_timeout_s": 0.1, "reload_interval_s": RELOAD_S, "torch_threads": 1,
            "max_input_tokens": 64, "max_prompt_length": 64}


def _ingress_config(**limits) -> dict:
    return {"limits": {**LIMITS, **limits}, "request_timeout_s": 30.0}


def _app(store, model_path):
    from serve.app import build

    return build({"user_config": _model_config(store, model_path), "ray_actor_options": {"num_cpus": 1},
                  "num_replicas": 1},
                 {"user_config": _ingress_config(), "ray_actor_options": {"num_cpus": 0}})


def deploy(app, name: str, prefix: str) -> str:
    """Run `app` on the session's Serve (one HTTP port for every app) and wait for its health; returns its URL."""
    from ray import serve
    from ray.serve.context import _get_global_client

    serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})  # keeps the running Serve's port
    port = _get_global_client().http_config.port
    serve.run(app, name=name, route_prefix=prefix)
    base = f"http://127.0.0.1:{port}{prefix.rstrip('/')}"
    deadline = time.time() + 90
    while True:
        try:
            if requests.get(f"{base}/v1/health", timeout=5).status_code == 200:
                return base
        except requests.ConnectionError:
            pass
        assert time.time() < deadline, f"{name} did not answer /v1/health within 90 s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def url(ray_session, tiny_causal_path, store):
    from ray import serve

    yield deploy(_app(store, tiny_causal_path), APP, "/")
    serve.delete(APP)


def _offline(backbone, store, spec: dict, sources, labels) -> torch.Tensor:
    prompt = Composer(store, lambda n, s: make_origin(backbone, n, s)).compose(CompositionSpec.model_validate(spec))
    return backbone.score_labels(prompt.unsqueeze(0), list(sources), list(labels))


def _classify(url, body, status=200):
    r = requests.post(f"{url}/v1/classify", json=body, timeout=30)
    assert r.status_code == status, r.text
    return r.json()


def _ll(response) -> torch.Tensor:
    labels = response["labels"]
    return torch.tensor([[row["log_likelihoods"][lab] for lab in labels] for row in response["results"]])


def test_classify_equals_offline_composition_and_scoring(url, backbone, store):
    composition = {"terms": [{"task": "rotten_tomatoes", "weight": 0.8}, {"vector_id": "trec-v1", "weight": -0.4}],
                   "origin_seed": 1}
    out = _classify(url, {"inputs": TEXTS[:3], "composition": composition, "task": "rotten_tomatoes"})
    spec = {**composition, "backbone_id": backbone.backbone_id, "prompt_length": L}  # length inferred by the server
    assert out["composition"]["prompt_length"] == L and out["labels"] == ["negative", "positive"]
    task = get_task("rotten_tomatoes")
    expected = _offline(backbone, store, spec, [task.render({"text": t}) for t in TEXTS[:3]], task.labels)
    torch.testing.assert_close(_ll(out), expected, atol=1e-4, rtol=0)
    for row, exp in zip(out["results"], expected):
        probs = torch.tensor([row["scores"][lab] for lab in task.labels])
        torch.testing.assert_close(probs, exp.double().softmax(-1).float(), atol=1e-5, rtol=0)
        assert row["label"] == task.labels[int(exp.argmax())]


def test_pairs_given_labels_and_stored_composition(url, backbone, store):
    nli = get_task("presuppositions_nli")
    pairs = [["the cat sat on the mat", "a cat is sitting"], {"premise": "it rained", "hypothesis": "it was dry"}]
    out = _classify(url, {"inputs": pairs, "composition": "mix", "task": "presuppositions_nli"})
    sources = [nli.render({"premise": "the cat sat on the mat", "hypothesis": "a cat is sitting"}),
               nli.render({"premise": "it rained", "hypothesis": "it was dry"})]
    spec = store.get_composition(backbone.backbone_id, "mix")
    torch.testing.assert_close(_ll(out), _offline(backbone, store, spec, sources, nli.labels), atol=1e-4, rtol=0)

    out = _classify(url, {"inputs": ["win a free cruise now"], "labels": ["no", "yes"], "template": "spam? {text}:",
                          "composition": {"terms": [{"task": "trec"}], "origin_seed": 4}})
    spec = {"backbone_id": backbone.backbone_id, "terms": [{"task": "trec"}], "origin_seed": 4, "prompt_length": L}
    expected = _offline(backbone, store, spec, ["spam? win a free cruise now:"], ["no", "yes"])
    torch.testing.assert_close(_ll(out), expected, atol=1e-4, rtol=0)


def test_concurrent_mixed_compositions_share_a_forward_and_match_each_alone(url):
    bodies = [{"inputs": TEXTS[i % 4 : i % 4 + 1 + i % 2],
               "task": "rotten_tomatoes" if i % 3 else "presuppositions_nli",
               "composition": {"terms": [{"task": "rotten_tomatoes", "weight": 0.1 * (i + 1)},
                                         {"vector_id": "trec-v1", "weight": 0.2}], "origin_seed": i}}
              for i in range(8)]
    for b in bodies:
        if b["task"] == "presuppositions_nli":
            b["inputs"] = [[t, "it is about a film"] for t in b["inputs"]]
    alone = [_classify(url, b) for b in bodies]  # also warms each composition's cached prefix
    mixed_before = requests.get(f"{url}/v1/health", timeout=10).json()["batching"]["max_compositions_in_forward"]
    for _ in range(3):
        barrier = threading.Barrier(len(bodies))

        def send(body, barrier=barrier):
            barrier.wait()
            return _classify(url, body)

        with ThreadPoolExecutor(len(bodies)) as pool:
            together = list(pool.map(send, bodies))
        for a, t in zip(alone, together):
            assert [r["label"] for r in a["results"]] == [r["label"] for r in t["results"]]
            torch.testing.assert_close(_ll(t), _ll(a), atol=1e-4, rtol=0)
        stats = requests.get(f"{url}/v1/health", timeout=10).json()["batching"]
        if stats["max_compositions_in_forward"] >= 3:
            break
    assert mixed_before == 1  # one request at a time: one composition per forward
    assert stats["max_compositions_in_forward"] >= 3, stats  # concurrent requests: several in ONE forward
    assert stats["forwards"] < stats["requests"]


def test_generate_equals_offline(url, backbone, store):
    body = {"inputs": TEXTS[:2], "composition": {"terms": [{"task": "trec"}]}, "task": "trec", "max_new_tokens": 5}
    r = requests.post(f"{url}/v1/generate", json=body, timeout=30)
    assert r.status_code == 200, r.text
    spec = CompositionSpec(backbone_id=backbone.backbone_id, terms=[{"task": "trec"}], origin_seed=0, prompt_length=L)
    prompt = Composer(store, lambda n, s: make_origin(backbone, n, s)).compose(spec)
    sources = [get_task("trec").render({"text": t}) for t in TEXTS[:2]]
    expected = backbone.generate(prompt.unsqueeze(0).expand(2, -1, -1), sources, max_new_tokens=5)
    assert [x["text"] for x in r.json()["results"]] == expected


def test_vectors_health_and_openapi(url, backbone):
    v = requests.get(f"{url}/v1/vectors", timeout=10).json()
    assert v["backbone_id"] == backbone.backbone_id
    assert v["tasks"]["rotten_tomatoes"] == 2 and "mix" in v["compositions"]
    assert "alien-v1" not in {x["vector_id"] for x in v["vectors"]}  # another backbone's vector is not listed
    only = requests.get(f"{url}/v1/vectors", params={"task": "trec"}, timeout=10).json()
    assert [x["vector_id"] for x in only["vectors"]] == ["trec-v1"]
    h = requests.get(f"{url}/v1/health", timeout=10).json()
    assert h["status"] == "ok" and h["backbone_id"] == backbone.backbone_id and h["auth"] == "open"
    assert not {"pid", "store_uri", "settings"} & set(h) and "/tmp" not in json.dumps(h)  # no paths, no pid
    assert requests.get(f"{url}/docs", timeout=10).status_code == 200
    spec = requests.get(f"{url}/openapi.json", timeout=10).json()
    assert {"/v1/classify", "/v1/generate", "/v1/vectors", "/v1/health"} <= set(spec["paths"])
    assert spec["components"]["schemas"]["ClassifyRequest"]["examples"]


def _until(fn, timeout: float):
    """Poll fn() until it returns a truthy value; returns (value, seconds waited)."""
    start = time.time()
    while True:
        value = fn()
        if value or time.time() - start > timeout:
            return value, time.time() - start
        time.sleep(0.05)


def test_hot_reload_new_vector_replaced_vector_and_composition(url, backbone, store):
    bb = backbone.backbone_id
    body = {"inputs": TEXTS[:2], "task": "rotten_tomatoes", "composition": {"terms": [{"task": "fresh"}]}}
    assert _classify(url, body, 404)["error"] == "not_found"
    store.put(_vector("fresh", backbone, 40, vector_id="fresh-v"))
    written = time.time()
    ok, _ = _until(lambda: requests.post(f"{url}/v1/classify", json=body, timeout=30).status_code == 200, 10)
    assert ok and time.time() - written < RELOAD_S + 2.0, "a new vector was not served within the reload window"

    # replace the vector itself (same id) and a named composition: after the window, never the old result
    store.put_composition(bb, "swap", {"backbone_id": bb, "terms": [{"vector_id": "fresh-v"}], "origin_seed": 0,
                                       "prompt_length": L}, overwrite=True)
    named = {"inputs": TEXTS[:2], "task": "rotten_tomatoes", "composition": "swap"}
    _until(lambda: requests.post(f"{url}/v1/classify", json=named, timeout=30).status_code == 200, 10)
    old = _ll(_classify(url, named))
    store.put(_vector("fresh", backbone, 41, vector_id="fresh-v"), overwrite=True)
    time.sleep(RELOAD_S + 0.2)
    sources = [get_task("rotten_tomatoes").render({"text": t}) for t in TEXTS[:2]]
    expected = _offline(backbone, store, store.get_composition(bb, "swap"), sources, ["negative", "positive"])
    new = _ll(_classify(url, named))
    assert (expected - old).abs().max() > 1e-3
    torch.testing.assert_close(new, expected, atol=1e-4, rtol=0)

    spec2 = {"backbone_id": bb, "terms": [{"task": "rotten_tomatoes", "weight": -1.0}], "origin_seed": 5,
             "prompt_length": L}
    store.put_composition(bb, "swap", spec2, overwrite=True)
    time.sleep(RELOAD_S + 0.2)
    out = _classify(url, named)
    assert out["composition"]["origin_seed"] == 5
    torch.testing.assert_close(_ll(out), _offline(backbone, store, spec2, sources, ["negative", "positive"]),
                               atol=1e-4, rtol=0)


def _comp(**kw):
    return {"terms": [{"task": "rotten_tomatoes"}], **kw}


OK = {"inputs": ["fine"], "task": "rotten_tomatoes", "composition": _comp()}
RAW_NAN = ('{"inputs": ["x"], "task": "rotten_tomatoes", '
           '"composition": {"terms": [{"task": "rotten_tomatoes", "weight": NaN}]}}')
BAD = [  # (case, path, body (dict, or raw str), expected status, words the message must contain)
    ("malformed json", "/v1/classify", '{"inputs": ["x"', 400, "JSON"),
    ("not an object", "/v1/classify", "[1, 2]", 422, ""),
    ("nan weight", "/v1/classify", RAW_NAN, 422, "finite"),
    ("infinite weight", "/v1/classify", RAW_NAN.replace("NaN", "Infinity"), 422, "finite"),
    ("overflowing weight", "/v1/classify", RAW_NAN.replace("NaN", "1e999"), 422, "finite"),
    ("absurd weight", "/v1/classify", {**OK, "composition": {"terms": [{"task": "rotten_tomatoes", "weight": 1e6}]}},
     422, "weight"),
    ("weight over limit", "/v1/classify", {**OK, "composition": {"terms": [{"task": "rotten_tomatoes", "weight": 50}]}},
     422, "10.0"),
    ("coefficient over limit", "/v1/classify", {**OK, "composition": _comp(coefficient=-99)}, 422, "coefficient"),
    ("too many vectors", "/v1/classify", {**OK, "composition": {"terms": [{"task": "rotten_tomatoes"}] * 5}}, 422,
     "limit is 4"),
    ("unknown task term", "/v1/classify", {**OK, "composition": {"terms": [{"task": "nope"}]}}, 404, "'nope'"),
    ("unknown vector", "/v1/classify", {**OK, "composition": {"terms": [{"vector_id": "nope-v"}]}}, 404, "nope-v"),
    ("unknown label task", "/v1/classify", {**OK, "task": "nope"}, 404, "unknown task 'nope'"),
    ("unknown composition", "/v1/classify", {**OK, "composition": "nope"}, 404, "no stored composition 'nope'"),
    ("backbone mismatch inline", "/v1/classify", {**OK, "composition": _comp(backbone_id="other-backbone")}, 422,
     "backbone mismatch"),
    ("vector of another backbone", "/v1/classify", {**OK, "composition": {"terms": [{"vector_id": "alien-v1"}]}}, 422,
     "backbone mismatch"),
    ("empty inputs", "/v1/classify", {**OK, "inputs": []}, 422, "inputs"),
    ("blank input", "/v1/classify", {**OK, "inputs": ["   "]}, 422, "empty"),
    ("too many inputs", "/v1/classify", {**OK, "inputs": ["a"] * 9}, 422, "limit is 8"),
    ("input too long (chars)", "/v1/classify", {**OK, "inputs": ["a" * 1001]}, 422, "1000"),
    ("template repeats the input past the limit", "/v1/classify",
     {**OK, "inputs": ["a" * 100], "template": "{text}" * 11}, 422, "template filled"),
    ("input too long (tokens)", "/v1/classify", {**OK, "inputs": ["the movie was great " * 30]}, 422, "tokens"),
    ("path-like task", "/v1/classify", {**OK, "composition": {"terms": [{"task": "../etc"}]}}, 422, "path"),
    ("path-like vector", "/v1/classify", {**OK, "composition": {"terms": [{"vector_id": "a/b"}]}}, 422, "path"),
    ("path-like composition", "/v1/classify", {**OK, "composition": "../../secret"}, 422, "composition"),
    ("dotdot name", "/v1/classify", {**OK, "composition": "a..b"}, 422, ".."),
    ("unknown method", "/v1/classify", {**OK, "composition": _comp(method="magic")}, 422, "weighted"),
    ("task and vector in one term", "/v1/classify",
     {**OK, "composition": {"terms": [{"task": "trec", "vector_id": "trec-v1"}]}}, 422, "exactly one"),
    ("no labels", "/v1/classify", {"inputs": ["x"], "composition": _comp()}, 422, "labels"),
    ("duplicate labels", "/v1/classify", {**OK, "labels": ["a", "a"]}, 422, "duplicate"),
    ("too many labels", "/v1/classify", {**OK, "labels": [f"l{i}" for i in range(9)]}, 422, "limit is 8"),
    ("pair for one-field template", "/v1/classify", {**OK, "inputs": [["a", "b"]]}, 422, "template"),
    ("bad template", "/v1/classify", {**OK, "template": "{text.__class__}"}, 422, "template"),
    ("prompt length is the vectors' own", "/v1/classify", {**OK, "composition": _comp(prompt_length=9)}, 422,
     "prompt_length"),
    ("negative seed", "/v1/classify", {**OK, "composition": _comp(origin_seed=-1)}, 422, "origin_seed"),
    ("extra field", "/v1/classify", {**OK, "surprise": 1}, 422, "surprise"),
    ("wrong type", "/v1/classify", {**OK, "inputs": 5}, 422, "inputs"),
    ("body too large", "/v1/classify", {**OK, "inputs": ["a" * 300_000]}, 413, "limit"),
    ("generate: too many tokens", "/v1/generate", {**OK, "max_new_tokens": 9}, 422, "max_new_tokens"),
    ("generate: unknown vector", "/v1/generate", {**OK, "composition": {"terms": [{"vector_id": "nope"}]}}, 404,
     "nope"),
    ("vectors: path-like task", "/v1/vectors?task=..%2Fx", None, 422, "task"),
    ("no such route", "/v1/nothing", None, 404, ""),
]


STORED = ("rotten_tomatoes", "presuppositions_nli", "trec-v1", "mix", "alien-v1")


@pytest.mark.parametrize("case,path,body,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_with_a_clear_message(url, store, case, path, body, status, words):
    if body is None:
        r = requests.get(f"{url}{path}", timeout=30)
    else:
        data = body if isinstance(body, str) else json.dumps(body)
        r = requests.post(f"{url}{path}", data=data, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()
    assert set(err) <= {"error", "detail", "errors"}, err
    assert err["error"] and words.lower() in err["detail"].lower(), err
    assert store.root not in r.text and "/tmp" not in r.text, r.text  # no server path in any error
    if status == 404:  # an unknown name is named; what the store holds is not listed
        asked = str(body)
        assert not [n for n in STORED if n in err["detail"] and n not in asked], err


def test_model_replica_survives_bad_input(url):
    replica = requests.get(f"{url}/v1/health", timeout=10).json()["replica"]
    for _case, path, body, _status, _ in BAD[:14]:
        data = body if isinstance(body, str) else json.dumps(body)
        requests.post(f"{url}{path}", data=data, headers={"content-type": "application/json"}, timeout=30)
    assert _classify(url, OK)["results"][0]["label"] in ("negative", "positive")
    assert requests.get(f"{url}/v1/health", timeout=10).json()["replica"] == replica  # never restarted


def test_reconfigure_applies_user_config_without_restart(url):
    """reconfigure(user_config) on the running ingress (what Serve calls on a lightweight config update): a new
    limit applies at once; the model replica is the same."""
    from ray import serve

    replica = requests.get(f"{url}/v1/health", timeout=10).json()["replica"]
    three = {**OK, "inputs": ["a", "b", "c"]}
    assert len(_classify(url, three)["results"]) == 3
    ingress = serve.get_deployment_handle("TPVIngress", APP)
    ingress.reconfigure.remote(_ingress_config(max_inputs=2)).result()
    try:
        r = requests.post(f"{url}/v1/classify", json=three, timeout=30)
        assert r.status_code == 422 and "limit is 2" in r.json()["detail"]
        assert requests.get(f"{url}/v1/health", timeout=10).json()["replica"] == replica
    finally:
        ingress.reconfigure.remote(_ingress_config()).result()
    assert len(_classify(url, three)["results"]) == 3
