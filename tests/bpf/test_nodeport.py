"""Per-packet service load balancing on the uplink (from_netdev): NodePort
and external frontends from outside, to a local backend (DNAT, delivered
into the pod, its reply leaving as the service) and to a remote one (DNAT
and SNAT to the node, out through the FIB, its reply translated back).
Flows keep a state and a lifetime (closed TCP: briefly; a new SYN on the
tuple starts afresh; dead flows' SNAT ports are taken again); translations
are traced for the monitor while tracing is on and counted by kind.
scapy packets through the loaded programs; the testbed namespace gets a
gateway and a remote node as permanent neighbours, so the FIB answers."""

from __future__ import annotations

import ipaddress
import json
import socket
from collections import Counter
from collections.abc import Iterator

import pytest
from scapy.utils import checksum

from ciliate.control.cli.show import format_event
from ciliate.datapath import abi, conntrack
from ciliate.datapath import maps as dpmaps
from ciliate.datapath.events import Event
from ciliate.datapath.lb import (
    MAGLEV_SIZE,
    Backend,
    BackendState,
    Flow,
    Frontend,
    L4Protocol,
    maglev_table,
)
from ciliate.datapath.tables import Direction, DropReason
from ciliate.datapath.testbed import GATEWAY_MAC, NODE_IP, REMOTE_NODE_MAC, WORLD_IP, Testbed

from .packets import ICMP, IP, TC_ACT_OK, TC_ACT_REDIRECT, TCP, UDP, Ether, ipv4_header_valid

REMOTE_POD = ipaddress.IPv4Address("10.244.2.20")
CT_SYN = abi.constant("CILIATE_CT_LIFETIME_SYN")
CT_CLOSE = abi.constant("CILIATE_CT_LIFETIME_CLOSE")
CT_NONTCP = abi.constant("CILIATE_CT_LIFETIME_NONTCP")
NAT_PORT_MIN = abi.constant("CILIATE_LB_NAT_PORT_MIN")
NAT_PORT_MAX = abi.constant("CILIATE_LB_NAT_PORT_MAX")
NODEPORT = Frontend(NODE_IP, 30080, L4Protocol.TCP)
CLIENT_PORT = 40000


@pytest.fixture(scope="module")
def routed(bpf_objects: str) -> Iterator[Testbed]:
    """A testbed of its own whose uplink routes like a node's."""
    with Testbed(prefix="cnp") as bed:
        bed.route_uplink()
        yield bed


@pytest.fixture
def bed(routed: Testbed) -> Testbed:
    routed.reset()
    routed.add_pods()
    return routed


def from_client(
    bed: Testbed,
    *,
    sport: int = CLIENT_PORT,
    frontend: Frontend = NODEPORT,
    flags: str = "S",
    src: ipaddress.IPv4Address = WORLD_IP,
) -> bytes:
    l4 = (
        TCP(sport=sport, dport=frontend.port, flags=flags)
        if frontend.protocol == L4Protocol.TCP
        else UDP(sport=sport, dport=frontend.port)
    )
    return bytes(
        Ether(src=GATEWAY_MAC, dst=bed.uplink.mac)
        / IP(src=str(src), dst=str(frontend.address), ttl=60)
        / l4
        / b"request"
    )


def l4_valid(pkt: Ether) -> bool:
    """The L4 checksum verifies: scapy recomputes it when it is deleted."""
    layer = pkt[TCP] if TCP in pkt else pkt[UDP]
    written = layer.chksum
    fresh = pkt.copy()
    del (fresh[TCP] if TCP in fresh else fresh[UDP]).chksum
    return written == Ether(bytes(fresh))[type(layer)].chksum


def local_backend(bed: Testbed, backend_id: int = 7) -> Backend:
    return Backend(id=backend_id, address=bed.pod_a.ip, port=8080, local=True)


def remote_backend(backend_id: int = 9, address: ipaddress.IPv4Address = REMOTE_POD) -> Backend:
    return Backend(id=backend_id, address=address, port=8080)


