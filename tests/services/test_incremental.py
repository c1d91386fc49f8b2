"""Passes that cost what changed: the change feed reads only the objects written
since the last poll (and sees deletions), the EndpointSlice controller recomputes
and writes only the Services a change touches, the node's table recomputes only
the Services whose object or slices changed, ids are written only for new
frontends, and a full resync puts right what an incremental pass missed."""

from __future__ import annotations

import contextlib
import ipaddress
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

from ciliate.control.cluster import keys
from ciliate.control.objects import KINDS, ObjectStore, object_key
from ciliate.control.operator.endpointslices import EndpointSliceController
from ciliate.control.services.changes import ObjectChanges
from ciliate.control.services.ids import LbIds
from ciliate.control.services.node import NodeTable
from ciliate.control.services.slices import (
    MANAGED_BY_LABEL,
    PodAddress,
    SliceController,
    reconcile,
)
from ciliate.control.services.table import FrontendKey, service_table
from ciliate.control.store import KeyValues, SqliteStore, Store, StoreUnavailableError, Txn

from ..cluster import etcd_fixtures

require_etcd = etcd_fixtures.require_etcd
etcd_server = etcd_fixtures.etcd_server
store_factory = etcd_fixtures.store_factory

SERVICE, POD, SLICE = KINDS["Service"], KINDS["Pod"], KINDS["EndpointSlice"]
KINDS_WATCHED = [SERVICE, POD, SLICE]
COUNT = 40


def service(name: str, app: str, *, port: int = 80) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"selector": {"app": app}, "ports": [{"port": port, "targetPort": 8080}]},
    }


def pod(name: str, app: str, ip: str, **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": app}, **meta},
        "spec": {"containers": [{"name": "c"}]},
        "status": {"podIP": ip},
    }


