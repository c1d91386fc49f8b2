"""``ciliate bench datapath``: ns/packet of each datapath path.

Each case is a scapy packet run through the real loaded program with
BPF_PROG_TEST_RUN and a repeat count; the kernel reports the mean time per
run, measured around its own loop (no syscall in the figure). The baseline
is an empty tc program run the same way, at the same repeat count, in the
same session, and every figure is also given as a ratio to it: this machine
is noisy, ratios travel.

Test-run reuses one skb for all repeats, so a program that rewrites the
packet sees its own output on the next run. Every call checks the verdict
of its last run, so a figure never silently measures another path:

- local delivery rewrites the MACs; the benchmark's peer endpoint is given
  the sender's MACs (node side = the sender's eth0), which makes the
  rewritten frame again a valid frame from the sender: every repeat does
  the full work (lookups, both MAC stores, TTL and checksum update). TTL
  255 allows 250 repeats;
- an ARP request turns into a reply, so it runs once per call, against an
  empty program also run once per call;
- events are drained after each call so the ring buffer never fills.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ciliate.datapath import objects
from ciliate.datapath.maps import Endpoint
from ciliate.datapath.testbed import REMOTE_POD_CIDR, ROUTER_IP, Testbed
from ciliate.loader import BpfObject, Program

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    program: str
    repeat: int
    expect: int
    packet: Callable[[Testbed], bytes]
    trace: bool = False


def _from_a(tb: Testbed, dst: object, **ip: object) -> bytes:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    return bytes(
        Ether(src=tb.pod_a.eth0.mac, dst=tb.pod_a.lxc.mac)
        / IP(src=str(ip.pop("src", tb.pod_a.ip)), dst=str(dst), ttl=255)
        / UDP(sport=4000, dport=5000)
        / (b"x" * 18)
    )


def _arp(tb: Testbed) -> bytes:
    from scapy.layers.l2 import ARP, Ether

    a = tb.pod_a
    return bytes(
        Ether(src=a.eth0.mac, dst="ff:ff:ff:ff:ff:ff")
        / ARP(op=1, hwsrc=a.eth0.mac, psrc=str(a.ip), pdst=str(ROUTER_IP))
    )


CASES = [
    Case(
        "arp_reply",
        "ARP request for the gateway, answered",
        "from_container",
        1,
        TC_ACT_REDIRECT,
        _arp,
    ),
    Case(
        "local_delivery",
        "pod -> local pod (redirect_peer)",
        "from_container",
        250,
        TC_ACT_REDIRECT,
        lambda tb: _from_a(tb, tb.pod_b.ip),
    ),
    Case(
        "to_host",
        "pod -> router IP (to the stack)",
        "from_container",
        250,
        TC_ACT_OK,
        lambda tb: _from_a(tb, ROUTER_IP),
    ),
    Case(
        "to_remote_node",
        "pod -> pod on another node (ipcache)",
        "from_container",
        250,
        TC_ACT_OK,
        lambda tb: _from_a(tb, REMOTE_POD_CIDR[9]),
    ),
    Case(
        "spoofed_drop",
        "spoofed source IP, dropped + event",
        "from_container",
        250,
        TC_ACT_SHOT,
        lambda tb: _from_a(tb, tb.pod_b.ip, src="10.244.1.200"),
    ),
    Case(
        "local_delivery_traced",
        "pod -> local pod with tracing on",
        "from_container",
        250,
        TC_ACT_REDIRECT,
        lambda tb: _from_a(tb, tb.pod_b.ip),
        trace=True,
    ),
]


def add_bench_pods(tb: Testbed) -> None:
    """Both pods, with pod B's MACs chosen so a rewritten A->B frame is again
    a valid frame from A (see the module docstring)."""
    tb.add_pods()
    a, b = tb.pod_a, tb.pod_b
    tb.datapath.endpoints.upsert(
        Endpoint(
            ipv4=b.ip,
            ifindex=b.lxc.ifindex,
            mac=a.lxc.mac,
            node_mac=a.eth0.mac,
            identity=1002,
            endpoint_id=2,
        )
    )


@dataclass
class Result:
    name: str
    description: str
    repeat: int
    ns_median: float
    ns_min: float
    ns_max: float
    empty_ns_median: float
    ratio: float


def _measure(
    tb: Testbed,
    prog: Program,
    packet: bytes,
    *,
    ifindex: int,
    repeat: int,
    expect: int,
    packets_per_round: int,
    rounds: int,
) -> list[float]:
    calls = max(1, packets_per_round // repeat)
    per_round = []
    for _ in range(rounds):
        total_ns = 0
        for _ in range(calls):
            result = tb.run(prog, packet, ifindex=ifindex, repeat=repeat)
            if result.retval != expect:
                raise RuntimeError(
                    f"{prog.name}: verdict {result.retval}, expected {expect}: "
                    "the packet left the path under test"
                )
            total_ns += result.duration_ns * repeat
            tb.events()
        per_round.append(total_ns / (calls * repeat))
    return per_round


def run(
    *,
    rounds: int = 7,
    packets_per_round: int = 100_000,
    progress: Callable[[str], None] | None = None,
) -> list[Result]:
    results = []
    with Testbed(prefix="cbb") as tb, BpfObject.open(objects.object_path("empty")) as empty_obj:
        empty_obj.load()
        empty = empty_obj.program("empty")
        add_bench_pods(tb)
        baselines: dict[int, list[float]] = {}
        for case in CASES:
            if progress:
                progress(case.name)
            tb.datapath.config.set_trace(case.trace)
            packet = case.packet(tb)
            ifindex = tb.pod_a.lxc.ifindex
            if case.repeat not in baselines:
                baselines[case.repeat] = _measure(
                    tb,
                    empty,
                    packet,
                    ifindex=ifindex,
                    repeat=case.repeat,
                    expect=TC_ACT_OK,
                    packets_per_round=packets_per_round,
                    rounds=rounds,
                )
            figures = _measure(
                tb,
                tb.datapath.program(case.program),
                packet,
                ifindex=ifindex,
                repeat=case.repeat,
                expect=case.expect,
                packets_per_round=packets_per_round,
                rounds=rounds,
            )
            base = statistics.median(baselines[case.repeat])
            median = statistics.median(figures)
            results.append(
                Result(
                    name=case.name,
                    description=case.description,
                    repeat=case.repeat,
                    ns_median=median,
                    ns_min=min(figures),
                    ns_max=max(figures),
                    empty_ns_median=base,
                    ratio=median / base,
                )
            )
        tb.datapath.config.set_trace(False)
    return results


def print_table(results: list[Result]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="datapath: ns/packet through BPF_PROG_TEST_RUN (median of rounds)")
    for column in ("path", "what", "repeat", "median", "min", "max", "empty", "x empty"):
        table.add_column(column, justify="left" if column in ("path", "what") else "right")
    for r in results:
        table.add_row(
            r.name,
            r.description,
            str(r.repeat),
            f"{r.ns_median:.1f}",
            f"{r.ns_min:.1f}",
            f"{r.ns_max:.1f}",
            f"{r.empty_ns_median:.1f}",
            f"{r.ratio:.2f}",
        )
    Console().print(table)


def write_json(results: list[Result], path: Path) -> None:
    doc = {
        "benchmark": "datapath",
        "unit": "ns/packet",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": [asdict(r) for r in results],
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
