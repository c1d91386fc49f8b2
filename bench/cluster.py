"""``ciliate bench cluster``: how fast a new endpoint reaches every node, at N nodes.

N simulated agents run the agent's real cluster code -- :class:`ClusterMember` on its own
:class:`EtcdStore` (its own gRPC channel, lease and three watches), registering its node
and mirroring the rest of the cluster -- against one etcd on loopback, with no datapath:
the mirror writes into :class:`MemoryIpcache`, the ``upsert``/``delete``/``list`` of
``datapath.maps.Ipcache`` in memory, which notes when each prefix first arrived.

The agents live in worker processes of ``agents_per_process`` agents each (threads: each
agent keeps its own watch threads and store loop), so 500 agents fit on a small machine;
memory is reported per worker process and per agent *amortised over the agents sharing
a process* (and the part the agents add over the idle process).

Before measuring, the node and pod-CIDR keys of all N nodes are written at once (what the
operator would have), every agent starts and its mirror converges (all N - 1 other nodes
in its ipcache). Then endpoints are published one at a time, each by another agent
(``endpoint_added``, as after a CNI ADD); the figure per endpoint is the time from the
publish call until it is in the ipcache of *every* other agent (and, per agent, until
it is in that agent's). Monotonic clocks are comparable across processes on one machine.
etcd requests per second come from etcd's own metrics (gRPC calls started, by method)
over the measured part; CPU is the workers' and etcd's (``/proc``) over the same part.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import logging
import math
import multiprocessing
import os
import re
import statistics
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ciliate.bench.report import print_wide, progress_to_stderr
from ciliate.control.cluster.keys import IPAM, NODES
from ciliate.datapath.maps import IpcacheEntry

__all__ = ["MemoryIpcache", "print_table", "run", "run_many"]

# Node i (0-based): its IP on the fabric and its pod CIDR.
_NODE_NET = ipaddress.IPv4Network("172.16.0.0/12")
_POD_NET = ipaddress.IPv4Network("10.0.0.0/8")
# Endpoints published during the measurement live in a range no pod CIDR uses.
_ENDPOINT_NET = ipaddress.IPv4Network("100.64.0.0/10")
_ENDPOINT_IDENTITY = 40_000


class MemoryIpcache:
    """``datapath.maps.Ipcache``'s interface in memory, for a simulated agent's mirror;
    ``arrived`` holds when each prefix was first written (``time.monotonic()``)."""

    def __init__(self, changed: threading.Condition) -> None:
        self._entries: dict[ipaddress.IPv4Network, IpcacheEntry] = {}
        self._changed = changed
        self.arrived: dict[ipaddress.IPv4Network, float] = {}

    def upsert(self, entry: IpcacheEntry) -> None:
        now = time.monotonic()
        with self._changed:
            self._entries[entry.prefix] = entry
            self.arrived.setdefault(entry.prefix, now)
            self._changed.notify_all()

    def delete(self, prefix: ipaddress.IPv4Network) -> bool:
        with self._changed:
            self.arrived.pop(prefix, None)
            return self._entries.pop(prefix, None) is not None

    def list(self) -> list[IpcacheEntry]:
        with self._changed:
            return list(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class _Node:
    index: int
    name: str
    node_ip: str
    pod_cidr: str


def _nodes(count: int) -> list[_Node]:
    if count > 2**16 - 2:
        raise ValueError(f"--nodes {count}: at most {2**16 - 2} simulated nodes")
    return [
        _Node(
            index=i,
            name=f"sim{i:05d}",
            node_ip=str(_NODE_NET[i + 1]),
            pod_cidr=_pod_cidr(i),
        )
        for i in range(count)
    ]


def _pod_cidr(index: int) -> str:
    return str(ipaddress.IPv4Network((int(_POD_NET.network_address) + (index << 8), 24)))


def _endpoint_ip(k: int) -> str:
    return str(_ENDPOINT_NET[k + 1])


def _rss_kib(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _cpu_seconds(pid: int | str = "self") -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- a worker process: many simulated agents ---------------------------------------------


def _worker_main(
    worker: int,
    endpoint: str,
    prefix: str,
    nodes: list[_Node],
    cluster_size: int,
    lease_ttl: int,
    commands: Any,
    results: Any,
) -> None:
    """Start ``nodes``' agents, report, then serve the parent's commands until "stop"."""
    from ciliate.control.cluster.member import ClusterMember
    from ciliate.control.store.etcd import EtcdStore

    # The agents' warnings (a watch that failed and is retried, a read that timed out)
    # are counted and reported, not printed: 500 agents would flood the terminal.
    warnings = _CountingHandler()
    logging.getLogger("ciliate").addHandler(warnings)
    logging.getLogger("ciliate").propagate = False
    rss_idle = _rss_kib()
    changed = threading.Condition()
    members: list[ClusterMember] = []
    caches: list[MemoryIpcache] = []
    workdir = Path(tempfile.mkdtemp(prefix="ciliate-bench-cluster-"))
    try:
        started = time.monotonic()
        for node in nodes:
            member = ClusterMember(
                store=EtcdStore([endpoint], prefix=prefix),
                node_name=node.name,
                node_ip=ipaddress.IPv4Address(node.node_ip),
                workdir=workdir,
                lease_ttl=lease_ttl,
            )
            members.append(member)
            member.register()
            cache = MemoryIpcache(changed)
            member.start_mirroring(cache)
            caches.append(cache)
        # Every other node's pod CIDR and node IP in every mirror.
        want = 2 * (cluster_size - 1)
        with changed:
            changed.wait_for(lambda: all(len(c) >= want for c in caches), timeout=600)
        results.put(
            {
                "worker": worker,
                "ready_s": time.monotonic() - started,
                "converged": all(len(c) >= want for c in caches),
                "rss_idle_kib": rss_idle,
                "rss_kib": _rss_kib(),
                "threads": threading.active_count(),
            }
        )
        by_index = {node.index: i for i, node in enumerate(nodes)}
        while True:
            command = commands.get()
            if command[0] == "stop":
                break
            if command[0] == "cpu":
                results.put(
                    {
                        "worker": worker,
                        "cpu_s": _cpu_seconds(),
                        "rss_kib": _rss_kib(),
                        "warnings": warnings.count,
                    }
                )
                continue
            _, batch, deadline_s = command
            # Published first (all of this worker's), then waited for together: a
            # batch of one is a single endpoint, a larger one a burst.
            published = []
            for k, ip, publisher in batch:
                local = by_index.get(publisher)
                if local is not None:
                    published.append(time.monotonic())
                    members[local].endpoint_added(ip, _ENDPOINT_IDENTITY, f"bench/ep{k}")
            deadline = time.monotonic() + deadline_s
            arrivals: list[float | None] = []
            for _k, ip, publisher in batch:
                local = by_index.get(publisher)
                arrivals += _arrivals(
                    changed,
                    [c for i, c in enumerate(caches) if i != local],
                    ipaddress.IPv4Network(f"{ip}/32"),
                    timeout=max(0.0, deadline - time.monotonic()),
                )
            results.put(
                {
                    "worker": worker,
                    "published": published,
                    "arrivals": [a for a in arrivals if a is not None],
                    "missing": sum(a is None for a in arrivals),
                }
            )
    except BaseException as exc:
        results.put({"worker": worker, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        # grpc's poller prints "Event loop is closed" tracebacks when many stores of one
        # process close one after another (each store runs its own loop); harmless
        # here, and hundreds of them would bury the table.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
        # Closing joins each agent's threads (a watch wakes within 1 s): in parallel.
        with ThreadPoolExecutor(max_workers=64) as pool:
            list(pool.map(_close_quietly, members))
        with contextlib.suppress(OSError):
            for path in sorted(workdir.rglob("*"), reverse=True):
                path.rmdir() if path.is_dir() else path.unlink()
            workdir.rmdir()


class _CountingHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def _arrivals(
    changed: threading.Condition,
    caches: Sequence[MemoryIpcache],
    prefix: ipaddress.IPv4Network,
    *,
    timeout: float,
) -> list[float | None]:
    """When ``prefix`` arrived in each of ``caches`` (``None``: not within ``timeout``)."""
    with changed:
        changed.wait_for(lambda: all(prefix in c.arrived for c in caches), timeout=timeout)
        return [c.arrived.get(prefix) for c in caches]


def _close_quietly(member: Any) -> None:
    with contextlib.suppress(Exception):
        member.close()


# -- etcd's own counters ------------------------------------------------------------------

_STARTED = re.compile(
    r'^grpc_server_started_total\{grpc_method="(\w+)",grpc_service="etcdserverpb\.\w+",'
    r'grpc_type="unary"\} (\S+)$'
)
_SENT = re.compile(r"^etcd_network_client_grpc_sent_bytes_total (\S+)$")
# Every gRPC message etcd received: unary requests and stream messages (lease
# keepalives, watch requests) alike.
_RECEIVED = re.compile(r"^grpc_server_msg_received_total\{[^}]*\} (\S+)$")
_TOTALS = ("sent_bytes", "msgs_in")


def _etcd_counters(endpoint: str) -> dict[str, float]:
    """Unary gRPC calls started, by method, and bytes sent to clients."""
    with urllib.request.urlopen(f"{endpoint}/metrics", timeout=10) as response:
        text = response.read().decode()
    counters: dict[str, float] = {}
    for line in text.splitlines():
        if match := _STARTED.match(line):
            counters[match[1]] = counters.get(match[1], 0.0) + float(match[2])
        elif match := _SENT.match(line):
            counters["sent_bytes"] = float(match[1])
        if match := _RECEIVED.match(line):
            counters["msgs_in"] = counters.get("msgs_in", 0.0) + float(match[1])
    return counters


def _publisher(k: int, nodes: int) -> int:
    """The agent that publishes endpoint ``k``: spread over the agents and processes."""
    return (k * 7919 + 1) % nodes


def _percentile(values: Sequence[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    k = (len(ordered) - 1) * pct / 100.0
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# -- the run -------------------------------------------------------------------------------


def run(
    *,
    nodes: int,
    endpoints: int = 30,
    agents_per_process: int = 50,
    budget_s: float = 120.0,
    lease_ttl: int = 10,
    endpoint_timeout_s: float = 60.0,
    idle_s: float = 3.0,
    burst: int = 0,
    etcd_endpoint: str | None = None,
    progress: Callable[[str], None] | None = progress_to_stderr,
) -> dict[str, Any]:
    """Start ``nodes`` simulated agents, publish up to ``endpoints`` endpoints one at a
    time (stopping early once ``budget_s`` of measuring has passed) and return the
    figures; then, with ``burst``, publish that many at once and time until all are
    everywhere. ``etcd_endpoint``: use that etcd instead of a private one on loopback."""
    if nodes < 2:
        raise ValueError("--nodes must be at least 2 (one publishes, the others receive)")
    if endpoints < 1 or agents_per_process < 1:
        raise ValueError("--endpoints and --agents-per-process must be at least 1")
    say = progress or (lambda _line: None)
    measure = functools.partial(
        _run,
        prefix=f"/ciliate-bench-cluster-{os.getpid()}-{time.monotonic_ns()}/",
        node_list=_nodes(nodes),
        endpoints=endpoints,
        agents_per_process=agents_per_process,
        budget_s=budget_s,
        lease_ttl=lease_ttl,
        endpoint_timeout_s=endpoint_timeout_s,
        idle_s=idle_s,
        burst=burst,
        say=say,
    )
    if etcd_endpoint is not None:
        return measure(endpoint=etcd_endpoint, etcd_pid=None)
    from ciliate.control.lab.etcd_server import EtcdServer

    with EtcdServer() as server:
        return measure(endpoint=server.endpoint, etcd_pid=server.pid)


def _seed(endpoint: str, prefix: str, node_list: Sequence[_Node]) -> None:
    """The node and pod-CIDR keys of every node, as the agents and the operator would
    have written them, in a few transactions."""
    from ciliate.control.store.etcd import EtcdStore

    with EtcdStore([endpoint], prefix=prefix) as store:
        for start in range(0, len(node_list), 1000):
            chunk = node_list[start : start + 1000]

            def write(t: Any, chunk: Sequence[_Node] = chunk) -> None:
                for node in chunk:
                    doc = {"name": node.name, "nodeIP": node.node_ip}
                    t.put(f"{NODES}{node.name}", _dumps(doc))
                    t.put(f"{IPAM}{node.name}", _dumps({"podCIDRs": [node.pod_cidr]}))

            store.run_transaction(write)


def _dumps(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _run(
    *,
    endpoint: str,
    etcd_pid: int | None,
    prefix: str,
    node_list: list[_Node],
    endpoints: int,
    agents_per_process: int,
    budget_s: float,
    lease_ttl: int,
    endpoint_timeout_s: float,
    idle_s: float,
    burst: int,
    say: Callable[[str], None],
) -> dict[str, Any]:
    n = len(node_list)
    workers = math.ceil(n / agents_per_process)
    say(f"cluster: {n} agents in {workers} process(es), etcd {endpoint}")
    _seed(endpoint, prefix, node_list)
    ctx = multiprocessing.get_context("spawn")  # no fork: the parent runs gRPC threads
    results = ctx.Queue()
    queues = [ctx.Queue() for _ in range(workers)]
    procs = [
        ctx.Process(
            target=_worker_main,
            args=(
                w,
                endpoint,
                prefix,
                node_list[w * agents_per_process : (w + 1) * agents_per_process],
                n,
                lease_ttl,
                queues[w],
                results,
            ),
            name=f"bench-cluster-{w}",
        )
        for w in range(workers)
    ]

    def collect(count: int, timeout: float) -> list[dict[str, Any]]:
        out = []
        for _ in range(count):
            report: dict[str, Any] = results.get(timeout=timeout)
            if "error" in report:
                raise RuntimeError(f"worker {report['worker']}: {report['error']}")
            out.append(report)
        return out

    started = time.monotonic()
    for proc in procs:
        proc.start()
    try:
        ready = collect(workers, timeout=900)
        setup_s = time.monotonic() - started
        if not all(r["converged"] for r in ready):
            raise RuntimeError("some agents' mirrors did not converge within 600 s")
        say(f"cluster: {n} agents up and mirrored in {setup_s:.1f} s")
        for q in queues:
            q.put(("cpu",))
        before = collect(workers, timeout=60)
        cpu_before = sum(r["cpu_s"] for r in before)
        warnings_before = sum(r["warnings"] for r in before)
        # What N idle agents cost etcd (lease keepalives, watch upkeep), before any
        # endpoint is published.
        idle_before = _etcd_counters(endpoint)
        time.sleep(idle_s)
        counters_before = _etcd_counters(endpoint)
        idle_msgs_per_s = (
            counters_before.get("msgs_in", 0.0) - idle_before.get("msgs_in", 0.0)
        ) / idle_s
        etcd_cpu_before = _cpu_seconds(etcd_pid) if etcd_pid else math.nan
        measure_start = time.monotonic()
        reach_all: list[float] = []
        per_agent: list[float] = []
        missing = 0
        for k in range(endpoints):
            if k and time.monotonic() - measure_start > budget_s:
                say(f"cluster: time budget ({budget_s:.0f} s) spent after {k} endpoints")
                break
            batch = [(k, _endpoint_ip(k), _publisher(k, n))]
            for q in queues:
                q.put(("endpoints", batch, endpoint_timeout_s))
            reports = collect(workers, timeout=endpoint_timeout_s + 60)
            published = min(p for r in reports for p in r["published"])
            arrivals = [a for r in reports for a in r["arrivals"]]
            missing += sum(r["missing"] for r in reports)
            per_agent += [a - published for a in arrivals]
            if arrivals:
                reach_all.append(max(arrivals) - published)
            if (k + 1) % 10 == 0:
                say(
                    f"cluster: {k + 1} endpoints, last reached all {n - 1} others in "
                    f"{1000 * reach_all[-1]:.0f} ms"
                )
        measured_s = time.monotonic() - measure_start
        counters_after = _etcd_counters(endpoint)
        etcd_cpu = (_cpu_seconds(etcd_pid) if etcd_pid else math.nan) - etcd_cpu_before
        for q in queues:
            q.put(("cpu",))
        final = collect(workers, timeout=60)
        cpu_after = sum(r["cpu_s"] for r in final)
        burst_s = math.nan
        if burst:
            # ``burst`` pods at once (a deployment scaled up), each on another node.
            batch = [
                (k, _endpoint_ip(k), _publisher(k, n)) for k in range(endpoints, endpoints + burst)
            ]
            for q in queues:
                q.put(("endpoints", batch, endpoint_timeout_s))
            reports = collect(workers, timeout=endpoint_timeout_s + 60)
            missing += sum(r["missing"] for r in reports)
            last = max((a for r in reports for a in r["arrivals"]), default=math.nan)
            burst_s = last - min(p for r in reports for p in r["published"])
            say(f"cluster: a burst of {burst} endpoints reached all {n} agents in {burst_s:.2f} s")
        for q in queues:
            q.put(("stop",))
    finally:
        for proc in procs:
            proc.join(60)
            if proc.is_alive():
                proc.kill()
                proc.join()
    published_count = len(reach_all)
    requests = {
        method: counters_after.get(method, 0.0) - counters_before.get(method, 0.0)
        for method in counters_after
        if method not in _TOTALS
    }
    msgs_in = counters_after.get("msgs_in", 0.0) - counters_before.get("msgs_in", 0.0)
    total_requests = sum(requests.values())
    rss = [r["rss_kib"] for r in final]
    rss_idle = [r["rss_idle_kib"] for r in ready]
    added = [r["rss_kib"] - idle for r, idle in zip(final, rss_idle, strict=True)]
    return {
        "benchmark": "cluster",
        "nodes": n,
        "processes": workers,
        "agents_per_process": agents_per_process,
        "setup_s": setup_s,
        "burst": burst,
        # Until every endpoint of the burst was in every other agent's ipcache.
        "burst_s": burst_s,
        "burst_updates_per_s": burst * (n - 1) / burst_s if burst else math.nan,
        "endpoints": published_count,
        "missing": missing,
        "reach_all_p50_ms": 1000 * statistics.median(reach_all) if reach_all else math.nan,
        "reach_all_p99_ms": 1000 * _percentile(reach_all, 99),
        "per_agent_p50_ms": 1000 * statistics.median(per_agent) if per_agent else math.nan,
        "per_agent_p99_ms": 1000 * _percentile(per_agent, 99),
        "measured_s": measured_s,
        "etcd_requests_per_s": total_requests / measured_s,
        "etcd_requests_by_method": {m: c for m, c in sorted(requests.items()) if c},
        "etcd_messages_in_per_s": msgs_in / measured_s,
        "etcd_idle_messages_in_per_s": idle_msgs_per_s,
        "etcd_requests_per_endpoint": total_requests / max(published_count, 1),
        "etcd_sent_mb_per_endpoint": (
            counters_after.get("sent_bytes", 0.0) - counters_before.get("sent_bytes", 0.0)
        )
        / 1e6
        / max(published_count, 1),
        "etcd_cpu_s": etcd_cpu,
        "agents_cpu_ms_per_agent_per_endpoint": 1000
        * (cpu_after - cpu_before)
        / max(published_count, 1)
        / n,
        "rss_per_process_mib": statistics.mean(rss) / 1024,
        "rss_per_agent_kib": sum(rss) / n,  # amortised: agents share their process
        "rss_added_per_agent_kib": sum(added) / n,  # over the process before its agents
        "etcd_rss_mib": _rss_kib(etcd_pid) / 1024 if etcd_pid else math.nan,
        "threads_per_process": statistics.mean(r["threads"] for r in ready),
        # Agent warnings while measuring (watches failed and retried, reads timed out).
        "agent_warnings": sum(r["warnings"] for r in final) - warnings_before,
    }


def run_many(node_counts: Sequence[int], **kwargs: Any) -> list[dict[str, Any]]:
    """One :func:`run` per node count, each on a fresh etcd."""
    return [run(nodes=count, **kwargs) for count in node_counts]


def print_table(results: Sequence[Mapping[str, Any]]) -> None:
    from rich.table import Table

    table = Table(title="cluster: a new endpoint reaching every agent's ipcache (simulated agents)")
    columns = [
        "nodes",
        "procs",
        "endpoints",
        "reach all p50 ms",
        "p99 ms",
        "per agent p50 ms",
        "etcd req/s",
        "etcd idle msgs/s",
        "etcd req / endpoint",
        "etcd MB out / endpoint",
        "agent CPU ms / endpoint",
        "RSS / agent KiB",
        "setup s",
        "burst s",
        "agent warnings",
    ]
    for column in columns:
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            str(r["nodes"]),
            str(r["processes"]),
            f"{r['endpoints']}" + (f" ({r['missing']} missed)" if r["missing"] else ""),
            f"{r['reach_all_p50_ms']:.0f}",
            f"{r['reach_all_p99_ms']:.0f}",
            f"{r['per_agent_p50_ms']:.0f}",
            f"{r['etcd_requests_per_s']:.0f}",
            f"{r['etcd_idle_messages_in_per_s']:.0f}",
            f"{r['etcd_requests_per_endpoint']:.0f}",
            f"{r['etcd_sent_mb_per_endpoint']:.2f}",
            f"{r['agents_cpu_ms_per_agent_per_endpoint']:.1f}",
            f"{r['rss_per_agent_kib']:.0f} (+{r['rss_added_per_agent_kib']:.0f})",
            f"{r['setup_s']:.1f}",
            f"{r['burst_s']:.2f} ({r['burst']})" if r["burst"] else "-",
            str(r["agent_warnings"]),
        )
    table.caption = (
        "endpoints published one at a time; reach all: until every other agent's ipcache has "
        "it; etcd req: unary calls (reads, writes) while publishing; idle msgs: every gRPC "
        "message etcd received from the idle agents (lease keepalives); agent CPU: all "
        "agents' CPU per endpoint, per agent; RSS per agent amortised over "
        "the agents sharing a process (+ what they add to the idle process)"
    )
    print_wide(table)


def write_json(results: Sequence[Mapping[str, Any]], path: str) -> None:
    Path(path).write_text(json.dumps(list(results), indent=2) + "\n")
