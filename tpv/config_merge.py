"""The one deep merge of config dicts (presets, YAML files, flags): a nested block overrides field by field, so a
flag that sets `backbone.device` keeps the file's `backbone.model`."""

from __future__ import annotations

from typing import Any


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` over `base`, recursing where both hold a dict; neither input is changed."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
