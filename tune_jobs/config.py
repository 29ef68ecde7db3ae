"""What every job config shares (`JobConfig`), and reading one from YAML plus command-line overrides."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from tpv.config_merge import deep_merge  # re-exported: the jobs merge configs with the library's one rule
from tpv.errors import InvalidInput
from tpv.names import Name
from tune_jobs.locations import Locations


class JobConfigError(InvalidInput):
    """A job's configuration (file or flags) is unusable."""


class Resources(BaseModel):
    """Per-trial resources: Tune packs as many trials as fit (fractional GPUs share one device)."""

    model_config = ConfigDict(extra="forbid")

    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0, description="e.g. 0.25: four trials share one GPU")
    max_concurrent: int | None = Field(None, ge=1, description="cap on trials running at once")
    pack: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        1, description="runs per trial, trained as one pack (tpv.packed): the model loaded once; 'auto': as many "
        "as the memory of a node trials run on holds")
    custom: dict[str, float] = Field(default_factory=dict, description="Ray custom resources each trial holds, "
                                     "e.g. {'tpv_worker': 1}: trials then run only on nodes started with "
                                     "`ray start --resources '{\"tpv_worker\": 4}'`")

    def tune_resources(self) -> dict[str, float]:
        """One trial's resources as `tune.with_resources` takes them."""
        return {"cpu": self.cpus_per_trial, "gpu": self.gpus_per_trial, **self.custom}

    def remote_options(self) -> dict[str, Any]:
        """The same resources as `ray.remote` options (a task that must land where a trial could)."""
        return {"num_cpus": self.cpus_per_trial, "num_gpus": self.gpus_per_trial, "resources": dict(self.custom)}


class JobConfig(BaseModel):
    """The fields of every Tune job: its name (the experiment's, so a re-run resumes it), resources, retries,
    where it reads and writes, and Tune's console verbosity. Loadable from YAML (`--config`), flags override."""

    model_config = ConfigDict(extra="forbid")

    name: Name
    resources: Resources = Field(default_factory=Resources)
    max_failures: int = Field(2, ge=0, description="retries of a dead trial, each from its last checkpoint")
    locations: Locations = Field(default_factory=Locations)
    fresh: bool = Field(False, description="start a new Tune experiment even if an interrupted one exists")
    verbose: int = Field(0, ge=0, le=3, description="Ray Tune's own console output level")

    #: fields that do not change what a job computes (left out of its experiment key)
    RUN_ONLY: ClassVar[frozenset[str]] = frozenset({"locations", "fresh", "verbose", "resources", "max_failures"})

    def grid_args(self) -> dict[str, Any]:
        """What every job hands `tune_jobs.grid.run_grid` from its config: where Tune keeps the experiment, each
        trial's resources, retries, whether to resume, and Tune's verbosity."""
        return dict(storage_path=self.locations.resolved().storage_path, resources=self.resources,
                    max_failures=self.max_failures, restore=not self.fresh, verbose=self.verbose)


def resources_from_args(args, data: dict[str, Any]) -> dict[str, Any]:
    """The `resources` section of a job config with --cpus-per-trial/--gpus-per-trial/--max-concurrent applied."""
    resources = dict(data.get("resources", {}))
    for key in ("cpus_per_trial", "gpus_per_trial", "max_concurrent", "pack", "custom"):
        if getattr(args, key, None) is not None:
            resources[key] = dict(args.custom) if key == "custom" else getattr(args, key)
    return resources


def parse_overrides(pairs: Sequence[str] | None) -> dict[str, Any]:
    """`key=value` pairs (values parsed as YAML, dotted keys nest): `--set max_steps=100 backbone.dtype=float32`."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise JobConfigError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out


def load_yaml_config(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise JobConfigError(f"{path}: expected a mapping at the top level")
    return data


J = TypeVar("J", bound=JobConfig)


def config_from_args(cls: type[J], args, keys: Sequence[str], required: Sequence[str] = (),
                     **parsed: Any) -> J:
    """A job config from its YAML file (`--config`) with the flags over it: each attribute of `args` named in
    `keys` that was given, the fields the job parsed itself (`parsed`, None = not given), `--set` TrainConfig
    overrides, resources, `--fresh` / `--force`, and the locations."""
    from tune_jobs.locations import locations_from_args

    data = load_yaml_config(getattr(args, "config", None))
    data |= {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    data |= {k: v for k, v in parsed.items() if v is not None}
    if getattr(args, "set", None):
        data["train"] = deep_merge(data.get("train", {}), parse_overrides(args.set))
    data["resources"] = resources_from_args(args, data)
    data |= {flag: True for flag in ("fresh", "force") if getattr(args, flag, False)}
    missing = [k for k in required if k not in data]
    if missing:
        flags = " and ".join(f"--{k.replace('_', '-')}" for k in missing)
        raise JobConfigError(f"give {flags} (or a --config file with them)")
    config = cls.model_validate(data)
    config.locations = locations_from_args(args, config.locations)
    return config


def start_ray(args) -> None:
    """Connect to --address or start a local Ray with --num-cpus when asked; otherwise the job starts Ray itself."""
    from tune_jobs.runtime import init_ray

    if args.address or args.num_cpus:
        init_ray(args.address, args.num_cpus)


def add_resource_args(parser) -> None:
    """The per-trial resource flags every job takes (`Resources`)."""
    parser.add_argument("--cpus-per-trial", type=float, help="CPUs per trial; torch threads (default 1)")
    parser.add_argument("--gpus-per-trial", type=float, help="GPU (fraction) per trial, e.g. 0.25 (default 0)")
    parser.add_argument("--max-concurrent", type=int, help="at most this many trials at once")
    parser.add_argument("--trial-resources", dest="custom", nargs="+", type=_custom_resource, metavar="NAME=AMOUNT",
                        help="Ray custom resources each trial holds, e.g. tpv_worker=1 (trials then run only on "
                        "nodes that have them)")
    parser.add_argument("--pack", nargs="?", const="auto", type=_pack_size, metavar="K",
                        help="train K runs per trial as one pack (the model loaded once; on a GPU one forward and "
                        "backward per step for all K); --pack alone: K from the memory of a node trials run on "
                        "(default 1: one run per trial)")


def _custom_resource(value: str) -> tuple[str, float]:
    import argparse

    name, _, amount = value.partition("=")
    try:
        number = float(amount)
    except ValueError:
        number = -1.0
    if not name or number < 0:
        raise argparse.ArgumentTypeError(f"--trial-resources takes NAME=AMOUNT (an amount >= 0), got {value!r}")
    return name, number


def _pack_size(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        import argparse

        raise argparse.ArgumentTypeError(f"--pack takes a number >= 1 or 'auto', got {value!r}")
    return size
