"""Connections opened before a policy applies to a pod, on a real node: the pod's
own connections keep getting their answers when its ingress becomes isolated (as
with Cilium or an iptables engine, whose conntrack saw them open), and a
connection into the pod that the policy denies stops. The agent reads the pod's
sockets when its first policy is written and the tracker adopts them.

Sockets are made in the pods' namespaces from this process, so each step happens
exactly when the test says: the server answers only once the policy is in force.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from ciliate.control.lab import lab
from ciliate.loader import enter_netns

from .conftest import NodeLab
from .test_policy import apply, delete, deny_ingress, pod_object

TCP_PORT, UDP_PORT, A_TCP_PORT = 7301, 7302, 7303


@pytest.fixture
def pods(node_lab: NodeLab) -> Iterator[tuple[lab.PodState, lab.PodState]]:
    a, b = node_lab.pod(), node_lab.pod()
    apply(node_lab, pod_object(a, app="a"), pod_object(b, app="b"))
    node_lab.add(a)
    node_lab.add(b)
    yield a, b
    delete(node_lab, deny_ingress("isolate-a", app="a"))
    for pod in (a, b):
        node_lab.cni(pod, "DEL")
    delete(node_lab, pod_object(a), pod_object(b))


def in_pod(pod: lab.PodState, kind: int) -> socket.socket:
    with enter_netns(f"/run/netns/{pod.netns}"):
        sock = socket.socket(socket.AF_INET, kind)
    sock.settimeout(3.0)
    return sock


def tcp_pair(
    client: lab.PodState, server: lab.PodState, port: int
) -> tuple[socket.socket, socket.socket]:
    """A connection from ``client`` to ``server``: (client side, accepted side)."""
    assert server.ip is not None
    listener = in_pod(server, socket.SOCK_STREAM)
    with listener:
        listener.bind((server.ip, port))
        listener.listen()
        near = in_pod(client, socket.SOCK_STREAM)
        near.connect((server.ip, port))
        far, _ = listener.accept()
    far.settimeout(3.0)
    return near, far


def test_the_pods_own_connections_keep_their_answers_when_its_ingress_is_isolated(
    node_lab: NodeLab, pods: tuple[lab.PodState, lab.PodState]
) -> None:
    a, b = pods
    assert b.ip is not None
    near, far = tcp_pair(a, b, TCP_PORT)
    udp_server, udp_client = in_pod(b, socket.SOCK_DGRAM), in_pod(a, socket.SOCK_DGRAM)
    with near, far, udp_server, udp_client:
        near.sendall(b"request")
        assert far.recv(7) == b"request"
        udp_server.bind((b.ip, UDP_PORT))
        udp_client.connect((b.ip, UDP_PORT))
        udp_client.send(b"query")
        _, asker = udp_server.recvfrom(16)

        apply(node_lab, deny_ingress("isolate-a", app="a"))
        assert endpoint_isolated(node_lab, a)

        # The answers come after the policy: they belong to a's connections.
        far.sendall(b"response")
        assert near.recv(8) == b"response"
        udp_server.sendto(b"answer", asker)
        assert udp_client.recv(16) == b"answer"
        # And the connection goes on both ways.
        near.sendall(b"more")
        assert far.recv(4) == b"more"
        far.sendall(b"pushed")
        assert near.recv(6) == b"pushed"
        # Tracked from its opener, a.
        opener = "{}:{}".format(*near.getsockname())
        tracked = node_lab.get("/v1/bpf/ct")
        assert any(c["src"] == opener and c["protocol"] == 6 for c in tracked), tracked


def test_a_connection_into_the_pod_stops_when_its_ingress_denies_it(
    node_lab: NodeLab, pods: tuple[lab.PodState, lab.PodState]
) -> None:
    """Policy applies to existing connections: b opened this one, a now lets nothing in."""
    a, b = pods
    near, far = tcp_pair(b, a, A_TCP_PORT)
    with near, far:
        near.sendall(b"hello")
        assert far.recv(5) == b"hello"
        apply(node_lab, deny_ingress("isolate-a", app="a"))
        assert endpoint_isolated(node_lab, a)
        near.sendall(b"again")
        far.settimeout(1.0)
        with pytest.raises(TimeoutError):
            far.recv(5)


def endpoint_isolated(node_lab: NodeLab, pod: lab.PodState) -> bool:
    (found,) = [e for e in node_lab.get("/v1/endpoints") if e["ip"] == pod.ip]
    return bool(found["policy"]["ingress_enforced"])