def test_nodeport_to_a_local_backend_is_dnated_into_the_pod_and_its_reply_leaves_as_the_service(
    bed: Testbed,
) -> None:
    bed.datapath.lb.upsert_service(NODEPORT, [local_backend(bed)], service_id=1, external=True)
    result = bed.run("from_netdev", from_client(bed), ifindex=bed.uplink.ifindex)
    assert result.retval == TC_ACT_REDIRECT
    syn = Ether(result.data)
    assert (syn[IP].src, syn[IP].dst) == (str(WORLD_IP), str(bed.pod_a.ip))
    assert (syn[TCP].sport, syn[TCP].dport) == (CLIENT_PORT, 8080)
    assert (syn.dst, syn.src) == (bed.pod_a.eth0.mac, bed.pod_a.lxc.mac)
    assert ipv4_header_valid(syn) and l4_valid(syn)
    assert bytes(syn[TCP].payload) == b"request"

    reply = bytes(
        Ether(src=bed.pod_a.eth0.mac, dst=bed.pod_a.lxc.mac)
        / IP(src=str(bed.pod_a.ip), dst=str(WORLD_IP), ttl=64)
        / TCP(sport=8080, dport=CLIENT_PORT, flags="SA")
        / b"answer"
    )
    result = bed.run("from_container", reply, ifindex=bed.pod_a.lxc.ifindex)
    assert result.retval == TC_ACT_REDIRECT
    out = Ether(result.data)
    assert (out[IP].src, out[IP].dst) == (str(NODE_IP), str(WORLD_IP))
    assert (out[TCP].sport, out[TCP].dport) == (NODEPORT.port, CLIENT_PORT)
    assert (out.dst, out.src) == (GATEWAY_MAC, bed.uplink.mac)
    assert out[IP].ttl == 63
    assert ipv4_header_valid(out) and l4_valid(out)
    # Counted by kind: the DNAT to a local backend coming in, the reply going out.
    metrics = bed.datapath.metrics
    assert metrics.get(DropReason.FORWARDED_LB_NODEPORT, Direction.INGRESS)[0] == 1
    assert metrics.get(DropReason.FORWARDED_LB_REPLY, Direction.EGRESS)[0] == 1
    assert metrics.get(DropReason.FORWARDED_LB_NODEPORT_REMOTE, Direction.INGRESS)[0] == 0


def test_nodeport_to_a_remote_backend_is_snated_to_the_node_and_the_reply_translated_back(
    bed: Testbed,
) -> None:
    bed.datapath.lb.upsert_service(NODEPORT, [remote_backend()], service_id=1, external=True)
    result = bed.run("from_netdev", from_client(bed), ifindex=bed.uplink.ifindex)
    assert result.retval == TC_ACT_REDIRECT
    out = Ether(result.data)
    assert (out[IP].src, out[IP].dst) == (str(NODE_IP), str(REMOTE_POD))
    nat_port = out[TCP].sport
    assert 61000 <= nat_port <= 65535 and out[TCP].dport == 8080
    assert (out.dst, out.src) == (REMOTE_NODE_MAC, bed.uplink.mac)
    assert ipv4_header_valid(out) and l4_valid(out)
    assert bed.datapath.lb.flows() == [
        Flow(
            client=WORLD_IP,
            client_port=CLIENT_PORT,
            frontend=NODEPORT,
            backend_id=9,
            snat_port=nat_port,
        )
    ]
    metrics = bed.datapath.metrics
    assert metrics.get(DropReason.FORWARDED_LB_NODEPORT_REMOTE, Direction.INGRESS)[0] == 1
    assert metrics.get(DropReason.FORWARDED_LB_NODEPORT, Direction.INGRESS)[0] == 0
    # The flow's next packet takes the same backend and port.
    again = Ether(
        bed.run("from_netdev", from_client(bed, flags="A"), ifindex=bed.uplink.ifindex).data
    )
    assert (again[IP].dst, again[TCP].sport) == (str(REMOTE_POD), nat_port)

    reply = bytes(
        Ether(src=REMOTE_NODE_MAC, dst=bed.uplink.mac)
        / IP(src=str(REMOTE_POD), dst=str(NODE_IP), ttl=62)
        / TCP(sport=8080, dport=nat_port, flags="SA")
        / b"answer"
    )
    result = bed.run("from_netdev", reply, ifindex=bed.uplink.ifindex)
    assert result.retval == TC_ACT_REDIRECT
    back = Ether(result.data)
    assert (back[IP].src, back[IP].dst) == (str(NODE_IP), str(WORLD_IP))
    assert (back[TCP].sport, back[TCP].dport) == (NODEPORT.port, CLIENT_PORT)
    assert (back.dst, back.src) == (GATEWAY_MAC, bed.uplink.mac)
    assert ipv4_header_valid(back) and l4_valid(back)
    assert bytes(back[TCP].payload) == b"answer"
    assert metrics.get(DropReason.FORWARDED_LB_REPLY, Direction.INGRESS)[0] == 1
    assert [f.answered for f in bed.datapath.lb.flows()] == [True]


