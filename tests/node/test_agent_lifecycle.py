"""The agent starts and stops cleanly, as real processes in lab namespaces:
one agent per node's paths (a second one refuses, in any namespace, and
touches nothing), a start-up failing half-way releases all it opened so a
retry starts, and SIGTERM runs the agent's own shutdown."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ciliate.control.lab import lab
from ciliate.control.lab.etcd_server import EtcdServer

from ..cluster import etcd_fixtures
from .conftest import NodeLab

require_etcd = etcd_fixtures.require_etcd

RETRY_HELPER = Path(__file__).with_name("agent_start_retry.py")


def _agent_command(netns: str, *, node: lab.NodeState, **paths: str) -> list[str]:
    """ciliate-agent as the lab starts it, with some of its paths replaced."""
    return [
        "nsenter",
        f"--net=/run/netns/{netns}",
        sys.executable,
        "-m",
        "ciliate.control.agent.main",
        "--node-name",
        "intruder",
        "--pod-cidr",
        node.pod_cidr,
        "--state-dir",
        paths.get("state_dir", node.state_dir),
        "--socket",
        paths.get("socket", node.socket),
        "--bpffs-root",
        paths.get("bpffs_root", node.bpffs_root),
    ]


def _node_view(node_lab: NodeLab) -> dict[str, object]:
    """What a second agent must not change: pods, IPs, map entries, veths,
    the socket the first agent serves on."""
    socket_stat = os.stat(node_lab.node.socket)
    return {
        "links": node_lab.host_links(),
        "allocations": node_lab.get("/v1/ipam")["allocations"],
        "endpoints": node_lab.get("/v1/endpoints"),
        "bpf_endpoints": node_lab.get("/v1/bpf/endpoints"),
        "ipcache": node_lab.get("/v1/bpf/ipcache"),
        "identities": node_lab.get("/v1/identities"),
        "socket": (socket_stat.st_dev, socket_stat.st_ino),
    }


# -- one agent per node's paths -------------------------------------------------------------


@pytest.fixture(scope="module")
def busy_node(node_lab: NodeLab) -> Iterator[NodeLab]:
    """The module's node with two pods networked, and a namespace beside it
    holding a veth whose ifindex is one of the pods' host-side ifindexes (a
    second agent there once "reconciled" such an unrelated link away)."""
    pods = [node_lab.pod(), node_lab.pod()]
    for pod in pods:
        node_lab.add(pod)
    other = f"{node_lab.state.prefix}-other"  # `lab down` removes it if we cannot
    lab._run("ip", "netns", "add", other)
    taken = node_lab.get("/v1/endpoints")[0]["host_ifindex"]
    lab._run(
        "ip", "-n", other, "link", "add", "decoy", "index", str(taken), "type", "veth",
        "peer", "name", "decoy-peer",
    )  # fmt: skip
    try:
        yield node_lab
    finally:
        lab._run("ip", "netns", "del", other, check=False)
        for pod in pods:
            node_lab.cni(pod, "DEL")


def _decoy_index(node_lab: NodeLab) -> int | None:
    out = lab._run(
        "ip", "-n", f"{node_lab.state.prefix}-other", "-j", "link", "show", "decoy", check=False
    )
    return json.loads(out.stdout)[0]["ifindex"] if out.returncode == 0 else None


@pytest.mark.parametrize(
    ("where", "shared"),
    [
        ("same netns", ("state_dir", "socket", "bpffs_root")),
        ("other netns", ("state_dir", "socket", "bpffs_root")),
        ("other netns", ("state_dir",)),
        ("other netns", ("socket",)),
        ("other netns", ("bpffs_root",)),
    ],
    ids=["all paths, same netns", "all paths, other netns", "state dir", "socket", "bpffs root"],
)
def test_a_second_agent_on_the_same_paths_exits_2_naming_the_first(
    busy_node: NodeLab, tmp_path: Path, where: str, shared: tuple[str, ...]
) -> None:
    node = busy_node.node
    before = _node_view(busy_node)
    decoy = _decoy_index(busy_node)
    assert decoy is not None
    netns = node.netns if where == "same netns" else f"{busy_node.state.prefix}-other"
    own = tmp_path / "own"
    own_paths = {
        "state_dir": str(own / "state"),
        "socket": str(own / "run" / "agent.sock"),
        "bpffs_root": f"/sys/fs/bpf/{busy_node.state.prefix}-other",
    }
    paths = {key: value for key, value in own_paths.items() if key not in shared}

    proc = subprocess.run(
        _agent_command(netns, node=node, **paths), capture_output=True, text=True, timeout=60
    )

    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"another agent (pid {node.agent_pid}) already runs on" in lines[0]
    # The first place shared is the one named (they are locked in this order).
    refused_on = {
        "state_dir": f"state directory {node.state_dir}",
        "socket": f"socket directory {Path(node.socket).parent}",
        "bpffs_root": f"bpffs root {node.bpffs_root}",
    }[shared[0]]
    assert refused_on in lines[0]
    # The first agent keeps serving, and nothing of its node changed.
    assert busy_node.api.healthy()
    assert _node_view(busy_node) == before
    assert _decoy_index(busy_node) == decoy
    # The refused agent created nothing of its own either.
    assert not own.exists()
    assert not Path(own_paths["bpffs_root"]).exists()


def test_the_lock_goes_with_the_agent_and_a_new_agent_takes_over(fresh_lab: NodeLab) -> None:
    """The lock is the kernel's, held by the process: an agent killed hard
    leaves none behind."""
    lab.stop_agent(fresh_lab.node, kill=True)
    lab.start_agent(fresh_lab.node)
    fresh_lab.state.save()
    assert fresh_lab.api.healthy()


# -- start-up failing half-way ----------------------------------------------------------------


def test_a_start_failing_half_way_releases_everything_and_a_retry_starts(
    fresh_lab: NodeLab, tmp_path: Path
) -> None:
    node = fresh_lab.node
    lab.stop_agent(node)
    args = {
        "node_name": node.name,
        "pod_cidr": node.pod_cidr,
        "state_dir": node.state_dir,
        "socket": node.socket,
        "bpffs_root": node.bpffs_root,
        "workdir": str(tmp_path),
    }
    helper = [sys.executable, str(RETRY_HELPER), json.dumps(args)]
    proc = subprocess.run(
        ["nsenter", f"--net=/run/netns/{node.netns}", *helper],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.splitlines()[-1])

    expected_errors = {
        "missing uplink": "--uplink nosuch0: no such device in this network namespace",
        "overlapping pod CIDRs": "pod CIDRs (--pod-cidr): ",
        "socket path too long": "cannot listen there",
        "socket path is a directory": "cannot listen there",
    }
    for name, attempt in report["attempts"].items():
        assert attempt["error"] is not None and expected_errors[name] in attempt["error"], name
        assert attempt["leaked_files"] == [], name  # maps, programs, links, sockets, the store
        assert attempt["new_threads"] == [], name
        assert attempt["lock_free"], name
        assert not attempt["socket_left"], name
    assert report["retry"] == {
        "listening": True,
        "endpoints": 0,
        "router_ip": str(next(ipaddress.IPv4Network(node.pod_cidr).hosts())),
    }
    assert report["after_close"] == {"leaked_files": [], "socket_left": False, "lock_free": True}

    lab.start_agent(node)  # the node works as before
    fresh_lab.state.save()
    pod = fresh_lab.pod()
    fresh_lab.add(pod)
    assert fresh_lab.ping(pod, fresh_lab.router_ip)


def test_a_missing_uplink_is_one_line_and_exit_2(fresh_lab: NodeLab) -> None:
    node = fresh_lab.node
    lab.stop_agent(node)
    proc = subprocess.run(
        [*_agent_command(node.netns, node=node), "--uplink", "nosuch0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("ciliate-agent: --uplink nosuch0: no such device in this network")
    assert not Path(node.socket).exists()


# -- SIGTERM ------------------------------------------------------------------------------------


def test_sigterm_runs_the_agents_shutdown(fresh_lab: NodeLab) -> None:
    node = fresh_lab.node
    pods = [fresh_lab.pod() for _ in range(6)]
    for pod in pods:
        fresh_lab.add(pod)
    assert len(fresh_lab.pod_links()) == len(pods)
    for pod in pods:
        fresh_lab.cni(pod, "DEL")
    # At once: DEL answers before its veth is deleted; that work is queued.
    pid = node.agent_pid
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    _, status = os.waitpid(pid, 0)
    node.agent_pid = None
    fresh_lab.state.save()

    assert os.waitstatus_to_exitcode(status) == 0
    assert not Path(node.socket).exists()
    log = Path(node.log).read_text()
    assert "SIGTERM: shutting down" in log
    assert "stopped; pods keep forwarding" in log
    assert fresh_lab.pod_links() == []  # the queued veth deletions ran before exit


@pytest.mark.usefixtures("require_etcd")
def test_sigterm_during_start_up_unwinds_it_and_exits_0(fresh_lab: NodeLab) -> None:
    """In cluster mode with no operator, start-up waits for pod CIDRs: a
    stop then must not wait for it, nor leave the lock or the membership."""
    node = fresh_lab.node
    lab.stop_agent(node)
    with EtcdServer(netns=node.netns) as etcd:
        node.agent_args = [
            *("--etcd-endpoint", etcd.endpoint, "--node-ip", "192.168.100.9"),
        ]
        start = len(Path(node.log).read_text())
        proc = lab.start_agent(node, wait=False)
        fresh_lab.state.save()
        deadline = time.monotonic() + 30
        while "registered node" not in Path(node.log).read_text()[start:]:
            assert proc.poll() is None and time.monotonic() < deadline, Path(node.log).read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        node.agent_pid = None
        log = Path(node.log).read_text()[start:]
        assert "SIGTERM during start-up: stopping" in log
        assert "stopped before serving" in log
    node.agent_args = []
    lab.start_agent(node)  # nothing held: the next agent starts at once
    fresh_lab.state.save()
    assert fresh_lab.api.healthy()
