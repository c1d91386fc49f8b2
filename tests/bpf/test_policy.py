"""Network policy and connection tracking in the datapath, through the
real programs: build the packet, write the policy (ciliate.datapath.policy),
run from_container / from_host / from_netdev with BPF_PROG_TEST_RUN, and
check the verdict, the conntrack entry, the counters and the events.

Pod A (identity 1001, endpoint 1) and pod B (identity 1002, endpoint 2)
live on the testbed's node; local delivery A -> B decides A's egress and
B's ingress in A's from_container.
"""

from __future__ import annotations

import ipaddress

import pytest

from ciliate.datapath import abi
from ciliate.datapath.conntrack import LIFETIMES, hz, now
from ciliate.datapath.maps import IpcacheEntry, PodSocket
from ciliate.datapath.policy import PolicyEntry
from ciliate.datapath.tables import Direction, DropReason, EventType
from ciliate.datapath.testbed import (
    HOST_IDENTITY,
    NODE_IP,
    REMOTE_NODE_IP,
    REMOTE_POD_CIDR,
    WORLD_IP,
    Pod,
    Testbed,
)

from .conftest import drop_site
from .packets import ICMP, IP, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TCP, UDP, Ether

A_ID, B_ID = 1001, 1002
A_EP, B_EP = 1, 2
WORLD = abi.constant("CILIATE_IDENTITY_WORLD")
TCP_P, UDP_P, ICMP_P = 6, 17, 1


@pytest.fixture(autouse=True)
def pods(tb: Testbed) -> None:
    tb.add_pods()


def l4(protocol: str, sport: int, dport: int, flags: str) -> object:
    if protocol == "tcp":
        return TCP(sport=sport, dport=dport, flags=flags)
    if protocol == "udp":
        return UDP(sport=sport, dport=dport)
    if flags == "request":
        return ICMP(type=8, id=sport)
    return ICMP(type=0, id=dport)


def send(
    tb: Testbed,
    src: Pod,
    dst: Pod | ipaddress.IPv4Address,
    *,
    protocol: str = "tcp",
    sport: int = 40000,
    dport: int = 80,
    flags: str = "S",
) -> int:
    """A packet from pod `src` through its from_container; the verdict."""
    dst_ip = dst.ip if isinstance(dst, Pod) else dst
    packet = (
        Ether(src=src.eth0.mac, dst=src.lxc.mac)
        / IP(src=str(src.ip), dst=str(dst_ip), ttl=64)
        / l4(protocol, sport, dport, flags)
        / b"payload"
    )
    return tb.run("from_container", bytes(packet), ifindex=src.lxc.ifindex).retval


def a_to_b(tb: Testbed, **kw: object) -> int:
    return send(tb, tb.pod_a, tb.pod_b, **kw)  # type: ignore[arg-type]


def b_to_a(tb: Testbed, **kw: object) -> int:
    return send(tb, tb.pod_b, tb.pod_a, **kw)  # type: ignore[arg-type]


def ingress_of_b(tb: Testbed, *entries: PolicyEntry) -> int:
    return tb.datapath.policy.replace(B_EP, entries, ingress_enforced=True, egress_enforced=False)


def allow_in(identity: int, protocol: int = TCP_P, port: int = 0, port_end: int = 0) -> PolicyEntry:
    return PolicyEntry("ingress", identity, protocol, port, port_end)


def deny_in(identity: int, protocol: int = TCP_P, port: int = 0, port_end: int = 0) -> PolicyEntry:
    return PolicyEntry("ingress", identity, protocol, port, port_end, deny=True)


def assert_policy_drop(tb: Testbed, direction: Direction, *, src: int, dst: int, port: int) -> None:
    (event,) = [e for e in tb.events() if e.type == EventType.DROP]
    assert event.reason == DropReason.POLICY_DENIED
    assert (event.source, event.line) == ("policy.h", drop_site("policy.h", "POLICY_DENIED"))
    assert event.direction == direction
    assert (event.src_identity, event.dst_identity, event.dport) == (src, dst, port)
    assert "policy denied" in event.summary and f"identity {src} -> {dst}" in event.summary


