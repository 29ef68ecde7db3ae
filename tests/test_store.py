"""VectorStore on real safetensors/JSON files in temp folders, including concurrent and killed writers."""

import json
import logging
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import time
from pathlib import Path

import pytest
import safetensors.torch as st
import torch

from tpv.cli import main
from tpv.errors import InvalidInput, exit_code
from tpv.names import InvalidName
from tpv.store import (
    STALE_TEMP_S,
    CorruptVector,
    InvalidStoreInput,
    NotFound,
    StoreConflict,
    StoreError,
    StoreUnseen,
    UnknownVector,
    VectorStore,
    make_vector_id,
)
from tpv.vectors import TaskPromptVector, VectorError, VectorMeta

BB = "t5-base"


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _vec(seed: int = 0, task: str = "sst2", backbone: str = BB, shape=(5, 8), **kw) -> TaskPromptVector:
    return TaskPromptVector.create(_randn(*shape, seed=seed), task=task, backbone_id=backbone, origin_seed=seed, **kw)


def _file(root: Path, v: TaskPromptVector) -> Path:
    return root / v.meta.backbone_id / "vectors" / v.meta.task / f"{v.vector_id}.safetensors"


def _header_meta(path: Path) -> dict:
    n = int.from_bytes(path.read_bytes()[:8], "little")
    return json.loads(path.read_bytes()[8 : 8 + n])["__metadata__"]


def _rewrite(path: Path, tensor: torch.Tensor, meta: str) -> None:
    """A vector file with arbitrary header metadata, as a tampering hand would write it."""
    path.write_bytes(st.save({"tau": tensor}, metadata={"tpv": "vector/2", "meta": meta}))


def _write_legacy(root: Path, v: TaskPromptVector) -> tuple[Path, Path]:
    """The layout the store wrote before one-file vectors: a tensor-only safetensors file, then its JSON."""
    tensor_path = _file(root, v)
    tensor_path.parent.mkdir(parents=True, exist_ok=True)
    tensor_path.write_bytes(st.save({"tau": v.tensor}, metadata={"vector_id": v.vector_id, "sha256": v.meta.sha256}))
    json_path = tensor_path.with_suffix(".json")
    json_path.write_text(v.meta.model_dump_json(indent=2))
    return tensor_path, json_path


def test_round_trip_and_layout(tmp_path):
    store = VectorStore(str(tmp_path))
    v = _vec(3, metrics={"acc": 0.91}, train_config={"lr": 0.3})
    assert store.put(v) == v.vector_id == make_vector_id("sst2", 3, v.meta.sha256)
    path = _file(tmp_path, v)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # one file per vector, no JSON beside it
    assert VectorMeta.model_validate_json(_header_meta(path)["meta"]) == v.meta
    got = store.get(v.vector_id)
    assert torch.equal(got.tensor, v.tensor) and got.meta == v.meta
    assert store.get(v.vector_id, backbone_id=BB).meta == v.meta
    assert [p.name for p in tmp_path.rglob("*") if p.name.startswith(".")] == []  # no temp files left


def test_list_filters_and_reads_only_headers(tmp_path):
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
    # listing never reads tensor data: cut every file down to its header, the listing is unchanged
    for v in vs:
        path = _file(tmp_path, v)
        data = path.read_bytes()
        path.write_bytes(data[: 8 + int.from_bytes(data[:8], "little")])
    assert len(store.list()) == 5 and store.problems() == []
    with pytest.raises(CorruptVector):
        store.get(vs[0].vector_id)


def test_put_is_idempotent_and_refuses_different_content(tmp_path):
    store = VectorStore(tmp_path)
    v = _vec(0)
    store.put(v)
    version = store.version()
    mtime = _file(tmp_path, v).stat().st_mtime_ns
    assert store.put(_vec(0)) == v.vector_id  # same content, new object: no-op
    assert store.version() == version and _file(tmp_path, v).stat().st_mtime_ns == mtime
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
    assert not _file(tmp_path, other).exists()


def test_a_move_to_another_task_cut_short_is_reported_and_repairable(tmp_path):
    store = VectorStore(tmp_path)
    v = _vec(0, vector_id="moving")
    moved = TaskPromptVector.create(v.tensor, task="qqp", backbone_id=BB, origin_seed=0, vector_id="moving")
    store.put(v)
    # overwrite into another task publishes the new file, then deletes the old one: killed in between
    _file(tmp_path, moved).parent.mkdir(parents=True)
    shutil.copy(_file(tmp_path, v), _file(tmp_path, moved))
    _rewrite(_file(tmp_path, moved), moved.tensor, moved.meta.model_dump_json())
    with pytest.raises(CorruptVector, match="cut short"):
        store.get("moving")
    store.put(moved, overwrite=True)
    assert store.get("moving").meta.task == "qqp" and not _file(tmp_path, v).exists()
    store.put(v, overwrite=True)  # and back
    shutil.copy(_file(tmp_path, v), tmp_path / "copy")
    store.put(moved, overwrite=True)
    shutil.copy(tmp_path / "copy", _file(tmp_path, v))
    store.delete("moving")  # removes every copy
    assert store.list() == []