def test_udp_nodeport_checksums_stay_valid(bed: Testbed) -> None:
    frontend = Frontend(NODE_IP, 30053, L4Protocol.UDP)
    bed.datapath.lb.upsert_service(frontend, [remote_backend()], service_id=2, external=True)
    result = bed.run("from_netdev", from_client(bed, frontend=frontend), ifindex=bed.uplink.ifindex)
    assert result.retval == TC_ACT_REDIRECT
    out = Ether(result.data)
    assert (out[IP].src, out[IP].dst, out[UDP].dport) == (str(NODE_IP), str(REMOTE_POD), 8080)
    assert ipv4_header_valid(out) and l4_valid(out)


def _tuple_hash(src: ipaddress.IPv4Address, sport: int, frontend: Frontend) -> int:
    """lb_tuple_hash() of lb.h, as a test oracle: the fields are u32/u16
    loaded from network-order bytes on a little-endian machine."""
    mask = 0xFFFFFFFF
    saddr = int.from_bytes(src.packed, "little")
    daddr = int.from_bytes(frontend.address.packed, "little")
    sp = int.from_bytes(sport.to_bytes(2, "big"), "little")
    dp = int.from_bytes(frontend.port.to_bytes(2, "big"), "little")
    h = (saddr * 0xCC9E2D51) & mask
    h ^= (daddr * 0x1B873593) & mask
    h ^= (((sp << 16) | dp) * 0x85EBCA6B) & mask
    h ^= int(frontend.protocol)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & mask
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & mask
    h ^= h >> 16
    return h


def test_maglev_picks_the_backend_every_node_would_pick(bed: Testbed) -> None:
    backends = [
        remote_backend(20 + i, ipaddress.IPv4Address(f"10.244.2.{20 + i}")) for i in range(4)
    ]
    bed.datapath.lb.upsert_service(NODEPORT, backends, service_id=1, external=True)
    table = maglev_table(backends)
    assert bed.datapath.lb.maglev(1) == table
    by_address = {str(b.address): b.id for b in backends}
    chosen: Counter[int] = Counter()
    for sport in range(20000, 20200):
        out = Ether(
            bed.run("from_netdev", from_client(bed, sport=sport), ifindex=bed.uplink.ifindex).data
        )
        picked = by_address[out[IP].dst]
        # The pick is a function of the flow alone (table + tuple hash):
        # another node with the same backends computes the same.
        assert picked == table[_tuple_hash(WORLD_IP, sport, NODEPORT) % MAGLEV_SIZE]
        chosen[picked] += 1
    assert set(chosen) == set(by_address.values())


def test_two_nodes_pick_the_same_backend_for_each_flow(bed: Testbed) -> None:
    """Two datapaths loaded side by side (two nodes, their own maps), the
    same service written into each with other backend ids: every flow
    leaves both for the same backend address."""
    backends = [
        remote_backend(20 + i, ipaddress.IPv4Address(f"10.244.2.{20 + i}")) for i in range(5)
    ]
    renumbered = [Backend(id=b.id + 500, address=b.address, port=b.port) for b in backends]
    with Testbed(prefix="cnq") as other:
        other.route_uplink()
        bed.datapath.lb.upsert_service(NODEPORT, backends, service_id=1, external=True)
        other.datapath.lb.upsert_service(NODEPORT, renumbered[::-1], service_id=9, external=True)
        for sport in range(30000, 30100):
            picks = [
                Ether(
                    node.run(
                        "from_netdev", from_client(node, sport=sport), ifindex=node.uplink.ifindex
                    ).data
                )[IP].dst
                for node in (bed, other)
            ]
            assert picks[0] == picks[1], sport


