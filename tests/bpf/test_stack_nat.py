"""stack_nat.h under BPF_PROG_TEST_RUN: with stack_nat_replies set (the
agent's --no-service-lb), a packet for a local pod that belongs to a
connection the node's stack NATed (a kube-proxy's DNAT) is handed to the
stack unchanged instead of being redirected past it.

The kernel conntrack state is real: UDP sent through an OUTPUT DNAT rule
inside the testbed's namespace (the test run binds the skb to a device of
that namespace, so bpf_skb_ct_lookup looks there). The datapath is loaded
twice on the same maps: as the agent loads it without its service LB, and
as it loads it by default (the check compiled out by the verifier)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Iterator

import pytest
from scapy.packet import Packet

from ciliate.datapath.programs import Datapath
from ciliate.datapath.testbed import REMOTE_POD_CIDR, Testbed
from tests.bpf.packets import IP, TC_ACT_OK, TC_ACT_REDIRECT, TCP, UDP, Ether

SERVICE_IP = "10.96.0.10"  # DNAT to pod_b:8080
REMOTE_SERVICE_IP = "10.96.0.11"  # DNAT to REMOTE_BACKEND:8080
REMOTE_BACKEND = REMOTE_POD_CIDR[5]
BACKEND_PORT = 8080
# Client ports of pod_a: through the local DNAT, through the remote DNAT,
# straight to pod_b (a tracked connection without NAT), never used.
NAT_LOCAL, NAT_REMOTE, PLAIN, UNKNOWN = 40001, 40002, 40003, 40009


def netns_run(tb: Testbed, *args: str, stdin: str | None = None) -> None:
    subprocess.run(["ip", "netns", "exec", tb.netns, *args], input=stdin, text=True, check=True)


def make_conntrack_state(tb: Testbed) -> None:
    """pod_a's address on lo, routes through lo, kube-proxy-style DNATs in
    OUTPUT, and one UDP datagram per connection: each leaves an entry in the
    namespace's conntrack (the datagrams go nowhere: forwarding is off)."""
    pod_a, pod_b = tb.pod_a, tb.pod_b
    netns_run(tb, "ip", "link", "set", "lo", "up")
    netns_run(tb, "ip", "addr", "add", f"{pod_a.ip}/32", "dev", "lo")
    for cidr in ("10.96.0.0/12", str(pod_b.ip) + "/32", str(REMOTE_POD_CIDR)):
        netns_run(tb, "ip", "route", "add", cidr, "dev", "lo")
    for service, backend in ((SERVICE_IP, pod_b.ip), (REMOTE_SERVICE_IP, REMOTE_BACKEND)):
        netns_run(
            tb,
            *f"iptables -t nat -A OUTPUT -d {service}/32 -p udp --dport 80 -j DNAT "
            f"--to-destination {backend}:{BACKEND_PORT}".split(),
        )
    sends = [
        (NAT_LOCAL, SERVICE_IP, 80),
        (NAT_REMOTE, REMOTE_SERVICE_IP, 80),
        (PLAIN, str(pod_b.ip), BACKEND_PORT),
    ]
    script = "import socket\n" + "".join(
        f"s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"s.bind(({str(pod_a.ip)!r}, {sport}))\n"
        f"s.sendto(b'x', ({dst!r}, {dport}))\n"
        for sport, dst, dport in sends
    )
    netns_run(tb, sys.executable, "-c", script)
    # The state the tests rely on, as the kernel lists it.
    table = subprocess.run(
        ["ip", "netns", "exec", tb.netns, "cat", "/proc/net/nf_conntrack"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for sport, _, _ in sends:
        assert f"sport={sport} " in table, table
    assert f"sport={UNKNOWN} " not in table


@pytest.fixture(scope="module")
def bed(bpf_objects: str) -> Iterator[tuple[Testbed, Datapath]]:
    """A testbed of its own (its namespace gets NAT rules and conntrack
    state) and the same objects loaded with stack_nat_replies on its maps."""
    with Testbed(prefix="cbk") as tb:
        tb.add_pods()
        config = dataclasses.replace(tb.config, stack_nat_replies=True)
        with Datapath.load(config, existing_maps=tb.datapath.maps) as beside_kube_proxy:
            make_conntrack_state(tb)
            yield tb, beside_kube_proxy


def reply_from_pod_b(tb: Testbed, client_port: int, *, l4: str = "udp") -> Packet:
    """pod_b's answer to pod_a, as pod_b sends it."""
    layer = (
        UDP(sport=BACKEND_PORT, dport=client_port)
        if l4 == "udp"
        else TCP(sport=BACKEND_PORT, dport=client_port, flags="SA")
    )
    return (
        Ether(src=tb.pod_b.eth0.mac, dst=tb.pod_b.lxc.mac)
        / IP(src=str(tb.pod_b.ip), dst=str(tb.pod_a.ip))
        / layer
        / b"answer"
    )


def reply_from_remote(tb: Testbed, client_port: int) -> Packet:
    """The remote backend's answer to pod_a, as it arrives on the uplink."""
    return (
        Ether(src="02:00:00:00:00:03", dst=tb.uplink.mac)
        / IP(src=str(REMOTE_BACKEND), dst=str(tb.pod_a.ip))
        / UDP(sport=BACKEND_PORT, dport=client_port)
        / b"answer"
    )


def test_a_reply_of_a_connection_the_stack_dnatted_goes_to_the_stack_unchanged(
    bed: tuple[Testbed, Datapath],
) -> None:
    tb, beside = bed
    packet = bytes(reply_from_pod_b(tb, NAT_LOCAL))
    result = tb.run(beside.program("from_container"), packet, ifindex=tb.pod_b.lxc.ifindex)
    assert result.retval == TC_ACT_OK
    assert result.data == packet  # TTL and MACs untouched: the stack routes it


def test_without_the_flag_the_same_reply_is_redirected_past_the_stack(
    bed: tuple[Testbed, Datapath],
) -> None:
    tb, _ = bed
    packet = bytes(reply_from_pod_b(tb, NAT_LOCAL))
    result = tb.run("from_container", packet, ifindex=tb.pod_b.lxc.ifindex)
    assert result.retval == TC_ACT_REDIRECT


@pytest.mark.parametrize("client_port", [PLAIN, UNKNOWN], ids=["tracked-not-nat", "untracked"])
def test_pod_to_pod_packets_the_stack_did_not_translate_are_still_redirected(
    bed: tuple[Testbed, Datapath], client_port: int
) -> None:
    tb, beside = bed
    packet = reply_from_pod_b(tb, client_port)
    result = tb.run(beside.program("from_container"), bytes(packet), ifindex=tb.pod_b.lxc.ifindex)
    assert result.retval == TC_ACT_REDIRECT
    assert Ether(result.data)[IP].ttl == packet[IP].ttl - 1


def test_the_protocol_is_part_of_the_question(bed: tuple[Testbed, Datapath]) -> None:
    """A TCP packet with the ports of the UDP connection is not its reply."""
    tb, beside = bed
    packet = bytes(reply_from_pod_b(tb, NAT_LOCAL, l4="tcp"))
    result = tb.run(beside.program("from_container"), packet, ifindex=tb.pod_b.lxc.ifindex)
    assert result.retval == TC_ACT_REDIRECT


def test_a_reply_from_a_remote_backend_on_the_uplink_goes_to_the_stack(
    bed: tuple[Testbed, Datapath],
) -> None:
    tb, beside = bed
    packet = bytes(reply_from_remote(tb, NAT_REMOTE))
    assert tb.run(beside.program("from_netdev"), packet, ifindex=tb.uplink.ifindex).retval == (
        TC_ACT_OK
    )
    assert tb.run("from_netdev", packet, ifindex=tb.uplink.ifindex).retval == TC_ACT_REDIRECT
    other = bytes(reply_from_remote(tb, UNKNOWN))
    assert tb.run(beside.program("from_netdev"), other, ifindex=tb.uplink.ifindex).retval == (
        TC_ACT_REDIRECT
    )
