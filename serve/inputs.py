"""Request inputs -> the texts the model reads (templates filled), with the character limit on THAT text.

The rendered length is computed from the template's pieces before anything is rendered, so a template that
repeats a field many times cannot build a huge string: it is refused first. Token counts are the model
deployment's job (it has the tokenizer, and counts off its event loop).
"""

from __future__ import annotations

import string
from typing import Any

from tpv.errors import InvalidInput
from tpv.tasks import TaskSpec
from tpv.tasks.spec import template_fields, truncate


class InputError(InvalidInput):
    """An input that does not fit its template, or a rendered input over the limit."""


def pick_template(template: str | None, task: TaskSpec | None, inputs: list[Any]) -> str:
    """The request's template, else the task's, else '{text}' ('{text} {text_pair}' for pairs)."""
    if template is not None:
        return template
    if task is not None:
        return task.template
    pair = any(isinstance(x, list) and len(x) == 2 for x in inputs)
    return "{text} {text_pair}" if pair else "{text}"


def _row(i: int, item: Any, fields: list[str]) -> dict[str, str]:
    if isinstance(item, str):
        if len(fields) != 1:
            raise InputError(f"inputs[{i}] is one text but the template needs fields {fields}: send a list of "
                             f"{len(fields)} texts or an object with those keys")
        return {fields[0]: item}
    if isinstance(item, list):
        if len(item) != len(fields):
            raise InputError(f"inputs[{i}] has {len(item)} texts; the template needs {len(fields)}: {fields}")
        return dict(zip(fields, item))
    if set(item) != set(fields):
        raise InputError(f"inputs[{i}] has keys {sorted(item)}; the template needs {fields}")
    return dict(item)


def rendered_length(template: str, row: dict[str, str]) -> int:
    """len(template.format(**row)) without building the string."""
    return sum(len(literal) + (len(row[name]) if name is not None else 0)
               for literal, name, _, _ in string.Formatter().parse(template))


def render(inputs: list[Any], template: str, task: TaskSpec | None, max_chars: int) -> list[str]:
    """Each input with the template filled; InputError when one does not fit or is over `max_chars` rendered."""
    try:
        fields = template_fields(template)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    use_task = task is not None and template == task.template
    sources = []
    for i, item in enumerate(inputs):
        row = _row(i, item, fields)
        if use_task:  # the task cuts its fields to their max_chars first, as in training
            row = {f: truncate(v, task.max_chars.get(f)) for f, v in row.items()}
        n = rendered_length(template, row)
        if n > max_chars:
            raise InputError(f"inputs[{i}] is {n} characters with the template filled; the limit is {max_chars}")
        sources.append(template.format(**row))
    return sources
