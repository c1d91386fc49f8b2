"""CNI GC is per network (spec 1.1: "the plugin should remove any resources
related to attachments for this network not in cni.dev/valid-attachments"):
two conflists whose plugin is ciliate-cni share one agent, and the GC of one
network must not collect the other's pods. Real agent, real shim, real pods."""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from ciliate.control.agent.client import AgentClient
from ciliate.control.lab import lab

from .conftest import cni_env, run_shim

SECOND_NETWORK = "second-net"


@pytest.fixture(scope="module")
def node(bpf_objects: str) -> Iterator[tuple[lab.LabState, lab.NodeState]]:
    name = f"t{secrets.token_hex(3)}"
    try:
        yield lab.create(name=name)
    finally:
        lab.down(name=name, console=Console(quiet=True))


def _conf(node: lab.NodeState, network: str, **fields: Any) -> dict[str, Any]:
    return {
        "cniVersion": "1.1.0",
        "name": network,
        "type": "ciliate-cni",
        "agentSocket": node.socket,
        **fields,
    }


def _call(
    state: lab.LabState, node: lab.NodeState, command: str, conf: dict[str, Any], **env: str
) -> subprocess.CompletedProcess[bytes]:
    proc = run_shim(Path(state.bin_dir) / "ciliate-cni", cni_env(command, **env), conf)
    assert proc.returncode == 0, proc.stdout
    return proc


def _endpoints(node: lab.NodeState) -> dict[str, str]:
    """container ID -> the network its endpoint belongs to."""
    with AgentClient(node.socket) as client:
        return {e["container_id"]: e["network"] for e in client.get("/v1/endpoints")}


def _attachments(containers: list[str]) -> list[dict[str, str]]:
    return [{"containerID": c, "ifname": "eth0"} for c in containers]


def test_gc_of_one_network_leaves_the_other_networks_pods(
    node: tuple[lab.LabState, lab.NodeState],
) -> None:
    state, node_state = node
    first = lab.add_pod_netns(state, node_state, f"a{secrets.token_hex(2)}")
    second = lab.add_pod_netns(state, node_state, f"b{secrets.token_hex(2)}")
    lab.cni_call(state, node_state, first, "ADD", cni_version="1.1.0")  # the lab's "ciliate"
    second_env = {
        "CNI_CONTAINERID": second.container_id,
        "CNI_NETNS": f"/run/netns/{second.netns}",
        "CNI_ARGS": f"K8S_POD_NAMESPACE={second.namespace};K8S_POD_NAME={second.name}",
    }
    added = _call(state, node_state, "ADD", _conf(node_state, SECOND_NETWORK), **second_env)
    assert json.loads(added.stdout)["interfaces"][1]["name"] == "eth0"
    endpoints = _endpoints(node_state)
    assert endpoints[first.container_id] == "ciliate"
    assert endpoints[second.container_id] == SECOND_NETWORK

    # The runtime's GC of "ciliate" lists that network's attachments only.
    ciliate_pods = [c for c, net in endpoints.items() if net == "ciliate"]
    valid = _attachments(ciliate_pods)
    _call(
        state,
        node_state,
        "GC",
        _conf(node_state, "ciliate", **{"cni.dev/valid-attachments": valid}),
    )
    endpoints = _endpoints(node_state)
    assert first.container_id in endpoints, "its own network's listed pod is kept"
    assert second.container_id in endpoints, "the second network's pod was collected"

    # The second network's GC, its pod no longer listed: that one goes, only that one.
    _call(
        state,
        node_state,
        "GC",
        _conf(node_state, SECOND_NETWORK, **{"cni.dev/valid-attachments": []}),
    )
    endpoints = _endpoints(node_state)
    assert second.container_id not in endpoints
    assert first.container_id in endpoints
    with AgentClient(node_state.socket) as client:
        allocated = client.get("/v1/ipam")["allocations"]
    assert second.container_id not in json.dumps(allocated), "its IP is given back"
    lab.cni_call(state, node_state, first, "DEL")