def test_terminating_backends_keep_their_flows_and_take_new_ones_only_when_none_is_active(
    bed: Testbed,
) -> None:
    backend = remote_backend()
    bed.datapath.lb.upsert_service(NODEPORT, [backend], service_id=1, external=True)
    assert bed.run("from_netdev", from_client(bed), ifindex=bed.uplink.ifindex).retval == (
        TC_ACT_REDIRECT
    )
    terminating = Backend(id=9, address=REMOTE_POD, port=8080, state=BackendState.TERMINATING)
    other = remote_backend(10, ipaddress.IPv4Address("10.244.3.30"))
    bed.datapath.lb.upsert_service(NODEPORT, [terminating, other], service_id=1, external=True)
    assert set(bed.datapath.lb.maglev(1)) == {10}
    # The open flow keeps its backend ...
    result = bed.run("from_netdev", from_client(bed, flags="A"), ifindex=bed.uplink.ifindex)
    assert result.retval == TC_ACT_REDIRECT
    assert Ether(result.data)[IP].dst == str(REMOTE_POD)
    # ... a new one goes to the active backend.
    result = bed.run(
        "from_netdev", from_client(bed, sport=CLIENT_PORT + 1), ifindex=bed.uplink.ifindex
    )
    assert Ether(result.data)[IP].dst == "10.244.3.30"
    # With no active backend left, the terminating ones take new flows (KEP-1669,
    # as kube-proxy and Cilium fall back) rather than the service refusing.
    bed.datapath.lb.upsert_service(NODEPORT, [terminating], service_id=1, external=True)
    assert set(bed.datapath.lb.maglev(1)) == {9}
    result = bed.run(
        "from_netdev", from_client(bed, sport=CLIENT_PORT + 2), ifindex=bed.uplink.ifindex
    )
    assert Ether(result.data)[IP].dst == str(REMOTE_POD)


def assert_refused(bed: Testbed, sent: bytes) -> None:
    """The packet is answered with an ICMP port unreachable from the
    frontend, back out of the uplink, and counted as the drop it stands for."""
    result = bed.run("from_netdev", sent, ifindex=bed.uplink.ifindex)
    assert result.retval == TC_ACT_REDIRECT
    answer, original = Ether(result.data), Ether(sent)
    assert (answer.src, answer.dst) == (original.dst, original.src)
    assert (answer[IP].src, answer[IP].dst) == (original[IP].dst, original[IP].src)
    assert (answer[ICMP].type, answer[ICMP].code) == (3, 3)
    assert ipv4_header_valid(answer)
    icmp = bytes(answer[IP].payload)
    assert checksum(icmp) == 0
    assert icmp[8:] == bytes(original[IP])[:28]  # the offending header and 8 bytes
    assert bed.datapath.metrics.get(DropReason.NO_SERVICE_BACKEND, Direction.INGRESS)[0] == 1


def test_a_udp_nodeport_without_backends_answers_port_unreachable(bed: Testbed) -> None:
    frontend = Frontend(NODE_IP, 30053, L4Protocol.UDP)
    bed.datapath.lb.upsert_service(frontend, [], service_id=2, external=True)
    assert_refused(bed, from_client(bed, frontend=frontend))


def test_a_clusterip_is_not_balanced_from_outside(bed: Testbed) -> None:
    cluster_ip = Frontend(ipaddress.IPv4Address("10.96.0.10"), 80)
    bed.datapath.lb.upsert_service(cluster_ip, [remote_backend()], service_id=3)
    sent = from_client(bed, frontend=cluster_ip)
    result = bed.run("from_netdev", sent, ifindex=bed.uplink.ifindex)
    assert (result.retval, result.data) == (TC_ACT_OK, sent)


# ---- flows: state and lifetime -------------------------------------------------------