def test_put_refuses_a_vector_modified_after_creation(tmp_path):
    v = _vec(0)
    v.tensor.add_(1.0)
    with pytest.raises(VectorError, match="modified"):
        VectorStore(tmp_path).put(v)


def test_flipped_tensor_byte_is_detected(tmp_path):
    store = VectorStore(tmp_path)
    v = _vec(0)
    store.put(v)
    path = _file(tmp_path, v)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the float data
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptVector, match="sha256"):
        store.get(v.vector_id)
    with pytest.raises(CorruptVector):
        store.put(v)  # refuses to treat a corrupt copy as "already there"
    store.put(v, overwrite=True)  # ...but can repair it
    assert torch.equal(store.get(v.vector_id).tensor, v.tensor)


def test_edited_header_is_detected(tmp_path):
    store = VectorStore(tmp_path)
    v = _vec(0)
    store.put(v)
    path = _file(tmp_path, v)
    meta = v.meta.model_dump()
    _rewrite(path, v.tensor, json.dumps({**meta, "sha256": "0" * 64}))
    with pytest.raises(CorruptVector, match="does not match"):
        store.get(v.vector_id)
    _rewrite(path, v.tensor, json.dumps({**meta, "task": "mnli"}))
    with pytest.raises(CorruptVector, match="location"):
        store.get(v.vector_id)
    _rewrite(path, v.tensor, "{not json")
    with pytest.raises(CorruptVector):
        store.get(v.vector_id)
    path.write_bytes(b"\x00" * 5)
    with pytest.raises(CorruptVector, match="cannot read"):
        store.get(v.vector_id)


def test_list_skips_and_reports_an_unreadable_entry(tmp_path, caplog):
    store = VectorStore(tmp_path)
    good, bad, junk = _vec(0), _vec(1), _vec(2, task="mnli")
    for v in (good, bad, junk):
        store.put(v)
    _rewrite(_file(tmp_path, bad), bad.tensor, "{not json")
    _file(tmp_path, junk).write_bytes(b"junk")
    with caplog.at_level(logging.WARNING, logger="tpv.store"):
        assert [m.vector_id for m in store.list()] == [good.vector_id]
    problems = store.problems()
    assert sorted(p.path for p in problems) == sorted(str(_file(tmp_path, v)) for v in (bad, junk))
    assert all(p.reason for p in problems)
    assert sum("skipping" in r.getMessage() for r in caplog.records) == 2
    assert [(p.backbone_id, p.task, p.vector_id) for p in store.problems(task="mnli")] == [(BB, "mnli", junk.vector_id)]
    assert store.problems(backbone_id="other") == []
    store.put(bad, overwrite=True)  # repairs it
    assert [p.path for p in store.problems()] == [str(_file(tmp_path, junk))]


class _Boom:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["TPV_TEST_MARKER"]),))


def test_a_pickle_in_place_of_a_tensor_is_never_unpickled(tmp_path, monkeypatch):
    store = VectorStore(tmp_path / "store")
    v = _vec(0)
    store.put(v)
    marker = tmp_path / "pwned"
    monkeypatch.setenv("TPV_TEST_MARKER", str(marker))
    _file(tmp_path / "store", v).write_bytes(pickle.dumps({"tau": _Boom()}))
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


def test_temp_files_and_orphan_legacy_tensors_are_invisible(tmp_path):
    store = VectorStore(tmp_path)
    v = _vec(0)
    store.put(v)
    folder = _file(tmp_path, v).parent
    orphan = _vec(1)
    # a killed legacy writer left a tensor without its JSON; killed writers leave temp files
    _write_legacy(tmp_path, orphan)[1].unlink()
    version = store.version()
    (folder / f".tmp-deadbeef-{orphan.vector_id}.safetensors").write_bytes(b"\x01\x02")
    (folder / f".tmp-cafebabe-{orphan.vector_id}.json").write_text(orphan.meta.model_dump_json())
    (tmp_path / BB / "compositions").mkdir()
    (tmp_path / BB / "compositions" / ".tmp-1-c.json").write_text("{}")
    assert [m.vector_id for m in store.list()] == [v.vector_id] and store.problems() == []
    with pytest.raises(UnknownVector):
        store.get(orphan.vector_id)
    assert store.list_compositions(BB) == []
    assert store.version() == version
    with pytest.raises(CorruptVector, match="migrate"):
        store.put(orphan)  # never replaces a file it did not prove it may replace...
    store.put(orphan, overwrite=True)  # ...unless told to
    assert torch.equal(store.get(orphan.vector_id).tensor, orphan.tensor)


