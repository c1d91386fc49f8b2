"""ciliate beside a kube-proxy across nodes (issue 9): a 3-node lab whose
agents run with --no-service-lb, a kube-proxy-style DNAT in a node's stack
to a pod on another node. The backend's reply comes back over the fabric to
the client's node, whose uplink program would deliver it straight into the
client; it must meet that node's conntrack first, which restores the
service address."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator

import pytest
from rich.console import Console

from ciliate.control.lab import lab
from tests.node.test_kube_proxy import (
    SERVICE_IP,
    SERVICE_PORT,
    apply_iptables,
    assert_translated,
    call,
    remove_iptables,
    start_server,
    stop_server,
)


@pytest.fixture(scope="module")
def cluster(bpf_objects: str) -> Iterator[lab.LabState]:
    """Three nodes, one pod each (pod1 on node1 ...), every agent restarted
    with --no-service-lb, every pod serving."""
    name = f"t{secrets.token_hex(3)}"
    servers: list[subprocess.Popen[str]] = []
    try:
        state = lab.up(name=name, pods=1, nodes=3, console=Console(quiet=True))
        for node in state.nodes:
            node.agent_args = [*node.agent_args, "--no-service-lb"]
            lab.restart_agent(state, node.name)
        state.save()
        servers = [start_server(pod.netns) for pod in state.pods]
        yield state
    finally:
        for server in servers:
            stop_server(server)
        lab.down(name=name, console=Console(quiet=True))


def pod_on(state: lab.LabState, node: str) -> lab.PodState:
    pod = next(p for p in state.pods if p.node == node)
    assert pod.ip is not None
    return pod


def netns_of(state: lab.LabState, node: str) -> str:
    return next(n.netns for n in state.nodes if n.name == node)


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
@pytest.mark.parametrize(("client_node", "backend_node"), [("node1", "node2"), ("node2", "node1")])
def test_a_pod_reaches_a_backend_on_another_node_through_its_nodes_dnat(
    cluster: lab.LabState, client_node: str, backend_node: str, protocol: str
) -> None:
    client, backend = pod_on(cluster, client_node), pod_on(cluster, backend_node)
    netns = netns_of(cluster, client_node)
    apply_iptables(netns, str(backend.ip))
    try:
        result = call(client.netns, protocol, SERVICE_IP, SERVICE_PORT)
    finally:
        remove_iptables(netns)
    assert_translated(result, str(client.ip))


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_the_same_dnat_on_every_node_serves_clients_on_every_other_node(
    cluster: lab.LabState, protocol: str
) -> None:
    """As kube-proxy writes it: every node holds the rule. The backend's
    node has the rule too, yet sees the flow only as pod traffic (its
    conntrack never translated it), so its replies are not diverted."""
    backend = pod_on(cluster, "node2")
    for node in cluster.nodes:
        apply_iptables(node.netns, str(backend.ip))
    try:
        results = {
            client.name: call(client.netns, protocol, SERVICE_IP, SERVICE_PORT)
            for client in (pod_on(cluster, "node1"), pod_on(cluster, "node3"))
        }
    finally:
        for node in cluster.nodes:
            remove_iptables(node.netns)
    for client in (pod_on(cluster, "node1"), pod_on(cluster, "node3")):
        assert_translated(results[client.name], str(client.ip))
