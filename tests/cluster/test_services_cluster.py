"""Services across a 3-node cluster lab: a backend pod and a client pod on every
node, the EndpointSlices made by the operator from the endpoints every agent
publishes, each agent balancing in its own datapath. ClusterIP from every node to
backends on every node; NodePort from a client in the ToR namespace to every node,
reaching local and remote backends; ClientIP affinity; backends following pods
added and deleted; policy applied to the backend."""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from ciliate.control.agent.client import AgentClient
from ciliate.control.lab import lab
from ciliate.loader import cgroup2_root
from tests.node.test_services import TARGET_PORT, tcp_ask

PEER = Path(__file__).parents[1] / "node" / "whoami_peer.py"

pytestmark = pytest.mark.skipif(cgroup2_root() is None, reason="no cgroup v2 hierarchy mounted")

# From the ToR: N connections, each from a new source port, answering who served.
TOR_CLIENT = """
import json, socket, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
seen = []
for _ in range(count):
    with socket.create_connection((host, port), timeout=2) as s:
        seen.append(s.recv(64).decode())
print(json.dumps(seen))
"""


class Cluster:
    def __init__(self, state: lab.LabState) -> None:
        self.state = state
        self.clients = [AgentClient(node.socket) for node in state.nodes]
        self.servers: dict[str, subprocess.Popen[str]] = {}
        self.web: dict[str, lab.PodState] = {}
        self.client_pods: dict[str, lab.PodState] = {}

    def call(self, method: str, path: str, body: Any = None) -> Any:
        deadline = time.monotonic() + 30
        while True:
            try:
                if method == "GET":
                    return self.clients[0].get(path)
                return self.clients[0].post(path, body)
            except RuntimeError:  # etcd busy: the cluster calls answer 5xx meanwhile
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def apply(self, *objects: dict[str, Any]) -> None:
        self.call("POST", "/v1/objects/apply", {"objects": list(objects)})

    def delete(self, *objects: dict[str, Any]) -> None:
        self.call("POST", "/v1/objects/delete", {"objects": list(objects), "ignore_missing": True})

    def add_pod(self, node: lab.NodeState, name: str, app: str) -> lab.PodState:
        self.apply(pod_object(name, app))
        pod = lab.add_pod_netns(self.state, node, name)
        result = lab.cni_call(self.state, node, pod, "ADD")
        pod.ip = result["ips"][0]["address"].split("/")[0]
        self.state.save()
        if app == "web":
            proc = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    pod.netns,
                    sys.executable,
                    str(PEER),
                    pod.ip,
                    str(TARGET_PORT),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            self.servers[name] = proc
            self.web[name] = pod
        else:
            self.client_pods[name] = pod
        return pod

    def remove_pod(self, name: str) -> None:
        pod = self.web.pop(name)
        self.servers.pop(name).terminate()
        node = next(n for n in self.state.nodes if n.name == pod.node)
        lab.cni_call(self.state, node, pod, "DEL")
        self.delete(pod_object(name, "web"))

    def backends_everywhere(self, cluster_ip: str, want: set[str], timeout: float = 20) -> None:
        """Until every agent's table has exactly ``want`` behind the ClusterIP."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                tables = [c.get("/v1/services")["frontends"] for c in self.clients]
            except RuntimeError:
                tables = []
            if tables and all(
                {
                    b["ip"]
                    for f in table
                    if f["ip"] == cluster_ip and f["protocol"] == "TCP"
                    for b in f["backends"]
                }
                == want
                for table in tables
            ):
                return
            time.sleep(0.1)
        raise AssertionError(f"the agents' service tables did not reach {sorted(want)}")

    def close(self) -> None:
        for proc in self.servers.values():
            proc.terminate()
        for client in self.clients:
            client.close()


def pod_object(name: str, app: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]},
    }


def service(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "selector": {"app": "web"},
            "ports": [{"protocol": "TCP", "port": 80, "targetPort": TARGET_PORT}],
            **spec,
        },
    }


@pytest.fixture(scope="module")
def cluster(bpf_objects: str) -> Iterator[Cluster]:
    name = f"t{secrets.token_hex(3)}"
    try:
        state = lab.create_cluster(name=name, nodes=3, console=Console(quiet=True))
        made = Cluster(state)
        try:
            for i, node in enumerate(state.nodes, start=1):
                made.add_pod(node, f"web{i}", "web")
                made.add_pod(node, f"client{i}", "client")
            yield made
        finally:
            made.close()
    finally:
        lab.down(name=name, console=Console(quiet=True))


def stored(cluster: Cluster, name: str) -> dict[str, Any]:
    found: dict[str, Any] = cluster.call("GET", f"/v1/objects/services/{name}?namespace=default")
    return found


def test_a_cluster_ip_from_every_node_reaches_backends_on_every_node(cluster: Cluster) -> None:
    cluster.apply(service("web"))
    try:
        vip = stored(cluster, "web")["spec"]["clusterIP"]
        backends = {str(p.ip) for p in cluster.web.values()}
        cluster.backends_everywhere(vip, backends)
        for client in cluster.client_pods.values():
            seen = set()
            for _ in range(40):
                answer, peer = tcp_ask(client, vip, 80)
                assert peer == (vip, 80)
                seen.add(answer)
            assert seen == backends, client.node
    finally:
        cluster.delete(service("web"))


def tor_ask(cluster: Cluster, host: str, port: int, count: int) -> list[str]:
    tor = cluster.state.tor_netns
    assert tor is not None
    proc = subprocess.run(
        ["ip", "netns", "exec", tor, sys.executable, "-c", TOR_CLIENT, host, str(port), str(count)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    answers: list[str] = json.loads(proc.stdout)
    return answers


def test_a_node_port_from_outside_reaches_local_and_remote_backends_on_every_node(
    cluster: Cluster,
) -> None:
    cluster.apply(service("web-np", type="NodePort"))
    try:
        svc = stored(cluster, "web-np")
        node_port = svc["spec"]["ports"][0]["nodePort"]
        backends = {str(p.ip) for p in cluster.web.values()}
        cluster.backends_everywhere(svc["spec"]["clusterIP"], backends)
        for node in cluster.state.nodes:
            assert node.node_ip is not None
            seen = set(tor_ask(cluster, node.node_ip, node_port, 40))
            local = {str(p.ip) for p in cluster.web.values() if p.node == node.name}
            assert local <= seen and seen - local, node.name  # local and remote backends
            assert seen <= backends
    finally:
        cluster.delete(service("web-np"))


def test_client_ip_affinity_holds_across_nodes(cluster: Cluster) -> None:
    cluster.apply(service("sticky", sessionAffinity="ClientIP"))
    try:
        vip = stored(cluster, "sticky")["spec"]["clusterIP"]
        cluster.backends_everywhere(vip, {str(p.ip) for p in cluster.web.values()})
        for client in cluster.client_pods.values():
            assert len({tcp_ask(client, vip, 80)[0] for _ in range(15)}) == 1
    finally:
        cluster.delete(service("sticky"))


def test_backends_follow_pods_scaled_up_and_down(cluster: Cluster) -> None:
    cluster.apply(service("web"))
    try:
        vip = stored(cluster, "web")["spec"]["clusterIP"]
        node2 = cluster.state.nodes[1]
        extra = cluster.add_pod(node2, "web-extra", "web")
        cluster.backends_everywhere(vip, {str(p.ip) for p in cluster.web.values()})
        client = cluster.client_pods["client1"]
        for _ in range(100):
            if tcp_ask(client, vip, 80)[0] == extra.ip:
                break
        else:
            raise AssertionError("the new backend never answered")
        cluster.remove_pod("web-extra")
        cluster.backends_everywhere(vip, {str(p.ip) for p in cluster.web.values()})
        assert extra.ip not in {tcp_ask(client, vip, 80)[0] for _ in range(30)}
    finally:
        cluster.delete(service("web"))


def test_policy_still_applies_to_the_backend(cluster: Cluster) -> None:
    deny = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "web-from-client1", "namespace": "default"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "nobody"}}}]}],
        },
    }
    cluster.apply(service("web"), deny)
    try:
        vip = stored(cluster, "web")["spec"]["clusterIP"]
        cluster.backends_everywhere(vip, {str(p.ip) for p in cluster.web.values()})
        deadline = time.monotonic() + 10
        for client in cluster.client_pods.values():
            with contextlib.suppress(TimeoutError):
                while time.monotonic() < deadline:  # until every agent enforces it
                    tcp_ask(client, vip, 80)
                    time.sleep(0.1)
            with pytest.raises(TimeoutError):
                tcp_ask(client, vip, 80)
    finally:
        cluster.delete(service("web"), deny)
