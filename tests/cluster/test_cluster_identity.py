"""Cluster-wide identity allocation: ClusterIdentities on EtcdStore, three agents
(separate processes, own store connections, own node names) at once.

One label set must never get two ids, one id never name two label sets; every node holds
exactly one reference key per identity its endpoints use; when the last references go,
the GC removes exactly those identities."""

from __future__ import annotations

import contextlib
import multiprocessing
import queue
import random
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from ciliate.bench import identity as identity_bench
from ciliate.bench.identity import EtcdIdentityBenchBackend
from ciliate.control.identity.allocator import (
    ID_PREFIX,
    LABELS_PREFIX,
    REFS_PREFIX,
    IdentityAllocator,
    IdRecord,
    canonical_labels,
)
from ciliate.control.identity.cluster import ClusterIdentities
from ciliate.control.identity.gc import IdentityGc
from ciliate.control.lab.etcd_server import EtcdServer
from ciliate.control.store import decode_json
from ciliate.control.store.etcd import EtcdStore

from . import etcd_fixtures

require_etcd = etcd_fixtures.require_etcd
etcd_server = etcd_fixtures.etcd_server

AGENTS = 3
ACQUISITIONS = 30  # per agent
LABEL_SETS = 10
THREADS = 6  # per agent
RELEASED = range(5)  # label sets whose every reference is released in phase two


def label_set(n: int) -> dict[str, str]:
    return {
        "k8s:io.kubernetes.pod.namespace": "default",
        "k8s:app": f"app-{n}",
        "k8s:tier": "web" if n % 2 else "db",
    }


def plan(agent: int) -> list[int]:
    """Which label set each of the agent's acquisitions takes (uneven, reproducible)."""
    rng = random.Random(agent)
    return [rng.randrange(LABEL_SETS) for _ in range(ACQUISITIONS)]


def node_name(agent: int) -> str:
    return f"agent-{agent}"


def agent_main(
    endpoint: str, prefix: str, agent: int, acquired: Any, released: Any, results: Any
) -> None:
    """One agent process: acquire concurrently, wait, release concurrently, report."""
    try:
        store = EtcdStore([endpoint], prefix=prefix)
        identities = ClusterIdentities(store, node=node_name(agent))
        identities.resync()  # connected, with its lease, before the race starts
        indices = plan(agent)

        def acquire(n: int) -> tuple[int, int]:
            return n, identities.acquire(None, label_set(n)).id

        with ThreadPoolExecutor(max_workers=THREADS) as pool:
            ids = list(pool.map(acquire, indices))
        acquired.wait(120)  # every agent has acquired; the parent checks the store
        released.wait(120)  # ... and lets us release

        mine = [pair for pair in ids if pair[0] in RELEASED]
        with ThreadPoolExecutor(max_workers=THREADS) as pool:
            last = list(pool.map(lambda pair: identities.release(None, pair[1]), mine))
        results.put({"agent": agent, "ids": ids, "last": sum(last), "stats": store.stats})
        identities.close()
        store.close()
    except BaseException as exc:
        acquired.abort()
        released.abort()
        results.put({"agent": agent, "error": repr(exc)})


def snapshot(store: EtcdStore) -> tuple[dict[str, int], dict[int, str], dict[int, set[str]]]:
    """(canonical labels -> id, live id -> canonical labels, id -> nodes holding it)."""
    by_labels: dict[str, int] = {}
    for key, raw in store.list(LABELS_PREFIX):
        doc = decode_json(key, raw)
        assert isinstance(doc, dict) and isinstance(doc["id"], int)
        by_labels[key[len(LABELS_PREFIX) :]] = doc["id"]
    by_id: dict[int, str] = {}
    for key, raw in store.list(ID_PREFIX):
        record = IdRecord.parse(key, decode_json(key, raw))
        if not record.tombstone:
            by_id[int(key[len(ID_PREFIX) :])] = canonical_labels(record.labels)
    holders: dict[int, set[str]] = {}
    for key, _ in store.list(REFS_PREFIX):
        identity_id, node = key[len(REFS_PREFIX) :].split("/")
        holders.setdefault(int(identity_id), set()).add(node)
    return by_labels, by_id, holders


