"""hostPorts served by ciliate itself, no portmap: podman 4.3 runs pods on a
conflist with ciliate alone (as ``ciliate cni install`` writes it, declaring the
``portMappings`` capability), ``--publish`` reaches the agent as
``runtimeConfig.portMappings``, and the agent makes each mapping a frontend of
this node whose one backend is the pod.

Proven through real traffic: the node's namespace and another local pod (the
socket LB: no DNAT, so no reply to translate back) and a client in the ToR
namespace (the uplink's per-packet LB, as a NodePort with a local backend) each
reach the pod at nodeIP:hostPort; ``ciliate service list`` and ``ciliate bpf lb
list`` show the frontends, marked HostPort; they stay across an agent restart
(kept in the endpoint's record) and go when the container is removed; a second
pod asking for a hostPort another holds is refused (code 102, naming it) and
leaves nothing behind.

Everything lives in the test's namespaces: the node, its pods, and a ToR
namespace cabled to the node's uplink.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ciliate.control.agent.client import AgentClient
from ciliate.control.lab import lab
from ciliate.control.lab.runtime.common import (
    CommandError,
    RuntimeUnavailable,
    cni_cache_entries,
)
from ciliate.control.lab.runtime.podman import PodmanLab
from ciliate.loader import enter_netns

from . import plugins
from .helpers import assert_nothing_left, node_veths

HOST_PORT, POD_PORT = 8080, 80
UDP_HOST_PORT, UDP_POD_PORT = 5353, 53
NODE_IP, TOR_IP = "192.168.77.1", "192.168.77.254"
SERVER = ("sh", "-c", f"while true; do echo hello from the pod | nc -l -p {POD_PORT}; done")
HELLO = "hello from the pod\n"


@dataclass
class HostPortLab:
    podman: PodmanLab
    node: lab.NodeState
    node_netns: str
    tor_netns: str
    router_ip: str
    plugin_set: plugins.PluginSet

    def agent(self, path: str) -> Any:
        with AgentClient(self.node.socket) as client:
            return client.get(path)

    def host_port_frontends(self) -> list[dict[str, Any]]:
        return [f for f in self.agent("/v1/services")["frontends"] if f["type"] == "HostPort"]

    def lb_frontends(self) -> set[str]:
        return {s["frontend"] for s in self.agent("/v1/bpf/lb")}

    def cli(self, *args: str) -> str:
        return subprocess.run(
            [str(Path(sys.executable).parent / "ciliate"), *args, "--socket", self.node.socket],
            capture_output=True,
            text=True,
            check=True,
        ).stdout


def _ip(netns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", netns, *args], check=True)


@contextlib.contextmanager
def _tor_cabled_to(node_netns: str) -> Iterator[str]:
    """A ToR namespace on the node's uplink (a veth made in the lab namespaces)."""
    tor = "crt-tor-" + secrets.token_hex(3)
    node = Path(node_netns).name
    subprocess.run(["ip", "netns", "add", tor], check=True)
    try:
        _ip(node, "link", "add", "uplink", "type", "veth", "peer", "name", "down0", "netns", tor)
        _ip(node, "addr", "add", f"{NODE_IP}/24", "dev", "uplink")
        _ip(node, "link", "set", "uplink", "up")
        _ip(tor, "addr", "add", f"{TOR_IP}/24", "dev", "down0")
        _ip(tor, "link", "set", "down0", "up")
        _ip(tor, "link", "set", "lo", "up")
        yield f"/run/netns/{tor}"
    finally:
        subprocess.run(["ip", "netns", "del", tor], check=False)


@pytest.fixture
def hp(node_netns: str, tmp_path: Path) -> Iterator[HostPortLab]:
    nodes: list[lab.NodeState] = []

    @contextlib.contextmanager
    def node(netns: str, tmp: Path) -> Iterator[tuple[Path, Path]]:
        args = ("--uplink", "uplink", "--node-ip", NODE_IP)
        with lab.agent_in(netns, tmp / "ciliate", pod_cidr="10.244.63.0/24", agent_args=args) as (
            state,
            bin_dir,
            conf,
        ):
            nodes.append(state)
            yield bin_dir, conf

    with _tor_cabled_to(node_netns) as tor, plugins.ciliate(node_netns, tmp_path, node) as cni:
        conflist = json.loads((cni.conf_dir / plugins.CILIATE_CONFLIST).read_text())
        assert conflist["plugins"] == [
            {
                "type": "ciliate-cni",
                "capabilities": {"portMappings": True, "bandwidth": True},
                "agentSocket": nodes[0].socket,
            }
        ], "ciliate alone, asking for the pods' port mappings (and egress bandwidth)"
        with AgentClient(nodes[0].socket) as agent:
            router_ip = str(agent.get("/v1/status")["router_ip"])
        try:
            podman = PodmanLab(
                node_netns=node_netns,
                cni_conf_dir=cni.conf_dir,
                cni_plugin_dirs=cni.plugin_dirs,
                network=cni.network,
            )
        except RuntimeUnavailable as exc:
            pytest.skip(f"podman cannot run here: {exc}")
        with podman:
            yield HostPortLab(podman, nodes[0], node_netns, tor, router_ip, cni)


