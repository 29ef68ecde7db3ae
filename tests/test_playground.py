"""The playground page in a real headless browser: Debian's chromium driven by Selenium (chromedriver from the same
Debian release), against the live app on the session's local Ray, with API keys on. Tiny real model, real store.

scripts/install.sh installs chromium and chromium-driver with apt-get when they are missing; the test skips only
when they are still missing (no root, not Debian, or no package registry)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import requests
import torch
from test_serve_http import _vector, deploy

from serve.auth import digest
from serve.similarity import similarity_groups, visible
from tpv.store import VectorStore
from tpv.vectors import TaskPromptVector, similarity_matrix

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no chromium + chromedriver on PATH: scripts/install.sh installs Debian's packages chromium and "
           "chromium-driver with apt-get, which failed or was not possible on this machine (needs root and apt)",
)

APP = "tpv-playground-test"
PREFIX = "/playground-test"  # under a route prefix: the page must find its files and the API there
KEY = "playground-key-0123456789"
TREC_KEY = "trec-only-key-0123456789"  # a key scoped to one task
TEXT = "a gripping, beautifully acted film"
WAIT_S = 60


@pytest.fixture(scope="module")
def store(tmp_path_factory, backbone) -> VectorStore:
    store = VectorStore(tmp_path_factory.mktemp("playground-store"))
    for seed in range(2):
        store.put(_vector("rotten_tomatoes", backbone, seed, origin_seed=seed))
    store.put(_vector("trec", backbone, 20, vector_id="trec-v1"))
    bb = backbone.backbone_id
    store.put_composition(bb, "mix", {"backbone_id": bb, "origin_seed": 0, "prompt_length": 6,
                                      "terms": [{"task": "rotten_tomatoes", "weight": 0.5}, {"vector_id": "trec-v1"}]})
    return store


@pytest.fixture(scope="module")
def url(ray_session, tiny_causal_path, store):
    from ray import serve

    from serve.app import build

    model = {"store_uri": store.uri, "backbone": str(tiny_causal_path), "device": "cpu", "torch_threads": 1,
             "reload_interval_s": 60.0, "max_input_tokens": 64}
    keys = [{"sha256": digest(KEY), "name": "page"}, {"sha256": digest(TREC_KEY), "name": "trec", "tasks": ["trec"]}]
    ingress = {"auth": {"keys": keys}, "request_timeout_s": 30.0}
    app = build({"user_config": model, "ray_actor_options": {"num_cpus": 1}, "num_replicas": 1},
                {"user_config": ingress, "ray_actor_options": {"num_cpus": 0}})
    yield deploy(app, APP, PREFIX)
    serve.delete(APP)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1100"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _api(url: str, path: str, body: dict) -> dict:
    r = requests.post(f"{url}{path}", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _shown(browser) -> tuple[dict | None, dict[str, float]]:
    """The classify request the page's numbers belong to, and those numbers (label -> probability)."""
    from selenium.webdriver.common.by import By

    table = browser.find_element(By.ID, "probs")
    sent = table.get_attribute("data-request")
    rows = browser.find_elements(By.CSS_SELECTOR, "#probs tr[data-label]")
    return (json.loads(sent) if sent else None), {r.get_attribute("data-label"): float(r.get_attribute("data-p"))
                                                  for r in rows}


def test_heatmap_groups_vectors_by_shape_and_keeps_what_a_key_may_see(tmp_path, backbone):
    store = VectorStore(tmp_path / "store")
    ids = [store.put(_vector(task, backbone, seed, origin_seed=seed)) for task, seed in
           (("trec", 0), ("rotten_tomatoes", 1), ("rotten_tomatoes", 0))]
    short = TaskPromptVector.create(torch.ones(4, backbone.hidden_size), task="trec", origin_seed=0,
                                    backbone_id=backbone.backbone_id)
    store.put(short)
    groups = similarity_groups(store, backbone.backbone_id, store.list(backbone.backbone_id))
    assert [(g.prompt_length, len(g.vector_ids), g.left_out) for g in groups] == [(4, 1, 0), (6, 3, 0)]
    six = groups[1]
    assert six.tasks == ["rotten_tomatoes", "rotten_tomatoes", "trec"]  # by task, then origin seed
    assert six.vector_ids == [ids[2], ids[1], ids[0]]
    _, expected = similarity_matrix([store.get(i) for i in six.vector_ids], "flat")
    torch.testing.assert_close(torch.tensor(six.matrix, dtype=torch.float64), torch.from_numpy(expected), atol=1e-6,
                               rtol=0)
    assert groups[0].matrix == [[1.0]]

    scoped = visible(groups, lambda task: task == "rotten_tomatoes")
    assert [g.vector_ids for g in scoped] == [[ids[2], ids[1]]]  # the trec-only group is gone, trec rows too
    assert scoped[0].matrix == [row[:2] for row in six.matrix[:2]]