# -- enforcement --------------------------------------------------------------


def test_without_enforcement_everything_passes_and_nothing_is_tracked(tb: Testbed) -> None:
    assert a_to_b(tb, dport=12345) == TC_ACT_REDIRECT
    assert tb.datapath.conntrack.list() == []
    assert tb.datapath.policy.state(B_EP).revision == 0


def test_enforced_ingress_with_no_entries_denies_and_counts_the_drop(tb: Testbed) -> None:
    ingress_of_b(tb)
    sent_len = len(bytes(Ether() / IP() / TCP() / b"payload"))
    assert a_to_b(tb) == TC_ACT_SHOT
    assert tb.datapath.metrics.get(DropReason.POLICY_DENIED, Direction.INGRESS) == (1, sent_len)
    assert_policy_drop(tb, Direction.INGRESS, src=A_ID, dst=B_ID, port=80)
    assert tb.datapath.conntrack.list() == []


def test_a_direction_no_policy_selects_stays_open(tb: Testbed) -> None:
    tb.datapath.policy.replace(B_EP, [], ingress_enforced=False, egress_enforced=True)
    assert a_to_b(tb) == TC_ACT_REDIRECT  # B's egress says nothing about what B receives


# -- what an entry matches ------------------------------------------------------


def test_allowed_by_identity_denied_for_another(tb: Testbed) -> None:
    ingress_of_b(tb, allow_in(A_ID))
    assert a_to_b(tb) == TC_ACT_REDIRECT
    ingress_of_b(tb, allow_in(4242))
    assert a_to_b(tb, sport=40001) == TC_ACT_SHOT


@pytest.mark.parametrize(
    ("protocol", "port", "verdict"),
    [("tcp", 80, TC_ACT_REDIRECT), ("tcp", 81, TC_ACT_SHOT), ("udp", 80, TC_ACT_SHOT)],
)
def test_by_port_and_protocol(tb: Testbed, protocol: str, port: int, verdict: int) -> None:
    ingress_of_b(tb, allow_in(A_ID, TCP_P, 80))
    assert a_to_b(tb, protocol=protocol, dport=port) == verdict


@pytest.mark.parametrize(
    ("port", "verdict"),
    [
        (7999, TC_ACT_SHOT),
        (8000, TC_ACT_REDIRECT),
        (8064, TC_ACT_REDIRECT),
        (8100, TC_ACT_REDIRECT),
        (8101, TC_ACT_SHOT),
    ],
)
def test_by_port_range(tb: Testbed, port: int, verdict: int) -> None:
    ingress_of_b(tb, allow_in(A_ID, TCP_P, 8000, 8100))
    assert a_to_b(tb, dport=port) == verdict


@pytest.mark.parametrize(("protocol", "port"), [("tcp", 1), ("tcp", 65535), ("udp", 53)])
def test_any_port_of_a_protocol(tb: Testbed, protocol: str, port: int) -> None:
    ingress_of_b(tb, allow_in(A_ID, TCP_P))
    expected = TC_ACT_REDIRECT if protocol == "tcp" else TC_ACT_SHOT
    assert a_to_b(tb, protocol=protocol, dport=port) == expected


@pytest.mark.parametrize("protocol", ["tcp", "udp", "icmp"])
def test_any_protocol(tb: Testbed, protocol: str) -> None:
    ingress_of_b(tb, allow_in(A_ID, 0))
    flags = "request" if protocol == "icmp" else "S"
    assert a_to_b(tb, protocol=protocol, flags=flags) == TC_ACT_REDIRECT


def test_identity_zero_is_any_peer(tb: Testbed) -> None:
    ingress_of_b(tb, allow_in(0, TCP_P, 443))
    assert a_to_b(tb, dport=443) == TC_ACT_REDIRECT
    assert a_to_b(tb, dport=80) == TC_ACT_SHOT


