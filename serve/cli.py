"""`tpv serve`: serve/config.yaml (or another Serve config) with command-line overrides, run as `serve run` runs it.

Overrides of the store, backbone and resources apply to the model deployment (TPVModel); host and port to
`http_options`. The resolved config is validated here (ours and Serve's schema) so mistakes fail before Ray starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from tpv.paths import default_store

DEFAULT_CONFIG = Path(__file__).with_name("config.yaml")
MODEL, INGRESS = "TPVModel", "TPVIngress"


def _deployment(app: dict[str, Any], name: str) -> dict[str, Any]:
    deployments = app.setdefault("deployments", [])
    for d in deployments:
        if d.get("name") == name:
            return d
    deployments.append({"name": name})
    return deployments[-1]


def load_config(path: str | Path = DEFAULT_CONFIG, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Serve config file with command-line overrides applied to its first application's model deployment."""
    import yaml

    from serve.settings import IngressSettings, ModelSettings

    with open(path) as f:
        config = yaml.safe_load(f)
    if not isinstance(config, dict) or not config.get("applications"):
        raise ValueError(f"{path}: not a Serve config (no 'applications')")
    o = {k: v for k, v in (overrides or {}).items() if v is not None}
    http = config.setdefault("http_options", {})
    for key in ("host", "port"):
        if key in o:
            http[key] = o[key]
    app = config["applications"][0]
    model = _deployment(app, MODEL)
    user = model.setdefault("user_config", {})
    for key in ("store_uri", "backbone", "device", "dtype", "max_batch_size", "batch_wait_timeout_s",
                "reload_interval_s"):
        if key in o:
            user[key] = o[key]
    user["store_uri"] = user.get("store_uri") or default_store()
    env = {k: os.environ[k] for k in ("TPV_HOME", "TPV_STORE", "TPV_API_KEYS") if k in os.environ}
    if env:  # replicas on other nodes read the same caches (and keys)
        app_env = app.setdefault("runtime_env", {}) or {}
        app_env.setdefault("env_vars", {}).update(env)
        app["runtime_env"] = app_env
    if "replicas" in o:
        model.pop("autoscaling_config", None)
        model["num_replicas"] = o["replicas"]
    actor = model.setdefault("ray_actor_options", {})
    if "num_cpus" in o:
        actor["num_cpus"] = o["num_cpus"]
    if "num_gpus" in o:
        actor["num_gpus"] = o["num_gpus"]
    ModelSettings.model_validate(user)  # fail here, not in a replica
    IngressSettings.model_validate(_deployment(app, INGRESS).get("user_config") or {})
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)
    return config


def main(argv: list[str] | None = None) -> int:
    """`tpv serve`: run the resolved config exactly as `serve run CONFIG` runs it (same import path, so later
    `serve deploy` updates of user_config are lightweight)."""
    parser = argparse.ArgumentParser(prog="tpv serve", description="Serve composed task prompt vectors over HTTP.")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="Serve config YAML (default: serve/config.yaml)")
    parser.add_argument("--store", dest="store_uri", help="vector store folder or URI")
    parser.add_argument("--backbone", help="bundled backbone name or local model folder")
    parser.add_argument("--device")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--host", help="listen address (default 127.0.0.1; another one only with API keys set)")
    parser.add_argument("--port", type=int)
    parser.add_argument("--replicas", type=int, help="fixed model replica count (replaces autoscaling)")
    parser.add_argument("--num-cpus", type=float, help="CPUs per model replica")
    parser.add_argument("--num-gpus", type=float, help="GPUs per model replica")
    parser.add_argument("--max-batch-size", type=int)
    parser.add_argument("--batch-wait-timeout-s", type=float)
    parser.add_argument("--reload-interval-s", type=float)
    parser.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a new local cluster)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved Serve config and exit")
    parser.add_argument("--non-blocking", action="store_true", help="return once deployed (needs --address)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, vars(args))
    except Exception as exc:  # noqa: BLE001 - YAML, pydantic and Serve schema errors alike: report, exit 2
        print(f"tpv serve: {args.config}: {exc}", file=sys.stderr)
        return 2
    import tempfile

    import yaml

    text = yaml.safe_dump(config, sort_keys=False)
    if args.print_config:
        print(text)
        return 0
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="tpv-serve-", delete=False) as f:
        f.write(text)
    http = config.get("http_options", {})
    route = config["applications"][0].get("route_prefix", "/").rstrip("/")
    base = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}{route}"
    print(f"tpv serve: {f.name} -> {base}/v1/health (OpenAPI: {base}/docs)", flush=True)
    from ray.serve.scripts import cli

    cli_args = ["run", f.name] + (["--address", args.address] if args.address else [])
    cli_args += ["--non-blocking"] if args.non_blocking else []
    try:
        cli.main(cli_args, prog_name="serve", standalone_mode=False)
    except KeyboardInterrupt:
        pass
    finally:
        Path(f.name).unlink(missing_ok=True)  # Serve has read it by now (deployed, or shut down)
    return 0
