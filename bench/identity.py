"""``ciliate bench identity``: cluster-wide identity allocations per second.

``agents`` node agents -- separate processes, each with its own store connection, as on a
real cluster -- allocate ``identities`` distinct label sets between them, all at once,
each agent from ``threads`` threads (a node running several CNI ADDs at a time). Every
allocation is one optimistic transaction on the shared store (conflicts are retried), so
the figure is the rate at which the cluster can hand out *new* identities, contention
included. Afterwards the ids are checked: ``identities`` label sets, as many distinct ids.
Each agent allocates through the agent's own code, ``ClusterIdentities`` (random
candidate ids created if absent, the node's reference under its lease), so the latency
is the one a CNI ADD with a new label set pays.

The store and the allocator come from a *backend* (:class:`IdentityBackend`); the
default, :class:`EtcdIdentityBenchBackend`, starts a private etcd on loopback and
allocates with the real ``ClusterIdentities`` on ``EtcdStore``. The backend object is
pickled into the agent processes (``spawn``), so it must be picklable.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "EtcdIdentityBenchBackend",
    "IdentityAgent",
    "IdentityBackend",
    "print_table",
    "run",
]


class IdentityAgent(Protocol):
    """One node agent's view: allocate identities through its own store connection."""

    def acquire(self, labels: Mapping[str, str]) -> int:
        """The identity id of ``labels`` (allocated, retried on conflict, committed)."""
        ...

    def stats(self) -> Mapping[str, int]:
        """Counters of the agent's store (``commits``, ``conflicts``)."""
        ...

    def close(self) -> None: ...


class IdentityBackend(Protocol):
    """Where identities are allocated; picklable (it is sent to the agent processes)."""

    @property
    def name(self) -> str: ...

    def serve(self) -> AbstractContextManager[str]:
        """Start the shared store for one run (in the parent); yields its endpoint."""
        ...

    def agent(self, endpoint: str) -> IdentityAgent:
        """Connect one agent to the store at ``endpoint`` (in an agent process)."""
        ...


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _labels(i: int) -> dict[str, str]:
    return {
        "k8s:io.kubernetes.pod.namespace": f"bench-{i % 7}",
        "k8s:io.kubernetes.pod.name": f"pod-{i}",
        "k8s:app": f"app-{i % 13}",
    }


def _agent_main(
    backend: IdentityBackend,
    endpoint: str,
    indices: list[int],
    threads: int,
    start: Any,
    results: Any,
) -> None:
    """One agent process: connect, wait for the others, allocate, report."""
    try:
        agent = backend.agent(endpoint)
    except BaseException as exc:
        start.abort()
        results.put({"error": f"agent could not connect: {exc!r}"})
        return
    try:
        start.wait()

        def one(i: int) -> tuple[int, int, int]:
            began = time.perf_counter_ns()
            identity_id = agent.acquire(_labels(i))
            return i, identity_id, time.perf_counter_ns() - began

        with ThreadPoolExecutor(max_workers=threads) as pool:
            done = list(pool.map(one, indices))
        results.put(
            {
                "ids": {i: identity_id for i, identity_id, _ in done},
                "latencies_ns": [ns for _, _, ns in done],
                "stats": dict(agent.stats()),
            }
        )
    except BaseException as exc:
        results.put({"error": f"agent failed: {exc!r}"})
    finally:
        agent.close()


