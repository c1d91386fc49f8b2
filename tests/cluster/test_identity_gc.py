"""Identity GC against a real etcd: a node that dies holding references (SIGKILLed, its
lease expiring), and a node that still holds an identity the GC removed."""

from __future__ import annotations

import multiprocessing
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from ciliate.control.identity.allocator import IdentityAllocator, ref_key
from ciliate.control.identity.cluster import ClusterIdentities
from ciliate.control.identity.gc import IdentityGc
from ciliate.control.lab.etcd_server import EtcdServer
from ciliate.control.store.etcd import EtcdStore

from . import etcd_fixtures
from .etcd_fixtures import StoreFactory

require_etcd = etcd_fixtures.require_etcd
etcd_server = etcd_fixtures.etcd_server
private_etcd = etcd_fixtures.private_etcd
store_factory = etcd_fixtures.store_factory

T = TypeVar("T")

SHARED = {"k8s:io.kubernetes.pod.namespace": "default", "k8s:app": "shared"}
DOOMED = {"k8s:io.kubernetes.pod.namespace": "default", "k8s:app": "only-on-the-dead-node"}


def eventually(check: Callable[[], T], *, timeout: float = 30.0) -> T:
    """``check()`` once it stops failing (an AssertionError), polling."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def doomed_node(endpoint: str, prefix: str, ids: Any) -> None:
    """A node agent that takes references, reports them and hangs until killed."""
    store = EtcdStore([endpoint], prefix=prefix)
    identities = ClusterIdentities(store, node="doomed", lease_ttl=2)
    ids.put({"shared": identities.acquire(None, SHARED).id})
    ids.put({"doomed": identities.acquire(None, DOOMED).id})
    time.sleep(600)


@pytest.fixture
def prefix() -> str:
    return f"/gc-{secrets.token_hex(4)}/"


@pytest.fixture
def store(etcd_server: EtcdServer, prefix: str) -> Iterator[EtcdStore]:
    with EtcdStore([etcd_server.endpoint], prefix=prefix, timeout=3.0) as opened:
        yield opened


def test_a_node_killed_holding_references_lets_the_gc_remove_only_its_own(
    etcd_server: EtcdServer, prefix: str, store: EtcdStore
) -> None:
    survivor = ClusterIdentities(store, node="survivor")
    ctx = multiprocessing.get_context("spawn")
    reports = ctx.Queue()
    proc = ctx.Process(target=doomed_node, args=(etcd_server.endpoint, prefix, reports))
    proc.start()
    try:
        ids: dict[str, int] = {}
        for _ in range(2):
            ids.update(reports.get(timeout=60))
        assert survivor.acquire(None, SHARED).id == ids["shared"]
        gc = IdentityGc(store, grace=0.0)
        assert gc.run_once().removed == [], "every identity is referenced"

        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)  # no goodbye: the lease just stops being renewed
        proc.join(10)

        def references_expired() -> None:
            assert store.get(ref_key(ids["doomed"], "doomed")) is None
            assert store.get(ref_key(ids["shared"], "doomed")) is None

        eventually(references_expired)
        assert gc.run_once().removed == [ids["doomed"]]
        allocator = IdentityAllocator(store)
        assert allocator.lookup(DOOMED) is None
        shared = allocator.lookup(SHARED)
        assert shared is not None and (shared.id, shared.refcount) == (ids["shared"], 1)
        # the dead node's id stays out of allocation: its tombstone is in quarantine
        doomed_record = store.get_json(f"identities/id/{ids['doomed']}")
        assert isinstance(doomed_record, dict) and doomed_record["until"] > time.time()
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        survivor.close()


def test_the_grace_period_spares_a_node_that_comes_back(store_factory: StoreFactory) -> None:
    store = store_factory()
    node = ClusterIdentities(store, node="n1")
    shared = node.acquire(None, SHARED)
    now = [0.0]
    gc = IdentityGc(store, grace=60.0, clock=lambda: now[0])
    store.run_transaction(lambda t: t.delete(ref_key(shared.id, "n1")))  # lease lapsed
    assert gc.run_once().waiting == [shared.id]
    node.resync()  # the node is back: its references are written again
    now[0] = 120.0
    assert gc.run_once().removed == []
    assert store.get(ref_key(shared.id, "n1")) is not None
    node.close()


def test_a_node_that_still_holds_a_removed_identity_revives_it_with_its_number(
    store_factory: StoreFactory,
) -> None:
    store = store_factory()
    node = ClusterIdentities(store, node="n1")
    shared = node.acquire(None, SHARED)
    # The node was cut off long enough for its lease to lapse and the GC to run.
    store.run_transaction(lambda t: t.delete(ref_key(shared.id, "n1")))
    assert IdentityGc(store, grace=0.0).run_once().removed == [shared.id]
    assert IdentityAllocator(store).lookup(SHARED) is None
    node.resync()
    revived = IdentityAllocator(store).lookup(SHARED)
    assert revived is not None and (revived.id, revived.refcount) == (shared.id, 1)
    node.close()


def test_the_operator_runs_the_gc(private_etcd: EtcdServer) -> None:
    with EtcdStore([private_etcd.endpoint], timeout=3.0) as store:  # the operator's prefix
        node = ClusterIdentities(store, node="n1")
        shared = node.acquire(None, SHARED)
        orphan = store.run_transaction(lambda t: IdentityAllocator(store).allocate(t, DOOMED))
        operator = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ciliate.control.operator.main",
                "--cluster-pool-ipv4-cidr=10.200.0.0/16",
                "--cluster-pool-ipv4-mask-size=24",
                f"--etcd-endpoint={private_etcd.endpoint}",
                "--identity-gc-grace-period=0",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:

            def collected() -> None:
                assert operator.poll() is None, operator.stderr and operator.stderr.read()
                assert IdentityAllocator(store).get(orphan.id) is None

            eventually(collected)
            kept = IdentityAllocator(store).lookup(SHARED)
            assert kept is not None and kept.id == shared.id
        finally:
            operator.terminate()
            operator.wait(30)
            node.close()
