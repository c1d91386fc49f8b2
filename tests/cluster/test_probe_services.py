"""Services probed as an unlucky operator meets them, on a 3-node lab: a NodePort
whose backend is a node's own address (a hostNetwork pod, an ingress controller
run on the host), from a client in the ToR namespace."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ciliate.control.lab import lab

from .test_services_cluster import PEER, Cluster, stored, tor_ask
from .test_services_cluster import cluster as cluster  # the module's lab, reused

HOST_PORT = 8081


@pytest.fixture
def host_backend(cluster: Cluster) -> Iterator[lab.NodeState]:
    """A server in node1's own namespace on its node address, as a hostNetwork pod."""
    node = cluster.state.nodes[0]
    assert node.node_ip is not None
    proc = subprocess.Popen(
        [
            *("ip", "netns", "exec", node.netns, sys.executable, str(PEER)),
            *(node.node_ip, str(HOST_PORT)),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield node
    finally:
        proc.terminate()
        proc.wait(timeout=5)


def host_network_service(
    node_ip: str, *, node_name: str | None = None, external_local: bool = False
) -> list[dict[str, Any]]:
    svc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "host-np", "namespace": "default"},
        "spec": {"type": "NodePort", "ports": [{"name": "http", "protocol": "TCP", "port": 80}]},
    }
    if external_local:
        svc["spec"]["externalTrafficPolicy"] = "Local"
    endpoint: dict[str, Any] = {"addresses": [node_ip], "conditions": {"ready": True}}
    if node_name is not None:
        endpoint["nodeName"] = node_name
    slice_ = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "host-np-1",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": "host-np"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": HOST_PORT}],
        "endpoints": [endpoint],
    }
    return [svc, slice_]


def _wait_for_node_port(cluster: Cluster, *, backends_on: set[str]) -> int:
    """The NodePort, once every agent wrote it, with its backend on the
    nodes named (the others: written without one, as Local leaves them)."""
    node_port: int = stored(cluster, "host-np")["spec"]["ports"][0]["nodePort"]
    deadline = time.monotonic() + 20
    while True:
        written = [
            any(f["port"] == node_port and (f["backends"] or node.name not in backends_on)
                for f in client.get("/v1/services")["frontends"])
            for node, client in zip(cluster.state.nodes, cluster.clients, strict=True)
        ]  # fmt: skip
        if all(written):
            return node_port
        assert time.monotonic() < deadline, "the agents did not write the NodePort"
        time.sleep(0.1)


def _ask_every_node(cluster: Cluster, node_port: int) -> dict[str, list[str]]:
    reached = {}
    for node in cluster.state.nodes:
        assert node.node_ip is not None
        try:
            reached[node.name] = tor_ask(cluster, node.node_ip, node_port, 3)
        except AssertionError as exc:  # the ToR client failed: its last line says how
            reached[node.name] = [str(exc).splitlines()[-1]]
    return reached


def test_a_node_port_reaches_a_backend_on_a_node_address_from_every_node(
    cluster: Cluster, host_backend: lab.NodeState
) -> None:
    """Through node2 and node3 the backend is remote (SNATed to them); through
    node1 it is the node itself: DNAT only, into its stack, and the host's
    reply translated back on the uplink's egress (to_netdev)."""
    assert host_backend.node_ip is not None
    objects = host_network_service(host_backend.node_ip)
    cluster.apply(*objects)
    try:
        every_node = {n.name for n in cluster.state.nodes}
        reached = _ask_every_node(cluster, _wait_for_node_port(cluster, backends_on=every_node))
        assert reached == {n.name: [host_backend.node_ip] * 3 for n in cluster.state.nodes}
    finally:
        cluster.delete(*objects)


def test_external_traffic_policy_local_serves_a_host_backend_only_through_its_node(
    cluster: Cluster, host_backend: lab.NodeState
) -> None:
    """externalTrafficPolicy: Local, the hostNetwork endpoint on node1 (its
    nodeName): node1 answers itself; the other nodes have no local backend
    and refuse at once (ICMP port unreachable: ECONNREFUSED, not a time-out)."""
    assert host_backend.node_ip is not None
    objects = host_network_service(
        host_backend.node_ip, node_name=host_backend.name, external_local=True
    )
    cluster.apply(*objects)
    try:
        node_port = _wait_for_node_port(cluster, backends_on={host_backend.name})
        reached = _ask_every_node(cluster, node_port)
        assert reached.pop(host_backend.name) == [host_backend.node_ip] * 3
        assert all("ConnectionRefusedError" in r[0] for r in reached.values()), reached
    finally:
        cluster.delete(*objects)
