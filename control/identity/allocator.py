"""Security identities: the numeric id policy and the datapath use for a set of labels.

As in Cilium, every distinct label set maps to one numeric identity. Ids below 256 are
reserved with Cilium's numbering (1 host, 2 world, 3 unmanaged, 4 health, 5 init,
6 remote-node, 7 kube-apiserver, 8 ingress, 9 world-ipv4, 10 world-ipv6) and are never
stored; ids for label sets are allocated from 256 up to 65535 and persisted in the store.

Allocation without a hot key (Cilium's kvstore allocator): the label set's index key is
created with a create-if-absent transaction on a candidate id drawn at random, so two
allocations conflict only when they are for the same label set or draw the same id --
never merely because both allocate (an allocation cursor would make every pair conflict).
The transactions use nothing but get/put/delete, so the same code allocates on the
node's SQLite store and cluster-wide on etcd (whose optimistic commit turns every key
read into a compare: a key read as absent must still be absent).

References are per node (Cilium's "slave keys"): ``identities/refs/<id>/<node>``. On one
node (:class:`IdentityAllocator` used directly, inside the endpoint's own transaction)
the key counts the node's endpoints using the identity, and the last release removes
the identity. In a cluster (:class:`~ciliate.control.identity.cluster.ClusterIdentities`)
the node holds one key per identity, bound to its etcd lease, and counts its endpoints in
memory: a node that dies stops holding references when its lease expires, and
:mod:`~ciliate.control.identity.gc` removes identities nobody holds after a grace period.

A removed id is not deleted: its record becomes a *tombstone* that keeps the id out of
allocation until ``until`` (the quarantine), so no node that may still have the old
identity in its maps (policy, ipcache of remote endpoints) sees it name another label set.

Store keys (values are JSON):

* ``identities/id/<id>`` -> ``{"labels": {...}}``; a tombstone adds ``"until": <epoch s>``
* ``identities/labels/<canonical label string>`` -> ``{"id": n}``
* ``identities/refs/<id>/<node>`` -> ``{"refcount": n}`` (one node) or ``{"node": name}``
  (a cluster node, bound to its lease)

The canonical label string is the sorted ``key=value`` pairs joined with ``;``, each key
and value percent-encoded so that ``=``, ``;`` and ``%`` inside them stay unambiguous.
"""

from __future__ import annotations

import builtins
import random
import time
from collections.abc import Callable, Mapping
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
from ciliate.control.store import Json, JsonIn, Reader, StoreDataError, Txn, decode_json

