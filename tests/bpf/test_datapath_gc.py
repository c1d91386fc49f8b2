"""The agent's datapath garbage collector (control/agent/datapath_gc.py) over the
testbed's real maps: connections made by packets through the loaded programs,
aged past their lifetime, leave the conntrack at the next pass; live ones stay."""

from __future__ import annotations

import ipaddress

from ciliate.control.agent.datapath_gc import DatapathGC
from ciliate.datapath.conntrack import hz, now
from ciliate.datapath.policy import PolicyEntry
from ciliate.datapath.testbed import Testbed

from .packets import IP, TC_ACT_REDIRECT, UDP, Ether

A_ID, B_ID = 1001, 1002
B_EP = 2
UDP_P = 17


def a_to_b(tb: Testbed, sport: int) -> int:
    frame = (
        Ether(src=tb.pod_a.eth0.mac, dst=tb.pod_a.lxc.mac)
        / IP(src=str(tb.pod_a.ip), dst=str(tb.pod_b.ip))
        / UDP(sport=sport, dport=53)
    )
    return tb.run("from_container", bytes(frame), ifindex=tb.pod_a.lxc.ifindex).retval


def test_a_pass_frees_expired_connections_and_keeps_live_ones(tb: Testbed) -> None:
    tb.add_pods()
    tb.datapath.policy.replace(
        B_EP,
        [PolicyEntry("ingress", A_ID, UDP_P, 53)],
        ingress_enforced=True,
        egress_enforced=False,
    )
    ct = tb.datapath.conntrack
    ct.flush()
    assert a_to_b(tb, 40001) == TC_ACT_REDIRECT
    assert a_to_b(tb, 40002) == TC_ACT_REDIRECT
    ports = {c.src[1] for c in ct.list()} | {c.dst[1] for c in ct.list()}
    assert {40001, 40002} <= ports
    (way,) = [way for way, key, _ in ct.entries() if 40001 in _ports(key)]
    ct.set_expiry(way, now() - hz())  # one second past its deadline
    gc = DatapathGC(tb.datapath, conntrack=True, services=False)
    assert gc.collect().connections == 1
    (left,) = ct.list()
    assert left.src == (ipaddress.IPv4Address(str(tb.pod_a.ip)), 40002)
    assert gc.collect().connections == 0
    assert gc.totals.connections == 1


def _ports(key: dict[str, int]) -> set[int]:
    """The key's two ports in host order (the map holds them in network order)."""
    return {int.from_bytes(key[f].to_bytes(2, "little"), "big") for f in ("sport", "dport")}
