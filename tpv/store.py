"""The vector store: one self-describing safetensors file per vector, on a local folder or any `pyarrow.fs` filesystem.

Layout under the root:
    {backbone_id}/vectors/{task}/{vector_id}.safetensors   tensor "tau" + header __metadata__
                                                           {"tpv": "vector/2", "meta": <VectorMeta JSON>}
    {backbone_id}/origins/{L}-{seed}.safetensors           tensor "origin" (float32) + {"sha256", "embedded_dtype"}
    {backbone_id}/compositions/{name}.json

Why one file per vector: many training workers write into one shared store while a server reads it, so a vector
must appear, change and disappear in ONE step. Every file is written under a unique hidden temp name in its final
folder and published by one operation: a rename over the target (overwrite), or, for a name that must not exist yet,
a hard link (create-if-absent) on a local/POSIX filesystem, so of two first writers of one id exactly one wins and
the other gets StoreConflict. On other pyarrow filesystems (object stores) a single-object write is atomic too, so
readers still see the old or the new file, never a mix; but pyarrow offers no create-if-absent there, so it is a
check-then-write and two first writers of one id within the same instant are last-writer-wins. A killed writer leaves
only hidden temp files; the next write into that folder removes those older than STALE_TEMP_S.

Reading: tensors are loaded with safetensors (never unpickled) and their sha256 is checked on every `get`. `list`
reads safetensors headers only, never tensor data; it skips an entry it cannot read and logs a warning, and
`problems()` returns those entries.

Legacy layout (tensor-only `{vector_id}.safetensors` + `{vector_id}.json`) is still read; a self-describing file wins
over a leftover JSON, a legacy tensor without its JSON (a killed legacy writer) is invisible, and `migrate()`
(`tpv store migrate`) rewrites legacy entries in place. Only the new layout is ever written. Reading the legacy
layout is deprecated: the first legacy entry a store instance reads logs one warning naming `tpv store migrate`;
the next release reads only the new layout.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import pathlib
import posixpath
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

import pyarrow.fs as pafs
import safetensors.torch as st
import torch
from pydantic import ValidationError

from tpv.errors import ConflictError, CorruptData, InvalidInput, NotFoundError, TpvError, Unavailable
from tpv.names import InvalidName, validate_name
from tpv.vectors import (
    TaskPromptVector,
    VectorError,
    VectorMeta,
    make_vector_id,
    tensor_sha256,
)

__all__ = [
    "STALE_TEMP_S", "CorruptVector", "InvalidStoreInput", "NotFound", "StoreConflict", "StoreError", "StoreProblem",
    "UnknownVector", "VectorStore", "make_vector_id", "validate_name",
]

logger = logging.getLogger(__name__)

#: temp files older than this (seconds) belong to killed writers and are removed by later writes into their folder
STALE_TEMP_S = 3600.0

_TMP_PREFIX = ".tmp-"
_EXT, _LEGACY_EXT = ".safetensors", ".json"
_TENSOR_KEY = "tau"
_ORIGIN_KEY = "origin"
_FORMAT = {"tpv": "vector/2"}
_META_KEY = "meta"
_IDENTITY = "store.json"
_MAX_HEADER = 100_000_000  # safetensors' own limit
_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class StoreError(TpvError):
    """Base of every store failure."""


class InvalidStoreInput(StoreError, InvalidInput):
    """A malformed request to the store (an origin of the wrong shape, a spec that is not JSON, an ambiguous id)."""


class StoreConflict(StoreError, ConflictError):
    """Something different is already stored under this name and overwrite was not asked for."""


class CorruptVector(StoreError, CorruptData):
    """A stored file fails its hash check or cannot be parsed."""


class NotFound(StoreError, NotFoundError):
    """No stored object of that name."""


class UnknownVector(NotFound):
    """No vector with that id (or no vectors for that task)."""


class StoreUnseen(StoreError, Unavailable):
    """This process sees another store (or none) under the job's store URI: a node without the shared folder."""