def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    k = (len(ordered) - 1) * pct / 100.0
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def run(
    *,
    agents: int = 3,
    identities: int = 300,
    threads: int = 4,
    backend: IdentityBackend | None = None,
    progress: Callable[[str], None] | None = _stderr,
    timeout: float = 300.0,
) -> dict[str, Any]:
    """Allocate ``identities`` distinct label sets from ``agents`` agent processes at once;
    return the rate and the latency of one allocation (retries included)."""
    if agents < 1 or identities < 1 or threads < 1:
        raise ValueError("agents, identities and threads must be >= 1")
    chosen = backend if backend is not None else EtcdIdentityBenchBackend()
    ctx = multiprocessing.get_context("spawn")  # no fork: the parent may run gRPC threads
    start = ctx.Barrier(agents + 1)
    results = ctx.Queue()
    with chosen.serve() as endpoint:
        if progress:
            progress(f"identity: {agents} agents x {threads} threads, {identities} label sets")
        procs = [
            ctx.Process(
                target=_agent_main,
                args=(
                    chosen,
                    endpoint,
                    list(range(n, identities, agents)),
                    threads,
                    start,
                    results,
                ),
                name=f"identity-agent-{n}",
            )
            for n in range(agents)
        ]
        for proc in procs:
            proc.start()
        reports: list[dict[str, Any]] = []
        try:
            start.wait(timeout)
            began = time.perf_counter()
            for _ in procs:
                reports.append(results.get(timeout=timeout))
            elapsed = time.perf_counter() - began
        finally:
            for proc in procs:
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
    errors = [r["error"] for r in reports if "error" in r]
    if errors:
        raise RuntimeError("; ".join(errors))
    ids: dict[int, int] = {}
    latencies_ms: list[float] = []
    commits = conflicts = 0
    for report in reports:
        ids.update(report["ids"])
        latencies_ms += [ns / 1e6 for ns in report["latencies_ns"]]
        commits += report["stats"].get("commits", 0)
        conflicts += report["stats"].get("conflicts", 0)
    distinct = len(set(ids.values()))
    return {
        "benchmark": "identity",
        "backend": chosen.name,
        "agents": agents,
        "threads": threads,
        "identities": identities,
        "seconds": elapsed,
        "allocations_per_s": identities / elapsed,
        "p50_ms": statistics.median(latencies_ms),
        "p99_ms": _percentile(latencies_ms, 99.0),
        "commits": commits,
        "conflicts": conflicts,
        "distinct_ids": distinct,
        "consistent": distinct == identities == len(ids),
    }


def print_table(result: Mapping[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=(
            f"identity: new identities through {result['backend']}, "
            f"{result['agents']} agents x {result['threads']} threads"
        )
    )
    columns = ["identities", "seconds", "alloc/s", "p50 ms", "p99 ms", "conflicts", "ok"]
    for column in columns:
        table.add_column(column, justify="right")
    table.add_row(
        str(result["identities"]),
        f"{result['seconds']:.2f}",
        f"{result['allocations_per_s']:.0f}",
        f"{result['p50_ms']:.1f}",
        f"{result['p99_ms']:.1f}",
        f"{result['conflicts']} / {result['commits'] + result['conflicts']}",
        "yes" if result["consistent"] else "NO",
    )
    table.caption = "conflicts: failed optimistic commits / all commit attempts (retried)"
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)
    console.print(table)


# -- the default backend: the real allocator on a private etcd ---------------------


class _EtcdIdentityAgent:
    """One agent of the identity benchmark: ClusterIdentities on its own EtcdStore."""

    def __init__(self, endpoint: str, prefix: str, retries: int) -> None:
        from ciliate.control.identity.cluster import ClusterIdentities
        from ciliate.control.store.etcd import EtcdStore

        self._store = EtcdStore([endpoint], prefix=prefix)
        self._identities = ClusterIdentities(
            self._store, node=f"bench-{os.getpid()}", retries=retries
        )
        # Connect and take the node's lease now, not inside the measured part.
        self._identities.resync()

    def acquire(self, labels: Mapping[str, str]) -> int:
        return self._identities.acquire(None, labels).id

    def stats(self) -> Mapping[str, int]:
        return self._store.stats

    def close(self) -> None:
        self._identities.close()
        self._store.close()


@dataclass(frozen=True)
class EtcdIdentityBenchBackend:
    """Identity allocation on a private etcd, for :mod:`ciliate.bench.identity`:
    ``identity.run(backend=EtcdIdentityBenchBackend())``. Picklable (sent to the agent
    processes)."""

    name: str = "etcd"
    prefix: str = "/ciliate-bench/"
    retries: int = 1000

    @contextlib.contextmanager
    def serve(self) -> Iterator[str]:
        from ciliate.control.lab.etcd_server import EtcdServer

        with EtcdServer() as server:
            yield server.endpoint

    def agent(self, endpoint: str) -> _EtcdIdentityAgent:
        return _EtcdIdentityAgent(endpoint, self.prefix, self.retries)
