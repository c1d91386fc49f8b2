"""Identity garbage collection on the node's SQLite store, with fake clocks: what is
removed, when, and what never is."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ciliate.control.identity.allocator import Identity, IdentityAllocator
from ciliate.control.identity.gc import IdentityGc
from ciliate.control.store import KeyValues, SqliteStore

WEB = {"k8s:io.kubernetes.pod.namespace": "default", "k8s:app": "web"}
DB = {"k8s:io.kubernetes.pod.namespace": "default", "k8s:app": "db"}


class Clocks:
    """The GC's monotonic clock and the wall clock the quarantine is stamped with."""

    def __init__(self) -> None:
        self.monotonic = 100.0
        self.wall = 5000.0

    def advance(self, seconds: float) -> None:
        self.monotonic += seconds
        self.wall += seconds


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    with SqliteStore(tmp_path / "ids.db") as opened:
        yield opened


@pytest.fixture
def clocks() -> Clocks:
    return Clocks()


def make_gc(store: SqliteStore, clocks: Clocks, *, grace: float = 30.0) -> IdentityGc:
    return IdentityGc(
        store,
        grace=grace,
        quarantine=600.0,
        clock=lambda: clocks.monotonic,
        wall_clock=lambda: clocks.wall,
    )


def hold(store: SqliteStore, labels: dict[str, str], *, node: str = "n1") -> Identity:
    with store.transaction() as txn:
        return IdentityAllocator(store, node=node).acquire(txn, labels)


def drop(store: SqliteStore, identity: Identity, *, node: str = "n1") -> None:
    """The node's reference vanishes without a release (its lease expired)."""
    with store.transaction() as txn:
        assert txn.delete(f"identities/refs/{identity.id}/{node}")


def test_an_identity_in_use_is_never_removed(store: SqliteStore, clocks: Clocks) -> None:
    gc = make_gc(store, clocks, grace=0.0)
    web = hold(store, WEB)
    for _ in range(3):
        clocks.advance(3600)
        assert gc.run_once().removed == []
    assert IdentityAllocator(store).lookup(WEB) == Identity(id=web.id, labels=WEB, refcount=1)


def test_an_unreferenced_identity_goes_after_the_grace_period(
    store: SqliteStore, clocks: Clocks
) -> None:
    gc = make_gc(store, clocks, grace=30.0)
    web, db = hold(store, WEB), hold(store, DB)
    drop(store, web)
    assert gc.run_once().waiting == [web.id]
    clocks.advance(29)
    assert gc.run_once().removed == []
    clocks.advance(1)
    assert gc.run_once().removed == [web.id]
    allocator = IdentityAllocator(store)
    assert allocator.lookup(WEB) is None and allocator.get(web.id) is None
    assert allocator.lookup(DB) == Identity(id=db.id, labels=DB, refcount=1)
    # the id is quarantined, not free
    assert store.get_json(f"identities/id/{web.id}") == {"labels": WEB, "until": clocks.wall + 600}


def test_a_reference_taken_in_the_grace_period_starts_it_again(
    store: SqliteStore, clocks: Clocks
) -> None:
    gc = make_gc(store, clocks, grace=30.0)
    web = hold(store, WEB)
    drop(store, web)
    gc.run_once()
    clocks.advance(20)
    assert hold(store, WEB, node="n2").id == web.id  # another node uses it again
    gc.run_once()
    drop(store, web, node="n2")
    clocks.advance(20)
    assert gc.run_once().waiting == [web.id], "40 s since first seen, 0 s unreferenced"
    clocks.advance(30)
    assert gc.run_once().removed == [web.id]


def test_tombstones_are_purged_when_their_quarantine_ends(
    store: SqliteStore, clocks: Clocks
) -> None:
    gc = make_gc(store, clocks, grace=0.0)
    web = hold(store, WEB)
    drop(store, web)
    assert gc.run_once().removed == [web.id]
    clocks.advance(599)
    assert gc.run_once().purged == []
    clocks.advance(1)
    assert gc.run_once().purged == [web.id]
    assert store.list("identities/") == []


class StaleReferences(SqliteStore):
    """A store whose reference listing is from before a node took its reference: the
    GC's first look says "unreferenced", its transaction must find out otherwise."""

    def list(self, prefix: str) -> KeyValues:
        if prefix == "identities/refs/":
            return []
        return super().list(prefix)


def test_a_reference_taken_after_the_gc_looked_keeps_the_identity(
    tmp_path: Path, clocks: Clocks
) -> None:
    with StaleReferences(tmp_path / "stale.db") as store:
        web = hold(store, WEB)
        result = make_gc(store, clocks, grace=0.0).run_once()
        assert result.removed == []
        assert IdentityAllocator(store).lookup(WEB) == Identity(id=web.id, labels=WEB, refcount=1)


def test_a_negative_grace_period_is_refused(store: SqliteStore) -> None:
    with pytest.raises(ValueError, match="grace"):
        IdentityGc(store, grace=-1)


def test_the_background_loop_collects_and_stops_when_told(store: SqliteStore) -> None:
    web = hold(store, WEB)
    drop(store, web)
    stop = threading.Event()
    thread = IdentityGc(store, grace=0.0).start(stop, interval=0.05)
    deadline = time.monotonic() + 30
    while IdentityAllocator(store).lookup(WEB) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert IdentityAllocator(store).lookup(WEB) is None
    stop.set()
    thread.join(10)
    assert not thread.is_alive()
