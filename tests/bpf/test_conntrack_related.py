"""What the connection tracker knows besides a connection's own packets,
through the real programs: ICMP errors RELATED to a connection (as Linux's
conntrack and Cilium's CT treat them) and the later fragments of a
fragmented datagram (ciliate_frag, as Cilium keeps them).

Pod A (identity 1001, endpoint 1) and pod B (identity 1002, endpoint 2)
live on the testbed's node. In most tests both are isolated for ingress,
B lets A's UDP 5000 in and A lets nothing in: only what belongs to A's
connections may reach A.
"""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet import fragment
from scapy.packet import Packet

from ciliate.datapath.maps import IpcacheEntry
from ciliate.datapath.policy import PolicyEntry
from ciliate.datapath.tables import Direction, DropReason, EventType
from ciliate.datapath.testbed import REMOTE_NODE_IP, REMOTE_POD_CIDR, WORLD_IP, Pod, Testbed

from .packets import ICMP, IP, TC_ACT_REDIRECT, TC_ACT_SHOT, TCP, UDP, Ether

A_ID, B_ID = 1001, 1002
A_EP, B_EP = 1, 2
TCP_P, UDP_P, ICMP_P = 6, 17, 1
ROUTER = ipaddress.IPv4Address("192.0.2.1")  # TEST-NET-1: a router on the way

# ICMP (type, code) of the errors that quote a packet.
PORT_UNREACHABLE = (3, 3)
FRAGMENTATION_NEEDED = (3, 4)
HOST_UNREACHABLE = (3, 1)
TTL_EXCEEDED = (11, 0)
PARAMETER_PROBLEM = (12, 0)


@pytest.fixture(autouse=True)
def isolated(tb: Testbed) -> None:
    """A and B as pods, both isolated for ingress; B lets A's UDP 5000 in."""
    tb.add_pods()
    tb.datapath.policy.replace(
        B_EP,
        [PolicyEntry("ingress", A_ID, UDP_P, 5000)],
        ingress_enforced=True,
        egress_enforced=False,
    )
    tb.datapath.policy.replace(A_EP, [], ingress_enforced=True, egress_enforced=False)
    tb.datapath.maps["ciliate_frag"].clear()


def run_from(tb: Testbed, pod: Pod, packet: Packet) -> int:
    """`packet` (IP and above) as `pod` sends it, through its from_container."""
    frame = Ether(src=pod.eth0.mac, dst=pod.lxc.mac) / packet
    return tb.run("from_container", bytes(frame), ifindex=pod.lxc.ifindex).retval


def from_fabric(tb: Testbed, packet: Packet) -> int:
    """`packet` (IP and above) arriving from another node, through from_netdev."""
    frame = Ether(src="02:00:00:00:fa:b1", dst=tb.uplink.mac) / packet
    return tb.run("from_netdev", bytes(frame), ifindex=tb.uplink.ifindex).retval


def icmp_error(
    src: object, dst: object, kind: tuple[int, int], quoted: Packet, *, ttl: int = 64
) -> Packet:
    """An ICMP error from `src` to `dst` quoting `quoted` as a stack does:
    its IP header and (at least) its first 8 bytes of data."""
    icmp_type, code = kind
    return (
        IP(src=str(src), dst=str(dst), ttl=ttl)
        / ICMP(type=icmp_type, code=code, nexthopmtu=1400 if kind == FRAGMENTATION_NEEDED else 0)
        / bytes(quoted)[:28]
    )


def udp_a_to_b(tb: Testbed, *, sport: int = 4000, dport: int = 5000) -> Packet:
    return (
        IP(src=str(tb.pod_a.ip), dst=str(tb.pod_b.ip), ttl=64)
        / UDP(sport=sport, dport=dport)
        / b"ping"
    )


# -- ICMP errors ------------------------------------------------------------------


