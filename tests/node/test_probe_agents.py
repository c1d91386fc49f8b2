"""Probes of the agent's process as an unlucky operator meets it: a second agent
started by mistake on a node that runs one."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ciliate.control.lab import lab

from .conftest import NodeLab
from .test_policy import apply, deny_ingress, pod_object


def test_a_second_agent_with_paths_of_its_own_in_the_nodes_namespace_refuses_and_changes_nothing(
    fresh_lab: NodeLab, tmp_path: Path
) -> None:
    """An operator runs ``ciliate-agent`` by hand on a node whose agent a unit runs
    with other paths (its defaults: another state directory, socket and bpffs
    root). The flocks on those paths do not meet, but the node's namespace is the
    same: an agent there takes cilium_host's program and removes every ``lxc``
    veth it has no record of. It must refuse, naming the running agent, and leave
    the pods forwarding with their policy."""
    node_lab = fresh_lab
    node = node_lab.node
    a, b, c = node_lab.pod("a"), node_lab.pod("b"), node_lab.pod("c")
    apply(node_lab, pod_object(a, app="a"), pod_object(b, app="b"), pod_object(c, app="c"))
    apply(node_lab, deny_ingress("deny-b", app="b"))
    for pod in (a, b, c):
        node_lab.add(pod)
    assert b.ip and c.ip
    links = node_lab.host_links()
    bpffs_root = Path(f"/sys/fs/bpf/{node_lab.state.prefix}-intruder")
    intruder_socket = tmp_path / "run" / "agent.sock"
    proc = subprocess.Popen(
        [
            *("nsenter", f"--net=/run/netns/{node.netns}", sys.executable, "-m"),
            *("ciliate.control.agent.main", "--node-name", "intruder"),
            *("--pod-cidr", node.pod_cidr, "--state-dir", str(tmp_path / "state")),
            *("--socket", str(intruder_socket), "--bpffs-root", str(bpffs_root)),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and not intruder_socket.exists():
            assert time.monotonic() < deadline, "the second agent neither served nor exited"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, stderr = proc.communicate(timeout=30)
        # The intruder's pins (links on cilium_host's cgroup go with them).
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(bpffs_root)
    damage = {
        "links": node_lab.host_links() == links,
        "a->c": node_lab.ping(a, c.ip),
        "node->c": lab.ping(node.netns, c.ip),
        "a->b denied": not node_lab.ping(a, b.ip),
    }
    assert proc.returncode == 2, (damage, stderr[-3000:])
    assert f"another agent (pid {node.agent_pid}) already runs" in stderr, stderr
    assert all(damage.values()), damage
    for pod in (a, b, c):
        node_lab.cni(pod, "DEL")
