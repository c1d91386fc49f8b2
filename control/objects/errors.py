"""The errors of the object layer, shaped like the Kubernetes API server's.

::

    ObjectsError
    ├── DocumentError        the input is not YAML/JSON objects (names the document)
    ├── ObjectInvalidError   one object failed validation (a list of FieldError)
    ├── UnknownKindError     kind/apiVersion this store does not keep
    ├── ObjectNotFoundError  get/delete of an object that is not there
    ├── NamespaceNotFoundError  a namespaced object whose Namespace does not exist
    ├── ForbiddenError       an operation the API server forbids (deleting ``default``)
    └── RangeFullError       no ClusterIP or NodePort left to allocate
"""

from __future__ import annotations

import json
from dataclasses import dataclass

__all__ = [
    "DocumentError",
    "FieldError",
    "ForbiddenError",
    "NamespaceNotFoundError",
    "ObjectInvalidError",
    "ObjectNotFoundError",
    "ObjectsError",
    "RangeFullError",
    "UnknownKindError",
]


class ObjectsError(Exception):
    """Base class of every object-layer error."""


class DocumentError(ObjectsError, ValueError):
    """The input does not parse as Kubernetes objects."""


class UnknownKindError(ObjectsError, ValueError):
    """A kind (or kind name on the command line) this store does not keep."""


class ObjectNotFoundError(ObjectsError, LookupError):
    """The object does not exist."""


class NamespaceNotFoundError(ObjectsError, LookupError):
    """A namespaced object refers to a Namespace that does not exist."""


class ForbiddenError(ObjectsError, PermissionError):
    """What the API server answers 403 to, such as deleting an immortal Namespace."""


class RangeFullError(ObjectsError):
    """Every ClusterIP of the service range (or every NodePort) is in use: a server
    side condition, not a fault of the object (the API server answers 500)."""


@dataclass(frozen=True)
class FieldError:
    """One field's problem, in the API server's words: ``path: Type: detail``.

    ``kind`` is one of the API server's error types: ``Required value``,
    ``Invalid value``, ``Unsupported value``, ``Forbidden``, ``Duplicate value``.
    """

    path: str
    kind: str
    detail: str
    value: object = None

    def __str__(self) -> str:
        # field.Error's format: the value for the value-bearing types, and no trailing
        # ": " when there is no detail (``spec.ports: Required value``).
        parts = [self.path, self.kind]
        if self.kind in ("Invalid value", "Unsupported value", "Duplicate value"):
            parts.append(json.dumps(self.value, default=str))
        if self.detail:
            parts.append(self.detail)
        return ": ".join(parts)


class ObjectInvalidError(ObjectsError, ValueError):
    """An object failed validation; ``errors`` names every field at fault."""

    def __init__(self, *, kind: str, name: str, errors: list[FieldError]) -> None:
        self.kind = kind
        self.name = name
        self.errors = list(errors)
        # errors.NewInvalid's words: one error as it is, several as an aggregate "[a, b]".
        joined = ", ".join(str(e) for e in self.errors)
        shown = joined if len(self.errors) == 1 else f"[{joined}]"
        super().__init__(f'{kind} "{name}" is invalid: {shown}')
