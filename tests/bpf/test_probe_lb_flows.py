"""Uplink flows probed as an unlucky operator meets them: a UDP NodePort flow whose
backend leaves the Service while still backing another one (so it stays in the
maps, active). scapy packets through the loaded from_netdev, as test_nodeport."""

from __future__ import annotations

import ipaddress

from ciliate.datapath.lb import Frontend, L4Protocol
from ciliate.datapath.testbed import NODE_IP, Testbed

from .packets import IP, Ether
from .test_nodeport import bed as bed  # the module's fixtures, reused
from .test_nodeport import from_client, remote_backend
from .test_nodeport import routed as routed

UDP_NODEPORT = Frontend(NODE_IP, 30053, L4Protocol.UDP)
TCP_NODEPORT = Frontend(NODE_IP, 30080, L4Protocol.TCP)
OTHER = Frontend(ipaddress.IPv4Address("10.96.0.99"), 53, L4Protocol.UDP)
A = remote_backend(9, ipaddress.IPv4Address("10.244.2.20"))
B = remote_backend(10, ipaddress.IPv4Address("10.244.3.30"))


def backend_of(bed: Testbed, frontend: Frontend, *, flags: str = "S") -> str:
    sent = from_client(bed, frontend=frontend, flags=flags)
    return str(Ether(bed.run("from_netdev", sent, ifindex=bed.uplink.ifindex).data)[IP].dst)


def test_a_udp_flow_leaves_a_backend_that_left_the_service(bed: Testbed) -> None:
    """As kube-proxy clears the conntrack entries of a UDP endpoint removed from a
    Service, the flow's next datagram goes to a backend the Service still has, not
    on to the one removed (which still backs another Service, so it is still in
    the maps, active, and the flow found it there)."""
    lb = bed.datapath.lb
    lb.upsert_service(UDP_NODEPORT, [A, B], service_id=1, external=True)
    lb.upsert_service(OTHER, [A, B], service_id=2)
    first = backend_of(bed, UDP_NODEPORT)
    staying = B if first == str(A.address) else A
    lb.upsert_service(UDP_NODEPORT, [staying], service_id=1, external=True)
    assert backend_of(bed, UDP_NODEPORT) == str(staying.address)
    assert [f.backend_id for f in lb.flows()] == [staying.id]


def test_a_tcp_flow_keeps_a_backend_that_left_the_service_while_it_lives(bed: Testbed) -> None:
    """An open TCP connection is not broken by its backend leaving the Service (the
    pod still runs): as kube-proxy leaves TCP conntrack entries, the flow keeps it."""
    lb = bed.datapath.lb
    lb.upsert_service(TCP_NODEPORT, [A, B], service_id=1, external=True)
    lb.upsert_service(OTHER, [A, B], service_id=2)
    first = backend_of(bed, TCP_NODEPORT)
    staying = B if first == str(A.address) else A
    lb.upsert_service(TCP_NODEPORT, [staying], service_id=1, external=True)
    assert backend_of(bed, TCP_NODEPORT, flags="A") == first
