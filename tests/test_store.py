"""VectorStore on real safetensors/JSON files in temp folders, including concurrent and killed writers."""

import json
import multiprocessing as mp
import os
import pickle
import signal
import time
from pathlib import Path

import pytest
import torch

from tpv.names import InvalidName
from tpv.store import (
    CorruptVector,
    NotFound,
    StoreConflict,
    StoreError,
    UnknownVector,
    VectorStore,
    make_vector_id,
)
from tpv.vectors import TaskPromptVector, VectorError

BB = "t5-base"


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _vec(seed: int = 0, task: str = "sst2", backbone: str = BB, shape=(5, 8), **kw) -> TaskPromptVector:
    return TaskPromptVector.create(_randn(*shape, seed=seed), task=task, backbone_id=backbone, origin_seed=seed, **kw)


def _paths(root: Path, v: TaskPromptVector) -> tuple[Path, Path]:
    folder = root / v.meta.backbone_id / "vectors" / v.meta.task
    return folder / f"{v.vector_id}.safetensors", folder / f"{v.vector_id}.json"


def test_round_trip_and_layout(tmp_path):
    store = VectorStore(str(tmp_path))
    v = _vec(3, metrics={"acc": 0.91}, train_config={"lr": 0.3})
    assert store.put(v) == v.vector_id == make_vector_id("sst2", 3, v.meta.sha256)
    tensor_path, json_path = _paths(tmp_path, v)
    assert tensor_path.is_file() and json_path.is_file()
    assert json.loads(json_path.read_text())["sha256"] == v.meta.sha256
    got = store.get(v.vector_id)
    assert torch.equal(got.tensor, v.tensor) and got.meta == v.meta
    assert store.get(v.vector_id, backbone_id=BB).meta == v.meta
    assert [p.name for p in tmp_path.rglob("*") if p.name.startswith(".")] == []  # no temp files left


def test_list_filters_and_reads_only_json(tmp_path):
    store = VectorStore(tmp_path)
    vs = [_vec(0, "sst2"), _vec(1, "sst2"), _vec(0, "mnli"), _vec(1, "mnli", backbone="gemma"),
          _vec(2, "mnli", kind="composition", parents=["a", "b"])]
    for v in vs:
        store.put(v)
    assert len(store.list()) == 5
    keys = [(m.backbone_id, m.task, m.vector_id) for m in store.list()]
    assert keys == sorted(keys)
    assert {m.vector_id for m in store.list(backbone_id=BB, task="sst2")} == {vs[0].vector_id, vs[1].vector_id}
    assert {m.vector_id for m in store.list(seed=1)} == {vs[1].vector_id, vs[3].vector_id}
    assert [m.vector_id for m in store.list(kind="composition")] == [vs[4].vector_id]
    assert store.list(backbone_id="gemma")[0].backbone_id == "gemma"
    assert store.list(task="qqp") == [] and store.list(backbone_id="nope") == []
    assert store.backbones() == ["gemma", BB]
    # listing never opens a tensor: delete every tensor file, the listing is unchanged
    for p in tmp_path.rglob("*.safetensors"):
        p.unlink()
    assert len(store.list()) == 5


def test_put_is_idempotent_and_refuses_different_content(tmp_path):
    store = VectorStore(tmp_path)
    v = _vec(0)
    store.put(v)
    version = store.version()
    mtime = _paths(tmp_path, v)[1].stat().st_mtime_ns
    assert store.put(_vec(0)) == v.vector_id  # same content, new object: no-op
    assert store.version() == version and _paths(tmp_path, v)[1].stat().st_mtime_ns == mtime
    other = TaskPromptVector.create(_randn(5, 8, seed=99), task="sst2", backbone_id=BB, origin_seed=0,
                                    vector_id=v.vector_id)
    with pytest.raises(StoreConflict, match=v.vector_id):
        store.put(other)
    assert torch.equal(store.get(v.vector_id).tensor, v.tensor)
    store.put(other, overwrite=True)
    assert torch.equal(store.get(v.vector_id).tensor, other.tensor)
    moved = TaskPromptVector.create(_randn(5, 8, seed=5), task="qqp", backbone_id=BB, origin_seed=0,
                                    vector_id=v.vector_id)
    with pytest.raises(StoreConflict):
        store.put(moved)  # same id under another task is the same id
    store.put(moved, overwrite=True)
    assert [m.task for m in store.list()] == ["qqp"]


def test_put_refuses_a_vector_modified_after_creation(tmp_path):
    v = _vec(0)
    v.tensor.add_(1.0)
    with pytest.raises(VectorError, match="modified"):
        VectorStore(tmp_path).put(v)


