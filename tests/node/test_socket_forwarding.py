"""Socket-level forwarding: TCP between two pods of one node goes socket to
socket (sock_ops puts both sockets in ciliate_sockhash, sk_msg redirects
each send into the peer's receive queue), with every byte in order, and
nothing of it is left when the agent is told to stop doing it."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ciliate.control.lab import lab
from ciliate.datapath.maps import SocketMap
from ciliate.loader import Map, cgroup2_root, enter_netns

from .conftest import NodeLab, restart_agent

PEER = Path(__file__).with_name("tcp_peer.py")
SINK_PORT, ECHO_PORT = 7001, 7002

pytestmark = pytest.mark.skipif(cgroup2_root() is None, reason="no cgroup v2 hierarchy mounted")


@pytest.fixture
def pods(node_lab: NodeLab) -> Iterator[tuple[lab.PodState, lab.PodState]]:
    a, b = node_lab.pod(), node_lab.pod()
    node_lab.add(a)
    node_lab.add(b)
    yield a, b
    for pod in (a, b):
        node_lab.cni(pod, "DEL")


@contextlib.contextmanager
def peer(pod: lab.PodState, mode: str, port: int) -> Iterator[None]:
    assert pod.ip is not None
    proc = subprocess.Popen(
        ["ip", "netns", "exec", pod.netns, sys.executable, str(PEER), mode, pod.ip, str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=5)


def connect(pod: lab.PodState, address: str, port: int) -> socket.socket:
    """A TCP socket in the pod's namespace (it stays there after we leave)."""
    with enter_netns(f"/run/netns/{pod.netns}"):
        return socket.create_connection((address, port), timeout=20)


def sockhash(node_lab: NodeLab) -> set[tuple[str, str, int, int]]:
    """(local IP, remote IP, local port, remote port) of every socket in ciliate_sockhash."""
    with Map.open_pinned(Path(node_lab.node.bpffs_root) / "maps" / "ciliate_sockhash") as m:
        return {
            (str(s.local[0]), str(s.remote[0]), s.local[1], s.remote[1])
            for s in SocketMap(m).list()
        }


def tuple_of(sock: socket.socket) -> tuple[str, str, int, int]:
    (local, lport), (remote, rport) = sock.getsockname(), sock.getpeername()
    return local, remote, lport, rport


def egress_bytes(node_lab: NodeLab, description: str) -> int:
    rows = node_lab.get("/v1/bpf/metrics")
    return sum(
        r["bytes"] for r in rows if r["description"] == description and r["direction"] == "egress"
    )


def send_and_digest(sock: socket.socket, nbytes: int) -> tuple[str, str]:
    """Send nbytes of random data, half-close, and return (our digest, the sink's)."""
    digest = hashlib.sha256()
    sent = 0
    while sent < nbytes:
        chunk = os.urandom(min(1 << 20, nbytes - sent))
        sock.sendall(chunk)
        digest.update(chunk)
        sent += len(chunk)
    sock.shutdown(socket.SHUT_WR)
    answer = b""
    while part := sock.recv(128):
        answer += part
    return digest.hexdigest(), answer.decode()


