"""User tasks with no code: a YAML/JSON config naming a CSV/JSONL/parquet file or a saved HF dataset dir.

Example (regression, STS-B style)::

    name: my_sts
    template: "sentence1: {s1} sentence2: {s2} similarity:"
    metric: pearson            # labels left out: regression, target = the score with one decimal
    data:
      path: sts.csv            # relative to this config file; or `splits: {train: a.csv, test: b.csv}`
      columns: {s1: sentence1, s2: sentence2}
      label_column: score

Classification labels in the file may be label strings (one of ``labels``) or class indices.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import datasets
import yaml
from pydantic import ValidationError

from tpv.paths import tpv_home
from tpv.tasks.spec import (
    SPLITS,
    DataFormat,
    DataSource,
    Split,
    TaskConfigError,
    TaskSpec,
    config_error,
)
from tpv.tasks.splits import Row, make_splits

_SUFFIX_FORMATS: dict[str, DataFormat] = {".csv": "csv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
_BUILDERS = {"csv": "csv", "jsonl": "json", "json": "json", "parquet": "parquet"}


class UserTaskConfig(TaskSpec):
    """A task config file: a TaskSpec whose ``data`` is required (paths relative to the config file)."""

    data: DataSource


def datasets_cache() -> str:
    """Where ``datasets`` keeps its Arrow copies of tpv's files (inside TPV_HOME, not the global HF cache)."""
    return str(tpv_home() / "hf_datasets")


@contextmanager
def quiet_datasets() -> Iterator[None]:
    """Silence ``datasets``' progress bars while tpv reads its own small files (training logs stay readable)."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def load_table(path: Path, fmt: DataFormat | None, field: str) -> datasets.Dataset | datasets.DatasetDict:
    """One user file (or saved dataset dir) through ``datasets``; ``field`` names the config key for errors."""
    if not path.exists():
        raise TaskConfigError(f"{field}: file not found: {path}")
    fmt = fmt or ("hf_disk" if path.is_dir() else _SUFFIX_FORMATS.get(path.suffix.lower()))
    if fmt is None:
        raise TaskConfigError(f"data.format: cannot tell the format of {path.name}; set one of csv, jsonl, json, "
                              "parquet, hf_disk")
    try:
        with quiet_datasets():
            if fmt == "hf_disk":
                return datasets.load_from_disk(str(path))
            return datasets.load_dataset(_BUILDERS[fmt], data_files=str(path), split="train",
                                         cache_dir=datasets_cache())
    except Exception as exc:  # datasets raises many types for unreadable files; the user needs the file named
        raise TaskConfigError(f"{field}: cannot read {path} as {fmt}: {type(exc).__name__}: {exc}") from exc


def _label_converter(spec: TaskSpec) -> Callable[[Any], int | float]:
    """Raw label value -> class index (or float for regression), raising ValueError on a bad value."""
    if spec.is_regression:
        def number(value: Any) -> float:
            try:
                if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                    raise ValueError
                result = float(value)
                if not math.isfinite(result):
                    raise ValueError
                return result
            except ValueError:
                raise ValueError(f"{value!r} is not a number (regression task)") from None

        return number
    index = {label: i for i, label in enumerate(spec.labels)}

    def convert(value: Any) -> int:
        if isinstance(value, str) and value in index:
            return index[value]
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(spec.labels):
            return value
        raise ValueError(f"{value!r} is neither one of {spec.labels} nor a class index 0..{len(spec.labels) - 1}")

    return convert


def canonical_rows(spec: TaskSpec, table: datasets.Dataset, where: str) -> list[Row]:
    """Rows keyed by template field (plus ``label`` and the split group field), checking every column."""
    src = spec.data
    assert src is not None
    present = table.column_names
    wanted = {f: src.columns.get(f, f) for f in spec.fields}
    for key in src.columns:
        if key not in wanted:
            raise TaskConfigError(f"data.columns.{key}: not a template field ({', '.join(spec.fields)})")
    for f, col in wanted.items():
        if col not in present:
            hint = f"data.columns.{f}" if f in src.columns else f"template field {{{f}}} (map it in data.columns)"
            raise TaskConfigError(f"{hint}: column {col!r} not in {where} (columns: {', '.join(present)})")
    if src.label_column not in present:
        raise TaskConfigError(f"data.label_column: column {src.label_column!r} not in {where} "
                              f"(columns: {', '.join(present)})")
    group = spec.split.group_field
    if group is not None and group not in present:
        raise TaskConfigError(f"split.group_field: column {group!r} not in {where}")
    convert = _label_converter(spec)
    rows = []
    for i, record in enumerate(table):
        row = {f: record[col] for f, col in wanted.items()}
        if group is not None:
            row[group] = record[group]
        value = record[src.label_column]
        try:
            if value is None:
                raise ValueError("missing")
            row["label"] = convert(value)
        except (TypeError, ValueError) as exc:
            raise TaskConfigError(f"data.label_column: row {i} of {where}: label {exc}") from None
        rows.append(row)
    if not rows:
        raise TaskConfigError(f"data: {where} has no rows")
    return rows


def user_splits(spec: TaskSpec) -> dict[Split, list[Row]]:
    """All three splits of a file-backed task: given ones as they are, missing ones by the split protocol."""
    src = spec.data
    assert src is not None
    if src.splits:
        tables = {s: (load_table(Path(p), src.format, f"data.splits.{s}"), Path(p).name) for s, p in src.splits.items()}
    else:
        loaded = load_table(Path(src.path), src.format, "data.path")
        name = Path(src.path).name
        if isinstance(loaded, datasets.DatasetDict):
            tables = {s: (loaded[s], f"split {s} of {name}") for s in SPLITS if s in loaded}
            if "train" not in tables:
                raise TaskConfigError(f"data.path: saved dataset has splits {list(loaded)}; a train split is needed")
        else:
            tables = {"train": (loaded, name)}
    rows = {s: canonical_rows(spec, table, where) for s, (table, where) in tables.items()}
    if len(rows) == len(SPLITS):
        return rows
    heldout = rows.get("test", rows.get("validation"))
    return make_splits(rows["train"], heldout, spec.split)


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise TaskConfigError(f"task config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise TaskConfigError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {exc}")
    if not isinstance(raw, dict):
        raise TaskConfigError(f"{path}: expected a mapping of task fields at the top level")
    return raw


def load_task_file(path: str | Path) -> TaskSpec:
    """Validate a task config file and its data (every column and label), returning the TaskSpec."""
    path = Path(path).expanduser().resolve()
    try:
        config = UserTaskConfig.model_validate(_read_config(path))
    except ValidationError as exc:
        raise config_error(exc, str(path)) from None
    src = config.data

    def resolve(p: str) -> str:
        return str((path.parent / Path(p).expanduser()).resolve())

    data = src.model_copy(update={
        "path": resolve(src.path) if src.path else None,
        "splits": {s: resolve(p) for s, p in src.splits.items()},
    })
    spec = TaskSpec.model_validate({**config.model_dump(exclude={"data"}), "data": data})
    try:
        user_splits(spec)
    except TaskConfigError as exc:
        raise TaskConfigError(f"{path}: {exc}") from None
    return spec
