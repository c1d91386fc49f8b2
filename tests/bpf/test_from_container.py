"""from_container (tc ingress of the pod's host-side veth): ARP responder,
anti-spoofing, local delivery, to the stack, to a remote node, drops."""

from __future__ import annotations

import pytest

from ciliate.datapath.tables import Direction, DropReason, EventType, TracePoint
from ciliate.datapath.testbed import NODE_IP, REMOTE_POD_CIDR, ROUTER_IP, WORLD_IP, Testbed

from .conftest import drop_site
from .packets import (
    ARP,
    IP,
    IPV6,
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    TC_ACT_SHOT,
    Ether,
    arp_request,
    from_pod,
    ipv4_header_valid,
    l4_bytes,
)

PROGRAM = "from_container"


def run_from_a(tb: Testbed, packet: object) -> tuple[int, bytes]:
    result = tb.run(PROGRAM, bytes(packet), ifindex=tb.pod_a.lxc.ifindex)
    return result.retval, result.data


def assert_dropped(
    tb: Testbed, packet: object, reason: str, *, file: str, occurrence: int = 1
) -> None:
    sent = bytes(packet)
    retval, _ = run_from_a(tb, sent)
    assert retval == TC_ACT_SHOT
    assert tb.datapath.metrics.get(DropReason[reason], Direction.EGRESS) == (1, len(sent))
    (event,) = tb.events()
    assert event.type == EventType.DROP
    assert event.reason == DropReason[reason]
    assert (event.source, event.line) == (file, drop_site(file, reason, occurrence))
    assert event.ifindex == tb.pod_a.lxc.ifindex
    assert event.orig_len == len(sent)
    assert event.data == sent[: len(event.data)] and len(event.data) == min(64, len(sent))


@pytest.fixture(autouse=True)
def pods(tb: Testbed) -> None:
    tb.add_pods()
    tb.datapath.config.set_trace(True)


# -- ARP responder ------------------------------------------------------------


@pytest.mark.parametrize("target", ["router", "peer_pod", "remote_pod", "world"])
def test_arp_request_for_any_other_address_is_answered_with_the_node_side_mac(
    tb: Testbed, target: str
) -> None:
    address = {
        "router": ROUTER_IP,
        "peer_pod": tb.pod_b.ip,
        "remote_pod": REMOTE_POD_CIDR[5],
        "world": WORLD_IP,
    }[target]
    retval, data = run_from_a(tb, arp_request(tb.pod_a, address))

    assert retval == TC_ACT_REDIRECT
    reply = Ether(data)
    assert (reply.dst, reply.src) == (tb.pod_a.eth0.mac, tb.pod_a.lxc.mac)
    arp = reply[ARP]
    assert arp.op == 2
    assert (arp.hwsrc, arp.psrc) == (tb.pod_a.lxc.mac, str(address))
    assert (arp.hwdst, arp.pdst) == (tb.pod_a.eth0.mac, str(tb.pod_a.ip))
    (event,) = tb.events()
    assert (event.type, event.reason) == (EventType.TRACE, TracePoint.ARP_REPLY)
    assert event.target_ifindex == tb.pod_a.lxc.ifindex  # back out where it came in


def test_arp_probe_for_the_pods_own_address_goes_unanswered_to_the_stack(tb: Testbed) -> None:
    probe = arp_request(tb.pod_a, tb.pod_a.ip, sender_ip="0.0.0.0")
    retval, data = run_from_a(tb, probe)
    assert retval == TC_ACT_OK
    assert data == bytes(probe)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"sender_mac": "02:de:ad:be:ef:01"}, "INVALID_SMAC"),
        ({"sender_ip": "10.244.1.99"}, "INVALID_SIP"),
    ],
)
def test_arp_request_with_a_spoofed_sender_is_dropped(
    tb: Testbed, kwargs: dict[str, str], reason: str
) -> None:
    assert_dropped(tb, arp_request(tb.pod_a, ROUTER_IP, **kwargs), reason, file="arp.h")


