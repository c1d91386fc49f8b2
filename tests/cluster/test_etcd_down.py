"""etcd down, end to end: a 2-node cluster lab (real agents, ciliate-cni as a runtime
calls it, etcd in the ToR namespace stopped by the fabric, not restarted).

While etcd is down, pods already running keep their network; an ADD whose identity
the node already holds succeeds, one that needs a new identity fails at once with CNI
code 11 and a message that says why; a DEL succeeds; the cluster routes of the agent
answer 503. When etcd is back, what changed meanwhile reaches the other node: the pod
added is in its ipcache, the pod deleted is gone from it, and new label sets work again.

The tests run in order on one lab: each stage builds on the one before.
"""

from __future__ import annotations

import functools
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest
from rich.console import Console

from ciliate.control.agent.client import AgentClient
from ciliate.control.lab import lab


@dataclass
class Cluster:
    state: lab.LabState
    node1: lab.NodeState
    node2: lab.NodeState
    pods: dict[str, lab.PodState]


def add_pod(
    cluster: Cluster,
    node: lab.NodeState,
    name: str,
    *,
    namespace: str = "default",
    listed_first: bool = False,
) -> lab.PodState:
    """``listed_first``: a container ID the node lists before the others' (random) ones."""
    pod = lab.add_pod_netns(cluster.state, node, name, namespace=namespace)
    if listed_first:
        pod.container_id = "0" * 16 + pod.container_id[16:]
    result = lab.cni_call(cluster.state, node, pod, "ADD")
    pod.ip = result["ips"][0]["address"].split("/")[0]
    cluster.pods[name] = pod
    return pod


def ipcache(node: lab.NodeState) -> dict[str, str | None]:
    """The node's ipcache: prefix -> owner node IP (None: this node's)."""
    with AgentClient(node.socket) as client:
        return {e["prefix"]: e["node_ip"] for e in client.get("/v1/bpf/ipcache")}


def in_ipcache(node: lab.NodeState, prefix: str) -> bool:
    return prefix in ipcache(node)


