"""The ingress's checks of a parsed request against `RequestLimits` (a 422 naming the limit), before any model work."""

from __future__ import annotations

from serve.errors import FieldErrors
from serve.schemas import ClassifyRequest, GenerateRequest, InlineComposition
from serve.settings import RequestLimits


class LimitExceeded(FieldErrors):
    """A request over one of the configured limits; `field` (the top-level request field) is named in `errors`,
    so an OpenAI client reads it as the error's `param`."""

    def __init__(self, detail: str, field: str | None = None) -> None:
        super().__init__(detail, [{"loc": ["body", field], "msg": detail, "type": "limit_exceeded"}] if field else [])


def check_composition(ref: InlineComposition | str, limits: RequestLimits) -> None:
    if isinstance(ref, str):
        return
    if len(ref.terms) > limits.max_terms:
        raise LimitExceeded(f"the composition has {len(ref.terms)} terms; the limit is {limits.max_terms}")
    for i, term in enumerate(ref.terms):
        if abs(term.weight) > limits.max_abs_weight:
            raise LimitExceeded(f"terms[{i}].weight = {term.weight} is outside +-{limits.max_abs_weight}")
    if abs(ref.coefficient) > limits.max_abs_weight:
        raise LimitExceeded(f"coefficient = {ref.coefficient} is outside +-{limits.max_abs_weight}")


def check_request(req: ClassifyRequest | GenerateRequest, limits: RequestLimits) -> None:
    if len(req.inputs) > limits.max_inputs:
        raise LimitExceeded(f"{len(req.inputs)} inputs; the limit is {limits.max_inputs}", "inputs")
    check_composition(req.composition, limits)
    max_new = req.max_new_tokens if isinstance(req, GenerateRequest) else None
    if max_new is not None and max_new > limits.max_new_tokens:
        raise LimitExceeded(f"max_new_tokens {max_new} is over the limit {limits.max_new_tokens}", "max_new_tokens")


def check_labels(labels: list[str], limits: RequestLimits) -> None:
    if len(labels) > limits.max_labels:
        raise LimitExceeded(f"{len(labels)} labels; the limit is {limits.max_labels}")
    long = [x for x in labels if len(x) > limits.max_label_chars]
    if long:
        raise LimitExceeded(f"label {long[0][:40]!r}... is {len(long[0])} characters; the limit is "
                            f"{limits.max_label_chars}")
