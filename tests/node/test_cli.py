"""The CLI against a live agent: every inspection command answers, in JSON
too, with what the agent and its maps hold; monitor decodes real events."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from typing import Any

import pytest

from ciliate.control.lab import lab

from .conftest import NodeLab


def ciliate(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ciliate.control.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def as_json(node_lab: NodeLab, *args: str) -> Any:
    proc = ciliate(*args, "--socket", node_lab.node.socket, "-o", "json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def pod(node_lab: NodeLab) -> lab.PodState:
    pod = node_lab.pod("cli")
    node_lab.add(pod)
    return pod


def test_status_names_the_node_and_counts_its_endpoints(
    node_lab: NodeLab, pod: lab.PodState
) -> None:
    status = as_json(node_lab, "status")
    assert status["node"] == node_lab.node.name
    assert status["pod_cidrs"] == [node_lab.node.pod_cidr]
    assert status["endpoints"] >= 1


def test_endpoint_list_and_get_show_the_pod(node_lab: NodeLab, pod: lab.PodState) -> None:
    listed = {e["ip"]: e for e in as_json(node_lab, "endpoint", "list")}
    assert pod.ip in listed
    one = as_json(node_lab, "endpoint", "get", str(listed[pod.ip]["endpoint_id"]))
    assert one["container_id"] == pod.container_id


def test_identity_ipam_and_maps_agree_on_the_pod(node_lab: NodeLab, pod: lab.PodState) -> None:
    endpoint = next(e for e in as_json(node_lab, "endpoint", "list") if e["ip"] == pod.ip)
    identities = {i["id"]: i for i in as_json(node_lab, "identity", "list")}
    labels = identities[endpoint["identity"]]["labels"]
    assert labels == endpoint["labels"]
    assert labels["k8s:io.kubernetes.pod.namespace"] == "default"
    assert "k8s:io.kubernetes.pod.name" not in labels  # never the name: pods share identities
    assert pod.ip in as_json(node_lab, "ipam")["allocations"]
    assert pod.ip in [e["ip"] for e in as_json(node_lab, "bpf", "endpoints", "list")]
    assert f"{pod.ip}/32" in [e["prefix"] for e in as_json(node_lab, "bpf", "ipcache", "list")]
    assert node_lab.ping(pod, node_lab.router_ip)
    assert any(m["description"] == "forwarded" for m in as_json(node_lab, "bpf", "metrics", "list"))


def test_an_unknown_endpoint_id_is_a_clear_error(node_lab: NodeLab) -> None:
    proc = ciliate("endpoint", "get", "65000", "--socket", node_lab.node.socket)
    assert proc.returncode != 0 and "no endpoint with id 65000" in proc.stderr


def test_monitor_decodes_the_trace_of_a_ping(node_lab: NodeLab, pod: lab.PodState) -> None:
    router = node_lab.router_ip

    done = threading.Event()

    def ping_until_done() -> None:
        # Until the monitor has its events: on a loaded machine it may take a
        # while to start listening.
        while not done.wait(0.5):
            node_lab.ping(pod, router)

    pinger = threading.Thread(target=ping_until_done)
    pinger.start()
    try:
        proc = ciliate(
            "monitor",
            "--socket",
            node_lab.node.socket,
            "-o",
            "json",
            "--count",
            "3",
            "--timeout",
            "20",
        )
    finally:
        done.set()
        pinger.join()
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(events) == 3 and {e["type"] for e in events} == {"trace"}
    # The echo request to the stack, the reply coming in (and an ARP reply, if the
    # pod had to ask for the gateway's MAC).
    assert any("ICMP" in e["packet"] and pod.ip in e["packet"] for e in events)