__all__ = [
    "DEFAULT_QUARANTINE",
    "ID_PREFIX",
    "LABELS_PREFIX",
    "LOCAL_NODE",
    "MAX_ALLOCATED_ID",
    "MIN_ALLOCATED_ID",
    "REFS_PREFIX",
    "RESERVED_IDENTITIES",
    "CniArgsError",
    "IdRecord",
    "Identity",
    "IdentityAllocator",
    "IdentityError",
    "IdentityExhaustedError",
    "IdentityLabelsError",
    "IdentityNotFoundError",
    "Labels",
    "canonical_labels",
    "check_labels",
    "check_node_name",
    "id_key",
    "labels_key",
    "new_identity",
    "parse_id",
    "read_record",
    "ref_count",
    "ref_key",
    "refs_prefix",
    "reserved_identities",
    "reserved_identity",
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
REFS_PREFIX = "identities/refs/"

# The node name of a single-node agent's references.
LOCAL_NODE = "local"
# Seconds a removed id stays out of allocation: longer than any node takes to drop a
# deleted endpoint from its maps, and than a partitioned node takes to notice.
DEFAULT_QUARANTINE = 900.0
# Random candidates tried before listing the used ids: with fewer than half of the
# 65280 ids in use, 16 draws all hit used ids with probability < 2**-16.
RANDOM_PROBES = 16

_SAFE = ":/"  # kept readable in canonical strings; quote() already keeps A-Za-z0-9_.-~


class IdentityNotFoundError(IdentityError, LookupError):
    """The identity id is not allocated."""


class IdentityExhaustedError(IdentityError):
    """Every id from MIN_ALLOCATED_ID to MAX_ALLOCATED_ID is in use or quarantined."""


@dataclass(frozen=True)
class Identity:
    """One security identity. Reserved identities are not refcounted (``refcount`` 0).

    ``refcount``: from :meth:`IdentityAllocator.acquire`, the references the acquiring
    node now holds; from ``get``/``lookup``/``list``, the references every node holds
    (one per cluster node, or a single node's endpoint count)."""

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


def check_labels(labels: Labels) -> dict[str, str]:
    """The label set as a plain dict, or :class:`IdentityLabelsError` saying what is wrong."""
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


def reserved_identity(canonical: str, checked: Mapping[str, str]) -> Identity | None:
    """The reserved identity a (checked, canonical) label set names, ``None`` for a
    workload's; a workload label set may not carry reserved labels."""
    if (reserved := _RESERVED_BY_CANONICAL.get(canonical)) is not None:
        return _reserved(reserved)
    if any(key.startswith(RESERVED_SOURCE) for key in checked):
        raise IdentityLabelsError(
            f"labels {canonical!r} mix reserved labels with others; reserved labels "
            "belong to the agent, not to workloads"
        )
    return None


def reserved_identities() -> list[Identity]:
    """Every reserved identity, by id."""
    return [_reserved(i) for i in sorted(RESERVED_IDENTITIES)]


def check_node_name(node: str) -> str:
    if not isinstance(node, str) or not node or "/" in node or not node.isprintable():
        raise ValueError(f"node names are non-empty printable strings without '/', not {node!r}")
    return node


def _reserved_id(name: str) -> int:
    return next(i for i, n in RESERVED_IDENTITIES.items() if n == name)


def id_key(identity_id: int) -> str:
    return f"{ID_PREFIX}{identity_id}"


def labels_key(canonical: str) -> str:
    return f"{LABELS_PREFIX}{canonical}"


def refs_prefix(identity_id: int) -> str:
    return f"{REFS_PREFIX}{identity_id}/"


def ref_key(identity_id: int, node: str) -> str:
    return f"{refs_prefix(identity_id)}{node}"


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


@dataclass(frozen=True)
class IdRecord:
    """What ``identities/id/<id>`` holds: the labels, and for a tombstone (a removed id in
    quarantine) the time until which the id may not be handed out again."""

    labels: dict[str, str]
    until: float | None = None

    @property
    def tombstone(self) -> bool:
        return self.until is not None

    @classmethod
    def parse(cls, key: str, doc: Json) -> IdRecord:
        until = doc.get("until") if isinstance(doc, dict) else None
        if until is not None and (not isinstance(until, int | float) or isinstance(until, bool)):
            raise StoreDataError(f"identity record {key!r} has a non-numeric 'until': {doc!r}")
        return cls(labels=_labels_field(key, doc), until=None if until is None else float(until))


def new_identity(labels: Mapping[str, str], identity_id: int) -> dict[str, JsonIn]:
    """The keys a new identity is made of: its record and its label index."""
    return {
        id_key(identity_id): {"labels": dict(labels)},
        labels_key(canonical_labels(labels)): {"id": identity_id},
    }


def read_record(reader: Reader, identity_id: int) -> IdRecord | None:
    key = id_key(identity_id)
    doc = reader.get_json(key)
    return None if doc is None else IdRecord.parse(key, doc)


def parse_id(key: str, prefix: str) -> int:
    try:
        return int(key[len(prefix) :].split("/", 1)[0])
    except ValueError as exc:
        raise StoreDataError(f"identity key {key!r} does not name a numeric id") from exc


def ref_count(key: str, raw: bytes) -> int:
    """How many references one ref key stands for (a cluster node's key: one)."""
    doc = decode_json(key, raw)
    if isinstance(doc, dict) and "refcount" in doc:
        return _int_field(key, doc, "refcount")
    return 1


class IdentityAllocator:
    """Maps label sets to numeric identities, persistently; see the module documentation.

    Keeps no state of its own: every call reads the transaction (or committed store data),
    so rolled-back transactions leave nothing behind and several allocators over one
    store agree. ``store`` serves reads outside a transaction (``None``: every call
    passes ``txn``). ``node`` names the references :meth:`acquire` takes (one node: the
    default); ``quarantine`` is how long a removed id stays out of allocation; ``clock``
    (wall-clock seconds, shared by every node) and ``rng`` are for tests.
    """

    # Acquire and release take part in the caller's (the endpoint's) transaction.
    transactional = True

    def __init__(
        self,
        store: Reader | None,
        *,
        node: str = LOCAL_NODE,
        quarantine: float = DEFAULT_QUARANTINE,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        if quarantine < 0:
            raise ValueError("the quarantine must not be negative")
        self._store = store
        self.node = check_node_name(node)
        self.quarantine = quarantine
        self._clock = clock
        self._rng = rng or random.Random()

    # -- one node: references counted in the store ---------------------------------------

    def acquire(self, txn: Txn, labels: Labels) -> Identity:
        """The identity of ``labels``, allocating it if new; takes one reference of this
        node (in ``txn``). The label set of a reserved identity (``{"reserved:host": ""}``)
        gets that identity, which is not refcounted."""
        identity = self.allocate(txn, labels)
        if identity.reserved:
            return identity
        count = self._node_count(txn, identity.id) + 1
        txn.put_json(ref_key(identity.id, self.node), {"refcount": count})
        return Identity(id=identity.id, labels=identity.labels, refcount=count)

    def release(self, txn: Txn, identity_id: int) -> bool:
        """Drop one reference of this node (in ``txn``); when no node holds the identity
        any more it is removed (its id quarantined) and the answer is ``True``. Releasing
        a reserved identity does nothing (``False``); releasing an id this node holds no
        reference to raises :class:`IdentityNotFoundError`."""
        if identity_id in RESERVED_IDENTITIES:
            return False
        key = ref_key(identity_id, self.node)
        count = self._node_count(txn, identity_id) - 1
        if count < 0:
            raise IdentityNotFoundError(
                f"identity {identity_id} is not allocated to node {self.node!r}"
            )
        if count > 0:
            txn.put_json(key, {"refcount": count})
            return False
        txn.delete(key)
        if txn.list(refs_prefix(identity_id)):
            return False  # other nodes still hold it
        return self.remove(txn, identity_id)

    def _node_count(self, txn: Txn, identity_id: int) -> int:
        """This node's references to the identity (0: none)."""
        key = ref_key(identity_id, self.node)
        raw = txn.get(key)
        if raw is not None:
            return ref_count(key, raw)
        if self.node != LOCAL_NODE:
            return 0
        # A store written before references were per node kept one node's count in the
        # identity's record: take it over (the record loses it).
        record_key = id_key(identity_id)
        doc = txn.get_json(record_key)
        legacy = doc.get("refcount") if isinstance(doc, dict) else None
        if not isinstance(legacy, int) or isinstance(legacy, bool) or legacy <= 0:
            return 0
        txn.put_json(record_key, {"labels": _labels_field(record_key, doc)})
        return legacy

    # -- the building blocks (also for cluster nodes and the GC) -------------------------

    def allocate(self, txn: Txn, labels: Labels) -> Identity:
        """The identity of ``labels``, created (at a free random id) if there is none;
        takes no reference. ``refcount`` of the answer is 0."""
        checked = check_labels(labels)
        canonical = canonical_labels(checked)
        if (reserved := reserved_identity(canonical, checked)) is not None:
            return reserved
        index = labels_key(canonical)
        # The index and a first candidate id in one read (one round trip on etcd).
        candidate = self.draw()
        raw_index, _ = txn.get_many([index, id_key(candidate)])
        doc = decode_json(index, raw_index)
        if doc is not None:
            identity_id = _int_field(index, doc, "id")
            record = read_record(txn, identity_id)
            if record is None or record.tombstone or record.labels != checked:
                raise StoreDataError(
                    f"identity index {index!r} points at id {identity_id}, which holds "
                    f"{_describe(record)}"
                )
            return Identity(id=identity_id, labels=checked, refcount=0)
        identity_id = self._free_id(txn, first=candidate)
        for key, value in new_identity(checked, identity_id).items():
            txn.put_json(key, value)
        return Identity(id=identity_id, labels=checked, refcount=0)

    def draw(self) -> int:
        """A candidate id, at random from the whole range (free or not)."""
        return self._rng.randint(MIN_ALLOCATED_ID, MAX_ALLOCATED_ID)

    def revive(self, txn: Txn, identity_id: int, labels: Labels) -> bool:
        """Make ``identity_id`` name ``labels`` again (a node that held it while the store
        lost it, or the GC removed it, writes it back): recreate its record if it is
        missing or a tombstone of the same labels, and its index if the label set has
        none. ``False`` (and nothing written) if the id names other labels meanwhile."""
        checked = check_labels(labels)
        record = read_record(txn, identity_id)
        if record is not None and record.labels != checked and not _expired(record, self._clock()):
            return False  # another label set's, live or still in quarantine
        if record is None or record.tombstone or record.labels != checked:
            txn.put_json(id_key(identity_id), {"labels": checked})
        index = labels_key(canonical_labels(checked))
        if txn.get(index) is None:
            txn.put_json(index, {"id": identity_id})
        return True

    def remove(self, txn: Txn, identity_id: int) -> bool:
        """Remove the identity (in ``txn``): its index goes, its record becomes a
        tombstone until the quarantine ends. ``False`` if it was not live."""
        record = read_record(txn, identity_id)
        if record is None or record.tombstone:
            return False
        index = labels_key(canonical_labels(record.labels))
        doc = txn.get_json(index)
        if doc is not None and _int_field(index, doc, "id") == identity_id:
            txn.delete(index)
        txn.put_json(
            id_key(identity_id),
            {"labels": record.labels, "until": self._clock() + self.quarantine},
        )
        return True

    # -- reads -----------------------------------------------------------------------------

    def get(self, identity_id: int, *, txn: Txn | None = None) -> Identity | None:
        """The identity with this id (reserved or allocated), ``None`` if there is none."""
        if identity_id in RESERVED_IDENTITIES:
            return _reserved(identity_id)
        reader = self._reader(txn)
        record = read_record(reader, identity_id)
        if record is None or record.tombstone:
            return None
        refs = sum(ref_count(k, v) for k, v in reader.list(refs_prefix(identity_id)))
        return Identity(id=identity_id, labels=record.labels, refcount=refs)

    def lookup(self, labels: Labels, *, txn: Txn | None = None) -> Identity | None:
        """The identity of ``labels`` if it exists, without taking a reference."""
        checked = check_labels(labels)
        canonical = canonical_labels(checked)
        if (reserved := reserved_identity(canonical, checked)) is not None:
            return reserved
        key = labels_key(canonical)
        reader = self._reader(txn)
        doc = reader.get_json(key)
        return None if doc is None else self.get(_int_field(key, doc, "id"), txn=txn)

    def list(self, *, txn: Txn | None = None) -> builtins.list[Identity]:
        """Every identity by id: the reserved ones (marked) first, then the allocated."""
        reader = self._reader(txn)
        refs: dict[int, int] = {}
        for key, raw in reader.list(REFS_PREFIX):
            identity_id = parse_id(key, REFS_PREFIX)
            refs[identity_id] = refs.get(identity_id, 0) + ref_count(key, raw)
        allocated = []
        for key, raw in reader.list(ID_PREFIX):
            record = IdRecord.parse(key, decode_json(key, raw))
            if not record.tombstone:
                identity_id = parse_id(key, ID_PREFIX)
                allocated.append(
                    Identity(
                        id=identity_id, labels=record.labels, refcount=refs.get(identity_id, 0)
                    )
                )
        allocated.sort(key=lambda identity: identity.id)
        return reserved_identities() + allocated

    def _reader(self, txn: Txn | None) -> Reader:
        if txn is not None:
            return txn
        if self._store is None:
            raise TypeError("this allocator has no store of its own: pass txn=")
        return self._store

    # -- choosing an id --------------------------------------------------------------------

    def _free_id(self, txn: Txn, *, first: int) -> int:
        """A random id that is neither live nor quarantined, trying ``first`` first.
        Random draws (each read is one key, so concurrent allocations rarely touch the
        same keys); when the range is crowded, one listing of every record."""
        low, high = MIN_ALLOCATED_ID, MAX_ALLOCATED_ID
        now = self._clock()
        for probe in range(RANDOM_PROBES):
            candidate = first if probe == 0 else self._rng.randint(low, high)
            record = read_record(txn, candidate)
            if record is None or _expired(record, now):
                return candidate
        taken = set()
        for key, raw in txn.list(ID_PREFIX):
            if not _expired(IdRecord.parse(key, decode_json(key, raw)), now):
                taken.add(parse_id(key, ID_PREFIX))
        free = [i for i in range(low, high + 1) if i not in taken]
        if not free:
            raise IdentityExhaustedError(
                f"all {high - low + 1} identities ({low}..{high}) are in use or quarantined "
                "after removal; too many distinct label sets -- drop per-pod labels that "
                "make every pod unique"
            )
        return self._rng.choice(free)


def _expired(record: IdRecord, now: float) -> bool:
    return record.until is not None and record.until <= now


def _describe(record: IdRecord | None) -> str:
    if record is None:
        return "nothing"
    return f"{record.labels} (removed)" if record.tombstone else str(record.labels)