class CountingObjects(ObjectStore):
    """The real object store, counting the documents written and deleted."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.applied: list[str] = []
        self.deleted: list[str] = []

    def apply(self, documents: Sequence[Mapping[str, Any]]) -> Any:
        self.applied += [d["metadata"]["name"] for d in documents]
        return super().apply(documents)

    def delete(self, refs: Sequence[Any], *, ignore_missing: bool = False) -> Any:
        self.deleted += [r.name for r in refs]
        return super().delete(refs, ignore_missing=ignore_missing)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    with SqliteStore(tmp_path / "state.db") as s:
        yield s


def many_services(store: Store) -> None:
    """COUNT Services, each selecting its own pod."""
    objects = ObjectStore(store)
    docs: list[dict[str, Any]] = []
    for i in range(COUNT):
        docs += [service(f"s{i}", f"a{i}"), pod(f"p{i}", f"a{i}", f"10.0.0.{i + 1}")]
    objects.apply(docs)


# -- the change feed ------------------------------------------------------------------


class ValuesOnly:
    """A store without ``list_revisions`` (the feed compares values instead)."""

    def __init__(self, inner: SqliteStore) -> None:
        self._inner = inner

    def get(self, key: str) -> bytes | None:
        return self._inner.get(key)

    def list(self, prefix: str) -> KeyValues:
        return self._inner.list(prefix)

    def get_json(self, key: str) -> Any:
        return self._inner.get_json(key)

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return self._inner.get_many(keys)

    def transaction(self) -> AbstractContextManager[Txn]:
        return self._inner.transaction()

    def revision(self) -> int:
        return self._inner.revision()

    def close(self) -> None:
        self._inner.close()


def test_the_store_lists_keys_written_after_a_revision_and_counts_them(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with SqliteStore(path) as store:
        with store.transaction() as txn:
            txn.put("objects/pod/default/a", b"1")
            txn.put("objects/pod/default/b", b"1")
        first = store.revision()
        with store.transaction() as txn:
            txn.put("objects/pod/default/b", b"2")
            txn.put("objects/service/default/b", b"2")
        assert store.list_revisions("objects/pod/", after=first) == [
            ("objects/pod/default/b", first + 1)
        ]
        assert store.list_revisions("objects/pod/") == [
            ("objects/pod/default/a", first),
            ("objects/pod/default/b", first + 1),
        ]
        assert store.count("objects/pod/") == 2 and store.count("objects/none/") == 0
    # A store made before the revision index: the index is built on first use.
    raw = sqlite3.connect(path)
    raw.execute("DROP INDEX kv_key_revision")
    raw.commit()
    raw.close()
    with SqliteStore(path) as store:
        revision = store.revision()
        assert store.count("objects/pod/") == 2
        assert store.revision() == revision  # building it is no write of a key
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT 1 FROM sqlite_master WHERE name = 'kv_key_revision'").fetchone()
    raw.close()


def feed_reports_writes_and_deletions(objects: ObjectStore, feed: ObjectChanges) -> None:
    objects.apply([service("a", "x"), service("b", "y"), pod("p", "x", "10.0.0.1")])
    first = feed.poll()
    assert first.full and sorted(first.of("Service")) == [
        object_key(SERVICE, name="a", namespace="default"),
        object_key(SERVICE, name="b", namespace="default"),
    ]
    assert feed.poll().empty  # nothing written since
    objects.apply([service("a", "x", port=81)])
    objects.delete(objects.refs_of([service("b", "y")]))
    objects.apply([service("a", "x", port=81)])  # unchanged: not written, not reported
    changes = feed.poll()
    assert not changes.full
    assert [s["spec"]["ports"][0]["port"] for s in changes.of("Service").values()] == [81]
    assert changes.gone("Service") == {object_key(SERVICE, name="b", namespace="default")}
    assert changes.of("Pod") == {} and changes.gone("Pod") == set()
    # A deletion and a creation between two polls (the count alone would not tell).
    objects.delete(objects.refs_of([pod("p", "x", "")]))
    objects.apply([pod("q", "x", "10.0.0.2")])
    changes = feed.poll()
    assert list(changes.of("Pod")) == [object_key(POD, name="q", namespace="default")]
    assert changes.gone("Pod") == {object_key(POD, name="p", namespace="default")}
    feed.reset()
    again = feed.poll()
    assert again.full and len(again.of("Service")) == 1 and len(again.of("Pod")) == 1


@pytest.mark.parametrize("by", ["revision", "value"])
def test_the_feed_reports_everything_first_then_only_what_was_written_or_deleted(
    store: SqliteStore, by: str
) -> None:
    reader = store if by == "revision" else ValuesOnly(store)
    feed_reports_writes_and_deletions(
        ObjectStore(store),
        ObjectChanges(reader, KINDS_WATCHED),  # type: ignore[arg-type]
    )


def test_the_feed_reads_etcd_by_revision_too(
    store_factory: etcd_fixtures.StoreFactory,
) -> None:
    etcd = store_factory()
    feed_reports_writes_and_deletions(ObjectStore(etcd), ObjectChanges(etcd, KINDS_WATCHED))


class FailingOnce(ValuesOnly):
    """The real store whose listing of one prefix fails once (a locked file, a full
    disk)."""

    def __init__(self, inner: SqliteStore, prefix: str) -> None:
        super().__init__(inner)
        self.fail_prefix: str | None = prefix

    def list_revisions(self, prefix: str, *, after: int = 0) -> list[tuple[str, int]]:
        if prefix == self.fail_prefix:
            self.fail_prefix = None
            raise StoreUnavailableError("the store is away")
        return self._inner.list_revisions(prefix, after=after)

    def count(self, prefix: str) -> int:
        return self._inner.count(prefix)


def test_a_failed_poll_loses_no_change(store: SqliteStore) -> None:
    objects = ObjectStore(store)
    objects.apply([service("a", "x")])
    flaky = FailingOnce(store, prefix="")
    feed = ObjectChanges(flaky, KINDS_WATCHED)  # type: ignore[arg-type]
    feed.poll()
    objects.apply([service("b", "x"), pod("p", "x", "10.0.0.1")])
    flaky.fail_prefix = "objects/endpointslice/"  # Services and Pods read, then a failure
    with pytest.raises(StoreUnavailableError):
        feed.poll()
    changes = feed.poll()
    assert [s["metadata"]["name"] for s in changes.of("Service").values()] == ["b"]
    assert [p["metadata"]["name"] for p in changes.of("Pod").values()] == ["p"]


# -- the EndpointSlice controller -------------------------------------------------------


def controller_over(store: Store) -> tuple[SliceController, CountingObjects, ObjectChanges]:
    objects = CountingObjects(store)
    return SliceController(objects), objects, ObjectChanges(store, KINDS_WATCHED)


def test_one_service_changed_among_many_is_the_only_one_recomputed_and_written(
    store: SqliteStore,
) -> None:
    many_services(store)
    controller, objects, feed = controller_over(store)
    first = controller.sync(feed.poll(), addresses={})
    assert first.services_recomputed == COUNT and len(first.created) == COUNT
    # Its own writes come back through the feed: compared, not recomputed nor written.
    objects.applied.clear()
    settled = controller.sync(feed.poll(), addresses={})
    assert settled.services_recomputed == 0 and objects.applied == []

    ObjectStore(store).apply([service("s7", "a7", port=8080)])
    result = controller.sync(feed.poll(), addresses={})
    assert result.services_recomputed == 1 and not result.changed  # same pods, same slice

    ObjectStore(store).apply([pod("p7b", "a7", "10.0.1.7")])
    result = controller.sync(feed.poll(), addresses={})
    assert result.services_recomputed == 1
    assert [r.split("-")[0] for r in result.updated] == ["default/s7"]
    assert [name.split("-")[0] for name in objects.applied] == ["s7"]


def test_a_published_address_moving_recomputes_the_services_of_that_pod_only(
    store: SqliteStore,
) -> None:
    many_services(store)
    controller, _, feed = controller_over(store)
    controller.sync(feed.poll(), addresses={})
    controller.sync(feed.poll(), addresses={})
    moved = {"default/p3": PodAddress(ipaddress.IPv4Address("10.79.0.3"), "node-a")}
    result = controller.sync(feed.poll(), addresses=moved)
    assert result.services_recomputed == 1
    (slice_,) = result.written.values()
    assert slice_["endpoints"][0]["addresses"] == ["10.79.0.3"]
    assert slice_["endpoints"][0]["nodeName"] == "node-a"


def test_services_and_pods_deleted_and_selectors_dropped_are_followed(
    store: SqliteStore,
) -> None:
    many_services(store)
    controller, _, feed = controller_over(store)
    controller.sync(feed.poll(), addresses={})
    plain = ObjectStore(store)
    plain.delete(plain.refs_of([service("s1", "a1")]))
    plain.delete(plain.refs_of([pod("p2", "a2", "")]))
    plain.apply([{**service("s3", "a3"), "spec": {"ports": [{"port": 80}]}}])
    result = controller.sync(feed.poll(), addresses={})
    assert result.services_recomputed == 3
    # s1 (deleted) and s3 (no selector) lose theirs; s2's slice of its one pod gives
    # way to the empty one a Service selecting nothing keeps.
    assert sorted(r.split("-")[0] for r in result.deleted) == [
        "default/s1",
        "default/s2",
        "default/s3",
    ]
    assert [
        (s["metadata"]["name"].split("-")[0], s["endpoints"]) for s in result.written.values()
    ] == [("s2", [])]
    managed = [
        s["metadata"]["labels"]["kubernetes.io/service-name"]
        for s in plain.list(SLICE)
        if s["metadata"]["labels"].get(MANAGED_BY_LABEL)
    ]
    assert "s1" not in managed and "s3" not in managed and "s2" in managed


def test_a_slice_deleted_or_edited_behind_its_back_is_put_back(store: SqliteStore) -> None:
    many_services(store)
    controller, _, feed = controller_over(store)
    controller.sync(feed.poll(), addresses={})
    controller.sync(feed.poll(), addresses={})
    plain = ObjectStore(store)
    (mine,) = [s for s in plain.list(SLICE) if s["metadata"]["name"].startswith("s5-")]
    plain.delete(plain.refs_of([mine]))
    edited = next(s for s in plain.list(SLICE) if s["metadata"]["name"].startswith("s6-"))
    edited["endpoints"] = []
    plain.apply([edited])
    result = controller.sync(feed.poll(), addresses={})
    assert result.services_recomputed == 2
    assert sorted(result.created + result.updated) == sorted(
        [f"default/{mine['metadata']['name']}", f"default/{edited['metadata']['name']}"]
    )


def test_a_missed_change_is_healed_by_the_next_full_resync(store: SqliteStore) -> None:
    many_services(store)
    controller, _, feed = controller_over(store)
    controller.sync(feed.poll(), addresses={})
    ObjectStore(store).apply([pod("p9b", "a9", "10.0.2.9")])
    feed.poll()  # the change is read but lost: never given to the controller
    assert controller.sync(feed.poll(), addresses={}).services_recomputed == 0
    feed.reset()
    healed = controller.sync(feed.poll(), addresses={})
    assert healed.updated and all(r.startswith("default/s9-") for r in healed.updated)
    assert not reconcile(ObjectStore(store), addresses={}).changed  # equal to a fresh full pass


# -- the node's table and ids ----------------------------------------------------------


def slices_for(store: Store) -> None:
    reconcile(ObjectStore(store), addresses={})


def test_the_table_recomputes_only_the_service_whose_slices_changed(store: SqliteStore) -> None:
    many_services(store)
    slices_for(store)
    feed = ObjectChanges(store, KINDS_WATCHED)
    node = NodeTable(node_name="node-a", node_ips=[])
    first = node.update(feed.poll())
    assert first.full and first.services_recomputed == COUNT and len(first.changed) == COUNT
    objects = ObjectStore(store)
    assert node.frontends() == service_table(
        services=objects.list(SERVICE), slices=objects.list(SLICE), node_name="node-a"
    )
    assert node.update(feed.poll()).changed == {}

    objects.apply([pod("p4b", "a4", "10.0.3.4")])
    slices_for(store)
    delta = node.update(feed.poll())
    assert delta.services_recomputed == 1
    (key,) = delta.changed
    frontend = node.get(key)
    assert frontend is not None and frontend.service == "default/s4"
    assert [str(b.key.ip) for b in frontend.backends] == ["10.0.0.5", "10.0.3.4"]
    assert {str(b.ip) for b in delta.new_backends} == {"10.0.3.4"}

    objects.delete(objects.refs_of([service("s4", "a4")]))
    slices_for(store)
    delta = node.update(feed.poll())
    assert delta.changed == {key: None} and node.get(key) is None
    assert {str(b.ip) for b in delta.released_backends} == {"10.0.0.5", "10.0.3.4"}


def test_ids_are_written_only_for_new_frontends_and_survive_a_restart(
    store: SqliteStore,
) -> None:
    many_services(store)
    slices_for(store)
    feed = ObjectChanges(store, KINDS_WATCHED)
    node = NodeTable(node_name="node-a", node_ips=[])
    ids = LbIds(store)
    ids.sync(node.update(feed.poll()) and node.frontends())
    before = {f.key: ids.frontend_id(f.key) for f in node.frontends()}
    revision = store.revision()
    ids.update()  # nothing new: no transaction at all
    assert store.revision() == revision
    objects = ObjectStore(store)
    objects.apply([service("new", "a1")])
    slices_for(store)
    delta = node.update(feed.poll())
    new_keys = [k for k, f in delta.changed.items() if f is not None]
    revision = store.revision()
    ids.update(frontends=new_keys, backends=delta.new_backends)
    assert store.revision() == revision + 1
    (new_key,) = new_keys
    assert ids.frontend_id(new_key) == max(v for v in before.values() if v) + 1
    restarted = LbIds(store).sync(node.frontends())
    assert restarted.frontend[new_key] == ids.frontend_id(new_key)
    assert all(restarted.frontend[k] == v for k, v in before.items())


def test_two_services_claiming_one_external_address_keep_the_first_by_name(
    store: SqliteStore,
) -> None:
    objects = ObjectStore(store)
    shared = {"externalIPs": ["203.0.113.9"]}
    b = service("b", "x")
    b["spec"].update(shared)
    objects.apply([b])
    feed = ObjectChanges(store, KINDS_WATCHED)
    node = NodeTable(node_name="node-a", node_ips=[])
    node.update(feed.poll())
    key = FrontendKey(ipaddress.IPv4Address("203.0.113.9"), 80, "TCP")
    assert node.get(key) is not None and node.get(key).service == "default/b"  # type: ignore[union-attr]
    a = service("a", "x")
    a["spec"].update(shared)
    objects.apply([a])
    delta = node.update(feed.poll())
    assert key in delta.changed and node.get(key).service == "default/a"  # type: ignore[union-attr]
    objects.delete(objects.refs_of([a]))
    delta = node.update(feed.poll())
    assert node.get(key).service == "default/b"  # type: ignore[union-attr]
    assert key in delta.changed


# -- the operator's controller, on etcd ------------------------------------------------


def test_the_operator_recomputes_only_the_service_of_a_pod_whose_published_address_moved(
    store_factory: etcd_fixtures.StoreFactory,
) -> None:
    etcd = store_factory()
    many_services(etcd)
    controller = EndpointSliceController(etcd)
    first = controller.sync()
    assert first.services_recomputed == COUNT and len(first.created) == COUNT
    assert controller.sync().services_recomputed == 0  # its own writes, compared
    with etcd.transaction() as txn:
        txn.put_json(f"{keys.ENDPOINTS}10.79.1.12", {"pod": "default/p12", "node": "node-b"})
    moved = controller.sync()
    assert moved.services_recomputed == 1
    (slice_,) = moved.written.values()
    assert slice_["metadata"]["labels"]["kubernetes.io/service-name"] == "s12"
    assert [(e["addresses"], e["nodeName"]) for e in slice_["endpoints"]] == [
        (["10.79.1.12"], "node-b")
    ]
    # Unpublished (the pod's endpoint gone): back to its status.podIP, that one alone.
    with etcd.transaction() as txn:
        txn.delete(f"{keys.ENDPOINTS}10.79.1.12")
        txn.put_json(f"{keys.ENDPOINTS}10.79.1.99", {"identity": 300})  # no pod: no address
    back = controller.sync()
    assert back.services_recomputed == 1
    (slice_,) = back.written.values()
    assert [e["addresses"] for e in slice_["endpoints"]] == [["10.0.0.13"]]
    # A Service deleted: its slice goes, nothing else is recomputed.
    ObjectStore(etcd).delete(ObjectStore(etcd).refs_of([service("s3", "a3")]))
    gone = controller.sync()
    assert gone.services_recomputed == 1 and [d.split("-")[0] for d in gone.deleted] == [
        "default/s3"
    ]


class FailingCommit:
    """The real store whose next transaction is rolled back at its end (a full disk
    at commit): everything inside it ran, nothing of it stays."""

    def __init__(self, inner: SqliteStore) -> None:
        self._inner = inner
        self.fail_next = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Txn]:
        with self._inner.transaction() as txn:
            yield txn
            if self.fail_next:
                self.fail_next = False
                raise StoreUnavailableError("database or disk is full")


def test_ids_of_a_failed_transaction_are_neither_kept_nor_lost(store: SqliteStore) -> None:
    failing = FailingCommit(store)
    ids = LbIds(failing)  # type: ignore[arg-type]
    ip = ipaddress.IPv4Address
    first = FrontendKey(ip("10.96.0.1"), 80, "TCP")
    second = FrontendKey(ip("10.96.0.2"), 80, "TCP")
    ids.update(frontends=[first])
    assert ids.frontend_id(first) == 1
    failing.fail_next = True
    with pytest.raises(StoreUnavailableError):
        ids.update(frontends=[second], released_frontends=[first])
    assert ids.frontend_id(second) is None and ids.frontend_id(first) == 1
    assert store.get_json("services/ids/frontend/10.96.0.2:80/TCP") is None
    assert store.get_json("services/ids/frontend/10.96.0.1:80/TCP") == {"id": 1}
    ids.update(frontends=[second])
    assert ids.frontend_id(second) == 2  # the id the failed attempt had taken, not 3


class LosingOnce(ValuesOnly):
    """The real store whose next listing of what was written loses it (a missed
    event, whatever its cause)."""

    def __init__(self, inner: SqliteStore) -> None:
        super().__init__(inner)
        self.lose_next = False

    def list_revisions(self, prefix: str, *, after: int = 0) -> list[tuple[str, int]]:
        if after and self.lose_next:
            self.lose_next = False
            return []
        return self._inner.list_revisions(prefix, after=after)

    def count(self, prefix: str) -> int:
        return self._inner.count(prefix)


def test_a_change_the_feed_missed_is_caught_by_a_relist_of_keys(store: SqliteStore) -> None:
    objects = ObjectStore(store)
    objects.apply([service("a", "x")])
    losing = LosingOnce(store)
    feed = ObjectChanges(losing, [SERVICE])  # type: ignore[arg-type]
    feed.poll()
    objects.apply([service("a", "x", port=81)])  # rewritten: the count does not move
    losing.lose_next = True
    assert feed.poll().empty  # missed
    assert feed.poll().empty  # and not seen again: it was written before that poll
    feed.relist()
    caught = feed.poll()
    assert not caught.full
    assert [s["spec"]["ports"][0]["port"] for s in caught.of("Service").values()] == [81]