def test_port_unreachable_for_an_allowed_udp_flow_reaches_the_client(tb: Testbed) -> None:
    """The case of the issue: without it the client never hears ECONNREFUSED."""
    request = udp_a_to_b(tb)
    assert run_from(tb, tb.pod_a, request) == TC_ACT_REDIRECT
    error = icmp_error(tb.pod_b.ip, tb.pod_a.ip, PORT_UNREACHABLE, request)
    assert run_from(tb, tb.pod_b, error) == TC_ACT_REDIRECT
    # RELATED is no reply: the connection's state and deadline stay as they were.
    (conn,) = tb.datapath.conntrack.list()
    assert not conn.seen_reply
    assert not [e for e in tb.events() if e.type == EventType.DROP]


@pytest.mark.parametrize(
    "kind",
    [PORT_UNREACHABLE, HOST_UNREACHABLE, FRAGMENTATION_NEEDED, TTL_EXCEEDED, PARAMETER_PROBLEM],
    ids=["port-unreachable", "host-unreachable", "frag-needed", "ttl-exceeded", "param-problem"],
)
def test_every_error_type_quoting_a_packet_is_related(tb: Testbed, kind: tuple[int, int]) -> None:
    request = udp_a_to_b(tb)
    assert run_from(tb, tb.pod_a, request) == TC_ACT_REDIRECT
    assert run_from(tb, tb.pod_b, icmp_error(tb.pod_b.ip, tb.pod_a.ip, kind, request)) == (
        TC_ACT_REDIRECT
    )


def test_an_error_about_a_reply_reaches_the_connections_receiver(tb: Testbed) -> None:
    """Either direction: A's stack refusing B's reply is about A's own connection."""
    request = udp_a_to_b(tb)
    assert run_from(tb, tb.pod_a, request) == TC_ACT_REDIRECT
    reply = IP(src=str(tb.pod_b.ip), dst=str(tb.pod_a.ip)) / UDP(sport=5000, dport=4000) / b"pong"
    assert run_from(tb, tb.pod_b, reply) == TC_ACT_REDIRECT
    # B is isolated for ingress and lets in only A's UDP 5000 (not ICMP).
    error = icmp_error(tb.pod_a.ip, tb.pod_b.ip, PORT_UNREACHABLE, reply)
    assert run_from(tb, tb.pod_a, error) == TC_ACT_REDIRECT


def test_an_error_for_a_tcp_connection_is_related(tb: Testbed) -> None:
    tb.datapath.policy.replace(
        B_EP,
        [PolicyEntry("ingress", A_ID, TCP_P, 80)],
        ingress_enforced=True,
        egress_enforced=False,
    )
    syn = IP(src=str(tb.pod_a.ip), dst=str(tb.pod_b.ip)) / TCP(sport=40000, dport=80, flags="S")
    assert run_from(tb, tb.pod_a, syn) == TC_ACT_REDIRECT
    error = icmp_error(tb.pod_b.ip, tb.pod_a.ip, HOST_UNREACHABLE, syn)
    assert run_from(tb, tb.pod_b, error) == TC_ACT_REDIRECT


def test_an_error_about_a_ping_is_related_to_the_ping(tb: Testbed) -> None:
    tb.datapath.policy.replace(
        B_EP, [PolicyEntry("ingress", A_ID, ICMP_P)], ingress_enforced=True, egress_enforced=False
    )
    ping = IP(src=str(tb.pod_a.ip), dst=str(tb.pod_b.ip)) / ICMP(type=8, id=77, seq=1)
    assert run_from(tb, tb.pod_a, ping) == TC_ACT_REDIRECT
    error = icmp_error(tb.pod_b.ip, tb.pod_a.ip, PARAMETER_PROBLEM, ping)
    assert run_from(tb, tb.pod_b, error) == TC_ACT_REDIRECT
    other_ping = IP(src=str(tb.pod_a.ip), dst=str(tb.pod_b.ip)) / ICMP(type=8, id=78, seq=1)
    error = icmp_error(tb.pod_b.ip, tb.pod_a.ip, PARAMETER_PROBLEM, other_ping)
    assert run_from(tb, tb.pod_b, error) == TC_ACT_SHOT


