"""``ciliate lab up|down``: a node (network namespace) running its agent,
pods (namespaces) created through ``ciliate-cni`` invoked exactly as a
container runtime invokes it, an all-pairs connectivity table, and a
``down`` that removes every namespace, veth, pin, process and file it made.

All of it lives in namespaces named with a per-run prefix; nothing touches
the root namespace's addresses, routes or firewall. What was created is
recorded in ``/run/ciliate-lab/<lab>/lab.json`` as it is created, so
``down`` also cleans up after a failed ``up``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ciliate.control.agent.client import AgentClient
from ciliate.control.process import stop_child

LAB_ROOT = Path("/run/ciliate-lab")
CNI_VERSION = "1.0.0"


class LabError(RuntimeError):
    pass


@dataclass
class NodeState:
    name: str
    netns: str
    pod_cidr: str
    socket: str
    state_dir: str
    bpffs_root: str
    conf_dir: str
    log: str
    agent_pid: int | None = None
    node_ip: str | None = None
    agent_args: list[str] = field(default_factory=list)  # cluster mode: instead of --pod-cidr


@dataclass
class PodState:
    name: str
    node: str
    netns: str
    container_id: str
    ip: str | None = None
    namespace: str = "default"  # the Kubernetes namespace the runtime names (CNI_ARGS)


@dataclass
class LabState:
    name: str
    prefix: str
    directory: str
    bin_dir: str
    nodes: list[NodeState] = field(default_factory=list)
    pods: list[PodState] = field(default_factory=list)
    tor_netns: str | None = None
    fabric_pid: int | None = None
    node_grace_period: float | None = None  # the operator's; None: its default

    def save(self) -> None:
        path = Path(self.directory) / "lab.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, name: str) -> LabState | None:
        path = LAB_ROOT / name / "lab.json"
        if not path.exists():
            return None
        doc = json.loads(path.read_text())
        return cls(
            name=doc["name"],
            prefix=doc["prefix"],
            directory=doc["directory"],
            bin_dir=doc["bin_dir"],
            nodes=[NodeState(**n) for n in doc["nodes"]],
            pods=[PodState(**p) for p in doc["pods"]],
            tor_netns=doc.get("tor_netns"),
            fabric_pid=doc.get("fabric_pid"),
            node_grace_period=doc.get("node_grace_period"),
        )


def _run(
    *cmd: str, check: bool = True, input: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, input=input, env=env, check=False)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(cmd)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _netns_add(name: str) -> None:
    _run("ip", "netns", "add", name)
    _run("ip", "-n", name, "link", "set", "lo", "up")


# -- the CNI plugin, as a runtime calls it ------------------------------------------


def cni_call(
    state: LabState,
    node: NodeState,
    pod: PodState,
    command: str,
    *,
    cni_version: str | None = None,
    prev_result: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``ciliate-cni`` as libcni does; raise CniCallError on a CNI error."""
    conflist = json.loads((Path(node.conf_dir) / "05-ciliate.conflist").read_text())
    # What libcni sends a plugin: its entry of the conflist plus name and cniVersion
    # (and, for CHECK and DEL, the cached result of the ADD).
    netconf = {
        **conflist["plugins"][0],
        "name": conflist["name"],
        "cniVersion": cni_version or conflist["cniVersion"],
    }
    if prev_result is not None:
        netconf["prevResult"] = prev_result
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": pod.container_id,
        "CNI_NETNS": f"/run/netns/{pod.netns}",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod.namespace};K8S_POD_NAME={pod.name}",
        "CNI_PATH": state.bin_dir,
    }
    proc = _run(
        str(Path(state.bin_dir) / "ciliate-cni"), check=False, input=json.dumps(netconf), env=env
    )
    out: dict[str, Any] = json.loads(proc.stdout) if proc.stdout.strip() else {}
    if proc.returncode != 0:
        raise CniCallError(command, pod.name, out)
    return out


class CniCallError(LabError):
    def __init__(self, command: str, pod: str, error: dict[str, Any]) -> None:
        super().__init__(f"CNI {command} of {pod}: code {error.get('code')}: {error.get('msg')}")
        self.code = error.get("code")
        self.error = error


# -- up ------------------------------------------------------------------------------


def create(
    *, name: str, console: Console | None = None, pod_cidr: str | None = None
) -> tuple[LabState, NodeState]:
    """A lab with one node and its agent, no pods yet (for tests and benchmarks)."""
    if LabState.load(name) is not None:
        raise LabError(f"lab {name!r} is up: run `ciliate lab down --name {name}` first")
    directory = LAB_ROOT / name
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    state = LabState(
        name=name,
        prefix=f"cl{secrets.token_hex(2)}",
        directory=str(directory),
        bin_dir=str(directory / "cni" / "bin"),
    )
    state.save()
    node = _start_node(state, index=1, console=console or Console(quiet=True), pod_cidr=pod_cidr)
    return state, node


def add_pod_netns(
    state: LabState, node: NodeState, name: str, *, namespace: str = "default"
) -> PodState:
    """A pod namespace (not yet networked), recorded for `down`; ``namespace`` is
    the Kubernetes namespace the runtime will name in CNI_ARGS."""
    netns = f"{node.netns}-{name}" if namespace == "default" else f"{node.netns}-{namespace}-{name}"
    pod = PodState(
        name=name,
        node=node.name,
        netns=netns,
        container_id=secrets.token_hex(32),
        namespace=namespace,
    )
    _netns_add(pod.netns)
    state.pods.append(pod)
    state.save()
    return pod


