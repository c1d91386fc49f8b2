"""``ciliate get svc / endpointslices`` and ``ciliate service list`` as a user runs
them against a cluster's etcd: ClusterIPs and NodePorts allocated by the apply,
kubectl's columns, and the table computed from the objects and the endpoints the
agents published (selector services resolved as the controller would, the
user's slices for a service without selector, refusal shown)."""

from __future__ import annotations

import http.server
import json
import socketserver
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from ciliate.control.lab.etcd_server import EtcdServer

from ..cluster import etcd_fixtures

require_etcd = etcd_fixtures.require_etcd
etcd_server = etcd_fixtures.etcd_server

MANIFEST = """
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop, labels: {app: web}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.79.1.9}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: NodePort
  selector: {app: web}
  sessionAffinity: ClientIP
  ports: [{name: http, port: 80, targetPort: http, nodePort: 30080}]
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: shop}
spec:
  clusterIP: 10.96.0.50
  ports: [{name: http, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ext-1, namespace: shop, labels: {kubernetes.io/service-name: ext}}
addressType: IPv4
endpoints:
- {addresses: [192.0.2.10], conditions: {ready: true}}
- {addresses: [192.0.2.11], conditions: {ready: true}}
- {addresses: [192.0.2.12], conditions: {ready: true}}
- {addresses: [192.0.2.13], conditions: {ready: false, serving: true, terminating: true}}
ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: shop}
spec:
  clusterIP: 10.96.0.51
  selector: {app: nothing}
  ports: [{port: 80}]
"""


def ciliate(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ciliate.control.cli.main", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=60,
        check=False,
    )


def test_services_through_etcd(etcd_server: EtcdServer) -> None:
    from ciliate.control.store.etcd import EtcdStore

    target = ["--etcd-endpoint", etcd_server.endpoint]
    applied = ciliate("apply", "-f", "-", *target, stdin=MANIFEST)
    assert applied.returncode == 0, applied.stderr
    # web-0 has no status.podIP: its address comes from the endpoint its agent published.
    with EtcdStore([etcd_server.endpoint]) as store, store.transaction() as txn:
        txn.put_json(
            "cluster/endpoints/10.79.0.5", {"identity": 300, "node": "node-a", "pod": "shop/web-0"}
        )
        txn.put_json("cluster/nodes/node-a", {"name": "node-a", "nodeIP": "192.168.10.1"})

    table = ciliate("get", "svc", "-n", "shop", *target)
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines()}
    assert rows["NAME"] == ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "SELECTOR"]
    assert rows["web"][1] == "NodePort" and rows["web"][4:] == ["80:30080/TCP", "app=web"]
    assert rows["web"][2].startswith("10.") and rows["ext"][2] == "10.96.0.50"
    slices = ciliate("get", "endpointslices", "-n", "shop", *target)
    assert slices.stdout.splitlines()[1].split() == [
        "ext-1",
        "IPv4",
        "80",
        "192.0.2.10,192.0.2.11,192.0.2.12",
        "+",
        "1",
        "more...",
    ]

    listed = ciliate("service", "list", *target, "-o", "json")
    assert listed.returncode == 0, listed.stderr
    frontends = {f["frontend"]: f for f in json.loads(listed.stdout)["frontends"]}
    web_ip = rows["web"][2]
    web = frontends[f"{web_ip}:80/TCP"]
    assert [(b["address"], b["node"]) for b in web["backends"]] == [
        ("10.79.0.5:8080/TCP", "node-a"),
        ("10.79.1.9:8080/TCP", None),
    ]
    assert web["affinity_timeout"] == 10800
    assert frontends["0.0.0.0:30080/TCP"]["type"] == "NodePort"
    ext = frontends["10.96.0.50:80/TCP"]
    assert [(b["address"], b["state"], b["new_flows"]) for b in ext["backends"]][-1] == (
        "192.0.2.13:80/TCP",
        "terminating",
        False,
    )
    assert frontends["10.96.0.51:80/TCP"]["refuses"]

    text = ciliate("service", "list", *target, "--node", "node-a")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].split() == ["ID", "FRONTEND", "TYPE", "SERVICE", "BACKENDS"]
    assert any("192.168.10.1:30080/TCP" in line for line in lines)
    assert any("10.96.0.51:80/TCP" in line and "REFUSES" in line for line in lines)
    assert any(line.strip().startswith("192.0.2.13:80/TCP (terminating") for line in lines)

    unknown = ciliate("service", "list", *target, "--node", "node-z")
    assert unknown.returncode == 1 and "node 'node-z' is not in the cluster" in unknown.stderr

    deleted = ciliate("delete", "svc", "web", "-n", "shop", *target)
    assert deleted.returncode == 0, deleted.stderr
    after: list[dict[str, Any]] = json.loads(
        ciliate("service", "list", *target, "-o", "json").stdout
    )["frontends"]
    assert not any(f["service"] == "shop/web" for f in after)


class _UnixHttpServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def serve_get(socket_path: Path, routes: dict[str, Any]) -> _UnixHttpServer:
    """GET routes on a UNIX socket, answering JSON (404 elsewhere): the agent's side
    of the contract until the lead adds ``GET /v1/services`` to the agent."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            found = routes.get(self.path)
            body = json.dumps(found if found is not None else {"detail": "Not Found"}).encode()
            self.send_response(200 if found is not None else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = _UnixHttpServer(str(socket_path), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_service_list_through_an_agent_shows_its_ids(tmp_path: Path) -> None:
    from ciliate.control.objects import ObjectStore
    from ciliate.control.services import node
    from ciliate.control.services.ids import LbIds
    from ciliate.control.store import SqliteStore

    with SqliteStore(tmp_path / "state.db") as store:
        objects = ObjectStore(store)
        objects.apply(
            [
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": "ext"},
                    "spec": {"clusterIP": "10.96.0.50", "ports": [{"port": 80}]},
                },
                {
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {"name": "ext-1", "labels": {"kubernetes.io/service-name": "ext"}},
                    "addressType": "IPv4",
                    "endpoints": [{"addresses": ["192.0.2.10"], "nodeName": "node-a"}],
                    "ports": [{"port": 8080}],
                },
            ]
        )
        body = node.compute(objects, LbIds(store), node_name="node-a", node_ips=[]).to_json()
    socket_path = tmp_path / "agent.sock"
    server = serve_get(socket_path, {"/v1/services": body})
    try:
        shown = ciliate("service", "list", "--socket", str(socket_path))
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.splitlines()[1].split() == [
            "1",
            "10.96.0.50:80/TCP",
            "ClusterIP",
            "default/ext",
            "1",
            "=>",
            "192.0.2.10:8080/TCP",
            "(active,",
            "node-a)",
        ]
    finally:
        server.shutdown()
        server.server_close()
    older = tmp_path / "older.sock"
    server = serve_get(older, {})
    try:
        refused = ciliate("service", "list", "--socket", str(older))
        assert refused.returncode == 1
        assert "does not serve /v1/services (older agent)" in refused.stderr
    finally:
        server.shutdown()
        server.server_close()
