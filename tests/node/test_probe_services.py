"""Services probed as an unlucky operator meets them, on a real node: ClientIP
affinity to a pod that has left the Service but still backs another one; Services
too big for the maps beside a small one."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ciliate.control.lab import lab
from ciliate.loader import cgroup2_root, enter_netns

from .conftest import NodeLab
from .test_policy import apply, delete, pod_object
from .test_services import cluster_ip, service, settle_services, tcp_ask, whoami

pytestmark = pytest.mark.skipif(cgroup2_root() is None, reason="no cgroup v2 hierarchy mounted")


@pytest.fixture
def shared(node_lab: NodeLab) -> Iterator[dict[str, lab.PodState]]:
    """Two web pods that back both Service ``sticky`` (app=web) and ``all``
    (role=shared), and a client."""
    pods = {name: node_lab.pod() for name in ("client", "web1", "web2")}
    apply(
        node_lab,
        pod_object(pods["client"], app="client"),
        pod_object(pods["web1"], app="web", role="shared"),
        pod_object(pods["web2"], app="web", role="shared"),
    )
    for pod in pods.values():
        node_lab.add(pod)
    with whoami(pods["web1"]), whoami(pods["web2"]):
        yield pods
    for pod in pods.values():
        node_lab.cni(pod, "DEL")
    delete(node_lab, *(pod_object(pod) for pod in pods.values()))


def test_client_ip_affinity_ends_when_the_backend_leaves_the_service(
    node_lab: NodeLab, shared: dict[str, lab.PodState]
) -> None:
    """The client sticks to one backend of ``sticky``; that pod's labels change so
    it leaves ``sticky`` while still backing ``all`` (its backend stays in the maps,
    active). The client's next connections to ``sticky`` must go to the backend the
    Service has now, as kube-proxy's affinity (per endpoint chain) and Cilium's
    (the affinity match map) do, not to the pod that left for the rest of the
    three-hour timeout."""
    sticky = service("sticky", sessionAffinity="ClientIP")
    everyone = service("all", selector={"role": "shared"})
    apply(node_lab, sticky, everyone)
    try:
        settle_services(node_lab)
        vip = cluster_ip(node_lab, "sticky")
        kept = {tcp_ask(shared["client"], vip, 80)[0] for _ in range(5)}
        assert len(kept) == 1
        leaver = next(p for p in ("web1", "web2") if str(shared[p].ip) in kept)
        stayer = "web2" if leaver == "web1" else "web1"
        apply(node_lab, pod_object(shared[leaver], app="retired", role="shared"))
        settle_services(node_lab)
        answers = {tcp_ask(shared["client"], vip, 80)[0] for _ in range(5)}
        assert answers == {str(shared[stayer].ip)}
        # Still a backend of `all`: the pod itself is up and reachable there.
        all_vip = cluster_ip(node_lab, "all")
        assert str(shared[leaver].ip) in {
            tcp_ask(shared["client"], all_vip, 80)[0] for _ in range(30)
        }
    finally:
        delete(node_lab, sticky, everyone)


# Two Services without selectors, 100 ports each, slices of 1,000 addresses with a
# target port per Service port: 100,000 backends each, where the backend map
# holds 131,072 (bpf/datapath.toml), so the second does not fit.
_HUGE_PORTS = 100
_HUGE_ADDRESSES = 1000


def huge_service(name: str, *, second_octet: int) -> list[dict[str, Any]]:
    ports = [
        {"name": f"p{i}", "protocol": "TCP", "port": 1000 + i, "targetPort": 2000 + i}
        for i in range(_HUGE_PORTS)
    ]
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"ports": ports},
    }
    slice_ = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{name}-1",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": name},
        },
        "addressType": "IPv4",
        "ports": [
            {"name": f"p{i}", "protocol": "TCP", "port": 2000 + i} for i in range(_HUGE_PORTS)
        ],
        "endpoints": [
            {
                "addresses": [f"10.{second_octet}.{i // 250}.{i % 250 + 1}"],
                "conditions": {"ready": True},
            }
            for i in range(_HUGE_ADDRESSES)
        ],
    }
    return [svc, slice_]


def test_services_too_big_for_the_maps_leave_the_others_served(
    node_lab: NodeLab, shared: dict[str, lab.PodState]
) -> None:
    """Two huge Services overflow the backend map: the one that does not fit is
    reported, naming the map to raise, and a small Service applied after them is
    still written and connects (one frontend that cannot be written must not keep
    every one after it out of the maps, pass after pass)."""
    huge = [*huge_service("huge-a", second_octet=50), *huge_service("huge-b", second_octet=51)]
    small = service("small")
    with node_lab.api as client:
        client.post("/v1/objects/apply", {"objects": huge})
    try:
        deadline = time.monotonic() + 120
        while not (status := node_lab.get("/v1/services/status")).get("last_error"):
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        error = str(status["last_error"])
        assert "max_entries" in error and "datapath.toml" in error, error
        with node_lab.api as client:
            client.post("/v1/objects/apply", {"objects": [small]})
        vip = cluster_ip(node_lab, "small")
        deadline = time.monotonic() + 15
        while True:
            try:
                tcp_ask(shared["client"], vip, 80)
                break
            except OSError:
                assert time.monotonic() < deadline, node_lab.get("/v1/services/status")
                time.sleep(0.5)
    finally:
        with node_lab.api as client:
            client.post("/v1/objects/delete", {"objects": [*huge, small], "ignore_missing": True})
        # 200,000 backends leave the maps: the next test finds the loop caught up.
        settle_services(node_lab, timeout=120)


def test_a_connected_udp_socket_to_a_deleted_backend_is_not_left_sending_into_nothing(
    node_lab: NodeLab, shared: dict[str, lab.PodState]
) -> None:
    """A client's connected UDP socket to a ClusterIP (a resolver's, say) got one
    backend; that backend pod is deleted. Its next exchange must either reach the
    backend left or fail with an error the application can act on, not time out
    for ever."""
    everyone = service("all", selector={"role": "shared"})
    apply(node_lab, everyone)
    try:
        settle_services(node_lab)
        vip = cluster_ip(node_lab, "all")
        with enter_netns(f"/run/netns/{shared['client'].netns}"):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            sock.settimeout(2.0)
            sock.connect((vip, 80))
            sock.send(b"who")
            first = sock.recv(64).decode()
            gone = next(p for p in ("web1", "web2") if str(shared[p].ip) == first)
            stayer = "web2" if gone == "web1" else "web1"
            node_lab.cni(shared[gone], "DEL")
            apply(node_lab, pod_object(shared[gone], app="gone"))
            settle_services(node_lab)
            try:
                sock.send(b"who")
                answer = sock.recv(64).decode()
            except TimeoutError:
                pytest.fail("the socket still sends to the deleted backend, silently")
            except OSError:
                return  # ended with an error: the application connects again
            assert answer == str(shared[stayer].ip)
    finally:
        delete(node_lab, everyone)


def test_a_service_whose_backends_are_all_terminating_still_serves_through_them(
    node_lab: NodeLab, shared: dict[str, lab.PodState]
) -> None:
    """Every endpoint of the slice is terminating but still serving (a rollout's
    last pods): as kube-proxy (ProxyTerminatingEndpoints) and Cilium, new
    connections go to them rather than being refused; one not serving takes none."""
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "draining", "namespace": "default"},
        "spec": {"ports": [{"name": "tcp", "protocol": "TCP", "port": 80}]},
    }
    slice_ = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "draining-1",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": "draining"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "tcp", "protocol": "TCP", "port": 8080}],
        "endpoints": [
            {
                "addresses": [str(shared["web1"].ip)],
                "conditions": {"ready": False, "serving": True, "terminating": True},
            },
            {
                "addresses": [str(shared["web2"].ip)],
                "conditions": {"ready": False, "serving": False, "terminating": True},
            },
        ],
    }
    apply(node_lab, svc, slice_)
    try:
        settle_services(node_lab)
        vip = cluster_ip(node_lab, "draining")
        answers = {tcp_ask(shared["client"], vip, 80)[0] for _ in range(10)}
        assert answers == {str(shared["web1"].ip)}
    finally:
        delete(node_lab, svc, slice_)


def test_a_cluster_ip_connects_throughout_an_agent_killed_and_restarted(
    fresh_lab: NodeLab,
) -> None:
    """SIGKILL of the agent with Services in force, then a start on the pinned maps
    and links: connections to the ClusterIP made all along (socket LB, no agent in
    the path) reach the backend, and a Service deleted through the agent just
    started leaves the maps (the restarted loop knows what it had written).
    None is refused: the refusals once seen under load came in the first
    milliseconds, before the kill took effect, from the backend, which said
    ready before it listened (whoami_peer.py binds first now)."""
    node_lab = fresh_lab
    client, web = node_lab.pod("client"), node_lab.pod("web")
    apply(node_lab, pod_object(client, app="client"), pod_object(web, app="web"))
    node_lab.add(client)
    node_lab.add(web)
    doomed = service("doomed")
    apply(node_lab, service("web"), doomed)
    settle_services(node_lab)
    vip, doomed_vip = cluster_ip(node_lab, "web"), cluster_ip(node_lab, "doomed")
    answers: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def keep_connecting() -> None:
        while not stop.is_set():
            try:
                answers.append(tcp_ask(client, vip, 80)[0])
            except OSError as exc:
                failures.append(repr(exc))

    with whoami(web):
        thread = threading.Thread(target=keep_connecting)
        thread.start()
        try:
            lab.stop_agent(node_lab.node, kill=True)
            lab.start_agent(node_lab.node)
            node_lab.state.save()
            delete(node_lab, doomed)
            settle_services(node_lab)
            time.sleep(0.5)
            stop.set()
            thread.join()
            assert tcp_ask(client, vip, 80)[0] == str(web.ip)  # and after it, each time
        finally:
            stop.set()
            thread.join()
    assert answers and not failures, failures[:3]
    assert set(answers) == {str(web.ip)}
    in_maps = {entry["frontend"].split(":")[0] for entry in node_lab.get("/v1/bpf/lb")}
    assert vip in in_maps and doomed_vip not in in_maps