def _until(what: str, check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for the service loop's next passes (it polls every 0.1 s)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.1)


def _fetch(netns: str, address: str, port: int) -> str:
    """Connect from inside ``netns`` (this thread only) and read what is sent."""
    with enter_netns(netns), socket.create_connection((address, port), timeout=5) as conn:
        conn.settimeout(5)
        data = b""
        while chunk := conn.recv(100):
            data += chunk
        return data.decode()


def _refused(netns: str, address: str, port: int) -> bool:
    try:
        _fetch(netns, address, port)
    except ConnectionRefusedError:
        return True
    return False


def _hello(netns: str, address: str, port: int) -> str:
    """What the pod's server says through ``address``; a refusal is retried a few
    times: between two connections the server's ``nc`` is restarted by its loop,
    and a connection in that gap is reset."""
    for _ in range(20):
        try:
            return _fetch(netns, address, port)
        except ConnectionRefusedError:
            time.sleep(0.05)
    return _fetch(netns, address, port)


def _exec_hello(hp: HostPortLab, pod: str, address: str) -> str:
    """The same from inside a container (busybox nc), retried alike."""
    for _ in range(5):
        got = hp.podman.exec(pod, ["nc", "-w", "3", address, str(HOST_PORT)])
        if got.stdout:
            break
        time.sleep(0.05)
    return got.stdout


def _answers(netns: str, address: str, port: int) -> bool:
    try:
        return _fetch(netns, address, port) == HELLO
    except OSError:
        return False


def _run_web(hp: HostPortLab, *publish: str) -> str:
    """Start the server pod with ``--publish`` options; its IP once it listens
    (asked straight at the pod IP, no hostPort involved)."""
    options = [o for p in publish for o in ("--publish", p)]
    hp.podman.run("web", SERVER, *options)
    pod_ip = hp.podman.ip_of("web")
    _until("the pod's server listening", lambda: _answers(hp.node_netns, pod_ip, POD_PORT))
    return pod_ip


def _frontends(node_ips: list[str], port: int, protocol: str) -> set[str]:
    return {f"{ip}:{port}/{protocol}" for ip in node_ips}


def test_a_host_port_reaches_the_pod_from_the_node_a_local_pod_and_the_tor(
    hp: HostPortLab,
) -> None:
    baseline = node_veths(hp.node_netns)
    pod_ip = _run_web(hp, f"{HOST_PORT}:{POD_PORT}", f"{UDP_HOST_PORT}:{UDP_POD_PORT}/udp")
    hp.podman.run("client")
    node_ips = sorted([NODE_IP, hp.router_ip])
    tcp = _frontends(node_ips, HOST_PORT, "TCP")
    udp = _frontends(node_ips, UDP_HOST_PORT, "UDP")
    _until("the hostPort frontends in the maps", lambda: tcp | udp <= hp.lb_frontends())

    # The agent's table: HostPort frontends at each node address, the pod behind each.
    listed = {f["frontend"]: f for f in hp.host_port_frontends()}
    assert set(listed) == tcp | udp
    assert {b["address"] for f in listed.values() for b in f["backends"]} == {
        f"{pod_ip}:{POD_PORT}/TCP",
        f"{pod_ip}:{UDP_POD_PORT}/UDP",
    }
    assert all(f["id"] and not f["refuses"] for f in listed.values())
    table = hp.cli("service", "list")
    assert f"{NODE_IP}:{HOST_PORT}/TCP" in table and "HostPort" in table, table
    lb = json.loads(hp.cli("bpf", "lb", "list", "-o", "json"))
    served = {s["frontend"]: s for s in lb}
    assert [b["address"] for b in served[f"{NODE_IP}:{HOST_PORT}/TCP"]["backends"]] == [
        f"{pod_ip}:{POD_PORT}"
    ]
    assert served[f"{NODE_IP}:{HOST_PORT}/TCP"]["backends"][0]["local"] is True
    # No portmap here: nothing in the node's iptables.
    nat = subprocess.run(
        ["nsenter", f"--net={hp.node_netns}", "iptables-save", "-t", "nat"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    assert f"--dport {HOST_PORT}" not in nat, nat

    # The node itself, at each of its addresses (socket LB).
    for address in node_ips:
        assert _hello(hp.node_netns, address, HOST_PORT) == HELLO, address
    # Another local pod, and the pod itself (hairpin), through the node's addresses.
    for pod in ("client", "web"):
        for address in node_ips:
            assert _exec_hello(hp, pod, address) == HELLO, (pod, address)
    # A client in the ToR namespace, through the uplink (per-packet LB).
    assert _hello(hp.tor_netns, NODE_IP, HOST_PORT) == HELLO

    # Removed with the container: the frontends go, the port is closed again.
    container_netns = hp.podman.netns_of("web")
    hp.podman.rm("web")
    _until("the hostPort frontends gone", lambda: not (tcp | udp) & hp.lb_frontends())
    assert hp.host_port_frontends() == []
    assert _refused(hp.node_netns, NODE_IP, HOST_PORT)
    hp.podman.rm("client")
    assert_nothing_left(
        node_netns=hp.node_netns,
        baseline_veths=baseline,
        cni=hp.plugin_set,
        lab_leftovers=hp.podman.leftovers(),
        netns_paths=[container_netns],
    )


def test_a_second_pod_asking_for_a_held_host_port_is_refused_and_leaves_nothing(
    hp: HostPortLab,
) -> None:
    pod_ip = _run_web(hp, f"{HOST_PORT}:{POD_PORT}")
    _until("the hostPort served", lambda: bool(hp.host_port_frontends()))
    veths = node_veths(hp.node_netns)
    endpoints = hp.agent("/v1/endpoints")
    lb = hp.agent("/v1/bpf/lb")

    with pytest.raises(CommandError) as refused:
        hp.podman.run("other", SERVER, "--publish", f"{HOST_PORT}:{POD_PORT + 1}")
    message = refused.value.proc.stderr
    assert f"hostPort {HOST_PORT}/TCP is held on this node by pod web" in message, message
    # Nothing of the refused pod: no endpoint, veth, address or frontend of it.
    assert hp.agent("/v1/endpoints") == endpoints
    assert node_veths(hp.node_netns) == veths
    assert hp.agent("/v1/bpf/lb") == lb
    assert [ip for ip in _allocated(hp)] == [pod_ip]
    hp.podman.rm("other")
    assert _hello(hp.node_netns, NODE_IP, HOST_PORT) == HELLO

    # Another protocol, or another port, is not a clash.
    hp.podman.run("udp", ("sleep", "3600"), "--publish", f"{HOST_PORT}:{POD_PORT}/udp")
    _until("the UDP hostPort served", lambda: len(hp.host_port_frontends()) == 4)
    # Removed here, each by name: a container started a moment before the lab's
    # closing "rm --all" has been seen to leave its processes to the cgroup sweep.
    hp.podman.rm("udp")
    hp.podman.rm("web")
    _until("the hostPort frontends gone", lambda: not hp.host_port_frontends())


def _allocated(hp: HostPortLab) -> list[str]:
    return [e["ip"] for e in hp.agent("/v1/endpoints")]


def test_host_ports_survive_an_agent_restart_and_go_with_a_del_after_it(hp: HostPortLab) -> None:
    _run_web(hp, f"{HOST_PORT}:{POD_PORT}")
    cid = hp.podman.history[-1]
    _until("the hostPort served", lambda: bool(hp.host_port_frontends()))
    before = hp.host_port_frontends()
    [record] = hp.agent("/v1/endpoints")
    assert record["host_ports"] == [
        {"hostPort": HOST_PORT, "containerPort": POD_PORT, "protocol": "TCP", "hostIP": ""}
    ]

    lab.stop_agent(hp.node)
    lab.start_agent(hp.node)
    # The table is rebuilt from the endpoint's record, with the same ids.
    _until("the hostPort served again", lambda: bool(hp.host_port_frontends()))
    assert hp.host_port_frontends() == before
    assert _hello(hp.tor_netns, NODE_IP, HOST_PORT) == HELLO

    hp.podman.rm("web")
    _until("the hostPort gone", lambda: not hp.host_port_frontends())
    assert not {f"{NODE_IP}:{HOST_PORT}/TCP"} & hp.lb_frontends()
    assert cni_cache_entries([cid]) == []


def test_a_host_ip_limits_the_host_port_to_that_address(hp: HostPortLab) -> None:
    _run_web(hp, f"{NODE_IP}:{HOST_PORT}:{POD_PORT}")
    _until("the hostPort served", lambda: bool(hp.host_port_frontends()))
    assert [f["frontend"] for f in hp.host_port_frontends()] == [f"{NODE_IP}:{HOST_PORT}/TCP"]
    assert _hello(hp.tor_netns, NODE_IP, HOST_PORT) == HELLO
    assert _hello(hp.node_netns, NODE_IP, HOST_PORT) == HELLO
    # The node's other address is not the mapping's: nothing listens there (asked
    # a few times apart, so the server's restart gap cannot pass for a refusal).
    for _ in range(3):
        assert _refused(hp.node_netns, hp.router_ip, HOST_PORT)
        time.sleep(0.2)
    hp.podman.rm("web")
