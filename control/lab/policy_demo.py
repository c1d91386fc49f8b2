"""The demo's policy step: the lab's pods get Pod objects with labels (the first
``app=web``, then ``app=client`` and ``app=other`` in turn), a NetworkPolicy lets
only clients into the web pod, and the connectivity table is taken again. What
changed is exactly what the policy says: every pod but the clients loses the web
pod; everything else still connects (the web pod's own traffic, replies included,
is not isolated)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.syntax import Syntax

from ciliate.control.agent.client import AgentClient
from ciliate.control.lab.lab import LabState, connectivity, print_connectivity

POLICY_NAME = "web-from-clients"
SETTLE_TIMEOUT_S = 10.0


def pod_roles(state: LabState) -> dict[str, str]:
    """Pod name -> its ``app`` label."""
    roles = {}
    for i, pod in enumerate(state.pods):
        roles[pod.name] = "web" if i == 0 else ("client" if i % 2 else "other")
    return roles


def objects(state: LabState) -> list[dict[str, Any]]:
    roles = pod_roles(state)
    pods: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod.name,
                "namespace": "default",
                "labels": {"app": roles[pod.name]},
            },
            "spec": {"containers": [{"name": "main", "image": "busybox"}]},
        }
        for pod in state.pods
    ]
    return [*pods, policy()]


def policy() -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": POLICY_NAME, "namespace": "default"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]}],
        },
    }


def expected(state: LabState, before: dict[tuple[str, str], bool]) -> dict[tuple[str, str], bool]:
    roles = pod_roles(state)
    web = next(name for name, role in roles.items() if role == "web")
    return {
        (src, dst): ok and (dst != web or roles.get(src) == "client")
        for (src, dst), ok in before.items()
    }


def show(state: LabState, console: Console, before: dict[tuple[str, str], bool]) -> bool:
    """Apply the policy, wait for every agent, print the table again; whether the
    pairs are exactly what the policy says."""
    import yaml

    console.print(
        "\n[bold]network policy[/]: only app=client may reach app=web "
        "(`ciliate apply -f`, through the agent)"
    )
    console.print(Syntax(yaml.safe_dump(policy(), sort_keys=False), "yaml"))
    clients = [AgentClient(node.socket) for node in state.nodes]
    try:
        clients[0].post("/v1/objects/apply", {"objects": objects(state)})
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while not all(c.get("/v1/policy")["pending"] is False for c in clients):
            if time.monotonic() > deadline:
                console.print("[red]the agents did not apply the policy in time[/]")
                return False
            time.sleep(0.05)
    finally:
        for client in clients:
            client.close()
    after = connectivity(state)
    if not print_connectivity(
        state,
        after,
        console,
        title="connectivity with the policy",
        expected=expected(state, before),
    ):
        return False
    roles = pod_roles(state)
    console.print(
        "as the policy says: "
        + ", ".join(f"{name}={role}" for name, role in roles.items())
        + f"; `ciliate policy trace --src default/{state.pods[-1].name} "
        f"--dst default/{state.pods[0].name} --dport 80/tcp --socket {state.nodes[0].socket}`"
        " says why"
    )
    return True
