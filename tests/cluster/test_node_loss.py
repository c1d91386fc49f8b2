"""A node killed hard in a 3-node lab (cable cut, every process SIGKILLed, the
namespace deleted): the cluster forgets it by itself, each step within the time
its timers give (the bounds below are those timers plus a polling margin, the
behaviour documented in the README, not a speed measurement):

* its route leaves the ToR when bird's hold timer (3 s) expires;
* its liveness lease expires (10 s), the operator waits its grace period (2 s
  here) and removes it: its pod CIDR is free, its endpoints leave every other
  node's ipcache;
* a new node then gets a CIDR, and the dead node coming back under its name
  gets its own CIDR back (still free) and its route at the ToR again."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import pytest
from rich.console import Console

from ciliate.control.agent.client import AgentClient
from ciliate.control.cluster.member import DEFAULT_LEASE_TTL
from ciliate.control.lab import lab

GRACE = 2.0
HOLD_TIME = 3  # the agents' and the ToR's
MARGIN = 2.0  # watchers poll every 0.1 s, the operator looks every second


@pytest.fixture(scope="module")
def cluster(bpf_objects: str) -> Iterator[lab.LabState]:
    name = f"t{secrets.token_hex(3)}"
    try:
        yield lab.up(
            name=name, pods=1, nodes=3, console=Console(quiet=True), node_grace_period=GRACE
        )
    finally:
        lab.down(name=name, console=Console(quiet=True))


def _ipcache_node_ips(state: lab.LabState, node: lab.NodeState) -> set[str]:
    with AgentClient(node.socket) as client:
        return {e["node_ip"] for e in client.get("/v1/bpf/ipcache") if e["node_ip"]}


def test_a_node_killed_hard_is_forgotten_within_its_timers_and_a_new_node_gets_a_cidr(
    cluster: lab.LabState,
) -> None:
    dead = cluster.nodes[2]
    dead_cidr = dead.pod_cidr
    survivors = cluster.nodes[:2]
    for node in survivors:  # before: everyone knows the node and its pod
        assert dead.node_ip in _ipcache_node_ips(cluster, node)

    started = time.monotonic()
    lab.kill_node(cluster, dead.name)
    seen = lab.watch_node_loss(
        cluster, dead.name, since=started, timeout=DEFAULT_LEASE_TTL + GRACE + 15
    )
    print(
        f"route gone {seen.route_gone} s, CIDR free {seen.cidr_free} s, "
        f"ipcaches clean {seen.ipcache_clean} s after the kill"
    )
    assert seen.route_gone is not None and seen.route_gone <= HOLD_TIME + MARGIN
    assert seen.cidr_free is not None and seen.cidr_free <= DEFAULT_LEASE_TTL + GRACE + MARGIN
    assert seen.ipcache_clean is not None
    assert seen.ipcache_clean <= DEFAULT_LEASE_TTL + GRACE + MARGIN
    # The lease told the cluster, after the grace period: never at once.
    assert seen.cidr_free >= GRACE
    for node in survivors:
        assert dead.node_ip not in _ipcache_node_ips(cluster, node)
    pods = [p for p in cluster.pods if p.node != dead.name]
    assert lab.ping(pods[0].netns, str(pods[1].ip)) and lab.ping(pods[1].netns, str(pods[0].ip))

    new = lab.add_node(cluster)
    taken = {n.pod_cidr for n in survivors}
    assert new.pod_cidr not in taken
    with AgentClient(survivors[0].socket) as client:
        listed = {n["name"]: n for n in client.get("/v1/cluster/nodes")}
    assert listed[new.name]["podCIDRs"] == [new.pod_cidr]
    assert dead.name not in listed
    # The pool moves on (a cursor): the dead node's CIDR is still free, and it comes
    # back under its name, with its CIDR and its route at the ToR.
    assert new.pod_cidr != dead_cidr
    revived = lab.revive_node(cluster, dead.name)
    assert revived.pod_cidr == dead_cidr
    route = f"{dead_cidr} via {dead.node_ip} "
    deadline = time.monotonic() + 15
    while not any(r.startswith(route) for r in lab.tor_routes(cluster)):
        assert time.monotonic() < deadline, "the revived node's route did not come back"
        time.sleep(0.1)