def _no_vector(vector_id: str, backbone_id: str | None) -> str:
    """The message of an unknown id: what was asked for, never the store's location or contents."""
    return f"no vector {vector_id!r}" + (f" for backbone {backbone_id!r}" if backbone_id is not None else "")


class StoreProblem(NamedTuple):
    """A stored vector entry `list()` skipped, where it is, and why."""

    backbone_id: str
    task: str
    vector_id: str
    path: str
    reason: str


def _visible(base: str, suffix: str) -> str | None:
    """The stem of a published file name, or None for temp files and anything else that is not ours."""
    if not base.endswith(suffix) or base.startswith("."):
        return None
    stem = base[: len(base) - len(suffix)]
    try:
        return validate_name(stem)
    except InvalidName:
        return None


def _metadata(read: Callable[[int], bytes], path: str) -> dict[str, str]:
    """The `__metadata__` of a safetensors file (8-byte little-endian header length, then JSON), read alone."""
    try:
        n = int.from_bytes(read(8), "little")
        header = json.loads(read(n)) if 2 <= n <= _MAX_HEADER else None
    except ValueError:  # JSON and UTF-8 errors
        header = None
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise CorruptVector(f"cannot read {path}: not a safetensors file")
    return meta


def _place(stem: str) -> tuple[str, str]:
    """(backbone_id, task) of a `{root}/{backbone_id}/vectors/{task}/{vector_id}` entry."""
    folder = posixpath.dirname(stem)
    return posixpath.basename(posixpath.dirname(posixpath.dirname(folder))), posixpath.basename(folder)


def _one_place(vector_id: str, places: list[tuple[str, str]]) -> None:
    """Refuse an id found in several places: across backbones the caller must name one; within one backbone it is
    the leftover of an overwrite into another task cut short between its two steps."""
    if len(places) <= 1:
        return
    if len({bb for bb, _ in places}) > 1:
        raise InvalidStoreInput(f"vector id {vector_id!r} is ambiguous, found at {places}; pass backbone_id")
    raise CorruptVector(f"vector id {vector_id!r} is stored under several tasks of one backbone {places} (a move to "
                        "another task was cut short); put it again with overwrite=True, or delete it")


def _meta_at(raw: str | bytes, stem: str) -> VectorMeta:
    """Parse metadata and check it describes its own location (a file copied into another folder is refused)."""
    try:
        meta = VectorMeta.model_validate_json(raw)
    except ValidationError as exc:
        raise CorruptVector(f"unreadable vector metadata at {stem}: {exc}") from None
    if (meta.backbone_id, meta.task, meta.vector_id) != (*_place(stem), posixpath.basename(stem)):
        raise CorruptVector(f"{stem} holds ({meta.backbone_id}, {meta.task}, {meta.vector_id}), not its own location")
    return meta


def _tensor(data: bytes, key: str, path: str) -> torch.Tensor:
    try:
        return st.load(data)[key]
    except Exception as exc:  # safetensors raises its own error type for a bad file
        raise CorruptVector(f"cannot read tensor {path}: {exc}") from None


def _verified(tensor: torch.Tensor, meta: VectorMeta, path: str) -> TaskPromptVector:
    digest = tensor_sha256(tensor)
    if digest != meta.sha256:
        raise CorruptVector(f"{path}: sha256 {digest} does not match its metadata ({meta.sha256})")
    try:
        return TaskPromptVector(tensor, meta)
    except VectorError as exc:
        raise CorruptVector(f"{path}: {exc}") from None


def _vector_file(vector: TaskPromptVector) -> bytes:
    return st.save({_TENSOR_KEY: vector.tensor}, metadata={**_FORMAT, _META_KEY: vector.meta.model_dump_json()})


def _same(a: TaskPromptVector, b: TaskPromptVector) -> bool:
    return a.meta.sha256 == b.meta.sha256 and a.meta.task == b.meta.task


