"""Small dataset mirrors in the exact layout of a hub repository, for tests: ``<root>/<owner>/<name>/`` holding
``<config>/<split>-00000-of-00001.parquet`` files and a README.md whose YAML front matter lists ``configs:`` with
their ``data_files`` and the ``dataset_info`` features (ClassLabel names), as the hub's parquet conversion writes.

Rows are written with pyarrow (no ``datasets`` round trip), so the loader under test reads them as a user's mirror.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

Rows = list[dict]


def write_repo(root: Path, repo: str, configs: dict[str, dict[str, Rows]],
               class_labels: dict[str, dict[str, list[str]]] | None = None) -> Path:
    """One hub repository: ``configs`` maps config name -> split name -> rows (same columns in every split);
    ``class_labels`` maps config name -> column -> ClassLabel names, as the hub's card declares them."""
    folder = root / repo
    card_configs, card_info = [], []
    for config, splits in configs.items():
        files = []
        for split, rows in splits.items():
            path = folder / config / f"{split}-00000-of-00001.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows), path)
            files.append({"split": split, "path": f"{config}/{split}-*"})
        card_configs.append({"config_name": config, "data_files": files})
        first = next(iter(splits.values()))[0]
        features, labelled = [], (class_labels or {}).get(config, {})
        for column, value in first.items():
            if column in labelled:
                names = {str(i): n for i, n in enumerate(labelled[column])}
                features.append({"name": column, "dtype": {"class_label": {"names": names}}})
            elif isinstance(value, dict):  # a sequence of records (SQuAD's answers): types from a non-empty row
                sample = next(r[column] for rows in splits.values() for r in rows if all(r[column].values()))
                features.append({"name": column, "sequence": [{"name": k, "dtype": _dtype(v[0])}
                                                             for k, v in sample.items()]})
            else:
                features.append({"name": column, "dtype": _dtype(value)})
        card_info.append({"config_name": config, "features": features,
                          "splits": [{"name": s, "num_bytes": (folder / config / f"{s}-00000-of-00001.parquet")
                                      .stat().st_size, "num_examples": len(r)} for s, r in splits.items()]})
    card = yaml.safe_dump({"configs": card_configs, "dataset_info": card_info}, sort_keys=False)
    (folder / "README.md").write_text(f"---\n{card}---\n\n# {repo} (test mirror)\n")
    return folder


def _dtype(value) -> str:
    return {bool: "bool", int: "int64", float: "float32", str: "string"}[type(value)]


def sst2_rows(n: int, offset: int = 0) -> Rows:
    return [{"sentence": f"sentence {offset + i} is {'good' if i % 2 else 'bad'}", "label": i % 2, "idx": offset + i}
            for i in range(n)]


def build_glue(root: Path, sst2_train: int = 40, sst2_validation: int = 12) -> Path:
    """nyu-mll/glue with sst2 (test labels -1, as on the hub), mnli (matched/mismatched) and stsb."""
    mnli = lambda n, tag: [{"premise": f"{tag} premise {i}", "hypothesis": f"{tag} hypothesis {i}",  # noqa: E731
                           "label": i % 3, "idx": i} for i in range(n)]
    stsb = lambda n, tag: [{"sentence1": f"{tag} a {i}", "sentence2": f"{tag} b {i}",  # noqa: E731
                           "label": round(5 * i / max(n - 1, 1), 2), "idx": i} for i in range(n)]
    return write_repo(root, "nyu-mll/glue", {
        "sst2": {"train": sst2_rows(sst2_train), "validation": sst2_rows(sst2_validation, 10_000),
                 "test": [{**r, "label": -1} for r in sst2_rows(6, 20_000)]},
        "mnli": {"train": mnli(10_030, "train"), "validation_matched": mnli(30, "matched"),
                 "validation_mismatched": mnli(21, "mismatched"), "test_matched": mnli(5, "tm")},
        "stsb": {"train": stsb(30, "train"), "validation": stsb(10, "dev")},
    }, class_labels={"sst2": {"label": ["negative", "positive"]},
                     "mnli": {"label": ["entailment", "neutral", "contradiction"]}})


def build_squad_v2(root: Path) -> Path:
    def rows(n, tag):
        out = []
        for i in range(n):
            answerable = i % 3 != 0
            answer = f"answer {i}"
            out.append({"id": f"{tag}{i}", "title": "T", "context": f"context {i} says {answer}.",
                        "question": f"{tag} question {i}?",
                        "answers": {"text": [answer, f"{answer}."] if answerable else [],
                                    "answer_start": [15, 15] if answerable else []}})
        return out
    return write_repo(root, "rajpurkar/squad_v2", {"squad_v2": {"train": rows(12, "t"), "validation": rows(8, "v")}})


def build_math(root: Path) -> Path:
    def rows(n, tag):
        return [{"problem": f"{tag}: what is {i} + {i}?", "level": "Level 1", "type": "Algebra",
                 "solution": f"We add: ${i} + {i} = \\boxed{{{2 * i}}}$."} for i in range(n)]
    return write_repo(root, "DigitalLearningGmbH/MATH-lighteval", {"default": {"train": rows(10, "t"),
                                                                              "test": rows(8, "e")}})
