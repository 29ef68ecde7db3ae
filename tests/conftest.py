"""Shared fixtures: one TPV_HOME and one local Ray cluster per test session, tiny real models on disk.

TPV_HOME is set before anything starts Ray so that Ray's worker processes inherit it (they read task data and
model caches from there, as on a real cluster with shared storage).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

SESSION_HOME = Path(tempfile.mkdtemp(prefix="tpv-test-home-"))
os.environ.setdefault("TPV_HOME", str(SESSION_HOME))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import build_tiny_causal, build_tiny_t5


@pytest.fixture(scope="session")
def tiny_causal_path(tmp_path_factory) -> Path:
    return build_tiny_causal(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_t5_path(tmp_path_factory) -> Path:
    return build_tiny_t5(tmp_path_factory.mktemp("models") / "tiny-t5")


@pytest.fixture(scope="session")
def backbone(tiny_causal_path):
    """The tiny causal model, loaded once for the serve tests' stores and offline references (never modified)."""
    from tpv.backbone import Backbone, BackboneConfig

    return Backbone.load(BackboneConfig(model=str(tiny_causal_path), device="cpu"))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (ray.init takes seconds); 2 CPUs like the CI machine."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False,
             runtime_env={"env_vars": {"TPV_HOME": os.environ["TPV_HOME"], "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()
