"""The vector store: safetensors tensors + JSON metadata on a local folder or any `pyarrow.fs` filesystem.

Layout under the root:
    {backbone_id}/origins/{L}-{seed}.safetensors
    {backbone_id}/vectors/{task}/{vector_id}.safetensors + {vector_id}.json
    {backbone_id}/compositions/{name}.json

Why it is shaped like this: many training workers write into one shared folder at once, and a server reads it.
Every file is written under a unique hidden temp name in its final folder and then moved into place (an atomic
rename on local and POSIX shared filesystems; object stores emulate `move` and are only as atomic as they are).
The tensor goes first and the JSON last, and readers only ever look at JSON names, so a vector exists exactly
when its JSON does; a killed writer leaves only hidden temp files or an orphan tensor, both invisible. Tensors
are read with `safetensors` (never unpickled) and their sha256 is checked on every load.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import posixpath
import uuid
from typing import Any

import pyarrow.fs as pafs
import safetensors.torch as st
import torch
from pydantic import ValidationError

from tpv.errors import ConflictError, CorruptData, NotFoundError, TpvError
from tpv.names import InvalidName, validate_name
from tpv.vectors import TaskPromptVector, VectorError, VectorMeta, make_vector_id, tensor_sha256

__all__ = [
    "CorruptVector", "NotFound", "StoreConflict", "StoreError", "UnknownVector", "VectorStore", "make_vector_id",
    "validate_name",
]

_TMP_PREFIX = ".tmp-"
_TENSOR_KEY = "tau"
_ORIGIN_KEY = "origin"


class StoreError(TpvError):
    """Base of every store failure."""


class StoreConflict(StoreError, ConflictError):
    """Something different is already stored under this name and overwrite was not asked for."""


class CorruptVector(StoreError, CorruptData):
    """A stored file fails its hash check or cannot be parsed."""


class NotFound(StoreError, NotFoundError):
    """No stored object of that name."""


class UnknownVector(NotFound):
    """No vector with that id (or no vectors for that task)."""


def _visible(base: str, suffix: str) -> str | None:
    """The stem of a published file name, or None for temp files and anything else that is not ours."""
    if not base.endswith(suffix) or base.startswith("."):
        return None
    stem = base[: len(base) - len(suffix)]
    try:
        return validate_name(stem)
    except InvalidName:
        return None


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors blob (8-byte little-endian header length, then a JSON header)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n])["__metadata__"]


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

    def _write_atomic(self, path: str, data: bytes) -> None:
        """Write to a unique hidden name in the target folder, then move it over `path`."""
        folder, base = posixpath.split(path)
        self.fs.create_dir(folder, recursive=True)
        tmp = posixpath.join(folder, f"{_TMP_PREFIX}{uuid.uuid4().hex}-{base}")
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, path)
        except BaseException:
            try:
                self.fs.delete_file(tmp)
            except OSError:
                pass
            raise

    def _subdirs(self, path: str) -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and _visible(i.base_name, ""))

    def _files(self, path: str, suffix: str) -> list[pafs.FileInfo]:
        infos = self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        return [i for i in infos if i.type == pafs.FileType.File and _visible(i.base_name, suffix)]

    def backbones(self) -> list[str]:
        """Backbone ids with a folder in the store."""
        return self._subdirs(self.root)

    # ---- vectors ------------------------------------------------------------------------------------------------

    def _vector_paths(self, meta: VectorMeta) -> tuple[str, str]:
        folder = self._path(meta.backbone_id, "vectors", meta.task)
        return posixpath.join(folder, f"{meta.vector_id}.safetensors"), posixpath.join(folder, f"{meta.vector_id}.json")

    def _read_meta(self, json_path: str) -> VectorMeta:
        try:
            meta = VectorMeta.model_validate_json(self._read(json_path))
        except ValidationError as exc:
            raise CorruptVector(f"unreadable vector metadata {json_path}: {exc}") from None
        folder, base = posixpath.split(json_path)
        task_dir, bb_dir = posixpath.basename(folder), posixpath.basename(posixpath.dirname(posixpath.dirname(folder)))
        if (meta.vector_id, meta.task, meta.backbone_id) != (base[: -len(".json")], task_dir, bb_dir):
            raise CorruptVector(
                f"{json_path} describes ({meta.backbone_id}, {meta.task}, {meta.vector_id}), not its own location"
            )
        return meta

    def put(self, vector: TaskPromptVector, overwrite: bool = False) -> str:
        """Store a vector and return its id. Re-putting identical content is a no-op; different content under
        an existing id raises StoreConflict unless overwrite=True."""
        meta = vector.meta
        for value, what in ((meta.backbone_id, "backbone_id"), (meta.task, "task"), (meta.vector_id, "vector_id")):
            validate_name(value, what)
        digest = tensor_sha256(vector.tensor)
        if digest != meta.sha256:
            raise VectorError(f"vector {meta.vector_id!r} was modified after creation (sha256 no longer matches)")
        try:
            existing = self.get(meta.vector_id, backbone_id=meta.backbone_id)
        except UnknownVector:
            existing = None
        except CorruptVector:
            if not overwrite:
                raise
            self.delete(meta.vector_id, backbone_id=meta.backbone_id)
            existing = None
        if existing is not None:
            if existing.meta.sha256 == digest and existing.meta.task == meta.task:
                return meta.vector_id
            if not overwrite:
                raise StoreConflict(
                    f"vector {meta.vector_id!r} already exists for backbone {meta.backbone_id!r} "
                    f"(task {existing.meta.task!r}, sha256 {existing.meta.sha256[:12]}) with different content; "
                    "pass overwrite=True to replace it"
                )
            if existing.meta.task != meta.task:
                self.delete(meta.vector_id, backbone_id=meta.backbone_id)
        tensor_path, json_path = self._vector_paths(meta)
        data = st.save({_TENSOR_KEY: vector.tensor}, metadata={"vector_id": meta.vector_id, "sha256": digest})
        self._write_atomic(tensor_path, data)
        self._write_atomic(json_path, meta.model_dump_json(indent=2).encode())
        return meta.vector_id

    def _locate(self, vector_id: str, backbone_id: str | None) -> str:
        """Path of the vector's JSON, searching every task (and every backbone when none is given)."""
        validate_name(vector_id, "vector_id")
        backbones = [validate_name(backbone_id, "backbone_id")] if backbone_id is not None else self.backbones()
        candidates = [
            self._path(bb, "vectors", task, f"{vector_id}.json")
            for bb in backbones
            for task in self._subdirs(self._path(bb, "vectors"))
        ]
        found = [i.path for i in self.fs.get_file_info(candidates) if i.type == pafs.FileType.File]
        if not found:
            where = f"backbone {backbone_id!r}" if backbone_id is not None else f"backbones {backbones}"
            raise UnknownVector(f"no vector {vector_id!r} in {where} of {self.uri}")
        if len(found) > 1:
            raise StoreError(f"vector id {vector_id!r} is ambiguous, found at {found}; pass backbone_id")
        return found[0]

    def get(self, vector_id: str, backbone_id: str | None = None) -> TaskPromptVector:
        """Load and verify a vector (sha256 of the tensor bytes against its JSON)."""
        json_path = self._locate(vector_id, backbone_id)
        for attempt in range(2):  # a concurrent overwrite can swap the tensor between our two reads: retry once
            try:
                meta = self._read_meta(json_path)
            except FileNotFoundError:  # deleted since we located it
                raise UnknownVector(f"vector {vector_id!r} was deleted while being read") from None
            tensor_path = json_path[: -len(".json")] + ".safetensors"
            try:
                tensor = st.load(self._read(tensor_path))[_TENSOR_KEY]
            except FileNotFoundError:
                raise CorruptVector(f"{json_path} exists but its tensor {tensor_path} is missing") from None
            except Exception as exc:  # safetensors raises its own error type for a bad header
                raise CorruptVector(f"cannot read tensor {tensor_path}: {exc}") from None
            digest = tensor_sha256(tensor)
            if digest == meta.sha256:
                try:
                    return TaskPromptVector(tensor, meta)
                except VectorError as exc:
                    raise CorruptVector(f"{tensor_path}: {exc}") from None
            if attempt == 0 and self._read_meta(json_path).sha256 != meta.sha256:
                continue
            break
        raise CorruptVector(f"{tensor_path}: sha256 {digest} does not match its metadata ({meta.sha256})")

    def list(
        self, backbone_id: str | None = None, task: str | None = None, seed: int | None = None,
        kind: str | None = None,
    ) -> list[VectorMeta]:
        """Metadata of the stored vectors matching every given filter, sorted; reads only JSON files."""
        if task is not None:
            validate_name(task, "task")
        backbones = [validate_name(backbone_id, "backbone_id")] if backbone_id is not None else self.backbones()
        metas: list[VectorMeta] = []
        for bb in backbones:
            tasks = [task] if task is not None else self._subdirs(self._path(bb, "vectors"))
            for t in tasks:
                for info in self._files(self._path(bb, "vectors", t), ".json"):
                    try:
                        meta = self._read_meta(info.path)
                    except FileNotFoundError:  # deleted between listing and reading
                        continue
                    if (seed is None or meta.origin_seed == seed) and (kind is None or meta.kind == kind):
                        metas.append(meta)
        return sorted(metas, key=lambda m: (m.backbone_id, m.task, m.vector_id))

    def delete(self, vector_id: str, backbone_id: str | None = None) -> None:
        """Remove a vector: the JSON first (so it disappears at once), then its tensor."""
        json_path = self._locate(vector_id, backbone_id)
        self.fs.delete_file(json_path)
        try:
            self.fs.delete_file(json_path[: -len(".json")] + ".safetensors")
        except FileNotFoundError:
            pass

    # ---- origins ------------------------------------------------------------------------------------------------

    def _origin_path(self, backbone_id: str, length: int, seed: int) -> str:
        validate_name(backbone_id, "backbone_id")
        if not isinstance(length, int) or length <= 0 or not isinstance(seed, int) or seed < 0:
            raise StoreError(f"origin needs an int length > 0 and an int seed >= 0, got {length!r}, {seed!r}")
        return self._path(backbone_id, "origins", f"{length}-{seed}.safetensors")

    def put_origin(
        self, backbone_id: str, length: int, seed: int, tensor: torch.Tensor, atol: float = 1e-6
    ) -> None:
        """Store an origin once. If one exists it must equal `tensor` within atol, else StoreConflict."""
        path = self._origin_path(backbone_id, length, seed)
        if tensor.dim() != 2 or tensor.shape[0] != length:
            raise StoreError(f"origin for L={length} must be [L, d], got {tuple(tensor.shape)}")
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        if not bool(torch.isfinite(t).all()):
            raise StoreError("origin contains NaN/inf")
        if self._exists(path):
            stored = self.get_origin(backbone_id, length, seed)
            if stored.shape == t.shape and torch.allclose(stored, t, rtol=0.0, atol=atol):
                return
            raise StoreConflict(
                f"a different origin is stored for ({backbone_id}, L={length}, seed={seed}); origins are "
                "reproducible from (backbone, L, seed), so the backbone or the origin code changed"
            )
        self._write_atomic(path, st.save({_ORIGIN_KEY: t}, metadata={"sha256": tensor_sha256(t)}))

    def get_origin(self, backbone_id: str, length: int, seed: int) -> torch.Tensor:
        path = self._origin_path(backbone_id, length, seed)
        try:
            data = self._read(path)
        except FileNotFoundError:
            raise NotFound(f"no origin ({backbone_id}, L={length}, seed={seed}) in {self.uri}") from None
        try:
            tensor = st.load(data)[_ORIGIN_KEY]
            expected = _safetensors_metadata(data)["sha256"]
        except Exception as exc:  # safetensors raises its own error type for a bad header
            raise CorruptVector(f"cannot read origin {path}: {exc}") from None
        if tensor_sha256(tensor) != expected:
            raise CorruptVector(f"origin {path} fails its sha256 check")
        return tensor

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
            raise StoreError(f"composition {name!r} is not plain JSON: {exc}") from None
        if self._exists(path) and not overwrite:
            if self.get_composition(backbone_id, name) == json.loads(data):
                return
            raise StoreConflict(f"composition {name!r} already exists for {backbone_id!r}; pass overwrite=True")
        self._write_atomic(path, data)

    def get_composition(self, backbone_id: str, name: str) -> dict[str, Any]:
        path = self._composition_path(backbone_id, name)
        try:
            data = self._read(path)
        except FileNotFoundError:
            known = self.list_compositions(backbone_id)
            raise NotFound(f"no composition {name!r} for {backbone_id!r}; known: {known}") from None
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

    # ---- change detection ---------------------------------------------------------------------------------------

    def version(self) -> str:
        """Fingerprint of the published contents (names, sizes, mtimes of JSON and origin files): one recursive
        listing, no file reads, so a server can poll it. Temp files and orphan tensors do not count."""
        h = hashlib.sha256()
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True, recursive=True))
        for i in sorted(infos, key=lambda i: i.path):
            if i.type != pafs.FileType.File:
                continue
            is_origin = posixpath.basename(posixpath.dirname(i.path)) == "origins"
            if _visible(i.base_name, ".json") or (is_origin and _visible(i.base_name, ".safetensors")):
                mtime = i.mtime_ns if i.mtime_ns is not None else -1
                h.update(f"{i.path}\0{i.size}\0{mtime}\n".encode())
        return h.hexdigest()