def _remote_reply(bed: Testbed, nat_port: int, flags: str) -> bytes:
    return bytes(
        Ether(src=REMOTE_NODE_MAC, dst=bed.uplink.mac)
        / IP(src=str(REMOTE_POD), dst=str(NODE_IP), ttl=62)
        / TCP(sport=8080, dport=nat_port, flags=flags)
    )


def _send(bed: Testbed, packet: bytes) -> Ether:
    result = bed.run("from_netdev", packet, ifindex=bed.uplink.ifindex)
    assert result.retval == TC_ACT_REDIRECT
    return Ether(result.data)


def _only_flow(bed: Testbed) -> Flow:
    flows = bed.datapath.lb.flows()
    assert len(flows) == 1
    return flows[0]


def _lives(flow: Flow) -> float:
    """Seconds the flow has left."""
    return (flow.expires - conntrack.now()) / conntrack.hz()


def test_a_tcp_flow_closed_both_ways_lives_briefly_and_a_new_syn_on_its_tuple_starts_afresh(
    bed: Testbed,
) -> None:
    bed.datapath.lb.upsert_service(NODEPORT, [remote_backend()], service_id=1, external=True)
    nat_port = _send(bed, from_client(bed, flags="S"))[TCP].sport
    flow = _only_flow(bed)
    assert (flow.answered, flow.closing) == (False, False)
    assert CT_SYN - 2 < _lives(flow) <= CT_SYN
    _send(bed, _remote_reply(bed, nat_port, "SA"))
    _send(bed, from_client(bed, flags="A"))
    flow = _only_flow(bed)
    assert (flow.answered, flow.closing) == (True, False)
    assert _lives(flow) > CT_SYN  # established: CILIATE_CT_LIFETIME_TCP
    # FIN from the client alone: half closed, still a live flow.
    _send(bed, from_client(bed, flags="FA"))
    assert _only_flow(bed).closing is False
    # The backend's FIN: closed both ways, the short lifetime.
    back = _send(bed, _remote_reply(bed, nat_port, "FA"))
    assert (back[IP].dst, back[TCP].dport) == (str(WORLD_IP), CLIENT_PORT)
    flow = _only_flow(bed)
    assert flow.closing
    assert 0 < _lives(flow) <= CT_CLOSE
    # The last ACK still goes through on the flow's port.
    assert _send(bed, from_client(bed, flags="A"))[TCP].sport == nat_port
    # The client reuses its port at once: a new flow, its old reply entry freed.
    again = _send(bed, from_client(bed, flags="S"))
    assert (again[IP].dst, again[TCP].dport) == (str(REMOTE_POD), 8080)
    flow = _only_flow(bed)
    assert (flow.answered, flow.closing) == (False, False)
    assert len(list(bed.datapath.maps[dpmaps.LB_NAT_REV].keys())) == 1
    assert _send(bed, _remote_reply(bed, again[TCP].sport, "SA"))[TCP].dport == CLIENT_PORT


def test_a_reset_from_a_local_backend_closes_its_flow(bed: Testbed) -> None:
    bed.datapath.lb.upsert_service(NODEPORT, [local_backend(bed)], service_id=1, external=True)
    bed.run("from_netdev", from_client(bed, flags="S"), ifindex=bed.uplink.ifindex)
    reset = bytes(
        Ether(src=bed.pod_a.eth0.mac, dst=bed.pod_a.lxc.mac)
        / IP(src=str(bed.pod_a.ip), dst=str(WORLD_IP), ttl=64)
        / TCP(sport=8080, dport=CLIENT_PORT, flags="R")
    )
    out = Ether(bed.run("from_container", reset, ifindex=bed.pod_a.lxc.ifindex).data)
    assert (out[IP].src, out[TCP].sport, out[TCP].flags) == (str(NODE_IP), NODEPORT.port, "R")
    flow = _only_flow(bed)
    assert flow.closing and 0 < _lives(flow) <= CT_CLOSE


def test_a_udp_flow_lives_the_non_tcp_lifetime(bed: Testbed) -> None:
    frontend = Frontend(NODE_IP, 30053, L4Protocol.UDP)
    bed.datapath.lb.upsert_service(frontend, [remote_backend()], service_id=2, external=True)
    _send(bed, from_client(bed, frontend=frontend))
    flow = _only_flow(bed)
    assert not flow.closing and CT_NONTCP - 2 < _lives(flow) <= CT_NONTCP