def test_flipped_tensor_byte_is_detected(tmp_path):
    store = VectorStore(tmp_path)
    v = _vec(0)
    store.put(v)
    tensor_path, _ = _paths(tmp_path, v)
    data = bytearray(tensor_path.read_bytes())
    data[-3] ^= 0x01  # inside the float data
    tensor_path.write_bytes(bytes(data))
    with pytest.raises(CorruptVector, match="sha256"):
        store.get(v.vector_id)
    with pytest.raises(CorruptVector):
        store.put(v)  # refuses to treat a corrupt copy as "already there"
    store.put(v, overwrite=True)  # ...but can repair it
    assert torch.equal(store.get(v.vector_id).tensor, v.tensor)


def test_edited_json_is_detected(tmp_path):
    store = VectorStore(tmp_path)
    v = _vec(0)
    store.put(v)
    tensor_path, json_path = _paths(tmp_path, v)
    meta = json.loads(json_path.read_text())
    json_path.write_text(json.dumps({**meta, "sha256": "0" * 64}))
    with pytest.raises(CorruptVector, match="does not match"):
        store.get(v.vector_id)
    json_path.write_text(json.dumps({**meta, "task": "mnli"}))
    with pytest.raises(CorruptVector, match="location"):
        store.get(v.vector_id)
    json_path.write_text("{not json")
    with pytest.raises(CorruptVector):
        store.get(v.vector_id)
    with pytest.raises(CorruptVector):
        store.list()
    json_path.write_text(json.dumps(meta))
    tensor_path.write_bytes(b"\x00" * 5)
    with pytest.raises(CorruptVector, match="cannot read"):
        store.get(v.vector_id)
    tensor_path.unlink()
    with pytest.raises(CorruptVector, match="missing"):
        store.get(v.vector_id)


class _Boom:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["TPV_TEST_MARKER"]),))


def test_a_pickle_in_place_of_a_tensor_is_never_unpickled(tmp_path, monkeypatch):
    store = VectorStore(tmp_path / "store")
    v = _vec(0)
    store.put(v)
    marker = tmp_path / "pwned"
    monkeypatch.setenv("TPV_TEST_MARKER", str(marker))
    tensor_path, _ = _paths(tmp_path / "store", v)
    tensor_path.write_bytes(pickle.dumps({"tau": _Boom()}))
    torch.save({"tau": _Boom()}, tmp_path / "probe.pt")  # sanity: the payload is a real pickle
    with pytest.raises(CorruptVector):
        store.get(v.vector_id)
    assert not marker.exists()


@pytest.mark.parametrize(
    "field, value",
    [("task", "../evil"), ("task", "a/b"), ("task", ".."), ("task", ".hidden"), ("task", "x" * 129),
     ("backbone_id", "x/../y"), ("backbone_id", "/abs"), ("vector_id", "../../etc"), ("vector_id", "a\\b"),
     ("task", "a..b"), ("task", "sp ace"), ("task", "nul\x00"), ("task", "task\n")],
)
def test_path_traversal_names_are_refused(tmp_path, field, value):
    store = VectorStore(tmp_path / "store")
    kw = {"task": "sst2", "backbone": BB, "vector_id": None}
    kw["backbone" if field == "backbone_id" else field] = value
    v = _vec(0, task=kw["task"], backbone=kw["backbone"], vector_id=kw["vector_id"])
    with pytest.raises(InvalidName, match="invalid"):
        store.put(v)
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*"))
    assert not (tmp_path / "evil").exists()


def test_bad_names_on_read_paths(tmp_path):
    store = VectorStore(tmp_path)
    for call in (
        lambda: store.get("../x"), lambda: store.get("ok", backbone_id="../b"), lambda: store.list(task="a/b"),
        lambda: store.delete(".."), lambda: store.get_composition(BB, "../c"),
        lambda: store.put_composition(BB, "a/b", {}), lambda: store.get_origin("../b", 5, 0),
        lambda: store.list_compositions("/etc"),
    ):
        with pytest.raises(InvalidName):
            call()


def test_temp_files_and_orphan_tensors_are_invisible(tmp_path):
    store = VectorStore(tmp_path)
    v = _vec(0)
    store.put(v)
    version = store.version()
    folder = _paths(tmp_path, v)[0].parent
    orphan = _vec(1)
    # a killed writer can leave: a half-written temp tensor, a complete temp JSON, and a tensor without JSON
    (folder / f".tmp-deadbeef-{orphan.vector_id}.safetensors").write_bytes(b"\x01\x02")
    (folder / f".tmp-cafebabe-{orphan.vector_id}.json").write_text(orphan.meta.model_dump_json())
    (folder / f"{orphan.vector_id}.safetensors").write_bytes(b"partial")
    (tmp_path / BB / "compositions").mkdir()
    (tmp_path / BB / "compositions" / ".tmp-1-c.json").write_text("{}")
    assert [m.vector_id for m in store.list()] == [v.vector_id]
    with pytest.raises(UnknownVector):
        store.get(orphan.vector_id)
    assert store.list_compositions(BB) == []
    assert store.version() == version
    store.put(orphan)  # a later writer replaces the orphan tensor
    assert torch.equal(store.get(orphan.vector_id).tensor, orphan.tensor)


