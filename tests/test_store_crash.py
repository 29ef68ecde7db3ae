"""Crash test of the vector store: writer processes killed with SIGKILL at random instants while readers read.

Writers put and overwrite vectors under a small pool of explicit ids (so they also race each other on one id), logging
each attempt before `put` and each commit after it returns. Readers list and get in a loop. The contract checked:
no torn read (every read verifies and holds content some writer tried to write, or is NotFound for an id never
listed), no lost commit (every put that returned is readable afterwards and verifies), nothing unreadable listed.
"""

import json
import multiprocessing as mp
import random
import time
from pathlib import Path

import torch

from tpv.store import StoreConflict, UnknownVector, VectorStore
from tpv.vectors import TaskPromptVector

BB = "crash-bb"
N_IDS, N_WRITERS, N_READERS, N_REPLACEMENTS = 12, 8, 2, 2
RUN_S = 5.0
SHAPE = (128, 256)  # 128 KiB: a write takes long enough to be killed inside it


def _vector(k: int, seed: int) -> TaskPromptVector:
    tensor = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(seed))
    return TaskPromptVector.create(tensor, task=f"t{k % 3}", backbone_id=BB, origin_seed=seed, vector_id=f"v{k}")


def _writer(root: str, log_path: str, seed: int) -> None:
    store, rng = VectorStore(root), random.Random(seed)
    with open(log_path, "a", buffering=1) as log:  # line-buffered: a line is in the kernel once written
        log.write("ready\n")
        while True:
            k, content_seed = rng.randrange(N_IDS), rng.randrange(10**9)
            v = _vector(k, content_seed)
            log.write(f"try {k} {v.meta.sha256}\n")
            try:
                store.put(v, overwrite=rng.random() < 0.5)
                log.write(f"ok {k} {v.meta.sha256}\n")
            except StoreConflict:
                log.write(f"conflict {k} {v.meta.sha256}\n")


def _reader(root: str, stop_path: str, out_path: str, seed: int) -> None:
    store, rng = VectorStore(root), random.Random(seed)
    reads = not_found = 0
    torn: list[str] = []
    while not Path(stop_path).exists():
        listed = {m.vector_id for m in store.list(BB)}
        vector_id = f"v{rng.randrange(N_IDS)}"
        try:
            v = store.get(vector_id, backbone_id=BB)
            if v.meta.sha256 != _vector(int(vector_id[1:]), v.meta.origin_seed).meta.sha256:
                torn.append(f"{vector_id}: content no writer wrote")
        except UnknownVector:
            not_found += 1
            if vector_id in listed:  # no test writer deletes: once listed, always there
                torn.append(f"{vector_id}: listed, then NotFound")
        except Exception as exc:  # anything else is a torn read
            torn.append(f"{vector_id}: {exc!r}")
        reads += 1
    Path(out_path).write_text(json.dumps({"reads": reads, "not_found": not_found, "torn": torn}))


def _log_lines(folder: Path) -> list[list[str]]:
    return [line.split() for p in sorted(folder.glob("writer-*.log")) for line in p.read_text().splitlines()]


def test_writers_killed_at_random_instants_tear_nothing_and_lose_nothing(tmp_path):
    root, logs = tmp_path / "store", tmp_path / "logs"
    logs.mkdir()
    ctx, rng = mp.get_context("spawn"), random.Random(1234)
    stop = tmp_path / "stop"

    def start_writer(i: int):
        p = ctx.Process(target=_writer, args=(str(root), str(logs / f"writer-{i}.log"), 1000 + i), daemon=True)
        p.start()
        return p, logs / f"writer-{i}.log"

    writers = [start_writer(i) for i in range(N_WRITERS)]
    readers = [ctx.Process(target=_reader, args=(str(root), str(stop), str(tmp_path / f"reader-{i}.json"), i),
                           daemon=True) for i in range(N_READERS)]
    for p in readers:
        p.start()

    def writing(log: Path) -> bool:
        return log.exists() and "try" in log.read_text()

    kills, replaced = 0, 0
    deadline = time.monotonic() + 120
    while not all(writing(log) for _, log in writers[:N_WRITERS]):  # every writer is past its imports
        assert time.monotonic() < deadline, "writers never started"
        time.sleep(0.1)
    end = time.monotonic() + RUN_S
    live = list(writers)
    while live:
        time.sleep(rng.uniform(0.05, 0.6) if time.monotonic() < end else rng.uniform(0.0, 0.2))
        candidates = [w for w in live if writing(w[1])]
        if not candidates:
            assert time.monotonic() < deadline + RUN_S, "replacement writers never started"
            continue
        victim = rng.choice(candidates)
        victim[0].kill()  # SIGKILL
        victim[0].join(timeout=30)
        assert victim[0].exitcode == -9
        live.remove(victim)
        kills += 1
        if replaced < N_REPLACEMENTS and time.monotonic() < end:
            live.append(start_writer(N_WRITERS + replaced))
            replaced += 1
    stop.touch()
    for p in readers:
        p.join(timeout=120)
    assert [p.exitcode for p in readers] == [0] * N_READERS

    results = [json.loads((tmp_path / f"reader-{i}.json").read_text()) for i in range(N_READERS)]
    torn = [t for r in results for t in r["torn"]]
    reads = sum(r["reads"] for r in results)
    lines = [line for line in _log_lines(logs) if len(line) == 3]  # a last line cut by the kill is ignored
    tried: dict[str, set[str]] = {}
    for verb, k, sha in lines:
        tried.setdefault(f"v{k}", set()).add(sha)
    committed = {(f"v{k}", sha) for verb, k, sha in lines if verb == "ok"}
    store = VectorStore(root)
    lost = []
    for vector_id in sorted({vid for vid, _ in committed}):
        try:
            sha = store.get(vector_id, backbone_id=BB).meta.sha256  # verifies
        except Exception as exc:
            lost.append(f"{vector_id}: {exc!r}")
            continue
        if sha not in tried[vector_id]:
            lost.append(f"{vector_id}: holds content no writer tried")
    listed = {m.vector_id for m in store.list()}
    print(f"crash test: {len(committed)} commits, {kills} kills, {reads} reads, {len(torn)} torn, {len(lost)} lost"
          f" ({sum(r['not_found'] for r in results)} NotFound reads of ids not yet written, "
          f"{sum(1 for line in lines if line[0] == 'conflict')} StoreConflicts between writers)")
    assert torn == [] and lost == []
    assert kills >= N_WRITERS and reads > 0 and len(committed) > 0
    assert {vid for vid, _ in committed} <= listed <= set(tried)
    assert store.problems() == []
