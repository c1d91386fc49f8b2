"""Kubernetes-shaped cluster objects (Namespace, Pod, NetworkPolicy,
CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy): parsing, validation as the
API server does it, and their keys in a store. Cilium learns these from the
Kubernetes API; ciliate keeps them itself (SQLite on one node, etcd for a cluster).
"""

from ciliate.control.objects.errors import (
    DocumentError,
    FieldError,
    NamespaceNotFoundError,
    ObjectInvalidError,
    ObjectNotFoundError,
    ObjectsError,
    UnknownKindError,
)
from ciliate.control.objects.kinds import KINDS, Kind, resolve_kind
from ciliate.control.objects.parse import load_documents
from ciliate.control.objects.store import ApplyResult, ObjectRef, ObjectStore, object_key, parse_key
from ciliate.control.objects.validation import validate

__all__ = [
    "KINDS",
    "ApplyResult",
    "DocumentError",
    "FieldError",
    "Kind",
    "NamespaceNotFoundError",
    "ObjectInvalidError",
    "ObjectNotFoundError",
    "ObjectRef",
    "ObjectStore",
    "ObjectsError",
    "UnknownKindError",
    "load_documents",
    "object_key",
    "parse_key",
    "resolve_kind",
    "validate",
]
