"""An agent restarted while etcd is down, end to end: a 2-node cluster lab (real agents,
ciliate-cni as a runtime calls it, the lab's etcd stopped, node1's agent restarted).

The agent starts (pod CIDRs from its last answer, registration and the cluster mirror
deferred until etcd answers); pods keep their network; an ADD that needs a new identity
fails with CNI code 11 naming the identity and leaves nothing; a DEL succeeds. An ADD
of a label set the node's pods use succeeds: the identity from the endpoint records (see
tests/cluster/test_identity_etcd_trouble.py), the policy copied from the datapath's
pinned policy of another endpoint of that identity (no pass has run since the restart
and the objects are in etcd). When etcd is back, everything works again.

The tests run in order on one lab: each stage builds on the one before.
"""

from __future__ import annotations

import functools
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

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
    cluster: Cluster, node: lab.NodeState, name: str, *, namespace: str = "default"
) -> lab.PodState:
    pod = lab.add_pod_netns(cluster.state, node, name, namespace=namespace)
    result = lab.cni_call(cluster.state, node, pod, "ADD")
    pod.ip = result["ips"][0]["address"].split("/")[0]
    cluster.pods[name] = pod
    return pod


def endpoints(node: lab.NodeState) -> dict[str, dict[str, object]]:
    with AgentClient(node.socket) as client:
        return {str(e["ip"]): e for e in client.get("/v1/endpoints")}


def ipcache(node: lab.NodeState) -> dict[str, str | None]:
    with AgentClient(node.socket) as client:
        return {e["prefix"]: e["node_ip"] for e in client.get("/v1/bpf/ipcache")}


def eventually(check: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(bpf_objects: str) -> Iterator[Cluster]:
    name = f"t{secrets.token_hex(3)}"
    quiet = Console(quiet=True)
    try:
        state = lab.create_cluster(name=name, nodes=2, console=quiet)
        cluster = Cluster(state, state.nodes[0], state.nodes[1], {})
        add_pod(cluster, cluster.node1, "a1")
        add_pod(cluster, cluster.node1, "gone")
        add_pod(cluster, cluster.node2, "b1")
        for pod, other in (("a1", cluster.node2), ("b1", cluster.node1)):
            prefix = f"{cluster.pods[pod].ip}/32"
            eventually(
                lambda o=other, p=prefix: p in ipcache(o), timeout=20, what=f"{pod} mirrored"
            )
        lab.stop_etcd(state)
        lab.stop_agent(cluster.node1)
        state.save()
        lab.start_agent(cluster.node1)
        state.save()
        yield cluster
    finally:
        lab.down(name=name, console=quiet)


def test_the_agent_is_back_and_pods_keep_their_network_across_nodes(cluster: Cluster) -> None:
    a1, b1 = cluster.pods["a1"], cluster.pods["b1"]
    assert set(endpoints(cluster.node1)) == {a1.ip, cluster.pods["gone"].ip}
    assert lab.ping(a1.netns, str(b1.ip))
    assert lab.ping(b1.netns, str(a1.ip))
    # The pinned ipcache still has node2's pod: nothing was pruned without etcd.
    assert ipcache(cluster.node1).get(f"{b1.ip}/32") == cluster.node2.node_ip


def test_add_that_needs_a_new_identity_fails_with_try_again_and_leaves_nothing(
    cluster: Cluster,
) -> None:
    pod = lab.add_pod_netns(cluster.state, cluster.node1, "n1", namespace="fresh")
    with pytest.raises(lab.CniCallError) as refused:
        lab.cni_call(cluster.state, cluster.node1, pod, "ADD")
    assert refused.value.code == 11
    message = f"{refused.value.error.get('msg')} {refused.value.error.get('details')}"
    assert "no identity for labels" in message and "etcd" in message, message
    with AgentClient(cluster.node1.socket) as client:
        owners = client.get("/v1/ipam")["allocations"].values()
    assert not any(pod.container_id in owner for owner in owners)
    lab.cni_call(cluster.state, cluster.node1, pod, "DEL")  # as a runtime does after it
    cluster.pods["n1"] = pod


def test_del_succeeds(cluster: Cluster) -> None:
    gone = cluster.pods.pop("gone")
    lab.cni_call(cluster.state, cluster.node1, gone, "DEL")
    assert gone.ip not in endpoints(cluster.node1)


def test_add_of_a_label_set_the_nodes_pods_use_succeeds(cluster: Cluster) -> None:
    a2 = add_pod(cluster, cluster.node1, "a2")
    by_ip = endpoints(cluster.node1)
    assert by_ip[a2.ip]["identity"] == by_ip[cluster.pods["a1"].ip]["identity"]
    assert lab.ping(a2.netns, str(cluster.pods["b1"].ip))


def test_everything_works_again_when_etcd_returns(cluster: Cluster) -> None:
    lab.start_etcd(cluster.state)
    node1_ip = cluster.node1.node_ip

    def registered() -> bool:
        with AgentClient(cluster.node2.socket) as client:
            nodes = {n["name"]: n for n in client.get("/v1/cluster/nodes")}
        return "node1" in nodes and bool(nodes["node1"]["alive"])

    eventually(registered, timeout=30, what="node1 registered and alive")

    def added(name: str, namespace: str) -> bool:
        try:
            add_pod(cluster, cluster.node1, name, namespace=namespace)
        except lab.CniCallError:
            return False
        return True

    eventually(functools.partial(added, "a3", "default"), timeout=30, what="ADD, known labels")
    eventually(functools.partial(added, "n2", "fresh"), timeout=30, what="ADD, new labels")
    for name in ("a3", "n2"):
        pod = cluster.pods[name]
        eventually(
            lambda p=pod: ipcache(cluster.node2).get(f"{p.ip}/32") == node1_ip,
            timeout=30,
            what=f"{name} in node2's ipcache",
        )
        assert lab.ping(cluster.pods["b1"].netns, str(pod.ip))