@pytest.mark.parametrize(
    "entries",
    [
        # a deny of the same identity at a shorter prefix (a range)
        [allow_in(A_ID, TCP_P, 80), deny_in(A_ID, TCP_P, 1, 1023)],
        # a deny of any peer beside an allow of the identity
        [allow_in(A_ID, 0), deny_in(0, TCP_P, 80)],
        # a deny of any peer, any port, covering an exact allow
        [allow_in(A_ID, TCP_P, 80), deny_in(0, TCP_P)],
        # the same key allowed and denied
        [allow_in(A_ID, TCP_P, 80), deny_in(A_ID, TCP_P, 80)],
    ],
    ids=["range-deny", "any-peer-deny", "any-port-deny", "same-key"],
)
def test_deny_wins_over_allow(tb: Testbed, entries: list[PolicyEntry]) -> None:
    ingress_of_b(tb, *entries)
    assert a_to_b(tb, dport=80) == TC_ACT_SHOT


def test_a_deny_leaves_the_rest_of_an_allow(tb: Testbed) -> None:
    ingress_of_b(tb, allow_in(A_ID, 0), deny_in(0, TCP_P, 22))
    assert a_to_b(tb, dport=22) == TC_ACT_SHOT
    assert a_to_b(tb, dport=80) == TC_ACT_REDIRECT
    assert a_to_b(tb, protocol="udp", dport=22) == TC_ACT_REDIRECT


# -- egress ---------------------------------------------------------------------


def test_egress_of_the_sender_is_decided_with_the_peers_identity(tb: Testbed) -> None:
    tb.datapath.ipcache.upsert(
        IpcacheEntry(ipaddress.IPv4Network(f"{REMOTE_POD_CIDR[5]}/32"), 3000, REMOTE_NODE_IP)
    )
    tb.datapath.policy.replace(
        A_EP,
        [PolicyEntry("egress", B_ID, TCP_P, 80), PolicyEntry("egress", 3000, UDP_P, 53)],
        ingress_enforced=False,
        egress_enforced=True,
    )
    assert a_to_b(tb, dport=80) == TC_ACT_REDIRECT
    assert send(tb, tb.pod_a, REMOTE_POD_CIDR[5], protocol="udp", dport=53) == TC_ACT_OK
    tb.events()
    assert a_to_b(tb, dport=81) == TC_ACT_SHOT
    assert_policy_drop(tb, Direction.EGRESS, src=A_ID, dst=B_ID, port=81)
    # No prefix names it: the world (identity 2), not allowed.
    assert send(tb, tb.pod_a, WORLD_IP, dport=80) == TC_ACT_SHOT
    assert_policy_drop(tb, Direction.EGRESS, src=A_ID, dst=WORLD, port=80)
    # The node (router and node IP) is the host identity.
    assert send(tb, tb.pod_a, NODE_IP, dport=10250) == TC_ACT_SHOT
    assert_policy_drop(tb, Direction.EGRESS, src=A_ID, dst=HOST_IDENTITY, port=10250)


def test_a_policy_cidr_identity_from_the_ipcache_is_the_peer(tb: Testbed) -> None:
    cidr_identity = 1 << 24 | 7  # local scope, as Cilium numbers CIDR identities
    tb.datapath.ipcache.upsert(
        IpcacheEntry(ipaddress.IPv4Network("198.51.100.0/24"), cidr_identity, None)
    )
    tb.datapath.policy.replace(
        A_EP,
        [PolicyEntry("egress", cidr_identity, TCP_P, 443)],
        ingress_enforced=False,
        egress_enforced=True,
    )
    assert send(tb, tb.pod_a, WORLD_IP, dport=443) == TC_ACT_OK
    assert send(tb, tb.pod_a, ipaddress.IPv4Address("203.0.113.1"), dport=443) == TC_ACT_SHOT


# -- the node's stack and other nodes ---------------------------------------------


def from_node_stack(tb: Testbed, src: ipaddress.IPv4Address, dport: int = 8080) -> int:
    packet = (
        Ether(src=tb.cilium_host.mac, dst=tb.cilium_host.mac)
        / IP(src=str(src), dst=str(tb.pod_b.ip), ttl=63)
        / TCP(sport=33000, dport=dport, flags="S")
    )
    return tb.run("from_host", bytes(packet), ifindex=tb.cilium_host.ifindex).retval