def test_an_error_quoting_no_known_connection_is_judged_as_any_icmp(tb: Testbed) -> None:
    never_sent = udp_a_to_b(tb, sport=4001)
    error = icmp_error(tb.pod_b.ip, tb.pod_a.ip, PORT_UNREACHABLE, never_sent)
    assert run_from(tb, tb.pod_b, error) == TC_ACT_SHOT
    (event,) = [e for e in tb.events() if e.type == EventType.DROP]
    assert event.reason == DropReason.POLICY_DENIED
    assert (event.direction, event.protocol, event.dport) == (Direction.INGRESS, ICMP_P, 0)
    # Allowed as ICMP by A's own policy, it passes like any ICMP packet.
    tb.datapath.policy.replace(
        A_EP, [PolicyEntry("ingress", B_ID, ICMP_P)], ingress_enforced=True, egress_enforced=False
    )
    assert run_from(tb, tb.pod_b, error) == TC_ACT_REDIRECT
    assert tb.datapath.conntrack.list() == []  # an error opens nothing


def test_an_error_must_go_back_to_the_quoted_packets_sender(tb: Testbed) -> None:
    """As Linux checks (nf_conntrack_inet_error): an error quoting a packet
    of A's connection that A did not send is no error of that connection,
    even where the connection itself would be allowed."""
    tb.datapath.policy.replace(
        A_EP, [PolicyEntry("ingress", B_ID, UDP_P)], ingress_enforced=True, egress_enforced=False
    )
    request = udp_a_to_b(tb)
    assert run_from(tb, tb.pod_a, request) == TC_ACT_REDIRECT
    # From B to A, quoting a packet B -> A of the connection (what A receives).
    bogus_quote = IP(src=str(tb.pod_b.ip), dst=str(tb.pod_a.ip)) / UDP(sport=5000, dport=4000)
    misdirected = icmp_error(tb.pod_b.ip, tb.pod_a.ip, PORT_UNREACHABLE, bogus_quote)
    assert run_from(tb, tb.pod_b, misdirected) == TC_ACT_SHOT
    (event,) = [e for e in tb.events() if e.type == EventType.DROP]
    assert (event.protocol, event.dport) == (ICMP_P, 0)  # judged as plain ICMP


def test_an_expired_connection_relates_nothing(tb: Testbed) -> None:
    request = udp_a_to_b(tb)
    assert run_from(tb, tb.pod_a, request) == TC_ACT_REDIRECT
    ct = tb.datapath.conntrack
    (way, _, _) = next(iter(ct.entries()))
    ct.set_expiry(way, 0)
    error = icmp_error(tb.pod_b.ip, tb.pod_a.ip, PORT_UNREACHABLE, request)
    assert run_from(tb, tb.pod_b, error) == TC_ACT_SHOT


def test_a_truncated_quote_is_judged_as_any_icmp(tb: Testbed) -> None:
    request = udp_a_to_b(tb)
    assert run_from(tb, tb.pod_a, request) == TC_ACT_REDIRECT
    short = (
        IP(src=str(tb.pod_b.ip), dst=str(tb.pod_a.ip))
        / ICMP(type=3, code=3)
        / bytes(request)[:24]  # the IP header and half the ports
    )
    assert run_from(tb, tb.pod_b, short) == TC_ACT_SHOT