def up(
    *,
    name: str,
    pods: int,
    console: Console,
    nodes: int = 1,
    node_grace_period: float | None = None,
) -> LabState:
    """One node (``nodes=1``) or a cluster; ``pods`` pods on every node.
    ``node_grace_period``: the operator's (see ``kill_node``)."""
    if pods < 1:
        raise LabError("--pods must be at least 1")
    if nodes < 1:
        raise LabError("--nodes must be at least 1")
    if nodes == 1:
        state, first = create(name=name, console=console)
        node_list = [first]
    else:
        state = create_cluster(
            name=name, nodes=nodes, console=console, node_grace_period=node_grace_period
        )
        node_list = list(state.nodes)
    placement = [node for _ in range(pods) for node in node_list]
    with console.status("creating pods through ciliate-cni ..."):
        for i, node in enumerate(placement, start=1):
            pod = add_pod_netns(state, node, f"pod{i}")
            started = time.perf_counter()
            result = cni_call(state, node, pod, "ADD")
            pod.ip = result["ips"][0]["address"].split("/")[0]
            state.save()
            console.print(
                f"  {pod.name}: {pod.ip} on {result['interfaces'][0]['name']} "
                f"(CNI ADD {1000 * (time.perf_counter() - started):.1f} ms)"
            )
    return state


