"""A pod's life through ciliate-cni, for every CNI spec version: ADD, the
result, pings, CHECK, DEL, and what is left afterwards."""

from __future__ import annotations

import concurrent.futures
import ipaddress

import pytest

from ciliate.control.lab import lab

from .conftest import NodeLab

VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]


@pytest.fixture(scope="module")
def peer(node_lab: NodeLab) -> lab.PodState:
    pod = node_lab.pod("peer")
    node_lab.add(pod)
    return pod


@pytest.mark.parametrize("version", VERSIONS)
def test_a_pod_is_added_checked_and_deleted_in_every_spec_version(
    node_lab: NodeLab, peer: lab.PodState, version: str
) -> None:
    pod = node_lab.pod()
    result = node_lab.add(pod, cni_version=version)

    # The result, in the version asked for.
    assert result["cniVersion"] == version
    (ip,) = result["ips"]
    address = ipaddress.IPv4Interface(ip["address"])
    assert address.network.prefixlen == 32
    assert address.ip in ipaddress.IPv4Network(node_lab.node.pod_cidr)
    assert ip["gateway"] == node_lab.router_ip
    assert ("version" in ip) == (version in ("0.3.0", "0.3.1", "0.4.0"))
    host, sandbox = result["interfaces"]
    assert host["name"].startswith("lxc") and sandbox["name"] == "eth0"
    assert sandbox["sandbox"] == f"/run/netns/{pod.netns}"
    assert {"dst": "0.0.0.0/0", "gw": node_lab.router_ip} in result["routes"]

    # It works: the gateway and a peer answer, through the BPF datapath.
    assert node_lab.ping(pod, node_lab.router_ip)
    assert node_lab.ping(pod, str(peer.ip))
    assert node_lab.ping(peer, str(address.ip))

    # Nothing per pod in the node's routing table.
    assert not [r for r in node_lab.routes() if str(address.ip) in r]

    # CHECK (0.4.0 and later) passes against the cached result.
    if version not in ("0.3.0", "0.3.1"):
        assert node_lab.cni(pod, "CHECK", cni_version=version, prev_result=result) == {}
    else:
        with pytest.raises(lab.CniCallError) as caught:
            node_lab.cni(pod, "CHECK", cni_version=version, prev_result=result)
        assert caught.value.code == 1

    # DEL frees everything; a second DEL (containerd sends two) succeeds too.
    links_before = node_lab.pod_links()
    node_lab.cni(pod, "DEL", cni_version=version, prev_result=result)
    node_lab.cni(pod, "DEL", cni_version=version, prev_result=result)
    assert host["name"] not in node_lab.wait_pod_links(len(links_before) - 1)
    assert str(address.ip) not in node_lab.get("/v1/ipam")["allocations"]
    assert str(address.ip) not in [e["ip"] for e in node_lab.get("/v1/bpf/endpoints")]
    assert f"{address.ip}/32" not in [e["prefix"] for e in node_lab.get("/v1/bpf/ipcache")]
    assert pod.container_id not in [e["container_id"] for e in node_lab.get("/v1/endpoints")]


def test_check_reports_a_pod_whose_veth_was_removed(node_lab: NodeLab) -> None:
    pod = node_lab.pod()
    result = node_lab.add(pod)
    lab._run("ip", "-n", pod.netns, "link", "del", "eth0")
    with pytest.raises(lab.CniCallError) as caught:
        node_lab.cni(pod, "CHECK", prev_result=result)
    assert "gone" in str(caught.value)
    node_lab.cni(pod, "DEL", prev_result=result)


def test_del_succeeds_when_the_pod_namespace_is_already_gone(node_lab: NodeLab) -> None:
    pod = node_lab.pod()
    result = node_lab.add(pod)
    lab._run("ip", "netns", "del", pod.netns)
    node_lab.cni(pod, "DEL", prev_result=result)
    assert result["ips"][0]["address"].split("/")[0] not in node_lab.get("/v1/ipam")["allocations"]


def test_a_second_add_of_one_container_and_interface_fails_and_keeps_the_first(
    node_lab: NodeLab,
) -> None:
    """CNI spec 1.1: "If an interface of the requested name already exists in
    the container, the CNI plugin MUST return with an error"."""
    pod = node_lab.pod()
    first = node_lab.add(pod)
    with pytest.raises(lab.CniCallError) as caught:
        node_lab.add(pod)
    assert caught.value.code == 100
    assert "exists already" in str(caught.value)
    # The first ADD's endpoint is untouched: CHECK passes, the pod answers.
    assert node_lab.cni(pod, "CHECK", prev_result=first) == {}
    assert node_lab.ping(pod, node_lab.router_ip)
    node_lab.cni(pod, "DEL", prev_result=first)


def test_32_concurrent_adds_get_distinct_reachable_ips_and_dels_leave_nothing(
    node_lab: NodeLab, peer: lab.PodState
) -> None:
    links_before = node_lab.pod_links()
    allocations_before = dict(node_lab.get("/v1/ipam")["allocations"])
    pods = [node_lab.pod(f"c{i}") for i in range(32)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(node_lab.add, pods))
        ips = [r["ips"][0]["address"] for r in results]
        assert len(set(ips)) == 32
        reach_peer = list(pool.map(lambda p: node_lab.ping(p, str(peer.ip)), pods))
        reach_back = list(pool.map(lambda p: node_lab.ping(peer, str(p.ip)), pods))
        assert all(reach_peer) and all(reach_back)
        list(pool.map(lambda p: node_lab.cni(p, "DEL"), pods))
    assert sorted(node_lab.wait_pod_links(len(links_before))) == sorted(links_before)
    assert node_lab.get("/v1/ipam")["allocations"] == allocations_before
    endpoint_ips = {e["ip"] for e in node_lab.get("/v1/bpf/endpoints")}
    assert not endpoint_ips & {ip.split("/")[0] for ip in ips}
