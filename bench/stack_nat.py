"""What the kube-proxy check (stack_nat.h) costs local delivery.

``python -m ciliate.bench.stack_nat [--rounds N] [--packets N]``: pod_b's
UDP packet to pod_a through from_container under BPF_PROG_TEST_RUN, with
the objects as the agent loads them by default (the check compiled out)
and as it loads them with --no-service-lb (one bpf_skb_ct_lookup per
TCP/UDP packet for a local pod). Two phases, rounds interleaved within
each: the namespace's conntrack idle (no NAT rule: the lookup finds an
empty table), then active (a kube-proxy-style DNAT present) with the flow
not tracked, and with the flow tracked without NAT (the lookup hits, takes
and drops a reference). Figures are medians of ns/packet; ratios are paired
per round against the default objects of the same round."""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import sys
from collections.abc import Callable

from ciliate.datapath import objects
from ciliate.datapath.maps import Endpoint
from ciliate.datapath.programs import Datapath
from ciliate.datapath.testbed import Testbed
from ciliate.loader import BpfObject, Program

TC_ACT_REDIRECT = 7
CLIENT_PORT, TRACKED_PORT, BACKEND_PORT = 40009, 40003, 8080
# A test run repeats on the same skb, which the program rewrites: TTL 255
# lasts the repeats, and pod_a's MACs are chosen so that the rewritten frame
# is again a valid frame from pod_b (as bench/datapath.py does for A->B).
REPEAT = 200


def _udp(tb: Testbed, client_port: int) -> bytes:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    packet = (
        Ether(src=tb.pod_b.eth0.mac, dst=tb.pod_b.lxc.mac)
        / IP(src=str(tb.pod_b.ip), dst=str(tb.pod_a.ip), ttl=255)
        / UDP(sport=BACKEND_PORT, dport=client_port)
        / bytes(18)
    )
    return bytes(packet)


def _per_packet(tb: Testbed, prog: Program, packet: bytes, *, packets: int) -> float:
    repeat = REPEAT
    calls = max(1, packets // repeat)
    total = 0
    for _ in range(calls):
        result = tb.run(prog, packet, ifindex=tb.pod_b.lxc.ifindex, repeat=repeat)
        if result.retval not in (TC_ACT_REDIRECT, 0):
            raise RuntimeError(f"{prog.name}: verdict {result.retval}: left the path under test")
        total += result.duration_ns * repeat
    return total / (calls * repeat)


def _activate_conntrack(tb: Testbed) -> None:
    """A DNAT rule (conntrack then tracks the namespace's traffic) and one
    tracked, untranslated flow pod_a:TRACKED_PORT -> pod_b:BACKEND_PORT."""

    def run(*args: str) -> None:
        subprocess.run(["ip", "netns", "exec", tb.netns, *args], check=True)

    run("ip", "link", "set", "lo", "up")
    run("ip", "addr", "add", f"{tb.pod_a.ip}/32", "dev", "lo")
    run("ip", "route", "add", f"{tb.pod_b.ip}/32", "dev", "lo")
    run(
        *"iptables -t nat -A OUTPUT -d 10.96.0.10/32 -p udp --dport 80 -j DNAT "
        f"--to-destination {tb.pod_b.ip}:{BACKEND_PORT}".split()
    )
    script = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        f"s.bind(({str(tb.pod_a.ip)!r}, {TRACKED_PORT})); "
        f"s.sendto(b'x', ({str(tb.pod_b.ip)!r}, {BACKEND_PORT}))"
    )
    run(sys.executable, "-c", script)


def _phase(
    cases: dict[str, Callable[[], float]], rounds: int, baseline: str
) -> dict[str, tuple[float, float]]:
    figures: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, measure in cases.items():
            figures[name].append(measure())
    return {
        name: (
            statistics.median(values),
            statistics.median(v / b for v, b in zip(values, figures[baseline], strict=True)),
        )
        for name, values in figures.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ciliate.bench.stack_nat")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--packets", type=int, default=200_000)
    args = parser.parse_args(argv)
    with (
        Testbed(prefix="cbn") as tb,
        BpfObject.open(objects.object_path("empty")) as empty_obj,
    ):
        tb.add_pods()
        a, b = tb.pod_a, tb.pod_b
        tb.datapath.endpoints.upsert(
            Endpoint(
                ipv4=a.ip,
                ifindex=a.lxc.ifindex,
                mac=b.lxc.mac,
                node_mac=b.eth0.mac,
                identity=1001,
                endpoint_id=1,
            )
        )
        empty_obj.load()
        empty = empty_obj.program(next(iter(empty_obj.programs)))
        config = dataclasses.replace(tb.config, stack_nat_replies=True)
        with Datapath.load(config, existing_maps=tb.datapath.maps) as beside:
            default_prog = tb.datapath.program("from_container")
            check_prog = beside.program("from_container")
            untracked, tracked = _udp(tb, CLIENT_PORT), _udp(tb, TRACKED_PORT)

            def case(prog: Program, packet: bytes) -> Callable[[], float]:
                return lambda: _per_packet(tb, prog, packet, packets=args.packets)

            idle = _phase(
                {
                    "empty tc program": case(empty, untracked),
                    "local delivery, default": case(default_prog, untracked),
                    "local delivery, --no-service-lb": case(check_prog, untracked),
                },
                args.rounds,
                "local delivery, default",
            )
            _activate_conntrack(tb)
            active = _phase(
                {
                    "empty tc program": case(empty, untracked),
                    "local delivery, default": case(default_prog, untracked),
                    "--no-service-lb, flow not tracked": case(check_prog, untracked),
                    "--no-service-lb, flow tracked, no NAT": case(check_prog, tracked),
                },
                args.rounds,
                "local delivery, default",
            )
    for title, results in (("conntrack idle", idle), ("conntrack active (a DNAT rule)", active)):
        print(f"{title}: ns/packet (median), ratio to default (paired median)")
        for name, (ns, ratio) in results.items():
            print(f"  {name:40s} {ns:7.1f} ns  {ratio:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
