"""PodNetwork with the reference plugins: pods get addresses, reach each other,
and DEL / close leave nothing behind (veths, host-local files, namespaces)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from ciliate.bench import podnet

from .conftest import need


def _ping(src: podnet.Pod, ip: str) -> bool:
    cmd = podnet.netns_exec(src.netns, "ping", "-c1", "-W2", ip)
    return subprocess.run(cmd, capture_output=True, check=False, timeout=10).returncode == 0


@pytest.mark.parametrize("name", ["bridge", "ptp"])
def test_two_pods_ping_and_del_cleans_up(name: str, prefix: str) -> None:
    need()
    with podnet.PodNetwork(name, prefix=prefix) as net:
        assert net.node_netns in podnet.netns_list(prefix)
        a, b = net.add_pod("a"), net.add_pod("b")
        assert a.ip != b.ip
        assert a.add_ns > 0 and b.add_ns > 0
        assert _ping(a, b.ip) and _ping(b, a.ip)
        assert net.link(a)["mtu"] >= 1280

        ipam = net.workdir / "ipam" / f"bench-{name}"
        assert (ipam / a.ip).is_file() and (ipam / b.ip).is_file()
        veths = [i for i in a.host_interfaces if i.startswith("veth")]
        assert veths and set(veths) <= set(net.node_links())

        assert net.del_pod(a) > 0
        assert a.del_ns is not None
        assert not set(veths) & set(net.node_links())
        assert not (ipam / a.ip).exists()
        assert (ipam / b.ip).is_file()
        assert a.netns not in podnet.netns_list(prefix)
        assert [p.name for p in net.pods] == ["b"]
        assert [(t.op, t.pod) for t in net.timings] == [("ADD", "a"), ("ADD", "b"), ("DEL", "a")]
        workdir = net.workdir
    # close() DELs b, removes its namespace, the node and host-local's directory.
    assert not workdir.exists()
    assert podnet.netns_list(prefix) == []


def test_bridge_nonf_sets_the_sysctl_in_the_node_only(prefix: str) -> None:
    need("sysctl", plugins=("bridge", "host-local"))
    key = "net.bridge.bridge-nf-call-iptables"
    root_before = Path("/proc/sys/net/bridge/bridge-nf-call-iptables").read_text()
    with podnet.PodNetwork("bridge-nonf", prefix=prefix) as net:
        out = subprocess.run(
            podnet.netns_exec(net.node_netns, "sysctl", "-n", key),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert out.strip() == "0"
    assert Path("/proc/sys/net/bridge/bridge-nf-call-iptables").read_text() == root_before


def test_conflist_chains_plugins_with_prev_result(prefix: str) -> None:
    need(plugins=("bridge", "host-local", "tuning"))

    def prepare(ctx: podnet.NodeContext) -> podnet.PreparedNetwork:
        bridge = podnet.bridge().prepare(ctx).config
        conflist = {
            "cniVersion": "1.0.0",
            "name": "bench-chain",
            "plugins": [
                {k: v for k, v in bridge.items() if k not in ("name", "cniVersion")},
                {"type": "tuning", "sysctl": {"net.ipv4.conf.eth0.arp_notify": "1"}},
            ],
        }
        return podnet.PreparedNetwork(bin_dirs=(podnet.REFERENCE_PLUGIN_DIR,), config=conflist)

    spec = podnet.NetworkDef(name="chain", description="bridge + tuning", prepare=prepare)
    with podnet.PodNetwork(spec, prefix=prefix) as net:
        pod = net.add_pod("a")
        out = subprocess.run(
            podnet.netns_exec(pod.netns, "sysctl", "-n", "net.ipv4.conf.eth0.arp_notify"),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert out.strip() == "1"
        assert set(net.plugin_versions) == {"bridge", "tuning"}
        net.del_pod(pod)


def test_failed_add_is_followed_by_del_and_leaves_no_namespace(prefix: str) -> None:
    need(plugins=("bridge", "host-local"))

    def prepare(ctx: podnet.NodeContext) -> podnet.PreparedNetwork:
        config = podnet.bridge().prepare(ctx).config
        config["ipam"]["ranges"] = [[{"subnet": "10.96.0.0/30"}]]  # room for one pod
        return podnet.PreparedNetwork(bin_dirs=(podnet.REFERENCE_PLUGIN_DIR,), config=config)

    spec = podnet.NetworkDef(name="tiny", description="one address", prepare=prepare)
    with podnet.PodNetwork(spec, prefix=prefix) as net:
        net.add_pod("a")
        with pytest.raises(podnet.CniError, match="ADD failed"):
            net.add_pod("b")
        assert net.pod_netns("b") not in podnet.netns_list(prefix)
        assert [p.name for p in net.pods] == ["a"]


def test_ciliate_is_skipped_while_its_set_up_is_not_implemented(prefix: str) -> None:
    need(plugins=())

    def unavailable(
        node_netns_path: str, workdir: Path, agent_args: Sequence[str]
    ) -> tuple[Path, podnet.Json, Callable[[], None]]:
        raise NotImplementedError("no agent here")

    spec = podnet.ciliate(setup=unavailable)
    with pytest.raises(podnet.NetworkSkipped, match="not implemented yet: no agent here"):
        podnet.PodNetwork(spec, prefix=prefix).open()
    skipped: dict[str, str] = {}
    with podnet.pod_networks(
        [spec], prefix=prefix, on_skip=lambda n, r: skipped.update({n: r})
    ) as nets:
        assert nets == {}
    assert "no agent here" in skipped["ciliate"]


def test_ciliate_set_up_gets_the_node_and_its_cleanup_runs(prefix: str) -> None:
    need(plugins=("bridge", "host-local"))
    calls: list[str] = []

    def hook(
        node_netns_path: str, workdir: Path, agent_args: Sequence[str]
    ) -> tuple[Path, podnet.Json, Callable[[], None]]:
        assert Path(node_netns_path).exists() and workdir.is_dir() and agent_args == ()
        calls.append(node_netns_path)
        ctx = podnet.NodeContext("n", node_netns_path, workdir, prefix)
        netconf = podnet.bridge(name="ciliate").prepare(ctx).config
        return podnet.REFERENCE_PLUGIN_DIR, netconf, lambda: calls.append("cleanup")

    with podnet.PodNetwork(podnet.ciliate(setup=hook), prefix=prefix) as net:
        net.add_pod("a")
        assert calls == [net.node_netns_path]
    assert calls[-1] == "cleanup"
