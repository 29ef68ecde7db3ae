"""The one rule for names that become path components and URL fields (tasks, vector ids, compositions, backbones).

ASCII letters, digits, '.', '_', '-'; starts with a letter or digit; no '..'; at most 128 characters. Checked with a
full match, so a trailing newline or any other character is refused. `Name` is the pydantic type of the same rule.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, StringConstraints, WithJsonSchema

from tpv.errors import InvalidInput

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
MAX_NAME_LEN = 128
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class InvalidName(InvalidInput):
    """A name that breaks the rule above."""


def validate_name(name: object, what: str = "name") -> str:
    """Return `name` unchanged when it follows the rule, else raise InvalidName saying why."""
    if not isinstance(name, str) or not name:
        raise InvalidName(f"{what} must be a non-empty string, got {name!r}")
    if len(name) > MAX_NAME_LEN or not _NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidName(
            f"invalid {what} {name[:80]!r}: use letters, digits, '.', '_', '-' (no leading '.', no '..', "
            f"no path separators, at most {MAX_NAME_LEN} characters)"
        )
    return name


Name = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_NAME_LEN),
    AfterValidator(validate_name),
    WithJsonSchema({"type": "string", "pattern": NAME_PATTERN, "maxLength": MAX_NAME_LEN}),
]
"""A store name as a pydantic field type (InvalidName is a ValueError, so pydantic reports it as a field error)."""
