"""The pydantic shapes of a task: what one example is, how rows become text, where user data lives."""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tpv.errors import InvalidInput, Unavailable
from tpv.metrics import CLASSIFICATION_METRICS, GENERATION_METRICS, REGRESSION_METRICS
from tpv.names import Name

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")
MetricName = Literal["accuracy", "f1", "macro_f1", "pearson", "spearman", "squad_em", "squad_f1", "math_exact"]
DataFormat = Literal["csv", "jsonl", "json", "parquet", "hf_disk"]


class TaskConfigError(InvalidInput):
    """A task definition or its data is unusable; the message names the offending field."""


class TaskDataMissing(Unavailable, FileNotFoundError):
    """A built-in task's prepared files are absent (``tpv data fetch`` has not run for it)."""


class Example(BaseModel):
    """One text-to-text example."""

    model_config = ConfigDict(frozen=True)

    source: str  # the filled template
    target: str  # the label string (classification), the value with one decimal (regression), the answer text
    label: int | float | str  # class index into TaskSpec.labels, the regression value, or the answer (generation)


class SplitProtocol(BaseModel):
    """How train/validation/test are carved (see ``tpv.tasks`` for the protocol); seeded, so deterministic."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    group_field: str | None = None  # rows sharing this field's value always land in the same split
    large_threshold: int = Field(10_000, gt=0)  # train pools at least this big count as large
    validation_size: int = Field(1_000, gt=0)  # validation carved from the train pool of a large set
    test_fraction: float = Field(0.1, gt=0, lt=0.5)  # held-out share carved when the source has none
    stratify: bool = False  # carve each class (the label) in proportion, so every split keeps the class balance


class DataSource(BaseModel):
    """Where a user task's rows live. Built-in tasks have none: they read ``data_dir()/<name>/``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str | None = None  # one file (split by the protocol) or a saved HF dataset dir (its own splits if any)
    splits: dict[Split, str] = {}  # or one file per split; train is required
    format: DataFormat | None = None  # inferred from the file suffix (a directory means hf_disk)
    columns: dict[str, str] = {}  # template field -> column name, for fields whose column is named differently
    label_column: str = "label"

    @model_validator(mode="after")
    def _one_location(self) -> DataSource:
        if (self.path is None) == (not self.splits):
            raise ValueError("data: give exactly one of data.path or data.splits")
        if self.splits and "train" not in self.splits:
            raise ValueError("data.splits: a train file is required")
        return self


def template_fields(template: str) -> list[str]:
    """The named fields of a str.format template, in order of first use."""
    fields: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"template: {exc}") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise ValueError(f"template: field {{{name}}} must be a plain name like {{text}}")
        if spec or conversion:
            raise ValueError(f"template: field {{{name}}} must not carry a format spec or conversion")
        if name not in fields:
            fields.append(name)
    if not fields:
        raise ValueError("template: it names no field, e.g. 'sentence: {text} sentiment:'")
    return fields


def truncate(text: str, max_chars: int | None) -> str:
    """Cut to ``max_chars`` at a word boundary, so long passages cannot crowd out the rest of the prompt."""
    if max_chars is None or len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    head = cut.rsplit(" ", 1)[0]
    return head if len(head) > max_chars // 2 else cut


class TaskSpec(BaseModel):
    """Everything needed to turn a task's rows into examples and score predictions on them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    family: str = "user"
    description: str = ""
    source: str = ""  # where the rows come from (package, file)
    licence: str = ""
    template: str  # str.format over row fields, e.g. "premise: {premise} hypothesis: {hypothesis} answer:"
    labels: list[str] = []  # label strings by class index; [] for regression
    metric: MetricName
    max_chars: dict[str, int] = {}  # field -> character cap applied before filling the template
    split: SplitProtocol = SplitProtocol()
    data: DataSource | None = None

    @field_validator("template")
    @classmethod
    def _template_parses(cls, template: str) -> str:
        template_fields(template)
        return template

    @field_validator("labels")
    @classmethod
    def _labels_usable(cls, labels: list[str]) -> list[str]:
        if any(not label.strip() for label in labels):
            raise ValueError("labels: label strings must be non-empty")
        if len(set(labels)) != len(labels):
            raise ValueError(f"labels: duplicates in {labels}")
        return labels

    @model_validator(mode="after")
    def _consistent(self) -> TaskSpec:
        if self.metric in CLASSIFICATION_METRICS and len(self.labels) < 2:
            raise ValueError(f"labels: metric {self.metric!r} is for classification and needs at least 2 labels")
        if self.metric not in CLASSIFICATION_METRICS and self.labels:
            kind = "regression" if self.metric in REGRESSION_METRICS else "generation"
            raise ValueError(f"labels: metric {self.metric!r} is for {kind}; leave labels empty")
        if self.metric == "f1" and len(self.labels) != 2:
            raise ValueError("metric: f1 is binary (positive class = labels[1]); use macro_f1 for more labels")
        fields = template_fields(self.template)
        for field, cap in self.max_chars.items():
            if field not in fields:
                raise ValueError(f"max_chars: {field!r} is not a template field ({', '.join(fields)})")
            if cap <= 0:
                raise ValueError(f"max_chars.{field}: must be positive")
        return self

    @property
    def fields(self) -> list[str]:
        return template_fields(self.template)

    @property
    def is_regression(self) -> bool:
        return self.metric in REGRESSION_METRICS

    @property
    def is_generation(self) -> bool:
        """Free-text answers (SQuAD, MATH): rows carry a ``target`` text instead of a label."""
        return self.metric in GENERATION_METRICS

    def render(self, row: Mapping[str, Any]) -> str:
        """The template filled from one row's fields (each cut to its ``max_chars``)."""
        values = {f: truncate("" if row[f] is None else str(row[f]), self.max_chars.get(f)) for f in self.fields}
        return self.template.format(**values)

    def example(self, row: Mapping[str, Any]) -> Example:
        """A row with template fields and ``label`` (class index, or a number for regression) as an Example;
        a generation task's row has ``target``, its reference answer text, instead."""
        if self.is_generation:
            return Example(source=self.render(row), target=str(row["target"]), label=str(row["target"]))
        if self.is_regression:
            value = float(row["label"])
            return Example(source=self.render(row), target=f"{value:.1f}", label=value)
        index = int(row["label"])
        return Example(source=self.render(row), target=self.labels[index], label=index)


def config_error(exc: ValidationError, where: str) -> TaskConfigError:
    """A pydantic error rewritten as one message per field, e.g. ``metric: Input should be ...``."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(msg if not loc or msg.startswith(f"{loc}") else f"{loc}: {msg}")
    return TaskConfigError(f"{where}: " + "; ".join(lines))
