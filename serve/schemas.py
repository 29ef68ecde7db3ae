"""Pydantic models of the HTTP API (requests and responses, with examples); compositions reuse `tpv.compose`.

Static bounds here are hard caps that hold whatever the config says (they keep absurd bodies out before any work);
the configurable limits (`serve.settings`) are checked by the app and answered with a 422 that names the limit.
Non-finite numbers are refused everywhere (`allow_inf_nan=False`), including JSON's NaN/Infinity literals.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    field_validator,
    model_validator,
)

from tpv.compose import CompositionBody
from tpv.names import Name

HARD_MAX_INPUTS = 1024
HARD_MAX_CHARS = 100_000
HARD_MAX_LABELS = 256
HARD_MAX_NEW_TOKENS = 512


def _non_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("text must not be empty or only whitespace")
    return value


Text = Annotated[str, StringConstraints(min_length=1, max_length=HARD_MAX_CHARS), AfterValidator(_non_blank)]

def _kind(value: Any) -> str | None:
    """Which form a value takes, so a validation error speaks of that form only (not of every union member)."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "texts"
    if isinstance(value, dict):
        return "fields"
    return None


InputItem = Annotated[
    Annotated[Text, Tag("text")]
    | Annotated[list[Text], Field(min_length=1, max_length=8), Tag("texts")]
    | Annotated[dict[Name, Text], Field(min_length=1, max_length=8), Tag("fields")],
    Discriminator(_kind, custom_error_type="input_type",
                  custom_error_message="an input is a text, a list of texts (e.g. a pair) or an object {field: text}"),
    Field(description="a text, a pair [text, text_pair] (filled into the template's fields in order), or an "
                      "object {field: text}"),
]

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


# ---- composition --------------------------------------------------------------------------------------------------


class InlineComposition(CompositionBody):
    """A `tpv.compose.CompositionBody` plus what only HTTP needs: the origin seed (the backbone is the served one,
    the prompt length is the one the named vectors share)."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"terms": [{"task": "rotten_tomatoes", "weight": 0.7}, {"task": "tweets", "weight": 0.3}],
         "origin_seed": 0, "method": "weighted"},
    ]})

    origin_seed: int = Field(0, ge=0, lt=2**31)
    backbone_id: Name | None = Field(None, description="if given, must be the served backbone")


def _composition_kind(value: Any) -> str | None:
    return {"text": "name", "fields": "inline"}.get(_kind(value) or "")


CompositionRef = Annotated[
    Annotated[InlineComposition, Tag("inline")] | Annotated[Name, Tag("name")],
    Discriminator(_composition_kind, custom_error_type="composition_type",
                  custom_error_message="a composition is an object {terms, origin_seed, ...} or a stored name"),
    Field(description="an inline composition, or the name of a composition stored for the served backbone"),
]


# ---- requests -----------------------------------------------------------------------------------------------------


class _TemplateFields(BaseModel):
    task: Name | None = Field(None, description="a registered task: its template (and, for classify, its labels)")
    template: Annotated[str, StringConstraints(min_length=1, max_length=4000)] | None = Field(
        None, description="str.format template over the input fields, e.g. 'review: {text} sentiment:'; "
                          "default: the task's, else '{text}' (pairs: '{text} {text_pair}')",
    )


class ClassifyRequest(_TemplateFields):
    """Rank classification: each label string's log-likelihood after each input, softmaxed into probabilities."""

    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False,
        json_schema_extra={"examples": [
            {"inputs": ["a gripping, beautifully acted story", "the plot drags and the jokes fall flat"],
             "composition": {"terms": [{"task": "rotten_tomatoes"}], "origin_seed": 0},
             "task": "rotten_tomatoes"},
            {"inputs": [["the cat sat on the mat", "a cat is sitting"]], "composition": "nli-mix",
             "task": "presuppositions_nli"},
            {"inputs": ["win a free cruise now!!!"], "composition": {"terms": [{"task": "sms_spam"}]},
             "labels": ["ham", "spam"], "template": "message: {text} label:"},
        ]},
    )

    inputs: list[InputItem] = Field(min_length=1, max_length=HARD_MAX_INPUTS)
    composition: CompositionRef
    labels: list[Annotated[str, StringConstraints(min_length=1, max_length=1000)]] | None = Field(
        None, min_length=2, max_length=HARD_MAX_LABELS, description="label strings; default: the task's labels"
    )

    @field_validator("labels")
    @classmethod
    def _distinct(cls, labels: list[str] | None) -> list[str] | None:
        if labels is None:
            return None
        if any(not label.strip() for label in labels):
            raise ValueError("label strings must not be blank")
        if len(set(labels)) != len(labels):
            raise ValueError(f"duplicate labels in {labels}")
        return labels

    @model_validator(mode="after")
    def _label_source(self) -> ClassifyRequest:
        if self.task is None and self.labels is None:
            raise ValueError("give 'task' (its labels and template) or 'labels' (and optionally 'template')")
        return self


