"""Pod egress bandwidth with the agent's bandwidth manager (Cilium's way: a
departure time per packet on the uplink's egress, fq keeping it), measured
with real traffic: iperf3 from pods in their own namespaces, through a real
agent and the real CNI shim, to a server in a peer namespace across the
node's uplink. The limit comes as kubelet gives it to a plugin with the
``bandwidth`` capability (runtimeConfig.bandwidth.egressRate, bits/s) or as
Cilium reads it (the Pod's kubernetes.io/egress-bandwidth annotation).

Rates are judged against the limit itself, with bounds the limit implies:
TCP over a paced path gets close to it and never above it (the departure
times count headers too, so goodput is a little under); a pod without a
limit, in the same run, goes several times faster, so the limit is what held
the first one back."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ciliate.control.agent.client import AgentClient
from ciliate.control.lab import lab

from ..cni.conftest import run_shim

NODE_IP, PEER_IP = "192.168.77.1", "192.168.77.2"
POD_CIDR = "10.244.77.0/24"
IPERF_PORT = 5201
LIMIT = 20_000_000  # bits/s
SECONDS = 3


def _ip(netns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", netns, *args], check=True, capture_output=True)


@dataclass
class BandwidthLab:
    node_netns: str
    node: lab.NodeState
    bin_dir: Path
    made: list[str]  # pod namespaces, removed at the end

    def api(self) -> AgentClient:
        return AgentClient(self.node.socket)

    def pod(
        self, *, egress_rate: int | None = None, pod_name: str | None = None
    ) -> tuple[str, str, str]:
        """A pod networked by ciliate-cni (ADD as containerd sends it);
        returns (netns, container ID, IP)."""
        netns, container_id, proc = self.add(egress_rate=egress_rate, pod_name=pod_name)
        assert proc.returncode == 0, proc.stdout
        ip = json.loads(proc.stdout)["ips"][0]["address"].split("/")[0]
        return netns, container_id, ip

    def add(
        self, *, egress_rate: int | None = None, pod_name: str | None = None
    ) -> tuple[str, str, subprocess.CompletedProcess[bytes]]:
        """ADD of a new pod namespace: (netns, container ID, the shim's run)."""
        netns = f"{self.node_netns}-p{secrets.token_hex(2)}"
        subprocess.run(["ip", "netns", "add", netns], check=True)
        self.made.append(netns)
        container_id = secrets.token_hex(32)
        conf: dict[str, Any] = {
            "cniVersion": "1.0.0",
            "name": "ciliate",
            "type": "ciliate-cni",
            "agentSocket": self.node.socket,
        }
        if egress_rate is not None:
            conf["runtimeConfig"] = {
                "bandwidth": {"egressRate": egress_rate, "egressBurst": 2**31 - 1}
            }
        env = {
            "CNI_COMMAND": "ADD",
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": f"/run/netns/{netns}",
            "CNI_IFNAME": "eth0",
            "CNI_PATH": str(self.bin_dir),
            "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;"
            f"K8S_POD_NAME={pod_name or netns}",
        }
        return netns, container_id, run_shim(self.bin_dir / "ciliate-cni", env, conf)

    def delete(self, netns: str, container_id: str) -> None:
        env = {
            "CNI_COMMAND": "DEL",
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": f"/run/netns/{netns}",
            "CNI_IFNAME": "eth0",
            "CNI_PATH": str(self.bin_dir),
        }
        conf = {"cniVersion": "1.0.0", "name": "ciliate", "type": "ciliate-cni"}
        proc = run_shim(
            self.bin_dir / "ciliate-cni", env, {**conf, "agentSocket": self.node.socket}
        )
        assert proc.returncode == 0, proc.stdout

    def htb_classes(self) -> set[str]:
        """The uplink's htb classes (shaped mode), as tc names them (1:<hex>)."""
        out = subprocess.run(
            ["tc", "-n", self.node_netns, "class", "show", "dev", "uplink"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return {line.split()[2] for line in out.splitlines() if line.startswith("class htb ")}

    def iperf(self, netns: str) -> float:
        """bits/s the server received from a TCP stream of SECONDS from ``netns``."""
        proc = subprocess.run(
            [
                *("ip", "netns", "exec", netns, "iperf3", "-c", PEER_IP),
                *("-p", str(IPERF_PORT), "-t", str(SECONDS), "-J"),
            ],
            capture_output=True,
            text=True,
            timeout=SECONDS + 30,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
        return float(json.loads(proc.stdout)["end"]["sum_received"]["bits_per_second"])


@pytest.fixture(scope="module")
def bw_lab(bpf_objects: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BandwidthLab]:
    """A node namespace whose uplink is cabled to a peer namespace (the
    iperf3 server, which routes the pod CIDR to the node), its agent run
    with --bandwidth-manager."""
    tag = secrets.token_hex(3)
    node_netns, peer_netns = f"tbw{tag}-node", f"tbw{tag}-peer"
    made: list[str] = []
    with contextlib.ExitStack() as cleanup:
        for netns in (node_netns, peer_netns):
            subprocess.run(["ip", "netns", "add", netns], check=True)
            cleanup.callback(subprocess.run, ["ip", "netns", "del", netns], check=False)
            _ip(netns, "link", "set", "lo", "up")
        # Both ends made inside lab namespaces: nothing in the root one.
        _ip(node_netns, "link", "add", "uplink", "type", "veth", "peer", "name", "peer0")
        _ip(node_netns, "link", "set", "peer0", "netns", peer_netns)
        _ip(node_netns, "addr", "add", f"{NODE_IP}/24", "dev", "uplink")
        _ip(node_netns, "link", "set", "uplink", "up")
        _ip(peer_netns, "addr", "add", f"{PEER_IP}/24", "dev", "peer0")
        _ip(peer_netns, "link", "set", "peer0", "up")
        _ip(peer_netns, "route", "add", POD_CIDR, "via", NODE_IP)
        server = subprocess.Popen(
            ["ip", "netns", "exec", peer_netns, "iperf3", "-s", "-p", str(IPERF_PORT)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        cleanup.callback(server.wait, timeout=10)
        cleanup.callback(server.terminate)
        workdir = tmp_path_factory.mktemp("bw")
        agent_args = ["--node-ip", NODE_IP, "--uplink", "uplink", "--bandwidth-manager"]
        node, bin_dir, _ = cleanup.enter_context(
            lab.agent_in(
                f"/run/netns/{node_netns}", workdir, pod_cidr=POD_CIDR, agent_args=agent_args
            )
        )
        # Pods' namespaces go before the agent and the node (last in, first out).
        cleanup.callback(lambda: [subprocess.run(["ip", "netns", "del", n]) for n in made])
        yield BandwidthLab(node_netns, node, bin_dir, made)


def _kernel_has_fq(netns: str) -> bool:
    """Whether fq can be a qdisc here: tried on the peer's own veth."""
    tried = subprocess.run(
        ["tc", "-n", netns, "qdisc", "replace", "dev", "peer0", "root", "fq"],
        capture_output=True,
        text=True,
        check=False,
    )
    subprocess.run(
        ["tc", "-n", netns, "qdisc", "del", "dev", "peer0", "root"],
        capture_output=True,
        check=False,
    )
    return tried.returncode == 0


def test_the_agent_paces_with_fq_on_the_uplink_or_shapes_with_htb(bw_lab: BandwidthLab) -> None:
    root = subprocess.run(
        ["tc", "-n", bw_lab.node_netns, "qdisc", "show", "dev", "uplink", "root"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    log = Path(bw_lab.node.log).read_text()
    if _kernel_has_fq(bw_lab.node_netns.replace("-node", "-peer")):
        assert root.startswith("qdisc fq "), root
        assert "horizon 2s" in root and "horizon_drop" in root, root
        assert "fq on uplink paces pods' egress" in log
    else:
        assert root.startswith("qdisc htb 1: ") and "default 0" in root, root
        assert "no fq qdisc (CONFIG_NET_SCH_FQ): pods' egress bandwidth is shaped" in log


def test_a_pods_egress_rate_holds_and_a_pod_without_one_is_not_held(
    bw_lab: BandwidthLab,
) -> None:
    limited, limited_id, limited_ip = bw_lab.pod(egress_rate=LIMIT)
    free, _, _ = bw_lab.pod()
    with bw_lab.api() as client:
        rates = {e["ip"]: e["egress_rate"] for e in client.get("/v1/endpoints")}
    assert rates[limited_ip] == LIMIT
    # Interleaved, so load on the machine hits both alike.
    got_limited = [bw_lab.iperf(limited)]
    got_free = [bw_lab.iperf(free)]
    got_limited.append(bw_lab.iperf(limited))
    best = max(got_limited)
    print(f"limited {[f'{r / 1e6:.1f}' for r in got_limited]} Mbit/s of {LIMIT / 1e6:.0f};"
          f" free {got_free[0] / 1e6:.0f} Mbit/s")  # fmt: skip
    # Never above the limit (a little slack for iperf3's own accounting of
    # the last interval), and not far below it.
    assert best <= LIMIT * 1.05, got_limited
    assert min(got_limited) >= LIMIT * 0.6, got_limited
    assert got_free[0] >= LIMIT * 5, (got_free, got_limited)

    # DEL takes the limit away with the pod; shaped, its htb class goes too.
    offset = int(ipaddress.IPv4Address(limited_ip)) - int(ipaddress.IPv4Network(POD_CIDR)[0])
    pod_class = f"1:{offset:x}"  # the pod CIDR is the node's only one: slot = offset
    shaped = not _kernel_has_fq(bw_lab.node_netns.replace("-node", "-peer"))
    assert (pod_class in bw_lab.htb_classes()) == shaped
    bw_lab.delete(limited, limited_id)
    assert pod_class not in bw_lab.htb_classes()


def test_the_pods_annotation_sets_the_rate_as_cilium_reads_it(bw_lab: BandwidthLab) -> None:
    name = f"bw{secrets.token_hex(2)}"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "default",
            "annotations": {"kubernetes.io/egress-bandwidth": "10M"},
        },
        "spec": {"containers": [{"name": "main", "image": "busybox"}]},
    }
    with bw_lab.api() as client:
        client.post("/v1/objects/apply", {"objects": [pod]})
    try:
        netns, _, ip = bw_lab.pod(pod_name=name)
        with bw_lab.api() as client:
            rates = {e["ip"]: e["egress_rate"] for e in client.get("/v1/endpoints")}
        assert rates[ip] == 10_000_000
        rate = bw_lab.iperf(netns)
        assert 10_000_000 * 0.6 <= rate <= 10_000_000 * 1.05, rate
    finally:
        with bw_lab.api() as client:
            client.post("/v1/objects/delete", {"objects": [pod], "ignore_missing": True})


@pytest.mark.parametrize(
    ("annotation", "expected"),
    [("10", "unreasonably small"), ("2P", "unreasonably large"), ("ten", "not a quantity")],
)
def test_a_rate_kubelet_would_refuse_is_refused_and_nothing_is_made(
    bw_lab: BandwidthLab, annotation: str, expected: str
) -> None:
    name = f"bad{secrets.token_hex(2)}"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "default",
            "annotations": {"kubernetes.io/egress-bandwidth": annotation},
        },
        "spec": {"containers": [{"name": "main", "image": "busybox"}]},
    }
    with bw_lab.api() as client:
        client.post("/v1/objects/apply", {"objects": [pod]})
        before = client.get("/v1/endpoints")
    try:
        _, _, proc = bw_lab.add(pod_name=name)
        error = json.loads(proc.stdout)
        assert proc.returncode != 0 and error["code"] == 7, error
        assert expected in error["msg"] and "kubernetes.io/egress-bandwidth" in error["msg"], error
        with bw_lab.api() as client:
            assert client.get("/v1/endpoints") == before
    finally:
        with bw_lab.api() as client:
            client.post("/v1/objects/delete", {"objects": [pod], "ignore_missing": True})


def test_a_limit_holds_across_an_agent_restart(bw_lab: BandwidthLab) -> None:
    """The rate is in the endpoint's record and the pinned map; a restarted
    agent keeps the uplink's qdisc (and, shaped, the pod's class) as it was."""
    netns, container_id, _ = bw_lab.pod(egress_rate=LIMIT)
    classes = bw_lab.htb_classes()
    lab.stop_agent(bw_lab.node)
    lab.start_agent(bw_lab.node)
    assert bw_lab.htb_classes() == classes
    rate = bw_lab.iperf(netns)
    assert LIMIT * 0.6 <= rate <= LIMIT * 1.05, rate
    bw_lab.delete(netns, container_id)


def test_the_agent_refuses_a_bandwidth_manager_without_an_uplink(tmp_path: Path) -> None:
    netns = f"tbw{secrets.token_hex(3)}-lone"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    bpffs = Path(f"/sys/fs/bpf/{netns}")
    try:
        proc = subprocess.run(
            [
                *("nsenter", f"--net=/run/netns/{netns}", sys.executable),
                *("-m", "ciliate.control.agent.main", "--node-name", "lone"),
                *("--pod-cidr", POD_CIDR, "--bandwidth-manager"),
                *("--state-dir", str(tmp_path / "state"), "--socket", str(tmp_path / "a.sock")),
                *("--bpffs-root", str(bpffs)),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        # Refused before anything was loaded or pinned.
        assert not bpffs.exists() or not any(bpffs.rglob("ciliate_*"))
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)
        shutil.rmtree(bpffs, ignore_errors=True)
    assert proc.returncode == 2
    assert "--bandwidth-manager needs --uplink" in proc.stderr, proc.stderr


def test_a_limited_add_whose_class_cannot_be_made_fails_and_leaves_nothing(
    bw_lab: BandwidthLab,
) -> None:
    """Shaped (no fq here): the uplink's htb root removed behind the agent's
    back. A limited pod's ADD fails (code 101, saying what to do) and is
    rolled back: no endpoint, no IP, no veth; an unlimited pod still works."""
    if _kernel_has_fq(bw_lab.node_netns.replace("-node", "-peer")):
        pytest.skip("paced with fq: no class per pod")
    with bw_lab.api() as client:
        before = (client.get("/v1/endpoints"), client.get("/v1/ipam")["allocations"])
    links_before = _links(bw_lab.node_netns)
    subprocess.run(
        ["tc", "-n", bw_lab.node_netns, "qdisc", "del", "dev", "uplink", "root"], check=True
    )
    try:
        _, _, proc = bw_lab.add(egress_rate=LIMIT)
        error = json.loads(proc.stdout)
        assert proc.returncode != 0 and error["code"] == 101, error
        assert "egress bandwidth" in error["msg"] and "restart the agent" in error["details"]
        with bw_lab.api() as client:
            assert (client.get("/v1/endpoints"), client.get("/v1/ipam")["allocations"]) == before
        assert _links(bw_lab.node_netns) == links_before
        netns, container_id, _ = bw_lab.pod()
        bw_lab.delete(netns, container_id)
    finally:
        subprocess.run(
            [
                *("tc", "-n", bw_lab.node_netns, "qdisc", "replace", "dev", "uplink", "root"),
                *("handle", "1:", "htb", "default", "0"),
            ],
            check=True,
        )


def _links(netns: str) -> list[str]:
    out = subprocess.run(
        ["ip", "-n", netns, "-j", "link", "show"], capture_output=True, text=True, check=True
    ).stdout
    return sorted(link["ifname"] for link in json.loads(out))
