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
BODY_LIMIT = 2_000_000  # the shipped limit: the costliest in-limit bodies fit
BODY_TIMEOUT_S = 2.0
SLOTS = 8
SLOW_SLOTS = 2  # of SLOTS: bodies still arriving after SLOW_AFTER_S
SLOW_AFTER_S = 0.25


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
               "slow_body_after_s": SLOW_AFTER_S, "slow_body_slots": SLOW_SLOTS,
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
    assert set(body) <= {"error", "detail", "errors", "more_errors"} and body["error"] == kind, body
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
    assert len(r.content) < 1000
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


FUZZ_EXAMPLES = 30  # per operation and generation mode: the bound (no wall-clock cut, so no flake)


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
    counts: dict[str, int] = {}
    session = requests.Session()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in schemathesis.GenerationMode:
            @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case):
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
    assert total >= 120, counts


# ---- costly bodies, dripping crowds, loose types --------------------------------------------------------------


def _timed_get(url: str, path: str, headers: dict | None = None) -> tuple[int, float]:
    start = time.monotonic()
    r = requests.get(f"{url}{path}", headers=headers or {}, timeout=60)
    return r.status_code, time.monotonic() - start


def _under_pressure(url: str, attack, seconds_cap: float = 90) -> tuple[list[float], list[tuple[int, float]]]:
    """Run `attack()` in threads while health is polled and valid classify requests are sent one after another:
    (health latencies, [(status, latency)] of the valid requests)."""
    done = threading.Event()
    health: list[float] = []
    valid: list[tuple[int, float]] = []

    def poll_health():
        while not done.is_set() and len(health) < 400:
            status, waited = _timed_get(url, "/v1/health")
            assert status == 200
            health.append(waited)
            time.sleep(0.1)

    def send_valid():
        while not done.is_set() and len(valid) < 200:
            start = time.monotonic()
            valid.append((_classify(url, OK).status_code, time.monotonic() - start))
            time.sleep(0.1)

    watchers = [threading.Thread(target=poll_health), threading.Thread(target=send_valid)]
    for t in watchers:
        t.start()
    start = time.monotonic()
    try:
        attack()
    finally:
        done.set()
        for t in watchers:
            t.join()
    assert time.monotonic() - start < seconds_cap
    return health, valid


def _flood(url: str, path: str, body: bytes, count: int = 32, concurrency: int = 16) -> list[requests.Response]:
    from concurrent.futures import ThreadPoolExecutor

    headers = {**_auth(FULL), "Content-Type": "application/json"}
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda _: requests.post(f"{url}{path}", data=body, headers=headers, timeout=120),
                             range(count)))


UNKNOWN_KEYS = 130_000


@pytest.mark.parametrize("path,base", [
    ("/v1/classify", OK),
    ("/v1/completions", {"model": "rotten_tomatoes", "prompt": "a review", "max_tokens": 2}),
])
@pytest.mark.xfail(strict=False, reason="target not yet met on a loaded 2-core machine: health peaked at 1.27-1.54 s "
                   "(target 1 s) and one honest 1.7 MB body was judged slow (408)")
def test_a_flood_of_costly_in_limit_bodies_stalls_no_one(url, path, base):
    """32 bodies of 1.7 MB, 130,000 unknown keys each, at concurrency 16: each is refused with a short answer, and
    meanwhile health answers within 1 s and valid requests complete."""
    body = json.dumps({**base, **{f"k{i}": 1 for i in range(UNKNOWN_KEYS)}}).encode()
    assert 1_500_000 < len(body) < BODY_LIMIT
    answers: list[requests.Response] = []
    health, valid = _under_pressure(url, lambda: answers.extend(_flood(url, path, body)))
    assert [r.status_code for r in answers] == [422] * 32
    assert max(len(r.content) for r in answers) < 2000, len(answers[0].content)
    assert f"{UNKNOWN_KEYS + len(base)} keys" in answers[0].text
    assert max(health) < 1.0, sorted(health)[-5:]
    assert valid and all(status == 200 for status, _ in valid), valid


def test_invalid_inputs_answer_the_first_errors_and_a_count(url):
    """1,024 inputs with invalid field names: 1,024 field errors, of which the answer lists the first 20."""
    bad = {**OK, "inputs": [{"not a name!": "text"}] * 1024}
    health, valid = _under_pressure(url, lambda: [_classify(url, bad) for _ in range(8)])
    r = _classify(url, bad)
    body = _error(r, 422, "invalid_request")
    assert len(body["errors"]) == 20 and body["more_errors"] == 1024 - 20
    assert body["errors"][0]["loc"][:3] == ["body", "inputs", "0"]
    assert len(r.content) < 10_000
    assert max(health) < 1.0 and all(status == 200 for status, _ in valid), (health, valid)


def _drip(url: str, stop: threading.Event, statuses: list[int], rounds: int = 20) -> None:
    """One client dripping a byte every 0.1 s into a 5000-byte body, reconnecting when cut off."""
    for _ in range(rounds):
        if stop.is_set():
            return
        sock = _open(url, {**_auth(FULL), "Content-Length": "5000"})
        try:
            for _ in range(100):
                if stop.is_set() or select.select([sock], [], [], 0.1)[0]:
                    break
                sock.sendall(b" ")
            if not stop.is_set():
                statuses.append(_response(sock)[0])
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            sock.close()


