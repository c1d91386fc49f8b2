"""scapy packet builders and checks for the BPF tests."""

from __future__ import annotations

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6 as IPV6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Packet
from scapy.utils import checksum

from ciliate.datapath.testbed import Pod

TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7

PAYLOAD = b"ciliate-test-payload"


def from_pod(pod: Pod, dst: object, *, ttl: int = 64, l4: str = "icmp", **ip: object) -> Packet:
    """A packet as the pod sends it: to its gateway MAC (the node side)."""
    l4_layer = {
        "icmp": ICMP(id=7, seq=1),
        "udp": UDP(sport=4000, dport=53),
        "tcp": TCP(sport=4000, dport=80, flags="S"),
    }[l4]
    return (
        Ether(src=pod.eth0.mac, dst=pod.lxc.mac)
        / IP(src=str(pod.ip), dst=str(dst), ttl=ttl, **ip)
        / l4_layer
        / PAYLOAD
    )


def arp_request(
    pod: Pod, target: object, *, sender_ip: object = None, sender_mac: str | None = None
) -> Packet:
    mac = sender_mac or pod.eth0.mac
    return Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / ARP(
        op=1,
        hwsrc=mac,
        psrc=str(sender_ip if sender_ip is not None else pod.ip),
        hwdst="00:00:00:00:00:00",
        pdst=str(target),
    )


def ipv4_header_valid(pkt: Packet) -> bool:
    """The IPv4 header checksum verifies (sums to zero over the header)."""
    header = bytes(pkt[IP])[: pkt[IP].ihl * 4]
    return checksum(header) == 0


def l4_bytes(pkt: Packet) -> bytes:
    """Everything after the IPv4 header (L4 header and payload)."""
    return bytes(pkt[IP].payload)


__all__ = ["ARP", "ICMP", "IP", "IPV6", "TCP", "UDP", "Ether"]
