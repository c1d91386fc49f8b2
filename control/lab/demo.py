"""The datapath demo: build, load every program, send scapy packets through
them with test-run, and show verdicts, what came out, the metrics and the
events. It creates one private network namespace (for real ifindexes) and
removes it at the end; no packet leaves the programs."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.table import Table

from ciliate.datapath import objects, tables
from ciliate.datapath.testbed import NODE_IP, REMOTE_POD_CIDR, ROUTER_IP, Testbed

VERDICTS = {0: "TC_ACT_OK", 2: "TC_ACT_SHOT", 7: "TC_ACT_REDIRECT"}


def run_datapath_demo(console: Console | None = None) -> int:
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.l2 import ARP, Ether

    console = console or Console()
    if objects.source_root() is not None:
        with console.status("building BPF objects (incremental) ..."):
            result = objects.build()
        console.print(
            f"built in {result.seconds:.2f} s ({', '.join(result.rebuilt) or 'up to date'})"
        )

    with Testbed(prefix="cdemo") as tb:
        tb.add_pods()
        tb.datapath.config.set_trace(True)
        a, b = tb.pod_a, tb.pod_b
        console.print(
            f"node netns {tb.netns}: pod A {a.ip} on {a.lxc.name} "
            f"(ifindex {a.lxc.ifindex}), pod B {b.ip} on {b.lxc.name} "
            f"(ifindex {b.lxc.ifindex}), router {ROUTER_IP}, node {NODE_IP}"
        )

        def pod_a(dst: object, **kw: object) -> bytes:
            return bytes(
                Ether(src=a.eth0.mac, dst=a.lxc.mac)
                / IP(src=str(kw.pop("src", a.ip)), dst=str(dst), ttl=64)
                / ICMP()
            )

        cases: list[tuple[str, str, int, bytes, Callable[[bytes], str]]] = [
            (
                "A: who-has router?",
                "from_container",
                a.lxc.ifindex,
                bytes(
                    Ether(src=a.eth0.mac, dst="ff:ff:ff:ff:ff:ff")
                    / ARP(op=1, hwsrc=a.eth0.mac, psrc=str(a.ip), pdst=str(ROUTER_IP))
                ),
                lambda out: f"is-at {Ether(out)[ARP].hwsrc} (node side of {a.lxc.name})",
            ),
            (
                "A -> B ping",
                "from_container",
                a.lxc.ifindex,
                pod_a(b.ip),
                lambda out: f"into B: dst {Ether(out).dst}, TTL {Ether(out)[IP].ttl}",
            ),
            (
                "A -> router",
                "from_container",
                a.lxc.ifindex,
                pod_a(ROUTER_IP),
                lambda out: "to the node's stack",
            ),
            (
                "A -> remote pod",
                "from_container",
                a.lxc.ifindex,
                pod_a(REMOTE_POD_CIDR[9]),
                lambda out: "to the stack, toward the owning node",
            ),
            (
                "A spoofs 10.244.1.200",
                "from_container",
                a.lxc.ifindex,
                pod_a(b.ip, src="10.244.1.200"),
                lambda out: "dropped",
            ),
            (
                "node -> B",
                "from_host",
                tb.cilium_host.ifindex,
                bytes(
                    Ether(src=tb.cilium_host.mac, dst=tb.cilium_host.mac)
                    / IP(src=str(NODE_IP), dst=str(b.ip))
                    / ICMP()
                ),
                lambda out: f"to {b.lxc.name}: dst {Ether(out).dst}",
            ),
            (
                "fabric -> A",
                "from_netdev",
                tb.uplink.ifindex,
                bytes(Ether(dst=tb.uplink.mac) / IP(src="192.168.200.3", dst=str(a.ip)) / ICMP()),
                lambda out: f"into A: TTL {Ether(out)[IP].ttl}",
            ),
        ]
        table = Table(title="packets through the loaded programs (BPF_PROG_TEST_RUN)")
        for column in ("packet", "program", "verdict", "result"):
            table.add_column(column)
        for label, program, ifindex, packet, describe in cases:
            res = tb.run(program, packet, ifindex=ifindex)
            verdict = VERDICTS.get(res.retval, str(res.retval))
            table.add_row(label, program, verdict, describe(res.data))
        console.print(table)

        metrics = Table(title="ciliate_metrics")
        for column in ("reason", "direction", "packets", "bytes"):
            metrics.add_column(column)
        for row in tb.datapath.metrics.rows():
            metrics.add_row(
                tables.describe_reason(row.reason),
                row.direction.name.lower(),
                str(row.packets),
                str(row.bytes),
            )
        console.print(metrics)

        events = Table(title="ciliate_events")
        for column in ("event", "ifindex", "target", "length"):
            events.add_column(column)
        for event in tb.events():
            events.add_row(
                event.summary,
                str(event.ifindex),
                str(event.target_ifindex or ""),
                str(event.orig_len),
            )
        console.print(events)
    console.print("testbed removed")
    return 0