def test_a_policy_change_applies_to_related_errors(tb: Testbed) -> None:
    """A related error passes as the connection's reply would: judged again
    after a policy change, and when the connection is now denied it ends."""
    request = udp_a_to_b(tb)
    assert run_from(tb, tb.pod_a, request) == TC_ACT_REDIRECT
    error = icmp_error(tb.pod_b.ip, tb.pod_a.ip, PORT_UNREACHABLE, request)
    # A new revision that still allows the connection: passes, re-verified.
    revision = tb.datapath.policy.replace(
        B_EP,
        [PolicyEntry("ingress", A_ID, UDP_P, 5000), PolicyEntry("ingress", A_ID, TCP_P, 80)],
        ingress_enforced=True,
        egress_enforced=False,
    )
    assert run_from(tb, tb.pod_b, error) == TC_ACT_REDIRECT
    (conn,) = tb.datapath.conntrack.list()
    assert conn.reply_revision == revision
    # Now B no longer lets A's UDP 5000 in: the error is dropped, the connection ends.
    tb.datapath.policy.replace(B_EP, [], ingress_enforced=True, egress_enforced=False)
    tb.events()
    assert run_from(tb, tb.pod_b, error) == TC_ACT_SHOT
    (event,) = [e for e in tb.events() if e.type == EventType.DROP]
    assert (event.src_identity, event.dst_identity, event.protocol, event.dport) == (
        A_ID,
        B_ID,
        UDP_P,
        5000,
    )
    assert tb.datapath.conntrack.list() == []


def test_fragmentation_needed_from_a_router_reaches_the_sender(tb: Testbed) -> None:
    """Path MTU discovery: A's connection to a server outside; a router on
    the way (the world, no policy names it) says the packet was too big."""
    tb.datapath.policy.replace(
        A_EP,
        [PolicyEntry("egress", 2, TCP_P, 443)],  # the world, HTTPS
        ingress_enforced=True,
        egress_enforced=True,
    )
    syn = IP(src=str(tb.pod_a.ip), dst=str(WORLD_IP), ttl=64) / TCP(
        sport=40000, dport=443, flags="S"
    )
    assert run_from(tb, tb.pod_a, syn) == 0  # to the stack, toward the world
    error = icmp_error(ROUTER, tb.pod_a.ip, FRAGMENTATION_NEEDED, syn, ttl=60)
    assert from_fabric(tb, error) == TC_ACT_REDIRECT
    # A router quoting a packet A never sent is judged as plain ICMP: denied.
    other = IP(src=str(tb.pod_a.ip), dst=str(WORLD_IP)) / TCP(sport=40001, dport=443)
    assert from_fabric(tb, icmp_error(ROUTER, tb.pod_a.ip, FRAGMENTATION_NEEDED, other)) == (
        TC_ACT_SHOT
    )


def test_time_exceeded_from_a_router_for_a_remote_pod_connection(tb: Testbed) -> None:
    remote = REMOTE_POD_CIDR[9]
    tb.datapath.ipcache.upsert(
        IpcacheEntry(ipaddress.IPv4Network(f"{remote}/32"), 3000, REMOTE_NODE_IP)
    )
    tb.datapath.policy.replace(
        A_EP, [PolicyEntry("egress", 3000, UDP_P, 53)], ingress_enforced=True, egress_enforced=True
    )
    query = IP(src=str(tb.pod_a.ip), dst=str(remote), ttl=64) / UDP(sport=5353, dport=53) / b"q"
    assert run_from(tb, tb.pod_a, query) == 0
    error = icmp_error(ROUTER, tb.pod_a.ip, TTL_EXCEEDED, query)
    assert from_fabric(tb, error) == TC_ACT_REDIRECT


# -- fragments ---------------------------------------------------------------------


def fragments_a_to_b(tb: Testbed, *, dport: int, ip_id: int, size: int = 3000) -> list[Packet]:
    datagram = (
        IP(src=str(tb.pod_a.ip), dst=str(tb.pod_b.ip), ttl=64, id=ip_id)
        / UDP(sport=4000, dport=dport)
        / (b"f" * size)
    )
    pieces: list[Packet] = fragment(datagram, fragsize=1400)
    return pieces


