"""What a Ray driver and its workers share: the Ray connection, the environment, one backbone per worker."""

from __future__ import annotations

import logging
import os
from typing import Any

from tpv.backbone import Backbone, BackboneConfig

#: environment variables a worker needs to see the driver's data, models and store
WORKER_ENV = ("TPV_HOME", "TPV_ARCHIVE_DIR", "TPV_STORE", "TPV_RAY_RESULTS", "HF_HOME", "HF_HUB_OFFLINE",
              "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM")


def init_ray(address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = False):
    """Connect to `address` / `$RAY_ADDRESS` if given, else start a local Ray; no-op if Ray is already up."""
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    env = {k: os.environ[k] for k in WORKER_ENV if os.environ.get(k)}
    kwargs: dict[str, Any] = dict(runtime_env={"env_vars": env}, log_to_driver=log_to_driver,
                                  logging_level=logging.WARNING)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
    return ray


_BACKBONES: dict[str, Backbone] = {}


def load_backbone(config: BackboneConfig) -> Backbone:
    """One backbone per worker process and config (Tune reuses actors across trials)."""
    key = config.model_dump_json()
    if key not in _BACKBONES:
        _BACKBONES.clear()  # one model in memory per worker
        _BACKBONES[key] = Backbone.load(config)
    return _BACKBONES[key]


def set_threads(cpus: float) -> None:
    import torch

    n = max(1, int(round(cpus)))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