def test_expire_flows_frees_dead_flows_with_their_reply_entries_and_keeps_live_ones(
    bed: Testbed,
) -> None:
    lb = bed.datapath.lb
    lb.upsert_service(NODEPORT, [local_backend(bed)], service_id=1, external=True)
    frontend = Frontend(NODE_IP, 30081, L4Protocol.TCP)
    lb.upsert_service(frontend, [remote_backend()], service_id=2, external=True)
    bed.run("from_netdev", from_client(bed), ifindex=bed.uplink.ifindex)
    bed.run("from_netdev", from_client(bed, frontend=frontend), ifindex=bed.uplink.ifindex)
    nat_rev = bed.datapath.maps[dpmaps.LB_NAT_REV]
    assert len(lb.flows()) == 2 and len(list(nat_rev.keys())) == 2
    assert lb.expire_flows() == 0  # both live
    assert len(lb.flows()) == 2
    later = conntrack.now() + (CT_SYN + 1) * conntrack.hz()
    assert lb.expire_flows(now=later) == 2
    assert lb.flows() == [] and list(nat_rev.keys()) == []


def _snat_candidates(src: ipaddress.IPv4Address, sport: int, frontend: Frontend) -> list[int]:
    """The SNAT ports lb_snat_port() tries for a flow, in order."""
    span = NAT_PORT_MAX - NAT_PORT_MIN + 1
    h = _tuple_hash(src, sport, frontend)
    return [NAT_PORT_MIN + ((h + i * 7919) & 0xFFFFFFFF) % span for i in range(8)]


def test_snat_ports_left_by_dead_flows_are_taken_again_and_live_ones_are_not(
    bed: Testbed,
) -> None:
    """Every port the flow may take is held by a reply entry: the first by
    a live flow, the others by flows that are gone. Before flows had
    lifetimes such a flow was dropped until the LRU evicted the entries."""
    backend = remote_backend()
    bed.datapath.lb.upsert_service(NODEPORT, [backend], service_id=1, external=True)
    candidates = _snat_candidates(WORLD_IP, CLIENT_PORT, NODEPORT)
    other_client = ipaddress.IPv4Address("203.0.113.9")
    nat_rev = bed.datapath.maps[dpmaps.LB_NAT_REV]
    nat_fwd = bed.datapath.maps[dpmaps.LB_NAT_FWD]

    def addr(a: ipaddress.IPv4Address) -> int:
        return int.from_bytes(a.packed, "little")

    for i, port in enumerate(candidates):
        reply_key = abi.pack(
            "ciliate_lb_tuple",
            saddr=addr(backend.address),
            daddr=addr(NODE_IP),
            sport=socket.htons(backend.port),
            dport=socket.htons(port),
            protocol=6,
        )
        owner = {"saddr": addr(other_client), "sport": socket.htons(50000 + i)}
        nat_rev.update(
            reply_key,
            abi.pack(
                "ciliate_lb_nat_rev",
                saddr=addr(NODEPORT.address),
                sport=socket.htons(NODEPORT.port),
                daddr=owner["saddr"],
                dport=owner["sport"],
            ),
        )
        if i == 0:  # the live one
            nat_fwd.update(
                abi.pack(
                    "ciliate_lb_tuple",
                    saddr=owner["saddr"],
                    daddr=addr(NODEPORT.address),
                    sport=owner["sport"],
                    dport=socket.htons(NODEPORT.port),
                    protocol=6,
                ),
                abi.pack(
                    "ciliate_lb_flow",
                    expires=conntrack.now() + 600 * conntrack.hz(),
                    backend_id=backend.id,
                    nat_port=socket.htons(port),
                ),
            )
    out = _send(bed, from_client(bed, flags="S"))
    assert out[TCP].sport == candidates[1]
    back = _send(bed, _remote_reply(bed, candidates[1], "SA"))
    assert (back[IP].dst, back[TCP].dport) == (str(WORLD_IP), CLIENT_PORT)


# ---- translations in the monitor and in the metrics ----------------------------------