def test_every_fragment_of_an_allowed_datagram_passes(tb: Testbed) -> None:
    pieces = fragments_a_to_b(tb, dport=5000, ip_id=0x1234)
    assert len(pieces) == 3
    assert [run_from(tb, tb.pod_a, p) for p in pieces] == [TC_ACT_REDIRECT] * 3
    # The datagram is one UDP flow: one connection.
    (conn,) = tb.datapath.conntrack.list()
    assert conn.dst == (tb.pod_b.ip, 5000)


def test_every_fragment_of_a_denied_datagram_is_dropped(tb: Testbed) -> None:
    pieces = fragments_a_to_b(tb, dport=6000, ip_id=0x1235)
    assert [run_from(tb, tb.pod_a, p) for p in pieces] == [TC_ACT_SHOT] * 3
    drops = [e for e in tb.events() if e.type == EventType.DROP]
    assert [(e.reason, e.dport) for e in drops] == [(DropReason.POLICY_DENIED, 6000)] * 3


def test_the_fragments_of_a_reply_pass_as_the_reply(tb: Testbed) -> None:
    """A is isolated for ingress: B's fragmented answer passes as a reply."""
    assert run_from(tb, tb.pod_a, udp_a_to_b(tb)) == TC_ACT_REDIRECT
    answer = (
        IP(src=str(tb.pod_b.ip), dst=str(tb.pod_a.ip), id=0x2222)
        / UDP(sport=5000, dport=4000)
        / (b"r" * 3000)
    )
    pieces = fragment(answer, fragsize=1400)
    assert [run_from(tb, tb.pod_b, p) for p in pieces] == [TC_ACT_REDIRECT] * 3
    assert tb.datapath.conntrack.list()[0].seen_reply


def test_interleaved_datagrams_keep_their_own_ports(tb: Testbed) -> None:
    allowed = fragments_a_to_b(tb, dport=5000, ip_id=0x3001)
    denied = fragments_a_to_b(tb, dport=6000, ip_id=0x3002)
    verdicts = []
    for mine, other in zip(allowed, denied, strict=True):
        verdicts.append((run_from(tb, tb.pod_a, mine), run_from(tb, tb.pod_a, other)))
    assert verdicts == [(TC_ACT_REDIRECT, TC_ACT_SHOT)] * 3


def test_a_later_fragment_without_its_first_is_judged_without_ports(tb: Testbed) -> None:
    """Lost or reordered first fragment: no ports, so only a rule for any
    port lets it pass (as before the fragment map)."""
    _, second, third = fragments_a_to_b(tb, dport=5000, ip_id=0x4001)
    assert run_from(tb, tb.pod_a, second) == TC_ACT_SHOT
    tb.datapath.policy.replace(
        B_EP, [PolicyEntry("ingress", A_ID, UDP_P)], ingress_enforced=True, egress_enforced=False
    )
    assert run_from(tb, tb.pod_a, third) == TC_ACT_REDIRECT


def test_fragments_of_an_icmp_echo_are_tracked_with_its_id(tb: Testbed) -> None:
    tb.datapath.policy.replace(
        B_EP, [PolicyEntry("ingress", A_ID, ICMP_P)], ingress_enforced=True, egress_enforced=False
    )
    ping = (
        IP(src=str(tb.pod_a.ip), dst=str(tb.pod_b.ip), id=0x5001)
        / ICMP(type=8, id=99)
        / (b"p" * 3000)
    )
    assert [run_from(tb, tb.pod_a, p) for p in fragment(ping, fragsize=1400)] == (
        [TC_ACT_REDIRECT] * 3
    )
    # B's fragmented echo reply into isolated A: a reply of the ping, every piece.
    pong = (
        IP(src=str(tb.pod_b.ip), dst=str(tb.pod_a.ip), id=0x5002)
        / ICMP(type=0, id=99)
        / (b"p" * 3000)
    )
    assert [run_from(tb, tb.pod_b, p) for p in fragment(pong, fragsize=1400)] == (
        [TC_ACT_REDIRECT] * 3
    )
