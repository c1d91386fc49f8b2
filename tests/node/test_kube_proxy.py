"""ciliate beside a kube-proxy on one node (issue 9): with ciliate's own
service LB off (--no-service-lb), a kube-proxy-style DNAT in the node's
stack (iptables, or nftables) works for pods and for the node itself. The
backend's reply must meet the node's conntrack, which turns its source back
into the service address; delivered past the stack, the client would see
the backend's address and reset.

The proof is end to end through the real datapath: the kernel conntrack
state the programs ask about (bpf_skb_ct_lookup) is made only by real
traffic through the stack's NAT, which BPF_PROG_TEST_RUN cannot build."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from ciliate.control.lab import lab
from tests.node.conftest import NodeLab

PEER = Path(__file__).with_name("kube_proxy_peer.py")
SERVICE_IP = "10.96.0.10"
SERVICE_PORT = 80
BACKEND_PORT = 8080


def start_server(netns: str) -> subprocess.Popen[str]:
    """The backend in ``netns``: answers TCP and UDP on BACKEND_PORT."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, str(PEER), "serve", str(BACKEND_PORT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"backend in {netns} did not start: {line}{proc.stdout.read()}")
    return proc


def stop_server(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait(timeout=10)


def call(netns: str, protocol: str, address: str, port: int) -> dict[str, str]:
    """One request from ``netns``; its answer and the peer the client saw."""
    done = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, str(PEER), protocol, address, str(port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, str] = json.loads(done.stdout)
    return result


def iptables_rules(backend: str) -> list[list[str]]:
    """kube-proxy's translation in its simplest form: the pods' traffic
    (PREROUTING) and the node's own (OUTPUT), TCP and UDP."""
    return [
        f"-t nat -A {chain} -d {SERVICE_IP}/32 -p {protocol} --dport {SERVICE_PORT} "
        f"-j DNAT --to-destination {backend}:{BACKEND_PORT}".split()
        for chain in ("PREROUTING", "OUTPUT")
        for protocol in ("tcp", "udp")
    ]


def apply_iptables(netns: str, backend: str) -> None:
    for rule in iptables_rules(backend):
        subprocess.run(["ip", "netns", "exec", netns, "iptables", *rule], check=True)


def remove_iptables(netns: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "iptables", "-t", "nat", "-F"], check=True)


NFT_TABLE = "kube_proxy_test"


def apply_nftables(netns: str, backend: str) -> None:
    """The same translation as native nftables (kube-proxy's nftables mode)."""
    dnat = (
        f"ip daddr {SERVICE_IP} meta l4proto {{ tcp, udp }} th dport {SERVICE_PORT} "
        f"dnat to {backend}:{BACKEND_PORT}"
    )
    ruleset = f"""
table ip {NFT_TABLE} {{
    chain prerouting {{ type nat hook prerouting priority -100; {dnat}; }}
    chain output {{ type nat hook output priority -100; {dnat}; }}
}}
"""
    subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-f", "-"], input=ruleset, text=True, check=True
    )


def remove_nftables(netns: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "delete", "table", "ip", NFT_TABLE], check=True
    )


@pytest.fixture(scope="module")
def kp_lab(bpf_objects: str) -> Iterator[NodeLab]:
    """One node whose agent runs with --no-service-lb, two pods, the
    backend serving in the second."""
    name = f"t{secrets.token_hex(3)}"
    server = None
    try:
        state, node = lab.create(name=name)
        lab.stop_agent(node)
        node.agent_args = ["--pod-cidr", node.pod_cidr, "--no-service-lb"]
        lab.start_agent(node)
        state.save()
        node_lab = NodeLab(state, node)
        for pod_name in ("client", "backend"):
            node_lab.add(node_lab.pod(pod_name))
        server = start_server(state.pods[1].netns)
        yield node_lab
    finally:
        if server is not None:
            stop_server(server)
        lab.down(name=name, console=Console(quiet=True))


def client_and_backend(kp_lab: NodeLab) -> tuple[lab.PodState, lab.PodState]:
    client, backend = kp_lab.state.pods[:2]
    assert client.ip and backend.ip
    return client, backend


def assert_translated(result: dict[str, str], client_ip: str) -> None:
    # The client talks to the service; the backend saw the client itself.
    assert result["peer"] == f"{SERVICE_IP}:{SERVICE_PORT}"
    seen, _, payload = result["answer"].partition(" ")
    assert seen == f"{client_ip}:{result['local'].split(':')[1]}"
    assert payload == "hello"


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_a_pod_reaches_a_pod_backend_through_an_iptables_dnat(
    kp_lab: NodeLab, protocol: str
) -> None:
    client, backend = client_and_backend(kp_lab)
    apply_iptables(kp_lab.node.netns, str(backend.ip))
    try:
        result = call(client.netns, protocol, SERVICE_IP, SERVICE_PORT)
    finally:
        remove_iptables(kp_lab.node.netns)
    assert_translated(result, str(client.ip))


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_the_node_reaches_a_pod_backend_through_an_iptables_dnat(
    kp_lab: NodeLab, protocol: str
) -> None:
    _, backend = client_and_backend(kp_lab)
    netns = kp_lab.node.netns
    # A node's socket needs a route to the service before OUTPUT translates
    # it (a real node has its default route; the lab node has no uplink).
    service_route = ["ip", "-n", netns, "route", "add", "10.96.0.0/12", "dev", "cilium_host"]
    subprocess.run(service_route, check=True)
    apply_iptables(netns, str(backend.ip))
    try:
        result = call(netns, protocol, SERVICE_IP, SERVICE_PORT)
    finally:
        remove_iptables(netns)
        subprocess.run(["ip", "-n", netns, "route", "del", "10.96.0.0/12"], check=True)
    assert result["peer"] == f"{SERVICE_IP}:{SERVICE_PORT}"
    assert result["answer"].endswith(" hello")


@pytest.mark.skipif(shutil.which("nft") is None, reason="nft is not installed")
@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_a_pod_reaches_a_pod_backend_through_an_nftables_dnat(
    kp_lab: NodeLab, protocol: str
) -> None:
    client, backend = client_and_backend(kp_lab)
    apply_nftables(kp_lab.node.netns, str(backend.ip))
    try:
        result = call(client.netns, protocol, SERVICE_IP, SERVICE_PORT)
    finally:
        remove_nftables(kp_lab.node.netns)
    assert_translated(result, str(client.ip))


def test_pod_to_pod_traffic_without_a_dnat_still_connects(kp_lab: NodeLab) -> None:
    """A plain connection between the pods answers as before (that its
    packets still go past the stack is shown by tests/bpf/test_stack_nat.py)."""
    client, backend = client_and_backend(kp_lab)
    result = call(client.netns, "tcp", str(backend.ip), BACKEND_PORT)
    assert result["peer"] == f"{backend.ip}:{BACKEND_PORT}"
    assert result["answer"].startswith(f"{client.ip}:")
