"""The operator's cluster-pool IPAM on an SQLite cluster store: allocation, exhaustion,
release, restarts (same and changed configuration), races, the loop, the CLI, the bench."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ciliate.bench import cidr_alloc
from ciliate.control.cluster import keys
from ciliate.control.ipam import ClusterPool
from ciliate.control.operator import main as operator_main
from ciliate.control.operator import reconciler as op
from ciliate.control.store import SqliteStore, StoreConflictError
from ciliate.control.store.base import KeyValues

V4 = ["10.244.0.0/16"]

# -- fixtures and helpers -----------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    with SqliteStore(tmp_path / "cluster.db", synchronous="normal") as s:
        yield s


def pool(
    v4: list[str] | None = None,
    v4_mask: int | None = 24,
    v6: list[str] | None = None,
    v6_mask: int | None = None,
) -> ClusterPool:
    return ClusterPool(
        ipv4_cidrs=V4 if v4 is None else v4,
        ipv4_mask=v4_mask if (v4 is None or v4) else None,
        ipv6_cidrs=v6 or [],
        ipv6_mask=v6_mask if v6 else None,
    )


def add_nodes(store: SqliteStore, *names: str) -> None:
    with store.transaction() as txn:
        for name in names:
            txn.put_json(op.node_key(name), {"name": name, "nodeIP": "192.168.0.1"})


def delete_nodes(store: SqliteStore, *names: str) -> None:
    with store.transaction() as txn:
        for name in names:
            txn.delete(op.node_key(name))


def put_ipam(store: SqliteStore, name: str, cidrs: list[str], error: str | None = None) -> None:
    with store.transaction() as txn:
        txn.put_json(op.ipam_key(name), {"podCIDRs": cidrs, "status": {"error": error}})


def ipam(store: SqliteStore, name: str) -> Any:
    return store.get_json(op.ipam_key(name))


def cidrs_of(store: SqliteStore, name: str) -> list[str]:
    obj = ipam(store, name)
    assert obj is not None, f"{name} has no IPAM object"
    return list(obj["podCIDRs"])


def error_of(store: SqliteStore, name: str) -> str | None:
    obj = ipam(store, name)
    assert obj is not None, f"{name} has no IPAM object"
    error = obj["status"]["error"]
    assert error is None or isinstance(error, str)
    return error


def all_ipam(store: SqliteStore) -> dict[str, list[str]]:
    return {
        key.removeprefix(op.IPAM_PREFIX): json.loads(raw)["podCIDRs"]
        for key, raw in store.list(op.IPAM_PREFIX)
    }


def assert_no_duplicates(objects: dict[str, list[str]]) -> None:
    owner: dict[str, str] = {}
    for node, cidrs in objects.items():
        for cidr in cidrs:
            assert cidr not in owner, f"{cidr} given to {owner[cidr]} and {node}"
            owner[cidr] = node


def names(prefix: str, count: int, start: int = 0) -> list[str]:
    return [f"{prefix}-{i:03d}" for i in range(start, start + count)]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# -- allocation ---------------------------------------------------------------------------


def test_new_nodes_get_cidrs_in_order(store: SqliteStore) -> None:
    add_nodes(store, "node-a", "node-b", "node-c")
    result = op.Operator(store, pool()).reconcile_once()
    assert all_ipam(store) == {
        "node-a": ["10.244.0.0/24"],
        "node-b": ["10.244.1.0/24"],
        "node-c": ["10.244.2.0/24"],
    }
    assert ipam(store, "node-a") == {"podCIDRs": ["10.244.0.0/24"], "status": {"error": None}}
    assert sorted(result.allocated) == ["node-a", "node-b", "node-c"]


def test_dual_stack_nodes_get_ipv4_then_ipv6(store: SqliteStore) -> None:
    add_nodes(store, "n1", "n2")
    op.Operator(store, pool(v6=["fd00:10:244::/56"], v6_mask=64)).reconcile_once()
    assert cidrs_of(store, "n1") == ["10.244.0.0/24", "fd00:10:244::/64"]
    assert cidrs_of(store, "n2") == ["10.244.1.0/24", "fd00:10:244:1::/64"]


def test_ipv6_only_pool(store: SqliteStore) -> None:
    add_nodes(store, "n1")
    op.Operator(store, pool(v4=[], v6=["fd00::/112"], v6_mask=120)).reconcile_once()
    assert cidrs_of(store, "n1") == ["fd00::/120"]


def test_a_full_cluster_cidr_moves_on_to_the_next_then_the_node_gets_an_error(
    store: SqliteStore,
) -> None:
    add_nodes(store, *names("n", 5))
    result = op.Operator(store, pool(["10.0.0.0/25", "10.0.1.0/25"], 26)).reconcile_once()
    assert [cidrs_of(store, n) for n in names("n", 4)] == [
        ["10.0.0.0/26"],
        ["10.0.0.64/26"],
        ["10.0.1.0/26"],
        ["10.0.1.64/26"],
    ]
    waiting = ipam(store, "n-004")
    assert waiting["podCIDRs"] == []
    assert "IPv4 pool exhausted" in waiting["status"]["error"]
    assert "n-004" in waiting["status"]["error"]
    assert list(result.exhausted) == ["n-004"]


def test_a_deleted_node_gives_back_its_cidr_and_the_waiting_node_gets_it(
    store: SqliteStore,
) -> None:
    add_nodes(store, *names("n", 3))
    operator = op.Operator(store, pool(["10.0.0.0/25"], 26))
    operator.reconcile_once()
    assert error_of(store, "n-002") is not None
    delete_nodes(store, "n-001")
    result = operator.reconcile_once()
    assert ipam(store, "n-001") is None
    assert result.released == {"n-001": ["10.0.0.64/26"]}
    assert ipam(store, "n-002") == {"podCIDRs": ["10.0.0.64/26"], "status": {"error": None}}
    assert cidrs_of(store, "n-000") == ["10.0.0.0/26"]


def test_dual_stack_exhaustion_of_one_family_leaves_no_half_allocation(
    store: SqliteStore,
) -> None:
    add_nodes(store, "n1", "n2")
    operator = op.Operator(store, pool(["10.0.0.0/16"], 24, ["fd00::/120"], 120))
    operator.reconcile_once()
    assert cidrs_of(store, "n1") == ["10.0.0.0/24", "fd00::/120"]
    assert ipam(store, "n2")["podCIDRs"] == []
    assert "IPv6 pool exhausted" in (error_of(store, "n2") or "")
    assert operator.pool.node_cidrs("n2") is None


def test_exhausted_nodes_are_retried_until_capacity_comes_back(store: SqliteStore) -> None:
    add_nodes(store, "n1", "n2")
    operator = op.Operator(store, pool(["10.0.0.0/24"], 24))
    operator.reconcile_once()
    before = store.revision()
    operator.reconcile_once()  # still full: the same error object, not rewritten
    assert store.revision() == before
    delete_nodes(store, "n1")
    operator.reconcile_once()
    assert ipam(store, "n2") == {"podCIDRs": ["10.0.0.0/24"], "status": {"error": None}}


def test_a_second_reconcile_writes_nothing(store: SqliteStore) -> None:
    add_nodes(store, *names("n", 10))
    operator = op.Operator(store, pool())
    operator.reconcile_once()
    revision = store.revision()
    result = operator.reconcile_once()
    assert result.writes == 0
    assert store.revision() == revision


def test_small_batches_give_the_same_result(store: SqliteStore) -> None:
    add_nodes(store, *names("n", 23))
    result = op.Operator(store, pool(), batch_size=4).reconcile_once()
    assert len(result.allocated) == 23
    assert all_ipam(store)["n-022"] == ["10.244.22.0/24"]


def test_an_ipam_object_without_a_node_is_deleted_and_its_cidr_freed(store: SqliteStore) -> None:
    put_ipam(store, "ghost", ["10.244.0.0/24"])
    add_nodes(store, "n1")
    result = op.Operator(store, pool(["10.244.0.0/24"], 24)).reconcile_once()
    assert ipam(store, "ghost") is None
    assert result.released == {"ghost": ["10.244.0.0/24"]}
    assert cidrs_of(store, "n1") == ["10.244.0.0/24"]


def test_an_empty_ipam_object_gets_an_allocation(store: SqliteStore) -> None:
    add_nodes(store, "n1")
    put_ipam(store, "n1", [], "IPv4 pool exhausted: from an earlier run")
    op.Operator(store, pool()).reconcile_once()
    assert ipam(store, "n1") == {"podCIDRs": ["10.244.0.0/24"], "status": {"error": None}}


def test_a_malformed_ipam_object_is_replaced(store: SqliteStore) -> None:
    add_nodes(store, "n1", "n2")
    with store.transaction() as txn:
        txn.put(op.ipam_key("n1"), b"not json")
        txn.put_json(op.ipam_key("n2"), {"podCIDRs": "10.244.9.0/24"})
    op.Operator(store, pool()).reconcile_once()
    assert cidrs_of(store, "n1") == ["10.244.0.0/24"]
    assert cidrs_of(store, "n2") == ["10.244.1.0/24"]


def test_reconcile_nodes_handles_only_the_named_nodes(store: SqliteStore) -> None:
    add_nodes(store, "n1", "n2")
    operator = op.Operator(store, pool())
    operator.reconcile_nodes(["n2"])
    assert all_ipam(store) == {"n2": ["10.244.0.0/24"]}
    delete_nodes(store, "n2")
    operator.reconcile_nodes(["n2", "never-existed"])
    assert all_ipam(store) == {}


# -- restarts -----------------------------------------------------------------------------


def test_a_restarted_operator_keeps_every_cidr_and_duplicates_none(store: SqliteStore) -> None:
    add_nodes(store, *names("n", 20))
    op.Operator(store, pool()).reconcile_once()
    first = dict(store.list(op.IPAM_PREFIX))
    assert len(first) == 20

    add_nodes(store, *names("n", 5, start=20))
    result = op.Operator(store, pool()).reconcile_once()  # a new operator, a new pool
    after = dict(store.list(op.IPAM_PREFIX))
    assert {k: after[k] for k in first} == first  # byte for byte
    assert sorted(result.allocated) == names("n", 5, start=20)
    assert_no_duplicates(all_ipam(store))
    assert len(all_ipam(store)) == 25


def test_restart_re_occupies_before_allocating_even_with_gaps(store: SqliteStore) -> None:
    put_ipam(store, "old-a", ["10.244.0.0/24"])
    put_ipam(store, "old-b", ["10.244.2.0/24"])
    add_nodes(store, "old-a", "old-b", "new-1", "new-2")
    op.Operator(store, pool()).reconcile_once()
    assert cidrs_of(store, "old-a") == ["10.244.0.0/24"]
    assert cidrs_of(store, "old-b") == ["10.244.2.0/24"]
    assert cidrs_of(store, "new-1") == ["10.244.1.0/24"]
    assert cidrs_of(store, "new-2") == ["10.244.3.0/24"]


def test_restart_with_a_removed_cluster_cidr_keeps_and_flags_the_cidrs_outside(
    store: SqliteStore,
) -> None:
    config = ["10.1.0.0/23", "10.2.0.0/16"]
    add_nodes(store, "n0", "n1", "n2")
    op.Operator(store, pool(config)).reconcile_once()
    assert cidrs_of(store, "n2") == ["10.2.0.0/24"]

    # Restart without 10.2.0.0/16: n2 keeps its CIDR (its pods use it), with an error.
    add_nodes(store, "n3")
    result = op.Operator(store, pool(["10.1.0.0/23"])).reconcile_once()
    assert cidrs_of(store, "n2") == ["10.2.0.0/24"]
    error = error_of(store, "n2") or ""
    assert "10.2.0.0/24 is outside every IPv4 cluster CIDR" in error
    assert "keeps" in error
    assert "n2" in result.conflicts
    assert [cidrs_of(store, n) for n in ("n0", "n1")] == [["10.1.0.0/24"], ["10.1.1.0/24"]]
    assert error_of(store, "n0") is None
    # The kept CIDR is not doubled by a new one; n3 waits (10.1.0.0/23 is full).
    assert ipam(store, "n3")["podCIDRs"] == []
    assert "exhausted" in (error_of(store, "n3") or "")

    # The cluster CIDR back in the configuration: the error clears, nothing moves.
    op.Operator(store, pool(config)).reconcile_once()
    assert ipam(store, "n2") == {"podCIDRs": ["10.2.0.0/24"], "status": {"error": None}}
    assert cidrs_of(store, "n3") == ["10.2.1.0/24"]
    assert_no_duplicates(all_ipam(store))


def test_a_cidr_that_fits_stays_reserved_when_its_sibling_does_not(store: SqliteStore) -> None:
    # n1 has an IPv4 CIDR that fits and an IPv6 CIDR of a family no longer configured.
    put_ipam(store, "n1", ["10.244.0.0/24", "fd00::/64"])
    add_nodes(store, "n1", "n2")
    op.Operator(store, pool()).reconcile_once()
    assert cidrs_of(store, "n1") == ["10.244.0.0/24", "fd00::/64"]
    assert "no IPv6 cluster CIDRs" in (error_of(store, "n1") or "")
    assert cidrs_of(store, "n2") == ["10.244.1.0/24"]


def test_a_newly_configured_family_is_added_to_existing_nodes(store: SqliteStore) -> None:
    add_nodes(store, "n1", "n2")
    op.Operator(store, pool()).reconcile_once()
    op.Operator(store, pool(v6=["fd00:10:244::/56"], v6_mask=64)).reconcile_once()
    assert cidrs_of(store, "n1") == ["10.244.0.0/24", "fd00:10:244::/64"]
    assert cidrs_of(store, "n2") == ["10.244.1.0/24", "fd00:10:244:1::/64"]


def test_of_two_nodes_claiming_one_cidr_the_second_is_flagged_and_reclaims_it_later(
    store: SqliteStore,
) -> None:
    put_ipam(store, "n-a", ["10.244.0.0/24"])
    put_ipam(store, "n-b", ["10.244.0.0/24"])  # a hand edit gone wrong
    add_nodes(store, "n-a", "n-b", "n-c", "n-d")
    operator = op.Operator(store, pool(["10.244.0.0/23"]))  # room for two
    operator.reconcile_once()
    assert error_of(store, "n-a") is None
    assert "held by node 'n-a'" in (error_of(store, "n-b") or "")
    assert cidrs_of(store, "n-b") == ["10.244.0.0/24"]
    assert cidrs_of(store, "n-c") == ["10.244.1.0/24"]
    assert "exhausted" in (error_of(store, "n-d") or "")

    # n-a goes: its block is n-b's again, and not handed to the waiting n-d.
    delete_nodes(store, "n-a")
    operator.reconcile_once()
    assert ipam(store, "n-b") == {"podCIDRs": ["10.244.0.0/24"], "status": {"error": None}}
    assert ipam(store, "n-d")["podCIDRs"] == []
    assert_no_duplicates(all_ipam(store))


# -- transactions and races ---------------------------------------------------------------


class ConflictingStore:
    """An SQLite store with an etcd-style ``run_transaction`` whose first ``conflicts``
    commits lose (the function ran, its writes are rolled back)."""

    def __init__(self, inner: SqliteStore, conflicts: int) -> None:
        self.inner = inner
        self.conflicts = conflicts
        self.attempts = 0

    def get(self, key: str) -> bytes | None:
        return self.inner.get(key)

    def list(self, prefix: str) -> KeyValues:
        return self.inner.list(prefix)

    def revision(self) -> int:
        return self.inner.revision()

    def transaction(self) -> AbstractContextManager[op.OperatorTxn]:
        return self.inner.transaction()

    def run_transaction(self, fn: Callable[[op.OperatorTxn], Any], *, retries: int = 10) -> Any:
        for _ in range(retries + 1):
            self.attempts += 1
            with contextlib.suppress(StoreConflictError), self.inner.transaction() as txn:
                result = fn(txn)
                if self.conflicts > 0:
                    self.conflicts -= 1
                    raise StoreConflictError("lost the race")
                return result
        raise StoreConflictError("out of retries")


def test_a_lost_transaction_is_re_run_and_leaks_nothing(store: SqliteStore) -> None:
    add_nodes(store, *names("n", 6))
    conflicting = ConflictingStore(store, conflicts=2)
    operator = op.Operator(conflicting, pool(), batch_size=4)
    operator.reconcile_once()
    assert conflicting.conflicts == 0
    # Two chunks; each lost commit is re-run once, finds the pool rebuilt and so re-lists
    # the IPAM objects before running again: 2 + 2 lost + 2 re-runs.
    assert conflicting.attempts == 6
    stored = all_ipam(store)
    assert len(stored) == 6
    assert_no_duplicates(stored)
    held = {node: [str(c) for c in cidrs.cidrs] for node, cidrs in operator.pool.nodes().items()}
    assert held == stored


def test_a_transaction_that_gives_up_leaves_the_pool_as_the_store_says(
    store: SqliteStore,
) -> None:
    add_nodes(store, "n1")
    operator = op.Operator(ConflictingStore(store, conflicts=100), pool(), retries=1)
    with pytest.raises(StoreConflictError):
        operator.reconcile_once()
    assert operator.pool.nodes() == {}
    assert all_ipam(store) == {}


def test_an_operator_re_lists_when_another_one_allocated_in_between(store: SqliteStore) -> None:
    a = op.Operator(store, pool())
    b = op.Operator(store, pool())
    add_nodes(store, "n1")
    a.reconcile_once()  # n1 <- 10.244.0.0/24
    add_nodes(store, "n2")
    b.reconcile_once()  # n2 <- 10.244.1.0/24, which a's pool does not know of
    add_nodes(store, "n3")
    a.reconcile_nodes(["n3"])  # a sees the fence moved: re-lists before allocating
    assert cidrs_of(store, "n3") == ["10.244.2.0/24"]
    assert_no_duplicates(all_ipam(store))


def test_the_fence_moves_only_with_a_change(store: SqliteStore) -> None:
    add_nodes(store, "n1")
    operator = op.Operator(store, pool())
    operator.reconcile_once()
    fence = store.get_json(op.FENCE_KEY)
    assert isinstance(fence, dict)
    assert fence["serial"] == 1
    operator.reconcile_once()
    assert store.get_json(op.FENCE_KEY) == fence
    delete_nodes(store, "n1")
    operator.reconcile_once()
    assert store.get_json(op.FENCE_KEY) != fence
    assert op.FENCE_KEY not in {key for key, _ in store.list(op.IPAM_PREFIX)}


def test_two_operators_racing_never_give_one_cidr_to_two_nodes(tmp_path: Path) -> None:
    path = tmp_path / "cluster.db"
    stop = threading.Event()
    failures: list[BaseException] = []
    nodes = names("n", 240)

    def operator_loop(index: int) -> None:
        with SqliteStore(path, synchronous="normal") as s:
            operator = op.Operator(s, pool(["10.244.0.0/16"]), batch_size=3)
            try:
                while not stop.is_set():
                    # Full passes re-list everything first; targeted ones (watch events)
                    # rely on the fence alone: race both kinds.
                    if index == 0:
                        operator.reconcile_once()
                    else:
                        listed = [
                            k.removeprefix(op.NODES_PREFIX) for k, _ in s.list(op.NODES_PREFIX)
                        ]
                        operator.reconcile_nodes(listed[-6:])
                operator.reconcile_once()
            except BaseException as exc:
                failures.append(exc)

    with SqliteStore(path, synchronous="normal") as s:
        threads = [threading.Thread(target=operator_loop, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        try:
            for i in range(0, len(nodes), 4):
                add_nodes(s, *nodes[i : i + 4])
                if i % 12 == 8:
                    delete_nodes(s, nodes[i - 5])
                assert_no_duplicates(all_ipam(s))  # at every moment, not just at the end
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        assert not failures, failures
        present = {key.removeprefix(op.NODES_PREFIX) for key, _ in s.list(op.NODES_PREFIX)}
        final = all_ipam(s)
        assert set(final) == present
        assert all(len(cidrs) == 1 for cidrs in final.values())
        assert_no_duplicates(final)


# -- the loop -----------------------------------------------------------------------------


def test_start_polls_a_store_that_cannot_watch(store: SqliteStore) -> None:
    operator = op.Operator(store, pool(), poll_interval=0.01)
    operator.start()
    try:
        add_nodes(store, "n1")
        wait_for(lambda: ipam(store, "n1") is not None, "n1's CIDR")
        assert cidrs_of(store, "n1") == ["10.244.0.0/24"]
        delete_nodes(store, "n1")
        wait_for(lambda: ipam(store, "n1") is None, "n1's IPAM object to go")
    finally:
        operator.stop()
    operator.start()
    try:
        with pytest.raises(RuntimeError, match="already started"):
            operator.start()
    finally:
        operator.stop()


@dataclass(frozen=True)
class Event:
    type: str
    key: str


class FakeWatch:
    def __init__(self) -> None:
        self.events: queue.Queue[Event] = queue.Queue()
        self.closed = False

    def get(self, timeout: float | None = None) -> Event | None:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.closed = True


class WatchingStore(ConflictingStore):
    """An SQLite store with ``watch_prefix``: the test feeds the events."""

    def __init__(self, inner: SqliteStore) -> None:
        super().__init__(inner, conflicts=0)
        self.watches: list[FakeWatch] = []

    def watch_prefix(self, prefix: str, start_revision: int | None = None) -> FakeWatch:
        assert prefix == op.NODES_PREFIX
        watch = FakeWatch()
        self.watches.append(watch)
        return watch


class CountingOperator(op.Operator):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.full = 0
        self.targeted: list[set[str]] = []

    def reconcile_once(self) -> op.ReconcileResult:
        result = super().reconcile_once()
        self.full += 1  # counted when done
        return result

    def reconcile_nodes(self, names: Any) -> op.ReconcileResult:
        wanted = set(names)
        result = super().reconcile_nodes(wanted)
        self.targeted.append(wanted)
        return result


def test_watch_events_drive_reconciles_of_the_named_nodes(store: SqliteStore) -> None:
    watching = WatchingStore(store)
    operator = CountingOperator(watching, pool(), resync_interval=3600)
    stop = threading.Event()
    thread = threading.Thread(target=operator.run, args=(stop,))
    thread.start()
    try:
        wait_for(lambda: operator.full == 1 and len(watching.watches) == 1, "the first pass")
        watch = watching.watches[0]
        add_nodes(store, "n1")
        watch.events.put(Event("PUT", op.node_key("n1")))
        wait_for(lambda: {"n1"} in operator.targeted, "a pass over n1")
        assert cidrs_of(store, "n1") == ["10.244.0.0/24"]
        assert operator.full == 1  # the event did it, not a resync

        delete_nodes(store, "n1")
        watch.events.put(Event("DELETE", op.node_key("n1")))
        wait_for(lambda: ipam(store, "n1") is None, "n1's IPAM object to go")

        add_nodes(store, "n2")  # no event for it: the RESYNC catches it up
        watch.events.put(Event("RESYNC", op.NODES_PREFIX))
        wait_for(lambda: ipam(store, "n2") is not None, "n2's CIDR after RESYNC")
        assert operator.full == 2
    finally:
        stop.set()
        thread.join(10)
    assert watching.watches[0].closed


def test_a_watch_that_ends_is_re_created_with_a_full_pass(store: SqliteStore) -> None:
    watching = WatchingStore(store)
    operator = CountingOperator(watching, pool(), resync_interval=3600)
    stop = threading.Event()
    thread = threading.Thread(target=operator.run, args=(stop,))
    thread.start()
    try:
        wait_for(lambda: len(watching.watches) == 1, "the first watch")
        add_nodes(store, "n1")
        watching.watches[0].closed = True  # the stream died
        wait_for(lambda: len(watching.watches) == 2, "a new watch", timeout=15)
        wait_for(lambda: ipam(store, "n1") is not None, "n1's CIDR")
    finally:
        stop.set()
        thread.join(10)


# -- ciliate-operator ---------------------------------------------------------------------

MASK_24 = ("--cluster-pool-ipv4-mask-size", "24")
VALID_V4 = ("--cluster-pool-ipv4-cidr", "10.0.0.0/8", *MASK_24)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(
            ["--cluster-pool-ipv4-cidr", "10.0.0.0/16", "--cluster-pool-ipv4-mask-size", "8"],
            "--cluster-pool-ipv4-mask-size 8 is shorter than the /16 prefix",
            id="mask-shorter-than-prefix",
        ),
        pytest.param(
            [
                *("--cluster-pool-ipv4-cidr", "10.0.0.0/16", "--cluster-pool-ipv4-cidr"),
                *("10.0.1.0/24", "--cluster-pool-ipv4-mask-size", "24"),
            ],
            "entries 10.0.0.0/16 and 10.0.1.0/24 overlap",
            id="overlapping-cidrs",
        ),
        pytest.param(
            ["--cluster-pool-ipv4-cidr", "10.0.0.0/16,10.0.0.0/8", *MASK_24],
            "overlap",
            id="overlapping-comma-separated",
        ),
        pytest.param([], "no cluster CIDRs configured", id="no-family"),
        pytest.param(
            ["--cluster-pool-ipv4-mask-size", "24"],
            "--cluster-pool-ipv4-mask-size is set but --cluster-pool-ipv4-cidr is empty",
            id="mask-without-cidrs",
        ),
        pytest.param(
            ["--cluster-pool-ipv6-cidr", "fd00::/104"],
            "--cluster-pool-ipv6-cidr is set but --cluster-pool-ipv6-mask-size is missing",
            id="cidr-without-mask",
        ),
        pytest.param(
            ["--cluster-pool-ipv6-cidr", "fd00::/48", "--cluster-pool-ipv6-mask-size", "65"],
            "17 bits longer than the /48 prefix",
            id="ipv6-mask-more-than-16-bits-longer",
        ),
        pytest.param(
            ["--cluster-pool-ipv4-cidr", "10.0.0.300/8", "--cluster-pool-ipv4-mask-size", "24"],
            "'10.0.0.300/8' is not a valid CIDR",
            id="invalid-cidr",
        ),
        pytest.param(
            ["--cluster-pool-ipv4-cidr", "fd00::/104", "--cluster-pool-ipv4-mask-size", "24"],
            "move it to --cluster-pool-ipv6-cidr",
            id="wrong-family",
        ),
        pytest.param(
            ["--cluster-pool-ipv4-cidr", "10.0.0.0/8", "--cluster-pool-ipv4-mask-size", "33"],
            "not a valid IPv4 prefix length",
            id="mask-too-long",
        ),
        pytest.param(
            [*VALID_V4, "--kvstore", "sqlite"],
            "--kvstore sqlite needs --kvstore-path",
            id="sqlite-without-path",
        ),
        pytest.param(
            [*VALID_V4, "--resync-interval", "0"],
            "must be positive",
            id="bad-interval",
        ),
    ],
)
def test_cli_configuration_errors_exit_2_with_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert operator_main.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("ciliate-operator: error: ")
    assert err.count("\n") == 1, err
    assert message in err


def test_cli_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert operator_main.main(["--cluster-pool-ipv4-mask-size", "big"]) == 2
    assert "invalid int value" in capsys.readouterr().err
    assert operator_main.main(["--kvstore", "consul"]) == 2


def test_cli_runs_until_sigterm_and_allocates(tmp_path: Path) -> None:
    db = tmp_path / "cluster.db"
    with SqliteStore(db) as s:
        add_nodes(s, "node-1")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "ciliate.control.operator.main", "--kvstore", "sqlite"),
            *("--kvstore-path", str(db), "--poll-interval", "0.02"),
            *("--cluster-pool-ipv4-cidr", "10.244.0.0/16", *MASK_24),
            *("--cluster-pool-ipv6-cidr", "fd00:10:244::/56,fd00:10:245::/56"),
            *("--cluster-pool-ipv6-mask-size", "64"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        with SqliteStore(db) as s:
            wait_for(lambda: ipam(s, "node-1") is not None, "node-1's CIDRs", timeout=30)
            assert cidrs_of(s, "node-1") == ["10.244.0.0/24", "fd00:10:244::/64"]
            add_nodes(s, "node-2")
            wait_for(lambda: ipam(s, "node-2") is not None, "node-2's CIDRs", timeout=30)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "node node-1: allocated 10.244.0.0/24, fd00:10:244::/64" in err
    assert "SIGTERM: stopping" in err


# -- node loss: liveness, grace period, coming back -----------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def register(store: SqliteStore, name: str, *, alive: bool = True) -> None:
    """What an agent writes: its node object and (while it lives) its liveness key."""
    add_nodes(store, name)
    if alive:
        set_alive(store, name, True)


def set_alive(store: SqliteStore, name: str, alive: bool) -> None:
    with store.transaction() as txn:
        if alive:
            txn.put_json(keys.ALIVE + name, {"since": 0})
        else:
            txn.delete(keys.ALIVE + name)  # the lease expired


def put_endpoint(store: SqliteStore, ip: str, node: str) -> None:
    with store.transaction() as txn:
        txn.put_json(keys.ENDPOINTS + ip, {"identity": 300, "nodeIP": "192.168.0.1", "node": node})


def endpoints_of(store: SqliteStore) -> dict[str, str]:
    return {
        key.removeprefix(keys.ENDPOINTS): json.loads(raw)["node"]
        for key, raw in store.list(keys.ENDPOINTS)
    }


def lossy_operator(store: SqliteStore, clock: FakeClock, grace: float = 30) -> op.Operator:
    return op.Operator(store, pool(), node_grace_period=grace, clock=clock)


def test_a_node_without_liveness_for_the_grace_period_is_removed_and_its_cidr_freed(
    store: SqliteStore,
) -> None:
    clock = FakeClock()
    operator = lossy_operator(store, clock)
    register(store, "node-a")
    register(store, "node-b")
    operator.reconcile_once()
    put_endpoint(store, "10.244.0.5", "node-a")
    put_endpoint(store, "10.244.1.5", "node-b")
    set_alive(store, "node-a", False)

    assert operator.collect_lost_nodes() == []  # the clock starts now
    clock.now += 29.9
    assert operator.collect_lost_nodes() == []
    assert cidrs_of(store, "node-a") == ["10.244.0.0/24"]
    clock.now += 0.1
    assert operator.collect_lost_nodes() == ["node-a"]

    assert store.get(op.node_key("node-a")) is None
    assert ipam(store, "node-a") is None  # released at once, not at the next event
    assert endpoints_of(store) == {"10.244.1.5": "node-b"}
    assert operator.pool.node_cidrs("node-a") is None
    assert cidrs_of(store, "node-b") == ["10.244.1.0/24"]
    operator.pool.occupy("probe", ["10.244.0.0/24"])  # free: the pool lets it be taken
    operator.pool.release("probe")
    register(store, "node-c")
    operator.reconcile_once()
    assert len(cidrs_of(store, "node-c")) == 1  # a new node gets a CIDR
    assert_no_duplicates(all_ipam(store))


def test_liveness_back_within_the_grace_period_keeps_the_node_and_restarts_the_clock(
    store: SqliteStore,
) -> None:
    clock = FakeClock()
    operator = lossy_operator(store, clock)
    register(store, "node-a")
    operator.reconcile_once()
    set_alive(store, "node-a", False)
    operator.collect_lost_nodes()
    clock.now += 20
    set_alive(store, "node-a", True)  # the agent restarted and renewed it
    assert operator.collect_lost_nodes() == []
    set_alive(store, "node-a", False)
    assert operator.collect_lost_nodes() == []  # a new grace period starts
    clock.now += 20
    assert operator.collect_lost_nodes() == []  # 20 s < 30 s
    clock.now += 10
    assert operator.collect_lost_nodes() == ["node-a"]


class LivenessLagsStore:
    """The listing of liveness keys is stale: the node renewed its key after it."""

    def __init__(self, store: SqliteStore) -> None:
        self._store = store

    def list(self, prefix: str) -> KeyValues:
        if prefix == keys.ALIVE:
            return []
        return self._store.list(prefix)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_the_removal_re_checks_liveness_in_its_transaction(store: SqliteStore) -> None:
    clock = FakeClock()
    register(store, "node-a")
    operator = op.Operator(
        LivenessLagsStore(store),  # type: ignore[arg-type]
        pool(),
        node_grace_period=0,
        clock=clock,
    )
    operator.reconcile_once()
    assert operator.collect_lost_nodes() == []
    assert store.get(op.node_key("node-a")) is not None
    assert cidrs_of(store, "node-a") == ["10.244.0.0/24"]


def test_a_node_coming_back_under_its_name_gets_its_cidr_back_if_still_free(
    store: SqliteStore,
) -> None:
    clock = FakeClock()
    operator = lossy_operator(store, clock, grace=0)
    for name in ("node-a", "node-b", "node-c"):
        register(store, name)
    operator.reconcile_once()
    assert cidrs_of(store, "node-b") == ["10.244.1.0/24"]
    set_alive(store, "node-b", False)
    assert operator.collect_lost_nodes() == ["node-b"]
    register(store, "node-d")
    operator.reconcile_once()
    register(store, "node-b")  # back, under the same name
    result = operator.reconcile_once()
    assert cidrs_of(store, "node-b") == ["10.244.1.0/24"]
    assert result.restored == {"node-b": ["10.244.1.0/24"]}
    assert store.get(keys.RELEASED + "node-b") is None
    assert_no_duplicates(all_ipam(store))


def test_a_node_coming_back_after_its_cidr_was_taken_gets_another(store: SqliteStore) -> None:
    clock = FakeClock()
    operator = lossy_operator(store, clock, grace=0)
    register(store, "node-a")
    register(store, "node-b")
    operator.reconcile_once()
    set_alive(store, "node-a", False)
    assert operator.collect_lost_nodes() == ["node-a"]
    register(store, "node-c")
    put_ipam(store, "node-c", ["10.244.0.0/24"])  # node-a's former CIDR, taken
    operator.reconcile_once()
    register(store, "node-a")
    result = operator.reconcile_once()
    assert cidrs_of(store, "node-c") == ["10.244.0.0/24"]
    assert len(cidrs_of(store, "node-a")) == 1
    assert "node-a" not in result.restored
    assert store.get(keys.RELEASED + "node-a") is None  # used up: not tried again
    assert_no_duplicates(all_ipam(store))


def test_without_a_grace_period_no_node_is_ever_removed(store: SqliteStore) -> None:
    clock = FakeClock()
    operator = op.Operator(store, pool(), clock=clock)
    register(store, "node-a", alive=False)
    operator.reconcile_once()
    clock.now += 1e6
    assert operator.collect_lost_nodes() == []
    assert cidrs_of(store, "node-a") == ["10.244.0.0/24"]


def test_the_running_operator_removes_a_lost_node_on_its_own(store: SqliteStore) -> None:
    register(store, "node-a")
    register(store, "node-b")
    operator = op.Operator(store, pool(), poll_interval=0.02, node_grace_period=0.2)
    operator.start()
    try:
        set_alive(store, "node-a", False)
        wait_for(lambda: ipam(store, "node-a") is None, "node-a's CIDR released")
        assert store.get(op.node_key("node-a")) is None
        assert cidrs_of(store, "node-b") == ["10.244.1.0/24"]
    finally:
        operator.stop()


def test_a_negative_grace_period_is_refused(store: SqliteStore) -> None:
    with pytest.raises(ValueError, match="node_grace_period"):
        op.Operator(store, pool(), node_grace_period=-1)


# -- the benchmark ------------------------------------------------------------------------


def test_the_benchmark_runs_and_checks_its_result(capsys: pytest.CaptureFixture[str]) -> None:
    results = cidr_alloc.run(nodes=300)
    assert results["nodes"] == 300
    for key in ("allocator_ms", "write_nodes_ms", "reconcile_ms", "resync_ms", "restart_ms"):
        assert results[key] > 0
    assert results["reconcile_nodes_per_s"] > 0
    cidr_alloc.print_table(results)
    assert "one reconcile" in capsys.readouterr().out


def test_the_benchmark_measures_the_production_operator() -> None:
    subjects = cidr_alloc.real_subjects()
    assert subjects.make_operator is op.Operator
