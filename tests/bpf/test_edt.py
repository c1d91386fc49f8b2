"""Pod egress bandwidth on the uplink's egress (to_netdev, edt.h): a
rate-limited pod's packets get departure times one packet's length at its
rate apart, and a packet that would leave beyond its drop horizon is dropped
(counted as EDT_HORIZON): paced (fq keeps the times; a 2 s horizon) or, on a
kernel without fq, policed (a short horizon: the bucket's depth). scapy
packets through the loaded program; tests/node/test_bandwidth_manager.py
measures real traffic."""

from __future__ import annotations

import ipaddress
import struct
import time
from collections.abc import Iterator

import pytest

from ciliate.datapath.bandwidth import PACED_HORIZON_NS, Mode, classid
from ciliate.datapath.tables import Direction, DropReason
from ciliate.datapath.testbed import GATEWAY_MAC, NODE_IP, WORLD_IP, Testbed
from ciliate.loader import enter_netns

from .packets import IP, TC_ACT_OK, TC_ACT_SHOT, UDP, Ether

PAYLOAD = 1400
HORIZON_S = PACED_HORIZON_NS / 1e9


@pytest.fixture(scope="module")
def testbed(bpf_objects: str) -> Iterator[Testbed]:
    with Testbed(prefix="cedt") as bed:
        yield bed


@pytest.fixture
def bed(testbed: Testbed) -> Iterator[Testbed]:
    testbed.reset()
    testbed.add_pods()
    try:
        yield testbed
    finally:
        for pod in (testbed.pod_a, testbed.pod_b):
            testbed.datapath.throttle.clear(pod.ip)


def outbound(bed: Testbed, src: ipaddress.IPv4Address) -> bytes:
    return bytes(
        Ether(src=bed.uplink.mac, dst=GATEWAY_MAC)
        / IP(src=str(src), dst=str(WORLD_IP))
        / UDP(sport=5000, dport=5001)
        / bytes(PAYLOAD)
    )


def send(bed: Testbed, src: ipaddress.IPv4Address) -> int:
    return bed.run("to_netdev", outbound(bed, src), ifindex=bed.uplink.ifindex).retval


# struct __sk_buff (linux/bpf.h): what the program leaves in the context.
SKB_CTX_OUT = 192
SKB_PRIORITY, SKB_IFINDEX, SKB_TSTAMP = 32, 40, 152


def send_ctx(bed: Testbed, src: ipaddress.IPv4Address) -> tuple[int, int, int]:
    """(verdict, skb->priority, skb->tstamp) after to_netdev."""
    ctx = bytearray(SKB_CTX_OUT)
    struct.pack_into("<I", ctx, SKB_IFINDEX, bed.uplink.ifindex)
    with enter_netns(bed.netns_path):
        result = bed.datapath.program("to_netdev").test_run(
            outbound(bed, src), ctx=bytes(ctx), ctx_out_size=SKB_CTX_OUT
        )
    assert result.ctx is not None
    priority = struct.unpack_from("<I", result.ctx, SKB_PRIORITY)[0]
    return result.retval, priority, struct.unpack_from("<Q", result.ctx, SKB_TSTAMP)[0]


def test_paced_the_next_packet_departs_one_packet_time_at_the_rate_later(bed: Testbed) -> None:
    """1,000 bytes/s: the first packet leaves at once (no departure time), the
    second ~1.4 s after it (a CLOCK_MONOTONIC time, as bpf_ktime_get_ns)."""
    bed.datapath.throttle.set(bed.pod_a.ip, 8_000, mode=Mode.PACED)
    packet_ns = len(outbound(bed, bed.pod_a.ip)) * 1_000_000_000 // 1000
    before = time.monotonic_ns()
    assert send_ctx(bed, bed.pod_a.ip) == (TC_ACT_OK, 0, 0)
    verdict, priority, departure = send_ctx(bed, bed.pod_a.ip)
    after = time.monotonic_ns()
    assert (verdict, priority) == (TC_ACT_OK, 0)
    assert before + packet_ns <= departure <= after + packet_ns


def test_a_pod_over_its_rate_is_dropped_past_the_horizon_and_others_are_not(
    bed: Testbed,
) -> None:
    # 1,000 bytes/s: each packet (~1.4 kB) puts the next ~1.4 s later, so
    # the third would leave ~2.9 s ahead: beyond the 2 s horizon.
    packet_s = len(outbound(bed, bed.pod_a.ip)) / 1000
    assert packet_s * 2 > HORIZON_S > packet_s
    bed.datapath.throttle.set(bed.pod_a.ip, 8_000, mode=Mode.PACED)
    assert bed.datapath.throttle.get(bed.pod_a.ip) == 8_000
    assert [send(bed, bed.pod_a.ip) for _ in range(3)] == [TC_ACT_OK, TC_ACT_OK, TC_ACT_SHOT]
    # Another pod (no limit) and the node itself go out untouched.
    assert [send(bed, bed.pod_b.ip) for _ in range(20)] == [TC_ACT_OK] * 20
    assert [send(bed, NODE_IP) for _ in range(20)] == [TC_ACT_OK] * 20
    metrics = bed.datapath.metrics
    assert metrics.get(DropReason.EDT_HORIZON, Direction.EGRESS)[0] == 1


def test_a_rate_cleared_lets_the_pod_send_at_once(bed: Testbed) -> None:
    bed.datapath.throttle.set(bed.pod_a.ip, 8_000)
    assert [send(bed, bed.pod_a.ip) for _ in range(3)][-1] == TC_ACT_SHOT
    bed.datapath.throttle.clear(bed.pod_a.ip)
    assert bed.datapath.throttle.get(bed.pod_a.ip) == 0
    assert [send(bed, bed.pod_a.ip) for _ in range(20)] == [TC_ACT_OK] * 20


def test_a_high_rate_never_drops_a_burst_of_a_few_packets(bed: Testbed) -> None:
    """10 Gbit/s: 50 packets are ~57 µs of the pod's rate, far inside the horizon."""
    bed.datapath.throttle.set(bed.pod_a.ip, 10_000_000_000)
    assert [send(bed, bed.pod_a.ip) for _ in range(50)] == [TC_ACT_OK] * 50


def test_shaped_a_pods_packets_get_its_htb_class_and_no_departure_time(bed: Testbed) -> None:
    """Without fq in the kernel: the class in skb->priority, nothing dropped."""
    bed.datapath.throttle.set(bed.pod_a.ip, 8_000, mode=Mode.SHAPED)
    entry = bed.datapath.throttle.entry(bed.pod_a.ip)
    slot = bed.datapath.node.endpoint_slot(bed.pod_a.ip)
    assert slot is not None and entry["classid"] == classid(slot) == 0x10000 | slot
    assert [send_ctx(bed, bed.pod_a.ip) for _ in range(20)] == [(TC_ACT_OK, classid(slot), 0)] * 20
    # Another pod's packets keep the priority the stack gave them (0 here).
    assert send_ctx(bed, bed.pod_b.ip) == (TC_ACT_OK, 0, 0)
    assert bed.datapath.metrics.get(DropReason.EDT_HORIZON, Direction.EGRESS)[0] == 0


def test_off_writes_no_limit(bed: Testbed) -> None:
    bed.datapath.throttle.set(bed.pod_a.ip, 8_000, mode=Mode.OFF)
    assert bed.datapath.throttle.get(bed.pod_a.ip) == 0
    assert [send(bed, bed.pod_a.ip) for _ in range(20)] == [TC_ACT_OK] * 20
