"""hostPorts a Pod object declares (``spec.containers[].ports[].hostPort``),
served by the agent for a CNI ADD that names the pod (``K8S_POD_NAMESPACE``,
``K8S_POD_NAME``) and brings no portMappings: TCP and UDP reach the pod at the
node's address (the application sees the hostPort address), the frontends are
listed as HostPort of the pod and go with DEL; a second pod declaring the same
hostPort is refused (102) and an SCTP one (7), each leaving nothing behind. The
runtime's portMappings path is tested through podman in
tests/runtime/test_host_ports.py."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from ciliate.control.lab import lab
from ciliate.loader import cgroup2_root

from .conftest import NodeLab
from .test_policy import apply, ciliate, delete
from .test_services import TARGET_PORT, settle_services, tcp_ask, udp_ask, whoami

HOST_PORT = 9080

pytestmark = pytest.mark.skipif(cgroup2_root() is None, reason="no cgroup v2 hierarchy mounted")


def pod_with_host_ports(pod: lab.PodState, *ports: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": "default", "labels": {"app": pod.name}},
        "spec": {"containers": [{"name": "main", "image": "busybox", "ports": list(ports)}]},
    }


def port(protocol: str = "TCP", host_port: int = HOST_PORT) -> dict[str, Any]:
    return {"containerPort": TARGET_PORT, "hostPort": host_port, "protocol": protocol}


def host_port_frontends(node_lab: NodeLab) -> list[dict[str, Any]]:
    return [f for f in node_lab.get("/v1/services")["frontends"] if f["type"] == "HostPort"]


def until(what: str, check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def test_a_pod_objects_host_ports_reach_the_pod_and_go_with_del(node_lab: NodeLab) -> None:
    web, client = node_lab.pod(), node_lab.pod()
    objects = [pod_with_host_ports(web, port("TCP"), port("UDP")), pod_with_host_ports(client)]
    apply(node_lab, *objects)
    try:
        node_lab.add(web)
        node_lab.add(client)
        settle_services(node_lab)
        router = node_lab.router_ip
        listed = {f["frontend"]: f for f in host_port_frontends(node_lab)}
        assert set(listed) == {f"{router}:{HOST_PORT}/TCP", f"{router}:{HOST_PORT}/UDP"}
        assert {f["service"] for f in listed.values()} == {f"default/{web.name}"}
        assert "HostPort" in ciliate("service", "list", node_lab=node_lab)
        with whoami(web):
            # The application sees the address it asked for, the pod answers.
            assert tcp_ask(client, router, HOST_PORT) == (str(web.ip), (router, HOST_PORT))
            assert udp_ask(client, router, HOST_PORT) == (str(web.ip), (router, HOST_PORT))
    finally:
        node_lab.cni(web, "DEL")
        node_lab.cni(client, "DEL")
        delete(node_lab, *objects)
    until("the frontends gone", lambda: host_port_frontends(node_lab) == [])
    assert not any(str(HOST_PORT) in s["frontend"] for s in node_lab.get("/v1/bpf/lb"))


@pytest.mark.parametrize(
    ("second_ports", "code", "fragment"),
    [
        ([port("TCP")], 102, "hostPort 9080/TCP is held on this node by pod default/"),
        ([port("SCTP", 9081)], 7, "ciliate serves hostPorts over TCP and UDP"),
    ],
    ids=["clash", "sctp"],
)
def test_a_pod_whose_host_ports_cannot_be_served_is_refused_and_leaves_nothing(
    node_lab: NodeLab, second_ports: list[dict[str, Any]], code: int, fragment: str
) -> None:
    first, second = node_lab.pod(), node_lab.pod()
    objects = [pod_with_host_ports(first, port("TCP")), pod_with_host_ports(second, *second_ports)]
    apply(node_lab, *objects)
    try:
        node_lab.add(first)
        settle_services(node_lab)
        endpoints, links = node_lab.get("/v1/endpoints"), node_lab.host_links()
        frontends, ipam = host_port_frontends(node_lab), node_lab.get("/v1/ipam")
        with pytest.raises(lab.CniCallError) as refused:
            node_lab.add(second)
        assert refused.value.code == code, refused.value.error
        assert fragment in refused.value.error["msg"], refused.value.error
        assert node_lab.get("/v1/endpoints") == endpoints
        assert node_lab.host_links() == links
        assert node_lab.get("/v1/ipam") == ipam
        settle_services(node_lab)
        assert host_port_frontends(node_lab) == frontends
    finally:
        node_lab.cni(second, "DEL")
        node_lab.cni(first, "DEL")
        delete(node_lab, *objects)
