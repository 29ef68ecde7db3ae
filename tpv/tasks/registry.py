"""The task registry and loading examples from it.

Built-ins (the bundled stand-ins and the paper's hub tasks, ``tpv.tasks.paper``), user tasks registered in this process, and user tasks persisted under ``TPV_HOME/tasks`` (``tpv tasks
add``): the persisted ones are what Ray workers and other processes see, since TPV_HOME is shared with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
from pydantic import ValidationError

from tpv.errors import InvalidInput, NotFoundError
from tpv.paths import atomic_write, data_dir, tpv_home
from tpv.tasks.builtin import BUILTIN_TASKS
from tpv.tasks.paper import PAPER_TASKS
from tpv.tasks.spec import (
    SPLITS,
    Example,
    Split,
    TaskConfigError,
    TaskDataMissing,
    TaskSpec,
    config_error,
)
from tpv.tasks.splits import Row
from tpv.tasks.user import datasets_cache, load_task_file, quiet_datasets, user_splits


class UnknownTaskError(NotFoundError):
    """No task of that name is registered."""


class BadSplitRequest(InvalidInput):
    """A split name, limit or shot count that no task can serve."""


_REGISTRY: dict[str, TaskSpec] = {spec.name: spec for spec in [*BUILTIN_TASKS, *PAPER_TASKS]}
BUILTIN_NAMES = frozenset(_REGISTRY)


def persisted_dir() -> Path:
    """Where ``register_task(..., persist=True)`` keeps task specs for every process sharing TPV_HOME."""
    return tpv_home() / "tasks"


def register_task(spec: TaskSpec, overwrite: bool = False, persist: bool = False) -> TaskSpec:
    """Add a task; built-ins can never be replaced, a user task only with ``overwrite``."""
    taken = spec.name in _REGISTRY or (persist and (persisted_dir() / f"{spec.name}.json").exists())
    if spec.name in BUILTIN_NAMES or (taken and not overwrite):
        kind = "built-in" if spec.name in BUILTIN_NAMES else "registered"
        raise TaskConfigError(f"name: a {kind} task is already called {spec.name!r}")
    if persist:
        atomic_write(persisted_dir() / f"{spec.name}.json", spec.model_dump_json(indent=2))
    _REGISTRY[spec.name] = spec
    return spec


def register_task_file(path: str | Path, overwrite: bool = False, persist: bool = False) -> TaskSpec:
    """Validate a YAML/JSON task config and its data, then register it (see ``tpv.tasks.user``)."""
    return register_task(load_task_file(path), overwrite=overwrite, persist=persist)


def _persisted(name: str) -> TaskSpec | None:
    path = persisted_dir() / f"{name}.json"
    if not path.is_file():
        return None
    try:
        return TaskSpec.model_validate_json(path.read_text())
    except ValidationError as exc:
        raise config_error(exc, str(path)) from None


def get_task(name: str) -> TaskSpec:
    spec = _REGISTRY.get(name) or _persisted(name)
    if spec is None:
        raise UnknownTaskError(f"unknown task {name!r}; known: {', '.join(list_tasks())}") from None
    return spec


def list_tasks() -> list[str]:
    """Names of all tasks: built-ins first, then this process's and the persisted user tasks."""
    persisted = sorted(p.stem for p in persisted_dir().glob("*.json")) if persisted_dir().is_dir() else []
    return list(_REGISTRY) + [n for n in persisted if n not in _REGISTRY]


def task_data_dir(name: str) -> Path:
    """Where ``tpv data fetch`` writes a built-in task's splits and ``meta.json``."""
    return data_dir() / name


def require_data(names: Sequence[str]) -> None:
    """Fail at once, naming every one, when built-in tasks among `names` have no prepared data: a job checks this
    before it starts trials, which would otherwise each fail on it, once per retry."""
    missing = [n for n in dict.fromkeys(names)
               if get_task(n).data is None and not (task_data_dir(n) / "meta.json").is_file()]
    if missing:
        raise TaskDataMissing(f"no prepared data for {', '.join(missing)} in {data_dir()}; run "
                              f"`tpv data fetch {' '.join(f'--task {n}' for n in missing)}`")


def _builtin_rows(spec: TaskSpec, split: Split) -> list[Row]:
    require_data([spec.name])
    folder = task_data_dir(spec.name)
    path = folder / f"{split}.jsonl"
    if path.stat().st_size == 0:  # a tiny task can have an empty split; datasets cannot read an empty file
        return []
    with quiet_datasets():
        table = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=datasets_cache())
    return table.to_list()


def load_split(name: str, split: Split, limit: int | None = None, seed: int = 0) -> list[Example]:
    """A split as examples; with ``limit``, a seeded subsample of that size (in file order)."""
    if split not in SPLITS:
        raise BadSplitRequest(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    if limit is not None and limit < 0:
        raise BadSplitRequest("limit must be >= 0")
    spec = get_task(name)
    rows = user_splits(spec)[split] if spec.data is not None else _builtin_rows(spec, split)
    if limit is not None and limit < len(rows):
        keep = np.sort(np.random.default_rng(seed).choice(len(rows), size=limit, replace=False))
        rows = [rows[i] for i in keep]
    return [spec.example(row) for row in rows]


def few_shot(examples: Sequence[Example], k_per_class: int, seed: int = 0) -> list[Example]:
    """Up to ``k_per_class`` examples of each class (all of a smaller class), shuffled together with ``seed``.

    Regression examples (float labels) count as one class, so that gives ``k_per_class`` examples in total.
    """
    if k_per_class < 1:
        raise BadSplitRequest("k_per_class must be >= 1")
    rng = np.random.default_rng(seed)
    by_class: dict[int | str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_class.setdefault(ex.label if isinstance(ex.label, int) else "all", []).append(i)
    chosen: list[int] = []
    for key in sorted(by_class, key=str):
        members = by_class[key]
        chosen.extend(rng.choice(members, size=min(k_per_class, len(members)), replace=False).tolist())
    return [examples[i] for i in rng.permutation(chosen)]
