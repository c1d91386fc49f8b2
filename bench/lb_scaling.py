"""Service load balancing: does a lookup cost grow with the number of services?

Two measurements, each with 1, 1,000 and 10,000 services (3 backends each)
in the maps, every figure also a ratio to a baseline measured in the same
round (rounds interleave every size, so drift hits all alike):

- per packet (BPF_PROG_TEST_RUN of ``from_netdev``): a NodePort packet of
  an established flow to a local backend (flow lookup, DNAT, delivery into
  the pod; the skb is rewritten, so one run per call, against an empty
  program run the same way), and a packet from a remote pod to a local pod
  that is no service at all (the cost the service stage adds to all other
  traffic: one service miss and one reply-NAT miss; 250 runs per call);
- per socket: a TCP ``connect()`` to a ClusterIP through the cgroup hook
  (real sockets in a namespace of the benchmark, a client process in a
  cgroup of its own), p50, against ``connect()`` to the backend's address
  directly, alternated in one process;
- the connect4 program itself: its run time per run (the kernel's BPF
  statistics, switched on with BPF_ENABLE_STATS for the measurement only and
  off again when its file descriptor closes; read with ``bpftool prog show``)
  over a run of connects to the service, against a run of connects to an
  address that is no service (the lookup that misses: what every other
  connect on the node pays).

The filler services are ClusterIPs (the Maglev map holds external
services only); the measured one is a NodePort, written last.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from ciliate.datapath import objects
from ciliate.datapath.lb import (
    Backend,
    Frontend,
    L4Protocol,
    LoadBalancer,
    attach_socket_lb,
    detach_socket_lb,
)
from ciliate.datapath.testbed import GATEWAY_MAC, NODE_IP, WORLD_IP, Testbed
from ciliate.loader import BpfObject, Program, cgroup2_root, enter_netns

TC_ACT_OK, TC_ACT_REDIRECT = 0, 7
SIZES = (1, 1_000, 10_000)
NODEPORT = Frontend(NODE_IP, 30080, L4Protocol.TCP)
CLUSTER_IP = Frontend(ipaddress.IPv4Address("10.96.255.254"), 80, L4Protocol.TCP)
SOCKET_BACKEND = ipaddress.IPv4Address("127.0.0.11")
BACKEND_PORT = 8080

# The client of the socket measurement: alternates connect() to the
# service and to the backend, prints the per-target latencies (ns). With a
# target named (argv[5]: service or direct), connects to that one only.
_CLIENT = """
import json, socket, sys, time
service, backend, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
only = sys.argv[5] if len(sys.argv) > 5 else None
out = {"service": [], "direct": []}
for i in range(count):
    targets = (("service", service, 80), ("direct", backend, port))
    for name, host, p in targets[:: 1 if i % 2 else -1]:
        if only and name != only:
            continue
        s = socket.socket()
        t0 = time.perf_counter_ns()
        s.connect((host, p))
        out[name].append(time.perf_counter_ns() - t0)
        s.close()
