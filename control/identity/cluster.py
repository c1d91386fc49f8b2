"""Identities of a cluster node: allocated in the cluster store (etcd), held per node.

A node holds one reference key per identity its endpoints use
(``identities/refs/<id>/<node>``, Cilium's "slave key"), bound to a lease of its own, and
counts its endpoints per identity in memory. So:

* an ADD whose label set the node already holds touches no store at all (it succeeds
  with etcd down); one that needs the store while etcd is unreachable fails at once with
  :class:`~ciliate.control.store.base.StoreUnavailableError` (the CNI's "try again later");
* a DEL never fails: dropping the node's last reference is retried in the background if
  the store is unreachable;
* a node that dies stops holding references when its lease expires, and
  :mod:`~ciliate.control.identity.gc` removes identities nobody holds after a grace period;
* when the store comes back, or lost data, or the lease had to be re-granted, a resync
  writes the node's references again -- and the identities themselves, if they were
  removed meanwhile (a node that holds an identity in its maps keeps its number);
* after an agent restart, :meth:`ClusterIdentities.restore` is told which identities the
  node's endpoints use (the endpoint records are the truth) and re-takes them.

A label set new to the node costs one round trip when it is new to the cluster too: the
identity's record, its index and the node's reference are created together if all are
absent, at a random id (``EtcdStore.create``). Otherwise (the label set exists, the id was
taken) a transaction reads and decides (``run_transaction``: optimistic, retried on
conflict; two round trips). Acquire and release are serialised per label set on this
node, so the threads of one node never conflict with each other on a reference key.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

from ciliate.control.identity.allocator import (
    DEFAULT_QUARANTINE,
    MIN_ALLOCATED_ID,
    RESERVED_IDENTITIES,
    Identity,
    IdentityAllocator,
    Labels,
    canonical_labels,
    check_labels,
    check_node_name,
    id_key,
    labels_key,
    new_identity,
    ref_key,
    reserved_identities,
    reserved_identity,
)
from ciliate.control.store import StoreClosedError, StoreError, StoreUnavailableError, Txn
from ciliate.control.store.base import encode_json

__all__ = [
    "DEFAULT_LEASE_TTL",
    "DEFAULT_RESYNC_INTERVAL",
    "ClusterIdentities",
    "ClusterIdentityStore",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# Seconds after a node's death until its references are gone.
DEFAULT_LEASE_TTL = 15
# Seconds between checks whether the node's references need writing again.
DEFAULT_RESYNC_INTERVAL = 2.0
# Seconds between full re-checks of every reference when nothing looked wrong (a lost
# lease or a failed write triggers one at once): a safety net, cheap for the store.
FULL_RESYNC_INTERVAL = 600.0
_STRIPES = 64


class ClusterIdentityStore(Protocol):
    """What cluster identities need of the store (EtcdStore provides it)."""

    def run_transaction(self, fn: Callable[[Txn], _T], *, retries: int = ...) -> _T: ...
    def lease(self, ttl: int) -> Any: ...


class _Creating(Protocol):
    def __call__(
        self, writes: Mapping[str, bytes], *, absent: Sequence[str], leases: Mapping[str, Any]
    ) -> bool: ...


class _LeaseTxn(Protocol):
    def put(self, key: str, value: bytes, *, lease: Any = None) -> None: ...


@dataclass
class _Held:
    """One identity this node uses: ``refs`` endpoints; ``written``: the lease id its
    reference key was last written with (``None``: no key, or deleted)."""

    identity_id: int
    labels: dict[str, str]
    canonical: str
    refs: int
    written: int | None


class ClusterIdentities:
    """The node's identities, allocated cluster-wide; see the module documentation.

    ``acquire``/``release`` have the signature of the node-local allocator (the endpoint
    manager calls both alike) but ignore the node's transaction (``transactional`` is
    false): their store is the cluster's.
    """

    transactional = False

    def __init__(
        self,
        store: ClusterIdentityStore,
        *,
        node: str,
        lease_ttl: int = DEFAULT_LEASE_TTL,
        resync_interval: float = DEFAULT_RESYNC_INTERVAL,
        quarantine: float = DEFAULT_QUARANTINE,
        retries: int = 50,
    ) -> None:
        self._store = store
        self.node = check_node_name(node)
        self._alloc = IdentityAllocator(None, node=node, quarantine=quarantine)
        self._lease_ttl = lease_ttl
        self._resync_interval = resync_interval
        self._retries = retries
        self._lock = threading.Lock()  # guards the maps below and the lease
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        self._held: dict[int, _Held] = {}
        self._by_labels: dict[str, int] = {}  # the id new endpoints of a label set get
        self._lease: Any = None
        self._synced_lease: int | None = None
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the endpoint manager's interface -------------------------------------------------

    def acquire(self, txn: Txn | None, labels: Labels) -> Identity:
        """The identity of ``labels``, with one more reference of this node. Raises
        :class:`StoreUnavailableError` when that needs the cluster store and it is down."""
        checked = check_labels(labels)
        canonical = canonical_labels(checked)
        if (reserved := reserved_identity(canonical, checked)) is not None:
            return reserved
        with self._stripe(canonical):
            with self._lock:
                held = self._held.get(self._by_labels.get(canonical, 0))
                if held is not None and (held.refs > 0 or held.written is not None):
                    # The node's key exists (or its deletion is still pending): no store.
                    held.refs += 1
                    return Identity(id=held.identity_id, labels=checked, refcount=held.refs)
            try:
                lease = self._ensure_lease()
                identity = self._create(checked, lease) or self._store.run_transaction(
                    lambda t: self._take(t, checked, lease), retries=self._retries
                )
            except StoreUnavailableError as exc:
                raise StoreUnavailableError(
                    f"no identity for labels {canonical!r}: the cluster store is unreachable "
                    f"({exc}); only label sets this node's pods already use can be served "
                    "now -- retry when etcd is back"
                ) from exc
            with self._lock:
                held = self._held.get(identity.id)
                if held is None:
                    held = _Held(identity.id, checked, canonical, 0, None)
                    self._held[identity.id] = held
                held.refs += 1
                held.written = lease.id
                self._by_labels[canonical] = identity.id
                return Identity(id=identity.id, labels=checked, refcount=held.refs)

    def release(self, txn: Txn | None, identity_id: int) -> bool:
        """Drop one reference of this node; ``True`` when it was the node's last one. Never
        raises for the store: a key that cannot be deleted now is deleted by the resync."""
        if identity_id in RESERVED_IDENTITIES:
            return False
        with self._lock:
            held = self._held.get(identity_id)
        if held is None:
            log.debug("identity %d released but not held by node %s", identity_id, self.node)
            return False
        with self._stripe(held.canonical):
            with self._lock:
                if held.refs <= 0:
                    return False  # a concurrent release took the last one
                held.refs -= 1
                if held.refs > 0:
                    return False
            try:
                self._drop(held)
            except StoreError as exc:
                log.warning(
                    "identity %d: could not drop node %s's reference (%s); retrying later",
                    identity_id,
                    self.node,
                    exc,
                )
                self._dirty.set()
        return True

    # -- restart and resync ---------------------------------------------------------------

    def restore(self, used: Iterable[tuple[int, Labels]]) -> None:
        """After a restart: the node's endpoints use these (identity id, labels); hold
        exactly them (one reference per endpoint) and write their keys again. Call before
        the first acquire; a store that is down now is caught up by the resync."""
        with self._lock:
            for identity_id, labels in used:
                if identity_id < MIN_ALLOCATED_ID:
                    continue  # reserved: not refcounted
                checked = check_labels(labels)
                held = self._held.get(identity_id)
                if held is None:
                    canonical = canonical_labels(checked)
                    held = _Held(identity_id, checked, canonical, 0, None)
                    self._held[identity_id] = held
                    current = self._held.get(self._by_labels.get(canonical, 0))
                    if current is None or current.refs == 0:
                        self._by_labels[canonical] = identity_id
                held.refs += 1
        try:
            self.resync()
        except StoreError as exc:
            log.warning("identities restored but not written yet (%s); retrying", exc)
            self._dirty.set()
            self._start_thread()

    def resync(self) -> None:
        """Make the store hold what this node holds: every identity it uses (revived if it
        was removed) with the node's reference under the current lease, and no reference
        for identities it no longer uses."""
        lease = self._ensure_lease()
        with self._lock:
            entries = list(self._held.values())
        for held in entries:
            with self._stripe(held.canonical):
                if held.refs > 0:
                    rewrite = functools.partial(self._rewrite, held=held, lease=lease)
                    self._store.run_transaction(rewrite, retries=self._retries)
                elif held.written is not None:
                    self._drop(held)
        self._synced_lease = lease.id

    # -- reads -------------------------------------------------------------------------------

    def get(self, identity_id: int) -> Identity | None:
        return self._store.run_transaction(lambda t: self._alloc.get(identity_id, txn=t))

    def list(self) -> builtins.list[Identity]:
        """Every identity in the cluster; with the store down, the ones this node holds."""
        try:
            return self._store.run_transaction(lambda t: self._alloc.list(txn=t))
        except StoreUnavailableError:
            with self._lock:
                held = [
                    Identity(id=h.identity_id, labels=dict(h.labels), refcount=h.refs)
                    for h in self._held.values()
                    if h.refs > 0
                ]
            return reserved_identities() + sorted(held, key=lambda i: i.id)

    def held(self) -> dict[int, int]:
        """Identity id -> this node's references (endpoints using it)."""
        with self._lock:
            return {i: h.refs for i, h in self._held.items() if h.refs > 0}

    def close(self) -> None:
        """Stop the resync thread and the lease keepalive (the keys expire after the TTL;
        a restarted agent writes them again)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)
        with self._lock:
            lease, self._lease = self._lease, None
        if lease is not None:
            with contextlib.suppress(Exception):
                lease.close()

    # -- internals ---------------------------------------------------------------------------

    def _stripe(self, canonical: str) -> threading.Lock:
        return self._stripes[hash(canonical) % _STRIPES]

    def _ensure_lease(self) -> Any:
        with self._lock:
            if self._lease is None:
                if self._stop.is_set():
                    raise StoreClosedError(f"identities of node {self.node} were closed")
                self._lease = self._store.lease(self._lease_ttl)
            lease = self._lease
        self._start_thread()
        return lease

    def _create(self, labels: dict[str, str], lease: Any) -> Identity | None:
        """The common case in one round trip, on a store that can create keys if absent:
        the label set is new and a random id is free. ``None`` otherwise (the label set
        exists, the id is taken or quarantined): then a transaction reads and decides."""
        create = cast(_Creating | None, getattr(self._store, "create", None))
        if create is None:
            return None
        candidate = self._alloc.draw()
        writes = {key: encode_json(doc) for key, doc in new_identity(labels, candidate).items()}
        ref = ref_key(candidate, self.node)
        writes[ref] = encode_json({"node": self.node})
        if not create(writes, absent=list(writes), leases={ref: lease}):
            return None
        return Identity(id=candidate, labels=labels, refcount=0)

    def _take(self, txn: Txn, labels: dict[str, str], lease: Any) -> Identity:
        identity = self._alloc.allocate(txn, labels)
        self._put_ref(txn, identity.id, lease)
        return identity

    def _put_ref(self, txn: Txn, identity_id: int, lease: Any) -> None:
        value = encode_json({"node": self.node})
        cast(_LeaseTxn, txn).put(ref_key(identity_id, self.node), value, lease=lease)

    def _rewrite(self, txn: Txn, *, held: _Held, lease: Any) -> None:
        ref = ref_key(held.identity_id, self.node)
        # Everything the checks below read, in one round trip.
        txn.get_many([id_key(held.identity_id), labels_key(held.canonical), ref])
        if not self._alloc.revive(txn, held.identity_id, held.labels):
            log.error(
                "identity %d of node %s now names other labels; its pods keep the old "
                "number until they are re-created",
                held.identity_id,
                self.node,
            )
            return
        if held.written != lease.id or txn.get(ref) is None:
            self._put_ref(txn, held.identity_id, lease)
            held.written = lease.id

    def _drop(self, held: _Held) -> None:
        """Delete the node's reference key (caller holds the stripe; refs is 0)."""
        key = ref_key(held.identity_id, self.node)
        self._store.run_transaction(lambda t: t.delete(key), retries=self._retries)
        with self._lock:
            if held.refs == 0:
                held.written = None
                self._held.pop(held.identity_id, None)
                if self._by_labels.get(held.canonical) == held.identity_id:
                    del self._by_labels[held.canonical]

    def _start_thread(self) -> None:
        with self._lock:
            if self._thread is not None or self._stop.is_set():
                return
            self._thread = threading.Thread(
                target=self._run, name=f"identities {self.node}", daemon=True
            )
        self._thread.start()

    def _run(self) -> None:
        next_full = time.monotonic() + FULL_RESYNC_INTERVAL
        while not self._stop.wait(self._resync_interval):
            with self._lock:
                lease = self._lease
            if lease is not None and getattr(lease, "closed", False):
                return  # the store was closed under us
            due = (
                self._dirty.is_set()
                or (lease is not None and lease.id != self._synced_lease)
                or time.monotonic() >= next_full
            )
            if not due:
                continue
            self._dirty.clear()
            try:
                self.resync()
                next_full = time.monotonic() + FULL_RESYNC_INTERVAL
            except StoreClosedError:
                return
            except StoreError as exc:
                log.info("identities of node %s not resynced yet: %s", self.node, exc)
                self._dirty.set()
