"""Where tpv keeps its caches: one root (``TPV_HOME``, default ``~/.cache/tpv``) so a user can move or wipe it."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path


def tpv_home() -> Path:
    """The cache root; read on every call so tests and CLIs can point it elsewhere."""
    return Path(os.environ.get("TPV_HOME") or Path.home() / ".cache" / "tpv").expanduser()


def data_dir() -> Path:
    """Prepared task splits: ``<data_dir>/<task>/{train,validation,test}.jsonl`` + ``meta.json``."""
    return tpv_home() / "data"


def archives_dir() -> Path:
    """Downloaded package archives the data is read out of (kept so a re-fetch downloads nothing)."""
    return tpv_home() / "archives"


def models_dir() -> Path:
    """Converted model folders (plain safetensors copies of bundled backbones)."""
    return tpv_home() / "models"


def default_store() -> str:
    """The vector store URI every entry point uses unless told otherwise: TPV_STORE, else TPV_HOME/store."""
    return os.environ.get("TPV_STORE") or str(tpv_home() / "store")


def atomic_write(path: Path, data: bytes | str) -> Path:
    """Write a local file through a temp file in the same folder and rename, so readers never see a partial file.

    The one atomic write for local files (data, task registry, reports); the vector store has its own commit on
    any pyarrow filesystem."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with tmp.open("xb") as f:  # not mkstemp: that would make the file private (0600) whatever the umask
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def sha256_file(path: Path) -> str:
    """The file's sha256, read in 1 MiB blocks (archives and hub files are large)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
