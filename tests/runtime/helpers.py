"""Checks shared by the runtime tests."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ciliate.control.lab.runtime.common import read_trace

from .plugins import PluginSet


def node_veths(netns: str) -> list[str]:
    """Names of the veths in a netns (given by path)."""
    out = subprocess.run(
        ["nsenter", f"--net={netns}", "ip", "-j", "link", "show", "type", "veth"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sorted(link["ifname"] for link in json.loads(out or "[]"))


def bridge_ports(netns: str, bridge: str) -> list[str]:
    out = subprocess.run(
        ["nsenter", f"--net={netns}", "ip", "-j", "link", "show", "master", bridge],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return sorted(link["ifname"] for link in json.loads(out or "[]"))


def assert_pod_ip(ip: str, cni: PluginSet) -> None:
    addr = ipaddress.IPv4Address(ip)
    if cni.subnet is not None:
        assert addr in cni.subnet, f"{ip} is not in {cni.subnet}"


def assert_ping(result: subprocess.CompletedProcess[str], target: str) -> None:
    assert result.returncode == 0, f"ping {target} failed:\n{result.stdout}{result.stderr}"
    assert "1 packets received" in result.stdout, result.stdout


def assert_nothing_left(
    *,
    node_netns: str,
    baseline_veths: Iterable[str],
    cni: PluginSet,
    lab_leftovers: list[str],
    netns_paths: Iterable[str],
) -> None:
    """No veth beyond the baseline in the node, no port on the bridge, no IPAM lease,
    no cached CNI result, no pod netns."""
    assert node_veths(node_netns) == sorted(baseline_veths), "veths left in the node netns"
    if cni.bridge is not None:
        assert bridge_ports(node_netns, cni.bridge) == [], f"ports left on {cni.bridge}"
    assert cni.leftovers() == [], "the plugin set kept state for removed pods"
    assert lab_leftovers == [], "the runtime left state on the host"
    for path in netns_paths:
        assert not Path(path).exists(), f"pod netns {path} still exists"


@dataclass(frozen=True)
class Call:
    """One recorded CNI plugin call (see ``traced_plugin_dir``)."""

    plugin: str
    env: dict[str, str]
    conf: dict[str, Any] | None
    rc: int

    @property
    def command(self) -> str:
        return self.env.get("CNI_COMMAND", "")

    @property
    def cni_args(self) -> dict[str, str]:
        pairs = (kv.split("=", 1) for kv in self.env.get("CNI_ARGS", "").split(";") if "=" in kv)
        return dict(pairs)


def plugin_calls(log: Path, plugin: str | None = None) -> list[Call]:
    calls = []
    for raw in read_trace(log):
        call = Call(
            plugin=str(raw["plugin"]),
            env=dict(raw["env"]),  # type: ignore[call-overload]
            conf=raw["conf"] if isinstance(raw["conf"], dict) else None,
            rc=int(raw["rc"]),  # type: ignore[call-overload]
        )
        if plugin is None or call.plugin == plugin:
            calls.append(call)
    return calls
