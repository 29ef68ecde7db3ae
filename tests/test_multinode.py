"""More than one Ray node, for real: a sweep whose trials run on two nodes and write into one shared store, then
Serve with one model replica on each node answering one composition identically over HTTP.

The test starts its own cluster on this machine, never the session's shared Ray: `ray start --head` and
`ray start --address` on free ports, each node with its own temp dir, its own IP (the head's, and 127.0.0.2 for
the second: Tune records each trial's `node_ip`, so the results say which node ran it), one `tpv_model` slot (so
the two model replicas must sit one per node) and the cluster's own token (RAY_AUTH_MODE=token). It drives the
cluster as a user does, from other processes with `--address` (`tpv sweep`, `tpv serve`), and stops exactly the
processes it started: every Ray process of a node names that node's temp dir on its command line. Never a
machine-wide `ray stop`.

The store and Tune's storage_path are passed explicitly (`--store`, `--storage-path`, the model's `store_uri`)
while every process's TPV_STORE / TPV_RAY_RESULTS point at decoy folders, so a component that fell back to a
default would write there, and the test checks that nothing did.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch
import yaml
from pydantic import BaseModel
from task_data import sentiment_rows, write_builtin_task

from tpv.store import VectorStore

pytestmark = pytest.mark.slow

HEAD_IP, NODE2_IP = "127.0.0.1", "127.0.0.2"
TRAIN = ["max_steps=8", "eval_every=4", "prompt_length=4", "eval_examples=8", "batch_size=4", "warmup_steps=1"]
SERVE_CONFIG = Path(__file__).resolve().parent.parent / "serve" / "config.yaml"
REQUESTS = 12  # sequential classify requests: each goes to either replica at random (2**-11 that one gets none)


class Cluster(BaseModel):
    """The two-node cluster the test started and where its jobs read and write."""

    root: Path
    address: str
    env: dict[str, str]
    store: Path
    storage_path: Path
    decoys: list[Path]


def _free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def _ray_start(ip: str, temp_dir: Path, resources: dict[str, float], env: dict[str, str], head_args: list[str]):
    """`ray start` for one node on `ip`, every port of its own free (other Ray clusters share this machine)."""
    ports = {flag: _free_port(ip) for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                               "--runtime-env-agent-port", "--metrics-export-port")}
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", f"--node-ip-address={ip}", "--num-cpus=1",
           f"--resources={json.dumps(resources)}", f"--temp-dir={temp_dir}", f"--object-store-memory={100 << 20}",
           "--min-worker-port=0", "--max-worker-port=0", "--disable-usage-stats",
           *(f"{flag}={port}" for flag, port in ports.items()), *head_args]
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr


def _processes_under(root: Path) -> list[int]:
    """Processes whose command line names `root` (the cluster's temp dirs): exactly the Ray processes we started."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if str(root).encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def _stop(root: Path) -> None:
    """SIGTERM the cluster's processes, then SIGKILL what is left after 15 s."""
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        for pid in _processes_under(root):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while _processes_under(root) and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(tiny_causal_path) -> Iterator[Cluster]:
    write_builtin_task("imdb", sentiment_rows() * 2)
    write_builtin_task("yelp", sentiment_rows(" here") * 2)
    root = Path(tempfile.mkdtemp(prefix="tpvmn-", dir="/tmp"))  # short: Ray's socket paths live under it
    shared = root / "shared"
    decoys = [root / "decoy-store", root / "decoy-ray-results"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"TPV_STORE": str(decoys[0]), "TPV_RAY_RESULTS": str(decoys[1]), "TOKENIZERS_PARALLELISM": "false",
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # this cluster's own token
    port = _free_port(HEAD_IP)
    try:
        _ray_start(HEAD_IP, root / "head", {"head": 1, "tpv_model": 1}, env,
                   ["--head", f"--port={port}", "--include-dashboard=false", f"--dashboard-port={_free_port(HEAD_IP)}",
                    f"--ray-client-server-port={_free_port(HEAD_IP)}"])
        _ray_start(NODE2_IP, root / "node2", {"node2": 1, "tpv_model": 1}, env, [f"--address={HEAD_IP}:{port}"])
        yield Cluster(root=root, address=f"{HEAD_IP}:{port}", env=env, store=shared / "store",
                      storage_path=shared / "ray_results", decoys=decoys)
    finally:
        _stop(root)
        left = _processes_under(root)
        assert not left, f"processes of the test's cluster still running: {left}"
        shutil.rmtree(root, ignore_errors=True)


def _tpv(cluster: Cluster, *args: str, timeout: float = 480) -> str:
    done = subprocess.run([sys.executable, "-m", "tpv.cli", *args], check=False, env=cluster.env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout


def _trial_results(storage_path: Path) -> list[dict]:
    """Each Tune trial's last result (Tune fills in `node_ip`: the node the trial ran on)."""
    results = []
    for path in storage_path.glob("*/*/result.json"):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        results.append(lines[-1])
    return results


@pytest.fixture(scope="module")
def swept(cluster, tiny_causal_path) -> list[dict]:
    """A packed sweep: 2 tasks x 2 seeds in packs of 2, so two trials, one per node (each node has one CPU)."""
    _tpv(cluster, "sweep", "--address", cluster.address, "--store", str(cluster.store),
         "--storage-path", str(cluster.storage_path), "--out", str(cluster.root / "reports"),
         "--name", "multinode", "--tasks", "imdb", "yelp", "--seeds", "0", "1", "--pack", "2",
         "--backbones", str(tiny_causal_path), "--cpus-per-trial", "1", "--set", *TRAIN)
    return _trial_results(cluster.storage_path)


def test_packed_sweep_trials_run_on_both_nodes_and_fill_one_store(cluster, swept):
    nodes = {r["node_ip"] for r in swept}  # Ray reports the head as this machine's IP, not 127.0.0.1
    assert len(swept) == 2 and len(nodes) == 2 and NODE2_IP in nodes, [(r["trial_id"], r["node_ip"]) for r in swept]
    written = {final["vector_id"]: r["node_ip"] for r in swept for final in r["members"].values()}
    assert len(written) == 4 and set(written.values()) == nodes  # each pack trained 2 pairs on its node
    metas = VectorStore(cluster.store).list()
    assert sorted((m.task, m.origin_seed) for m in metas) == [("imdb", 0), ("imdb", 1), ("yelp", 0), ("yelp", 1)]
    assert set(written) == {m.vector_id for m in metas}  # every pair's vector, from either node, is in the store


def test_store_and_storage_path_were_passed_not_found(cluster, swept):
    """Every process's TPV_STORE / TPV_RAY_RESULTS name decoys: nothing may have been written there."""
    assert all(not d.exists() or not any(d.rglob("*")) for d in cluster.decoys)
    assert any(cluster.storage_path.glob("multinode-*/*/checkpoint_*"))  # checkpoints went where we said


def test_trials_that_hold_a_custom_resource_run_only_on_the_nodes_that_have_it(cluster, swept, tiny_causal_path):
    """`--trial-resources node2=1`: every trial (and the probe that sizes a pack's memory) needs `node2`, which only
    the second node has, so both packs run there, one after the other."""
    storage = cluster.root / "pinned_results"
    _tpv(cluster, "sweep", "--address", cluster.address, "--store", str(cluster.store), "--storage-path", str(storage),
         "--out", str(cluster.root / "reports"), "--name", "pinned", "--tasks", "imdb", "yelp", "--seeds", "2", "3",
         "--pack", "2", "--trial-resources", "node2=1", "--backbones", str(tiny_causal_path), "--cpus-per-trial", "1",
         "--set", *TRAIN)
    pinned = _trial_results(storage)
    assert len(pinned) == 2 and {r["node_ip"] for r in pinned} == {NODE2_IP}, [r["node_ip"] for r in pinned]
    stored = {(m.task, m.origin_seed) for m in VectorStore(cluster.store).list()}
    assert {("imdb", 2), ("imdb", 3), ("yelp", 2), ("yelp", 3)} <= stored


def _serve_config(cluster: Cluster, path: Path) -> Path:
    """serve/config.yaml as a cluster user would adapt it: one model replica per `tpv_model` slot (one per node),
    one torch thread each. Its HTTP proxy on every node stays: on one host both share the port (SO_REUSEPORT)."""
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    model = next(d for d in config["applications"][0]["deployments"] if d["name"] == "TPVModel")
    model["ray_actor_options"]["resources"] = {"tpv_model": 1}
    model["user_config"] |= {"torch_threads": 1, "max_input_tokens": 64, "max_prompt_length": 64,
                             "batch_wait_timeout_s": 0.0}
    path.write_text(yaml.safe_dump(config))
    return path


def _health(url: str) -> dict | None:
    """The health body, or None while the app is still starting (no answer, or not 200 yet)."""
    try:
        r = requests.get(f"{url}/v1/health", timeout=30)
    except requests.RequestException:
        return None
    return r.json() if r.status_code == 200 else None


def _replicas(url: str, want: int = 2, timeout: float = 180) -> dict[str, dict]:
    """Each model replica's health body, by replica id (a health check reaches one replica at random)."""
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < want:
        assert time.monotonic() < deadline, f"only replicas {sorted(seen)} answered /v1/health"
        body = _health(url)
        if body is None:
            time.sleep(0.5)
        else:
            seen[body["replica"]] = body
    return seen


def _node_of_replica(cluster: Cluster, replica: str) -> str:
    """The node (its temp dir's name) whose Serve logs hold this model replica's log file."""
    logs = cluster.root.glob(f"*/session_latest/logs/serve/replica_*_TPVModel_{replica}.log")
    found = [p.relative_to(cluster.root).parts[0] for p in logs]
    assert len(found) == 1, (replica, found)
    return found[0]


@pytest.fixture(scope="module")
def served(cluster, swept, tiny_causal_path) -> str:
    port = _free_port(HEAD_IP)
    config = _serve_config(cluster, cluster.root / "serve.yaml")
    _tpv(cluster, "serve", "--config", str(config), "--address", cluster.address, "--non-blocking",
         "--store", str(cluster.store), "--backbone", str(tiny_causal_path), "--device", "cpu",
         "--replicas", "2", "--num-cpus", "0.5", "--port", str(port), timeout=300)
    url = f"http://{HEAD_IP}:{port}"
    _replicas(url)
    return url


def test_a_replica_on_each_node_answers_the_same_composition_identically(cluster, served, tiny_causal_path):
    from tpv.backbone import Backbone, BackboneConfig
    from tpv.compose import Composer, CompositionSpec
    from tpv.prompt import make_origin
    from tpv.tasks import get_task

    body = {"inputs": ["the movie was great", "a waste of time, boring", "what is the capital of france?"],
            "composition": {"terms": [{"task": "imdb"}, {"task": "yelp", "weight": -0.5}], "origin_seed": 3},
            "task": "imdb"}
    before = {rid: h["batching"]["requests"] for rid, h in _replicas(served).items()}
    answers = []
    for _ in range(REQUESTS):
        r = requests.post(f"{served}/v1/classify", json=body, timeout=60)
        assert r.status_code == 200, r.text
        answers.append(r.json())
    after = {rid: h["batching"]["requests"] for rid, h in _replicas(served).items()}
    served_by = {rid: after[rid] - before.get(rid, 0) for rid in after}
    # both replicas answered, and nothing else did
    assert len(served_by) == 2 and all(n > 0 for n in served_by.values()) and sum(served_by.values()) == REQUESTS, \
        served_by
    # one on each node: each holds its node's only tpv_model slot, and Serve logs a replica under its node's temp dir
    assert {_node_of_replica(cluster, rid) for rid in served_by} == {"head", "node2"}
    assert all(a == answers[0] for a in answers)  # bit-identical whichever replica answered
    # and equal to the library's own composition and scoring of the same spec, read from the shared store
    backbone = Backbone.load(BackboneConfig(model=str(tiny_causal_path), device="cpu"))
    spec = CompositionSpec.model_validate(answers[0]["composition"])
    prompt = Composer(VectorStore(cluster.store), lambda n, s: make_origin(backbone, n, s)).compose(spec)
    task = get_task("imdb")
    expected = backbone.score_labels(prompt.unsqueeze(0), [task.render({"text": t}) for t in body["inputs"]],
                                     task.labels)
    labels = answers[0]["labels"]
    assert labels == list(task.labels)
    got = torch.tensor([[row["log_likelihoods"][lab] for lab in labels] for row in answers[0]["results"]])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
