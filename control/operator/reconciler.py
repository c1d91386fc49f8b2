"""The operator's reconciler: cluster-pool IPAM for the whole cluster (DESIGN.md, point 3).

The operator hands every node its pod CIDRs. It watches the node objects the agents
register in the cluster store and writes, for each, the IPAM object the agent reads:

* ``cluster/nodes/<name>`` -- written by the node's agent (``{"name", "nodeIP"}``);
  the key disappearing means the node is gone.
* ``cluster/ipam/<name>`` -- written only by the operator:
  ``{"podCIDRs": [IPv4 CIDR, IPv6 CIDR], "status": {"error": null | "why"}}``.

The allocator is :class:`~ciliate.control.ipam.ClusterPool`, kept in memory; the store
is the truth. Every reconcile first makes the pool match the stored IPAM objects (on the
first pass this is the restore: every CIDR nodes already hold is re-occupied), and only
then hands out new CIDRs, so restarting the operator at any point keeps every existing
CIDR and duplicates none.

Behaviours chosen:

* **A stored CIDR that no longer fits the configuration** (outside every cluster CIDR after
  one was removed, of a family no longer configured, or overlapping another node's) is
  *kept*: the node's object keeps its ``podCIDRs`` and ``status.error`` says what is wrong.
  The node's pods are numbered from that CIDR and its agent has programmed it into the
  datapath; handing the node a new CIDR would renumber it under running pods, and the
  agent only reads its CIDRs when it starts. The operator never hands such a node a second
  CIDR of the same family either. The way out is the administrator's: put the cluster
  CIDR back (the error clears on the next reconcile), or drain the node and re-register
  it (deleting ``cluster/nodes/<name>`` releases the object; the new registration gets a
  fresh CIDR). CIDRs of the node that do fit stay reserved, so they are never handed to
  another node. Of two nodes claiming overlapping CIDRs, the first in key order keeps
  them; the second is flagged, and re-claims them as soon as the first is deleted (before
  any new node can be given that block).
* **Exhaustion**: a node for which no CIDR is left gets ``{"podCIDRs": [], "status":
  {"error": <the PoolExhaustedError message>}}`` (or keeps the family it has, when only
  a newly configured family is exhausted). It is retried on every reconcile: at once
  when a node is deleted (the release and the retry happen in the same pass), and on
  every periodic resync.
* **A family added to the configuration** (IPv6 switched on) is allocated to existing
  nodes that lack it; their existing CIDRs are untouched.
* **A malformed IPAM object** (not JSON, wrong shape) is logged and replaced by a fresh
  allocation: only the operator writes these objects, so it holds nothing to keep.

Concurrency (only one operator should run, but two must never give one CIDR to two
nodes): the pool is in memory, so before allocating an operator must know every CIDR any
other operator handed out. Each batch of writes is one store transaction that first reads
the operator-private key ``cluster/operator/ipam-fence``; every transaction that changes an
IPAM object also rewrites it (with a value unique to this operator and write). If the
fence is not the value this operator last wrote or synced at, another writer got in
between: the transaction is abandoned, the IPAM objects are re-listed (fence read first,
then the list), and the batch is retried. A fence that has not moved proves every
node's current IPAM object is the one the pool was synced with, so that is the check of
the current object; the one other read is a released node's ``cluster/nodes/`` key (a
node that re-registered meanwhile keeps its CIDRs). On SQLite
(``BEGIN IMMEDIATE``) transactions serialise; on etcd (``run_transaction``, re-run on
optimistic conflict) the fence read makes any two allocating transactions conflict. The
fence costs one key per transaction instead of listing (and, on etcd, comparing) every
IPAM object in every transaction, which etcd's ``--max-txn-ops`` would refuse beyond a
few hundred nodes. When a transaction fails or is re-run, the in-memory pool is rebuilt
from the store rather than patched, so a lost attempt can leak nothing. (IPAM objects
edited by hand, without the fence, are picked up by the next full reconcile.)

Triggering: with a store that has ``watch_prefix`` (etcd), events on ``cluster/nodes/``
drive reconciles of the named nodes; otherwise the store revision is polled. Either way
a full resync runs every ``resync_interval`` seconds so a missed event cannot stick.

Node loss (``node_grace_period``): every agent keeps ``cluster/alive/<name>`` bound to
its etcd lease, so the key goes when the lease expires (the agent's ``lease_ttl``, 10 s,
after its last keepalive). A registered node without it for ``node_grace_period``
seconds in a row is *lost*: the operator removes what the node wrote (its object,
liveness, BGP state and endpoints, in one transaction that re-checks the liveness key,
so a node that came back meanwhile stays), then releases its pod CIDRs as for any
deleted node; every agent's watch drops the node's CIDR and endpoints from its
ipcache, and the node's agent, if it is only cut off and comes back, withdraws its
routes. The clock starts when this operator first sees the key missing (a restarted
operator starts the grace periods again, which only delays a removal). The ToR drops
the node's route by itself: its BGP hold timer, or the graceful-restart time when the
node's session closed without a NOTIFICATION.

A released node's CIDRs are remembered (``cluster/operator/released/<name>``): when a
node of that name registers again and they are still free, it gets them back.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from ciliate.control.cluster import keys
from ciliate.control.ipam import ClusterPool, PoolError, PoolExhaustedError
from ciliate.control.store.base import (
    JsonIn,
    KeyValues,
    StoreConflictError,
    StoreError,
    StoreUnavailableError,
    decode_json,
    encode_json,
)

__all__ = [
    "FENCE_KEY",
    "IPAM_PREFIX",
    "NODES_PREFIX",
    "Operator",
    "OperatorStore",
    "OperatorTxn",
    "ReconcileResult",
    "Watch",
    "WatchEvent",
    "ipam_key",
    "node_key",
]

log = logging.getLogger("ciliate.operator")

NODES_PREFIX = keys.NODES
IPAM_PREFIX = keys.IPAM
# Operator-private (no agent reads it): every transaction that changes IPAM objects
# rewrites it, and every one reads it first; see "Concurrency" above.
FENCE_KEY = "cluster/operator/ipam-fence"

# Nodes per transaction. An optimistic store (etcd) compares every key a transaction
# read -- the fence, plus 2 per released node -- and writes one key per node plus the
# fence; etcd allows 128 of each by default (--max-txn-ops). SQLite takes a write lock
# for the whole transaction instead, so bigger batches only mean fewer commits.
OPTIMISTIC_BATCH = 60
LOCKING_BATCH = 1000
# How often a transaction may find the fence moved (another writer) before giving up.
MAX_RESYNCS = 20


def node_key(node: str) -> str:
    return NODES_PREFIX + node


def ipam_key(node: str) -> str:
    return IPAM_PREFIX + node


# -- what the operator needs from a store ------------------------------------------------


class OperatorTxn(Protocol):
    """The part of :class:`~ciliate.control.store.base.Txn` the operator uses."""

    def get(self, key: str) -> bytes | None: ...

    def list(self, prefix: str) -> KeyValues: ...

    def put(self, key: str, value: bytes) -> None: ...

    def delete(self, key: str) -> bool: ...


class OperatorStore(Protocol):
    """The part of :class:`~ciliate.control.store.base.Store` the operator uses.

    Optional, detected with ``hasattr``: ``run_transaction(fn, retries=...)`` (used for
    every write when present) and ``watch_prefix(prefix, start_revision=None)`` (event-driven
    reconciles instead of polling :meth:`revision`).
    """

    def get(self, key: str) -> bytes | None: ...

    def list(self, prefix: str) -> KeyValues: ...

    def revision(self) -> int: ...

    def transaction(self) -> AbstractContextManager[OperatorTxn]: ...


class WatchEvent(Protocol):
    """One event of a ``watch_prefix`` stream."""

    @property
    def type(self) -> str:
        """``"PUT"``, ``"DELETE"`` or ``"RESYNC"`` (history lost: re-list everything)."""
        ...

    @property
    def key(self) -> str: ...


class Watch(Protocol):
    def get(self, timeout: float | None = None) -> WatchEvent | None:
        """The next event, or ``None`` when ``timeout`` passes without one."""
        ...

    def close(self) -> None: ...


# -- the IPAM object ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Stored:
    """A parsed ``cluster/ipam/<node>`` object."""

    cidrs: tuple[str, ...]
    error: str | None
    malformed: bool = False


def _parse_ipam(key: str, raw: bytes) -> _Stored:
    try:
        value = decode_json(key, raw)
    except StoreError as exc:
        log.warning("%s: %s; it will be replaced", key, exc)
        return _Stored((), None, malformed=True)
    if isinstance(value, dict):
        cidrs = value.get("podCIDRs")
        status = value.get("status")
        error = status.get("error") if isinstance(status, dict) else None
        if isinstance(cidrs, list) and all(isinstance(c, str) for c in cidrs):
            return _Stored(tuple(str(c) for c in cidrs), error if isinstance(error, str) else None)
    log.warning("%s is not an IPAM object (%r); it will be replaced", key, raw[:200])
    return _Stored((), None, malformed=True)


def _ipam_object(cidrs: Sequence[str], error: str | None) -> JsonIn:
    return {"podCIDRs": list(cidrs), "status": {"error": error}}


def _normalize(cidr: str) -> str:
    try:
        return str(ipaddress.ip_network(cidr.strip(), strict=False))
    except ValueError:
        return cidr


# -- the operator -------------------------------------------------------------------------


@dataclass
class ReconcileResult:
    """What one reconcile changed in the store."""

    allocated: dict[str, list[str]] = field(default_factory=dict)
    """Nodes that were given CIDRs in this pass, with all the CIDRs they now hold."""
    released: dict[str, list[str]] = field(default_factory=dict)
    """Deleted nodes whose CIDRs went back to the pool (and whose IPAM object was deleted)."""
    restored: dict[str, list[str]] = field(default_factory=dict)
    """Nodes that registered again and got back the CIDRs they held before (also in
    ``allocated``)."""
    exhausted: dict[str, str] = field(default_factory=dict)
    """Nodes left without (some) CIDRs because the pool is full, with the reason."""
    conflicts: dict[str, str] = field(default_factory=dict)
    """Nodes whose stored CIDRs do not fit the configuration (kept), with the reason."""
    writes: int = 0
    """Keys put or deleted."""

    def merge(self, other: ReconcileResult) -> None:
        self.allocated.update(other.allocated)
        self.released.update(other.released)
        self.restored.update(other.restored)
        self.exhausted.update(other.exhausted)
        self.conflicts.update(other.conflicts)
        self.writes += other.writes


_RELEASE = "release"
_UPDATE = "update"


class _FenceMoved(Exception):
    """Another writer changed IPAM objects since the pool was last synced."""


class Operator:
    """Cluster-pool IPAM over a cluster store; see the module documentation.

    ``reconcile_once()`` runs one full pass; ``reconcile_nodes(names)`` one pass over the
    named nodes; ``run(stop_event)`` loops in the foreground until the event is set;
    ``start()`` does a first pass synchronously and then runs the loop in a thread until
    ``stop()``.
    """

    def __init__(
        self,
        store: OperatorStore,
        pool: ClusterPool,
        *,
        resync_interval: float = 30.0,
        poll_interval: float = 1.0,
        batch_size: int | None = None,
        retries: int = 5,
        node_grace_period: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if resync_interval <= 0 or poll_interval <= 0:
            raise ValueError("resync_interval and poll_interval must be positive")
        if node_grace_period is not None and node_grace_period < 0:
            raise ValueError("node_grace_period must be 0 or more seconds (None: off)")
        if batch_size is None:
            optimistic = hasattr(store, "run_transaction")
            batch_size = OPTIMISTIC_BATCH if optimistic else LOCKING_BATCH
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self._store = store
        self._pool = pool
        self._resync_interval = resync_interval
        self._poll_interval = poll_interval
        self._batch_size = batch_size
        self._retries = retries
        self._id = f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"
        self._serial = 0
        self._families = tuple(
            version
            for version, nets in ((4, pool.ipv4_cidrs), (6, pool.ipv6_cidrs))
            if nets  # a configured family
        )
        self._lock = threading.RLock()
        # The stored IPAM objects the pool reflects: node -> (raw bytes, parsed).
        self._synced: dict[str, tuple[bytes, _Stored]] = {}
        # Nodes whose stored CIDRs could not all be occupied: node -> why (kept, flagged).
        self._conflicts: dict[str, str] = {}
        # Nodes the pool had nothing left for on their last attempt.
        self._waiting: set[str] = set()
        # The pool was changed inside a transaction that has not committed yet.
        self._dirty = False
        # The fence value the pool is in sync with (valid: it was read, then the objects).
        self._fence: bytes | None = None
        self._fence_valid = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Node loss: when each registered node was first seen without its liveness key.
        self._node_grace_period = node_grace_period
        self._clock = clock
        self._lost_since: dict[str, float] = {}

    @property
    def pool(self) -> ClusterPool:
        return self._pool

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> ReconcileResult:
        """Restore and reconcile once (errors surface here), then keep reconciling in a
        background thread until :meth:`stop`."""
        if self._thread is not None:
            raise RuntimeError("operator already started")
        result = self.reconcile_once()
        self._stop.clear()
        # The loop starts with a full pass of its own (a no-op unless something changed
        # since): whatever happens before its watch exists is not missed.
        self._thread = threading.Thread(
            target=self.run, args=(self._stop,), name="ciliate-operator", daemon=True
        )
        self._thread.start()
        return result

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the thread :meth:`start` began (no-op if not started)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        thread.join(timeout)

    def run(self, stop: threading.Event) -> None:
        """Reconcile until ``stop`` is set: on watch events (or revision changes, with a
        store that cannot watch) and every ``resync_interval`` seconds."""
        watch_prefix: Callable[[str], Watch] | None = getattr(self._store, "watch_prefix", None)
        if watch_prefix is not None:
            self._run_watching(stop, watch_prefix)
        else:
            self._run_polling(stop)

    def _run_polling(self, stop: threading.Event) -> None:
        last_revision: int | None = None
        next_resync = 0.0
        while not stop.is_set():
            revision = self._revision()
            now = time.monotonic()
            due = revision != last_revision or now >= next_resync
            if revision is not None and due and self._guarded(self.reconcile_once):
                last_revision = revision
                next_resync = now + self._resync_interval
            self._collect_lost_guarded()
            stop.wait(self._poll_interval)

    def _run_watching(self, stop: threading.Event, watch_prefix: Callable[[str], Watch]) -> None:
        backoff = 0.5
        need_full = True
        while not stop.is_set():
            try:
                # Watch first, then list: nothing written in between can be missed.
                watch = watch_prefix(NODES_PREFIX)
            except StoreError as exc:
                log.warning("cannot watch %s (%s); retrying in %.1f s", NODES_PREFIX, exc, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            try:
                if need_full and not self._guarded(self.reconcile_once):
                    stop.wait(backoff)
                    continue
                need_full = False
                backoff = 0.5
                next_resync = time.monotonic() + self._resync_interval
                while not stop.is_set():
                    wait = min(max(next_resync - time.monotonic(), 0.0), 1.0)
                    events = self._next_events(watch, wait)
                    if not events and getattr(watch, "closed", False):
                        raise StoreUnavailableError(f"the watch on {NODES_PREFIX} ended")
                    if any(event.type == "RESYNC" for event in events):
                        log.info("watch on %s lost history; full resync", NODES_PREFIX)
                        next_resync = 0.0
                    elif events:
                        names = {
                            event.key[len(NODES_PREFIX) :]
                            for event in events
                            if event.key.startswith(NODES_PREFIX)
                        }
                        if not self._guarded(functools.partial(self.reconcile_nodes, names)):
                            next_resync = 0.0  # catch up with a full pass
                    if time.monotonic() >= next_resync:
                        if self._guarded(self.reconcile_once):
                            next_resync = time.monotonic() + self._resync_interval
                        else:
                            stop.wait(backoff)
                    # At most a second apart (the event wait above): the grace periods
                    # end on time without a watch of their own.
                    self._collect_lost_guarded()
            except StoreError as exc:
                log.warning("watch on %s failed (%s); re-watching", NODES_PREFIX, exc)
                need_full = True
                stop.wait(backoff)
            finally:
                watch.close()

    @staticmethod
    def _next_events(watch: Watch, timeout: float) -> list[WatchEvent]:
        """The next event, and whatever else arrived with it (a burst, one reconcile)."""
        events: list[WatchEvent] = []
        wait = timeout
        while len(events) < 1000:
            try:
                event = watch.get(wait)
            except (TimeoutError, queue.Empty):
                event = None
            if event is None:
                break
            events.append(event)
            wait = 0.05  # coalesce a burst of registrations
        return events

    def _revision(self) -> int | None:
        try:
            return self._store.revision()
        except StoreError as exc:
            log.warning("cannot read the store revision: %s", exc)
            return None

    def _guarded(self, reconcile: Callable[[], ReconcileResult]) -> bool:
        """Run one reconcile; a store failure is logged (the loop retries), not raised."""
        try:
            reconcile()
        except StoreError as exc:
            log.warning("reconcile failed, will retry: %s", exc)
            return False
        return True

    # -- node loss ------------------------------------------------------------------------

    def _collect_lost_guarded(self) -> None:
        if self._node_grace_period is None:
            return
        try:
            self.collect_lost_nodes()
        except StoreError as exc:
            log.warning("looking for lost nodes failed, will retry: %s", exc)

    def collect_lost_nodes(self) -> list[str]:
        """Remove the nodes whose liveness key has been missing for the grace period
        (see "Node loss" above) and release their CIDRs; the names removed."""
        grace = self._node_grace_period
        if grace is None:
            return []
        now = self._clock()
        registered = {key[len(keys.NODES) :] for key, _ in self._store.list(keys.NODES)}
        alive = {key[len(keys.ALIVE) :] for key, _ in self._store.list(keys.ALIVE)}
        missing = registered - alive
        for name in list(self._lost_since):
            if name not in missing:
                del self._lost_since[name]  # back, or deleted by someone else
        for name in sorted(missing):
            if name not in self._lost_since:
                self._lost_since[name] = now
                log.warning(
                    "node %s has no liveness key (its lease expired): removing it in %.0f s "
                    "unless it comes back",
                    name,
                    grace,
                )
        due = sorted(name for name, since in self._lost_since.items() if now - since >= grace)
        removed: list[str] = []
        for name in due:
            outcome: list[int] = []

            def remove(txn: OperatorTxn, name: str = name, outcome: list[int] = outcome) -> None:
                outcome.clear()
                # Re-read in the transaction: a node that renewed its liveness (or was
                # deleted) since the listing makes it conflict or do nothing.
                if txn.get(keys.ALIVE + name) is None and txn.get(keys.NODES + name) is not None:
                    outcome.append(keys.remove_node(txn, name))

            self._run_transaction(remove)
            del self._lost_since[name]
            if outcome:
                removed.append(name)
                log.warning(
                    "node %s lost (no liveness for %.0f s): removed it and its %d endpoints",
                    name,
                    grace,
                    outcome[0],
                )
        if removed:
            self.reconcile_nodes(removed)  # free the CIDRs now, not at the watch event
        return removed

    # -- reconciling ----------------------------------------------------------------------

    def reconcile_once(self) -> ReconcileResult:
        """One full pass: restore from the stored IPAM objects, release the CIDRs of
        deleted nodes, then allocate for every node that lacks (some) CIDRs."""
        with self._lock:
            node_entries = self._store.list(NODES_PREFIX)
            names = [key[len(NODES_PREFIX) :] for key, _ in node_entries]
            self._resync()  # restore before anything else
            present = set(names)
            releases = sorted(node for node in self._synced if node not in present)
            updates = [node for node in names if node and self._needs_update(node)]
            return self._apply(releases, updates)

    def reconcile_nodes(self, names: Iterable[str]) -> ReconcileResult:
        """One pass over ``names`` only (watch events); each is re-read in the transaction."""
        with self._lock:
            releases: list[str] = []
            updates: list[str] = []
            for name in sorted(set(names)):
                if not name:
                    continue
                if self._store.get(node_key(name)) is None:
                    releases.append(name)
                else:
                    updates.append(name)
            return self._apply(releases, updates)

    def _needs_update(self, node: str) -> bool:
        synced = self._synced.get(node)
        if synced is None:
            return True
        stored = synced[1]
        if stored.error is not None or stored.malformed or not stored.cidrs:
            return True
        if node in self._conflicts:
            return True
        return bool(self._missing_families(node))

    def _missing_families(self, node: str) -> list[int]:
        held = self._pool.node_cidrs(node)
        have = {net.version for net in held.cidrs} if held else set()
        return [version for version in self._families if version not in have]

    def _apply(self, releases: list[str], updates: list[str]) -> ReconcileResult:
        result = ReconcileResult()
        for start in range(0, len(releases), self._batch_size):
            chunk = [(_RELEASE, node) for node in releases[start : start + self._batch_size]]
            result.merge(self._transact(chunk))
        if result.released:
            # Capacity came back (or a conflicting claim went away): retry the waiting.
            queued = set(updates)
            updates = updates + sorted((self._waiting | set(self._conflicts)) - queued)
        for start in range(0, len(updates), self._batch_size):
            chunk = [(_UPDATE, node) for node in updates[start : start + self._batch_size]]
            result.merge(self._transact(chunk))
        self._log(result)
        return result

    def _transact(self, chunk: list[tuple[str, str]]) -> ReconcileResult:
        """Apply one chunk in one transaction; on any failure rebuild the pool from the store."""
        effects: list[ReconcileResult] = []

        def attempt(txn: OperatorTxn) -> None:
            if self._dirty:
                self._reset_pool()  # a previous attempt of this chunk did not commit
            # Read in the transaction, so its commit fails if another operator wrote since.
            fence = txn.get(FENCE_KEY)
            if not self._fence_valid or fence != self._fence:
                raise _FenceMoved
            self._dirty = True
            effects[:] = [self._apply_chunk(txn, chunk)]

        for _ in range(MAX_RESYNCS):
            if not self._fence_valid:
                self._resync()
            try:
                self._run_transaction(attempt)
            except _FenceMoved:
                self._fence_valid = False  # someone else allocated: re-list, then retry
                continue
            except BaseException:
                if self._dirty:
                    self._reset_pool()
                raise
            self._dirty = False
            return effects[0] if effects else ReconcileResult()
        raise StoreConflictError(
            f"other writers changed the IPAM objects {MAX_RESYNCS} times in a row while this "
            "operator tried to allocate; is more than one operator running?"
        )

    def _run_transaction(self, fn: Callable[[OperatorTxn], None]) -> None:
        runner: Callable[..., Any] | None = getattr(self._store, "run_transaction", None)
        if runner is not None:
            runner(fn, retries=self._retries)
            return
        delay = 0.05
        for attempt in range(self._retries + 1):
            try:
                with self._store.transaction() as txn:
                    fn(txn)
                return
            except (StoreUnavailableError, StoreConflictError) as exc:
                if attempt == self._retries:
                    raise
                log.debug("transaction failed (%s); retrying in %.2f s", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _apply_chunk(self, txn: OperatorTxn, chunk: list[tuple[str, str]]) -> ReconcileResult:
        """The writes of one chunk. The fence (checked by the caller, in this transaction)
        proves no other operator changed an IPAM object since the pool was synced, so the
        synced view *is* each node's current object: nothing per node is read again but a
        released node's key (a node that re-registered meanwhile keeps its CIDRs)."""
        result = ReconcileResult()
        released_any = False
        for action, node in chunk:
            if action == _RELEASE and txn.get(node_key(node)) is None:
                released_any |= self._release(txn, node, result)
        if released_any:
            self._retry_conflicts()  # before anyone else can be given their blocks
        for action, node in chunk:
            if action == _UPDATE:
                self._update(txn, node, result)
        if result.writes:
            self._serial += 1
            fence = encode_json({"operator": self._id, "serial": self._serial})
            txn.put(FENCE_KEY, fence)
            self._fence = fence  # rolled back with the pool if the commit fails
        return result

    def _release(self, txn: OperatorTxn, node: str, result: ReconcileResult) -> bool:
        held = self._pool.node_cidrs(node)
        if node in self._synced:
            txn.delete(ipam_key(node))
            result.writes += 1
        elif held is None:
            return False
        self._forget(node)
        cidrs = [str(net) for net in held.cidrs] if held else []
        if cidrs:
            # For the node coming back under the same name (see "Node loss").
            txn.put(keys.RELEASED + node, encode_json({"podCIDRs": cidrs}))
            result.writes += 1
        result.released[node] = cidrs
        return True

    def _restore_released(self, txn: OperatorTxn, node: str, result: ReconcileResult) -> None:
        """Give a node that registers again the CIDRs it held, those still free."""
        key = keys.RELEASED + node
        raw = txn.get(key)
        if raw is None:
            return
        txn.delete(key)
        result.writes += 1
        try:
            value = decode_json(key, raw)
        except StoreError:
            return
        cidrs = value.get("podCIDRs") if isinstance(value, dict) else None
        restored = []
        for cidr in cidrs if isinstance(cidrs, list) else []:
            try:
                self._pool.occupy(node, [str(cidr)])
            except PoolError as exc:
                log.info("node %s is back; its former CIDR %s is not free: %s", node, cidr, exc)
            else:
                restored.append(str(cidr))
        if restored:
            result.restored[node] = restored

    def _update(self, txn: OperatorTxn, node: str, result: ReconcileResult) -> None:
        synced = self._synced.get(node)
        current, stored = synced if synced is not None else (None, None)
        kept = list(stored.cidrs) if stored is not None else []
        error: str | None
        if node in self._conflicts:
            error = result.conflicts[node] = self._conflicts[node]
            cidrs = kept
        elif self._missing_families(node):
            if current is None:
                self._restore_released(txn, node, result)
            try:
                cidrs = [str(net) for net in self._pool.allocate(node).cidrs]
            except PoolExhaustedError as exc:
                error = str(exc)
                cidrs = kept
                self._waiting.add(node)
                result.exhausted[node] = error
            else:
                error = None
                self._waiting.discard(node)
                result.allocated[node] = cidrs
        else:
            error = None
            cidrs = kept
            self._waiting.discard(node)
        raw = encode_json(_ipam_object(cidrs, error))
        if current != raw:
            txn.put(ipam_key(node), raw)
            result.writes += 1
            if error is not None:  # logged when recorded, not on every retry
                log.warning("node %s: %s", node, error)
        self._synced[node] = (raw, _Stored(tuple(cidrs), error))

    # -- pool <-> store ---------------------------------------------------------------------

    def _resync(self) -> None:
        """Re-list every IPAM object; the fence is read first, so the pool then holds at
        least everything written up to that fence value."""
        fence = self._store.get(FENCE_KEY)
        self._sync(self._store.list(IPAM_PREFIX))
        self._fence, self._fence_valid = fence, True

    def _sync(self, listing: KeyValues) -> None:
        """Make the pool hold exactly what the complete ``cluster/ipam/`` ``listing`` says."""
        present: set[str] = set()
        for key, raw in listing:
            node = key[len(IPAM_PREFIX) :]
            present.add(node)
            synced = self._synced.get(node)
            if synced is not None and synced[0] == raw and node not in self._conflicts:
                continue
            self._adopt(node, raw, _parse_ipam(key, raw))
        for node in [node for node in self._synced if node not in present]:
            self._forget(node)

    def _adopt(self, node: str, raw: bytes, stored: _Stored) -> None:
        held = self._pool.node_cidrs(node)
        held_set = {str(net) for net in held.cidrs} if held else set()
        wanted = list(stored.cidrs)
        if not held_set <= set(wanted):
            wanted = [_normalize(cidr) for cidr in wanted]  # written by hand, perhaps
            if not held_set <= set(wanted):
                self._pool.release(node)  # the store says otherwise: it wins
                held_set = set()
        missing = [cidr for cidr in wanted if cidr not in held_set]
        errors: list[str] = []
        try:
            self._pool.occupy(node, missing)  # all or nothing ...
        except PoolError:
            for cidr in missing:  # ... so one by one: what fits stays reserved
                try:
                    self._pool.occupy(node, [cidr])
                except PoolError as exc:
                    errors.append(str(exc))
        self._synced[node] = (raw, stored)
        if errors:
            message = (
                "; ".join(errors) + "; the node keeps its CIDRs (its pods use them): restore "
                "the cluster CIDR, or drain and re-register the node to get a new one"
            )
            if self._conflicts.get(node) != message:
                log.warning("node %s: %s", node, message)
            self._conflicts[node] = message
        elif self._conflicts.pop(node, None) is not None:
            log.info("node %s: stored CIDRs %s fit the pool again", node, ", ".join(wanted))

    def _retry_conflicts(self) -> None:
        for node in sorted(self._conflicts):
            raw, stored = self._synced[node]
            self._adopt(node, raw, stored)

    def _forget(self, node: str) -> None:
        self._pool.release(node)
        self._synced.pop(node, None)
        self._conflicts.pop(node, None)
        self._waiting.discard(node)

    def _reset_pool(self) -> None:
        """Empty the pool; the next listing re-occupies everything from the store."""
        for node in list(self._pool.nodes()):
            self._pool.release(node)
        self._synced.clear()
        self._conflicts.clear()
        self._waiting.clear()
        self._dirty = False
        self._fence_valid = False

    @staticmethod
    def _log(result: ReconcileResult) -> None:
        for node, cidrs in result.released.items():
            log.info("node %s deleted: released %s", node, ", ".join(cidrs) or "nothing")
        for node, cidrs in result.allocated.items():
            again = result.restored.get(node)
            log.info(
                "node %s: allocated %s%s",
                node,
                ", ".join(cidrs),
                f" (held before: {', '.join(again)})" if again else "",
            )
