"""Network policy on one node, end to end: objects applied through the agent's API,
the agent's policy loop, the real programs deciding. Identities follow labels (pods
with equal labels share one; a label change moves a pod keeping its IP), policy
follows within a second, socket forwarding never carries what policy denies."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from ciliate.control.lab import lab
from ciliate.loader import cgroup2_root, enter_netns

from .conftest import NodeLab

PEER = Path(__file__).with_name("tcp_peer.py")


def apply(node_lab: NodeLab, *objects: Mapping[str, Any]) -> None:
    with node_lab.api as client:
        client.post("/v1/objects/apply", {"objects": list(objects)})
    settle(node_lab)


def delete(node_lab: NodeLab, *objects: Mapping[str, Any]) -> None:
    with node_lab.api as client:
        client.post("/v1/objects/delete", {"objects": list(objects), "ignore_missing": True})
    settle(node_lab)


def settle(node_lab: NodeLab, timeout: float = 5.0) -> None:
    """Until the agent's policy loop has caught up with the store."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = node_lab.get("/v1/policy")
        if status["pending"] is False:
            return
        time.sleep(0.02)
    raise AssertionError(f"the policy loop did not catch up: {status}")


def pod_object(pod: lab.PodState, **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": "default", "labels": labels},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]},
    }


def deny_ingress(name: str, **selector: str) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": selector}, "policyTypes": ["Ingress"]},
    }


def allow_ingress(
    name: str, *, selector: Mapping[str, str], peers: Mapping[str, str], ports: Sequence[int]
) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "podSelector": {"matchLabels": dict(selector)},
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": dict(peers)}}],
                    "ports": [{"protocol": "TCP", "port": p} for p in ports],
                }
            ],
        },
    }


@pytest.fixture
def pods(node_lab: NodeLab) -> Iterator[dict[str, lab.PodState]]:
    made = {name: node_lab.pod() for name in ("a", "b", "c")}
    apply(node_lab, *(pod_object(pod, app=name) for name, pod in made.items()))
    for pod in made.values():
        node_lab.add(pod)
    yield made
    for pod in made.values():
        node_lab.cni(pod, "DEL")
    delete(node_lab, *(pod_object(pod) for pod in made.values()))


def endpoint(node_lab: NodeLab, pod: lab.PodState) -> dict[str, Any]:
    found = [e for e in node_lab.get("/v1/endpoints") if e["ip"] == pod.ip]
    assert len(found) == 1
    return found[0]


def test_identity_comes_from_labels_never_the_pod_name(
    node_lab: NodeLab, pods: dict[str, lab.PodState]
) -> None:
    a = endpoint(node_lab, pods["a"])
    assert a["labels"] == {
        "k8s:app": "a",
        "k8s:io.kubernetes.pod.namespace": "default",
        "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name": "default",
    }
    # Equal labels, one identity.
    apply(node_lab, pod_object(pods["c"], app="a"))
    assert endpoint(node_lab, pods["c"])["identity"] == a["identity"]


def test_a_deny_all_policy_isolates_only_the_pods_it_selects(
    node_lab: NodeLab, pods: dict[str, lab.PodState]
) -> None:
    a, b, c = pods["a"], pods["b"], pods["c"]
    assert b.ip and c.ip
    assert node_lab.ping(a, b.ip) and node_lab.ping(a, c.ip)
    apply(node_lab, deny_ingress("deny-b", app="b"))
    try:
        state = endpoint(node_lab, b)["policy"]
        assert state["ingress_enforced"] and not state["egress_enforced"]
        assert not endpoint(node_lab, c)["policy"]["ingress_enforced"]
        assert not node_lab.ping(a, b.ip)
        assert node_lab.ping(a, c.ip)
        # b itself may still send (no egress isolation); the reply is allowed back.
        assert node_lab.ping(b, c.ip)
        # The node's own traffic is always allowed in (kubelet probes).
        assert lab.ping(node_lab.node.netns, b.ip)
        drops = [
            m
            for m in node_lab.get("/v1/bpf/metrics")
            if m["description"] == "policy denied" and m["packets"] > 0
        ]
        assert drops
    finally:
        delete(node_lab, deny_ingress("deny-b"))
    assert not endpoint(node_lab, b)["policy"]["ingress_enforced"]
    assert node_lab.ping(a, b.ip)