def test_get_searches_tasks_and_backbones(tmp_path):
    store = VectorStore(tmp_path)
    a = _vec(0, task="mnli", vector_id="shared-id")
    b = _vec(1, task="qqp", backbone="gemma", vector_id="shared-id")
    c = _vec(2, task="qqp", backbone="gemma")
    for v in (a, b, c):
        store.put(v)
    assert store.get(c.vector_id).meta.task == "qqp"
    with pytest.raises(StoreError, match="ambiguous"):
        store.get("shared-id")
    assert store.get("shared-id", backbone_id="gemma").meta.origin_seed == 1
    with pytest.raises(UnknownVector, match="nope") as err:
        store.get("nope")
    assert isinstance(err.value, LookupError)


def test_delete(tmp_path):
    store = VectorStore(tmp_path)
    v, w = _vec(0), _vec(1)
    store.put(v)
    store.put(w)
    before = store.version()
    store.delete(v.vector_id)
    assert [m.vector_id for m in store.list()] == [w.vector_id]
    assert not any(_p.exists() for _p in _paths(tmp_path, v))
    assert store.version() != before
    with pytest.raises(UnknownVector):
        store.get(v.vector_id)
    with pytest.raises(UnknownVector):
        store.delete(v.vector_id)
    store.put(v)  # can be stored again
    assert len(store.list()) == 2


def test_origins(tmp_path):
    store = VectorStore(tmp_path)
    origin = _randn(5, 8, seed=4)
    store.put_origin(BB, 5, 4, origin)
    path = tmp_path / BB / "origins" / "5-4.safetensors"
    assert path.is_file()
    assert torch.equal(store.get_origin(BB, 5, 4), origin)
    mtime = path.stat().st_mtime_ns
    store.put_origin(BB, 5, 4, origin + 1e-8)  # within tolerance: no-op
    store.put_origin(BB, 5, 4, origin.to(torch.bfloat16).float(), atol=1e-1)
    assert path.stat().st_mtime_ns == mtime
    with pytest.raises(StoreConflict, match="different origin"):
        store.put_origin(BB, 5, 4, origin + 1e-3)
    with pytest.raises(StoreConflict):
        store.put_origin(BB, 5, 4, _randn(5, 9, seed=4))
    with pytest.raises(StoreError, match=r"\[L, d\]"):
        store.put_origin(BB, 6, 4, origin)
    with pytest.raises(StoreError, match="NaN"):
        store.put_origin(BB, 5, 1, origin * float("nan"))
    with pytest.raises(StoreError):
        store.put_origin(BB, 5, -1, origin)
    with pytest.raises(NotFound):
        store.get_origin(BB, 5, 5)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptVector, match="sha256"):
        store.get_origin(BB, 5, 4)
    path.write_bytes(b"junk")
    with pytest.raises(CorruptVector):
        store.get_origin(BB, 5, 4)


def test_compositions(tmp_path):
    store = VectorStore(tmp_path)
    spec = {"backbone_id": BB, "terms": [{"task": "mnli", "weight": 0.5}], "origin_seed": 0, "prompt_length": 5}
    store.put_composition(BB, "snli-mix", spec)
    assert store.get_composition(BB, "snli-mix") == spec
    assert store.list_compositions(BB) == ["snli-mix"]
    store.put_composition(BB, "snli-mix", dict(reversed(list(spec.items()))))  # same content: no-op
    with pytest.raises(StoreConflict, match="snli-mix"):
        store.put_composition(BB, "snli-mix", {**spec, "origin_seed": 1})
    store.put_composition(BB, "snli-mix", {**spec, "origin_seed": 1}, overwrite=True)
    assert store.get_composition(BB, "snli-mix")["origin_seed"] == 1
    with pytest.raises(StoreError, match="JSON"):
        store.put_composition(BB, "bad", {"w": float("nan")})
    with pytest.raises(StoreError, match="JSON"):
        store.put_composition(BB, "bad", {"t": torch.zeros(1)})
    with pytest.raises(NotFound, match="snli-mix"):
        store.get_composition(BB, "missing")
    (tmp_path / BB / "compositions" / "broken.json").write_text("[1, 2]")
    with pytest.raises(CorruptVector):
        store.get_composition(BB, "broken")
    assert store.list_compositions("other") == []


