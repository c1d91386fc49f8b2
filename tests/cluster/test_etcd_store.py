"""EtcdStore against a real etcd on loopback: the Store contract, optimistic transactions
(conflicts, retries, phantom guard), watches (also across an etcd restart and after
compaction), leases (expiry, survival across a restart, re-grant) and HostIpam on it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import TypeVar

import pytest

from ciliate.control.ipam.host import HostIpam
from ciliate.control.lab.etcd_server import EtcdServer
from ciliate.control.store import (
    StoreClosedError,
    StoreConflictError,
    StoreError,
    StoreKeyError,
    StoreUnavailableError,
    TxnFinishedError,
)
from ciliate.control.store.etcd import EtcdStore, EtcdTxn, WatchEvent, WatchEventType

from . import etcd_fixtures
from .etcd_fixtures import StoreFactory

# The shared fixtures (see etcd_fixtures), made visible to pytest in this module.
require_etcd = etcd_fixtures.require_etcd
etcd_server = etcd_fixtures.etcd_server
private_etcd = etcd_fixtures.private_etcd
store_factory = etcd_fixtures.store_factory

T = TypeVar("T")


def eventually(fn: Callable[[], T], *, timeout: float = 10.0, interval: float = 0.1) -> T:
    """``fn()`` once it stops raising StoreUnavailableError / AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except (StoreUnavailableError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(interval)


def drain(watch: object, count: int, timeout: float = 10.0) -> list[WatchEvent]:
    from ciliate.control.store.etcd import EtcdWatch

    assert isinstance(watch, EtcdWatch)
    events: list[WatchEvent] = []
    deadline = time.monotonic() + timeout
    while len(events) < count and time.monotonic() < deadline:
        event = watch.get(timeout=0.2)
        if event is not None:
            events.append(event)
    return events


def aetcd_call(server: EtcdServer, fn: Callable[..., object]) -> object:
    """Run ``await fn(client)`` with a separate aetcd client: "someone else" acting."""
    import aetcd

    async def main() -> object:
        async with aetcd.Client(host="127.0.0.1", port=server.client_port) as client:
            return await fn(client)  # type: ignore[misc]

    return asyncio.run(main())


# -- the Store contract -----------------------------------------------------------------


def test_crud_list_and_prefix_isolation(store_factory: StoreFactory) -> None:
    store = store_factory()
    other = store_factory(prefix=store.prefix + "x-other/")
    with store.transaction() as txn:
        txn.put("b/2", b"two")
        txn.put("b/1", b"one")
        txn.put("a", b"\x00\xff")
        txn.put_json("j", {"z": 1, "a": [True, None]})
    with other.transaction() as txn:
        txn.put("b/9", b"elsewhere")
    assert store.get("b/1") == b"one"
    assert store.get("missing") is None
    assert store.get("a") == b"\x00\xff"
    assert store.get_json("j") == {"a": [True, None], "z": 1}
    assert store.get("j") == b'{"a":[true,null],"z":1}'
    assert store.list("b/") == [("b/1", b"one"), ("b/2", b"two")]
    # The other store's keys live under store.prefix + "x-other/": visible as such here,
    # and the other store sees only its own.
    assert ("x-other/b/9", b"elsewhere") in store.list("")
    assert other.list("") == [("b/9", b"elsewhere")]

    before = store.revision()
    with store.transaction() as txn:
        assert txn.delete("b/1") is True
        assert txn.delete("b/1") is False
        assert txn.delete("nope") is False
        txn.put("b/3", b"three")
    assert store.revision() == before + 1  # one etcd revision per committed transaction
    assert store.list("b/") == [("b/2", b"two"), ("b/3", b"three")]
    with store.transaction() as txn:
        assert txn.delete_prefix("b/") == 2
        assert txn.list("b/") == []
        txn.put("b/4", b"after")  # a put after delete_prefix wins
    assert store.list("b/") == [("b/4", b"after")]

    with pytest.raises(StoreKeyError), store.transaction() as txn:
        txn.delete_prefix("")
    with pytest.raises(StoreKeyError):
        store.get("")
    with pytest.raises(TypeError), store.transaction() as txn:
        txn.put("k", "text")  # type: ignore[arg-type]


def test_rollback_and_own_writes(store_factory: StoreFactory) -> None:
    store = store_factory()
    store.run_transaction(lambda txn: txn.put("k", b"v1"))
    with pytest.raises(RuntimeError), store.transaction() as txn:
        txn.put("k", b"v2")
        txn.put("new", b"x")
        assert txn.get("k") == b"v2"  # reads see the transaction's own writes
        assert txn.list("") == [("k", b"v2"), ("new", b"x")]
        assert store.get("k") == b"v1"  # ... nobody else does before the commit
        raise RuntimeError("abort")
    assert store.get("k") == b"v1"
    assert store.get("new") is None
    kept: list[EtcdTxn] = []
    with store.transaction() as txn:
        kept.append(txn)
    with pytest.raises(TxnFinishedError):
        kept[0].get("k")
    with store.transaction(), pytest.raises(StoreError, match="nest"), store.transaction():
        pass


def test_transaction_reads_one_snapshot(store_factory: StoreFactory) -> None:
    store, other = store_factory(), store_factory()
    store.run_transaction(lambda txn: (txn.put("a", b"1"), txn.put("b", b"1")))
    with store.transaction() as txn:
        assert txn.get("a") == b"1"
        other.run_transaction(lambda t: (t.put("a", b"2"), t.put("b", b"2")))
        assert txn.get("b") == b"1"  # same revision as the first read
        assert txn.list("") == [("a", b"1"), ("b", b"1")]
    # read-only: nothing to commit, so no conflict either


def test_get_many_reads_the_snapshot_and_guards_every_key(store_factory: StoreFactory) -> None:
    store, other = store_factory(), store_factory()
    store.run_transaction(lambda txn: txn.put("a", b"1"))
    with store.transaction() as txn:
        assert txn.get("a") == b"1"  # fixes the read revision
        other.run_transaction(lambda t: (t.put("a", b"2"), t.put("b", b"2")))
        assert txn.get_many(["a", "b", "c"]) == [b"1", None, None]  # same snapshot
    # a key read as absent by get_many that another writer creates makes the commit fail
    with pytest.raises(StoreConflictError), store.transaction() as txn:
        assert txn.get_many(["c", "d"]) == [None, None]
        other.run_transaction(lambda t: t.put("d", b"other"))
        txn.put("c", b"mine")
    assert store.get_many(["a", "b", "c", "d"]) == [b"2", b"2", None, b"other"]


def test_create_writes_only_if_every_named_key_is_absent(store_factory: StoreFactory) -> None:
    store = store_factory()
    assert store.create({"a": b"1", "b": b"1"}, absent=["a", "b"]) is True
    assert store.create({"c": b"2", "b": b"2"}, absent=["c", "b"]) is False
    assert store.get_many(["a", "b", "c"]) == [b"1", b"1", None]  # nothing of the loser
    lease = store.lease(2)
    assert store.create({"leased": b"x"}, absent=["leased"], leases={"leased": lease})
    assert lease.keys() == ["leased"]
    lease.revoke()
    assert store.get("leased") is None  # it was bound to the lease


def test_interleaved_transactions_one_conflict(store_factory: StoreFactory) -> None:
    first, second = store_factory(), store_factory()
    first.run_transaction(lambda txn: txn.put_json("counter", 0))
    with pytest.raises(StoreConflictError), first.transaction() as t1:
        v1 = t1.get_json("counter")
        assert isinstance(v1, int)
        with second.transaction() as t2:
            v2 = t2.get_json("counter")
            assert isinstance(v2, int)
            t2.put_json("counter", v2 + 10)
        t1.put_json("counter", v1 + 1)
    assert first.get_json("counter") == 10  # the winner's write stands, the loser's is gone

    # an absent key read by both: the second creator conflicts
    with pytest.raises(StoreConflictError), first.transaction() as t1:
        assert t1.get("owner") is None
        second.run_transaction(lambda t: t.put("owner", b"second"))
        t1.put("owner", b"first")
    assert first.get("owner") == b"second"

    # a key deleted under a reader
    with pytest.raises(StoreConflictError), first.transaction() as t1:
        assert t1.get("owner") == b"second"
        second.run_transaction(lambda t: t.delete("owner"))
        t1.put("claimed", b"because owner was second")
    assert first.get("claimed") is None

    # blind writes (no reads) never conflict
    with first.transaction() as t1:
        t1.put("blind", b"1")
        second.run_transaction(lambda t: t.put("blind", b"2"))
    assert first.get("blind") == b"1"


def test_run_transaction_counter_from_threads_and_stores(store_factory: StoreFactory) -> None:
    stores = [store_factory(), store_factory()]

    def increment(txn: EtcdTxn) -> int:
        value = txn.get_json("counter") or 0
        assert isinstance(value, int)
        txn.put_json("counter", value + 1)
        return value + 1

    errors: list[BaseException] = []

    def worker(store: EtcdStore) -> None:
        try:
            for _ in range(50):
                store.run_transaction(increment, retries=200)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in stores for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert stores[0].get_json("counter") == 500
    assert sum(s.stats["commits"] for s in stores) == 500
    assert sum(s.stats["conflicts"] for s in stores) > 0  # they did contend


def test_run_transaction_gives_up_after_retries(store_factory: StoreFactory) -> None:
    store, other = store_factory(), store_factory()
    store.run_transaction(lambda txn: txn.put("k", b"0"))
    calls = []

    def always_loses(txn: EtcdTxn) -> None:
        calls.append(1)
        txn.get("k")
        other.run_transaction(lambda t: t.put("k", str(len(calls)).encode()))
        txn.put("k", b"mine")

    with pytest.raises(StoreConflictError):
        store.run_transaction(always_loses, retries=3)
    assert len(calls) == 4


def test_list_guards_against_phantoms_and_deletes(store_factory: StoreFactory) -> None:
    store, other = store_factory(), store_factory()
    store.run_transaction(lambda txn: (txn.put("pool/a", b"1"), txn.put("pool/b", b"1")))

    def summarize_while(change: Callable[[EtcdTxn], object]) -> None:
        with store.transaction() as txn:
            n = len(txn.list("pool/"))
            other.run_transaction(change)
            txn.put("summary", str(n).encode())

    for change in (
        lambda t: t.put("pool/c", b"1"),  # a key added in the range (a phantom)
        lambda t: t.delete("pool/a"),  # a listed key deleted
        lambda t: t.put("pool/b", b"2"),  # a listed key changed
        lambda t: (t.delete("pool/b"), t.put("pool/b", b"1")),  # deleted and re-created
    ):
        with pytest.raises(StoreConflictError):
            summarize_while(change)
    assert store.get("summary") is None
    # a change outside the range does not disturb it
    summarize_while(lambda t: t.put("poolx", b"1"))
    assert store.get("summary") == b"2"

    # an empty range is guarded too
    with pytest.raises(StoreConflictError), store.transaction() as txn:
        assert txn.list("empty/") == []
        other.run_transaction(lambda t: t.put("empty/1", b"1"))
        txn.put("first", b"yes")

    # delete_prefix: a key added meanwhile would survive a blind range delete; here the
    # transaction conflicts instead
    with pytest.raises(StoreConflictError), store.transaction() as txn:
        assert txn.delete_prefix("pool/") == 2  # pool/b and pool/c by now
        other.run_transaction(lambda t: t.put("pool/late", b"1"))
    assert len(store.list("pool/")) == 3


def test_large_transaction(store_factory: StoreFactory) -> None:
    # 300 writes, then a transaction that reads all 300 (300 compares): within the
    # --max-txn-ops EtcdServer configures (etcd's default of 128 would refuse it).
    store = store_factory()
    store.run_transaction(lambda txn: [txn.put(f"big/{i:04d}", b"x") for i in range(300)])

    def count(txn: EtcdTxn) -> None:
        txn.put_json("big-count", len(txn.list("big/")))

    store.run_transaction(count)
    assert store.get_json("big-count") == 300


def test_store_closed(store_factory: StoreFactory) -> None:
    store = store_factory()
    store.close()
    with pytest.raises(StoreClosedError):
        store.get("k")
    with pytest.raises(StoreClosedError), store.transaction():
        pass


# -- watches ----------------------------------------------------------------------------


def test_watch_events_in_order(store_factory: StoreFactory) -> None:
    store, writer = store_factory(), store_factory()
    with store.watch_prefix("w/") as watch:
        writer.run_transaction(lambda t: t.put("w/a", b"1"))
        writer.run_transaction(lambda t: t.put("w/a", b"2"))
        writer.run_transaction(lambda t: t.put("elsewhere", b"x"))
        writer.run_transaction(lambda t: (t.put("w/b", b"1"), t.put("w/c", b"1")))
        writer.run_transaction(lambda t: t.delete_prefix("w/"))
        events = drain(watch, 7)
    got = [(e.type.value, e.key, e.value) for e in events]
    assert got[:4] == [
        ("PUT", "w/a", b"1"),
        ("PUT", "w/a", b"2"),
        ("PUT", "w/b", b"1"),
        ("PUT", "w/c", b"1"),
    ]
    assert sorted(got[4:]) == [
        ("DELETE", "w/a", None),
        ("DELETE", "w/b", None),
        ("DELETE", "w/c", None),
    ]
    revisions = [e.mod_revision for e in events]
    assert revisions == sorted(revisions)
    assert revisions[2] == revisions[3]  # one transaction, one revision
    assert len(set(revisions[4:])) == 1
    assert watch.get(timeout=0.1) is None  # closed


def test_watch_from_revision_replays_history(store_factory: StoreFactory) -> None:
    store = store_factory()
    start = store.revision() + 1
    for i in range(3):
        store.run_transaction(lambda t, i=i: t.put(f"h/{i}", str(i).encode()))
    with store.watch_prefix("h/", start_revision=start) as watch:
        events = drain(watch, 3)
    assert [(e.key, e.value) for e in events] == [("h/0", b"0"), ("h/1", b"1"), ("h/2", b"2")]


def test_watch_resyncs_after_compaction(
    store_factory: StoreFactory, etcd_server: EtcdServer
) -> None:
    store = store_factory()
    start = store.revision() + 1
    store.run_transaction(lambda t: t.put("c/1", b"old"))
    store.run_transaction(lambda t: t.put("c/1", b"new"))
    store.run_transaction(lambda t: t.put("c/2", b"x"))
    current = store.revision()
    aetcd_call(etcd_server, lambda client: client.compact(current, physical=True))
    with store.watch_prefix("c/", start_revision=start) as watch:
        events = drain(watch, 1)
        assert events and events[0].type is WatchEventType.RESYNC
        assert events[0].items == (("c/1", b"new"), ("c/2", b"x"))
        assert events[0].mod_revision >= current
        store.run_transaction(lambda t: t.put("c/3", b"y"))  # then it goes on normally
        (after,) = drain(watch, 1)
    assert (after.type, after.key, after.value) == (WatchEventType.PUT, "c/3", b"y")


def test_watch_survives_etcd_restart(private_etcd: EtcdServer, store_factory: StoreFactory) -> None:
    store = store_factory(private_etcd)
    writer = store_factory(private_etcd)
    watch = store.watch_prefix("r/")
    for i in range(5):
        writer.run_transaction(lambda t, i=i: t.put(f"r/{i}", b"before"))
    assert len(drain(watch, 5)) == 5
    private_etcd.stop()
    with pytest.raises(StoreUnavailableError):
        writer.get("r/0")
    with pytest.raises(StoreUnavailableError), writer.transaction() as txn:
        txn.get("r/0")
    private_etcd.start()
    for i in range(5, 10):
        eventually(lambda i=i: writer.run_transaction(lambda t: t.put(f"r/{i}", b"after")))
    private_etcd.kill()  # a crash this time
    private_etcd.start()
    for i in range(10, 15):
        eventually(lambda i=i: writer.run_transaction(lambda t: t.put(f"r/{i}", b"crash")))
    events = drain(watch, 10)
    watch.close()
    assert [e.key for e in events] == [f"r/{i}" for i in range(5, 15)]  # none lost, none twice
    assert watch.reconnects >= 1
    assert [e.mod_revision for e in events] == sorted({e.mod_revision for e in events})


# -- leases -----------------------------------------------------------------------------


def test_lease_expiry_removes_key(store_factory: StoreFactory) -> None:
    store = store_factory()
    lease = store.lease(1)
    store.put_with_lease("nodes/n1", b"alive", lease)
    with store.transaction() as txn:
        txn.put("nodes/n2", b"alive", lease=lease)
    assert lease.keys() == ["nodes/n1", "nodes/n2"]
    time.sleep(3)  # several TTLs: the keepalive holds it
    assert store.get("nodes/n1") == b"alive"
    lease.close()  # stop the keepalive: the keys expire with the lease

    def gone() -> None:
        assert store.list("nodes/") == []

    eventually(gone, timeout=10)

    other = store.lease(5)
    store.put_with_lease("nodes/n3", b"alive", other)
    other.revoke()
    assert store.get("nodes/n3") is None


def test_lease_survives_restart_and_is_regranted(
    private_etcd: EtcdServer, store_factory: StoreFactory
) -> None:
    store = store_factory(private_etcd)
    lease = store.lease(2)
    store.put_with_lease("nodes/me", b"alive", lease)
    private_etcd.stop()
    time.sleep(3)  # longer than the TTL
    private_etcd.start()
    time.sleep(4)  # two TTLs after the restart: the keepalive must have resumed
    assert eventually(lambda: store.get("nodes/me")) == b"alive"

    # The lease disappears behind the store's back (expired during a partition, revoked):
    # a new one is granted and the liveness key put again, by itself.
    old_id = lease.id
    aetcd_call(private_etcd, lambda client: client.revoke_lease(old_id))
    assert store.get("nodes/me") is None

    def back() -> None:
        assert store.get("nodes/me") == b"alive"

    eventually(back, timeout=10)
    assert lease.id != old_id and lease.regrants == 1
    lease.close()


# -- callers written against Txn ----------------------------------------------------------


def test_host_ipam_on_etcd(store_factory: StoreFactory) -> None:
    stores = [store_factory(), store_factory()]
    ipams = [HostIpam(s, ["10.20.0.0/27"]) for s in stores]
    got: dict[str, IPv4Address] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            store, ipam = stores[n % 2], ipams[n % 2]
            for i in range(5):
                owner = f"c{n}-{i}/eth0"
                ip = store.run_transaction(
                    lambda t, o=owner: ipam.allocate(t, owner=o), retries=100
                )
                with lock:
                    got[owner] = ip
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(set(got.values())) == len(got) == 20  # no address handed out twice
    assert ipams[1].allocations() == {ip: owner for owner, ip in got.items()}
    # idempotent, and release through the other store
    assert (
        stores[0].run_transaction(lambda t: ipams[0].allocate(t, owner="c0-0/eth0"))
        == got["c0-0/eth0"]
    )
    released = stores[1].run_transaction(lambda t: ipams[1].release(t, owner="c0-0/eth0"))
    assert released == got["c0-0/eth0"]
    assert ipams[0].ip_of("c0-0/eth0") is None
    assert len(ipams[0].allocations()) == 19