def _translations(bed: Testbed) -> list[Event]:
    return [e for e in bed.events() if e.translation is not None]


def test_translations_are_traced_only_while_tracing_is_on(bed: Testbed) -> None:
    bed.datapath.lb.upsert_service(NODEPORT, [local_backend(bed)], service_id=1, external=True)
    bed.run("from_netdev", from_client(bed), ifindex=bed.uplink.ifindex)
    assert _translations(bed) == []
    bed.datapath.config.set_trace(True)
    bed.run("from_netdev", from_client(bed, flags="A"), ifindex=bed.uplink.ifindex)
    [event] = _translations(bed)
    t = event.translation
    assert t is not None
    assert (event.kind, event.ifindex, t.kind, t.protocol) == ("lb", bed.uplink.ifindex, "local", 6)
    assert (t.service_id, t.backend_id) == (1, 7)
    assert (str(t.orig_source), str(t.orig_destination)) == (
        f"{WORLD_IP}:40000",
        f"{NODE_IP}:30080",
    )
    assert (str(t.source), str(t.destination)) == (f"{WORLD_IP}:40000", f"{bed.pod_a.ip}:8080")

    reply = bytes(
        Ether(src=bed.pod_a.eth0.mac, dst=bed.pod_a.lxc.mac)
        / IP(src=str(bed.pod_a.ip), dst=str(WORLD_IP), ttl=64)
        / TCP(sport=8080, dport=CLIENT_PORT, flags="SA")
    )
    bed.run("from_container", reply, ifindex=bed.pod_a.lxc.ifindex)
    [event] = _translations(bed)
    t = event.translation
    assert t is not None and t.kind == "reply" and event.direction == Direction.EGRESS
    assert (str(t.orig_source), str(t.source)) == (f"{bed.pod_a.ip}:8080", f"{NODE_IP}:30080")
    assert str(t.destination) == f"{WORLD_IP}:40000"


def test_a_remote_translation_shows_the_snat_and_the_monitor_prints_it(bed: Testbed) -> None:
    bed.datapath.lb.upsert_service(NODEPORT, [remote_backend()], service_id=1, external=True)
    bed.datapath.config.set_trace(True)
    nat_port = _send(bed, from_client(bed))[TCP].sport
    [event] = _translations(bed)
    t = event.translation
    assert t is not None and (t.kind, t.backend_id) == ("remote", 9)
    assert (str(t.source), str(t.destination)) == (f"{NODE_IP}:{nat_port}", f"{REMOTE_POD}:8080")
    line = format_event(event, "table")
    assert (
        f"LB tcp {WORLD_IP}:40000 -> {NODE_IP}:30080 => {NODE_IP}:{nat_port} -> {REMOTE_POD}:8080 "
        "(to a backend on another node (DNAT, SNAT to this node))"
    ) in line
    assert f"ifindex {bed.uplink.ifindex}" in line
    doc = json.loads(format_event(event, "json"))
    assert doc["type"] == "lb" and doc["packet"] == ""
    assert doc["translation"] == {
        "kind": "remote",
        "protocol": "tcp",
        "service_id": 1,
        "backend_id": 9,
        "original": {"source": f"{WORLD_IP}:40000", "destination": f"{NODE_IP}:30080"},
        "translated": {"source": f"{NODE_IP}:{nat_port}", "destination": f"{REMOTE_POD}:8080"},
    }


