"""The tracker's set-associative table through the real programs: several
connections in one set, each found from both directions; a full set's
victim; TCP FIN and RST of a connection nobody opened.

The fast path (policy.h, ct_established()) searches a set's ways for a
packet's tuple first and for its reverse only then; these tests put
connections in every way of one set, so a reply's connection sits after
ways holding other connections, and check that each packet still finds
its own. The set hash folds the two ports together (sport ^ dport, so a
reply finds its connection's set): flows between the same two pods whose
ports have the same XOR share a set, whatever the hash makes of it.

Pod A (identity 1001) sends UDP to pod B (identity 1002); B lets A's UDP
in, A lets nothing in: a packet from B to A passes only as a reply.
"""

from __future__ import annotations

import pytest

from ciliate.datapath.conntrack import LIFETIMES, WAYS, Way, hz, now
from ciliate.datapath.policy import PolicyEntry
from ciliate.datapath.tables import Direction, DropReason, EventType
from ciliate.datapath.testbed import Pod, Testbed

from .packets import IP, TC_ACT_REDIRECT, TC_ACT_SHOT, TCP, UDP, Ether

A_ID, B_ID = 1001, 1002
A_EP, B_EP = 1, 2
TCP_P, UDP_P = 6, 17
# Flows (sport, dport) of A -> B whose ports XOR to the same value: one set.
FLOWS = [(40000 + i, (40000 + i) ^ 0x9C00) for i in range(WAYS + 1)]


@pytest.fixture(autouse=True)
def policy(tb: Testbed) -> None:
    tb.add_pods()
    tb.datapath.policy.replace(
        B_EP,
        [PolicyEntry("ingress", A_ID, UDP_P, 0), PolicyEntry("ingress", A_ID, TCP_P, 80)],
        ingress_enforced=True,
        egress_enforced=False,
    )
    tb.datapath.policy.replace(A_EP, [], ingress_enforced=True, egress_enforced=False)


def send(tb: Testbed, src: Pod, dst: Pod, l4: object) -> int:
    packet = Ether(src=src.eth0.mac, dst=src.lxc.mac) / IP(src=str(src.ip), dst=str(dst.ip)) / l4
    return tb.run("from_container", bytes(packet / b"payload"), ifindex=src.lxc.ifindex).retval


def a_to_b(tb: Testbed, flow: tuple[int, int]) -> int:
    sport, dport = flow
    return send(tb, tb.pod_a, tb.pod_b, UDP(sport=sport, dport=dport))


def b_to_a(tb: Testbed, flow: tuple[int, int]) -> int:
    """The reply of A's connection `flow`."""
    sport, dport = flow
    return send(tb, tb.pod_b, tb.pod_a, UDP(sport=dport, dport=sport))


def ways_of(tb: Testbed) -> dict[tuple[int, int], Way]:
    """Each tracked connection (sport, dport) -> where it sits."""

    def port(value: int) -> int:
        return int.from_bytes(value.to_bytes(2, "little"), "big")

    return {
        (port(key["sport"]), port(key["dport"])): way
        for way, key, _ in tb.datapath.conntrack.entries()
    }


def open_in_one_set(tb: Testbed, flows: list[tuple[int, int]]) -> int:
    """A opens `flows`, which fill the ways of one set in order; its index."""
    for flow in flows:
        assert a_to_b(tb, flow) == TC_ACT_REDIRECT
    where = ways_of(tb)
    (index,) = {way.set_index for way in where.values()}
    assert where == {flow: Way(index, way) for way, flow in enumerate(flows)}
    return index


def test_connections_sharing_a_set_each_find_their_way_from_both_directions(tb: Testbed) -> None:
    flows = FLOWS[:WAYS]
    open_in_one_set(tb, flows)
    # Last way first: each reply's connection sits after ways that hold
    # others (searched for the reply's own tuple first, in vain).
    for flow in reversed(flows):
        assert b_to_a(tb, flow) == TC_ACT_REDIRECT  # the first reply
        assert b_to_a(tb, flow) == TC_ACT_REDIRECT  # a reply of an answered connection
        assert a_to_b(tb, flow) == TC_ACT_REDIRECT
    connections = tb.datapath.conntrack.list()
    assert len(connections) == WAYS and all(c.seen_reply for c in connections)
    # The same set, a flow nobody opened: B opening it to A is denied.
    assert b_to_a(tb, FLOWS[WAYS]) == TC_ACT_SHOT


def test_a_reply_in_a_later_way_is_judged_again_when_its_ends_changed(tb: Testbed) -> None:
    flows = FLOWS[:WAYS]
    open_in_one_set(tb, flows)
    for flow in flows:
        assert b_to_a(tb, flow) == TC_ACT_REDIRECT
    # B stops letting A's UDP in: replies of the connections are judged
    # again as A sent them: the last way's connection ends with its reply.
    tb.datapath.policy.replace(
        B_EP,
        [PolicyEntry("ingress", A_ID, TCP_P, 80)],
        ingress_enforced=True,
        egress_enforced=False,
    )
    tb.events()
    last = flows[-1]
    assert b_to_a(tb, last) == TC_ACT_SHOT
    (event,) = [e for e in tb.events() if e.type == EventType.DROP]
    assert event.reason == DropReason.POLICY_DENIED and event.direction == Direction.INGRESS
    assert (event.src_identity, event.dst_identity, event.dport) == (A_ID, B_ID, last[1])
    assert set(ways_of(tb)) == set(flows[:-1])


def test_a_new_connection_in_a_full_set_takes_the_way_that_expires_first(tb: Testbed) -> None:
    *first, newcomer = FLOWS
    index = open_in_one_set(tb, first)
    soonest = Way(index, 2)
    tb.datapath.conntrack.set_expiry(soonest, now() + 5 * hz())
    evicted = first[2]
    assert a_to_b(tb, newcomer) == TC_ACT_REDIRECT
    assert ways_of(tb)[newcomer] == soonest
    assert evicted not in ways_of(tb)
    # The evicted connection's reply is a new connection from B now: denied.
    assert b_to_a(tb, evicted) == TC_ACT_SHOT
    for flow in (*first[:2], first[3], newcomer):
        assert b_to_a(tb, flow) == TC_ACT_REDIRECT


@pytest.mark.parametrize("flags", ["FA", "R", "RA"])
def test_a_fin_or_rst_of_an_unknown_connection_is_judged_as_a_new_one(
    tb: Testbed, flags: str
) -> None:
    # Allowed: tracked, closing, with the lifetime of a closing connection.
    assert send(tb, tb.pod_a, tb.pod_b, TCP(sport=40000, dport=80, flags=flags)) == TC_ACT_REDIRECT
    (connection,) = tb.datapath.conntrack.list()
    assert connection.closing and not connection.seen_reply
    assert LIFETIMES["close"] - 5 < connection.expires_in <= LIFETIMES["close"]
    # Denied (A lets nothing in): dropped, nothing tracked for it.
    assert send(tb, tb.pod_b, tb.pod_a, TCP(sport=41000, dport=80, flags=flags)) == TC_ACT_SHOT
    assert len(tb.datapath.conntrack.list()) == 1
