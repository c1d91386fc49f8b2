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
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ciliate.control.agent.client import AgentClient

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
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod.name}",
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


def add_pod_netns(state: LabState, node: NodeState, name: str) -> PodState:
    """A pod namespace (not yet networked), recorded for `down`."""
    pod = PodState(
        name=name, node=node.name, netns=f"{node.netns}-{name}", container_id=secrets.token_hex(32)
    )
    _netns_add(pod.netns)
    state.pods.append(pod)
    state.save()
    return pod


def up(*, name: str, pods: int, console: Console, nodes: int = 1) -> LabState:
    """One node (``nodes=1``) or a cluster; ``pods`` pods on every node."""
    if pods < 1:
        raise LabError("--pods must be at least 1")
    if nodes < 1:
        raise LabError("--nodes must be at least 1")
    if nodes == 1:
        state, first = create(name=name, console=console)
        node_list = [first]
    else:
        state = create_cluster(name=name, nodes=nodes, console=console)
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


def create_cluster(*, name: str, nodes: int, console: Console) -> LabState:
    """A ToR namespace (a bridge for the fabric, etcd, the operator, bird)
    and ``nodes`` node namespaces cabled to it, each running its agent in
    cluster mode: pod CIDRs from the operator, announced over BGP."""
    from ciliate.control.lab.fabric import ETCD_PORT, TOR_AS

    if LabState.load(name) is not None:
        raise LabError(f"lab {name!r} is up: run `ciliate lab down --name {name}` first")
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
    )
    state.save()
    _netns_add(tor)
    _run("ip", "-n", tor, "link", "add", "fabric", "type", "bridge")
    _run("ip", "-n", tor, "addr", "add", f"{TOR_IP}/{FABRIC.prefixlen}", "dev", "fabric")
    _run("ip", "-n", tor, "link", "set", "fabric", "up")
    specs = []
    for i in range(1, nodes + 1):
        node_ip, asn, netns = FABRIC[10 + i], TOR_AS + i, f"{prefix}-node{i}"
        _netns_add(netns)
        _run(
            "ip",
            "-n",
            netns,
            "link",
            "add",
            "uplink",
            "type",
            "veth",
            "peer",
            "name",
            f"tor-n{i}",
            "netns",
            tor,
        )
        _run("ip", "-n", netns, "addr", "add", f"{node_ip}/{FABRIC.prefixlen}", "dev", "uplink")
        _run("ip", "-n", netns, "link", "set", "uplink", "up")
        _run("ip", "-n", netns, "route", "add", "default", "via", str(TOR_IP))
        _run("ip", "-n", tor, "link", "set", f"tor-n{i}", "master", "fabric", "up")
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
        agent_args = [
            "--etcd-endpoint",
            f"http://{TOR_IP}:{ETCD_PORT}",
            "--node-ip",
            str(node_ip),
            "--uplink",
            "uplink",
            "--bgp-local-as",
            str(asn),
            "--bgp-peer",
            f"{TOR_IP}:{TOR_AS}",
        ]
        node = _start_node(
            state,
            index=index,
            console=console,
            agent_args=agent_args,
            netns=netns,
            node_ip=str(node_ip),
        )
        with AgentClient(node.socket) as client:
            node.pod_cidr = client.get("/v1/status")["pod_cidrs"][0]
        state.save()
        console.print(
            f"{node_name}: netns {netns}, {node_ip} AS {asn}, pod CIDR "
            f"{node.pod_cidr} (from the operator), agent pid {node.agent_pid}"
        )
    return state


def tor_routes(state: LabState) -> list[str]:
    """The ToR's routes learned over BGP (``ip route ... proto bird``)."""
    if state.tor_netns is None:
        return []
    out = _run("ip", "-n", state.tor_netns, "route", "show", "proto", "bird").stdout
    return [line for line in out.splitlines() if line.strip()]


def stop_node(state: LabState, name: str) -> None:
    """A node leaves: its agent stops (its BGP session closes, so the ToR
    withdraws its route) and it is deleted from the cluster (the operator
    frees its pod CIDRs)."""
    node = next((n for n in state.nodes if n.name == name), None)
    if node is None:
        raise LabError(f"no node {name!r} in lab {state.name!r}")
    stop_agent(node)
    state.save()
    other = next((n for n in state.nodes if n.agent_pid and n.name != name), None)
    if other is not None:
        with AgentClient(other.socket) as client:
            client._call("DELETE", f"/v1/cluster/nodes/{name}")


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
    state: LabState, results: dict[tuple[str, str], bool], console: Console
) -> bool:
    columns = [p.name for p in state.pods] + [n.name for n in state.nodes]
    table = Table(title="connectivity (ping, rows to columns)")
    table.add_column("from \\ to")
    for column in columns:
        table.add_column(column, justify="center")
    for pod in state.pods:
        row = []
        for column in columns:
            if column == pod.name:
                row.append("·")
            elif (pod.name, column) in results:
                row.append("[green]✓[/]" if results[(pod.name, column)] else "[red]✗[/]")
            else:
                row.append("")
        table.add_row(f"{pod.name} ({pod.ip})", *row)
    console.print(table)
    ok = all(results.values())
    console.print(
        f"{sum(results.values())}/{len(results)} pairs reachable"
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
        state = up(name=args.name, pods=args.pods, console=console, nodes=args.nodes)
    except LabError as exc:
        console.print(f"[red]lab up failed:[/] {exc}")
        console.print("cleaning up ...")
        down(name=args.name, console=console)
        return 1
    show_maps(state, console)
    if state.tor_netns:
        show_cluster(state, console)
    ok = print_connectivity(state, connectivity(state), console)
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
    p.add_argument("--name", default="lab")
    p.set_defaults(func=_cmd_up)
    s = lab.add_parser("stop-node", help="stop a node's agent and delete it from the cluster")
    s.add_argument("node")
    s.add_argument("--name", default="lab")
    s.set_defaults(func=_cmd_stop_node)
    d = lab.add_parser("down", help="remove everything the lab made")
    d.add_argument("--name", default="lab")
    d.set_defaults(func=_cmd_down)