def test_the_host_is_always_allowed_in_the_world_is_not(tb: Testbed) -> None:
    ingress_of_b(tb)  # enforced, nothing allowed
    assert from_node_stack(tb, NODE_IP) == TC_ACT_REDIRECT
    assert from_node_stack(tb, WORLD_IP) == TC_ACT_SHOT
    assert_policy_drop(tb, Direction.INGRESS, src=WORLD, dst=B_ID, port=8080)


def from_fabric(tb: Testbed, src: ipaddress.IPv4Address, dport: int = 80) -> int:
    packet = (
        Ether(src="02:00:00:00:fa:b1", dst=tb.uplink.mac)
        / IP(src=str(src), dst=str(tb.pod_b.ip), ttl=61)
        / TCP(sport=33000, dport=dport, flags="S")
    )
    return tb.run("from_netdev", bytes(packet), ifindex=tb.uplink.ifindex).retval


def test_a_remote_senders_identity_comes_from_the_ipcache(tb: Testbed) -> None:
    remote_pod = REMOTE_POD_CIDR[9]
    tb.datapath.ipcache.upsert(
        IpcacheEntry(ipaddress.IPv4Network(f"{remote_pod}/32"), 3000, REMOTE_NODE_IP)
    )
    ingress_of_b(tb, allow_in(3000, TCP_P, 80))
    assert from_fabric(tb, remote_pod) == TC_ACT_REDIRECT
    # Another pod of that node has no identity of its own: the world.
    assert from_fabric(tb, REMOTE_POD_CIDR[10]) == TC_ACT_SHOT
    assert_policy_drop(tb, Direction.INGRESS, src=WORLD, dst=B_ID, port=80)


# -- connections ------------------------------------------------------------------


def test_a_reply_passes_while_the_reverse_new_connection_is_denied(tb: Testbed) -> None:
    ingress_of_b(tb, allow_in(A_ID, TCP_P, 80))
    tb.datapath.policy.replace(A_EP, [], ingress_enforced=True, egress_enforced=False)
    assert a_to_b(tb, sport=40000, dport=80, flags="S") == TC_ACT_REDIRECT
    assert b_to_a(tb, sport=80, dport=40000, flags="SA") == TC_ACT_REDIRECT
    assert a_to_b(tb, sport=40000, dport=80, flags="A") == TC_ACT_REDIRECT
    # B opening a connection to A is new, and A lets nothing in.
    assert b_to_a(tb, sport=41000, dport=80, flags="S") == TC_ACT_SHOT
    (conn,) = tb.datapath.conntrack.list()
    assert (conn.src, conn.dst) == ((tb.pod_a.ip, 40000), (tb.pod_b.ip, 80))
    assert conn.seen_reply and not conn.closing


def test_a_policy_change_applies_to_an_established_connection(tb: Testbed) -> None:
    first = ingress_of_b(tb, allow_in(A_ID, TCP_P, 80))
    assert a_to_b(tb, flags="S") == TC_ACT_REDIRECT
    assert b_to_a(tb, sport=80, dport=40000, flags="SA") == TC_ACT_REDIRECT
    # Still allowed under a new revision: passes, re-verified at it.
    second = ingress_of_b(tb, allow_in(A_ID, TCP_P, 80), allow_in(A_ID, UDP_P, 53))
    assert second == first + 1
    assert b_to_a(tb, sport=80, dport=40000, flags="A") == TC_ACT_REDIRECT
    (conn,) = tb.datapath.conntrack.list()
    assert conn.reply_revision == second
    # Now denied: the next packet, either way, ends the connection.
    ingress_of_b(tb, allow_in(A_ID, UDP_P, 53))
    tb.events()
    assert a_to_b(tb, flags="A") == TC_ACT_SHOT
    assert_policy_drop(tb, Direction.INGRESS, src=A_ID, dst=B_ID, port=80)
    assert tb.datapath.conntrack.list() == []


