"""Identity garbage collection: identities nobody holds are removed after a grace period.

Cilium's operator does this for its kvstore identities; ``ciliate-operator`` runs
:meth:`IdentityGc.run` beside its IPAM loop. An identity is *unreferenced* when no node
has a reference key for it (``identities/refs/<id>/<node>``): its last endpoint was
deleted, or every node that held it died and their leases expired. It is removed once it
has been unreferenced for ``grace`` seconds without a break -- long enough for a node
whose lease lapsed during an etcd outage to come back and write its references again.
A label set in use never loses its identity: the removal transaction re-reads the
references and commits only if there still are none (a node taking a reference meanwhile
makes it conflict, and the identity stays).

Removal leaves a tombstone that keeps the id out of allocation for ``quarantine``
seconds (:meth:`~ciliate.control.identity.allocator.IdentityAllocator.remove`); the GC
deletes tombstones whose quarantine is over. Its memory of when each identity was first
seen unreferenced is in-process: a restarted GC starts the grace periods again, which
only delays removals. Two GCs at once are safe (the transactions serialise), merely
wasteful.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ciliate.control.identity.allocator import (
    DEFAULT_QUARANTINE,
    ID_PREFIX,
    REFS_PREFIX,
    IdentityAllocator,
    IdRecord,
    id_key,
    parse_id,
    read_record,
    refs_prefix,
)
from ciliate.control.store import Store, StoreConflictError, StoreError, Txn, decode_json

__all__ = ["DEFAULT_GRACE", "DEFAULT_INTERVAL", "GcResult", "IdentityGc"]

log = logging.getLogger(__name__)

# Seconds an identity stays unreferenced before it is removed.
DEFAULT_GRACE = 300.0
# Seconds between two GC passes.
DEFAULT_INTERVAL = 30.0


@dataclass
class GcResult:
    """One pass: ids removed, ids unreferenced but still in their grace period, and
    tombstones deleted because their quarantine was over."""

    removed: list[int] = field(default_factory=list)
    waiting: list[int] = field(default_factory=list)
    purged: list[int] = field(default_factory=list)


class IdentityGc:
    """Removes unreferenced identities from ``store``; see the module documentation.

    ``clock`` measures the grace period (monotonic); ``wall_clock`` stamps and checks the
    quarantine (shared by every node, so wall-clock seconds).
    """

    def __init__(
        self,
        store: Store,
        *,
        grace: float = DEFAULT_GRACE,
        quarantine: float = DEFAULT_QUARANTINE,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if grace < 0:
            raise ValueError("the identity GC grace period must not be negative")
        self._store = store
        self._grace = grace
        self._clock = clock
        self._wall_clock = wall_clock
        self._alloc = IdentityAllocator(store, quarantine=quarantine, clock=wall_clock)
        self._unreferenced_since: dict[int, float] = {}

    def run_once(self) -> GcResult:
        """One pass over every identity; store errors propagate (the loop retries)."""
        result = GcResult()
        # References first: an identity created after this listing is absent from the
        # records listed next, so it cannot look unreferenced.
        referenced = {parse_id(key, REFS_PREFIX) for key, _ in self._store.list(REFS_PREFIX)}
        records = {
            parse_id(key, ID_PREFIX): IdRecord.parse(key, decode_json(key, raw))
            for key, raw in self._store.list(ID_PREFIX)
        }
        now, wall = self._clock(), self._wall_clock()
        unreferenced = {
            identity_id
            for identity_id, record in records.items()
            if not record.tombstone and identity_id not in referenced
        }
        for identity_id in set(self._unreferenced_since) - unreferenced:
            del self._unreferenced_since[identity_id]
        for identity_id in sorted(unreferenced):
            since = self._unreferenced_since.setdefault(identity_id, now)
            if now - since < self._grace:
                result.waiting.append(identity_id)
            elif self._attempt(self._remove, identity_id):
                result.removed.append(identity_id)
                del self._unreferenced_since[identity_id]
        expired = [i for i, r in sorted(records.items()) if r.until is not None and r.until <= wall]
        for identity_id in expired:
            if self._attempt(self._purge, identity_id):
                result.purged.append(identity_id)
        if result.removed or result.purged:
            log.info(
                "identity GC: removed %s, purged tombstones %s, %d waiting",
                result.removed,
                result.purged,
                len(result.waiting),
            )
        return result

    def run(self, stop: threading.Event, *, interval: float = DEFAULT_INTERVAL) -> None:
        """Run a pass every ``interval`` seconds until ``stop`` is set; store failures are
        logged and the next pass retries."""
        while True:
            try:
                self.run_once()
            except StoreError as exc:
                log.warning("identity GC pass failed, will retry: %s", exc)
            if stop.wait(interval):
                return

    def start(
        self, stop: threading.Event, *, interval: float = DEFAULT_INTERVAL
    ) -> threading.Thread:
        """:meth:`run` in a daemon thread (the operator's IPAM loop keeps its own)."""
        thread = threading.Thread(
            target=self.run, args=(stop,), kwargs={"interval": interval}, name="identity-gc"
        )
        thread.daemon = True
        thread.start()
        return thread

    def _attempt(self, step: Callable[[Txn, int], bool], identity_id: int) -> bool:
        """Run one step in its own transaction; a conflict means someone changed the
        identity meanwhile: leave it to the next pass, which sees the change."""
        try:
            with self._store.transaction() as txn:
                return step(txn, identity_id)
        except StoreConflictError:
            return False

    def _remove(self, txn: Txn, identity_id: int) -> bool:
        if txn.list(refs_prefix(identity_id)):
            return False  # referenced again since the listing
        return self._alloc.remove(txn, identity_id)

    def _purge(self, txn: Txn, identity_id: int) -> bool:
        record = read_record(txn, identity_id)
        if record is None or record.until is None or record.until > self._wall_clock():
            return False  # revived, or re-removed later, meanwhile
        return txn.delete(id_key(identity_id))
