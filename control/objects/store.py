"""Objects in a :class:`~ciliate.control.store.Store`: apply, get, list, delete.

The same code keeps them in the agent's SQLite store (one node) and in etcd (a
cluster, where every agent watches the ``objects/`` prefix). Keys::

    objects/<kind>/<namespace>/<name>    namespaced kinds (pod, networkpolicy, ...)
    objects/<kind>/<name>                cluster-scoped kinds (namespace, ...)
    objects-meta/revision                the last resourceVersion handed out

Values are the validated objects as JSON, with ``metadata.uid``,
``metadata.creationTimestamp``, ``metadata.resourceVersion`` (a counter shared by
every object, so it orders all writes as Kubernetes' does) and
``metadata.generation`` (bumped when anything but metadata changes).

``apply`` is all or nothing: every document is validated first, then all are
written in one transaction (re-run on an etcd conflict). A namespaced object needs
its Namespace to exist (or to come earlier in the same apply); ``default`` exists
implicitly, as in Kubernetes. Deleting a Namespace deletes what is in it.
"""

from __future__ import annotations

import builtins
import copy
import datetime
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ciliate.control.objects.allocation import admit_service, release_service
from ciliate.control.objects.errors import (
    ForbiddenError,
    NamespaceNotFoundError,
    ObjectNotFoundError,
)
from ciliate.control.objects.kinds import KINDS, Kind, kind_for_document
from ciliate.control.objects.validation import validate
from ciliate.control.store import Store, StoreConflictError, StoreDataError, Txn, decode_json

__all__ = [
    "PREFIX",
    "REVISION_KEY",
    "ApplyResult",
    "ObjectRef",
    "ObjectStore",
    "object_key",
    "parse_key",
]

PREFIX = "objects/"
REVISION_KEY = "objects-meta/revision"
DEFAULT_NAMESPACE = "default"
# The NamespaceLifecycle admission plugin's immortal namespaces: never deleted.
IMMORTAL_NAMESPACES = ("default", "kube-system", "kube-public")
_SERVER_FIELDS = ("uid", "resourceVersion", "generation", "creationTimestamp")
_CONFLICT_RETRIES = 10
_T = TypeVar("_T")


@dataclass(frozen=True)
class ObjectRef:
    kind: Kind
    name: str
    namespace: str | None = None

    @property
    def key(self) -> str:
        return object_key(self.kind, name=self.name, namespace=self.namespace)

    def __str__(self) -> str:
        where = f' in namespace "{self.namespace}"' if self.namespace else ""
        return f'{self.kind.qualified} "{self.name}"{where}'


@dataclass(frozen=True)
class ApplyResult:
    ref: ObjectRef
    action: str  # created | configured | unchanged | deleted

    def __str__(self) -> str:
        return f"{self.ref.kind.qualified}/{self.ref.name} {self.action}"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.ref.kind.name,
            "namespace": self.ref.namespace,
            "name": self.ref.name,
            "action": self.action,
        }


def object_key(kind: Kind, *, name: str, namespace: str | None) -> str:
    if kind.namespaced:
        return f"{PREFIX}{kind.key}/{namespace or DEFAULT_NAMESPACE}/{name}"
    return f"{PREFIX}{kind.key}/{name}"


_BY_KEY = {k.key: k for k in KINDS.values()}


def parse_key(key: str) -> ObjectRef | None:
    """The object a store key names (``None`` for keys that are not objects)."""
    if not key.startswith(PREFIX):
        return None
    parts = key[len(PREFIX) :].split("/")
    kind = _BY_KEY.get(parts[0])
    if kind is None or len(parts) != (3 if kind.namespaced else 2):
        return None
    if kind.namespaced:
        return ObjectRef(kind, name=parts[2], namespace=parts[1])
    return ObjectRef(kind, name=parts[1])


def _ref_of(obj: Mapping[str, Any]) -> ObjectRef:
    kind = kind_for_document(kind=obj.get("kind"), api_version=obj.get("apiVersion"))
    meta = obj["metadata"]
    return ObjectRef(kind, name=meta["name"], namespace=meta.get("namespace"))


