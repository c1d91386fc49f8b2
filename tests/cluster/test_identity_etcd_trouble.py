"""A node's identities when etcd is in trouble (a real etcd, stopped and restarted):
known label sets are served from the node, new ones fail with the typed "unavailable"
error at once, releases never fail, and everything is written back when etcd returns --
also when it returns empty, and after the agent itself restarted."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from ciliate.control.identity.allocator import IdentityAllocator, IdentityError, ref_key
from ciliate.control.identity.cluster import ClusterIdentities
from ciliate.control.lab.etcd_server import EtcdServer
from ciliate.control.store import StoreUnavailableError
from ciliate.control.store.etcd import EtcdStore

from . import etcd_fixtures
from .etcd_fixtures import StoreFactory

require_etcd = etcd_fixtures.require_etcd
etcd_server = etcd_fixtures.etcd_server
private_etcd = etcd_fixtures.private_etcd
store_factory = etcd_fixtures.store_factory

T = TypeVar("T")

WEB = {"k8s:io.kubernetes.pod.namespace": "default", "k8s:app": "web"}
DB = {"k8s:io.kubernetes.pod.namespace": "default", "k8s:app": "db"}


def eventually(check: Callable[[], T], *, timeout: float = 30.0) -> T:
    """``check()`` once it stops failing (assertion, or etcd not back yet), polling."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (AssertionError, StoreUnavailableError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture
def node_store(private_etcd: EtcdServer, store_factory: StoreFactory) -> EtcdStore:
    store: EtcdStore = store_factory(private_etcd)
    return store


@pytest.fixture
def node(node_store: EtcdStore) -> Iterator[ClusterIdentities]:
    identities = ClusterIdentities(node_store, node="n1", resync_interval=0.1)
    yield identities
    identities.close()


def test_with_etcd_down_a_known_label_set_is_served_and_a_new_one_refused(
    private_etcd: EtcdServer, node: ClusterIdentities
) -> None:
    web = node.acquire(None, WEB)
    private_etcd.stop()
    again = node.acquire(None, WEB)  # a second pod of the same label set
    assert (again.id, again.refcount) == (web.id, 2)
    with pytest.raises(StoreUnavailableError, match="retry when etcd is back") as refused:
        node.acquire(None, DB)
    # Not an identity (label) error: the CNI handler maps it to "try again later" (11).
    assert not isinstance(refused.value, IdentityError)
    assert node.held() == {web.id: 2}


def test_with_etcd_down_releases_succeed_and_reach_etcd_when_it_returns(
    private_etcd: EtcdServer, node_store: EtcdStore, node: ClusterIdentities
) -> None:
    web = node.acquire(None, WEB)
    db = node.acquire(None, DB)
    private_etcd.stop()
    assert node.release(None, web.id) is True  # DEL never fails
    assert node.release(None, db.id) is True
    assert node.acquire(None, DB).id == db.id, "its key is still there: served"
    private_etcd.start()

    def caught_up() -> None:
        assert node_store.get(ref_key(web.id, "n1")) is None
        assert node_store.get(ref_key(db.id, "n1")) is not None

    eventually(caught_up)
    assert node.held() == {db.id: 1}


def test_an_etcd_that_returns_empty_gets_the_nodes_identities_back(
    private_etcd: EtcdServer, node_store: EtcdStore, node: ClusterIdentities
) -> None:
    web = node.acquire(None, WEB)
    node.acquire(None, WEB)
    private_etcd.stop()
    shutil.rmtree(private_etcd.data_dir)  # etcd lost everything
    private_etcd.start()

    def written_back() -> None:
        current = IdentityAllocator(node_store).lookup(WEB)
        assert current is not None and (current.id, current.refcount) == (web.id, 1)

    eventually(written_back)
    assert node.acquire(None, WEB).id == web.id


def test_a_restarted_agent_takes_its_endpoints_identities_again(
    store_factory: StoreFactory,
) -> None:
    first_store = store_factory()
    before = ClusterIdentities(first_store, node="n1", lease_ttl=2)
    web = before.acquire(None, WEB)
    db = before.acquire(None, DB)
    before.close()  # the agent stops; its lease (and keys) expire after the TTL
    first_store.close()

    store = store_factory()
    after = ClusterIdentities(store, node="n1")
    after.restore([(web.id, WEB), (web.id, WEB), (db.id, DB), (1, {"reserved:host": ""})])
    assert after.held() == {web.id: 2, db.id: 1}
    time.sleep(4)  # past the old lease's TTL: the keys live on under the new lease
    assert store.get(ref_key(web.id, "n1")) is not None
    assert store.get(ref_key(db.id, "n1")) is not None
    assert after.acquire(None, WEB).refcount == 3
    assert [after.release(None, web.id) for _ in range(3)] == [False, False, True]
    assert store.get(ref_key(web.id, "n1")) is None
    after.close()


def test_a_restarted_agent_with_etcd_down_serves_its_endpoints_label_sets_only(
    private_etcd: EtcdServer, store_factory: StoreFactory
) -> None:
    """The agent restarts while etcd is unreachable: the endpoint records (the node's
    own store) say which identities its pods use, and ADDs of those label sets are
    served without etcd; a label set it did not use gets the "unavailable" error and
    holds nothing; when etcd returns, the references are written under a new lease."""
    first_store = store_factory(private_etcd)
    before = ClusterIdentities(first_store, node="n1", lease_ttl=2)
    web = before.acquire(None, WEB)
    db = before.acquire(None, DB)
    assert before.release(None, db.id) is True  # db's last pod went before the restart
    before.close()
    first_store.close()
    private_etcd.stop()

    store = store_factory(private_etcd)
    after = ClusterIdentities(store, node="n1", resync_interval=0.1)
    try:
        after.restore([(web.id, WEB)])  # etcd is down: nothing written yet, no error
        again = after.acquire(None, WEB)
        assert (again.id, again.refcount) == (web.id, 2)
        with pytest.raises(StoreUnavailableError, match="retry when etcd is back"):
            after.acquire(None, DB)  # known to the cluster, not used here any more
        with pytest.raises(StoreUnavailableError):
            after.acquire(None, {"k8s:io.kubernetes.pod.namespace": "fresh"})
        assert after.held() == {web.id: 2}, "a refused ADD holds nothing"
        assert after.release(None, web.id) is False

        private_etcd.start()
        time.sleep(3)  # past the first agent's lease: the key lives on under the new one

        def written_back() -> None:
            assert store.get(ref_key(web.id, "n1")) is not None
            assert store.get(ref_key(db.id, "n1")) is None

        eventually(written_back)
        assert after.acquire(None, DB).id == db.id, "etcd back: the cluster's id again"
    finally:
        after.close()