def eventually(check: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def cluster(bpf_objects: str) -> Iterator[Cluster]:
    name = f"t{secrets.token_hex(3)}"
    quiet = Console(quiet=True)
    try:
        state = lab.create_cluster(name=name, nodes=2, console=quiet)
        cluster = Cluster(state, state.nodes[0], state.nodes[1], {})
        add_pod(cluster, cluster.node1, "a1")
        add_pod(cluster, cluster.node2, "b1")
        add_pod(cluster, cluster.node2, "b2")
        # Both nodes know each other's pods before etcd goes.
        for pod, other in (("a1", cluster.node2), ("b1", cluster.node1), ("b2", cluster.node1)):
            eventually(
                functools.partial(in_ipcache, other, f"{cluster.pods[pod].ip}/32"),
                timeout=20,
                what=f"{pod} mirrored",
            )
        lab.stop_etcd(state)
        yield cluster
    finally:
        lab.down(name=name, console=quiet)


def test_pods_already_running_keep_their_network_across_nodes(cluster: Cluster) -> None:
    a1, b1 = cluster.pods["a1"], cluster.pods["b1"]
    assert lab.ping(a1.netns, str(b1.ip))
    assert lab.ping(b1.netns, str(a1.ip))


def test_add_of_a_pod_whose_identity_the_node_holds_succeeds(cluster: Cluster) -> None:
    # Same namespace, same (no) labels as a1 on node1: the identity node1 holds.
    a2 = add_pod(cluster, cluster.node1, "a2", listed_first=True)
    with AgentClient(cluster.node1.socket) as client:
        by_ip = {e["ip"]: e for e in client.get("/v1/endpoints")}
    assert by_ip[a2.ip]["identity"] == by_ip[cluster.pods["a1"].ip]["identity"]
    assert lab.ping(a2.netns, str(cluster.pods["a1"].ip))
    # Across nodes too: node2 sends to it by node1's pod CIDR until it learns it.
    assert lab.ping(a2.netns, str(cluster.pods["b1"].ip))
    # And again: the policy of a pod added while etcd is down comes from an endpoint
    # of its identity the policy loop has seen (a1), not from a2, listed first but
    # added since the loop's last pass, nor from the objects in etcd.
    a3 = add_pod(cluster, cluster.node1, "a3")
    assert lab.ping(a3.netns, str(a2.ip))


def test_add_that_needs_a_new_identity_fails_with_try_again_and_says_why(
    cluster: Cluster,
) -> None:
    pod = lab.add_pod_netns(cluster.state, cluster.node1, "n1", namespace="fresh")
    with pytest.raises(lab.CniCallError) as refused:
        lab.cni_call(cluster.state, cluster.node1, pod, "ADD")
    assert refused.value.code == 11
    # The agent's own answer (a relay timeout would not name the identity or etcd).
    message = f"{refused.value.error.get('msg')} {refused.value.error.get('details')}"
    assert "no identity for labels" in message and "etcd" in message, message
    # Nothing left behind: no endpoint, no address taken.
    with AgentClient(cluster.node1.socket) as client:
        owners = client.get("/v1/ipam")["allocations"].values()
        endpoints = client.get("/v1/endpoints")
    assert not any(pod.container_id in owner for owner in owners)
    assert {e["ip"] for e in endpoints} == {cluster.pods[p].ip for p in ("a1", "a2", "a3")}
    cluster.pods["n1"] = pod  # added again once etcd is back


def test_del_succeeds(cluster: Cluster) -> None:
    b2 = cluster.pods["b2"]
    lab.cni_call(cluster.state, cluster.node2, b2, "DEL")
    with AgentClient(cluster.node2.socket) as client:
        assert b2.ip not in {e["ip"] for e in client.get("/v1/endpoints")}
    # DEL is idempotent with etcd down as ever.
    lab.cni_call(cluster.state, cluster.node2, b2, "DEL")


def test_cluster_routes_answer_503_naming_etcd(cluster: Cluster) -> None:
    transport = httpx.HTTPTransport(uds=cluster.node1.socket)
    with httpx.Client(transport=transport, base_url="http://agent", timeout=30) as http:
        response = http.get("/v1/cluster/nodes")
    assert response.status_code == 503, response.text
    assert "etcd" in response.json()["detail"]


def test_everything_reconciles_when_etcd_returns(cluster: Cluster) -> None:
    lab.start_etcd(cluster.state)
    a2, b2 = cluster.pods["a2"], cluster.pods["b2"]
    node1_ip = cluster.node1.node_ip
    # The pod added while etcd was down is published, and node2 mirrors it.
    eventually(
        lambda: ipcache(cluster.node2).get(f"{a2.ip}/32") == node1_ip,
        timeout=30,
        what="a2 in node2's ipcache",
    )
    # The pod deleted while etcd was down is unpublished, and node1 drops it.
    eventually(
        lambda: f"{b2.ip}/32" not in ipcache(cluster.node1),
        timeout=30,
        what="b2 gone from node1's ipcache",
    )
    assert lab.ping(cluster.pods["b1"].netns, str(a2.ip))
    # A new label set gets its identity again (a runtime retries the refused ADD).
    n1 = cluster.pods["n1"]

    def added() -> bool:
        try:
            result = lab.cni_call(cluster.state, cluster.node1, n1, "ADD")
        except lab.CniCallError:
            return False
        n1.ip = result["ips"][0]["address"].split("/")[0]
        return True

    eventually(added, timeout=30, what="ADD of a new label set after etcd returned")
    eventually(
        lambda: ipcache(cluster.node2).get(f"{n1.ip}/32") == node1_ip,
        timeout=30,
        what="n1 in node2's ipcache",
    )
    assert lab.ping(cluster.pods["b1"].netns, str(n1.ip))
    with AgentClient(cluster.node1.socket) as client:
        nodes = {n["name"]: n for n in client.get("/v1/cluster/nodes")}
    assert set(nodes) == {"node1", "node2"}