def test_a_reply_is_judged_again_as_its_opener_sent_it(tb: Testbed) -> None:
    ingress_of_b(tb, allow_in(A_ID, TCP_P, 80))
    assert a_to_b(tb, flags="S") == TC_ACT_REDIRECT
    ingress_of_b(tb)  # B now lets nothing in
    tb.events()
    assert b_to_a(tb, sport=80, dport=40000, flags="SA") == TC_ACT_SHOT
    assert_policy_drop(tb, Direction.INGRESS, src=A_ID, dst=B_ID, port=80)
    assert tb.datapath.conntrack.list() == []


def test_ct_lifetimes_follow_the_tcp_state(tb: Testbed) -> None:
    ingress_of_b(tb, allow_in(A_ID, 0))

    def expires_in() -> float:
        (conn,) = tb.datapath.conntrack.list()
        return conn.expires_in

    a_to_b(tb, flags="S")
    assert LIFETIMES["syn"] - 5 < expires_in() <= LIFETIMES["syn"]
    b_to_a(tb, sport=80, dport=40000, flags="SA")
    assert LIFETIMES["tcp"] - 5 < expires_in() <= LIFETIMES["tcp"]
    a_to_b(tb, flags="FA")
    assert LIFETIMES["close"] - 5 < expires_in() <= LIFETIMES["close"]
    assert tb.datapath.conntrack.list()[0].closing
    tb.datapath.conntrack.flush()
    a_to_b(tb, protocol="udp", dport=53)
    assert LIFETIMES["nontcp"] - 5 < expires_in() <= LIFETIMES["nontcp"]


def test_icmp_echo_replies_pass_by_their_id(tb: Testbed) -> None:
    ingress_of_b(tb, allow_in(A_ID, ICMP_P))
    tb.datapath.policy.replace(A_EP, [], ingress_enforced=True, egress_enforced=False)
    assert a_to_b(tb, protocol="icmp", sport=77, flags="request") == TC_ACT_REDIRECT
    assert b_to_a(tb, protocol="icmp", sport=0, dport=77, flags="reply") == TC_ACT_REDIRECT
    assert b_to_a(tb, protocol="icmp", sport=0, dport=78, flags="reply") == TC_ACT_SHOT


def _age(tb: Testbed, seconds: float) -> None:
    """Move every conntrack entry's deadline `seconds` into the past."""
    ct = tb.datapath.conntrack
    for way, _, _ in list(ct.entries()):
        ct.set_expiry(way, now() - int(seconds * hz()))


def test_gc_removes_expired_entries_and_an_expired_entry_is_no_connection(tb: Testbed) -> None:
    ingress_of_b(tb, allow_in(A_ID, TCP_P, 80))
    tb.datapath.policy.replace(A_EP, [], ingress_enforced=True, egress_enforced=False)
    assert a_to_b(tb, flags="S") == TC_ACT_REDIRECT
    _age(tb, 1)
    assert tb.datapath.conntrack.list()[0].expired
    # The reply of an expired connection is a new connection B -> A: denied.
    assert b_to_a(tb, sport=80, dport=40000, flags="SA") == TC_ACT_SHOT
    assert a_to_b(tb, sport=40002, flags="S") == TC_ACT_REDIRECT  # a live one
    assert tb.datapath.conntrack.gc() == 1
    (conn,) = tb.datapath.conntrack.list()
    assert conn.src == (tb.pod_a.ip, 40002) and not conn.expired


# -- events --------------------------------------------------------------------------


def test_an_allowed_new_connection_is_a_policy_verdict_event_when_tracing(tb: Testbed) -> None:
    tb.datapath.config.set_trace(True)
    ingress_of_b(tb, allow_in(A_ID, TCP_P, 80))
    a_to_b(tb, flags="S")
    verdicts = [e for e in tb.events() if e.type == EventType.POLICY]
    assert len(verdicts) == 1
    (verdict,) = verdicts
    assert (verdict.src_identity, verdict.dst_identity, verdict.protocol, verdict.dport) == (
        A_ID,
        B_ID,
        TCP_P,
        80,
    )
    assert verdict.summary == f"POLICY allowed identity {A_ID} -> {B_ID} tcp/80 (ingress)"
    assert verdict.kind == "policy"
    a_to_b(tb, flags="A")  # an established packet: no verdict again
    assert not [e for e in tb.events() if e.type == EventType.POLICY]


