"""Policy probed as an unlucky operator meets it across nodes: a pod relabelled to
a new identity while it sends to a pod of another node that admits it whatever its
other labels."""

from __future__ import annotations

import contextlib
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from rich.console import Console

from ciliate.control.agent.client import AgentClient
from ciliate.control.lab import lab
from ciliate.loader import enter_netns


@pytest.fixture(scope="module")
def two_nodes(bpf_objects: str) -> Iterator[lab.LabState]:
    name = f"t{secrets.token_hex(3)}"
    try:
        yield lab.create_cluster(name=name, nodes=2, console=Console(quiet=True))
    finally:
        lab.down(name=name, console=Console(quiet=True))


def _pod(pod: lab.PodState, **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": "default", "labels": labels},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]},
    }


def _settle(state: lab.LabState, timeout: float = 20.0) -> None:
    """Every agent's policy loop caught up, every ipcache holding every pod's identity."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        clients = [AgentClient(node.socket) for node in state.nodes]
        try:
            if all(c.get("/v1/policy")["pending"] is False for c in clients):
                identities = {
                    f"{e['ip']}/32": e["identity"] for c in clients for e in c.get("/v1/endpoints")
                }
                if all(
                    {e["prefix"]: e["identity"] for e in c.get("/v1/bpf/ipcache")}.get(p) == i
                    for c in clients
                    for p, i in identities.items()
                ):
                    return
        finally:
            for c in clients:
                c.close()
        time.sleep(0.05)
    raise AssertionError("the cluster did not settle")


def _policy_drops(node: lab.NodeState) -> int:
    with AgentClient(node.socket) as client:
        return sum(
            m["packets"]
            for m in client.get("/v1/bpf/metrics")
            if m["description"] == "policy denied"
        )


def test_a_pod_relabelled_within_what_a_remote_policy_admits_loses_no_packet(
    two_nodes: lab.LabState,
) -> None:
    state = two_nodes
    node1, node2 = state.nodes
    client = lab.add_pod_netns(state, node1, "steady")
    server = lab.add_pod_netns(state, node2, "steady-server")
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "admit-steady", "namespace": "default"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "steady-server"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "steady"}}}]}],
        },
    }
    with AgentClient(node1.socket) as api:
        api.post(
            "/v1/objects/apply",
            {
                "objects": [
                    _pod(client, app="steady", round="start"),
                    _pod(server, app="steady-server"),
                    policy,
                ]
            },
        )
    for node, pod in ((node1, client), (node2, server)):
        pod.ip = lab.cni_call(state, node, pod, "ADD")["ips"][0]["address"].split("/")[0]
    _settle(state)
    assert lab.ping(client.netns, str(server.ip))
    stop = threading.Event()

    def keep_sending() -> None:
        with enter_netns(f"/run/netns/{client.netns}"):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    sock.sendto(b"steady", (str(server.ip), 9))
                time.sleep(0.001)

    sender = threading.Thread(target=keep_sending)
    before = _policy_drops(node2)
    sender.start()
    try:
        for i in range(8):
            with AgentClient(node1.socket) as api:
                api.post(
                    "/v1/objects/apply", {"objects": [_pod(client, app="steady", round=str(i))]}
                )
            _settle(state)
    finally:
        stop.set()
        sender.join()
    assert _policy_drops(node2) == before
