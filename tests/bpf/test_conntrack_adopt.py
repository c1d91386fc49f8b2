"""Connections the tracker adopts (Conntrack.adopt): opened before policy applied
to either end, read from a pod's sockets, and from then on judged as their opener
sent them, through the real programs.

Pod A (identity 1001, endpoint 1) is isolated for ingress and lets nothing in;
pod B (1002, endpoint 2) has no policy.
"""

from __future__ import annotations

import ipaddress
import random

import pytest
from scapy.packet import Packet

from ciliate.datapath.conntrack import set_index
from ciliate.datapath.pod_connections import OpenConnection
from ciliate.datapath.policy import PolicyEntry
from ciliate.datapath.tables import DropReason, EventType
from ciliate.datapath.testbed import Pod, Testbed

from .packets import IP, TC_ACT_REDIRECT, TC_ACT_SHOT, TCP, UDP, Ether

A_EP, B_EP = 1, 2
TCP_P, UDP_P = 6, 17


@pytest.fixture(autouse=True)
def a_isolated(tb: Testbed) -> None:
    tb.add_pods()
    tb.datapath.policy.replace(A_EP, [], ingress_enforced=True, egress_enforced=False)


def run_from(tb: Testbed, pod: Pod, packet: Packet) -> int:
    frame = Ether(src=pod.eth0.mac, dst=pod.lxc.mac) / packet
    return tb.run("from_container", bytes(frame), ifindex=pod.lxc.ifindex).retval


def end(pod: Pod, port: int) -> tuple[ipaddress.IPv4Address, int]:
    return ipaddress.IPv4Address(str(pod.ip)), port


def connection(
    opener: tuple[ipaddress.IPv4Address, int],
    other: tuple[ipaddress.IPv4Address, int],
    *,
    protocol: int = TCP_P,
) -> OpenConnection:
    return OpenConnection(
        protocol=protocol, opener=opener, other=other, answered=True, closing=False
    )


def table(tb: Testbed) -> list[tuple[object, ...]]:
    """Every way in use, field by field."""
    return [
        (way, key, {name: value for name, value in entry.items() if name != "key"})
        for way, key, entry in tb.datapath.conntrack.entries()
    ]


def policy_drops(tb: Testbed) -> int:
    return sum(
        1 for e in tb.events() if e.type == EventType.DROP and e.reason == DropReason.POLICY_DENIED
    )


def test_python_finds_the_set_the_programs_use(tb: Testbed) -> None:
    """set_index() follows ct_set_of(): a connection the programs open sits where
    Python looks for it (else adopted entries would never be found)."""
    tb.datapath.policy.replace(
        B_EP,
        [PolicyEntry("ingress", 1001, TCP_P, 0, 0)],
        ingress_enforced=True,
        egress_enforced=False,
    )
    rng = random.Random(7)
    for _ in range(40):
        sport, dport = rng.randrange(1, 65536), rng.randrange(1, 65536)
        tb.datapath.conntrack.flush()
        packet = IP(src=str(tb.pod_a.ip), dst=str(tb.pod_b.ip)) / TCP(
            sport=sport, dport=dport, flags="S"
        )
        assert run_from(tb, tb.pod_a, packet) == TC_ACT_REDIRECT
        ((way, key, _),) = table(tb)
        raw = bytes(IP(src=str(tb.pod_a.ip), dst=str(tb.pod_b.ip)))[12:20]
        wanted = raw + sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + bytes([TCP_P, 0, 0, 0])
        assert key["sport"] == int.from_bytes(sport.to_bytes(2, "big"), "little")
        assert way.set_index == set_index(wanted, tb.datapath.maps["ciliate_ct_v2"].max_entries)


def test_an_adopted_connection_of_the_isolated_pod_gets_its_answers(tb: Testbed) -> None:
    """A opened it (before its ingress was isolated): B's packets are its replies."""
    adopted = tb.datapath.conntrack.adopt([connection(end(tb.pod_a, 40000), end(tb.pod_b, 80))])
    assert adopted == 1
    answer = (
        IP(src=str(tb.pod_b.ip), dst=str(tb.pod_a.ip))
        / TCP(sport=80, dport=40000, flags="PA")
        / b"data"
    )
    assert run_from(tb, tb.pod_b, answer) == TC_ACT_REDIRECT
    assert run_from(tb, tb.pod_b, answer) == TC_ACT_REDIRECT  # verified now: the short path
    ((conn,),) = [tb.datapath.conntrack.list()]
    assert (
        conn.orig_identity == 1001 and conn.reply_identity == 1002
    )  # verified on its first packet
    assert policy_drops(tb) == 0


