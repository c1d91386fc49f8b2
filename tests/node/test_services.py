"""Services on one node, end to end: Service objects applied through the agent, the
agent's EndpointSlice controller and service loop, the socket load balancer in the
kernel. A pod connects to a ClusterIP and reaches a backend pod directly while the
application sees the service's address; UDP too; ClientIP affinity holds; a
service with no backend refuses at once; backends follow the pods; policy applies
to the backend."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ciliate.control.lab import lab
from ciliate.loader import cgroup2_root, enter_netns

from .conftest import NodeLab
from .test_policy import apply, ciliate, delete, deny_ingress, pod_object

PEER = Path(__file__).with_name("whoami_peer.py")
TARGET_PORT = 8080

pytestmark = pytest.mark.skipif(cgroup2_root() is None, reason="no cgroup v2 hierarchy mounted")


def service(name: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "selector": {"app": "web"},
        "ports": [
            {"name": "tcp", "protocol": "TCP", "port": 80, "targetPort": TARGET_PORT},
            {"name": "udp", "protocol": "UDP", "port": 80, "targetPort": TARGET_PORT},
        ],
        **spec,
    }
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": body,
    }


def settle_services(node_lab: NodeLab, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = node_lab.get("/v1/services/status")
        if status["pending"] is False:
            return
        time.sleep(0.02)
    raise AssertionError(f"the service loop did not catch up: {status}")


@contextlib.contextmanager
def whoami(pod: lab.PodState) -> Iterator[None]:
    proc = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            pod.netns,
            sys.executable,
            str(PEER),
            str(pod.ip),
            str(TARGET_PORT),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=5)


def tcp_ask(pod: lab.PodState, address: str, port: int) -> tuple[str, tuple[str, int]]:
    """Which backend answered, and whom the application thinks it is connected to."""
    with enter_netns(f"/run/netns/{pod.netns}"):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(2.0)
        sock.connect((address, port))
        peer = sock.getpeername()
        return sock.recv(64).decode(), peer


def udp_ask(pod: lab.PodState, address: str, port: int) -> tuple[str, tuple[str, int]]:
    with enter_netns(f"/run/netns/{pod.netns}"):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.settimeout(2.0)
        sock.sendto(b"who", (address, port))
        data, sender = sock.recvfrom(64)
        return data.decode(), sender


@pytest.fixture
def web(node_lab: NodeLab) -> Iterator[dict[str, lab.PodState]]:
    pods = {name: node_lab.pod() for name in ("client", "web1", "web2")}
    apply(
        node_lab,
        *(
            pod_object(pod, app="web" if name.startswith("web") else name)
            for name, pod in pods.items()
        ),
    )
    for pod in pods.values():
        node_lab.add(pod)
    with whoami(pods["web1"]), whoami(pods["web2"]):
        yield pods
    for pod in pods.values():
        node_lab.cni(pod, "DEL")
    delete(node_lab, *(pod_object(pod) for pod in pods.values()))


def cluster_ip(node_lab: NodeLab, name: str) -> str:
    with node_lab.api as client:
        svc = client.get(f"/v1/objects/services/{name}?namespace=default")
    return str(svc["spec"]["clusterIP"])


def test_a_cluster_ip_reaches_every_backend_and_the_app_sees_the_service(
    node_lab: NodeLab, web: dict[str, lab.PodState]
) -> None:
    apply(node_lab, service("web"))
    try:
        settle_services(node_lab)
        vip = cluster_ip(node_lab, "web")
        backends = {str(web["web1"].ip), str(web["web2"].ip)}
        seen = set()
        for _ in range(30):
            answer, peer = tcp_ask(web["client"], vip, 80)
            assert answer in backends and peer == (vip, 80)
            seen.add(answer)
        assert seen == backends  # random choice: both in 30 tries
        answer, sender = udp_ask(web["client"], vip, 80)
        assert answer in backends and sender == (vip, 80)  # recvmsg gives the service back
        listed = node_lab.get("/v1/services")["frontends"]
        frontend = next(f for f in listed if f["ip"] == vip and f["protocol"] == "TCP")
        assert {b["ip"] for b in frontend["backends"]} == backends
        in_maps = json.loads(ciliate("bpf", "lb", "list", "-o", "json", node_lab=node_lab))
        written = next(s for s in in_maps if s["frontend"] == f"{vip}:80/TCP")
        assert {b["address"] for b in written["backends"]} == {
            f"{b}:{TARGET_PORT}" for b in backends
        }
        table = ciliate("service", "list", node_lab=node_lab)
        assert vip in table and "default/web" in table
    finally:
        delete(node_lab, service("web"))


def test_client_ip_affinity_keeps_one_backend(
    node_lab: NodeLab, web: dict[str, lab.PodState]
) -> None:
    sticky = service("sticky", sessionAffinity="ClientIP")
    apply(node_lab, sticky)
    try:
        settle_services(node_lab)
        vip = cluster_ip(node_lab, "sticky")
        assert len({tcp_ask(web["client"], vip, 80)[0] for _ in range(20)}) == 1
    finally:
        delete(node_lab, sticky)


def test_backends_follow_the_pods_and_none_refuses_at_once(
    node_lab: NodeLab, web: dict[str, lab.PodState]
) -> None:
    apply(node_lab, service("web"))
    try:
        settle_services(node_lab)
        vip = cluster_ip(node_lab, "web")
        apply(node_lab, pod_object(web["web2"], app="retired"))  # out of the selector
        settle_services(node_lab)
        assert {tcp_ask(web["client"], vip, 80)[0] for _ in range(10)} == {str(web["web1"].ip)}
        apply(node_lab, pod_object(web["web1"], app="retired"))
        settle_services(node_lab)
        with pytest.raises(ConnectionRefusedError):  # refused at once, not timed out
            tcp_ask(web["client"], vip, 80)
    finally:
        delete(node_lab, service("web"))


def test_policy_applies_to_the_backend_behind_a_cluster_ip(
    node_lab: NodeLab, web: dict[str, lab.PodState]
) -> None:
    apply(node_lab, service("web"), deny_ingress("deny-web", app="web"))
    try:
        settle_services(node_lab)
        vip = cluster_ip(node_lab, "web")
        with pytest.raises(TimeoutError):
            tcp_ask(web["client"], vip, 80)
    finally:
        delete(node_lab, service("web"), deny_ingress("deny-web"))


def test_local_traffic_policies_in_the_maps_and_on_connect(
    node_lab: NodeLab, web: dict[str, lab.PodState]
) -> None:
    """internalTrafficPolicy Local: the ClusterIP reaches this node's backend only;
    externalTrafficPolicy Local: the NodePort serves outside clients with this node's
    backend only while a pod reaching it gets every backend (the second scope). The
    user's slice (a Service without selector) puts web2 on another node."""
    node_name = node_lab.get("/v1/status")["node"]
    local = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "local", "namespace": "default"},
        "spec": {
            "type": "NodePort",
            "internalTrafficPolicy": "Local",
            "externalTrafficPolicy": "Local",
            "ports": [{"name": "tcp", "protocol": "TCP", "port": 80, "targetPort": TARGET_PORT}],
        },
    }
    user_slice = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "local-1",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": "local"},
        },
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": [str(web["web1"].ip)], "nodeName": node_name},
            {"addresses": [str(web["web2"].ip)], "nodeName": "elsewhere"},
        ],
        "ports": [{"name": "tcp", "protocol": "TCP", "port": TARGET_PORT}],
    }
    apply(node_lab, local, user_slice)
    try:
        settle_services(node_lab)
        with node_lab.api as client:
            svc = client.get("/v1/objects/services/local?namespace=default")
        vip, node_port = str(svc["spec"]["clusterIP"]), int(svc["spec"]["ports"][0]["nodePort"])
        here, both = {str(web["web1"].ip)}, {str(web["web1"].ip), str(web["web2"].ip)}
        assert {tcp_ask(web["client"], vip, 80)[0] for _ in range(15)} == here
        router = node_lab.router_ip
        assert {tcp_ask(web["client"], router, node_port)[0] for _ in range(30)} == both
        in_maps = node_lab.get("/v1/bpf/lb")
        node_port_entry = next(s for s in in_maps if s["frontend"] == f"{router}:{node_port}/TCP")
        assert [b["address"] for b in node_port_entry["backends"]] == [
            f"{web['web1'].ip}:{TARGET_PORT}"
        ]
        listed = node_lab.get("/v1/services")["frontends"]
        node_port_row = next(f for f in listed if f["frontend"] == f"{router}:{node_port}/TCP")
        assert {b["ip"] for b in node_port_row["in_cluster_backends"]} == both
        # The node's own backend gone: the ClusterIP refuses at once; pods still reach
        # the other node's backend through the NodePort.
        user_slice["endpoints"] = user_slice["endpoints"][1:]
        apply(node_lab, user_slice)
        settle_services(node_lab)
        with pytest.raises(ConnectionRefusedError):
            tcp_ask(web["client"], vip, 80)
        assert {tcp_ask(web["client"], router, node_port)[0] for _ in range(5)} == {
            str(web["web2"].ip)
        }
    finally:
        delete(node_lab, local, user_slice)