def test_version_tracks_published_changes(tmp_path):
    store = VectorStore(tmp_path / "store")
    empty = store.version()
    assert store.version() == empty
    store.put(_vec(0))
    v1 = store.version()
    assert v1 != empty
    store.put_composition(BB, "c", {"a": 1})
    v2 = store.version()
    assert v2 != v1
    store.put_origin(BB, 5, 0, _randn(5, 8))
    assert store.version() != v2


def test_file_uri_and_plain_path_see_the_same_store(tmp_path):
    uri = tmp_path.as_uri()
    assert uri.startswith("file:///")
    by_uri, by_path = VectorStore(uri), VectorStore(str(tmp_path))
    v = _vec(0)
    by_uri.put(v)
    assert _paths(tmp_path, v)[1].is_file()
    assert torch.equal(by_path.get(v.vector_id).tensor, v.tensor)
    by_uri.put_origin(BB, 5, 0, _randn(5, 8))
    assert torch.equal(by_path.get_origin(BB, 5, 0), _randn(5, 8))
    assert by_uri.version() == by_path.version()


def test_non_local_pyarrow_filesystem(tmp_path):
    store = VectorStore("mock:///bucket/tpv")  # arrow's in-memory filesystem: no rename syscall, no local path
    v = _vec(0)
    store.put(v)
    store.put(v)
    assert torch.equal(store.get(v.vector_id).tensor, v.tensor)
    assert [m.vector_id for m in store.list()] == [v.vector_id]
    store.put_composition(BB, "c", {"x": 1})
    assert store.get_composition(BB, "c") == {"x": 1}
    store.delete(v.vector_id)
    assert store.list() == []


# ---- processes ---------------------------------------------------------------------------------------------------

N_WRITERS, PER_WRITER, SHARED = 8, 100, 5


def _writer(root: str, worker: int, start) -> None:
    store = VectorStore(root)
    start.wait(timeout=120)  # all writers begin together, after their (slow) imports
    for i in range(PER_WRITER):
        store.put(_vec(1000 * worker + i, task=f"task{i % 3}"))
        if i < SHARED:  # every worker also writes the same few vectors: idempotent under contention
            store.put(_vec(i, task="shared"))


def test_concurrent_writer_processes_lose_nothing(tmp_path):
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(N_WRITERS)
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, start)) for w in range(N_WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * N_WRITERS
    store = VectorStore(tmp_path)
    metas = store.list()
    expected = {_vec(1000 * w + i, task=f"task{i % 3}").vector_id for w in range(N_WRITERS) for i in range(PER_WRITER)}
    expected |= {_vec(i, task="shared").vector_id for i in range(SHARED)}
    assert {m.vector_id for m in metas} == expected
    assert len(metas) == N_WRITERS * PER_WRITER + SHARED
    for m in metas:
        assert store.get(m.vector_id).meta.sha256 == m.sha256
    assert [p for p in tmp_path.rglob(".tmp-*")] == []


def _slow_writer(root: str) -> None:
    store = VectorStore(root)
    for i in range(1000):  # 16 MiB tensors: each write takes long enough to be killed in the middle
        store.put(_vec(i, task="big", shape=(2048, 2048)))


def test_writer_killed_mid_write_leaves_no_visible_partial_vector(tmp_path):
    folder = tmp_path / BB / "vectors" / "big"
    proc = mp.get_context("spawn").Process(target=_slow_writer, args=(str(tmp_path),))
    proc.start()
    try:
        deadline = time.monotonic() + 120
        # once the first vector is published, the next temp tensor to appear belongs to a write in progress
        while not (folder.is_dir() and any(p.suffix == ".json" for p in folder.iterdir())):
            assert time.monotonic() < deadline and proc.is_alive(), "writer never published a vector"
            time.sleep(0.005)
        while not any(p.name.startswith(".tmp-") for p in folder.iterdir()):
            assert time.monotonic() < deadline and proc.is_alive(), "never saw the next write start"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.join(timeout=30)
    assert proc.exitcode == -signal.SIGKILL
    assert any(p.name.startswith(".tmp-") for p in folder.iterdir()), "expected the kill to interrupt a write"
    store = VectorStore(tmp_path)
    metas = store.list()
    n = len(metas)
    expected = [_vec(i, task="big", shape=(2048, 2048)) for i in range(n + 1)]
    assert n >= 1 and {m.vector_id for m in metas} == {v.vector_id for v in expected[:n]}
    for m in metas:  # everything visible is complete and verifies
        assert store.get(m.vector_id).meta.sha256 == m.sha256
    with pytest.raises(UnknownVector):
        store.get(expected[n].vector_id)
    store.put(expected[n])  # a restarted writer simply writes it again
    assert len(store.list()) == n + 1
    assert store.version() == VectorStore(tmp_path).version()