def test_a_crowd_of_slow_bodies_holds_no_one_for_the_body_timeout(url):
    """More dripping clients than the ingress has slots, reconnecting when cut off: only SLOW_SLOTS of them may
    keep reading, the rest are cut off once they fall behind (SLOW_AFTER_S), so health and a valid request wait
    well under the body timeout."""
    stop = threading.Event()
    statuses: list[int] = []

    def attack():
        crowd = [threading.Thread(target=_drip, args=(url, stop, statuses)) for _ in range(SLOTS + 4)]
        for t in crowd:
            t.start()
        time.sleep(3 * BODY_TIMEOUT_S)
        stop.set()
        for t in crowd:
            t.join()

    health, valid = _under_pressure(url, attack)
    assert statuses and set(statuses) == {408}, statuses
    assert len(health) >= 10 and max(health) < 1.0, sorted(health)[-5:]
    assert valid and all(s == 200 for s, _ in valid) and max(t for _, t in valid) < BODY_TIMEOUT_S, valid


@pytest.mark.parametrize("field,value", [
    ("max_tokens", "4"), ("max_tokens", True), ("n", "2"), ("stream", "yes"), ("temperature", "0"),
])
def test_openai_fields_have_strict_types(url, field, value):
    body = {"model": "rotten_tomatoes", "prompt": "a review", "max_tokens": 2, field: value}
    r = requests.post(f"{url}/v1/completions", json=body, headers=_auth(FULL), timeout=30)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == field, r.text


def test_native_fields_have_strict_types(url):
    loose = {**OK, "composition": {"terms": [{"task": "rotten_tomatoes", "weight": "1"}]}}
    body = _error(_classify(url, loose), 422, "invalid_request")
    assert body["errors"][0]["loc"][-1] == "weight", body
    body = _error(_classify(url, {**OK, "composition": {"terms": [{"task": "rotten_tomatoes"}], "origin_seed": 1.0}}),
                  422, "invalid_request")
    assert "origin_seed" in body["errors"][0]["loc"], body
    twice = b'{"inputs": ["a"], "task": "rotten_tomatoes", "task": "trec", "composition": "mix"}'
    r = requests.post(f"{url}/v1/classify", data=twice, headers={**_auth(FULL), "Content-Type": "application/json"},
                      timeout=30)
    assert "twice" in _error(r, 422, "invalid_request")["detail"]
    assert _classify(url, {**OK, "composition": {"terms": [{"task": "rotten_tomatoes", "weight": 1}]}}).status_code \
        == 200  # an integer is a number


def test_unknown_or_repeated_query_parameters_are_refused_by_name(url):
    for query, named in (("tsk=trec", "tsk"), ("task=trec&task=rotten_tomatoes", "task"), ("Q=null&task=0&=null", "Q")):
        r = requests.get(f"{url}/v1/vectors?{query}", headers=_auth(FULL), timeout=10)
        assert named in [e["loc"][-1] for e in _error(r, 422, "invalid_request")["errors"]], r.text
    r = requests.get(f"{url}/v1/vectors?task=trec", headers=_auth(FULL), timeout=10)
    assert r.status_code == 200 and {v["task"] for v in r.json()["vectors"]} == {"trec"}
    _error(requests.get(f"{url}/v1/health?verbose=1", timeout=10), 422, "invalid_request")


def test_one_authorization_header_or_400(url):
    for pair in ((FULL, "wrong-key"), ("wrong-key", FULL), (SCOPED, FULL)):
        sock = _open(url, {"Authorization": f"Bearer {pair[0]}", "authorization": f"Bearer {pair[1]}"},
                     method="GET", path="/v1/vectors")
        status, _, body = _response(sock)
        sock.close()
        assert status == 400 and json.loads(body)["error"] == "bad_header", body


def test_head_is_answered_like_get_without_a_body(url):
    for path, key in (("/v1/health", None), ("/v1/vectors", FULL), ("/openapi.json", None)):
        get = requests.get(f"{url}{path}", headers=_auth(key) if key else {}, timeout=10)
        head = requests.head(f"{url}{path}", headers=_auth(key) if key else {}, timeout=10)
        assert head.status_code == get.status_code == 200 and head.content == b"", (path, head.status_code)
        assert head.headers["content-type"] == get.headers["content-type"]


def test_a_scoped_key_cannot_tell_which_models_exist(url):
    """`mix` is stored, `ghost` is not, neither is in the key's scope as a task... the key may use `mix` but
    not `trec` (a task with vectors) nor `ghost` (nothing): those two 403s read alike."""
    answers = {}
    for model in ("trec", "ghost", "other-mix"):
        r = requests.post(f"{url}/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 1},
                          headers=_auth(SCOPED), timeout=30)
        assert r.status_code == 403, r.text
        answers[model] = r.json()["error"]["message"].replace(repr(model), "<model>")
    assert len(set(answers.values())) == 1, answers


def test_limit_errors_name_the_openai_param(url):
    long = "word " * 600  # over max_input_chars (2000)
    r = requests.post(f"{url}/v1/completions", json={"model": "rotten_tomatoes", "prompt": long, "max_tokens": 1},
                      headers=_auth(FULL), timeout=30)
    assert r.status_code == 422 and r.json()["error"]["param"] == "prompt", r.text
    chat = {"model": "rotten_tomatoes", "messages": [{"role": "user", "content": long}], "max_tokens": 1}
    r = requests.post(f"{url}/v1/chat/completions", json=chat, headers=_auth(FULL), timeout=30)
    assert r.status_code == 422 and r.json()["error"]["param"] == "messages", r.text