# -- scale -----------------------------------------------------------------------------


def test_ten_thousand_rules(tb: Testbed) -> None:
    many = [allow_in(100_000 + i, TCP_P, 80 + i % 3) for i in range(10_000)]
    ingress_of_b(tb, *many)
    assert a_to_b(tb) == TC_ACT_SHOT
    ingress_of_b(tb, *many, allow_in(A_ID, TCP_P, 80))
    assert a_to_b(tb, sport=40001) == TC_ACT_REDIRECT
    assert len(tb.datapath.policy.entries(B_EP)) == 10_001
    # The old generation is gone: only the live entries remain in the trie.
    assert sum(1 for _ in tb.datapath.maps["ciliate_policy"]) == 10_001


def test_evicting_a_socket_that_is_not_mapped_says_so(tb: Testbed) -> None:
    sock = PodSocket((tb.pod_a.ip, 40000), (tb.pod_b.ip, 80))
    assert tb.datapath.sockets.delete(sock) is False


def test_a_port_reused_after_close_is_a_new_connection_in_the_same_entry(tb: Testbed) -> None:
    ingress_of_b(tb, allow_in(A_ID, TCP_P, 80))
    assert a_to_b(tb, flags="S") == TC_ACT_REDIRECT
    assert b_to_a(tb, sport=80, dport=40000, flags="SA") == TC_ACT_REDIRECT
    assert a_to_b(tb, flags="FA") == TC_ACT_REDIRECT
    assert tb.datapath.conntrack.list()[0].closing
    assert a_to_b(tb, flags="S") == TC_ACT_REDIRECT
    (conn,) = tb.datapath.conntrack.list()
    assert not conn.closing and not conn.seen_reply
    assert LIFETIMES["syn"] - 5 < conn.expires_in <= LIFETIMES["syn"]


def test_a_label_change_applies_to_an_established_connection(tb: Testbed) -> None:
    ingress_of_b(tb, allow_in(A_ID, TCP_P, 80))
    assert a_to_b(tb, flags="S") == TC_ACT_REDIRECT
    assert b_to_a(tb, sport=80, dport=40000, flags="SA") == TC_ACT_REDIRECT
    (conn,) = tb.datapath.conntrack.list()
    assert (conn.orig_identity, conn.reply_identity) == (A_ID, B_ID)
    # A's labels change: another identity, which B's unchanged policy does not name.
    tb.datapath.endpoints.upsert(tb.pod_a.endpoint(identity=1099, endpoint_id=A_EP))
    tb.events()
    assert b_to_a(tb, sport=80, dport=40000, flags="A") == TC_ACT_SHOT
    assert_policy_drop(tb, Direction.INGRESS, src=1099, dst=B_ID, port=80)
    assert tb.datapath.conntrack.list() == []


def test_a_remote_peer_whose_identity_changes_is_judged_again(tb: Testbed) -> None:
    remote_pod = ipaddress.IPv4Network(f"{REMOTE_POD_CIDR[9]}/32")
    tb.datapath.ipcache.upsert(IpcacheEntry(remote_pod, 3000, REMOTE_NODE_IP))
    ingress_of_b(tb, allow_in(3000, TCP_P, 80))
    assert from_fabric(tb, REMOTE_POD_CIDR[9]) == TC_ACT_REDIRECT
    tb.datapath.ipcache.upsert(IpcacheEntry(remote_pod, 3001, REMOTE_NODE_IP))
    tb.events()
    assert from_fabric(tb, REMOTE_POD_CIDR[9]) == TC_ACT_SHOT
    assert_policy_drop(tb, Direction.INGRESS, src=3001, dst=B_ID, port=80)