def test_a_stream_between_pods_goes_socket_to_socket_in_order(
    node_lab: NodeLab, pods: tuple[lab.PodState, lab.PodState]
) -> None:
    a, b = pods
    assert b.ip is not None
    socket_before = egress_bytes(node_lab, "forwarded socket to socket (TCP between local pods)")
    packets_before = egress_bytes(node_lab, "forwarded")
    nbytes = 48 << 20
    with peer(b, "sink", SINK_PORT), connect(a, b.ip, SINK_PORT) as sock:
        mine = tuple_of(sock)
        theirs = (mine[1], mine[0], mine[3], mine[2])
        deadline = time.monotonic() + 5
        while not {mine, theirs} <= sockhash(node_lab) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert {mine, theirs} <= sockhash(node_lab), "both sockets of the connection are mapped"
        listed = node_lab.get("/v1/bpf/sockets")  # what `ciliate bpf sockets list` shows
        assert {"local": f"{mine[0]}:{mine[2]}", "remote": f"{mine[1]}:{mine[3]}"} in listed
        ours, sinks = send_and_digest(sock, nbytes)
    # Every byte arrived, in order, though the sink read slowly at first.
    assert sinks == ours
    assert (
        egress_bytes(node_lab, "forwarded socket to socket (TCP between local pods)")
        - (socket_before)
        >= nbytes
    )
    # The payload did not take the packet path: only handshake, FIN and the digest did.
    assert egress_bytes(node_lab, "forwarded") - packets_before < nbytes // 100
    deadline = time.monotonic() + 5
    while mine in sockhash(node_lab) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert mine not in sockhash(node_lab), "a closed socket leaves the map"


def test_a_client_that_speaks_first_is_never_reordered(
    node_lab: NodeLab, pods: tuple[lab.PodState, lab.PodState]
) -> None:
    """The first send may race the server's handshake: whatever path each
    connection takes, request bytes come back exactly as sent."""
    a, b = pods
    assert b.ip is not None
    with peer(b, "echo", ECHO_PORT):
        for i in range(100):
            with connect(a, b.ip, ECHO_PORT) as sock:
                message = secrets.token_bytes(64 + i * 97)
                for part in (message[:17], message[17:]):
                    sock.sendall(part)
                got = b""
                while len(got) < len(message):
                    chunk = sock.recv(65536)
                    assert chunk, "echo closed early"
                    got += chunk
                assert got == message


def test_a_socket_outside_the_pods_namespace_is_not_mapped(
    node_lab: NodeLab, pods: tuple[lab.PodState, lab.PodState]
) -> None:
    """Addresses are not proof: a namespace that puts both pods' IPs on its
    loopback and connects them is not the pods, and its sockets stay unmapped."""
    a, b = pods
    assert a.ip is not None and b.ip is not None
    other = node_lab.pod()  # a namespace never ADDed: no endpoint
    for address in (a.ip, b.ip):
        subprocess.run(
            ["ip", "-n", other.netns, "addr", "add", f"{address}/32", "dev", "lo"], check=True
        )
    subprocess.run(["ip", "-n", other.netns, "link", "set", "lo", "up"], check=True)
    impostor = lab.PodState(other.name, other.node, other.netns, other.container_id, b.ip)
    with peer(impostor, "echo", ECHO_PORT):
        with enter_netns(f"/run/netns/{other.netns}"):
            sock = socket.create_connection((b.ip, ECHO_PORT), source_address=(a.ip, 0))
        with sock:
            sock.sendall(b"hello")
            assert sock.recv(5) == b"hello"
            assert tuple_of(sock) not in sockhash(node_lab)


def test_switched_off_the_agent_detaches_and_tcp_takes_the_packet_path(
    fresh_lab: NodeLab,
) -> None:
    root = cgroup2_root()
    assert root is not None
    link = Path(fresh_lab.node.bpffs_root) / "links" / "sock_ops"
    assert link.exists()
    fresh_lab.node.agent_args = ["--pod-cidr", fresh_lab.node.pod_cidr, "--no-socket-forwarding"]
    restart_agent(fresh_lab)
    assert not link.exists()
    a, b = fresh_lab.pod(), fresh_lab.pod()
    fresh_lab.add(a)
    fresh_lab.add(b)
    assert b.ip is not None
    before = egress_bytes(fresh_lab, "forwarded")
    with peer(b, "sink", SINK_PORT), connect(a, b.ip, SINK_PORT) as sock:
        assert tuple_of(sock) not in sockhash(fresh_lab)
        ours, sinks = send_and_digest(sock, 8 << 20)
    assert sinks == ours
    assert egress_bytes(fresh_lab, "forwarded") - before >= 8 << 20
