"""to_container (pod veth egress), from_host (cilium_host egress) and
from_netdev (uplink ingress)."""

from __future__ import annotations

import pytest

from ciliate.datapath.tables import Direction, DropReason, EventType, TracePoint
from ciliate.datapath.testbed import NODE_IP, REMOTE_NODE_IP, ROUTER_IP, WORLD_IP, Testbed

from .conftest import drop_site
from .packets import (
    ICMP,
    IP,
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    TC_ACT_SHOT,
    Ether,
    arp_request,
    ipv4_header_valid,
    l4_bytes,
)


@pytest.fixture(autouse=True)
def pods(tb: Testbed) -> None:
    tb.add_pods()
    tb.datapath.config.set_trace(True)


def routed_by_host(tb: Testbed, dst: object, *, ttl: int = 63) -> bytes:
    """A packet the node routed out of cilium_host (kernel-made MACs)."""
    return bytes(
        Ether(src=tb.cilium_host.mac, dst=tb.cilium_host.mac)
        / IP(src=str(NODE_IP), dst=str(dst), ttl=ttl)
        / ICMP(id=3)
        / b"from-the-node"
    )


def from_fabric(tb: Testbed, dst: object, *, ttl: int = 61, options: bool = False) -> bytes:
    return bytes(
        Ether(src="02:00:00:00:fa:b1", dst=tb.uplink.mac)
        / IP(
            src=str(REMOTE_NODE_IP),
            dst=str(dst),
            ttl=ttl,
            options=[b"\x01\x01\x01\x00"] if options else [],
        )
        / ICMP(id=4)
        / b"from-the-fabric"
    )


# -- to_container ------------------------------------------------------------


def test_delivery_into_a_pod_is_counted_and_traced(tb: Testbed) -> None:
    sent = routed_by_host(tb, tb.pod_b.ip)
    result = tb.run("to_container", sent, ifindex=tb.pod_b.lxc.ifindex)
    assert result.retval == TC_ACT_OK
    assert result.data == sent
    assert tb.datapath.metrics.get(0, Direction.INGRESS) == (1, len(sent))
    (event,) = tb.events()
    assert (event.type, event.reason) == (EventType.TRACE, TracePoint.DELIVERED)
    assert event.ifindex == tb.pod_b.lxc.ifindex


# -- from_host (cilium_host) ---------------------------------------------------


def test_the_host_reaches_a_pod_through_its_veth(tb: Testbed) -> None:
    sent = routed_by_host(tb, tb.pod_b.ip)
    result = tb.run("from_host", sent, ifindex=tb.cilium_host.ifindex)
    assert result.retval == TC_ACT_REDIRECT
    out = Ether(result.data)
    assert (out.dst, out.src) == (tb.pod_b.eth0.mac, tb.pod_b.lxc.mac)
    assert out[IP].ttl == 63  # the stack already routed it
    assert ipv4_header_valid(out)
    assert tb.datapath.metrics.get(0, Direction.INGRESS) == (1, len(sent))
    (event,) = tb.events()
    assert (event.reason, event.target_ifindex) == (TracePoint.TO_POD, tb.pod_b.lxc.ifindex)


def test_the_host_sending_to_a_pod_that_does_not_exist_is_dropped(tb: Testbed) -> None:
    sent = routed_by_host(tb, "10.244.1.99")
    result = tb.run("from_host", sent, ifindex=tb.cilium_host.ifindex)
    assert result.retval == TC_ACT_SHOT
    assert tb.datapath.metrics.get(DropReason.UNKNOWN_ENDPOINT, Direction.INGRESS) == (1, len(sent))
    (event,) = tb.events()
    assert (event.type, event.reason) == (EventType.DROP, DropReason.UNKNOWN_ENDPOINT)
    assert (event.source, event.line) == ("bpf_host.c", drop_site("bpf_host.c", "UNKNOWN_ENDPOINT"))


@pytest.mark.parametrize("dst", [WORLD_IP, ROUTER_IP])
def test_host_traffic_outside_the_pod_cidr_passes_uncounted(tb: Testbed, dst: object) -> None:
    sent = routed_by_host(tb, dst) if dst != ROUTER_IP else routed_by_host(tb, "10.9.9.9")
    result = tb.run("from_host", sent, ifindex=tb.cilium_host.ifindex)
    assert result.retval == TC_ACT_OK and result.data == sent
    assert tb.datapath.metrics.rows() == []
    assert tb.events() == []


# -- from_netdev (uplink) ---------------------------------------------------------


def test_the_uplink_sends_a_packet_for_a_local_pod_straight_into_it(tb: Testbed) -> None:
    sent = from_fabric(tb, tb.pod_a.ip)
    result = tb.run("from_netdev", sent, ifindex=tb.uplink.ifindex)
    assert result.retval == TC_ACT_REDIRECT
    out = Ether(result.data)
    assert (out.dst, out.src) == (tb.pod_a.eth0.mac, tb.pod_a.lxc.mac)
    assert out[IP].ttl == 60 and ipv4_header_valid(out)
    assert l4_bytes(out) == l4_bytes(Ether(sent))
    (event,) = tb.events()
    assert (event.reason, event.target_ifindex) == (TracePoint.TO_POD, tb.pod_a.lxc.ifindex)


@pytest.mark.parametrize("kind", ["world", "node", "unknown_pod", "arp", "truncated"])
def test_the_uplink_lets_everything_else_go_on_untouched(tb: Testbed, kind: str) -> None:
    sent = {
        "world": from_fabric(tb, WORLD_IP),
        "node": from_fabric(tb, NODE_IP),
        "unknown_pod": from_fabric(tb, "10.244.1.99"),
        "arp": bytes(arp_request(tb.pod_a, NODE_IP)),
        "truncated": from_fabric(tb, tb.pod_a.ip, options=True)[: 14 + 20],
    }[kind]
    result = tb.run("from_netdev", sent, ifindex=tb.uplink.ifindex)
    assert result.retval == TC_ACT_OK and result.data == sent
    assert tb.datapath.metrics.rows() == []
    assert tb.events() == []


def test_the_uplink_drops_a_packet_whose_ttl_expires_at_the_pod(tb: Testbed) -> None:
    result = tb.run("from_netdev", from_fabric(tb, tb.pod_a.ip, ttl=1), ifindex=tb.uplink.ifindex)
    assert result.retval == TC_ACT_SHOT
    (event,) = tb.events()
    assert (event.reason, event.source) == (DropReason.TTL_EXCEEDED, "forward.h")
