"""Adoption of a pod's open connections when its first policy lands, probed as an
unlucky operator meets it: a pod with hundreds of open sockets both ways, and a
pod whose network namespace is gone before its policy is written."""

from __future__ import annotations

import resource
import selectors
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from ciliate.control.lab import lab

from .conftest import NodeLab
from .test_policy import apply, delete, deny_ingress, pod_object
from .test_policy_existing_connections import endpoint_isolated, in_pod

# Each way: enough to spread over many tracker sets (and to be seen in the pass time).
_CONNECTIONS = 200
A_PORT, B_PORT = 7411, 7412


@pytest.fixture
def pods(node_lab: NodeLab) -> Iterator[tuple[lab.PodState, lab.PodState]]:
    a, b = node_lab.pod(), node_lab.pod()
    apply(node_lab, pod_object(a, app="many-a"), pod_object(b, app="many-b"))
    node_lab.add(a)
    node_lab.add(b)
    yield a, b
    delete(node_lab, deny_ingress("isolate-many-a", app="many-a"))
    for pod in (a, b):
        node_lab.cni(pod, "DEL")
    delete(node_lab, pod_object(a), pod_object(b))


def connections(
    client: lab.PodState, server: lab.PodState, port: int, count: int
) -> list[tuple[socket.socket, socket.socket]]:
    """``count`` connections from ``client`` to ``server``: (client side, accepted side)."""
    assert server.ip is not None
    listener = in_pod(server, socket.SOCK_STREAM)
    pairs = []
    with listener:
        listener.bind((server.ip, port))
        listener.listen(count)
        for _ in range(count):
            near = in_pod(client, socket.SOCK_STREAM)
            near.connect((server.ip, port))
            far, _ = listener.accept()
            far.settimeout(3.0)
            pairs.append((near, far))
    return pairs


def readable(socks: list[socket.socket], *, wait: float) -> list[socket.socket]:
    """The sockets with bytes to read within ``wait`` seconds."""
    with selectors.DefaultSelector() as sel:
        for sock in socks:
            sel.register(sock, selectors.EVENT_READ)
        found: set[socket.socket] = set()
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0 and len(found) < len(socks):
            for key, _ in sel.select(left):
                found.add(key.fileobj)  # type: ignore[arg-type]
                sel.unregister(key.fileobj)
    return [s for s in socks if s in found]


def test_hundreds_of_open_connections_each_end_as_its_opener_and_the_policy_say(
    node_lab: NodeLab, pods: tuple[lab.PodState, lab.PodState]
) -> None:
    """a opened 200 connections to b, and b 200 into a, all passing bytes, when
    a's first policy isolates its ingress: every one of a's own keeps its answers,
    every one b opened into a stops (its bytes never reach a)."""
    a, b = pods
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    own = connections(a, b, B_PORT, _CONNECTIONS)
    into = connections(b, a, A_PORT, _CONNECTIONS)
    try:
        for near, far in own + into:
            near.sendall(b"x")
            assert far.recv(1) == b"x"
        baseline = node_lab.get("/v1/policy")["last_pass_ms"]
        apply(node_lab, deny_ingress("isolate-many-a", app="many-a"))
        status = node_lab.get("/v1/policy")
        assert endpoint_isolated(node_lab, a)
        print(f"pass with adoption: {status['last_pass_ms']} ms (before: {baseline} ms)")
        for _, far in own:
            far.sendall(b"answer")
        answered = readable([near for near, _ in own], wait=3.0)
        assert len(answered) == len(own)
        for near in answered:
            assert near.recv(6) == b"answer"
        for near, _ in into:
            near.sendall(b"again")
        assert readable([far for _, far in into], wait=1.5) == []
    finally:
        for near, far in own + into:
            near.close()
            far.close()


def test_a_pod_whose_namespace_is_gone_does_not_keep_the_others_from_their_policy(
    node_lab: NodeLab,
) -> None:
    """The runtime removed a pod's namespace (its veth went with it) and no DEL came
    yet; then a policy selecting it and another pod is applied: reading the gone
    pod's sockets fails, and the pass must still isolate the other pod and report
    nothing wrong."""
    gone, other, client = node_lab.pod(), node_lab.pod(), node_lab.pod()
    apply(
        node_lab,
        pod_object(gone, app="gone-ns"),
        pod_object(other, app="gone-ns"),
        pod_object(client, app="gone-client"),
    )
    for pod in (gone, other, client):
        node_lab.add(pod)
    assert other.ip
    subprocess.run(["ip", "netns", "del", gone.netns], check=True)
    policy = deny_ingress("isolate-gone-ns", app="gone-ns")
    try:
        apply(node_lab, policy)
        assert node_lab.get("/v1/policy")["last_error"] is None
        assert endpoint_isolated(node_lab, other)
        assert not node_lab.ping(client, other.ip)
    finally:
        for pod in (gone, other, client):
            node_lab.cni(pod, "DEL")
        delete(node_lab, policy, *(pod_object(p) for p in (gone, other, client)))
