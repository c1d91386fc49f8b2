"""Cluster-wide identity allocation: IdentityAllocator on EtcdStore, driven through
``run_transaction`` by three agents (separate processes, own store connections) at once.

One label set must never get two ids, one id never name two label sets, and every
reference taken must be counted exactly once -- also when releases race."""

from __future__ import annotations

import contextlib
import multiprocessing
import queue
import random
import secrets
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from ciliate.bench import identity as identity_bench
from ciliate.bench.identity import EtcdIdentityBenchBackend
from ciliate.control.identity.allocator import (
    ID_PREFIX,
    LABELS_PREFIX,
    IdentityAllocator,
    canonical_labels,
)
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


def agent_main(
    endpoint: str, prefix: str, agent: int, acquired: Any, released: Any, results: Any
) -> None:
    """One agent process: acquire concurrently, wait, release concurrently, report."""
    try:
        store = EtcdStore([endpoint], prefix=prefix)
        allocator = IdentityAllocator(store)
        store.revision()  # connected before the race starts
        indices = plan(agent)

        def acquire(n: int) -> tuple[int, int]:
            ident = store.run_transaction(
                lambda txn: allocator.acquire(txn, label_set(n)), retries=1000
            )
            return n, ident.id

        with ThreadPoolExecutor(max_workers=THREADS) as pool:
            ids = list(pool.map(acquire, indices))
        acquired.wait(120)  # every agent has acquired; the parent checks the store
        released.wait(120)  # ... and lets us release

        def release(pair: tuple[int, int]) -> bool:
            return store.run_transaction(lambda txn: allocator.release(txn, pair[1]), retries=1000)

        mine = [pair for pair in ids if pair[0] in RELEASED]
        with ThreadPoolExecutor(max_workers=THREADS) as pool:
            freed = list(pool.map(release, mine))
        results.put({"agent": agent, "ids": ids, "freed": sum(freed), "stats": store.stats})
        store.close()
    except BaseException as exc:
        acquired.abort()
        released.abort()
        results.put({"agent": agent, "error": repr(exc)})


def snapshot(store: EtcdStore) -> tuple[dict[str, int], dict[int, tuple[str, int]]]:
    """(canonical labels -> id, id -> (canonical labels, refcount)) as stored."""
    by_labels: dict[str, int] = {}
    for key, raw in store.list(LABELS_PREFIX):
        doc = decode_json(key, raw)
        assert isinstance(doc, dict) and isinstance(doc["id"], int)
        by_labels[key[len(LABELS_PREFIX) :]] = doc["id"]
    by_id: dict[int, tuple[str, int]] = {}
    for key, raw in store.list(ID_PREFIX):
        doc = decode_json(key, raw)
        assert isinstance(doc, dict)
        labels, refcount = doc["labels"], doc["refcount"]
        assert isinstance(labels, dict) and isinstance(refcount, int)
        by_id[int(key[len(ID_PREFIX) :])] = (
            canonical_labels({k: str(v) for k, v in labels.items()}),
            refcount,
        )
    return by_labels, by_id


def check_bijective(
    by_labels: dict[str, int], by_id: dict[int, tuple[str, int]], expected: Counter[int]
) -> None:
    wanted = {canonical_labels(label_set(n)): count for n, count in expected.items() if count}
    assert set(by_labels) == set(wanted)  # exactly the label sets still referenced
    assert len(set(by_labels.values())) == len(by_labels)  # no id names two label sets
    assert {i: labels for i, (labels, _) in by_id.items()} == {
        i: labels for labels, i in by_labels.items()
    }  # the index and the records agree: one label set, one id, both ways
    for labels, identity_id in by_labels.items():
        assert by_id[identity_id][1] == wanted[labels], labels  # every reference counted


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


def test_three_agents_allocate_consistently(etcd_server: EtcdServer) -> None:
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
        expected = Counter(n for agent in range(AGENTS) for n in plan(agent))
        wait(acquired, results)
        check_bijective(*snapshot(store), expected)

        wait(released, results)
        reports = [results.get(timeout=120) for _ in procs]
        errors = [r["error"] for r in reports if "error" in r]
        assert not errors

        # every agent got the same id for the same label set, and that is the stored one
        first: dict[int, int] = {}
        for report in reports:
            for n, identity_id in report["ids"]:
                assert first.setdefault(n, identity_id) == identity_id
        assert len(set(first.values())) == len(first) == LABEL_SETS

        # phase two: releasing every reference of label sets 0..4 freed each exactly once
        assert sum(r["freed"] for r in reports) == len(RELEASED)
        for n in RELEASED:
            expected[n] = 0
        by_labels, by_id = snapshot(store)
        check_bijective(by_labels, by_id, expected)
        assert IdentityAllocator(store).lookup(label_set(0)) is None
        kept = IdentityAllocator(store).lookup(label_set(7))
        assert kept is not None and kept.id == first[7] and kept.refcount == expected[7]
        assert sum(r["stats"]["conflicts"] for r in reports) > 0  # they did race
    finally:
        store.close()
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()


def test_identity_bench_smoke(require_etcd: None) -> None:
    result = identity_bench.run(
        agents=2, identities=20, threads=2, backend=EtcdIdentityBenchBackend(), progress=None
    )
    assert result["consistent"] and result["distinct_ids"] == 20
    assert result["allocations_per_s"] > 0