print(json.dumps(out))
"""
_BPF_ENABLE_STATS = 32  # enum bpf_cmd
_BPF_STATS_RUN_TIME = 0
_SYS_BPF = {"x86_64": 321, "aarch64": 280}


@dataclass(frozen=True)
class Result:
    services: int
    path: str
    median: float  # ns per packet, or ns per connect (p50)
    baseline: float  # the same round's baseline, median over rounds
    ratio: float  # median of the round-by-round ratios to the baseline
    vs_one_service: float  # median ratio to the same path with 1 service


def fill(lb: LoadBalancer, services: int, *, local_backend: ipaddress.IPv4Address) -> None:
    """``services`` services of 3 backends: fillers first, then the NodePort
    (local backend, external) and the ClusterIP the socket test uses."""
    lb.clear()
    for n in range(max(0, services - 2)):
        frontend = Frontend(ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.96.0.1")) + n), 80)
        backends = [
            Backend(
                id=3 * n + i + 1,
                address=ipaddress.IPv4Address(f"10.245.{n % 250}.{i + 1}"),
                port=8080,
            )
            for i in range(3)
        ]
        lb.upsert_service(frontend, backends, service_id=n + 1)
    base = 3 * services + 10
    lb.upsert_service(
        NODEPORT,
        [Backend(id=base, address=local_backend, port=8080, local=True)],
        service_id=60001,
        external=True,
    )
    lb.upsert_service(
        CLUSTER_IP,
        [Backend(id=base + 1, address=SOCKET_BACKEND, port=BACKEND_PORT)],
        service_id=60002,
    )


def _per_call(
    tb: Testbed,
    prog: Program,
    packet: bytes,
    *,
    expect: int,
    repeat: int,
    packets: int,
    ifindex: int,
) -> float:
    calls = max(1, packets // repeat)
    total = 0
    for _ in range(calls):
        result = tb.run(prog, packet, ifindex=ifindex, repeat=repeat)
        if result.retval != expect:
            raise RuntimeError(f"{prog.name}: verdict {result.retval}, expected {expect}")
        total += result.duration_ns * repeat
    return total / (calls * repeat)


def _nodeport_packet(tb: Testbed) -> bytes:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    return bytes(
        Ether(src=GATEWAY_MAC, dst=tb.uplink.mac)
        / IP(src=str(WORLD_IP), dst=str(NODEPORT.address), ttl=64)
        / TCP(sport=40000, dport=NODEPORT.port, flags="A")
        / b"request"
    )


def _pod_packet(tb: Testbed) -> bytes:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    return bytes(
        Ether(src=GATEWAY_MAC, dst=tb.uplink.mac)
        / IP(src="10.244.2.20", dst=str(tb.pod_b.ip), ttl=255)
        / TCP(sport=40000, dport=8080, flags="A")
        / b"request"
    )


@contextlib.contextmanager
def bpf_run_time_stats() -> Iterator[None]:
    """The kernel's per-program run time statistics on, for the block only:
    BPF_ENABLE_STATS keeps them on while its file descriptor is open (the
    sysctl kernel.bpf_stats_enabled is not touched, so nothing is left on if
    this process dies)."""
    number = _SYS_BPF.get(os.uname().machine)
    if number is None:
        raise RuntimeError(f"BPF statistics: no bpf syscall number for {os.uname().machine}")
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint32 * 32)(_BPF_STATS_RUN_TIME)  # union bpf_attr, enable_stats.type
    fd = libc.syscall(number, _BPF_ENABLE_STATS, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_ENABLE_STATS: {os.strerror(err)}")
    try:
        yield
    finally:
        os.close(fd)


def prog_run_time(prog: Program) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of a loaded program, as ``bpftool prog show`` reads them."""
    proc = subprocess.run(
        ["bpftool", "prog", "show", "id", str(prog.id), "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    info = json.loads(proc.stdout)
    return int(info.get("run_time_ns", 0)), int(info.get("run_cnt", 0))


SocketLab = Callable[..., tuple[float, float]]


@contextlib.contextmanager
def _socket_lab(tb: Testbed) -> Iterator[SocketLab]:
    """A namespace with a TCP server on the backend address, a cgroup with
    the socket LB attached; yields a function running the client there for
    ``count`` rounds and returning (p50 to the service, p50 direct); with
    ``only`` ("service" or "direct") the client connects to that one alone
    (the other figure is then 0)."""
    root = cgroup2_root()
    if root is None:
        raise RuntimeError("no cgroup v2 hierarchy mounted: the socket LB cannot be measured")
    tag = f"cbl{secrets.token_hex(3)}"
    with contextlib.ExitStack() as undo:
        subprocess.run(["ip", "netns", "add", tag], check=True)
        undo.callback(subprocess.run, ["ip", "netns", "del", tag], check=False)
        subprocess.run(["ip", "-n", tag, "link", "set", "lo", "up"], check=True)
        cgroup = Path(root) / tag
        cgroup.mkdir()
        undo.callback(cgroup.rmdir)
        links = Path("/sys/fs/bpf") / tag
        undo.callback(links.rmdir)
        attach_socket_lb(tb.datapath.programs, cgroup=cgroup, links_dir=links)
        undo.callback(detach_socket_lb, links)
        with enter_netns(f"/run/netns/{tag}"):
            server = socket.create_server((str(SOCKET_BACKEND), BACKEND_PORT), backlog=1024)
        undo.callback(server.close)
        undo.callback(_shutdown, server)

        def serve() -> None:
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                conn.close()

        threading.Thread(target=serve, daemon=True).start()

        def measure(count: int, only: str = "") -> tuple[float, float]:
            procs = cgroup / "cgroup.procs"
            proc = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    tag,
                    sys.executable,
                    "-c",
                    _CLIENT,
                    str(CLUSTER_IP.address),
                    str(SOCKET_BACKEND),
                    str(BACKEND_PORT),
                    str(count),
                    *([only] if only else []),
                ],
                preexec_fn=lambda: procs.write_text(str(os.getpid())),
                capture_output=True,
                text=True,
                check=True,
                timeout=600,
            )
            figures = json.loads(proc.stdout)
            return (
                statistics.median(figures["service"] or [0]),
                statistics.median(figures["direct"] or [0]),
            )

        yield measure


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def run(
    *,
    rounds: int = 5,
    packets: int = 20_000,
    connects: int = 2_000,
    sizes: tuple[int, ...] = SIZES,
    progress: Callable[[str], None] | None = None,
) -> list[Result]:
    paths = (
        "nodeport flow (from_netdev)",
        "not a service (from_netdev)",
        "connect() (socket LB)",
        "connect4 program per connect",
    )
    figures: dict[tuple[int, str], list[float]] = {(n, p): [] for n in sizes for p in paths}
    bases: dict[tuple[int, str], list[float]] = {(n, p): [] for n in sizes for p in paths}
    with (
        Testbed(prefix="cbl") as tb,
        BpfObject.open(objects.object_path("empty")) as empty_obj,
    ):
        empty_obj.load()
        empty = empty_obj.program("empty")
        tb.route_uplink()
        tb.add_pods()
        netdev = tb.datapath.program("from_netdev")
        ifindex = tb.uplink.ifindex
        connect4 = tb.datapath.program("sock4_connect")

        def connect4_ns_per_run(only: str) -> float:
            before = prog_run_time(connect4)
            connect_p50(connects, only)
            after = prog_run_time(connect4)
            return (after[0] - before[0]) / max(1, after[1] - before[1])

        with _socket_lab(tb) as connect_p50, bpf_run_time_stats():
            for round_no in range(1, rounds + 1):
                for n in sizes:
                    if progress:
                        progress(f"round {round_no}/{rounds}: {n} services")
                    fill(tb.datapath.lb, n, local_backend=tb.pod_a.ip)
                    np_packet, pod_packet = _nodeport_packet(tb), _pod_packet(tb)
                    # The flow's first packet makes its entries; then measure.
                    tb.run(netdev, np_packet, ifindex=ifindex)
                    run_np = (netdev, np_packet, TC_ACT_REDIRECT, 1)
                    run_pod = (netdev, pod_packet, TC_ACT_REDIRECT, 250)
                    for path, (prog, packet, expect, repeat) in zip(
                        paths[:2], (run_np, run_pod), strict=True
                    ):
                        figures[n, path].append(
                            _per_call(
                                tb,
                                prog,
                                packet,
                                expect=expect,
                                repeat=repeat,
                                packets=packets,
                                ifindex=ifindex,
                            )
                        )
                        bases[n, path].append(
                            _per_call(
                                tb,
                                empty,
                                packet,
                                expect=TC_ACT_OK,
                                repeat=repeat,
                                packets=packets,
                                ifindex=ifindex,
                            )
                        )
                    service, direct = connect_p50(connects)
                    figures[n, paths[2]].append(service)
                    bases[n, paths[2]].append(direct)
                    figures[n, paths[3]].append(connect4_ns_per_run("service"))
                    bases[n, paths[3]].append(connect4_ns_per_run("direct"))
        tb.datapath.lb.clear()
    results = []
    for path in paths:
        for n in sizes:
            mine, base = figures[n, path], bases[n, path]
            results.append(
                Result(
                    services=n,
                    path=path,
                    median=statistics.median(mine),
                    baseline=statistics.median(base),
                    ratio=statistics.median(a / b for a, b in zip(mine, base, strict=True)),
                    vs_one_service=statistics.median(
                        a / b for a, b in zip(mine, figures[sizes[0], path], strict=True)
                    ),
                )
            )
    return results


def print_table(results: list[Result]) -> None:
    from rich.table import Table

    from ciliate.bench.report import print_wide

    table = Table(
        title="services: cost by number of services (median of rounds)",
        caption="baseline: empty tc program (packets), connect() to the backend directly "
        "(sockets), the connect4 program on a connect to no service (program run time, "
        "BPF statistics); x1 service: the same path with one service, round by round",
    )
    for column in ("path", "services", "ns", "baseline ns", "x baseline", "x 1 service"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for r in results:
        table.add_row(
            r.path,
            f"{r.services:,}",
            f"{r.median:.0f}",
            f"{r.baseline:.0f}",
            f"{r.ratio:.2f}",
            f"{r.vs_one_service:.2f}",
        )
    print_wide(table)


def write_json(results: list[Result], path: Path) -> None:
    path.write_text(
        json.dumps({"benchmark": "lb_scaling", "results": [asdict(r) for r in results]}, indent=2)
        + "\n"
    )


def main() -> int:
    from ciliate.bench.report import progress_to_stderr

    print_table(run(progress=progress_to_stderr))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