def test_page_files_are_open_and_the_heatmap_route_keeps_to_the_key(url, store, backbone):
    page = requests.get(f"{url}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert f'src="{PREFIX}/playground/app.js"' in page.text  # the route prefix filled in
    for name, media in (("app.js", "text/javascript"), ("style.css", "text/css")):
        asset = requests.get(f"{url}/playground/{name}", timeout=10)
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(media) and asset.content
    assert requests.get(f"{url}/playground/index.html", timeout=10).status_code == 401  # not a file server

    assert requests.get(f"{url}/v1/similarity", timeout=10).status_code == 401
    full = requests.get(f"{url}/v1/similarity", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
    trec = requests.get(f"{url}/v1/similarity", headers={"Authorization": f"Bearer {TREC_KEY}"}, timeout=10).json()
    assert [g["tasks"] for g in full["groups"]] == [["rotten_tomatoes", "rotten_tomatoes", "trec"]]
    assert [(g["vector_ids"], g["matrix"]) for g in trec["groups"]] == [(["trec-v1"], [[1.0]])]
    assert full["store_version"] == trec["store_version"] == store.version()


@needs_browser
def test_page_shows_the_store_and_follows_a_weight_slider(url, browser, store, backbone, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, WAIT_S)
    text_of = lambda element_id: browser.find_element(By.ID, element_id).text
    browser.get(f"{url}/")

    # keys apply to the page's calls: without one it shows the API's 401
    wait.until(lambda d: "401" in text_of("status"))
    assert "key" in text_of("status")
    browser.find_element(By.ID, "key").send_keys(KEY)
    browser.find_element(By.ID, "use-key").click()
    wait.until(lambda d: _shown(d)[0] is not None and text_of("status") == "ready")

    # the store: tasks, stored compositions, vectors, and the flat-cosine heatmap of tpv.vectors
    tasks = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#tasks tbody td:first-child")]
    assert tasks == ["rotten_tomatoes", "trec"]
    assert [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#compositions li")] == ["mix"]
    metas = sorted(store.list(backbone.backbone_id), key=lambda m: (m.task, m.origin_seed, m.vector_id))
    shown_ids = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#vectors tbody td:first-child")]
    assert sorted(shown_ids) == sorted(m.vector_id for m in metas)
    cells = browser.find_elements(By.CSS_SELECTOR, "#heatmaps td[data-value]")
    _, expected = similarity_matrix([store.get(m.vector_id) for m in metas], "flat")
    got = torch.tensor([float(c.get_attribute("data-value")) for c in cells]).reshape(len(metas), len(metas))
    torch.testing.assert_close(got, torch.from_numpy(expected).float(), atol=1e-5, rtol=0)

    # the default composition (the first task at weight 1) is what the page sent and shows
    before_request, before = _shown(browser)
    assert before_request == {"inputs": [TEXT], "task": "rotten_tomatoes",
                              "composition": {"terms": [{"task": "rotten_tomatoes", "weight": 1}], "origin_seed": 0}}
    assert set(before) == {"negative", "positive"} and sum(before.values()) == pytest.approx(1.0)

    # move the weight slider as a user does (keyboard, 15 steps of 0.1, from 1 to -0.5): the numbers change, to
    # exactly the API's for the new composition (the tiny random model moves them by ~7e-5, far above 1e-9)
    slider = browser.find_element(By.CSS_SELECTOR, ".term .weight")
    for _ in range(15):
        slider.send_keys(Keys.ARROW_LEFT)
    assert browser.find_element(By.CSS_SELECTOR, ".term .weight-value").text == "-0.5"
    wait.until(lambda d: (_shown(d)[0] or {}).get("composition", {}).get("terms", [{}])[0].get("weight") == -0.5)
    after_request, after = _shown(browser)
    composition = {"terms": [{"task": "rotten_tomatoes", "weight": -0.5}], "origin_seed": 0}
    assert after_request == {"inputs": [TEXT], "task": "rotten_tomatoes", "composition": composition}
    assert max(abs(after[k] - before[k]) for k in before) > 1e-5, (before, after)
    served = _api(url, "/v1/classify", after_request)["results"][0]["scores"]
    assert after == pytest.approx(served, abs=1e-9, rel=0)
    shown_text = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#probs td.p")]
    assert shown_text == [f"{served[k]:.4f}" for k in ("negative", "positive")]

    # the generation shown is the API's for that composition
    generate = json.loads(browser.find_element(By.ID, "generation").get_attribute("data-request"))
    assert generate["composition"] == composition
    expected_text = _api(url, "/v1/generate", generate)["results"][0]["text"]
    assert browser.find_element(By.ID, "generation").get_attribute("textContent") == expected_text

    out = Path(os.environ.get("TPV_TEST_ARTIFACTS", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(out / "playground.png"))
