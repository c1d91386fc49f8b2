"""Helpers for the tables of upstream validation cases: an object is built from a
valid base by upstream's own tweaks, and the answer is compared by field path, as
upstream's tests count errors (and here also name them)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from ciliate.control.objects import ObjectInvalidError, validate

Tweak = Callable[[dict[str, Any]], None]


def build(base: dict[str, Any], *tweaks: Tweak) -> dict[str, Any]:
    document = copy.deepcopy(base)
    for tweak in tweaks:
        tweak(document)
    return document


def error_paths(document: dict[str, Any]) -> list[str]:
    """The paths of every field error ``validate`` reports ([] when it is valid)."""
    try:
        validate(document)
    except ObjectInvalidError as exc:
        return sorted(e.path for e in exc.errors)
    return []


def errors_text(document: dict[str, Any]) -> list[str]:
    try:
        validate(document)
    except ObjectInvalidError as exc:
        return [str(e) for e in exc.errors]
    return []
