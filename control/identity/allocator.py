"""Security identities: the numeric id policy and the datapath use for a set of labels.

As in Cilium, every distinct label set (a pod's namespace, name and configured labels)
maps to one numeric identity. Ids below 256 are reserved with Cilium's numbering (1 host,
2 world, 3 unmanaged, 4 health, 5 init, 6 remote-node, 7 kube-apiserver, 8 ingress,
9 world-ipv4, 10 world-ipv6) and are never stored; ids for label sets are allocated from
256 up to 65535, reference-counted by the endpoints using them, and persisted in the
store so they survive agent restarts. A freed id is reused only after the allocation
cursor has gone round the whole range, so stale policy or flow state about the old
owner cannot apply to a new one.

The allocation logic uses nothing but transaction get/put/delete, so the same code can
allocate cluster-wide on an etcd store with optimistic transactions.

Store keys (values are JSON):

* ``identities/id/<id>`` -> ``{"labels": {...}, "refcount": n}``
* ``identities/labels/<canonical label string>`` -> ``{"id": n}``
* ``identities/cursor`` -> ``{"id": <last id allocated>}``

The canonical label string is the sorted ``key=value`` pairs joined with ``;``, each key
and value percent-encoded so that ``=``, ``;`` and ``%`` inside them stay unambiguous.
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from urllib.parse import quote

from ciliate.control.identity.labels import (
    RESERVED_SOURCE,
    CniArgsError,
    IdentityError,
    IdentityLabelsError,
    Labels,
)
from ciliate.control.store import Json, Reader, Store, StoreDataError, Txn, decode_json

__all__ = [
    "MAX_ALLOCATED_ID",
    "MIN_ALLOCATED_ID",
    "RESERVED_IDENTITIES",
    "CniArgsError",
    "Identity",
    "IdentityAllocator",
    "IdentityError",
    "IdentityExhaustedError",
    "IdentityLabelsError",
    "IdentityNotFoundError",
    "Labels",
    "canonical_labels",
]

# Cilium's pkg/identity numbering.
RESERVED_IDENTITIES: Mapping[int, str] = MappingProxyType(
    {
        1: "host",
        2: "world",
        3: "unmanaged",
        4: "health",
        5: "init",
        6: "remote-node",
        7: "kube-apiserver",
        8: "ingress",
        9: "world-ipv4",
        10: "world-ipv6",
    }
)
MIN_ALLOCATED_ID = 256
# Cilium's cluster-local range: 16 bits; the bits above carry the cluster id.
MAX_ALLOCATED_ID = 0xFFFF

ID_PREFIX = "identities/id/"
LABELS_PREFIX = "identities/labels/"
CURSOR_KEY = "identities/cursor"

_SAFE = ":/"  # kept readable in canonical strings; quote() already keeps A-Za-z0-9_.-~


class IdentityNotFoundError(IdentityError, LookupError):
    """The identity id is not allocated."""


class IdentityExhaustedError(IdentityError):
    """Every id from MIN_ALLOCATED_ID to MAX_ALLOCATED_ID is in use."""


@dataclass(frozen=True)
class Identity:
    """One security identity. Reserved identities are not refcounted (``refcount`` 0)."""

    id: int
    labels: dict[str, str]
    refcount: int
    reserved: bool = False

    def __hash__(self) -> int:
        # The generated hash would fail on the dict field; the id decides identity anyway.
        return hash((self.id, self.refcount, self.reserved, tuple(sorted(self.labels.items()))))


def _reserved(identity_id: int) -> Identity:
    return Identity(
        id=identity_id,
        labels={f"{RESERVED_SOURCE}{RESERVED_IDENTITIES[identity_id]}": ""},
        refcount=0,
        reserved=True,
    )


def canonical_labels(labels: Labels) -> str:
    """The order-independent string form of a label set (the store key suffix)."""
    return ";".join(
        f"{quote(key, safe=_SAFE)}={quote(value, safe=_SAFE)}"
        for key, value in sorted(labels.items())
    )


_RESERVED_BY_CANONICAL: Mapping[str, int] = MappingProxyType(
    {canonical_labels(_reserved(i).labels): i for i in RESERVED_IDENTITIES}
)


def _check_labels(labels: Labels) -> dict[str, str]:
    if not isinstance(labels, Mapping):
        raise IdentityLabelsError(f"labels must be a mapping, not {type(labels).__name__}")
    checked: dict[str, str] = {}
    for key, value in labels.items():
        if not isinstance(key, str) or not key:
            raise IdentityLabelsError(f"label keys must be non-empty strings, not {key!r}")
        if not isinstance(value, str):
            raise IdentityLabelsError(f"label {key!r} has a non-string value {value!r}")
        checked[key] = value
    if not checked:
        raise IdentityLabelsError(
            "an empty label set has no identity of its own; endpoints without labels "
            f"use the reserved init identity ({_reserved_id('init')})"
        )
    return checked


def _reserved_id(name: str) -> int:
    return next(i for i, n in RESERVED_IDENTITIES.items() if n == name)


def _id_key(identity_id: int) -> str:
    return f"{ID_PREFIX}{identity_id}"


def _int_field(key: str, doc: Json, name: str) -> int:
    value = doc.get(name) if isinstance(doc, dict) else None
    if not isinstance(value, int) or isinstance(value, bool):
        raise StoreDataError(f"identity record {key!r} has no integer {name!r}: {doc!r}")
    return value


def _labels_field(key: str, doc: Json) -> dict[str, str]:
    value = doc.get("labels") if isinstance(doc, dict) else None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise StoreDataError(f"identity record {key!r} has no string labels: {doc!r}")
    return {k: v for k, v in value.items() if isinstance(v, str)}


def _load(reader: Reader, identity_id: int) -> Identity | None:
    key = _id_key(identity_id)
    doc = reader.get_json(key)
    return None if doc is None else _from_doc(key, identity_id, doc)


def _from_doc(key: str, identity_id: int, doc: Json) -> Identity:
    return Identity(
        id=identity_id, labels=_labels_field(key, doc), refcount=_int_field(key, doc, "refcount")
    )


def _save(txn: Txn, identity: Identity) -> None:
    txn.put_json(_id_key(identity.id), {"labels": identity.labels, "refcount": identity.refcount})


class IdentityAllocator:
    """Maps label sets to numeric identities, persistently; see the module documentation.

    Keeps no state of its own: every call reads the transaction (or committed store data),
    so rolled-back transactions leave nothing behind and several allocators over one
    store agree.
    """

    def __init__(self, store: Store) -> None:
        self._store = store

    def acquire(self, txn: Txn, labels: Labels) -> Identity:
        """The identity of ``labels``, allocating it if new; takes one reference (in
        ``txn``). The label set of a reserved identity (``{"reserved:host": ""}``) gets
        that identity, which is not refcounted."""
        checked = _check_labels(labels)
        canonical = canonical_labels(checked)
        if (reserved := _RESERVED_BY_CANONICAL.get(canonical)) is not None:
            return _reserved(reserved)
        if any(key.startswith(RESERVED_SOURCE) for key in checked):
            raise IdentityLabelsError(
                f"labels {canonical!r} mix reserved labels with others; reserved labels "
                "belong to the agent, not to workloads"
            )
        labels_key = f"{LABELS_PREFIX}{canonical}"
        doc = txn.get_json(labels_key)
        if doc is not None:
            identity_id = _int_field(labels_key, doc, "id")
            current = _load(txn, identity_id)
            if current is None or current.labels != checked:
                raise StoreDataError(
                    f"identity index {labels_key!r} points at id {identity_id}, which "
                    f"holds {current.labels if current else 'nothing'}"
                )
            updated = Identity(id=identity_id, labels=checked, refcount=current.refcount + 1)
        else:
            updated = Identity(id=self._next_free_id(txn), labels=checked, refcount=1)
            txn.put_json(labels_key, {"id": updated.id})
            txn.put_json(CURSOR_KEY, {"id": updated.id})
        _save(txn, updated)
        return updated

    def release(self, txn: Txn, identity_id: int) -> bool:
        """Drop one reference (in ``txn``); ``True`` if it was the last one and the id was
        freed. Releasing a reserved identity does nothing (``False``); releasing an id
        that is not allocated raises :class:`IdentityNotFoundError`."""
        if identity_id in RESERVED_IDENTITIES:
            return False
        current = _load(txn, identity_id)
        if current is None:
            raise IdentityNotFoundError(f"identity {identity_id} is not allocated")
        if current.refcount > 1:
            _save(
                txn, Identity(id=identity_id, labels=current.labels, refcount=current.refcount - 1)
            )
            return False
        txn.delete(_id_key(identity_id))
        txn.delete(f"{LABELS_PREFIX}{canonical_labels(current.labels)}")
        return True

    def get(self, identity_id: int, *, txn: Txn | None = None) -> Identity | None:
        """The identity with this id (reserved or allocated), ``None`` if there is none."""
        if identity_id in RESERVED_IDENTITIES:
            return _reserved(identity_id)
        return _load(self._reader(txn), identity_id)

    def lookup(self, labels: Labels, *, txn: Txn | None = None) -> Identity | None:
        """The identity of ``labels`` if it exists, without taking a reference."""
        checked = _check_labels(labels)
        canonical = canonical_labels(checked)
        if (reserved := _RESERVED_BY_CANONICAL.get(canonical)) is not None:
            return _reserved(reserved)
        key = f"{LABELS_PREFIX}{canonical}"
        reader = self._reader(txn)
        doc = reader.get_json(key)
        return None if doc is None else _load(reader, _int_field(key, doc, "id"))

    def list(self, *, txn: Txn | None = None) -> builtins.list[Identity]:
        """Every identity by id: the reserved ones (marked) first, then the allocated."""
        reader = self._reader(txn)
        allocated = []
        for key, raw in reader.list(ID_PREFIX):
            try:
                identity_id = int(key[len(ID_PREFIX) :])
            except ValueError as exc:
                raise StoreDataError(f"identity key {key!r} does not end in a number") from exc
            allocated.append(_from_doc(key, identity_id, decode_json(key, raw)))
        allocated.sort(key=lambda identity: identity.id)
        return [_reserved(i) for i in sorted(RESERVED_IDENTITIES)] + allocated

    def _reader(self, txn: Txn | None) -> Reader:
        return self._store if txn is None else txn

    def _next_free_id(self, txn: Txn) -> int:
        cursor_doc = txn.get_json(CURSOR_KEY)
        last = MIN_ALLOCATED_ID - 1
        if cursor_doc is not None:
            last = _int_field(CURSOR_KEY, cursor_doc, "id")
        span = MAX_ALLOCATED_ID - MIN_ALLOCATED_ID + 1
        # Start after the last id handed out and go round once: freed ids come back last.
        for step in range(1, span + 1):
            candidate = MIN_ALLOCATED_ID + (last - MIN_ALLOCATED_ID + step) % span
            if txn.get(_id_key(candidate)) is None:
                return candidate
        raise IdentityExhaustedError(
            f"all {span} identities ({MIN_ALLOCATED_ID}..{MAX_ALLOCATED_ID}) are in use; "
            "too many distinct label sets -- drop per-pod labels that make every pod unique"
        )
