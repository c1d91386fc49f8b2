"""Reading objects as ``kubectl apply -f`` does: YAML or JSON, several documents
(``---``), a ``List`` (``kind: List``, or any ``...List`` with ``items``), empty
documents skipped."""

from __future__ import annotations

import json
from typing import Any

import yaml

from ciliate.control.objects.errors import DocumentError

__all__ = ["load_documents"]


def load_documents(text: str, *, source: str = "<stdin>") -> list[dict[str, Any]]:
    """Every object in ``text`` in order, ``List`` items flattened."""
    try:
        if text.lstrip().startswith(("{", "[")):
            # JSON is YAML too, but json gives better positions for JSON input.
            loaded = json.loads(text)
            documents = loaded if isinstance(loaded, list) else [loaded]
        else:
            documents = list(yaml.safe_load_all(text))
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise DocumentError(f"{source}: not valid YAML or JSON: {exc}") from exc
    objects: list[dict[str, Any]] = []
    for number, document in enumerate(documents, start=1):
        if document is None:
            continue  # an empty document between two `---`
        if not isinstance(document, dict):
            raise DocumentError(
                f"{source}: document {number} is a {type(document).__name__}, not an object "
                "with apiVersion and kind"
            )
        if _is_list(document):
            items = document.get("items") or []
            if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
                raise DocumentError(f"{source}: document {number}: List items must be objects")
            objects.extend(items)
            continue
        if "kind" not in document or "apiVersion" not in document:
            missing = "kind" if "kind" not in document else "apiVersion"
            raise DocumentError(f"{source}: document {number}: Object '{missing}' is missing")
        objects.append(document)
    return objects


def _is_list(document: dict[str, Any]) -> bool:
    kind = document.get("kind")
    return isinstance(kind, str) and kind.endswith("List") and "items" in document