def test_without_adoption_the_same_answer_is_an_incoming_connection(tb: Testbed) -> None:
    """The control: what adoption fixes."""
    answer = (
        IP(src=str(tb.pod_b.ip), dst=str(tb.pod_a.ip))
        / TCP(sport=80, dport=40000, flags="PA")
        / b"data"
    )
    assert run_from(tb, tb.pod_b, answer) == TC_ACT_SHOT
    assert policy_drops(tb) == 1


def test_an_adopted_connection_into_the_isolated_pod_is_judged_as_its_opener_sent_it(
    tb: Testbed,
) -> None:
    """B opened it: policy applies to existing connections, so it ends, and its entry goes."""
    tb.datapath.conntrack.adopt([connection(end(tb.pod_b, 40000), end(tb.pod_a, 80))])
    # A's packet is a reply of B's connection, judged as B sent it: A lets nothing in.
    reply = IP(src=str(tb.pod_a.ip), dst=str(tb.pod_b.ip)) / TCP(sport=80, dport=40000, flags="A")
    assert run_from(tb, tb.pod_a, reply) == TC_ACT_SHOT
    assert tb.datapath.conntrack.list() == []


def test_udp_flows_are_adopted_too(tb: Testbed) -> None:
    tb.datapath.conntrack.adopt(
        [connection(end(tb.pod_a, 5353), end(tb.pod_b, 53), protocol=UDP_P)]
    )
    answer = IP(src=str(tb.pod_b.ip), dst=str(tb.pod_a.ip)) / UDP(sport=53, dport=5353) / b"answer"
    assert run_from(tb, tb.pod_b, answer) == TC_ACT_REDIRECT


def test_a_connection_the_table_holds_keeps_its_entry(tb: Testbed) -> None:
    """Adopting never overwrites: a tracked connection keeps its state and opener."""
    request = IP(src=str(tb.pod_b.ip), dst=str(tb.pod_a.ip)) / UDP(sport=6000, dport=53)
    tb.datapath.policy.replace(
        A_EP,
        [PolicyEntry("ingress", 1002, UDP_P, 53)],
        ingress_enforced=True,
        egress_enforced=False,
    )
    assert run_from(tb, tb.pod_b, request) == TC_ACT_REDIRECT
    before = table(tb)
    # The same flow seen from A's socket (reversed, as if A had opened it): left alone.
    assert (
        tb.datapath.conntrack.adopt(
            [connection(end(tb.pod_a, 53), end(tb.pod_b, 6000), protocol=UDP_P)]
        )
        == 0
    )
    assert table(tb) == before


def test_a_full_set_is_not_made_room_in(tb: Testbed) -> None:
    """Live connections are never pushed out for an adopted one."""
    tb.datapath.policy.replace(
        B_EP,
        [PolicyEntry("ingress", 1001, UDP_P, 0, 0)],
        ingress_enforced=True,
        egress_enforced=False,
    )
    sets = tb.datapath.maps["ciliate_ct_v2"].max_entries
    target = connection(end(tb.pod_a, 1), end(tb.pod_b, 9), protocol=UDP_P)
    wanted = set_index(
        bytes(IP(src=str(tb.pod_a.ip), dst=str(tb.pod_b.ip)))[12:20]
        + (1).to_bytes(2, "big")
        + (9).to_bytes(2, "big")
        + bytes([UDP_P, 0, 0, 0]),
        sets,
    )
    filled = 0
    for sport in range(2, 400_000):
        key = (
            bytes(IP(src=str(tb.pod_a.ip), dst=str(tb.pod_b.ip)))[12:20]
            + (sport % 65536 or 1).to_bytes(2, "big")
            + (sport // 65536 + 10).to_bytes(2, "big")
            + bytes([UDP_P, 0, 0, 0])
        )
        if set_index(key, sets) != wanted:
            continue
        packet = IP(src=str(tb.pod_a.ip), dst=str(tb.pod_b.ip)) / UDP(
            sport=sport % 65536 or 1, dport=sport // 65536 + 10
        )
        assert run_from(tb, tb.pod_a, packet) == TC_ACT_REDIRECT
        filled += 1
        if filled == 4:
            break
    assert filled == 4
    before = table(tb)
    assert tb.datapath.conntrack.adopt([target]) == 0
    assert table(tb) == before


def test_adopted_keys_are_laid_out_as_abi_h_says() -> None:
    from ciliate.datapath import abi
    from ciliate.datapath.conntrack import _key

    src, dst = (ipaddress.IPv4Address("10.1.2.3"), 40000), (ipaddress.IPv4Address("10.4.5.6"), 80)
    assert _key(TCP_P, src, dst) == abi.pack(
        "ciliate_ct_key",
        saddr=int.from_bytes(src[0].packed, "little"),
        daddr=int.from_bytes(dst[0].packed, "little"),
        sport=int.from_bytes((40000).to_bytes(2, "big"), "little"),
        dport=int.from_bytes((80).to_bytes(2, "big"), "little"),
        protocol=TCP_P,
    )
