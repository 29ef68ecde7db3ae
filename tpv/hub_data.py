"""Prepare the paper's hub tasks (``tpv.tasks.paper``) the way ``tpv data fetch`` prepares the bundled ones.

Where the rows come from, in order:

1. ``$TPV_DATASETS_MIRROR/<owner>/<name>/`` when that folder exists: a copy of the hub repository (its parquet
   files per config and the README.md whose YAML lists ``configs:`` with their ``data_files``), read by
   ``datasets`` as a local dataset, so an air-gapped cluster needs nothing but that folder.
2. Otherwise ``datasets.load_dataset(<owner>/<name>, <config>)``: the user's HF cache, which is all it reads under
   ``HF_DATASETS_OFFLINE=1``, or the hub itself when online.

Offline and in neither place: one line naming the task, its hub id and both ways to provide it. The task's
folder is written whole into a scratch folder and moved into place, so it is never half-written; like the bundled
tasks it holds ``{train,validation,test}.jsonl`` and ``meta.json`` (counts, label counts, the protocol, the hub id,
and the sha256 of every source file read).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import datasets

from tpv.errors import CorruptData, Unavailable
from tpv.metrics import NO_ANSWER, boxed_answer
from tpv.paths import atomic_write, sha256_file
from tpv.tasks import SPLITS, get_task, make_splits, task_data_dir
from tpv.tasks.paper import HUB_SOURCES, HubSource
from tpv.tasks.spec import TaskSpec
from tpv.tasks.splits import Row
from tpv.tasks.user import datasets_cache, quiet_datasets

log = logging.getLogger(__name__)
MIRROR_ENV = "TPV_DATASETS_MIRROR"
HUB_PREP_VERSION = 1  # bump when row conversion or splitting changes, so prepared hub tasks are rebuilt


class HubDataUnavailable(Unavailable):
    """A hub dataset is neither in the mirror nor in the HF cache, and the hub cannot be reached."""


class HubDataMismatch(CorruptData):
    """A mirror or cached copy lacks a column or split the task reads, or holds a label the task does not know."""


def mirror_folder(source: HubSource) -> Path | None:
    """The dataset's folder in ``$TPV_DATASETS_MIRROR`` when the variable is set and the folder exists."""
    root = os.environ.get(MIRROR_ENV)
    folder = Path(root) / source.repo if root else None
    return folder if folder is not None and folder.is_dir() else None


def _sha256s(files: list[Path], base: Path | None) -> dict[str, str]:
    return {str(f.relative_to(base) if base else f): sha256_file(f) for f in sorted(set(files))}


def load_source(name: str, source: HubSource) -> tuple[datasets.Dataset, datasets.Dataset, dict]:
    """(train, held-out) tables and where they came from: mirror folder or hub id, and source-file sha256s."""
    folder = mirror_folder(source)
    try:
        with quiet_datasets():
            if folder is not None:
                tables = datasets.load_dataset(str(folder), source.config, split=[source.train, source.heldout],
                                               cache_dir=datasets_cache())
            else:
                tables = datasets.load_dataset(source.repo, source.config, split=[source.train, source.heldout])
    except (ConnectionError, FileNotFoundError, ValueError) as exc:  # ValueError: the copy lacks the config/split
        where = f"{folder} does not hold it: {exc}" if folder is not None else "it is not in the HF cache"
        root = os.environ.get(MIRROR_ENV)
        raise HubDataUnavailable(
            f"task {name}: dataset {source.hub_id} is not available offline ({where}); provide it either as "
            f"${MIRROR_ENV}/{source.repo}/ (a copy of the hub repository: parquet files and README.md"
            f"{f'; ${MIRROR_ENV} is {root}' if root else ''}) or in the HF cache by loading it once online: "
            f"datasets.load_dataset({source.repo!r}{f', {source.config!r}' if source.config else ''})") from None
    if folder is not None:
        read = [Path(f) for f in folder.rglob("*") if f.is_file()]
        provenance = {"mirror": str(folder), "source_sha256": _sha256s(read, folder)}
    else:
        read = [Path(c["filename"]) for t in tables for c in t.cache_files]
        provenance = {"hf_cache": True, "source_sha256": _sha256s(read, None)}
    return tables[0], tables[1], provenance