class GenerateRequest(_TemplateFields):
    """Greedy generation after the composed soft prompt."""

    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False,
        json_schema_extra={"examples": [
            {"inputs": ["what is the capital of france?"], "composition": {"terms": [{"task": "trec"}]},
             "task": "trec", "max_new_tokens": 8},
        ]},
    )

    inputs: list[InputItem] = Field(min_length=1, max_length=HARD_MAX_INPUTS)
    composition: CompositionRef
    max_new_tokens: int | None = Field(None, ge=1, le=HARD_MAX_NEW_TOKENS,
                                       description="default: 16, or the config's limits.max_new_tokens if lower")


# ---- responses ----------------------------------------------------------------------------------------------------


class ClassifyResult(BaseModel):
    label: str = Field(description="the most likely label")
    scores: dict[str, float] = Field(description="probability per label (softmax of the log-likelihoods)")
    log_likelihoods: dict[str, float] = Field(description="summed log-likelihood of each label string")


class ClassifyResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"backbone_id": "smollm2-135m-instruct", "labels": ["negative", "positive"],
         "composition": {"backbone_id": "smollm2-135m-instruct", "terms": [{"task": "rotten_tomatoes", "weight": 1.0}],
                         "origin_seed": 0, "prompt_length": 50, "method": "weighted", "coefficient": 1.0, "params": {}},
         "results": [{"label": "positive", "scores": {"negative": 0.12, "positive": 0.88},
                      "log_likelihoods": {"negative": -3.1, "positive": -1.1}}]},
    ]})

    backbone_id: str
    labels: list[str]
    composition: dict[str, Any] = Field(description="the composition served (a stored one resolved, defaults filled)")
    results: list[ClassifyResult]


class GenerateResult(BaseModel):
    text: str


class GenerateResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"backbone_id": "smollm2-135m-instruct", "composition": {"terms": [{"task": "trec", "weight": 1.0}]},
         "results": [{"text": "location"}]},
    ]})

    backbone_id: str
    composition: dict[str, Any]
    results: list[GenerateResult]


class VectorInfo(BaseModel):
    vector_id: str
    task: str
    kind: str
    prompt_length: int
    hidden_size: int
    origin_seed: int
    created_at: str
    metrics: dict[str, Any] = {}


class VectorsResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"backbone_id": "smollm2-135m-instruct", "store_version": "3f2a...", "tasks": {"rotten_tomatoes": 3},
         "compositions": ["sentiment-mix"],
         "vectors": [{"vector_id": "rotten_tomatoes-s0-0123456789ab", "task": "rotten_tomatoes", "kind": "task",
                      "prompt_length": 50, "hidden_size": 576, "origin_seed": 0,
                      "created_at": "2026-01-01T00:00:00+00:00", "metrics": {"accuracy": 0.84}}]},
    ]})

    backbone_id: str
    store_version: str
    tasks: dict[str, int]
    compositions: list[str]
    vectors: list[VectorInfo]


class HealthResponse(BaseModel):
    """What one model replica serves; no server paths, process ids or settings."""

    status: Literal["ok"]
    backbone_id: str
    is_seq2seq: bool
    store_version: str
    reloads: int
    replica: str = Field(description="the model replica that answered")
    auth: Literal["keys", "open"]
    resent: int = Field(description="model calls this ingress replica re-sent after their model replica was lost")
    prompt_cache: dict[str, int]
    batching: dict[str, Any]


class ErrorResponse(BaseModel):
    """Every error, from validation to a lost model replica: a short kind and a message saying what was wrong and
    what is accepted (never a server path); `errors` lists the fields of a validation error."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"error": "not_found", "detail": "no task vectors for task 'sst9' on backbone 'smollm2-135m-instruct'"},
    ]})

    error: str
    detail: str
    errors: list[dict[str, Any]] | None = Field(None, description="the fields at fault (at most 20)")
    more_errors: int | None = Field(None, description="field errors found beyond those listed")


# ---- the playground's heatmap -------------------------------------------------------------------------------------


class SimilarityGroup(BaseModel):
    """Pairwise cosine (`flat`, the paper's) of the stored vectors of one shape: matrix[i][j] is vector_ids[i] vs
    vector_ids[j]."""

    prompt_length: int
    hidden_size: int
    vector_ids: list[str]
    tasks: list[str] = Field(description="the task of each vector, in the same order")
    matrix: list[list[float]]
    left_out: int = Field(0, description="vectors of this shape not in the matrix (over the size bound, or unreadable)")


class SimilarityResponse(BaseModel):
    backbone_id: str
    store_version: str
    mode: Literal["flat"] = "flat"
    groups: list[SimilarityGroup]