def _without_server_fields(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in obj["metadata"].items() if k not in _SERVER_FIELDS}
    return {**obj, "metadata": meta}


def _spec_part(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


class ObjectStore:
    """Kubernetes-shaped objects in a transactional key-value store."""

    def __init__(self, store: Store) -> None:
        self._store = store

    # -- writes ---------------------------------------------------------------------

    def apply(self, documents: Sequence[Mapping[str, Any]]) -> list[ApplyResult]:
        """Create or replace each object (validated first; one transaction)."""
        objects = [validate(document) for document in documents]
        # Each attempt starts from the validated objects: a retried transaction must not
        # see what the lost attempt filled in (a ClusterIP it had picked, a uid).
        return self._run(lambda txn: [self._apply_one(txn, copy.deepcopy(obj)) for obj in objects])

    def delete(
        self, refs: Sequence[ObjectRef], *, ignore_missing: bool = False
    ) -> list[ApplyResult]:
        """Delete each object (one transaction); a missing one raises
        :class:`ObjectNotFoundError` unless ``ignore_missing``."""
        return self._run(
            lambda txn: [
                r for ref in refs if (r := self._delete_one(txn, ref, ignore_missing)) is not None
            ]
        )

    def refs_of(self, documents: Sequence[Mapping[str, Any]]) -> list[ObjectRef]:
        """The objects ``documents`` name (for ``delete -f``): only kind, name, namespace
        are read, as kubectl does."""
        refs = []
        for document in documents:
            kind = kind_for_document(
                kind=document.get("kind"), api_version=document.get("apiVersion")
            )
            raw_meta = document.get("metadata")
            meta: Mapping[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
            name = meta.get("name")
            if not isinstance(name, str) or not name:
                raise ObjectNotFoundError(f"a {kind.name} without metadata.name cannot be deleted")
            namespace = meta.get("namespace") if kind.namespaced else None
            refs.append(
                ObjectRef(
                    kind,
                    name=name,
                    namespace=namespace or (DEFAULT_NAMESPACE if kind.namespaced else None),
                )
            )
        return refs

    def _run(self, fn: Callable[[Txn], _T]) -> _T:
        attempt = 0
        while True:
            try:
                with self._store.transaction() as txn:
                    return fn(txn)
            except StoreConflictError:
                attempt += 1
                if attempt > _CONFLICT_RETRIES:
                    raise
                # Every apply writes the revision key, so concurrent applies all conflict:
                # a random pause, doubling up to 0.2 s, keeps the losers from meeting
                # again at once (a linear one let 4 busy writers run out of retries).
                time.sleep(random.uniform(0, min(0.2, 0.005 * 2**attempt)))

    def _next_revision(self, txn: Txn) -> int:
        doc = txn.get_json(REVISION_KEY)
        current = doc.get("revision") if isinstance(doc, dict) else 0
        if not isinstance(current, int):
            raise StoreDataError(f"{REVISION_KEY} holds {doc!r}, not a revision")
        txn.put_json(REVISION_KEY, {"revision": current + 1})
        return current + 1

    def _apply_one(self, txn: Txn, obj: dict[str, Any]) -> ApplyResult:
        ref = _ref_of(obj)
        if ref.kind.namespaced:
            self._require_namespace(txn, ref)
        stored = txn.get_json(ref.key)
        current: dict[str, Any] | None = stored if isinstance(stored, dict) else None
        if ref.kind.name == "Service":
            # ClusterIP and NodePorts: kept from the stored Service or allocated, in this
            # transaction, so two applies never take one address.
            admit_service(txn, obj, current)
        elif ref.kind.name == "Namespace" and current is not None:
            # The namespace strategy's PrepareForUpdate: finalizers and status change only
            # through their own subresources, never through an apply.
            obj["spec"] = current.get("spec") or obj["spec"]
            obj["status"] = current.get("status") or obj["status"]
        if current is not None and _without_server_fields(current) == obj:
            return ApplyResult(ref, "unchanged")
        meta = obj["metadata"]
        if current is not None:
            old: dict[str, Any] = current["metadata"]
            meta["uid"] = old.get("uid")
            meta["creationTimestamp"] = old.get("creationTimestamp")
            generation = int(old.get("generation", 1))
            meta["generation"] = generation + (_spec_part(current) != _spec_part(obj))
            action = "configured"
        else:
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = (
                datetime.datetime.now(datetime.UTC)
                .replace(microsecond=0)
                .isoformat()
                .replace("+00:00", "Z")
            )
            meta["generation"] = 1
            action = "created"
        meta["resourceVersion"] = str(self._next_revision(txn))
        txn.put_json(ref.key, obj)
        return ApplyResult(ref, action)

    def _require_namespace(self, txn: Txn, ref: ObjectRef) -> None:
        namespace_kind = KINDS["Namespace"]
        key = object_key(namespace_kind, name=ref.namespace or DEFAULT_NAMESPACE, namespace=None)
        if txn.get(key) is not None:
            return
        if ref.namespace == DEFAULT_NAMESPACE:
            self._apply_one(
                txn,
                validate(
                    {
                        "apiVersion": "v1",
                        "kind": "Namespace",
                        "metadata": {"name": DEFAULT_NAMESPACE},
                    }
                ),
            )
            return
        raise NamespaceNotFoundError(
            f'namespaces "{ref.namespace}" not found: apply the Namespace before {ref} '
            "(or earlier in the same file)"
        )

    def _delete_one(self, txn: Txn, ref: ObjectRef, ignore_missing: bool) -> ApplyResult | None:
        if ref.kind.name == "Namespace" and ref.name in IMMORTAL_NAMESPACES:
            raise ForbiddenError(
                f'namespaces "{ref.name}" is forbidden: this namespace may not be deleted'
            )
        if ref.kind.name == "Service":
            stored = txn.get_json(ref.key)
            if isinstance(stored, dict):
                release_service(txn, stored)
        elif ref.kind.name == "Namespace":
            service_kind = KINDS["Service"]
            for key, _ in txn.list(f"{PREFIX}{service_kind.key}/{ref.name}/"):
                stored = txn.get_json(key)
                if isinstance(stored, dict):
                    release_service(txn, stored)
        if not txn.delete(ref.key):
            if ignore_missing:
                return None
            raise ObjectNotFoundError(f"{ref} not found")
        self._next_revision(txn)
        if ref.kind.name == "Namespace":
            for kind in KINDS.values():
                if kind.namespaced:
                    txn.delete_prefix(f"{PREFIX}{kind.key}/{ref.name}/")
        return ApplyResult(ref, "deleted")

    # -- reads ----------------------------------------------------------------------

    def get(self, kind: Kind, *, name: str, namespace: str | None = None) -> dict[str, Any]:
        ref = ObjectRef(
            kind, name=name, namespace=(namespace or DEFAULT_NAMESPACE) if kind.namespaced else None
        )
        doc = self._store.get_json(ref.key)
        if not isinstance(doc, dict):
            raise ObjectNotFoundError(f"{ref} not found")
        return doc

    def list(self, kind: Kind, *, namespace: str | None = None) -> list[dict[str, Any]]:
        """Every object of ``kind`` (in ``namespace`` if given), by namespace and name."""
        prefix = f"{PREFIX}{kind.key}/"
        if kind.namespaced and namespace is not None:
            prefix += f"{namespace}/"
        objects = []
        for key, raw in self._store.list(prefix):
            if parse_key(key) is None:
                continue
            doc = decode_json(key, raw)
            if not isinstance(doc, dict):
                raise StoreDataError(f"object {key!r} is not a JSON object")
            objects.append(doc)
        return objects

    def snapshot(
        self, kinds: Iterable[str] | None = None
    ) -> dict[str, builtins.list[dict[str, Any]]]:
        """Every object of every kind (or of ``kinds``), by kind name (what the policy
        engine reads; it needs no Services nor EndpointSlices)."""
        names = KINDS if kinds is None else kinds
        return {name: self.list(KINDS[name]) for name in names}
