"""cluster.yaml is a valid Ray cluster launcher config: Ray's shipped JSON schema, then Ray's own checks."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

CLUSTER = Path(__file__).resolve().parent.parent / "cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def test_cluster_yaml_validates_against_rays_schema(config):
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # raises ValidationError naming the offending field


def test_cluster_yaml_passes_rays_own_validation_after_defaults(config):
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    validate_config(config)
    validate_config(fillout_defaults(config))  # what `ray up` checks after merging the provider's defaults


def test_cluster_has_a_head_gpu_workers_and_shared_storage(config):
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(t.get("max_workers", 0) > t.get("min_workers", 0) for t in gpu)  # autoscaling
    assert config["file_mounts"]["~/tpv"] == "."
    setup = "\n".join(config["setup_commands"])
    assert "/mnt/shared" in setup and "pip install" in setup and "$HOME/tpv" in setup
    for command in (config["head_start_ray_commands"][-1], config["worker_start_ray_commands"][-1]):
        assert "TPV_HOME=/mnt/shared/tpv" in command and "TPV_STORE=/mnt/shared/tpv/store" in command


def test_a_broken_config_is_rejected(config):
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    broken = {**config, "available_node_types": {**config["available_node_types"],
                                                 "bad": {"resources": {"GPU": 0.5}, "node_config": {}}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)  # resources must be integers: the test really checks something