def test_nodeport_to_the_nodes_own_address_goes_to_its_stack_and_the_reply_leaves_as_the_service(
    bed: Testbed,
) -> None:
    """A hostNetwork backend (the node's own address): Cilium's "local backend
    is the host". DNAT only, handed to the node's stack (no SNAT to itself);
    the host's reply is translated back on the uplink's egress (to_netdev)."""
    host = Backend(id=11, address=NODE_IP, port=8081)
    bed.datapath.lb.upsert_service(NODEPORT, [host], service_id=1, external=True)
    result = bed.run("from_netdev", from_client(bed), ifindex=bed.uplink.ifindex)
    assert result.retval == TC_ACT_OK, "to the node's stack, not redirected"
    syn = Ether(result.data)
    assert (syn[IP].src, syn[IP].dst) == (str(WORLD_IP), str(NODE_IP))
    assert (syn[TCP].sport, syn[TCP].dport) == (CLIENT_PORT, 8081)
    assert syn.dst == bed.uplink.mac and syn[IP].ttl == 60, "not routed: the stack delivers"
    assert ipv4_header_valid(syn) and l4_valid(syn)
    [flow] = bed.datapath.lb.flows()
    assert (flow.backend_id, flow.snat_port) == (11, None)

    reply = bytes(
        Ether(src=bed.uplink.mac, dst=GATEWAY_MAC)
        / IP(src=str(NODE_IP), dst=str(WORLD_IP), ttl=64)
        / TCP(sport=8081, dport=CLIENT_PORT, flags="SA")
        / b"answer"
    )
    result = bed.run("to_netdev", reply, ifindex=bed.uplink.ifindex)
    assert result.retval == TC_ACT_OK
    out = Ether(result.data)
    assert (out[IP].src, out[IP].dst) == (str(NODE_IP), str(WORLD_IP))
    assert (out[TCP].sport, out[TCP].dport) == (NODEPORT.port, CLIENT_PORT)
    assert ipv4_header_valid(out) and l4_valid(out)
    assert bytes(out[TCP].payload) == b"answer"
    metrics = bed.datapath.metrics
    assert metrics.get(DropReason.FORWARDED_LB_NODEPORT, Direction.INGRESS)[0] == 1
    assert metrics.get(DropReason.FORWARDED_LB_REPLY, Direction.EGRESS)[0] == 1
    assert metrics.get(DropReason.FORWARDED_LB_NODEPORT_REMOTE, Direction.INGRESS)[0] == 0
    assert [f.answered for f in bed.datapath.lb.flows()] == [True]


def test_to_netdev_leaves_what_is_not_a_translated_reply_alone(bed: Testbed) -> None:
    """The host's own traffic (no flow), and what the node forwards from a
    pod, go out byte for byte as they came."""
    bed.datapath.lb.upsert_service(
        NODEPORT, [Backend(id=11, address=NODE_IP, port=8081)], service_id=1, external=True
    )
    for src, sport in ((NODE_IP, 8081), (NODE_IP, 22), (bed.pod_a.ip, 8081)):
        sent = bytes(
            Ether(src=bed.uplink.mac, dst=GATEWAY_MAC)
            / IP(src=str(src), dst=str(WORLD_IP), ttl=64)
            / TCP(sport=sport, dport=CLIENT_PORT, flags="A")
            / b"data"
        )
        result = bed.run("to_netdev", sent, ifindex=bed.uplink.ifindex)
        assert (result.retval, result.data) == (TC_ACT_OK, sent)
    assert bed.datapath.metrics.get(DropReason.FORWARDED_LB_REPLY, Direction.EGRESS)[0] == 0


def test_udp_nodeport_to_the_nodes_own_address_keeps_checksums_both_ways(bed: Testbed) -> None:
    frontend = Frontend(NODE_IP, 30053, L4Protocol.UDP)
    host = Backend(id=12, address=NODE_IP, port=5353)
    bed.datapath.lb.upsert_service(frontend, [host], service_id=2, external=True)
    result = bed.run("from_netdev", from_client(bed, frontend=frontend), ifindex=bed.uplink.ifindex)
    assert result.retval == TC_ACT_OK
    query = Ether(result.data)
    assert (query[IP].dst, query[UDP].dport) == (str(NODE_IP), 5353)
    assert ipv4_header_valid(query) and l4_valid(query)
    answer = bytes(
        Ether(src=bed.uplink.mac, dst=GATEWAY_MAC)
        / IP(src=str(NODE_IP), dst=str(WORLD_IP), ttl=64)
        / UDP(sport=5353, dport=CLIENT_PORT)
        / b"answer"
    )
    result = bed.run("to_netdev", answer, ifindex=bed.uplink.ifindex)
    assert result.retval == TC_ACT_OK
    out = Ether(result.data)
    assert (out[IP].src, out[UDP].sport, out[UDP].dport) == (str(NODE_IP), 30053, CLIENT_PORT)
    assert ipv4_header_valid(out) and l4_valid(out)