def start_agent(
    node: NodeState, *, env: dict[str, str] | None = None, wait: bool = True
) -> subprocess.Popen[bytes]:
    """Start (or restart) a node's agent inside the node's namespace."""
    log = open(node.log, "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [
            "nsenter",
            f"--net=/run/netns/{node.netns}",
            sys.executable,
            "-m",
            "ciliate.control.agent.main",
            "--node-name",
            node.name,
            *(node.agent_args or ["--pod-cidr", node.pod_cidr]),
            "--state-dir",
            node.state_dir,
            "--socket",
            node.socket,
            "--bpffs-root",
            node.bpffs_root,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    log.close()
    node.agent_pid = proc.pid
    if wait:
        _wait_healthy(node, proc)
    return proc


def stop_agent(node: NodeState, *, kill: bool = False) -> None:
    """SIGTERM (or SIGKILL) the node's agent and wait for it to exit."""
    if node.agent_pid is None:
        return
    if kill:
        with contextlib.suppress(ProcessLookupError):
            os.kill(node.agent_pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(node.agent_pid, 0)
    else:
        _stop(node.agent_pid, node.socket)
    node.agent_pid = None


# -- a cluster: a top-of-rack namespace (bridge, etcd, operator, bird), nodes on it ---------

FABRIC = ipaddress.IPv4Network("192.168.100.0/24")
TOR_IP = FABRIC[1]
CLUSTER_CIDR = "10.244.0.0/16"


def create_cluster(
    *, name: str, nodes: int, console: Console, node_grace_period: float | None = None
) -> LabState:
    """A ToR namespace (a bridge for the fabric, etcd, the operator, bird)
    and ``nodes`` node namespaces cabled to it, each running its agent in
    cluster mode: pod CIDRs from the operator, announced over BGP."""
    from ciliate.control.lab.fabric import ETCD_PORT, TOR_AS

    if LabState.load(name) is not None:
        raise LabError(f"lab {name!r} is up: run `ciliate lab down --name {name}` first")
    if node_grace_period is not None and node_grace_period < 0:
        raise LabError("--node-grace-period must be 0 or more seconds")
    directory = LAB_ROOT / name
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    prefix = f"cl{secrets.token_hex(2)}"
    tor = f"{prefix}-tor"
    state = LabState(
        name=name,
        prefix=prefix,
        directory=str(directory),
        bin_dir=str(directory / "cni" / "bin"),
        tor_netns=tor,
        node_grace_period=node_grace_period,
    )
    state.save()
    _netns_add(tor)
    _run("ip", "-n", tor, "link", "add", "fabric", "type", "bridge")
    _run("ip", "-n", tor, "addr", "add", f"{TOR_IP}/{FABRIC.prefixlen}", "dev", "fabric")
    _run("ip", "-n", tor, "link", "set", "fabric", "up")
    specs = []
    for i in range(1, nodes + 1):
        node_ip, asn, netns = _cable_node(state, i)
        specs.append((f"node{i}", netns, node_ip, asn))
    fabric_dir = directory / "fabric"
    with console.status("starting etcd, the operator and bird in the ToR namespace ..."):
        log = open(directory / "fabric.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ciliate.control.lab.fabric",
                "--netns",
                tor,
                "--workdir",
                str(fabric_dir),
                "--tor-ip",
                str(TOR_IP),
                "--cluster-cidr",
                CLUSTER_CIDR,
                "--mask-size",
                "24",
                *(
                    ["--node-grace-period", str(node_grace_period)]
                    if node_grace_period is not None
                    else []
                ),
                *[a for n, _, ip, asn in specs for a in ("--node", f"{n}={ip}:{asn}")],
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        state.fabric_pid = proc.pid
        state.save()
        deadline = time.monotonic() + 60
        while not (fabric_dir / "ready").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (directory / "fabric.log").read_text()[-2000:]
                raise LabError(f"the fabric did not come up:\n{tail}")
            time.sleep(0.1)
    console.print(
        f"ToR {tor}: bridge {TOR_IP}/{FABRIC.prefixlen}, etcd "
        f"http://{TOR_IP}:{ETCD_PORT}, operator, bird AS {TOR_AS}"
    )
    for index, (node_name, netns, node_ip, asn) in enumerate(specs, start=1):
        node = _start_node(
            state,
            index=index,
            console=console,
            agent_args=_cluster_agent_args(node_ip, asn),
            netns=netns,
            node_ip=str(node_ip),
        )
        _record_pod_cidr(state, node)
        console.print(
            f"{node_name}: netns {netns}, {node_ip} AS {asn}, pod CIDR "
            f"{node.pod_cidr} (from the operator), agent pid {node.agent_pid}"
        )
    return state


def stop_etcd(state: LabState, *, timeout: float = 30) -> None:
    """Stop the cluster's etcd (the fabric keeps running) until :func:`start_etcd`."""
    _signal_etcd(state, signal.SIGUSR1, "stopped", timeout=timeout)


def start_etcd(state: LabState, *, timeout: float = 60) -> None:
    """Start the etcd :func:`stop_etcd` stopped (same data) and wait until it serves."""
    _signal_etcd(state, signal.SIGUSR2, "running", timeout=timeout)


def _signal_etcd(state: LabState, sig: signal.Signals, want: str, *, timeout: float) -> None:
    if state.fabric_pid is None or not _alive(state.fabric_pid):
        raise LabError(f"lab {state.name!r} has no fabric running (a cluster lab has one)")
    marker = Path(state.directory) / "fabric" / "etcd-state"
    # Cleared first: the fabric writes the marker once the new state holds.
    marker.unlink(missing_ok=True)
    os.kill(state.fabric_pid, sig)
    deadline = time.monotonic() + timeout
    while not (marker.exists() and marker.read_text() == want):
        if time.monotonic() > deadline or not _alive(state.fabric_pid):
            raise LabError(
                f"etcd of lab {state.name!r} not {want} within {timeout:.0f} s "
                f"(see {Path(state.directory) / 'fabric.log'})"
            )
        time.sleep(0.05)


def _cable_node(state: LabState, index: int) -> tuple[ipaddress.IPv4Address, int, str]:
    """Node ``index``'s namespace, cabled to the ToR's bridge: (IP, AS, netns)."""
    from ciliate.control.lab.fabric import TOR_AS

    assert state.tor_netns is not None
    tor = state.tor_netns
    node_ip, asn, netns = FABRIC[10 + index], TOR_AS + index, f"{state.prefix}-node{index}"
    _netns_add(netns)
    # Both ends are created in lab namespaces, never in the root one.
    _run("ip", "-n", netns, "link", "add", "uplink", "type", "veth",
         "peer", "name", f"tor-n{index}", "netns", tor)  # fmt: skip
    _run("ip", "-n", netns, "addr", "add", f"{node_ip}/{FABRIC.prefixlen}", "dev", "uplink")
    _run("ip", "-n", netns, "link", "set", "uplink", "up")
    _run("ip", "-n", netns, "route", "add", "default", "via", str(TOR_IP))
    _run("ip", "-n", tor, "link", "set", f"tor-n{index}", "master", "fabric", "up")
    return node_ip, asn, netns


def _cluster_agent_args(node_ip: ipaddress.IPv4Address, asn: int, *, bgp: bool = True) -> list[str]:
    from ciliate.control.lab.fabric import ETCD_PORT, TOR_AS

    args = [
        "--etcd-endpoint",
        f"http://{TOR_IP}:{ETCD_PORT}",
        "--node-ip",
        str(node_ip),
        "--uplink",
        "uplink",
    ]
    if bgp:
        args += ["--bgp-local-as", str(asn), "--bgp-peer", f"{TOR_IP}:{TOR_AS}"]
    return args


def _record_pod_cidr(state: LabState, node: NodeState) -> None:
    with AgentClient(node.socket) as client:
        node.pod_cidr = client.get("/v1/status")["pod_cidrs"][0]
    state.save()


def tor_routes(state: LabState) -> list[str]:
    """The ToR's routes learned over BGP (``ip route ... proto bird``)."""
    if state.tor_netns is None:
        return []
    out = _run("ip", "-n", state.tor_netns, "route", "show", "proto", "bird").stdout
    return [line for line in out.splitlines() if line.strip()]


def _node(state: LabState, name: str) -> NodeState:
    node = next((n for n in state.nodes if n.name == name), None)
    if node is None:
        known = ", ".join(n.name for n in state.nodes)
        raise LabError(f"no node {name!r} in lab {state.name!r} (nodes: {known})")
    return node


def _live_agent(state: LabState, *, besides: str = "") -> NodeState:
    node = next((n for n in state.nodes if n.agent_pid and n.name != besides), None)
    if node is None:
        raise LabError(f"no agent of lab {state.name!r} is running")
    return node


def stop_node(state: LabState, name: str) -> None:
    """A node leaves: it is deleted from the cluster (the operator frees its pod
    CIDRs; its agent, seeing its node gone, withdraws its route at once), then its
    agent stops."""
    node = _node(state, name)
    with AgentClient(_live_agent(state).socket) as client:
        client._call("DELETE", f"/v1/cluster/nodes/{name}")
    stop_agent(node)
    state.save()


# -- restarts and node loss ---------------------------------------------------------


def _bird(state: LabState) -> tuple[str, Path]:
    """``birdc`` and the control socket of the lab's ToR."""
    from ciliate.control.lab.tor import find_bird

    return find_bird()[1], Path(state.directory) / "fabric" / "bird" / "bird.ctl"


class Pinger:
    """``ping -O`` from a pod to an address, in the background, every
    ``interval`` seconds: which probes were answered and which were not."""

    def __init__(self, netns: str, address: str, *, interval: float = 0.05) -> None:
        self.netns, self.address, self.interval = netns, address, interval
        self.answered: set[int] = set()
        self.unanswered: set[int] = set()  # "no answer yet" when the next one left
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> Pinger:
        self._proc = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "ping", "-n", "-O", "-i", str(self.interval),
             self.address],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            text=True,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            seq = next((w.split("=", 1)[1] for w in line.split() if w.startswith("icmp_seq=")), "")
            if not seq.isdigit():
                continue
            if line.startswith("no answer yet"):
                self.unanswered.add(int(seq))
            elif " bytes from " in line:
                self.answered.add(int(seq))

    @property
    def lost(self) -> list[int]:
        return sorted(self.unanswered - self.answered)

    @property
    def sent(self) -> int:
        return max(self.answered | self.unanswered, default=0)

    def __exit__(self, *exc: object) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_child(proc, timeout=3, name="ping", sig=signal.SIGINT)
        if self._reader is not None:
            self._reader.join(timeout=3)


@dataclass
class RestartReport:
    """What ``restart_agent`` saw at the ToR while the agent was away."""

    node: str
    signal: str
    pod_cidr: str
    agent_back_s: float  # from the signal until the new agent answered
    bgp_back_s: float  # ... until the ToR had the new session's routes (restart over)
    kernel_deletions: list[str]  # the pod CIDR's route deleted at the ToR (ip monitor)
    bird_polls: int  # `birdc show route` polls during the restart
    bird_missing: int  # ... of them without the pod CIDR


def restart_agent(state: LabState, name: str, *, sig: str = "TERM") -> RestartReport:
    """Restart one node's agent in place, as an upgrade (SIGTERM) or a crash
    (SIGKILL) would, watching the ToR's routes meanwhile: the datapath keeps
    forwarding and, with BGP graceful restart, the ToR keeps the node's route."""
    from ciliate.control.lab.tor import RouteMonitor, bird_restarting, bird_routes

    if sig not in ("TERM", "KILL"):
        raise LabError(f"--signal {sig}: TERM or KILL")
    node = _node(state, name)
    if node.agent_pid is None:
        raise LabError(f"the agent of {name} is not running")
    cidr = ipaddress.IPv4Network(node.pod_cidr)
    polls: list[bool] = []
    done = threading.Event()
    monitor: RouteMonitor | None = None
    with contextlib.ExitStack() as stack:
        if state.tor_netns is not None:
            birdc, sock = _bird(state)
            monitor = stack.enter_context(RouteMonitor(state.tor_netns))

            def poll() -> None:
                while not done.is_set():
                    with contextlib.suppress(Exception):
                        polls.append(cidr in bird_routes(birdc, sock))
                    done.wait(0.05)

            poller = threading.Thread(target=poll, name="bird-poll", daemon=True)
            poller.start()
            stack.callback(poller.join)
            stack.callback(done.set)
        started = time.monotonic()
        stop_agent(node, kill=sig == "KILL")
        state.save()
        start_agent(node)
        state.save()
        agent_back = time.monotonic() - started
        bgp_back = agent_back
        if state.tor_netns is not None:

            def session_back() -> bool:
                with contextlib.suppress(Exception):
                    return not bird_restarting(birdc, sock, name) and _established(
                        birdc, sock, name
                    )
                return False

            deadline = time.monotonic() + 60
            while not session_back():
                if time.monotonic() > deadline:
                    raise LabError(f"{name}'s BGP session did not come back within 60 s")
                time.sleep(0.05)
            bgp_back = time.monotonic() - started
            done.set()
    return RestartReport(
        node=name,
        signal=sig,
        pod_cidr=str(cidr),
        agent_back_s=agent_back,
        bgp_back_s=bgp_back,
        kernel_deletions=monitor.deleted(cidr) if monitor is not None else [],
        bird_polls=len(polls),
        bird_missing=polls.count(False),
    )


def _established(birdc: str, sock: Path, protocol: str) -> bool:
    from ciliate.control.lab.tor import parse_bird_protocols, run_birdc

    found = parse_bird_protocols(run_birdc(birdc, sock, "show", "protocols")).get(protocol)
    return found is not None and found.established


def kill_node(state: LabState, name: str) -> None:
    """The node dies without a goodbye, as a machine losing power: its cable goes
    first (so not even a TCP FIN leaves it), every process in its namespace is
    SIGKILLed, and the namespace is deleted. The cluster must notice by itself:
    see ``watch_node_loss``."""
    node = _node(state, name)
    if state.tor_netns is not None:
        # Deleting the ToR's end deletes the node's too. Orphaned TCP sockets of the
        # node (etcd, BGP) keep its namespace alive for minutes, retrying into the
        # void: the cable must not be there for them, nor for `revive_node`.
        index = int(name.removeprefix("node"))
        _run("ip", "-n", state.tor_netns, "link", "del", f"tor-n{index}", check=False)
    pids = _run("ip", "netns", "pids", node.netns, check=False).stdout.split()
    for pid in pids:  # in the lab's own namespace: ours
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    for pid in pids:
        _alive(int(pid))  # reap the agent, our child
    node.agent_pid = None
    state.save()
    _run("ip", "netns", "del", node.netns, check=False)


@dataclass
class NodeLoss:
    """Seconds from ``since`` until each was seen (None: not within the timeout)."""

    route_gone: float | None = None  # the node's pod CIDR route left the ToR
    cidr_free: float | None = None  # the node and its IPAM object left the cluster
    ipcache_clean: float | None = None  # no other node's ipcache points at it


def watch_node_loss(state: LabState, name: str, *, since: float, timeout: float) -> NodeLoss:
    """Poll until the cluster has forgotten node ``name`` (see ``kill_node``)."""
    node = _node(state, name)
    others = [n for n in state.nodes if n.agent_pid and n.name != name]
    if not others:
        raise LabError("no other node runs an agent to watch from")
    seen = NodeLoss()
    deadline = since + timeout
    while time.monotonic() < deadline:
        now = time.monotonic() - since
        if seen.route_gone is None and not any(
            r.startswith(f"{node.pod_cidr} ") for r in tor_routes(state)
        ):
            seen.route_gone = now
        if seen.cidr_free is None or seen.ipcache_clean is None:
            with AgentClient(others[0].socket) as client:
                listed = client.get("/v1/cluster/nodes")
            if seen.cidr_free is None and not any(
                n["name"] == name or node.pod_cidr in n["podCIDRs"] for n in listed
            ):
                seen.cidr_free = now
            clean = True
            for other in others:
                with AgentClient(other.socket) as client:
                    entries = client.get("/v1/bpf/ipcache")
                clean &= not any(e["node_ip"] == node.node_ip for e in entries)
            if seen.ipcache_clean is None and clean:
                seen.ipcache_clean = now
        if None not in (seen.route_gone, seen.cidr_free, seen.ipcache_clean):
            break
        time.sleep(0.1)
    return seen


def revive_node(state: LabState, name: str) -> NodeState:
    """A killed node comes back under the same name, as a reinstalled machine:
    its namespace and cable again, a fresh state, the same IP and AS."""
    node = _node(state, name)
    if Path(f"/run/netns/{node.netns}").exists():
        raise LabError(f"{name} is not dead (its namespace exists)")
    index = int(name.removeprefix("node"))
    _cable_node(state, index)
    shutil.rmtree(node.state_dir, ignore_errors=True)
    shutil.rmtree(node.bpffs_root, ignore_errors=True)
    start_agent(node)
    _record_pod_cidr(state, node)
    return node


def add_node(state: LabState, *, console: Console | None = None) -> NodeState:
    """One more node on the fabric. It gets its pod CIDR from the operator but
    has no BGP session: the ToR's neighbours are fixed when the lab comes up."""
    if state.tor_netns is None:
        raise LabError("a single-node lab: `ciliate lab up --nodes N` makes a cluster")
    index = max(int(n.name.removeprefix("node")) for n in state.nodes) + 1
    node_ip, asn, netns = _cable_node(state, index)
    node = _start_node(
        state,
        index=index,
        console=console or Console(quiet=True),
        agent_args=_cluster_agent_args(node_ip, asn, bgp=False),
        netns=netns,
        node_ip=str(node_ip),
    )
    _record_pod_cidr(state, node)
    return node


def _start_node(
    state: LabState,
    *,
    index: int,
    console: Console,
    pod_cidr: str | None = None,
    agent_args: list[str] | None = None,
    netns: str | None = None,
    node_ip: str | None = None,
) -> NodeState:
    from ciliate.control.cni import install

    name = f"node{index}"
    netns = netns or f"{state.prefix}-{name}"
    ndir = Path(state.directory) / name
    ndir.mkdir(parents=True, exist_ok=True)
    node = NodeState(
        name=name,
        netns=netns,
        pod_cidr=pod_cidr or f"10.244.{index}.0/24",
        socket=str(ndir / "agent.sock"),
        state_dir=str(ndir / "state"),
        bpffs_root=f"/sys/fs/bpf/{netns}",
        conf_dir=str(ndir / "net.d"),
        log=str(ndir / "agent.log"),
        node_ip=node_ip,
        agent_args=agent_args or [],
    )
    state.nodes.append(node)
    state.save()
    if not agent_args:
        _netns_add(netns)
    install.install(
        bin_dir=Path(state.bin_dir),
        conf_dir=Path(node.conf_dir),
        socket=node.socket,
        cni_version=CNI_VERSION,
    )
    with console.status(f"starting the agent of {name} ..."):
        proc = start_agent(node, wait=False)
        state.save()
        _wait_healthy(node, proc)
    if not agent_args:
        console.print(
            f"{name}: netns {netns}, pod CIDR {node.pod_cidr}, agent pid {proc.pid}, "
            f"socket {node.socket}"
        )
    return node


def _wait_healthy(node: NodeState, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    with AgentClient(node.socket, timeout=2) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = Path(node.log).read_text()[-2000:]
                raise LabError(f"the agent of {node.name} exited ({proc.returncode}):\n{tail}")
            if Path(node.socket).exists() and client.healthy():
                return
            time.sleep(0.1)
    raise LabError(f"the agent of {node.name} did not answer within {timeout:.0f} s")


@contextlib.contextmanager
def agent_in(
    netns_path: str,
    workdir: Path,
    *,
    pod_cidr: str = "10.244.50.0/24",
    name: str = "node",
    agent_args: Sequence[str] = (),
) -> Iterator[tuple[NodeState, Path, Path]]:
    """A ciliate node in an existing namespace (made by a test or benchmark):
    the CNI plugin and conflist installed under ``workdir``, the agent
    running; yields (node, bin_dir, conf_dir). Leaving stops the agent and
    removes its pins and files (the namespace is the caller's)."""
    from ciliate.control.cni import install

    netns = Path(netns_path).name
    workdir.mkdir(parents=True, exist_ok=True)
    node = NodeState(
        name=name,
        netns=netns,
        pod_cidr=pod_cidr,
        socket=str(workdir / "agent.sock"),
        state_dir=str(workdir / "state"),
        bpffs_root=f"/sys/fs/bpf/{netns}",
        conf_dir=str(workdir / "net.d"),
        log=str(workdir / "agent.log"),
        agent_args=["--pod-cidr", pod_cidr, *agent_args] if agent_args else [],
    )
    bin_dir = workdir / "bin"
    install.install(
        bin_dir=bin_dir, conf_dir=Path(node.conf_dir), socket=node.socket, cni_version=CNI_VERSION
    )
    try:
        start_agent(node)
        yield node, bin_dir, Path(node.conf_dir)
    finally:
        stop_agent(node)
        shutil.rmtree(node.bpffs_root, ignore_errors=True)


# -- connectivity --------------------------------------------------------------------------


def ping(netns: str, address: str) -> bool:
    return (
        _run(
            "ip", "netns", "exec", netns, "ping", "-c", "1", "-W", "2", "-q", address, check=False
        ).returncode
        == 0
    )


def connectivity(state: LabState) -> dict[tuple[str, str], bool]:
    """Every pod to every other pod and to its node (router IP)."""
    targets: dict[str, str] = {p.name: p.ip for p in state.pods if p.ip}
    routers = {n.name: str(ipaddress.IPv4Network(n.pod_cidr)[1]) for n in state.nodes}
    jobs = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        for pod in state.pods:
            for peer, address in targets.items():
                if peer != pod.name:
                    jobs[(pod.name, peer)] = pool.submit(ping, pod.netns, address)
            jobs[(pod.name, pod.node)] = pool.submit(ping, pod.netns, routers[pod.node])
        return {pair: job.result() for pair, job in jobs.items()}


def print_connectivity(
    state: LabState,
    results: dict[tuple[str, str], bool],
    console: Console,
    *,
    title: str = "connectivity (ping, rows to columns)",
    expected: dict[tuple[str, str], bool] | None = None,
) -> bool:
    """The table; whether every pair is as ``expected`` (all reachable when None).
    A pair that policy is expected to deny shows as a yellow ✗."""
    want = expected or {pair: True for pair in results}
    columns = [p.name for p in state.pods] + [n.name for n in state.nodes]
    table = Table(title=title)
    table.add_column("from \\ to")
    for column in columns:
        table.add_column(column, justify="center")
    for pod in state.pods:
        row = []
        for column in columns:
            pair = (pod.name, column)
            if column == pod.name:
                row.append("·")
            elif pair in results:
                if results[pair]:
                    row.append("[green]✓[/]" if want[pair] else "[red]✓ (should be denied)[/]")
                else:
                    row.append("[yellow]✗[/]" if not want[pair] else "[red]✗[/]")
            else:
                row.append("")
        table.add_row(f"{pod.name} ({pod.ip})", *row)
    console.print(table)
    ok = all(results[pair] == want[pair] for pair in results)
    denied = sum(not w for w in want.values())
    console.print(
        f"{sum(results.values())}/{len(results)} pairs reachable"
        + (f", {denied} denied by policy as expected" if denied and ok else "")
        + ("" if ok else " — some pairs FAILED")
    )
    return ok


def show_maps(state: LabState, console: Console) -> None:
    for node in state.nodes:
        with AgentClient(node.socket) as client:
            endpoints = client.get("/v1/bpf/endpoints")
            ipcache = client.get("/v1/bpf/ipcache")
        table = Table(title=f"{node.name}: ciliate_ep_ip")
        for column in ("ip", "ifindex", "mac", "node_mac", "identity"):
            table.add_column(column)
        for e in endpoints:
            table.add_row(e["ip"], str(e["ifindex"]), e["mac"], e["node_mac"], str(e["identity"]))
        console.print(table)
        table = Table(title=f"{node.name}: ciliate_ipcache")
        for column in ("prefix", "identity", "node_ip"):
            table.add_column(column)
        for e in ipcache:
            table.add_row(e["prefix"], str(e["identity"]), e["node_ip"] or "local")
        console.print(table)
        routes = _run("ip", "-n", node.netns, "route", "show").stdout.strip()
        console.print(f"{node.name} routing table (no per-pod routes):\n{routes}")


# -- down ---------------------------------------------------------------------------------


def down(*, name: str, console: Console) -> list[str]:
    state = LabState.load(name)
    if state is None:
        return []
    removed: list[str] = []
    nodes = {n.name: n for n in state.nodes}
    for pod in state.pods:
        node = nodes.get(pod.node)
        if node is not None and node.agent_pid and _alive(node.agent_pid):
            with contextlib.suppress(LabError, json.JSONDecodeError, OSError):
                cni_call(state, node, pod, "DEL")
        if _run("ip", "netns", "del", pod.netns, check=False).returncode == 0:
            removed.append(f"netns {pod.netns}")
    for node in state.nodes:
        if node.agent_pid and _stop(node.agent_pid, node.socket):
            removed.append(f"agent pid {node.agent_pid}")
    if state.fabric_pid and _stop(state.fabric_pid, "ciliate.control.lab.fabric"):
        removed.append(f"fabric pid {state.fabric_pid} (etcd, operator, bird)")
    if state.tor_netns and _run("ip", "netns", "del", state.tor_netns, check=False).returncode == 0:
        removed.append(f"netns {state.tor_netns} (bridge, etcd, operator, bird)")
    for node in state.nodes:
        if _run("ip", "netns", "del", node.netns, check=False).returncode == 0:
            removed.append(f"netns {node.netns} (and its cilium_host, veths)")
        if os.path.isdir(node.bpffs_root):
            shutil.rmtree(node.bpffs_root)
            removed.append(f"pins {node.bpffs_root}")
    for pid in _sweep(state):
        removed.append(f"leftover process {pid}")
    shutil.rmtree(state.directory, ignore_errors=True)
    removed.append(f"files {state.directory}")
    # Namespaces the lab recorded before a crash could save them.
    for leftover in _run("ip", "netns", "list", check=False).stdout.split():
        if leftover.startswith(state.prefix + "-"):
            _run("ip", "netns", "del", leftover, check=False)
            removed.append(f"netns {leftover}")
    return removed


def _sweep(state: LabState) -> list[int]:
    """Processes this lab started that outlived their parent (a fabric or an
    agent killed hard): recognised by the lab's own directory or namespace
    prefix in their command line, which nothing else carries."""
    marks = (state.directory, f"/run/netns/{state.prefix}-")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if any(mark in cmdline for mark in marks):
            pid = int(entry.name)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            found.append(pid)
    for pid in found:
        _alive(pid)  # reap our own children
    return found


def _alive(pid: int) -> bool:
    # Reap it first if it is our child: a zombie still answers kill(pid, 0).
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop(pid: int, socket: str) -> bool:
    """SIGTERM the agent this lab started (checked by its command line)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    if "ciliate" not in cmdline or socket not in cmdline:
        return False  # the pid was reused by someone else's process
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    return True


# -- command line ---------------------------------------------------------------------------


def _cmd_up(args: argparse.Namespace) -> int:
    console = Console()
    try:
        state = up(
            name=args.name,
            pods=args.pods,
            console=console,
            nodes=args.nodes,
            node_grace_period=args.node_grace_period,
        )
    except LabError as exc:
        console.print(f"[red]lab up failed:[/] {exc}")
        console.print("cleaning up ...")
        down(name=args.name, console=console)
        return 1
    show_maps(state, console)
    if state.tor_netns:
        show_cluster(state, console)
    before = connectivity(state)
    ok = print_connectivity(state, before, console)
    if ok and args.policy_demo:
        from ciliate.control.lab import policy_demo

        ok = policy_demo.show(state, console, before)
        if ok:
            from ciliate.control.lab import service_demo

            ok = service_demo.show(state, console)
    console.print(f"lab {args.name!r} is up (prefix {state.prefix}); `ciliate lab down` removes it")
    return 0 if ok else 1


def show_cluster(state: LabState, console: Console) -> None:
    with AgentClient(state.nodes[0].socket) as client:
        nodes = client.get("/v1/cluster/nodes")
    table = Table(title="nodes (ciliate node list)")
    for column in ("name", "node IP", "pod CIDRs", "alive", "BGP"):
        table.add_column(column)
    for n in nodes:
        table.add_row(
            n["name"],
            n["nodeIP"],
            ", ".join(n["podCIDRs"]) or str(n["ipamError"]),
            "yes" if n["alive"] else "no",
            ", ".join(f"{k} {v}" for k, v in n["bgp"].items()),
        )
    console.print(table)
    console.print(f"ToR ({state.tor_netns}) routes learned over BGP:")
    for line in tor_routes(state):
        console.print(f"  {line}")


def _cmd_stop_node(args: argparse.Namespace) -> int:
    console = Console()
    state = LabState.load(args.name)
    if state is None:
        console.print(f"no lab {args.name!r} is up")
        return 1
    started = time.monotonic()
    stop_node(state, args.node)
    console.print(f"{args.node} stopped and deleted from the cluster")
    while (
        any(
            f"via {n.node_ip} " in r
            for r in tor_routes(state)
            for n in state.nodes
            if n.name == args.node
        )
        and time.monotonic() - started < 10
    ):
        time.sleep(0.1)
    console.print(f"ToR routes {time.monotonic() - started:.1f} s later:")
    for line in tor_routes(state):
        console.print(f"  {line}")
    return 0


def ping_pair(state: LabState, node: str) -> tuple[PodState, PodState] | None:
    """A pod on another node and a pod on ``node``: cross-node traffic to watch."""
    here = next((p for p in state.pods if p.node == node and p.ip), None)
    there = next((p for p in state.pods if p.node != node and p.ip), None)
    return (there, here) if here is not None and there is not None else None


def _cmd_restart_agent(args: argparse.Namespace) -> int:
    console = Console()
    state = LabState.load(args.name)
    if state is None:
        console.print(f"no lab {args.name!r} is up")
        return 1
    pair = ping_pair(state, args.node)
    with contextlib.ExitStack() as stack:
        pinger = None
        if pair is not None:
            pinger = stack.enter_context(Pinger(pair[0].netns, str(pair[1].ip)))
            console.print(f"pinging {pair[1].name} ({pair[1].ip}) from {pair[0].name} every 50 ms")
        try:
            report = restart_agent(state, args.node, sig=args.signal)
        except LabError as exc:
            console.print(f"[red]restart failed:[/] {exc}")
            return 1
        time.sleep(1.0)  # the last probes' answers
    console.print(
        f"{report.node}: agent SIG{report.signal}ed, back in {report.agent_back_s:.2f} s"
        + (
            f"; BGP session re-established and the restart over at the ToR in "
            f"{report.bgp_back_s:.2f} s"
            if state.tor_netns is not None
            else ""
        )
    )
    ok = True
    if state.tor_netns is not None:
        kept = not report.kernel_deletions and report.bird_missing == 0
        ok &= kept
        console.print(
            f"ToR route {report.pod_cidr}: "
            + (
                f"[green]kept throughout[/] (no kernel deletion; in all {report.bird_polls} "
                "`birdc show route` polls)"
                if kept
                else f"[red]gone[/] ({report.kernel_deletions}; missing in "
                f"{report.bird_missing}/{report.bird_polls} polls)"
            )
        )
    if pinger is not None:
        lost = pinger.lost
        ok &= not lost
        console.print(
            f"ping: {pinger.sent} sent, {len(lost)} lost" + (f" (seq {lost})" if lost else "")
        )
    return 0 if ok else 1


def _cmd_kill_node(args: argparse.Namespace) -> int:
    from ciliate.control.cluster.member import DEFAULT_LEASE_TTL
    from ciliate.control.operator.main import DEFAULT_NODE_GRACE_PERIOD

    console = Console()
    state = LabState.load(args.name)
    if state is None:
        console.print(f"no lab {args.name!r} is up")
        return 1
    if state.tor_netns is None:
        console.print(f"lab {args.name!r} is one node: kill-node needs a cluster (--nodes N)")
        return 1
    grace = (
        state.node_grace_period
        if state.node_grace_period is not None
        else DEFAULT_NODE_GRACE_PERIOD
    )
    started = time.monotonic()
    kill_node(state, args.node)
    console.print(
        f"{args.node}: cable cut, processes SIGKILLed, namespace deleted; the cluster "
        f"should forget it within {DEFAULT_LEASE_TTL} s (lease) + {grace:.0f} s (grace)"
    )
    seen = watch_node_loss(state, args.node, since=started, timeout=DEFAULT_LEASE_TTL + grace + 15)
    for what, took in (
        ("route gone from the ToR", seen.route_gone),
        ("node deleted, pod CIDR free", seen.cidr_free),
        ("out of every other node's ipcache", seen.ipcache_clean),
    ):
        console.print(f"  {what}: " + (f"{took:.1f} s" if took is not None else "[red]not yet[/]"))
    return 0 if None not in (seen.route_gone, seen.cidr_free, seen.ipcache_clean) else 1


def _cmd_down(args: argparse.Namespace) -> int:
    console = Console()
    removed = down(name=args.name, console=console)
    if not removed:
        console.print(f"no lab {args.name!r} is up")
        return 0
    for item in removed:
        console.print(f"removed {item}")
    return 0


def register(lab: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = lab.add_parser("up", help="bring up a node (or a cluster) with pods")
    p.add_argument("--pods", type=int, default=3, help="pods per node")
    p.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="more than one: a cluster (a ToR with bird, etcd and the operator)",
    )
    p.add_argument(
        "--node-grace-period",
        type=float,
        metavar="S",
        help="cluster: how long the operator waits before removing a node whose lease "
        "expired (default: the operator's, 60 s)",
    )
    p.add_argument(
        "--policy-demo",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after the first table, label the pods, apply a NetworkPolicy and show the "
        "table again, then put a ClusterIP service in front of the web pod (default on)",
    )
    p.add_argument("--name", default="lab")
    p.set_defaults(func=_cmd_up)
    s = lab.add_parser("stop-node", help="stop a node's agent and delete it from the cluster")
    s.add_argument("node")
    s.add_argument("--name", default="lab")
    s.set_defaults(func=_cmd_stop_node)
    r = lab.add_parser(
        "restart-agent",
        help="restart a node's agent in place (an upgrade: TERM, a crash: KILL), "
        "watching the ToR's route and cross-node pings meanwhile",
    )
    r.add_argument("node")
    r.add_argument("--signal", choices=("TERM", "KILL"), default="TERM")
    r.add_argument("--name", default="lab")
    r.set_defaults(func=_cmd_restart_agent)
    k = lab.add_parser(
        "kill-node",
        help="a node dies hard (cable, processes, namespace); watch the cluster forget it",
    )
    k.add_argument("node")
    k.add_argument("--name", default="lab")
    k.set_defaults(func=_cmd_kill_node)
    d = lab.add_parser("down", help="remove everything the lab made")
    d.add_argument("--name", default="lab")
    d.set_defaults(func=_cmd_down)
