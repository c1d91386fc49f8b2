"""Node integration fixtures: a real node namespace running a real agent,
pods as namespaces networked by ``ciliate-cni`` called as a runtime calls
it. Each lab is removed (namespaces, agent, pins, files) at teardown."""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from rich.console import Console

from ciliate.control.agent.client import AgentClient
from ciliate.control.lab import lab


@dataclass
class NodeLab:
    state: lab.LabState
    node: lab.NodeState

    @property
    def api(self) -> AgentClient:
        return AgentClient(self.node.socket)

    def pod(self, name: str | None = None) -> lab.PodState:
        return lab.add_pod_netns(self.state, self.node, name or f"p{secrets.token_hex(2)}")

    def cni(self, pod: lab.PodState, command: str, **kwargs: Any) -> dict[str, Any]:
        return lab.cni_call(self.state, self.node, pod, command, **kwargs)

    def add(self, pod: lab.PodState, **kwargs: Any) -> dict[str, Any]:
        result = self.cni(pod, "ADD", **kwargs)
        pod.ip = result["ips"][0]["address"].split("/")[0]
        return result

    def get(self, path: str) -> Any:
        with self.api as client:
            return client.get(path)

    def host_links(self) -> list[str]:
        out = subprocess.run(
            ["ip", "-n", self.node.netns, "-j", "link", "show"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return sorted(link["ifname"] for link in json.loads(out))

    def pod_links(self) -> list[str]:
        return [name for name in self.host_links() if name.startswith("lxc")]

    def wait_pod_links(self, expected: int, timeout: float = 5) -> list[str]:
        """Veths are deleted just after DEL answers (see EndpointManager)."""
        deadline = time.monotonic() + timeout
        while len(links := self.pod_links()) != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        return links

    def routes(self) -> list[str]:
        out = subprocess.run(
            ["ip", "-n", self.node.netns, "route", "show"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return [line for line in out.splitlines() if line.strip()]

    def ping(self, pod: lab.PodState, address: str) -> bool:
        return lab.ping(pod.netns, address)

    @property
    def router_ip(self) -> str:
        return str(self.get("/v1/status")["router_ip"])


def _lab(pod_cidr: str | None = None) -> Iterator[NodeLab]:
    name = f"t{secrets.token_hex(3)}"
    try:
        state, node = lab.create(name=name, pod_cidr=pod_cidr)
        yield NodeLab(state, node)
    finally:
        lab.down(name=name, console=Console(quiet=True))


@pytest.fixture(scope="module")
def node_lab(bpf_objects: str) -> Iterator[NodeLab]:
    """One node shared by a module's tests (tests clean up their pods)."""
    yield from _lab()


@pytest.fixture
def fresh_lab(bpf_objects: str) -> Iterator[NodeLab]:
    """A node of its own, for tests that stop, kill or restart the agent."""
    yield from _lab()


@pytest.fixture
def tiny_lab(bpf_objects: str) -> Iterator[NodeLab]:
    """A node whose pod CIDR (/29) holds five pods."""
    yield from _lab("10.244.9.0/29")


def restart_agent(
    lab_: NodeLab, *, kill: bool = False, env: dict[str, str] | None = None, wait: bool = True
) -> None:
    """Stop (SIGTERM, or SIGKILL) the node's agent and start it again."""
    lab.stop_agent(lab_.node, kill=kill)
    lab.start_agent(lab_.node, env=env, wait=wait)
    lab_.state.save()  # `down` must find the new pid
