"""containerd 1.6 + CRI in a lab node: pod sandboxes get a network from the plugin
set, reach each other, and leave nothing behind when stopped and removed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ciliate.control.lab.runtime.common import RuntimeUnavailable, traced_plugin_dir
from ciliate.control.lab.runtime.containerd import ContainerdLab

from . import plugins
from .helpers import assert_nothing_left, assert_ping, assert_pod_ip, node_veths, plugin_calls

PING = ("/bin/busybox", "ping", "-c", "1", "-W", "2")


def test_two_sandboxes_reach_each_other_and_leave_nothing(
    containerd_lab: ContainerdLab, cni: plugins.PluginSet, node_netns: str
) -> None:
    lab = containerd_lab
    baseline = node_veths(node_netns)
    a = lab.run_sandbox("pod-a")
    b = lab.run_sandbox("pod-b")
    ip_a, ip_b = lab.ip_of(a), lab.ip_of(b)
    assert ip_a and ip_b and ip_a != ip_b, (ip_a, ip_b)
    for ip in (ip_a, ip_b):
        assert_pod_ip(ip, cni)
    netns_paths = [lab.netns_of(a), lab.netns_of(b)]
    assert all(Path(p).exists() for p in netns_paths)
    assert len(node_veths(node_netns)) == len(baseline) + 2, "one host-side veth per sandbox"

    lo = lab.exec_in_netns(a, ["cat", "/sys/class/net/lo/operstate"])
    assert lo.returncode == 0, lo.stderr
    assert_ping(lab.exec_in_netns(b, [*PING, ip_a]), ip_a)
    assert_ping(lab.exec_in_netns(a, [*PING, ip_b]), ip_b)

    lab.remove(a)
    lab.remove(b)
    assert lab.cri is not None and lab.cri.list_pod_sandbox() == []
    assert_nothing_left(
        node_netns=node_netns,
        baseline_veths=baseline,
        cni=cni,
        lab_leftovers=lab.leftovers(),
        netns_paths=netns_paths,
    )


def test_stop_twice_then_remove(
    containerd_lab: ContainerdLab, cni: plugins.PluginSet, node_netns: str
) -> None:
    """kubelet may stop a sandbox more than once: each is a DEL, none may fail."""
    lab = containerd_lab
    baseline = node_veths(node_netns)
    sandbox = lab.run_sandbox("pod-s")
    netns = lab.netns_of(sandbox)
    lab.stop(sandbox)
    assert node_veths(node_netns) == baseline, "stop keeps the veth"
    lab.stop(sandbox)
    lab.remove(sandbox)
    assert_nothing_left(
        node_netns=node_netns,
        baseline_veths=baseline,
        cni=cni,
        lab_leftovers=lab.leftovers(),
        netns_paths=[netns],
    )


def test_sandbox_cycle_time(
    containerd_lab: ContainerdLab,
    cni: plugins.PluginSet,
    node_netns: str,
    timings: dict[str, list[float]],
) -> None:
    baseline = node_veths(node_netns)
    for i in range(5):
        timings.setdefault(f"CRI RunPodSandbox + Stop + Remove [{cni.name}]", []).append(
            containerd_lab.cycle(f"pod-c{i}")
        )
    assert_nothing_left(
        node_netns=node_netns,
        baseline_veths=baseline,
        cni=cni,
        lab_leftovers=containerd_lab.leftovers(),
        netns_paths=[],
    )


def test_plugin_calls_are_what_lab_notes_say(
    cni: plugins.PluginSet, node_netns: str, tmp_path: Path
) -> None:
    """containerd runs loopback, passes K8S_POD_NAMESPACE / NAME / INFRA_CONTAINER_ID
    / UID in CNI_ARGS, and sends DEL twice (stop, then remove)."""
    conflist = json.loads(next(iter(sorted(cni.conf_dir.glob("*.conflist")))).read_text())
    main = conflist["plugins"][0]["type"]
    log = tmp_path / "trace.jsonl"
    traced = traced_plugin_dir(tmp_path / "traced", cni.plugin_dirs, [main, "loopback"], log)
    try:
        lab = ContainerdLab(
            node_netns=node_netns,
            cni_conf_dir=cni.conf_dir,
            cni_plugin_dirs=[traced, *cni.plugin_dirs],
        )
    except RuntimeUnavailable as exc:
        pytest.skip(f"containerd cannot run here: {exc}")
    with lab:
        sandbox = lab.run_sandbox("pod-t", namespace="crt-ns")
        lab.remove(sandbox)
        assert lab.leftovers() == []
    calls = plugin_calls(log, main)
    commands = [c.command for c in calls]
    assert commands.count("ADD") == 1 and commands.count("DEL") == 2, commands
    add = calls[commands.index("ADD")]
    assert add.rc == 0
    assert add.env["CNI_CONTAINERID"] == sandbox.id and re.fullmatch("[0-9a-f]{64}", sandbox.id)
    assert add.env["CNI_IFNAME"] == "eth0"
    args = add.cni_args
    assert args.get("K8S_POD_NAMESPACE") == "crt-ns", args
    assert args.get("K8S_POD_NAME") == "pod-t", args
    assert args.get("K8S_POD_INFRA_CONTAINER_ID") == sandbox.id, args
    assert args.get("K8S_POD_UID") == sandbox.uid, args
    assert add.conf is not None and add.conf["name"] == cni.network
    loopback = [c.command for c in plugin_calls(log, "loopback")]
    assert "ADD" in loopback, loopback