def _squad_target(raw: dict) -> dict:
    answers = list(raw["answers"]["text"])
    return {"answers": answers, "target": answers[0] if answers else NO_ANSWER}


def _math_target(raw: dict) -> dict:
    return {"target": raw["solution"], "answer": boxed_answer(raw["solution"])}


_TARGETS = {"squad_em": _squad_target, "squad_f1": _squad_target, "math_exact": _math_target}


def task_rows(spec: TaskSpec, source: HubSource, table: datasets.Dataset) -> tuple[list[Row], int]:
    """Rows as the prepared files hold them (template fields and the label index, value or answer text), and how
    many were dropped for carrying no label (GLUE-style -1, SNLI's no gold label)."""
    missing = [c for c in spec.fields if c not in table.column_names]
    if spec.labels or spec.is_regression:
        missing += [source.label_column] * (source.label_column not in table.column_names)
    if missing:
        raise HubDataMismatch(f"task {spec.name}: {source.hub_id} has no column {', '.join(missing)} "
                              f"(columns: {', '.join(table.column_names)})")
    rows, dropped = [], 0
    for raw in table:
        row: Row = {field: raw[field] for field in spec.fields}
        if spec.is_generation:
            row.update(_TARGETS[spec.metric](raw))
        elif spec.is_regression:
            row["label"] = round(float(raw[source.label_column]), 6)  # float32 on the hub: no 1.1100000143
        else:
            value = raw[source.label_column]
            index = source.label_values.index(value) if value in source.label_values else value
            if not isinstance(index, int) or not 0 <= index < len(spec.labels):
                if index in (-1, None, ""):
                    dropped += 1
                    continue
                raise HubDataMismatch(f"task {spec.name}: label {value!r} in {source.hub_id} is not one of "
                                      f"0..{len(spec.labels) - 1}{f' or {source.label_values}' * bool(source.label_values)}")
            row["label"] = index
        rows.append(row)
    return rows, dropped


def is_prepared(name: str) -> bool:
    """Whether the task's folder was prepared by this code under its current split protocol."""
    folder = task_data_dir(name)
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (meta.get("hub_prep_version") == HUB_PREP_VERSION and meta.get("hub_id") == HUB_SOURCES[name].hub_id
            and meta.get("split_protocol") == get_task(name).split.model_dump()
            and all((folder / f"{s}.jsonl").is_file() for s in SPLITS))


def _replace_folder(scratch: Path, folder: Path) -> None:
    """Move a complete scratch folder onto the task's folder; an old folder is moved aside first, then removed."""
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(scratch, folder)
    shutil.rmtree(old, ignore_errors=True)


def prepare(name: str, force: bool = False) -> Path:
    """Read one paper task from the mirror, the HF cache or the hub, split it, and write its folder."""
    spec, source = get_task(name), HUB_SOURCES[name]
    folder = task_data_dir(name)
    if not force and is_prepared(name):
        return folder
    log.info("preparing task %s from %s", name, source.hub_id)
    train_table, heldout_table, provenance = load_source(name, source)
    pool, dropped_train = task_rows(spec, source, train_table)
    heldout, dropped_heldout = task_rows(spec, source, heldout_table)
    splits = make_splits(pool, heldout, spec.split)
    meta = {
        "task": name, "counts": {s: len(rows) for s, rows in splits.items()},
        "official_heldout": True, "heldout_split": source.heldout,
        "dropped_unlabelled": {source.train: dropped_train, source.heldout: dropped_heldout},
        "split_protocol": spec.split.model_dump(), "source": spec.source, "hub_id": source.hub_id,
        **provenance, "hub_prep_version": HUB_PREP_VERSION,
    }
    if spec.labels:
        meta["label_counts"] = {s: {spec.labels[k]: v for k, v in sorted(Counter(r["label"] for r in rows).items())}
                                for s, rows in splits.items()}
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{name}.prepare-"))
    scratch.chmod(0o755)  # mkdtemp makes it private; the task folder is shared like the bundled ones
    try:
        for split, rows in splits.items():
            atomic_write(scratch / f"{split}.jsonl",
                         "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
        atomic_write(scratch / "meta.json", json.dumps(meta, indent=2).encode("utf-8"))
        _replace_folder(scratch, folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("%s: %s", name, meta["counts"])
    return folder