def check(store: EtcdStore, users: dict[int, set[str]]) -> None:
    """The store holds exactly the label sets in ``users`` (label set -> nodes using it),
    one id each, both ways, each held by exactly its users."""
    by_labels, by_id, holders = snapshot(store)
    wanted = {canonical_labels(label_set(n)): nodes for n, nodes in users.items() if nodes}
    assert set(by_labels) == set(wanted)  # exactly the label sets still used
    assert len(set(by_labels.values())) == len(by_labels)  # no id names two label sets
    assert by_id == {i: labels for labels, i in by_labels.items()}  # index and records agree
    assert {by_id[i]: nodes for i, nodes in holders.items()} == wanted  # references


def wait(barrier: Any, results: Any) -> None:
    """Pass ``barrier``; if an agent broke it, fail with the agents' errors."""
    try:
        barrier.wait(120)
    except threading.BrokenBarrierError:
        errors = []
        with contextlib.suppress(queue.Empty):
            while True:
                errors.append(results.get(timeout=5))
        pytest.fail(f"an agent failed: {errors}")


def test_three_agents_allocate_consistently_and_the_gc_removes_what_they_dropped(
    etcd_server: EtcdServer,
) -> None:
    prefix = f"/ident-{secrets.token_hex(4)}/"
    ctx = multiprocessing.get_context("spawn")  # never fork a process running gRPC
    acquired, released = ctx.Barrier(AGENTS + 1), ctx.Barrier(AGENTS + 1)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=agent_main,
            args=(etcd_server.endpoint, prefix, n, acquired, released, results),
            name=f"agent-{n}",
        )
        for n in range(AGENTS)
    ]
    for proc in procs:
        proc.start()
    store = EtcdStore([etcd_server.endpoint], prefix=prefix)
    try:
        users: dict[int, set[str]] = {n: set() for n in range(LABEL_SETS)}
        for agent in range(AGENTS):
            for n in plan(agent):
                users[n].add(node_name(agent))
        wait(acquired, results)
        check(store, users)

        wait(released, results)
        reports = [results.get(timeout=120) for _ in procs]
        errors = [r["error"] for r in reports if "error" in r]
        assert not errors

        # every agent got the same id for the same label set, distinct ones for distinct
        first: dict[int, int] = {}
        for report in reports:
            for n, identity_id in report["ids"]:
                assert first.setdefault(n, identity_id) == identity_id
        assert len(set(first.values())) == len(first) == LABEL_SETS

        # phase two: each agent's last release of a label set dropped its reference once
        expected_last = sum(
            len({n for n in plan(agent) if n in RELEASED}) for agent in range(AGENTS)
        )
        assert sum(r["last"] for r in reports) == expected_last
        _, by_id, holders = snapshot(store)
        dropped = {first[n] for n in RELEASED if users[n]}
        assert dropped and dropped <= set(by_id), "released, not yet collected"
        assert not dropped & set(holders)

        result = IdentityGc(store, grace=0.0).run_once()
        assert sorted(result.removed) == sorted(dropped)
        check(store, {n: set() if n in RELEASED else nodes for n, nodes in users.items()})
        allocator = IdentityAllocator(store)
        assert allocator.lookup(label_set(0)) is None
        kept = allocator.lookup(label_set(7))
        assert kept is not None and kept.id == first[7] and kept.refcount == len(users[7])
    finally:
        store.close()
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()


def test_threads_of_one_node_count_their_references_exactly(etcd_server: EtcdServer) -> None:
    prefix = f"/ident-{secrets.token_hex(4)}/"
    with EtcdStore([etcd_server.endpoint], prefix=prefix) as store:
        node = ClusterIdentities(store, node="n1")
        with ThreadPoolExecutor(max_workers=8) as pool:
            ids = set(pool.map(lambda _: node.acquire(None, label_set(1)).id, range(40)))
            assert len(ids) == 1
            (identity_id,) = ids
            assert node.held() == {identity_id: 40}
            last = list(pool.map(lambda _: node.release(None, identity_id), range(41)))
        assert last.count(True) == 1, "one release was the node's last, one more did nothing"
        assert node.held() == {}
        assert snapshot(store)[2] == {}, "the node's reference is gone"
        node.close()


def test_identity_bench_smoke(require_etcd: None) -> None:
    result = identity_bench.run(
        agents=2, identities=20, threads=2, backend=EtcdIdentityBenchBackend(), progress=None
    )
    assert result["consistent"] and result["distinct_ids"] == 20
    assert result["allocations_per_s"] > 0