def test_arp_that_is_not_ethernet_ipv4_is_dropped(tb: Testbed) -> None:
    packet = arp_request(tb.pod_a, ROUTER_IP)
    packet[ARP].ptype = 0x86DD
    assert_dropped(tb, packet, "INVALID_ARP", file="arp.h")


# -- anti-spoofing ---------------------------------------------------------------


def test_ipv4_from_a_spoofed_source_ip_is_dropped(tb: Testbed) -> None:
    packet = from_pod(tb.pod_a, tb.pod_b.ip)
    packet[IP].src = "10.244.1.200"
    assert_dropped(tb, packet, "INVALID_SIP", file="lxc.h")


def test_ipv4_from_a_spoofed_source_mac_is_dropped(tb: Testbed) -> None:
    packet = from_pod(tb.pod_a, tb.pod_b.ip)
    packet[Ether].src = "02:de:ad:be:ef:02"
    assert_dropped(tb, packet, "INVALID_SMAC", file="lxc.h")


def test_a_packet_on_a_veth_with_no_endpoint_is_dropped(tb: Testbed) -> None:
    tb.datapath.endpoints.delete(tb.pod_a.endpoint())
    assert_dropped(tb, from_pod(tb.pod_a, tb.pod_b.ip), "NO_ENDPOINT_FOR_IFINDEX", file="lxc.h")


# -- local delivery ------------------------------------------------------------


@pytest.mark.parametrize("l4", ["icmp", "udp", "tcp"])
@pytest.mark.parametrize("ttl", [2, 64, 255])
def test_a_packet_for_a_local_pod_is_routed_straight_into_it(
    tb: Testbed, l4: str, ttl: int
) -> None:
    sent = from_pod(tb.pod_a, tb.pod_b.ip, ttl=ttl, l4=l4)
    retval, data = run_from_a(tb, sent)

    assert retval == TC_ACT_REDIRECT
    out = Ether(data)
    assert (out.dst, out.src) == (tb.pod_b.eth0.mac, tb.pod_b.lxc.mac)
    assert out[IP].ttl == ttl - 1
    assert ipv4_header_valid(out)
    assert (out[IP].src, out[IP].dst) == (str(tb.pod_a.ip), str(tb.pod_b.ip))
    assert l4_bytes(out) == l4_bytes(Ether(bytes(sent)))
    assert tb.datapath.metrics.get(0, Direction.EGRESS) == (1, len(sent))
    (event,) = tb.events()
    assert (event.type, event.reason) == (EventType.TRACE, TracePoint.TO_POD)
    assert event.target_ifindex == tb.pod_b.lxc.ifindex


@pytest.mark.parametrize("ip_id", [0, 1, 0x7FFF, 0xFFFF, 0xFEFF])
def test_the_ttl_checksum_update_holds_for_every_header(tb: Testbed, ip_id: int) -> None:
    # Header ids chosen to push the 16-bit one's-complement sum through carries.
    for tos in (0, 0xFC):
        retval, data = run_from_a(tb, from_pod(tb.pod_a, tb.pod_b.ip, id=ip_id, tos=tos))
        assert retval == TC_ACT_REDIRECT
        assert ipv4_header_valid(Ether(data))


def test_ip_options_do_not_break_delivery(tb: Testbed) -> None:
    sent = from_pod(tb.pod_a, tb.pod_b.ip, options=[b"\x01\x01\x01\x00"])
    retval, data = run_from_a(tb, sent)
    assert retval == TC_ACT_REDIRECT
    out = Ether(data)
    assert out[IP].ihl == 6 and ipv4_header_valid(out)
    assert l4_bytes(out) == l4_bytes(Ether(bytes(sent)))