def test_stale_temp_files_are_removed_by_the_next_write(tmp_path):
    store = VectorStore(tmp_path)
    v = _vec(0)
    store.put(v)
    folder = _file(tmp_path, v).parent
    stale, fresh = folder / ".tmp-dead-x.safetensors", folder / ".tmp-live-y.safetensors"
    for p in (stale, fresh):
        p.write_bytes(b"partial")
    old = time.time() - STALE_TEMP_S - 60
    os.utime(stale, (old, old))
    store.put(v)  # a no-op put writes nothing and cleans nothing
    assert stale.exists()
    store.put(_vec(1))
    assert not stale.exists() and fresh.exists()  # a temp younger than STALE_TEMP_S may belong to a live writer
    origins = tmp_path / BB / "origins"
    origins.mkdir()
    (origins / ".tmp-dead-5-0.safetensors").write_bytes(b"")
    os.utime(origins / ".tmp-dead-5-0.safetensors", (old, old))
    store.put_origin(BB, 5, 0, _randn(5, 8))
    assert [p.name for p in origins.iterdir()] == ["5-0.safetensors"]


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
    assert not _file(tmp_path, v).exists()
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
    with pytest.raises(NotFound, match="'missing'") as err:
        store.get_composition(BB, "missing")
    assert "snli-mix" not in str(err.value) and str(tmp_path) not in str(err.value)
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
    assert _file(tmp_path, v).is_file()
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


def test_bf16_and_fp32_workers_share_origins(tmp_path):
    table = _randn(100, 64, seed=7)  # one embedding matrix; a GPU worker holds it in bf16, a CPU worker in fp32
    ids, other = torch.tensor([3, 14, 15, 92, 65]), torch.tensor([4, 14, 15, 92, 65])
    fp32, bf16 = table[ids], table.to(torch.bfloat16)[ids]
    scale = 2048**0.5  # models that scale embeddings (Gemma) do it in their own dtype: two more roundings
    for name, first, second in (("fp32-first", fp32, bf16), ("bf16-first", bf16, fp32)):
        store = VectorStore(tmp_path / name)
        store.put_origin(BB, 5, 0, first)  # dtype inferred: a bf16 tensor, or fp32 values that are not bf16
        path = tmp_path / name / BB / "origins" / "5-0.safetensors"
        assert _header_meta(path)["embedded_dtype"] == str(first.dtype).removeprefix("torch.")
        store.put_origin(BB, 5, 0, second)
        store.put_origin(BB, 5, 0, second.float())  # an fp32 copy of a bf16 embedding is recognised as bf16
        store.put_origin(BB, 5, 0, second.float(), embedded_dtype=second.dtype)
        assert store.get_origin(BB, 5, 0).dtype == torch.float32
        assert torch.equal(store.get_origin(BB, 5, 0), first.float())
        with pytest.raises(StoreConflict, match="different origin"):
            store.put_origin(BB, 5, 0, table[other])  # one token differs: a genuinely different origin
        with pytest.raises(StoreConflict):
            store.put_origin(BB, 5, 0, table.to(torch.bfloat16)[other], embedded_dtype="bfloat16")
        store.put_origin(BB, 5, 1, first * scale)
        store.put_origin(BB, 5, 1, (second.to(torch.bfloat16) * torch.tensor(scale, dtype=torch.bfloat16)))
    store = VectorStore(tmp_path / "fp32-only")
    store.put_origin(BB, 5, 0, fp32)
    nudged = fp32 * (1 + 2**-9)  # well inside bf16 rounding, far outside fp32's
    with pytest.raises(StoreConflict):
        store.put_origin(BB, 5, 0, nudged, embedded_dtype="float32")
    store.put_origin(BB, 5, 0, nudged, embedded_dtype="bfloat16")


