"""A 3-node cluster lab: a ToR namespace running bird, etcd and the
operator; three nodes whose agents get pod CIDRs from the operator and
announce them over BGP; pods on every node through ciliate-cni."""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections.abc import Iterator

import pytest
from rich.console import Console

from ciliate.control.agent.client import AgentClient
from ciliate.control.lab import lab


@pytest.fixture(scope="module")
def cluster(bpf_objects: str) -> Iterator[lab.LabState]:
    name = f"t{secrets.token_hex(3)}"
    try:
        yield lab.up(name=name, pods=1, nodes=3, console=Console(quiet=True))
    finally:
        lab.down(name=name, console=Console(quiet=True))


def nodes(state: lab.LabState) -> list[dict[str, object]]:
    live = next(n for n in state.nodes if n.agent_pid)
    with AgentClient(live.socket) as client:
        result: list[dict[str, object]] = client.get("/v1/cluster/nodes")
    return result


def wait_until(check: object, timeout: float) -> float:
    """Poll ``check`` until it holds; an agent API error (etcd coming back: the
    cluster calls answer 500 meanwhile) counts as not yet."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if check():  # type: ignore[operator]
                return time.monotonic() - started
        except RuntimeError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s")


def test_every_pod_reaches_every_pod_and_its_node_across_nodes(cluster: lab.LabState) -> None:
    results = lab.connectivity(cluster)
    assert len({p.node for p in cluster.pods}) == 3
    assert len(results) == 3 * 2 + 3
    assert all(results.values()), {pair: ok for pair, ok in results.items() if not ok}


def test_the_tor_learns_one_route_per_node_pod_cidr_over_bgp(cluster: lab.LabState) -> None:
    expected = {f"{n.pod_cidr} via {n.node_ip}" for n in cluster.nodes}
    wait_until(lambda: {" ".join(r.split()[:3]) for r in lab.tor_routes(cluster)} == expected, 10)
    assert all("proto" not in r or "bird" in r for r in lab.tor_routes(cluster))


def test_node_list_shows_cidrs_liveness_and_established_sessions(cluster: lab.LabState) -> None:
    wait_until(
        lambda: all(n["alive"] and "established" in str(n["bgp"]) for n in nodes(cluster)), 10
    )
    listed = {n["name"]: n for n in nodes(cluster)}
    for node in cluster.nodes:
        assert listed[node.name]["nodeIP"] == node.node_ip
        assert listed[node.name]["podCIDRs"] == [node.pod_cidr]
    cidrs = [node.pod_cidr for node in cluster.nodes]
    assert len(set(cidrs)) == 3


def test_agents_ride_out_an_etcd_restart(cluster: lab.LabState) -> None:
    assert cluster.fabric_pid is not None
    os.kill(cluster.fabric_pid, signal.SIGHUP)  # the fabric restarts etcd
    time.sleep(1.0)
    node1 = cluster.nodes[0]
    pod = lab.add_pod_netns(cluster, node1, "after-etcd")

    def added() -> bool:
        try:
            result = lab.cni_call(cluster, node1, pod, "ADD")
        except lab.LabError:
            return False  # etcd still coming back: the runtime would retry
        pod.ip = result["ips"][0]["address"].split("/")[0]
        return True

    wait_until(added, 30)
    others = [p for p in cluster.pods if p.node != node1.name and p.ip]
    assert all(lab.ping(o.netns, str(pod.ip)) for o in others)
    wait_until(lambda: all(n["alive"] for n in nodes(cluster)), 20)
    assert {n["name"] for n in nodes(cluster)} == {n.name for n in cluster.nodes}


def test_a_deleted_node_withdraws_its_route_then_stops(cluster: lab.LabState) -> None:
    """Deleted from the cluster (its CIDR goes back to the pool), the node's agent
    withdraws its route by itself while it still runs; stopping it afterwards
    (`ciliate lab stop-node` does both) leaves the route gone, not held by the
    ToR's graceful restart."""
    leaving = cluster.nodes[2]
    route = f"{leaving.pod_cidr} via {leaving.node_ip}"
    assert any(r.startswith(route) for r in lab.tor_routes(cluster))
    with AgentClient(cluster.nodes[0].socket) as client:
        wait_until(lambda: client._call("DELETE", f"/v1/cluster/nodes/{leaving.name}"), 20)
    took = wait_until(lambda: not any(r.startswith(route) for r in lab.tor_routes(cluster)), 5)
    assert took <= 5
    assert leaving.agent_pid is not None and os.path.exists(f"/proc/{leaving.agent_pid}")
    lab.stop_node(cluster, leaving.name)
    assert leaving.agent_pid is None
    wait_until(lambda: leaving.name not in {n["name"] for n in nodes(cluster)}, 10)
    assert not any(r.startswith(route) for r in lab.tor_routes(cluster))
    # The other nodes keep their routes.
    for node in cluster.nodes[:2]:
        assert any(
            r.startswith(f"{node.pod_cidr} via {node.node_ip}") for r in lab.tor_routes(cluster)
        )
