"""``ciliate bench cidr-alloc``: how fast cluster-pool IPAM hands out node pod CIDRs.

Two figures for ``nodes`` simulated nodes, dual stack (IPv4 ``10.0.0.0/8`` in ``/24``
blocks, IPv6 ``fd00:10::/104`` in ``/120`` blocks: 65,536 of each):

* **allocator** -- the pure allocator: a fresh pool, ``allocate(node)`` for every node.
* **operator** -- through the operator on an SQLite cluster store: the node objects are
  written (``cluster/nodes/<name>``, timed apart), then one ``reconcile_once`` gives every
  node its ``cluster/ipam/<name>`` object. Also timed: a second reconcile (nothing to do,
  the periodic resync's steady state) and the first reconcile of a new operator over the
  same store (a restart: every CIDR re-occupied, nothing written). The result is checked:
  every node has two CIDRs and no CIDR is held twice.

The code measured is the real one by default (:func:`real_subjects`: ``ClusterPool``,
``SqliteStore``, ``Operator``); tests may pass other :class:`Subjects`.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

__all__ = [
    "IPV4_CIDR",
    "IPV4_MASK",
    "IPV6_CIDR",
    "IPV6_MASK",
    "Allocator",
    "BenchStore",
    "BenchTxn",
    "Reconciler",
    "Subjects",
    "print_table",
    "real_subjects",
    "run",
]

IPV4_CIDR = "10.0.0.0/8"
IPV4_MASK = 24
IPV6_CIDR = "fd00:10::/104"
IPV6_MASK = 120

NODES_PREFIX = "cluster/nodes/"
IPAM_PREFIX = "cluster/ipam/"
WRITE_BATCH = 1000


class Allocator(Protocol):
    def allocate(self, node: str) -> object: ...


class BenchTxn(Protocol):
    def put(self, key: str, value: bytes) -> None: ...


class BenchStore(Protocol):
    def transaction(self) -> AbstractContextManager[BenchTxn]: ...

    def list(self, prefix: str) -> list[tuple[str, bytes]]: ...

    def close(self) -> None: ...


class Reconciler(Protocol):
    def reconcile_once(self) -> object: ...


_S = TypeVar("_S", bound=BenchStore)
_P = TypeVar("_P", bound=Allocator)


@dataclass(frozen=True)
class Subjects(Generic[_S, _P]):
    """The code under test: a pool class, a store opener, an operator class."""

    make_pool: Callable[..., _P]
    """Called with ``ipv4_cidrs``, ``ipv4_mask``, ``ipv6_cidrs``, ``ipv6_mask`` keywords."""
    open_store: Callable[[Path], _S]
    make_operator: Callable[[_S, _P], Reconciler]


def real_subjects() -> Subjects[Any, Any]:
    """The production code: ClusterPool, SqliteStore and the operator."""
    from ciliate.control.ipam import ClusterPool
    from ciliate.control.operator.reconciler import Operator
    from ciliate.control.store.sqlite import SqliteStore

    return Subjects(make_pool=ClusterPool, open_store=SqliteStore, make_operator=Operator)


def _pool(subjects: Subjects[_S, _P]) -> _P:
    return subjects.make_pool(
        ipv4_cidrs=[IPV4_CIDR], ipv4_mask=IPV4_MASK, ipv6_cidrs=[IPV6_CIDR], ipv6_mask=IPV6_MASK
    )


def _node_name(index: int) -> str:
    return f"node-{index:05d}"


def _bench_allocator(subjects: Subjects[_S, _P], nodes: int) -> float:
    pool = _pool(subjects)
    names = [_node_name(i) for i in range(nodes)]
    start = time.perf_counter()
    for name in names:
        pool.allocate(name)
    return (time.perf_counter() - start) * 1e3


def _write_nodes(store: BenchStore, nodes: int) -> None:
    for first in range(0, nodes, WRITE_BATCH):
        with store.transaction() as txn:
            for i in range(first, min(first + WRITE_BATCH, nodes)):
                name = _node_name(i)
                value = {"name": name, "nodeIP": f"192.168.{i >> 8 & 0xFF}.{i & 0xFF}"}
                txn.put(NODES_PREFIX + name, json.dumps(value).encode())


def _check(store: BenchStore, nodes: int) -> None:
    objects = store.list(IPAM_PREFIX)
    if len(objects) != nodes:
        raise AssertionError(f"{len(objects)} IPAM objects for {nodes} nodes")
    seen: set[str] = set()
    for key, raw in objects:
        cidrs = json.loads(raw)["podCIDRs"]
        if len(cidrs) != 2:
            raise AssertionError(f"{key} holds {cidrs}, not one IPv4 and one IPv6 CIDR")
        if seen.intersection(cidrs):
            raise AssertionError(f"{key}: {cidrs} handed out twice")
        seen.update(cidrs)


def _bench_operator(subjects: Subjects[_S, _P], nodes: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="ciliate-bench-cidr-") as tmp:
        store = subjects.open_store(Path(tmp) / "cluster.db")
        try:
            start = time.perf_counter()
            _write_nodes(store, nodes)
            write_ms = (time.perf_counter() - start) * 1e3
            operator = subjects.make_operator(store, _pool(subjects))
            start = time.perf_counter()
            operator.reconcile_once()
            reconcile_ms = (time.perf_counter() - start) * 1e3
            start = time.perf_counter()
            operator.reconcile_once()
            resync_ms = (time.perf_counter() - start) * 1e3
            restarted = subjects.make_operator(store, _pool(subjects))
            start = time.perf_counter()
            restarted.reconcile_once()
            restart_ms = (time.perf_counter() - start) * 1e3
            _check(store, nodes)
        finally:
            store.close()
    return {
        "write_ms": write_ms,
        "reconcile_ms": reconcile_ms,
        "resync_ms": resync_ms,
        "restart_ms": restart_ms,
    }


def run(nodes: int = 10_000, *, subjects: Subjects[Any, Any] | None = None) -> dict[str, float]:
    """Both figures for ``nodes`` nodes; see the module documentation."""
    chosen = subjects if subjects is not None else real_subjects()
    if nodes < 1:
        raise ValueError("nodes must be at least 1")
    allocator_ms = _bench_allocator(chosen, nodes)
    operator = _bench_operator(chosen, nodes)
    return {
        "nodes": float(nodes),
        "allocator_ms": allocator_ms,
        "allocator_nodes_per_s": nodes / (allocator_ms / 1e3),
        "write_nodes_ms": operator["write_ms"],
        "reconcile_ms": operator["reconcile_ms"],
        "reconcile_nodes_per_s": nodes / (operator["reconcile_ms"] / 1e3),
        "resync_ms": operator["resync_ms"],
        "restart_ms": operator["restart_ms"],
    }


def print_table(results: dict[str, float]) -> None:
    from rich.console import Console
    from rich.table import Table

    nodes = int(results["nodes"])
    table = Table(title=f"cluster-pool IPAM: {nodes:,} nodes, dual stack")
    for column in ("what", "ms", "nodes/s"):
        table.add_column(column, justify="left" if column == "what" else "right")
    table.add_row(
        "allocator: ClusterPool.allocate",
        f"{results['allocator_ms']:.1f}",
        f"{results['allocator_nodes_per_s']:,.0f}",
    )
    table.add_row("store: write the node objects", f"{results['write_nodes_ms']:.1f}", "")
    table.add_row(
        "operator: one reconcile (SQLite)",
        f"{results['reconcile_ms']:.1f}",
        f"{results['reconcile_nodes_per_s']:,.0f}",
    )
    table.add_row("operator: resync, nothing to do", f"{results['resync_ms']:.1f}", "")
    table.add_row(
        "operator: restart (re-occupy all, no writes)", f"{results['restart_ms']:.1f}", ""
    )
    Console().print(table)