def _dtype(value: str | torch.dtype) -> torch.dtype:
    name = str(value).removeprefix("torch.")
    if name not in _DTYPES:
        raise InvalidStoreInput(f"embedded_dtype must be one of {sorted(_DTYPES)}, got {value!r}")
    return _DTYPES[name]


def _embedded_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The tensor's own dtype when it is a narrow float, else the narrowest float dtype holding its values exactly
    (what a model in that dtype would have embedded), else float32."""
    if tensor.dtype in (torch.bfloat16, torch.float16):
        return tensor.dtype
    t = tensor.detach().to("cpu", torch.float32)
    for narrow in (torch.bfloat16, torch.float16):
        if torch.equal(t.to(narrow).to(torch.float32), t):
            return narrow
    return torch.float32


def _same_origin(a: torch.Tensor, a_dtype: torch.dtype, b: torch.Tensor, b_dtype: torch.dtype, atol: float) -> bool:
    """Equal up to the rounding of the coarser embedding dtype (rtol 2 eps: the weights' and the lookup's rounding)."""
    eps = max(torch.finfo(a_dtype).eps, torch.finfo(b_dtype).eps)
    return a.shape == b.shape and torch.allclose(a, b, rtol=2 * eps, atol=atol)


class VectorStore:
    """A folder of task prompt vectors, origins and named compositions; see the module docstring."""

    def __init__(self, uri: str | pathlib.Path) -> None:
        uri = str(uri)
        if "://" in uri:
            self.fs, root = pafs.FileSystem.from_uri(uri)
        else:
            self.fs, root = pafs.LocalFileSystem(), str(pathlib.Path(uri).expanduser().absolute())
        self.uri = uri
        self.root = root.rstrip("/") or "/"
        self._warned_legacy = False  # one deprecation warning per instance, not one per legacy entry read

    def __repr__(self) -> str:
        return f"VectorStore({self.uri!r})"

    # ---- low-level file helpers -------------------------------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type == pafs.FileType.File

    def _read(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def _read_or_none(self, path: str) -> bytes | None:
        try:
            return self._read(path)
        except FileNotFoundError:
            return None

    def _delete_quietly(self, path: str) -> bool:
        try:
            self.fs.delete_file(path)
        except FileNotFoundError:
            return False
        return True

    def _write_atomic(self, path: str, data: bytes, replace: bool) -> bool:
        """Publish `data` at `path` in one step: write a unique hidden temp file in the same folder, then rename it
        over `path` (replace=True) or create `path` from it only if absent (replace=False; returns False when
        `path` is taken). Every write in the store goes through here."""
        folder, base = posixpath.split(path)
        self.fs.create_dir(folder, recursive=True)
        self._remove_stale_temps(folder)
        tmp = posixpath.join(folder, f"{_TMP_PREFIX}{uuid.uuid4().hex}-{base}")
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            if replace:
                self.fs.move(tmp, path)
                return True
            return self._create_from(tmp, path)
        finally:
            self._delete_quietly(tmp)  # gone after a move; the second name after a link; junk after a failure

    def _create_from(self, tmp: str, path: str) -> bool:
        """Give `tmp`'s content the name `path` unless `path` exists: a hard link is create-if-absent on POSIX;
        elsewhere (object stores, filesystems without links) only a check-then-move is available."""
        if isinstance(self.fs, pafs.LocalFileSystem):
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
        if self._exists(path):
            return False
        self.fs.move(tmp, path)
        return True

    def _remove_stale_temps(self, folder: str) -> int:
        """Delete temp files of writers killed more than STALE_TEMP_S ago; a live writer's temp is younger."""
        cutoff = time.time_ns() - int(STALE_TEMP_S * 1e9)
        infos = self._listing(folder)
        stale = [i.path for i in infos if i.type == pafs.FileType.File and i.base_name.startswith(_TMP_PREFIX)
                 and i.mtime_ns is not None and i.mtime_ns < cutoff]
        return sum(self._delete_quietly(p) for p in stale)

    def _listing(self, path: str, recursive: bool = False) -> list[pafs.FileInfo]:
        """A folder's entries; a folder that does not exist (yet) has none. pyarrow's `allow_not_found` covers a
        folder missing when the listing starts; a local listing racing a writer's `create_dir` was seen to raise
        FileNotFoundError anyway (once, in tests/test_store_crash.py), and a reader must not fail on it."""
        try:
            return self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))
        except FileNotFoundError:
            return []

    def _subdirs(self, path: str) -> list[str]:
        infos = self._listing(path)
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and _visible(i.base_name, ""))

    def _files(self, path: str, suffix: str) -> list[pafs.FileInfo]:
        infos = self._listing(path)
        return [i for i in infos if i.type == pafs.FileType.File and _visible(i.base_name, suffix)]

    def backbones(self) -> list[str]:
        """Backbone ids with a folder in the store."""
        return self._subdirs(self.root)

    # ---- vector entries (either layout) ---------------------------------------------------------------------------

    def _stem(self, backbone_id: str, task: str, vector_id: str) -> str:
        return self._path(backbone_id, "vectors", task, vector_id)

    def _folder_stems(self, folder: str) -> list[str]:
        infos = self._files(folder, _EXT) + self._files(folder, _LEGACY_EXT)
        return sorted({posixpath.splitext(i.path)[0] for i in infos})

    def _stems(self, vector_id: str, backbone_id: str | None) -> list[str]:
        """Every `{folder}/{vector_id}` with a file of either layout, across tasks (and backbones when none given)."""
        validate_name(vector_id, "vector_id")
        backbones = [validate_name(backbone_id, "backbone_id")] if backbone_id is not None else self.backbones()
        stems = [self._stem(bb, task, vector_id) for bb in backbones for task in self._subdirs(self._path(bb, "vectors"))]
        infos = self.fs.get_file_info([stem + ext for stem in stems for ext in (_EXT, _LEGACY_EXT)])
        return sorted({posixpath.splitext(i.path)[0] for i in infos if i.type == pafs.FileType.File})

    def _head(self, path: str, whole: bool) -> tuple[dict[str, str], bytes | None] | None:
        """(the file's safetensors __metadata__, its bytes when `whole`), or None when there is no such file."""
        try:
            if whole:
                data = self._read(path)
                return _metadata(io.BytesIO(data).read, path), data
            with self.fs.open_input_stream(path) as f:
                return _metadata(f.read, path), None
        except FileNotFoundError:
            return None

    def _entry(self, stem: str, whole: bool) -> tuple[VectorMeta, bytes | None] | None:
        """The metadata of the vector at `stem` (and its file's bytes when `whole`), either layout. The file is read
        first, so a self-describing file wins over a leftover legacy JSON. None when nothing is there, or only an
        orphan legacy tensor (whose writer was killed before its JSON)."""
        path = stem + _EXT
        for _ in range(2):  # a legacy pair can be migrated (or deleted) between our two reads: look once more
            head = self._head(path, whole)
            if head is not None and _META_KEY in head[0]:
                return _meta_at(head[0][_META_KEY], stem), head[1]
            legacy = self._read_or_none(stem + _LEGACY_EXT)
            if legacy is not None:
                if head is None:
                    raise CorruptVector(f"{stem}{_LEGACY_EXT} exists but its tensor {path} is missing")
                self._warn_legacy()
                return _meta_at(legacy, stem), head[1]
            if head is None:
                return None
        return None  # a legacy tensor without JSON, twice

    def _warn_legacy(self) -> None:
        if not self._warned_legacy:
            self._warned_legacy = True
            logger.warning("store %s holds entries in the legacy layout (tensor + JSON), deprecated: reading them "
                           "goes in the next release; run `tpv store migrate --store %s` once", self.uri, self.uri)

    def _load(self, stem: str) -> TaskPromptVector | None:
        """The verified vector at `stem`, or None (see `_entry`)."""
        entry = self._entry(stem, whole=True)
        if entry is None:
            return None
        meta, data = entry
        return _verified(_tensor(data, _TENSOR_KEY, stem + _EXT), meta, stem + _EXT)

    def _remove(self, stem: str) -> None:
        """Delete an entry: a legacy JSON first (so a legacy pair vanishes at once), then the file."""
        self._delete_quietly(stem + _LEGACY_EXT)
        self._delete_quietly(stem + _EXT)

    # ---- vectors ------------------------------------------------------------------------------------------------

    def put(self, vector: TaskPromptVector, overwrite: bool = False) -> str:
        """Store a vector and return its id, in one atomic step. Re-putting identical content is a no-op. Different
        content under an existing id (in any task of the backbone) raises StoreConflict unless overwrite=True, which
        replaces it (concurrent overwrites: the last one wins). Of concurrent first writers of one id with different
        content exactly one succeeds; the others get StoreConflict. An unreadable file under the id raises
        CorruptVector unless overwrite=True."""
        meta = vector.meta
        for value, what in ((meta.backbone_id, "backbone_id"), (meta.task, "task"), (meta.vector_id, "vector_id")):
            validate_name(value, what)
        if tensor_sha256(vector.tensor) != meta.sha256:
            raise VectorError(f"vector {meta.vector_id!r} was modified after creation (sha256 no longer matches)")
        stem = self._stem(meta.backbone_id, meta.task, meta.vector_id)
        stems = self._stems(meta.vector_id, meta.backbone_id)
        found: list[TaskPromptVector] = []
        for other in stems:
            try:
                existing = self._load(other)
            except CorruptVector:
                if not overwrite:
                    raise
                continue
            if existing is not None:
                found.append(existing)
        if len(found) == 1 and _same(found[0], vector):
            return meta.vector_id
        if found and not overwrite:
            raise StoreConflict(
                f"vector {meta.vector_id!r} already exists for backbone {meta.backbone_id!r} (task "
                f"{found[0].meta.task!r}, sha256 {found[0].meta.sha256[:12]}) with different content; "
                "pass overwrite=True to replace it"
            )
        if overwrite:
            self._write_atomic(stem + _EXT, _vector_file(vector), replace=True)
            self._delete_quietly(stem + _LEGACY_EXT)  # a legacy pair's leftover JSON
            for other in stems:
                if other != stem:  # the id moved to another task
                    self._remove(other)
            return meta.vector_id
        if self._write_atomic(stem + _EXT, _vector_file(vector), replace=False):
            return meta.vector_id
        winner = self._load(stem)
        if winner is None:
            raise CorruptVector(f"{stem}{_EXT} is taken by an orphan legacy tensor; run `tpv store migrate` or put "
                                "with overwrite=True")
        if not _same(winner, vector):
            raise StoreConflict(f"another writer stored different content as {meta.vector_id!r} first")
        return meta.vector_id

    def get(self, vector_id: str, backbone_id: str | None = None) -> TaskPromptVector:
        """Load and verify a vector (sha256 of the tensor against its metadata), searching every task (and every
        backbone when none is given)."""
        found = [v for v in map(self._load, self._stems(vector_id, backbone_id)) if v is not None]
        if not found:
            raise UnknownVector(_no_vector(vector_id, backbone_id))
        _one_place(vector_id, [(v.meta.backbone_id, v.meta.task) for v in found])
        return found[0]

    def meta(self, vector_id: str, backbone_id: str | None = None) -> VectorMeta:
        """A vector's metadata from its file's header alone (no tensor read, no listing of other vectors)."""
        found = [e[0] for e in (self._entry(stem, whole=False) for stem in self._stems(vector_id, backbone_id))
                 if e is not None]
        if not found:
            raise UnknownVector(_no_vector(vector_id, backbone_id))
        _one_place(vector_id, [(m.backbone_id, m.task) for m in found])
        return found[0]

    def list(
        self, backbone_id: str | None = None, task: str | None = None, seed: int | None = None,
        kind: str | None = None,
    ) -> list[VectorMeta]:
        """Metadata of the stored vectors matching every given filter, sorted. Reads safetensors headers (and
        legacy JSON), never tensor data. An entry it cannot read is skipped with a logged warning; `problems()`
        returns those entries, so one bad file never hides the rest of the store."""
        metas, problems = self._scan(backbone_id, task)
        for problem in problems:
            logger.warning("store %s: skipping %s: %s", self.uri, problem.path, problem.reason)
        return [m for m in metas if (seed is None or m.origin_seed == seed) and (kind is None or m.kind == kind)]

    def problems(self, backbone_id: str | None = None, task: str | None = None) -> list[StoreProblem]:
        """The vector entries `list()` skips (same filters): unreadable headers or metadata, entries describing
        another location, legacy JSON without its tensor. A caller that finds no vector for a task can tell "none"
        from "only unreadable ones" here. Like `list()` it reads headers only: a flipped bit in tensor data is
        found by `get()` (CorruptVector)."""
        return self._scan(backbone_id, task)[1]

    def _scan(self, backbone_id: str | None, task: str | None) -> tuple[list[VectorMeta], list[StoreProblem]]:
        if task is not None:
            validate_name(task, "task")
        backbones = [validate_name(backbone_id, "backbone_id")] if backbone_id is not None else self.backbones()
        metas: list[VectorMeta] = []
        problems: list[StoreProblem] = []
        for bb in backbones:
            for t in [task] if task is not None else self._subdirs(self._path(bb, "vectors")):
                for stem in self._folder_stems(self._path(bb, "vectors", t)):
                    try:
                        entry = self._entry(stem, whole=False)
                    except CorruptVector as exc:
                        problems.append(StoreProblem(bb, t, posixpath.basename(stem), stem + _EXT, str(exc)))
                        continue
                    if entry is not None:
                        metas.append(entry[0])
        return sorted(metas, key=lambda m: (m.backbone_id, m.task, m.vector_id)), problems

    def delete(self, vector_id: str, backbone_id: str | None = None) -> None:
        """Remove a vector (one file; a legacy pair loses its JSON first, so it disappears at once), and any copy
        under another task of the same backbone that a cut-short move left."""
        stems = self._stems(vector_id, backbone_id)
        if not stems:
            raise UnknownVector(_no_vector(vector_id, backbone_id))
        places = [_place(stem) for stem in stems]
        if len({bb for bb, _ in places}) > 1:
            raise InvalidStoreInput(f"vector id {vector_id!r} is ambiguous, found at {places}; pass backbone_id")
        for stem in stems:
            self._remove(stem)

    def migrate(self) -> dict[str, int]:
        """Rewrite every legacy vector (tensor + JSON) as one self-describing file in place, and remove stale temp
        files and stale orphan legacy tensors. Idempotent and crash-safe: an entry is converted by one atomic
        replace of its tensor file (which then wins over the JSON), and the leftover JSON is deleted after. Readers
        may run meanwhile; legacy-version writers must not (they would write legacy pairs again). Entries that fail
        their checks are left in place and counted as `unreadable` (see `problems()`)."""
        counts = dict.fromkeys(("migrated", "stale_json_removed", "orphans_removed", "temps_removed", "unreadable"), 0)
        for bb in self.backbones():
            tasks = self._subdirs(self._path(bb, "vectors"))
            for folder in [self._path(bb, "origins"), self._path(bb, "compositions")]:
                counts["temps_removed"] += self._remove_stale_temps(folder)
            for folder in [self._path(bb, "vectors", t) for t in tasks]:
                counts["temps_removed"] += self._remove_stale_temps(folder)
                for stem in self._folder_stems(folder):
                    outcome = self._migrate_entry(stem)
                    if outcome is not None:
                        counts[outcome] += 1
        return counts

    def _migrate_entry(self, stem: str) -> str | None:
        """Convert one entry; returns what was done (a `migrate()` count name) or None when nothing was needed."""
        head = self._head(stem + _EXT, whole=False)
        if head is not None and _META_KEY in head[0]:
            return "stale_json_removed" if self._delete_quietly(stem + _LEGACY_EXT) else None
        try:
            vector = self._load(stem)
        except CorruptVector:
            return "unreadable"
        if vector is None:
            info = self.fs.get_file_info(stem + _EXT)
            stale = info.mtime_ns is not None and info.mtime_ns < time.time_ns() - int(STALE_TEMP_S * 1e9)
            return "orphans_removed" if stale and self._delete_quietly(stem + _EXT) else None
        self._write_atomic(stem + _EXT, _vector_file(vector), replace=True)
        self._delete_quietly(stem + _LEGACY_EXT)
        return "migrated"

    # ---- origins ------------------------------------------------------------------------------------------------

    def _origin_path(self, backbone_id: str, length: int, seed: int) -> str:
        validate_name(backbone_id, "backbone_id")
        if not isinstance(length, int) or length <= 0 or not isinstance(seed, int) or seed < 0:
            raise InvalidStoreInput(f"origin needs an int length > 0 and an int seed >= 0, got {length!r}, {seed!r}")
        return self._path(backbone_id, "origins", f"{length}-{seed}.safetensors")

    def put_origin(
        self, backbone_id: str, length: int, seed: int, tensor: torch.Tensor, atol: float = 1e-6,
        embedded_dtype: str | torch.dtype | None = None,
    ) -> None:
        """Store an origin once, in float32, with the dtype the model embedded it in. If one exists it must match
        `tensor` up to the rounding of the coarser of the two embedding dtypes (plus atol), else StoreConflict: a
        bf16 (GPU) and an fp32 (CPU) worker embed the same origin up to rounding, a different origin differs by far
        more. embedded_dtype=None infers it from the tensor (see `_embedded_dtype`); pass the model's dtype when an
        fp32 copy of a bf16 embedding could be mistaken for fp32."""
        path = self._origin_path(backbone_id, length, seed)
        if tensor.dim() != 2 or tensor.shape[0] != length:
            raise InvalidStoreInput(f"origin for L={length} must be [L, d], got {tuple(tensor.shape)}")
        dtype = _dtype(embedded_dtype) if embedded_dtype is not None else _embedded_dtype(tensor)
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        if not bool(torch.isfinite(t).all()):
            raise InvalidStoreInput("origin contains NaN/inf")
        data = st.save({_ORIGIN_KEY: t}, metadata={"sha256": tensor_sha256(t), "embedded_dtype": str(dtype).removeprefix("torch.")})
        if not self._exists(path) and self._write_atomic(path, data, replace=False):
            return
        stored, stored_dtype = self._read_origin(path)
        if not _same_origin(stored, stored_dtype, t, dtype, atol):
            raise StoreConflict(
                f"a different origin is stored for ({backbone_id}, L={length}, seed={seed}); origins are "
                "reproducible from (backbone, L, seed), so the backbone or the origin code changed"
            )

    def get_origin(self, backbone_id: str, length: int, seed: int) -> torch.Tensor:
        """The stored origin in float32."""
        return self._read_origin(self._origin_path(backbone_id, length, seed))[0]

    def _read_origin(self, path: str) -> tuple[torch.Tensor, torch.dtype]:
        """(verified origin, its embedding dtype; inferred from the values for files written before it was kept)."""
        data = self._read_or_none(path)
        if data is None:
            raise NotFound(f"no origin {path} in {self.uri}")
        meta = _metadata(io.BytesIO(data).read, path)
        tensor = _tensor(data, _ORIGIN_KEY, path)
        if tensor_sha256(tensor) != meta.get("sha256"):
            raise CorruptVector(f"origin {path} fails its sha256 check")
        dtype = meta.get("embedded_dtype")
        return tensor, _DTYPES[dtype] if dtype in _DTYPES else _embedded_dtype(tensor)

    # ---- named compositions ---------------------------------------------------------------------------------------

    def _composition_path(self, backbone_id: str, name: str) -> str:
        validate_name(backbone_id, "backbone_id")
        return self._path(backbone_id, "compositions", f"{validate_name(name, 'composition name')}.json")

    def put_composition(self, backbone_id: str, name: str, spec: dict[str, Any], overwrite: bool = False) -> None:
        """Store a named composition spec (its schema belongs to tpv.compose); same rules as `put`."""
        path = self._composition_path(backbone_id, name)
        try:
            data = json.dumps(spec, sort_keys=True, indent=2, allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise InvalidStoreInput(f"composition {name!r} is not plain JSON: {exc}") from None
        if overwrite:
            self._write_atomic(path, data, replace=True)
            return
        if not self._exists(path) and self._write_atomic(path, data, replace=False):
            return
        if self.get_composition(backbone_id, name) != json.loads(data):
            raise StoreConflict(f"composition {name!r} already exists for {backbone_id!r}; pass overwrite=True")

    def get_composition(self, backbone_id: str, name: str) -> dict[str, Any]:
        path = self._composition_path(backbone_id, name)
        data = self._read_or_none(path)
        if data is None:
            raise NotFound(f"no composition {name!r} for backbone {backbone_id!r}")
        try:
            spec = json.loads(data)
        except ValueError as exc:
            raise CorruptVector(f"unreadable composition {path}: {exc}") from None
        if not isinstance(spec, dict):
            raise CorruptVector(f"composition {path} is not a JSON object")
        return spec

    def list_compositions(self, backbone_id: str) -> list[str]:
        validate_name(backbone_id, "backbone_id")
        files = self._files(self._path(backbone_id, "compositions"), ".json")
        return sorted(i.base_name[: -len(".json")] for i in files)

    # ---- identity ---------------------------------------------------------------------------------------------

    def identity(self) -> str:
        """The store's id, made once by its first caller. A job reads it where it starts and every trial checks it
        where it runs (`check_identity`), so a node that has another folder under the same path fails loudly
        instead of filling a store nobody else reads."""
        path = self._path(_IDENTITY)
        if self._read_or_none(path) is None:
            self._write_atomic(path, json.dumps({"store_id": uuid.uuid4().hex}).encode(), replace=False)
        return self._identity_at(path)

    def check_identity(self, expected: str) -> None:
        """Raise StoreUnseen unless this process sees the store whose `identity()` is `expected`; never creates it."""
        path = self._path(_IDENTITY)
        found = self._identity_at(path) if self._exists(path) else None
        if found != expected:
            raise StoreUnseen(
                f"the store {self.uri} as seen from {socket.gethostname()} is not the one the job started on "
                f"(store id {found or 'absent: an empty or missing folder'}, expected {expected}); every node "
                "must see the same store (a shared folder or bucket; docs/CLUSTER.md), and a job interrupted before its "
                "store was replaced must start afresh")

    def _identity_at(self, path: str) -> str:
        try:
            value = json.loads(self._read(path))["store_id"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptVector(f"{path}: not a tpv store id file ({exc})") from None
        if not isinstance(value, str):
            raise CorruptVector(f"{path}: store_id is not a string")
        return value

    # ---- change detection ---------------------------------------------------------------------------------------

    def version(self) -> str:
        """Fingerprint of the published contents (names, sizes, mtimes of every published file): one recursive
        listing, no file reads, so a server can poll it. Temp files do not count."""
        h = hashlib.sha256()
        infos = self._listing(self.root, recursive=True)
        for i in sorted(infos, key=lambda i: i.path):
            if i.type == pafs.FileType.File and (_visible(i.base_name, _EXT) or _visible(i.base_name, _LEGACY_EXT)):
                mtime = i.mtime_ns if i.mtime_ns is not None else -1
                h.update(f"{i.path}\0{i.size}\0{mtime}\n".encode())
        return h.hexdigest()