@pytest.mark.parametrize(("flags", "frag"), [("MF", 0), (0, 185), ("MF", 10)])
def test_ipv4_fragments_are_forwarded_like_whole_packets(
    tb: Testbed, flags: object, frag: int
) -> None:
    sent = from_pod(tb.pod_a, tb.pod_b.ip, flags=flags, frag=frag)
    retval, data = run_from_a(tb, sent)
    assert retval == TC_ACT_REDIRECT
    out = Ether(data)
    assert out[IP].frag == frag and out[IP].ttl == 63 and ipv4_header_valid(out)


def test_ttl_expiring_on_the_way_to_a_local_pod_is_dropped(tb: Testbed) -> None:
    assert_dropped(tb, from_pod(tb.pod_a, tb.pod_b.ip, ttl=1), "TTL_EXCEEDED", file="forward.h")


def test_an_address_in_the_pod_cidr_without_an_endpoint_is_dropped(tb: Testbed) -> None:
    assert_dropped(tb, from_pod(tb.pod_a, "10.244.1.77"), "UNKNOWN_ENDPOINT", file="lxc.h")


# -- to the stack ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("destination", "point"),
    [
        ("router", TracePoint.TO_STACK),
        ("node", TracePoint.TO_STACK),
        ("remote_pod", TracePoint.TO_REMOTE),
        ("world", TracePoint.TO_STACK),
    ],
)
def test_packets_not_for_a_local_pod_go_to_the_stack_unchanged(
    tb: Testbed, destination: str, point: int
) -> None:
    address = {
        "router": ROUTER_IP,
        "node": NODE_IP,
        "remote_pod": REMOTE_POD_CIDR[9],
        "world": WORLD_IP,
    }[destination]
    sent = bytes(from_pod(tb.pod_a, address))
    retval, data = run_from_a(tb, sent)
    assert retval == TC_ACT_OK
    assert data == sent
    assert tb.datapath.metrics.get(0, Direction.EGRESS) == (1, len(sent))
    (event,) = tb.events()
    assert (event.type, event.reason) == (EventType.TRACE, point)


# -- malformed --------------------------------------------------------------------


def test_an_unknown_ethertype_is_dropped(tb: Testbed) -> None:
    packet = Ether(src=tb.pod_a.eth0.mac, dst=tb.pod_a.lxc.mac) / IPV6(dst="fd00::1")
    assert_dropped(tb, packet, "UNKNOWN_L3", file="lxc.h")


def test_a_packet_ending_inside_its_ipv4_header_is_dropped(tb: Testbed) -> None:
    # The kernel's test-run refuses IPv4 frames shorter than 20 header bytes,
    # so the cut falls in the options: IHL says 24 bytes, 20 arrive.
    whole = bytes(from_pod(tb.pod_a, tb.pod_b.ip, options=[b"\x01\x01\x01\x00"]))
    assert_dropped(tb, whole[: 14 + 20], "TRUNCATED", file="ipv4.h", occurrence=2)


def test_a_truncated_arp_is_dropped(tb: Testbed) -> None:
    # test-run needs at least 14 bytes; a frame that ends inside the ARP body
    # is the shortest truncation the kernel lets through.
    whole = bytes(arp_request(tb.pod_a, ROUTER_IP))
    assert_dropped(tb, whole[:20], "TRUNCATED", file="arp.h")


@pytest.mark.parametrize("ihl", [3, 4])
def test_an_ipv4_header_length_below_five_words_is_dropped(tb: Testbed, ihl: int) -> None:
    packet = from_pod(tb.pod_a, tb.pod_b.ip)
    packet[IP].ihl = ihl
    assert_dropped(tb, packet, "INVALID_IP_HEADER", file="ipv4.h")


# -- tracing switch --------------------------------------------------------------


def test_with_tracing_off_forwarded_packets_send_no_event_but_drops_do(tb: Testbed) -> None:
    tb.datapath.config.set_trace(False)
    run_from_a(tb, from_pod(tb.pod_a, tb.pod_b.ip))
    assert tb.events() == []
    run_from_a(tb, from_pod(tb.pod_a, tb.pod_b.ip, ttl=1))
    assert [e.type for e in tb.events()] == [EventType.DROP]
