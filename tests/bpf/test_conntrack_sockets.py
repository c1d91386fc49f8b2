"""The connection tracker's RELATED errors and fragments with real sockets:
a node of the lab (real agent, real CNI, pods as namespaces), Kubernetes
policies applied through the agent, traffic from the pods' own stacks.

The client pod is isolated for ingress (a policy selects it and allows
nothing in); the server pod lets the client's UDP 5000 and 5001 in.
"""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from rich.console import Console

from ciliate.control.agent.client import AgentClient
from ciliate.control.lab import lab
from ciliate.loader import enter_netns

TIMEOUT = 3.0


def _apply(node: lab.NodeState, *objects: Mapping[str, Any]) -> None:
    with AgentClient(node.socket) as client:
        client.post("/v1/objects/apply", {"objects": list(objects)})
        deadline = time.monotonic() + 5
        while client.get("/v1/policy")["pending"] and time.monotonic() < deadline:
            time.sleep(0.02)


def _pod(name: str, app: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]},
    }


def _policy(name: str, app: str, ingress: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "podSelector": {"matchLabels": {"app": app}},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }


@pytest.fixture(scope="module")
def pods(bpf_objects: str) -> Iterator[tuple[lab.PodState, lab.PodState]]:
    name = f"t{secrets.token_hex(3)}"
    try:
        state, node = lab.create(name=name)
        client = lab.add_pod_netns(state, node, "client")
        server = lab.add_pod_netns(state, node, "server")
        _apply(node, _pod("client", "client"), _pod("server", "server"))
        for pod in (client, server):
            result = lab.cni_call(state, node, pod, "ADD")
            pod.ip = result["ips"][0]["address"].split("/")[0]
        _apply(
            node,
            _policy("client-isolated", "client", []),
            _policy(
                "server-udp",
                "server",
                [
                    {
                        "from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                        "ports": [
                            {"protocol": "UDP", "port": 5000},
                            {"protocol": "UDP", "port": 5001},
                        ],
                    }
                ],
            ),
        )
        yield client, server
    finally:
        lab.down(name=name, console=Console(quiet=True))


def _udp(pod: lab.PodState) -> socket.socket:
    with enter_netns(pod.netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(TIMEOUT)
    return sock


def test_a_closed_udp_port_is_refused_to_an_isolated_client(
    pods: tuple[lab.PodState, lab.PodState],
) -> None:
    """The server's stack answers port unreachable; without RELATED the
    client's ingress policy drops it and the client waits forever."""
    client, server = pods
    assert server.ip and client.ip
    # ICMP of its own cannot reach the client: only as an error it is about.
    assert not lab.ping(server.netns, client.ip)
    with _udp(client) as sock:
        sock.connect((server.ip, 5000))  # nothing listens there
        sock.send(b"anyone?")
        with pytest.raises(ConnectionRefusedError):
            sock.recv(100)


def test_a_datagram_larger_than_the_mtu_passes_in_fragments(
    pods: tuple[lab.PodState, lab.PodState],
) -> None:
    client, server = pods
    assert server.ip
    big = bytes(range(256)) * 16  # 4096 bytes: three fragments at MTU 1500
    with _udp(server) as listening, _udp(client) as sock:
        listening.bind((server.ip, 5001))
        sock.sendto(big, (server.ip, 5001))
        data, _ = listening.recvfrom(65535)
        assert data == big


def test_the_fragments_of_a_datagram_to_a_denied_port_are_dropped(
    pods: tuple[lab.PodState, lab.PodState],
) -> None:
    client, server = pods
    assert server.ip
    with _udp(server) as listening, _udp(client) as sock:
        listening.bind((server.ip, 5002))
        listening.settimeout(1.0)
        sock.sendto(b"x" * 4096, (server.ip, 5002))
        with pytest.raises(TimeoutError):
            listening.recvfrom(65535)