def test_bad_caller_input_is_invalid_input(tmp_path):
    store = VectorStore(tmp_path)
    store.put(_vec(0, task="mnli", vector_id="twice"))
    store.put(_vec(1, backbone="gemma", vector_id="twice"))
    origin = _randn(5, 8)
    for call in (
        lambda: store.put_origin(BB, 6, 0, origin), lambda: store.put_origin(BB, 5, 0, origin * float("nan")),
        lambda: store.put_origin(BB, 5, -1, origin), lambda: store.put_origin(BB, 5, 0, origin, embedded_dtype="int8"),
        lambda: store.put_composition(BB, "c", {"w": float("nan")}), lambda: store.get("twice"),
        lambda: store.delete("twice"),
    ):
        with pytest.raises(InvalidStoreInput) as err:
            call()
        assert isinstance(err.value, StoreError) and isinstance(err.value, InvalidInput)
        assert exit_code(err.value) == 2


def test_legacy_layout_is_read_and_migrated_in_place(tmp_path, capsys):
    store = VectorStore(tmp_path)
    legacy = [_vec(i, task=("sst2", "mnli")[i % 2]) for i in range(4)]
    for v in legacy:
        _write_legacy(tmp_path, v)
    current = _vec(10)
    store.put(current)
    everything = sorted(v.vector_id for v in [*legacy, current])
    assert sorted(m.vector_id for m in store.list()) == everything and store.problems() == []
    for v in legacy:
        assert torch.equal(store.get(v.vector_id).tensor, v.tensor)
    assert store.put(legacy[0]) == legacy[0].vector_id  # identical content: a no-op, still legacy
    overwritten = TaskPromptVector.create(_randn(5, 8, seed=50), task="sst2", backbone_id=BB, origin_seed=0,
                                          vector_id=legacy[0].vector_id)
    store.put(overwritten, overwrite=True)  # writes the new layout and drops the legacy JSON
    assert not _file(tmp_path, legacy[0]).with_suffix(".json").exists()
    assert torch.equal(store.get(overwritten.vector_id).tensor, overwritten.tensor)
    # a migration killed half-way through an entry: the new file is in place, the legacy JSON still beside it
    half = legacy[1]
    _rewrite(_file(tmp_path, half), half.tensor, half.meta.model_dump_json())
    assert store.get(half.vector_id).meta == half.meta
    # a legacy writer killed before its JSON, long ago; a legacy pair whose tensor is damaged
    orphan = _vec(20)
    tensor_path, json_path = _write_legacy(tmp_path, orphan)
    json_path.unlink()
    old = time.time() - STALE_TEMP_S - 60
    os.utime(tensor_path, (old, old))
    damaged = _vec(21)
    damaged_path, _ = _write_legacy(tmp_path, damaged)
    data = bytearray(damaged_path.read_bytes())
    data[-1] ^= 0x10
    damaged_path.write_bytes(bytes(data))
    before = [m for m in store.list() if m.vector_id != damaged.vector_id]

    assert main(["store", "migrate", "--store", str(tmp_path)]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts == {"migrated": 2, "stale_json_removed": 1, "orphans_removed": 1, "temps_removed": 0,
                      "unreadable": 1}
    assert [p.stem for p in tmp_path.rglob("*.json")] == [damaged.vector_id]  # left in place for a human
    assert [m for m in store.list() if m.vector_id != damaged.vector_id] == before
    for m in before:
        assert store.get(m.vector_id).meta == m
    assert store.migrate() == {**dict.fromkeys(counts, 0), "unreadable": 1}  # idempotent


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
        while not (folder.is_dir() and any(not p.name.startswith(".") for p in folder.iterdir())):
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


def _flip_pair() -> tuple[TaskPromptVector, TaskPromptVector]:
    return tuple(_vec(s, task="flip", shape=(64, 256), vector_id="flip") for s in (1, 2))


def _overwriter(root: str, rounds: int, start) -> None:
    store, pair = VectorStore(root), _flip_pair()
    start.wait(timeout=120)
    for i in range(rounds):
        store.put(pair[i % 2], overwrite=True)


def _flip_reader(root: str, start, done, out) -> None:
    store, shas = VectorStore(root), {v.meta.sha256 for v in _flip_pair()}
    start.wait(timeout=120)
    reads, torn = 0, []
    while not done.is_set() or reads == 0:
        try:
            sha = store.get("flip", backbone_id=BB).meta.sha256
            if sha not in shas:
                torn.append(f"unexpected content {sha[:12]}")
        except Exception as exc:  # every failure is a torn read: the vector exists throughout
            torn.append(repr(exc))
        reads += 1
    out.put((reads, torn))


def test_readers_never_see_a_torn_overwrite(tmp_path):
    VectorStore(tmp_path).put(_flip_pair()[0])
    ctx = mp.get_context("spawn")
    start, done, out = ctx.Barrier(3), ctx.Event(), ctx.Queue()
    writer = ctx.Process(target=_overwriter, args=(str(tmp_path), 80, start))
    readers = [ctx.Process(target=_flip_reader, args=(str(tmp_path), start, done, out)) for _ in range(2)]
    for p in (writer, *readers):
        p.start()
    writer.join(timeout=300)
    done.set()
    results = [out.get(timeout=120) for _ in readers]
    for p in readers:
        p.join(timeout=60)
    assert writer.exitcode == 0 and [p.exitcode for p in readers] == [0, 0]
    assert sum(r for r, _ in results) > 0 and [t for _, ts in results for t in ts] == []


N_RACERS, RACE_ROUNDS = 4, 15


def _racer(root: str, worker: int, start, out) -> None:
    store = VectorStore(root)
    for r in range(RACE_ROUNDS):
        v = _vec(100 * worker + r, task="race", shape=(64, 64), vector_id=f"race-{r}")
        start.wait(timeout=120)
        try:
            store.put(v)
            out.put((r, v.meta.sha256))
        except StoreConflict:
            out.put((r, None))


def test_concurrent_writers_of_one_id_exactly_one_wins(tmp_path):
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(N_RACERS), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(str(tmp_path), w, start, out)) for w in range(N_RACERS)]
    for p in procs:
        p.start()
    results = [out.get(timeout=300) for _ in range(N_RACERS * RACE_ROUNDS)]
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * N_RACERS
    store = VectorStore(tmp_path)
    for r in range(RACE_ROUNDS):
        winners = [sha for rnd, sha in results if rnd == r and sha is not None]
        assert len(winners) == 1, f"round {r}: {len(winners)} writers succeeded"
        assert store.get(f"race-{r}").meta.sha256 == winners[0]  # the survivor is the winner's, and verifies
    assert store.problems() == [] and list(tmp_path.rglob(".tmp-*")) == []