def test_a_label_change_moves_the_pod_to_a_new_identity_keeping_its_ip(
    node_lab: NodeLab, pods: dict[str, lab.PodState]
) -> None:
    a, b = pods["a"], pods["b"]
    assert b.ip
    before = endpoint(node_lab, b)
    apply(node_lab, deny_ingress("deny-b", app="b"))
    try:
        assert not node_lab.ping(a, b.ip)
        apply(node_lab, pod_object(b, app="moved"))
        after = endpoint(node_lab, b)
        assert after["ip"] == before["ip"] and after["host_ifname"] == before["host_ifname"]
        assert after["identity"] != before["identity"]
        assert after["labels"]["k8s:app"] == "moved"
        assert not after["policy"]["ingress_enforced"]
        assert node_lab.ping(a, b.ip)
        ipcache = {e["prefix"]: e["identity"] for e in node_lab.get("/v1/bpf/ipcache")}
        assert ipcache[f"{b.ip}/32"] == after["identity"]
    finally:
        delete(node_lab, deny_ingress("deny-b"))


def test_policy_entries_and_their_rules_are_shown(
    node_lab: NodeLab, pods: dict[str, lab.PodState]
) -> None:
    policy = allow_ingress("web", selector={"app": "b"}, peers={"app": "a"}, ports=[80])
    apply(node_lab, policy)
    try:
        b = endpoint(node_lab, pods["b"])
        shown = node_lab.get(f"/v1/bpf/policy/{b['endpoint_id']}")
        a_identity = endpoint(node_lab, pods["a"])["identity"]
        entries = {(e["identity"], e["protocol"], e["port"]): e for e in shown["entries"]}
        assert shown["ingress_enforced"] and shown["revision"] > 0
        assert entries[(a_identity, 6, 80)]["origin"] == [
            "NetworkPolicy default/web spec.ingress[0]"
        ]
        table = ciliate("bpf", "policy", "get", str(b["endpoint_id"]), node_lab=node_lab)
        assert "enforced ingress" in table and "NetworkPolicy default/web" in table
        src, dst = f"default/{pods['a'].name}", f"default/{pods['b'].name}"
        allowed = ciliate(
            "policy", "trace", "--src", src, "--dst", dst, "--dport", "80/tcp", node_lab=node_lab
        )
        assert "NetworkPolicy default/web spec.ingress[0]" in allowed
        assert allowed.rstrip().endswith("verdict: ALLOWED")
        denied = ciliate(
            "policy", "trace", "--src", src, "--dst", dst, "--dport", "81/tcp", node_lab=node_lab
        )
        assert "default deny" in denied and denied.rstrip().endswith("verdict: DENIED")
        # The tracker shows a connection the policy let through.
        with echo_server(pods["b"], 80):
            connect(pods["a"], str(pods["b"].ip), 80, timeout=2.0).close()
        tracked = json.loads(ciliate("bpf", "ct", "list", "-o", "json", node_lab=node_lab))
        assert any(c["dst"] == f"{pods['b'].ip}:80" and c["protocol"] == 6 for c in tracked)
    finally:
        delete(node_lab, policy)


def ciliate(*args: str, node_lab: NodeLab) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "ciliate.control.cli.main", *args, "--socket", node_lab.node.socket],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# -- socket forwarding and policy -------------------------------------------------


@contextlib.contextmanager
def echo_server(pod: lab.PodState, port: int) -> Iterator[None]:
    assert pod.ip is not None
    proc = subprocess.Popen(
        ["ip", "netns", "exec", pod.netns, sys.executable, str(PEER), "echo", pod.ip, str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=5)


def connect(pod: lab.PodState, address: str, port: int, timeout: float) -> socket.socket:
    with enter_netns(f"/run/netns/{pod.netns}"):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((address, port))
    except BaseException:
        sock.close()
        raise
    return sock


@pytest.mark.skipif(cgroup2_root() is None, reason="no cgroup v2 hierarchy mounted")
def test_socket_forwarding_never_carries_what_policy_denies(
    node_lab: NodeLab, pods: dict[str, lab.PodState]
) -> None:
    a, b, c = pods["a"], pods["b"], pods["c"]
    assert b.ip
    policy = allow_ingress("web", selector={"app": "b"}, peers={"app": "a"}, ports=[7101])
    apply(node_lab, policy)
    try:
        with echo_server(b, 7101):
            # c is not allowed: its connection never opens.
            with pytest.raises(TimeoutError):
                connect(c, b.ip, 7101, timeout=1.0)
            # a is: bytes flow, socket to socket.
            sock = connect(a, b.ip, 7101, timeout=2.0)
            with sock:
                sock.sendall(b"hello")
                assert sock.recv(5) == b"hello"
                mapped = {s["local"] for s in node_lab.get("/v1/bpf/sockets")}
                assert f"{b.ip}:7101" in mapped
                # Now a is denied too: the mapped sockets go, and bytes stop passing.
                apply(node_lab, deny_ingress("web", app="b"))
                assert f"{b.ip}:7101" not in {s["local"] for s in node_lab.get("/v1/bpf/sockets")}
                sock.settimeout(1.0)
                sock.sendall(b"again")
                with pytest.raises(TimeoutError):
                    sock.recv(5)
    finally:
        delete(node_lab, policy)
