"""Kubernetes-shaped cluster objects (Namespace, Pod, NetworkPolicy,
CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, Service, EndpointSlice):
parsing, validation as the API server does it, ClusterIP and NodePort allocation,
and their keys in a store. Cilium learns these from the
Kubernetes API; ciliate keeps them itself (SQLite on one node, etcd for a cluster).
"""

from ciliate.control.objects.allocation import (
    DEFAULT_SERVICE_RANGE,
    configure_service_range,
    parse_service_range,
)
from ciliate.control.objects.errors import (
    DocumentError,
    FieldError,
    ForbiddenError,
    NamespaceNotFoundError,
    ObjectInvalidError,
    ObjectNotFoundError,
    ObjectsError,
    RangeFullError,
    UnknownKindError,
)
from ciliate.control.objects.kinds import KINDS, Kind, resolve_kind
from ciliate.control.objects.parse import MAX_MANIFEST_BYTES, decode_manifest, load_documents
from ciliate.control.objects.store import ApplyResult, ObjectRef, ObjectStore, object_key, parse_key
from ciliate.control.objects.validation import validate

__all__ = [
    "DEFAULT_SERVICE_RANGE",
    "KINDS",
    "MAX_MANIFEST_BYTES",
    "ApplyResult",
    "DocumentError",
    "FieldError",
    "ForbiddenError",
    "Kind",
    "NamespaceNotFoundError",
    "ObjectInvalidError",
    "ObjectNotFoundError",
    "ObjectRef",
    "ObjectStore",
    "ObjectsError",
    "RangeFullError",
    "UnknownKindError",
    "configure_service_range",
    "decode_manifest",
    "load_documents",
    "object_key",
    "parse_key",
    "parse_service_range",
    "resolve_kind",
    "validate",
]