def test_meta_reads_one_header_and_names_only_what_was_asked(tmp_path):
    store = VectorStore(tmp_path)
    v = _vec(0)
    store.put(v)
    assert store.meta(v.vector_id, BB) == v.meta
    assert store.meta(v.vector_id) == v.meta  # any backbone
    with pytest.raises(UnknownVector, match="'nope'") as err:
        store.meta("nope", BB)
    assert v.vector_id not in str(err.value) and str(tmp_path) not in str(err.value)


def _make_identity(folder: str, queue) -> None:
    queue.put(VectorStore(folder).identity())


def test_store_identity_is_made_once_and_agreed_by_racing_processes(tmp_path):
    folder = str(tmp_path / "store")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_make_identity, args=(folder, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    ids = {queue.get(timeout=300) for _ in procs}  # spawned processes import torch: minutes on a loaded 2-core box
    for p in procs:
        p.join()
    assert len(ids) == 1
    assert VectorStore(folder).identity() == ids.pop()


def test_check_identity_refuses_another_folder_and_never_creates_one(tmp_path):
    shared = VectorStore(tmp_path / "shared")
    expected = shared.identity()
    shared.check_identity(expected)
    elsewhere = VectorStore(tmp_path / "node-local")
    with pytest.raises(StoreUnseen, match="absent"):
        elsewhere.check_identity(expected)
    assert not (tmp_path / "node-local").exists()
    other = VectorStore(tmp_path / "other")
    with pytest.raises(StoreUnseen, match=other.identity()):
        other.check_identity(expected)
    assert exit_code(StoreUnseen("x")) == 6


def test_a_corrupt_identity_file_is_reported_not_replaced(tmp_path):
    (tmp_path / "store.json").write_text("{not json")
    with pytest.raises(CorruptVector, match="store id"):
        VectorStore(tmp_path).identity()
    assert (tmp_path / "store.json").read_text() == "{not json"


def test_reading_the_legacy_layout_warns_once_per_store(tmp_path, caplog):
    """The legacy layout is deprecated: one warning naming the migration, however many legacy entries are read,
    and none for a store of the current layout."""
    legacy = [_vec(i) for i in range(3)]
    for v in legacy:
        _write_legacy(tmp_path / "old", v)
    current = VectorStore(tmp_path / "new")
    current.put(_vec(9))
    with caplog.at_level("WARNING", logger="tpv.store"):
        current.list()
        assert not [r for r in caplog.records if "legacy layout" in r.getMessage()]
        store = VectorStore(tmp_path / "old")
        store.list()
        for v in legacy:
            store.get(v.vector_id)
    warned = [r.getMessage() for r in caplog.records if "legacy layout" in r.getMessage()]
    assert len(warned) == 1 and "tpv store migrate" in warned[0], warned
