"""Where a job reads and writes.

The vector store is a URI (a local folder by default, `$TPV_STORE` or `<TPV_HOME>/store`; any `pyarrow.fs` URI such
as `s3://bucket/tpv/store` or a shared mount on a cluster). Ray Tune's `storage_path` (experiment state + trial
checkpoints) follows the same setting: the `ray_results` folder next to the store (`$TPV_RAY_RESULTS` overrides),
so a cluster whose store is on shared storage checkpoints there too. Tables and plots go to a local folder
(`<TPV_HOME>/reports`).
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

from pydantic import BaseModel, Field

from tpv.paths import default_store, tpv_home


def _is_uri(location: str) -> bool:
    return "://" in location


def default_storage_path(store: str) -> str:
    """`$TPV_RAY_RESULTS`, else the `ray_results` folder beside the store (same filesystem, local or remote)."""
    if os.environ.get("TPV_RAY_RESULTS"):
        return absolute(os.environ["TPV_RAY_RESULTS"])
    if _is_uri(store):
        scheme, rest = store.split("://", 1)
        parent = posixpath.dirname(rest.rstrip("/"))
        return f"{scheme}://{parent}/ray_results" if parent else f"{scheme}://ray_results"
    return str(Path(store).expanduser().absolute().parent / "ray_results")


def default_out_dir() -> Path:
    return tpv_home() / "reports"


def absolute(location: str) -> str:
    """Ray wants absolute local paths; URIs pass through."""
    return location if _is_uri(location) else str(Path(location).expanduser().absolute())


class Locations(BaseModel):
    """Where a job reads and writes. Empty fields take the defaults above."""

    store: str = Field(default_factory=default_store, description="vector store: local folder or pyarrow URI")
    storage_path: str | None = Field(None, description="Ray Tune storage_path (default: beside the store)")
    out_dir: str | None = Field(None, description="local folder for tables and plots (default <TPV_HOME>/reports)")

    def resolved(self) -> Locations:
        store = absolute(self.store)
        return Locations(
            store=store,
            storage_path=absolute(self.storage_path) if self.storage_path else default_storage_path(store),
            out_dir=str(Path(self.out_dir).expanduser().absolute()) if self.out_dir else str(default_out_dir()),
        )


def add_location_args(parser) -> None:
    parser.add_argument("--store", help="vector store: a folder or a pyarrow URI (s3://..., gs://..., hdfs://...); "
                        "default $TPV_STORE or <TPV_HOME>/store")
    parser.add_argument("--storage-path", help="Ray Tune storage_path for experiment state and checkpoints "
                        "(default: the ray_results folder beside the store)")
    parser.add_argument("--out", help="folder for tables and plots (default <TPV_HOME>/reports)")
    parser.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS; unset: start a local Ray)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all); ignored on a cluster")


def locations_from_args(args, base: Locations | None = None) -> Locations:
    data = (base or Locations()).model_dump()
    for key, attr in (("store", "store"), ("storage_path", "storage_path"), ("out_dir", "out")):
        if getattr(args, attr, None):
            data[key] = getattr(args, attr)
    return Locations(**data).resolved()
