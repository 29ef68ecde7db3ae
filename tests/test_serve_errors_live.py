"""Error answers of the live app (session's local Ray, real HTTP, real store on disk, API keys on) in the three
places issue 25 item 4 hardened:

- a model replica killed while its generation is streamed: the stream ends with the OpenAI error event of the
  503 kind `unavailable` (a lost replica, worth a retry), then [DONE];
- `/v1/completions` with `model=` naming a store entry that is corrupt on disk answers what the native route
  answers for the same entry (500 `store_corrupt`), not 404 "does not exist";
- after the store folder is moved away and back (or replaced), the very first `/v1/models` lists what it holds:
  listings force a store check instead of waiting for the next poll.

One app for the module. The replica kill is the last test (Serve then replaces the replica; the ingress's
retries cover a test run after it).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import requests
from test_serve_http import _vector, deploy

from serve.auth import digest
from tpv.store import VectorStore

APP = "tpv-errors-live-test"
PREFIX = "/errors-live"
KEY = "sk-errors-live"
AUTH = {"Authorization": f"Bearer {KEY}"}
#: the model's batch window: a streamed generation's head is sent, then its batch waits this long before its first
#: decoding step, so a kill after the stream's 200 lands mid-stream however slow the machine is
WAIT_S = 3.0
#: the store poll period; a listing must not wait for it (on the old code a restore was seen up to this late)
RELOAD_S = 4.0
LIMITS = {"max_inputs": 8, "max_input_chars": 1000, "max_new_tokens": 64, "max_terms": 4, "max_abs_weight": 10.0}


@pytest.fixture(scope="module")
def store(tmp_path_factory, backbone) -> VectorStore:
    store = VectorStore(tmp_path_factory.mktemp("errors-live-store") / "store")
    for seed in range(2):
        store.put(_vector("rotten_tomatoes", backbone, seed, origin_seed=seed))
    store.put(_vector("trec", backbone, 20, vector_id="trec-v1"))
    store.put(_vector("sms_spam", backbone, 30, vector_id="spam-v1"))  # its only vector: corrupted below
    bb = backbone.backbone_id
    store.put_composition(bb, "trec-mix", {"backbone_id": bb, "origin_seed": 0, "prompt_length": 6,
                                           "terms": [{"vector_id": "trec-v1", "weight": 0.5}]})
    return store


@pytest.fixture(scope="module")
def url(ray_session, tiny_causal_path, store):
    from ray import serve

    from serve.app import build

    model = {"store_uri": store.uri, "backbone": str(tiny_causal_path), "device": "cpu", "torch_threads": 1,
             "max_batch_size": 16, "batch_wait_timeout_s": WAIT_S, "reload_interval_s": RELOAD_S,
             "max_input_tokens": 64, "max_prompt_length": 64}
    ingress = {"limits": LIMITS, "request_timeout_s": 60.0, "model_retries": 8, "retry_backoff_s": 0.2,
               "auth": {"keys": [{"sha256": digest(KEY), "name": "full"}]}}
    app = build({"user_config": model, "num_replicas": 1, "ray_actor_options": {"num_cpus": 1}},
                {"user_config": ingress, "ray_actor_options": {"num_cpus": 0}})
    yield deploy(app, APP, PREFIX)
    serve.delete(APP)


def _truncate(store: VectorStore, vector_id: str) -> Path:
    """Cut the vector's safetensors file to 8 bytes: its header length survives, its header does not."""
    [path] = Path(store.uri).rglob(f"{vector_id}.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[:8])
    return path


def _models(url: str) -> list[str]:
    r = requests.get(f"{url}/v1/models", headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return [m["id"] for m in r.json()["data"]]


# ---- (b) a corrupt store entry named by model= -------------------------------------------------------------------


@pytest.mark.parametrize(("model", "native", "vector_id"), [
    ("sms_spam", {"terms": [{"task": "sms_spam"}]}, "spam-v1"),  # a task whose only vector is unreadable
    ("trec-mix", "trec-mix", "trec-v1"),  # a stored composition whose vector is unreadable
])
def test_openai_model_naming_a_corrupt_entry_answers_like_the_native_route(url, store, model, native, vector_id):
    _truncate(store, vector_id)
    r = requests.post(f"{url}/v1/generate", headers=AUTH, timeout=60,
                      json={"inputs": ["what is the capital of france?"], "composition": native, "max_new_tokens": 4})
    assert (r.status_code, r.json()["error"]) == (500, "store_corrupt"), r.text
    o = requests.post(f"{url}/v1/completions", headers=AUTH, timeout=60,
                      json={"model": model, "prompt": "what is the capital of france?", "max_tokens": 4})
    assert o.status_code == r.status_code, o.text
    assert o.json() == {"error": {"message": r.json()["detail"], "type": "server_error", "param": None,
                                  "code": "store_corrupt"}}
    assert str(Path(store.uri)) not in o.text  # the fixed text, no server path


# ---- (c) a store folder restored --------------------------------------------------------------------------------


def _move_away_until_unlisted(url: str, root: Path, aside: Path) -> list[str]:
    """Move the store folder aside; the first listing after it (then every one, until the store is gone from it,
    bounded by the poll period) -- the first is returned."""
    root.rename(aside)
    first = _models(url)
    deadline = time.monotonic() + 3 * RELOAD_S + 10
    while _models(url):
        assert time.monotonic() < deadline, "the store folder was moved away but /v1/models still lists it"
        time.sleep(0.05)
    return first


def test_models_lists_the_tasks_on_the_first_poll_after_the_store_is_restored(url, store):
    root = Path(store.uri)
    aside = root.with_name("store-aside")
    before = _models(url)
    assert {"rotten_tomatoes", "trec-mix"} <= set(before), before
    try:
        # moved away and back: the files keep their names, sizes and mtimes
        away = _move_away_until_unlisted(url, root, aside)
        aside.rename(root)
        assert _models(url) == before  # the first poll, well within the poll period of the listing that saw none
        assert away == []  # the listing just after the move checked the store too
        # replaced: a copy without rotten_tomatoes put where the store was
        _move_away_until_unlisted(url, root, aside)
        shutil.copytree(aside, root)
        shutil.rmtree(next(root.glob("*/vectors/rotten_tomatoes")))
        assert _models(url) == [m for m in before if m != "rotten_tomatoes"]
    finally:  # the original store back in place whatever failed, for the other tests
        if aside.exists():
            shutil.rmtree(root, ignore_errors=True)
            aside.rename(root)
    assert _models(url) == before


# ---- (a) a model replica lost mid-stream (last: Serve replaces the replica afterwards) ---------------------------


def _model_replica() -> str:
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{APP}#TPVModel#")]
    assert len(names) == 1, names
    return names[0]


def test_a_replica_killed_mid_stream_ends_the_stream_with_an_unavailable_error_event(url):
    import ray

    victim = _model_replica()
    # an inline composition: resolved from the store's files, whatever a listing before cached
    body = {"model": "rotten_tomatoes", "composition": {"terms": [{"task": "rotten_tomatoes"}]},
            "prompt": "the movie was great and the acting was", "max_tokens": 64, "temperature": 0, "stream": True}
    with requests.post(f"{url}/v1/completions", headers=AUTH, json=body, stream=True, timeout=60) as r:
        # the 200 comes with the generation's head: the request is on the replica, in its batch window
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        events = [line.removeprefix("data: ") for line in r.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "[DONE]", events
    payloads = [json.loads(e) for e in events[:-1]]
    assert payloads, "the stream ended with no event at all"
    assert all("error" not in p for p in payloads[:-1]), payloads
    error = payloads[-1].get("error")
    assert error is not None, f"the stream ended without an error event although its replica was killed: {events}"
    # the OpenAI shape of the 503 kind `unavailable` (a lost replica: retry), not a 500 `internal_error`
    assert (error["type"], error["code"], error["param"]) == ("server_error", "unavailable", None), error
    assert isinstance(error["message"], str) and error["message"]
    finished = [c for p in payloads[:-1] for c in p["choices"] if c.get("finish_reason")]
    assert not finished, f"the generation finished before its replica was killed: {payloads}"
