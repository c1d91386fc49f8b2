"""podman 4.3 (CNI backend) in a lab node: containers get a network from the plugin
set, reach each other, and leave nothing behind when removed."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from ciliate.control.lab.runtime.common import (
    REFERENCE_PLUGIN_DIR,
    CommandError,
    RuntimeUnavailable,
    reference_conflist,
    traced_plugin_dir,
)
from ciliate.control.lab.runtime.podman import PodmanLab

from . import plugins
from .helpers import assert_nothing_left, assert_ping, assert_pod_ip, node_veths, plugin_calls

PING = ("ping", "-c", "1", "-W", "2")


def test_two_containers_reach_each_other_and_leave_nothing(
    podman_lab: PodmanLab, cni: plugins.PluginSet, node_netns: str
) -> None:
    lab = podman_lab
    baseline = node_veths(node_netns)
    lab.run("a")
    lab.run("b")
    ip_a, ip_b = lab.ip_of("a"), lab.ip_of("b")
    assert ip_a != ip_b
    for ip in (ip_a, ip_b):
        assert_pod_ip(ip, cni)
    netns_paths = [lab.netns_of("a"), lab.netns_of("b")]
    assert all(Path(p).exists() for p in netns_paths)
    assert len(node_veths(node_netns)) == len(baseline) + 2, "one host-side veth per container"

    lo = lab.exec("a", ["cat", "/sys/class/net/lo/operstate"])
    assert lo.returncode == 0 and lo.stdout.strip() in ("up", "unknown"), lo.stdout + lo.stderr
    assert_ping(lab.exec("b", [*PING, ip_a]), ip_a)
    assert_ping(lab.exec("a", [*PING, ip_b]), ip_b)

    lab.rm("a")
    lab.rm("b")
    assert lab.container_ids() == []
    assert_nothing_left(
        node_netns=node_netns,
        baseline_veths=baseline,
        cni=cni,
        lab_leftovers=lab.leftovers(),
        netns_paths=netns_paths,
    )


def test_stop_and_start_gives_the_network_back(
    podman_lab: PodmanLab, cni: plugins.PluginSet, node_netns: str
) -> None:
    """``stop`` sends DEL, ``start`` a fresh ADD into a new netns."""
    lab = podman_lab
    baseline = node_veths(node_netns)
    lab.run("a")
    lab.run("b")
    first_netns = lab.netns_of("b")
    lab.podman("stop", "--time", "0", "b")
    assert not Path(first_netns).exists(), "stop keeps the pod netns"
    assert len(node_veths(node_netns)) == len(baseline) + 1, "stop keeps the veth"
    lab.podman("start", "b")
    ip_a, ip_b = lab.ip_of("a"), lab.ip_of("b")
    assert_pod_ip(ip_b, cni)
    assert_ping(lab.exec("b", [*PING, ip_a]), ip_a)
    assert_ping(lab.exec("a", [*PING, ip_b]), ip_b)
    netns_paths = [lab.netns_of("a"), lab.netns_of("b")]
    lab.rm("a")
    lab.rm("b")
    assert_nothing_left(
        node_netns=node_netns,
        baseline_veths=baseline,
        cni=cni,
        lab_leftovers=lab.leftovers(),
        netns_paths=netns_paths,
    )


def test_run_rm_cycle_time(
    podman_lab: PodmanLab,
    cni: plugins.PluginSet,
    node_netns: str,
    timings: dict[str, list[float]],
) -> None:
    baseline = node_veths(node_netns)
    for i in range(5):
        timings.setdefault(f"podman run + rm -f [{cni.name}]", []).append(podman_lab.cycle(f"c{i}"))
    assert_nothing_left(
        node_netns=node_netns,
        baseline_veths=baseline,
        cni=cni,
        lab_leftovers=podman_lab.leftovers(),
        netns_paths=[],
    )


def test_plugin_calls_are_what_lab_notes_say(
    cni: plugins.PluginSet, node_netns: str, tmp_path: Path
) -> None:
    """Every plugin of the network, traced: VERSION first, ADD with a 64-hex id,
    /run/netns/netns-<uuid>, eth0, K8S_POD_NAME; the netconf gets name and
    cniVersion; DEL carries prevResult."""
    conflist = json.loads(next(iter(sorted(cni.conf_dir.glob("*.conflist")))).read_text())
    types = sorted({p["type"] for p in conflist["plugins"]})
    log = tmp_path / "trace.jsonl"
    traced = traced_plugin_dir(tmp_path / "traced", cni.plugin_dirs, types, log)
    try:
        lab = PodmanLab(
            node_netns=node_netns,
            cni_conf_dir=cni.conf_dir,
            cni_plugin_dirs=[traced, *cni.plugin_dirs],
            network=cni.network,
        )
    except RuntimeUnavailable as exc:
        pytest.skip(f"podman cannot run here: {exc}")
    with lab:
        cid = lab.run("traced")
        lab.rm("traced")
        assert lab.leftovers() == []
    calls = plugin_calls(log, conflist["plugins"][0]["type"])
    commands = [c.command for c in calls]
    assert "ADD" in commands and "DEL" in commands, commands
    if "VERSION" in commands:
        assert commands.index("VERSION") < commands.index("ADD")
    add = calls[commands.index("ADD")]
    assert add.rc == 0
    assert add.env["CNI_CONTAINERID"] == cid and re.fullmatch("[0-9a-f]{64}", cid)
    assert re.fullmatch(r"/run/netns/netns-[0-9a-f-]{36}", add.env["CNI_NETNS"]), add.env
    assert add.env["CNI_IFNAME"] == "eth0"
    assert add.cni_args.get("K8S_POD_NAME") == "traced", add.env["CNI_ARGS"]
    assert add.conf is not None
    assert add.conf["name"] == cni.network
    assert add.conf["cniVersion"] == conflist["cniVersion"]
    last_del = [c for c in calls if c.command == "DEL"][-1]
    assert last_del.conf is not None and "prevResult" in last_del.conf


def test_failed_add_leaves_nothing(node_netns: str, tmp_path: Path) -> None:
    """A network with one free address: the second container's ADD fails, podman
    reports it, DELs, and the node keeps no veth and no lease for it."""
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    conflist = reference_conflist(
        name="crtone", subnet="10.88.9.0/24", bridge="crt1", data_dir=tmp_path / "host-local"
    )
    one = {"subnet": "10.88.9.0/24", "rangeStart": "10.88.9.10", "rangeEnd": "10.88.9.10"}
    conflist["plugins"][0]["ipam"]["ranges"] = [[one]]  # type: ignore[index]
    (conf_dir / "10-one.conflist").write_text(json.dumps(conflist))
    log = tmp_path / "trace.jsonl"
    traced = traced_plugin_dir(tmp_path / "traced", [REFERENCE_PLUGIN_DIR], ["bridge"], log)
    try:
        lab = PodmanLab(
            node_netns=node_netns,
            cni_conf_dir=conf_dir,
            cni_plugin_dirs=[traced, REFERENCE_PLUGIN_DIR],
        )
    except RuntimeUnavailable as exc:
        pytest.skip(f"podman cannot run here: {exc}")
    with lab:
        lab.run("first")
        assert lab.ip_of("first") == "10.88.9.10"
        with pytest.raises(CommandError):
            lab.run("second")
        time.sleep(0.2)
        assert len(node_veths(node_netns)) == 1, "the failed ADD left a veth"
        lab.podman("rm", "--all", "--force", "--time", "0")
        assert node_veths(node_netns) == []
        leases = [p.name for p in (tmp_path / "host-local" / "crtone").iterdir()]
        assert "10.88.9.10" not in leases
    commands = [c.command for c in plugin_calls(log)]
    failed = [i for i, c in enumerate(plugin_calls(log)) if c.command == "ADD" and c.rc != 0]
    assert failed, commands
    assert commands[failed[0] + 1] == "DEL", f"no DEL right after the failed ADD: {commands}"
