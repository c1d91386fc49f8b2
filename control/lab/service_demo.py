"""The demo's service step: a ClusterIP Service in front of the web pod, its
EndpointSlice made by the agent (or the operator in a cluster), and a connection
from each other pod to the ClusterIP, answered by the web pod's address while the
client sees the service's. The policy of the step before still holds behind the
ClusterIP: the client gets in, the other pod does not."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.table import Table

from ciliate.control.agent.client import AgentClient
from ciliate.control.lab.lab import LabState, PodState
from ciliate.control.lab.policy_demo import pod_roles

SERVICE_NAME = "web"
PORT, TARGET_PORT = 80, 8080
SETTLE_TIMEOUT_S = 20.0

_SERVER = """
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    conn, _ = server.accept()
    with conn:
        conn.sendall(sys.argv[1].encode())
"""

_CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1) as s:
        peer = s.getpeername()
        print(f"{peer[0]}:{peer[1]} answered by {s.recv(64).decode()}")
except OSError as exc:
    print(f"no answer ({exc.__class__.__name__})")
"""


def service() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": SERVICE_NAME, "namespace": "default"},
        "spec": {
            "selector": {"app": "web"},
            "ports": [{"protocol": "TCP", "port": PORT, "targetPort": TARGET_PORT}],
        },
    }


@contextlib.contextmanager
def _server(pod: PodState) -> Iterator[None]:
    proc = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            pod.netns,
            sys.executable,
            "-c",
            _SERVER,
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


def _ask(pod: PodState, vip: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", pod.netns, sys.executable, "-c", _CLIENT, vip, str(PORT)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout.strip()


def show(state: LabState, console: Console) -> bool:
    """Apply the Service, wait for its backend on every node, connect from every
    other pod; whether the answers are as the policy says."""
    console.print(
        f"\n[bold]a ClusterIP service[/]: {SERVICE_NAME}:{PORT} -> app=web:{TARGET_PORT} "
        "(socket load balancing: the backend is chosen at connect)"
    )
    roles = pod_roles(state)
    web = next(p for p in state.pods if roles[p.name] == "web")
    clients = [AgentClient(node.socket) for node in state.nodes]
    try:
        clients[0].post("/v1/objects/apply", {"objects": [service()]})
        svc = clients[0].get(f"/v1/objects/services/{SERVICE_NAME}?namespace=default")
        vip = str(svc["spec"]["clusterIP"])
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while not all(
            any(f["ip"] == vip and f["backends"] for f in client.get("/v1/services")["frontends"])
            for client in clients
        ):
            if time.monotonic() > deadline:
                console.print("[red]the service got no backend in time[/]")
                return False
            time.sleep(0.1)
    finally:
        for client in clients:
            client.close()
    table = Table(title=f"connect to {vip}:{PORT} (ClusterIP of default/{SERVICE_NAME})")
    for column in ("from", "role", "the application sees", "expected"):
        table.add_column(column)
    ok = True
    with _server(web):
        for pod in state.pods:
            if pod is web:
                continue
            answer = _ask(pod, vip)
            allowed = roles[pod.name] == "client"
            want = f"{vip}:{PORT} answered by {web.ip}" if allowed else "no answer"
            good = answer == want if allowed else answer.startswith("no answer")
            ok &= good
            table.add_row(
                f"{pod.name} ({pod.ip})",
                roles[pod.name],
                answer,
                ("[green]as expected[/]" if good else "[red]NOT as expected[/]")
                + ("" if allowed else " (policy)"),
            )
    console.print(table)
    return ok
