"""Where tpv keeps its caches: one root (``TPV_HOME``, default ``~/.cache/tpv``) so a user can move or wipe it."""

from __future__ import annotations

import os
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
