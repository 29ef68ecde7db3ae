"""Hostile clients against the real app over real HTTP: API keys, bodies that are too big or too slow, a corrupt
store entry, a schema-driven fuzz of the live OpenAPI (schemathesis). Tiny real model, real store on disk."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from pathlib import Path

import pytest
import requests
from test_serve_http import TEXTS, L, _vector, deploy

from serve.auth import digest
from tpv.store import VectorStore

APP = "tpv-hostile-test"
PREFIX = "/hostile"
FULL, SCOPED, ENV_KEY = "full-key-0123456789", "scoped-key-0123456789", "env-key-0123456789"
BODY_LIMIT = 100_000
BODY_TIMEOUT_S = 2.0
SLOTS = 8


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def store(tmp_path_factory, backbone) -> VectorStore:
    store = VectorStore(tmp_path_factory.mktemp("hostile-store"))
    for seed in range(2):
        store.put(_vector("rotten_tomatoes", backbone, seed, origin_seed=seed))
    store.put(_vector("trec", backbone, 20, vector_id="trec-v1"))
    bb = backbone.backbone_id
    store.put_composition(bb, "mix", {"backbone_id": bb, "origin_seed": 2, "prompt_length": L,
                                      "terms": [{"task": "rotten_tomatoes", "weight": 0.5}, {"vector_id": "trec-v1"}]})
    return store


@pytest.fixture(scope="module")
def url(ray_session, tiny_causal_path, store):
    from ray import serve

    from serve.app import build

    keys = [{"sha256": digest(FULL), "name": "full"},
            {"sha256": digest(SCOPED), "name": "scoped", "tasks": ["rotten_tomatoes"], "compositions": ["mix"]}]
    model = {"store_uri": store.uri, "backbone": str(tiny_causal_path), "device": "cpu", "torch_threads": 1,
             "reload_interval_s": 0.2, "max_input_tokens": 64}
    ingress = {"auth": {"keys": keys}, "body_read_timeout_s": BODY_TIMEOUT_S, "request_timeout_s": 30.0,
               "limits": {"max_body_bytes": BODY_LIMIT, "max_input_chars": 2000}}
    app = build({"user_config": model, "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}},
                {"user_config": ingress, "max_ongoing_requests": SLOTS,
                 "ray_actor_options": {"num_cpus": 0, "runtime_env": {"env_vars": {"TPV_API_KEYS": ENV_KEY}}}})
    yield deploy(app, APP, PREFIX)
    serve.delete(APP)


def _classify(url: str, body: dict, key: str | None = FULL) -> requests.Response:
    return requests.post(f"{url}/v1/classify", json=body, headers=_auth(key) if key else {}, timeout=30)


OK = {"inputs": TEXTS[:2], "task": "rotten_tomatoes", "composition": {"terms": [{"task": "rotten_tomatoes"}]}}


def _error(r: requests.Response, status: int, kind: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) <= {"error", "detail", "errors"} and body["error"] == kind, body
    return body


# ---- API keys -------------------------------------------------------------------------------------------------------


def test_keys_are_required_except_for_health(url):
    health = requests.get(f"{url}/v1/health", timeout=10)
    assert health.status_code == 200 and health.json()["auth"] == "keys"
    r = _classify(url, OK, key=None)
    assert "Authorization: Bearer" in _error(r, 401, "unauthorized")["detail"]
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert "not valid" in _error(_classify(url, OK, key="wrong-key"), 401, "unauthorized")["detail"]
    basic = requests.post(f"{url}/v1/classify", json=OK, headers={"Authorization": f"Basic {FULL}"}, timeout=30)
    _error(basic, 401, "unauthorized")
    _error(requests.get(f"{url}/v1/vectors", timeout=10), 401, "unauthorized")
    # a bad body without a key is still a 401: the key is checked before anything else is looked at
    _error(requests.post(f"{url}/v1/classify", data="{not json", timeout=10), 401, "unauthorized")
    for key in (FULL, ENV_KEY):  # a configured (hashed) key and one from $TPV_API_KEYS
        r = _classify(url, OK, key=key)
        assert r.status_code == 200 and len(r.json()["results"]) == 2, r.text


def test_a_scoped_key_names_only_its_tasks_and_compositions(url):
    assert _classify(url, OK, key=SCOPED).status_code == 200
    assert _classify(url, {**OK, "composition": "mix"}, key=SCOPED).status_code == 200
    trec = {**OK, "composition": {"terms": [{"task": "rotten_tomatoes"}, {"task": "trec"}]}}
    assert "trec" in _error(_classify(url, trec, key=SCOPED), 403, "forbidden")["detail"]
    by_id = {**OK, "composition": {"terms": [{"vector_id": "trec-v1"}]}}
    assert "vector_id" in _error(_classify(url, by_id, key=SCOPED), 403, "forbidden")["detail"]
    _error(_classify(url, {**OK, "task": "trec"}, key=SCOPED), 403, "forbidden")
    _error(_classify(url, {**OK, "composition": "other"}, key=SCOPED), 403, "forbidden")
    assert _classify(url, trec, key=FULL).status_code == 200  # the same request with an unscoped key
    listing = requests.get(f"{url}/v1/vectors", headers=_auth(SCOPED), timeout=10).json()
    assert set(listing["tasks"]) == {"rotten_tomatoes"} and listing["compositions"] == ["mix"]
    assert {v["task"] for v in listing["vectors"]} == {"rotten_tomatoes"}
    full = requests.get(f"{url}/v1/vectors", headers=_auth(FULL), timeout=10).json()
    assert set(full["tasks"]) == {"rotten_tomatoes", "trec"}


# ---- bodies ---------------------------------------------------------------------------------------------------------


def _open(url: str, headers: dict[str, str], method: str = "POST", path: str = "/v1/classify") -> socket.socket:
    host, port = url.split("//")[1].split("/")[0].split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    lines = [f"{method} {PREFIX}{path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
             *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    sock.sendall("\r\n".join(lines).encode())
    return sock


def _response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    n = int(headers.get("content-length", "0"))
    while len(rest) < n:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return int(lines[0].split()[1]), headers, rest


def test_declared_oversized_body_is_refused_before_reading(url):
    r = requests.post(f"{url}/v1/classify", data=b"x" * (BODY_LIMIT + 1), headers=_auth(FULL), timeout=30)
    assert str(BODY_LIMIT) in _error(r, 413, "body_too_large")["detail"]


def test_chunked_body_without_length_is_cut_off_at_the_limit(url):
    """50 MB sent chunked (no Content-Length): the server answers 413 as soon as the limit passes."""
    sock = _open(url, {**_auth(FULL), "Transfer-Encoding": "chunked"})
    piece = b"[" + b'"aaaaaaaa",' * 6000  # ~66 kB per chunk
    frame = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    sent = 0
    try:
        while sent < 50_000_000:
            if select.select([sock], [], [], 0)[0]:
                break  # the server has answered
            sock.sendall(frame)
            sent += len(piece)
            time.sleep(0.005)  # ~13 MB/s: the 413 must come long before the 50 MB are sent
    except (BrokenPipeError, ConnectionResetError):
        pass
    status, _, body = _response(sock)
    sock.close()
    assert status == 413 and json.loads(body)["error"] == "body_too_large", body
    assert sent < 45_000_000, f"{sent} bytes were sent before the 413"


def test_slow_bodies_are_cut_off_and_do_not_hold_every_slot(url):
    """More dripping clients than the ingress has slots: each gets a 408 after the body timeout, and a normal
    request sent meanwhile is answered (its wait bounded by the timeout, not by the drippers)."""
    results: list[tuple[int, float]] = []

    def drip():
        start = time.time()
        sock = _open(url, {**_auth(FULL), "Content-Length": "5000"})
        status = -1
        try:
            while time.time() - start < 30:
                if select.select([sock], [], [], 0.3)[0]:
                    status = _response(sock)[0]
                    break
                sock.sendall(b" ")
        except (BrokenPipeError, ConnectionResetError):
            status = _response(sock)[0]
        finally:
            sock.close()
        results.append((status, time.time() - start))

    threads = [threading.Thread(target=drip) for _ in range(SLOTS + 4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    start = time.time()
    r = _classify(url, OK)
    waited = time.time() - start
    for t in threads:
        t.join()
    assert r.status_code == 200 and waited < 3 * BODY_TIMEOUT_S + 5, (r.status_code, waited)
    assert [s for s, _ in results] == [408] * len(threads), results
    assert max(t for _, t in results) < 3 * BODY_TIMEOUT_S + 5, results


def test_405_keeps_its_allow_header_and_the_error_shape(url):
    r = requests.delete(f"{url}/v1/classify", headers=_auth(FULL), timeout=10)
    _error(r, 405, "method_not_allowed")
    assert r.headers["Allow"] == "POST"


# ---- a broken store entry -------------------------------------------------------------------------------------------


def test_a_corrupt_entry_fails_only_the_requests_that_name_it(url, store, backbone):
    """A vector whose tensor bytes were damaged (its hash check fails) and a file that is not a vector at all:
    requests naming the damaged one get a 500 in the JSON shape without any path; every other request, the
    listing and the health check are unaffected."""
    store.put(_vector("broken", backbone, 50, vector_id="broken-v1"))
    folder = Path(store.root) / backbone.backbone_id / "vectors"
    damaged = folder / "broken" / "broken-v1.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-4:] = bytes(b ^ 0xFF for b in data[-4:])
    damaged.write_bytes(bytes(data))
    (folder / "junk").mkdir()
    (folder / "junk" / "junk-v1.safetensors").write_bytes(b"not a safetensors file")
    try:
        time.sleep(0.5)  # past the reload window
        for named in ({"terms": [{"task": "broken"}]}, {"terms": [{"vector_id": "broken-v1"}]}):
            detail = _error(_classify(url, {**OK, "composition": named}), 500, "store_corrupt")["detail"]
            assert store.root not in detail and "broken-v1.safetensors" not in detail
        for body in (OK, {**OK, "composition": "mix"}, {**OK, "composition": {"terms": [{"task": "trec"}]}}):
            r = _classify(url, body)
            assert r.status_code == 200, r.text
        listing = requests.get(f"{url}/v1/vectors", headers=_auth(FULL), timeout=10)
        assert listing.status_code == 200 and "rotten_tomatoes" in listing.json()["tasks"]
        health = requests.get(f"{url}/v1/health", timeout=10)
        assert health.status_code == 200 and store.root not in health.text
    finally:
        damaged.unlink()
        (folder / "junk" / "junk-v1.safetensors").unlink()
        time.sleep(0.5)


# ---- schema-driven fuzz of the live OpenAPI ---------------------------------------------------------------------


FUZZ_EXAMPLES = 30  # per operation and generation mode
FUZZ_SECONDS = 150


def test_fuzz_the_live_openapi(url, capsys):
    """Generated requests, valid and invalid per the schema: never a 5xx, every response matches its documented
    status, content type and schema, and invalid ones are refused with a 4xx."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import (
        content_type_conformance,
        negative_data_rejection,
        not_a_server_error,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    raw = requests.get(f"{url}/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(raw)
    # a generated body over the configured byte limit is refused before validation, with 413: also a rejection
    rejection = schema.config.checks.negative_data_rejection
    rejection.expected_statuses = [*rejection.expected_statuses, "413"]
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
              response_headers_conformance, negative_data_rejection]
    deadline = time.monotonic() + FUZZ_SECONDS
    counts: dict[str, int] = {}
    session = requests.Session()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in schemathesis.GenerationMode:
            @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case):
                if time.monotonic() > deadline:
                    return
                response = case.call(base_url=url, session=session, headers=_auth(FULL), timeout=30)
                label = operation.label  # noqa: B023 - run() is called within this iteration
                counts[label] = counts.get(label, 0) + 1
                case.validate_response(response, checks=checks, headers=_auth(FULL))

            try:
                run()
            except Unsatisfiable:  # e.g. no invalid request exists for an operation without parameters
                pass
    total = sum(counts.values())
    with capsys.disabled():
        print(f"\nschemathesis fuzz: {total} examples run ({counts})")
    assert {"POST /v1/classify", "POST /v1/generate", "GET /v1/vectors", "GET /v1/health"} <= set(counts)
    assert total >= 60, counts
