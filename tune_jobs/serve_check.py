"""Serve a stored composition and check it over real HTTP against the library (the main job's last stage).

Starts Serve on 127.0.0.1 with the app (serve.app.build: ingress + model deployments) on the store, classifies
examples through `POST /v1/classify` with a stored composition name, computes the same scores offline with tpv
(Composer + Backbone.score_labels on the same inputs), and reports the largest difference and both accuracies. It
owns the Serve instance it starts and shuts it down at the end, whatever happened; it refuses to touch a Serve
that is already running on the cluster (someone's apps).
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from typing import Any

from pydantic import BaseModel

from tpv.backbone import Backbone, BackboneConfig
from tpv.errors import ConflictError
from tpv.tasks import Example


class ServeAlreadyRunning(ConflictError):
    """The cluster already runs Serve; the check starts and stops its own."""


class ServeCheck(BaseModel):
    """What the check measured."""

    served_accuracy: float
    offline_accuracy: float
    max_prob_diff: float
    examples: int
    seconds: float
    url: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(url: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _wait_healthy(base: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{base}/v1/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Serve app at {base} did not become healthy within {timeout:.0f} s")
        time.sleep(1.0)


def offline_probabilities(backbone: Backbone, prompt, examples: list[Example], labels: list[str]) -> list[list[float]]:
    """The library's label probabilities for each example (softmax of the summed label log-likelihoods)."""
    import torch

    from tpv.evaluate import label_scores, shared_prompt

    scores = label_scores(backbone, shared_prompt(backbone, prompt), [e.source for e in examples], labels)
    return torch.softmax(scores.float(), dim=1).tolist()


def serve_and_check(store: str, model: str, composition: str, task: str, examples: list[Example],
                    num_cpus: float = 1.0, batch: int = 16, max_input_tokens: int = 256,
                    timeout_s: float = 300.0) -> ServeCheck:
    """Serve `composition` from `store`, classify `examples` of `task` over HTTP, compare with tpv offline.

    The server refuses inputs over `max_input_tokens` (it never truncates), so tpv scores offline with the same
    bound: both sides see every input whole."""
    from ray import serve

    from serve.app import build
    from tpv.compose import Composer
    from tpv.prompt import make_origin
    from tpv.store import VectorStore
    from tpv.tasks import get_task

    if serve.status().proxies:
        raise ServeAlreadyRunning("Serve is already running on this Ray cluster: stop it (`serve shutdown`) or "
                                  "skip this check (`tpv demo --skip-serve`); the check never touches others' apps")
    started = time.perf_counter()
    labels = get_task(task).labels
    backbone = Backbone.load(BackboneConfig(model=model, max_source_tokens=max_input_tokens))
    composer = Composer(VectorStore(store), lambda n, s: make_origin(backbone, n, s))
    prompt = composer.compose_named(backbone.backbone_id, composition)
    offline = offline_probabilities(backbone, prompt, examples, labels)
    port = free_port()
    settings = {"store_uri": store, "backbone": model, "max_input_tokens": max_input_tokens}
    app = build(model_options={"num_replicas": 1, "ray_actor_options": {"num_cpus": num_cpus},
                               "user_config": settings})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    try:
        serve.run(app, name="tpv-check", route_prefix="/", blocking=False)
        _wait_healthy(base, timeout_s)
        served: list[list[float]] = []
        for i in range(0, len(examples), batch):
            rows = examples[i : i + batch]
            # the inputs are the task's filled templates, so the server sees exactly what tpv scored offline
            body = {"inputs": [e.source for e in rows], "composition": composition, "labels": labels,
                    "template": "{text}"}
            result = _post(f"{base}/v1/classify", body, timeout_s)
            served += [[r["scores"][label] for label in labels] for r in result["results"]]
    finally:
        serve.shutdown()
    gold = [int(e.label) for e in examples]

    def accuracy(probs: list[list[float]]) -> float:
        return sum(max(range(len(p)), key=p.__getitem__) == g for p, g in zip(probs, gold)) / len(gold)

    diff = max(abs(a - b) for s, o in zip(served, offline) for a, b in zip(s, o))
    return ServeCheck(served_accuracy=accuracy(served), offline_accuracy=accuracy(offline), max_prob_diff=diff,
                      examples=len(examples), seconds=time.perf_counter() - started, url=base)
