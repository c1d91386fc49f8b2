"""Faults an outside probe found, each through a real agent and the real
``ciliate-cni``: a store that refuses a commit (a full state disk, a lock
held by another writer), a frozen BPF map, a clashing device, a pod whose
namespace vanished while another link took its veth's ifindex, an ADD
without CNI_ARGS, DEL then ADD of one attachment, a second interface, and
hostile ifnames and JSON. Each failure gets its documented CNI code (never
999), leaves nothing behind, and the agent keeps serving."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ciliate.control.lab import lab
from ciliate.datapath import maps as dpmaps
from ciliate.loader import Map

from .conftest import NodeLab, restart_agent
from .test_bad_input import add_env, netconf, raw_call

INIT_IDENTITY = 5  # Cilium's reserved "init"


# -- what a node holds ----------------------------------------------------------


def _pinned_entries(node: lab.NodeState, name: str) -> list[tuple[str, str]]:
    """The filled entries of a pinned map (arrays hold zeros where empty)."""
    with Map.open_pinned(Path(node.bpffs_root) / "maps" / name) as pinned:
        entries = pinned.lookup_batch() if pinned.type_name != "lpm_trie" else pinned.items()
        return sorted(
            (key.hex(), value.hex())
            for key, value in entries
            if isinstance(value, bytes) and value.strip(b"\0")
        )


def snapshot(node_lab: NodeLab) -> dict[str, Any]:
    """Everything an endpoint leaves on a node. tc filters are not listed:
    they belong to the pod veths and go with them."""
    return {
        "veths": node_lab.pod_links(),
        "ip_allocations": node_lab.get("/v1/ipam")["allocations"],
        "identities": node_lab.get("/v1/identities"),
        "endpoints": node_lab.get("/v1/endpoints"),
        **{
            name: _pinned_entries(node_lab.node, name)
            for name in (
                dpmaps.ENDPOINTS_BY_IP,
                dpmaps.ENDPOINTS_BY_DEV,
                dpmaps.ENDPOINT_NETNS,
                dpmaps.IPCACHE,
            )
        },
    }


def pod_links(pod: lab.PodState) -> list[str]:
    out = lab._run("ip", "-n", pod.netns, "-j", "link", "show").stdout
    return sorted(link["ifname"] for link in json.loads(out))


def add_error(node_lab: NodeLab, pod: lab.PodState, **env: str) -> dict[str, Any]:
    """A failing ADD's error document, and the agent still answering after it."""
    exit_code, error = raw_call(node_lab, add_env(pod, **env), netconf(node_lab))
    assert exit_code == 1, error
    assert error["code"] != 999, error
    assert node_lab.get("/v1/healthz") == {"status": "ok"}
    return error


def assert_serves(node_lab: NodeLab) -> None:
    """The agent still adds, forwards and deletes a pod."""
    pod = node_lab.pod()
    node_lab.add(pod)
    assert node_lab.ping(pod, node_lab.router_ip)
    node_lab.cni(pod, "DEL")


def wait_until_reaped(node_lab: NodeLab) -> None:
    """Until every veth deletion queued so far has run: the worker takes
    them in order, so once a pod DELed now has lost its veth, so has every
    pod DELed before it."""
    marker = node_lab.pod()
    host_ifname = node_lab.add(marker)["interfaces"][0]["name"]
    node_lab.cni(marker, "DEL")
    deadline = time.monotonic() + 10
    while host_ifname in node_lab.pod_links():
        assert time.monotonic() < deadline, f"{host_ifname} was not deleted after DEL"
        time.sleep(0.02)


# -- a store that refuses to commit ----------------------------------------------


@pytest.fixture
def small_disk_lab(fresh_lab: NodeLab) -> Iterator[tuple[NodeLab, Path]]:
    """A node whose state directory is a 2 MB tmpfs mounted over the lab's
    own state directory (and unmounted at the end)."""
    node = fresh_lab.node
    state_dir = Path(node.state_dir)
    lab.stop_agent(node)
    lab._run("mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "ciliate-test", str(state_dir))
    try:
        restart_agent(fresh_lab)
        yield fresh_lab, state_dir
    finally:
        lab.stop_agent(node)
        fresh_lab.state.save()
        lab._run("umount", str(state_dir), check=False)


@contextlib.contextmanager
def disk_full(directory: Path) -> Iterator[None]:
    """Fill the file system of ``directory`` to the last byte, then free it."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        chunk = bytes(1 << 16)
        while True:
            try:
                if os.write(fd, chunk) == 0:
                    break
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
        yield
    finally:
        os.close(fd)
        filler.unlink()


def test_an_add_whose_store_commit_fails_leaves_nothing_and_says_try_again(
    small_disk_lab: tuple[NodeLab, Path],
) -> None:
    node_lab, state_dir = small_disk_lab
    kept = node_lab.pod("kept")
    node_lab.add(kept)
    before = snapshot(node_lab)
    pod = node_lab.pod("victim")

    with disk_full(state_dir):
        error = add_error(node_lab, pod)
        # Everything ADD had done (veth, filters, map entries) is undone and
        # the IP and identity rolled back with the transaction.
        assert snapshot(node_lab) == before
        assert pod_links(pod) == ["lo"]

        # DEL commits before it touches the kernel: refused, the endpoint
        # stays whole and keeps forwarding.
        with pytest.raises(lab.CniCallError) as caught:
            node_lab.cni(kept, "DEL")
        assert snapshot(node_lab) == before
        assert node_lab.ping(kept, node_lab.router_ip)

    assert error["code"] == 11
    assert "full" in error["msg"], error
    assert "nothing was changed" in error["details"] and "retry" in error["details"]
    assert caught.value.code == 11, caught.value.error

    # With room again, the runtime's retries succeed.
    node_lab.add(pod)
    assert node_lab.ping(pod, str(kept.ip))
    node_lab.cni(kept, "DEL")
    node_lab.cni(pod, "DEL")
    assert node_lab.wait_pod_links(0) == []
    assert node_lab.get("/v1/ipam")["allocations"] == {}


def test_a_store_locked_by_another_writer_is_try_again_and_leaves_nothing(
    node_lab: NodeLab,
) -> None:
    pod = node_lab.pod()
    before = snapshot(node_lab)
    writer = sqlite3.connect(Path(node_lab.node.state_dir) / "state.db", isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")  # hold the write lock past the agent's patience
        error = add_error(node_lab, pod)
    finally:
        writer.close()
    assert error["code"] == 11
    assert "locked" in error["msg"], error
    assert snapshot(node_lab) == before
    node_lab.add(pod)  # the retry works
    node_lab.cni(pod, "DEL")


# -- the kernel refuses ------------------------------------------------------------


def test_a_device_the_kernel_refuses_is_code_100_naming_it_and_leaves_nothing(
    node_lab: NodeLab,
) -> None:
    pod = node_lab.pod()
    lab._run("ip", "-n", pod.netns, "link", "add", "eth0", "type", "veth", "peer", "name", "x0")
    before = snapshot(node_lab)
    error = add_error(node_lab, pod)
    assert error["code"] == 100
    assert "already has a link named eth0" in error["msg"], error
    assert snapshot(node_lab) == before
    assert pod_links(pod) == ["eth0", "lo", "x0"]
    assert_serves(node_lab)


def test_a_bpf_map_that_refuses_writes_is_code_101_and_leaves_nothing(
    fresh_lab: NodeLab,
) -> None:
    kept = fresh_lab.pod("kept")
    fresh_lab.add(kept)
    # A frozen map refuses every write from user space: the ipcache write,
    # the last of ADD's map writes, fails after the endpoint maps took theirs.
    ipcache = Path(fresh_lab.node.bpffs_root) / "maps" / dpmaps.IPCACHE
    lab._run("bpftool", "map", "freeze", "pinned", str(ipcache))
    before = snapshot(fresh_lab)
    pod = fresh_lab.pod()
    error = add_error(fresh_lab, pod)
    assert error["code"] == 101
    assert "BPF map" in error["msg"], error
    assert snapshot(fresh_lab) == before
    assert pod_links(pod) == ["lo"]
    assert fresh_lab.ping(kept, fresh_lab.router_ip)


# -- deletion by a stale ifindex ----------------------------------------------------


def _endpoint(node_lab: NodeLab, pod: lab.PodState) -> dict[str, Any]:
    (record,) = [e for e in node_lab.get("/v1/endpoints") if e["container_id"] == pod.container_id]
    return record


def _unrelated_link_at(node_lab: NodeLab, pod: lab.PodState, record: dict[str, Any]) -> str:
    """Remove the pod's namespace (its veth goes with it) and put an
    unrelated veth at the ifindex the agent recorded for the pod's."""
    lab._run("ip", "netns", "del", pod.netns)
    deadline = time.monotonic() + 10
    while record["host_ifname"] in node_lab.pod_links():  # netns clean-up runs async
        assert time.monotonic() < deadline, "the pod's veth outlived its namespace"
        time.sleep(0.05)
    lab._run(
        "ip", "-n", node_lab.node.netns, "link", "add", "name", "unrelated",
        "index", str(record["host_ifindex"]), "type", "veth", "peer", "name", "unrelated-p",
    )  # fmt: skip
    return "unrelated"


def _link_index(node_lab: NodeLab, name: str) -> int | None:
    out = lab._run("ip", "-n", node_lab.node.netns, "-j", "link", "show").stdout
    return next((link["ifindex"] for link in json.loads(out) if link["ifname"] == name), None)


def test_del_of_a_pod_whose_namespace_is_gone_spares_the_link_now_at_its_ifindex(
    node_lab: NodeLab,
) -> None:
    pod = node_lab.pod()
    node_lab.add(pod)
    record = _endpoint(node_lab, pod)
    name = _unrelated_link_at(node_lab, pod, record)
    try:
        assert node_lab.cni(pod, "DEL") == {}
        wait_until_reaped(node_lab)
        assert _link_index(node_lab, name) == record["host_ifindex"]
        assert node_lab.get("/v1/endpoints") == []
    finally:
        lab._run("ip", "-n", node_lab.node.netns, "link", "del", name, check=False)


def test_a_restart_collecting_a_gone_pod_spares_the_link_now_at_its_ifindex(
    fresh_lab: NodeLab,
) -> None:
    pod = fresh_lab.pod()
    fresh_lab.add(pod)
    record = _endpoint(fresh_lab, pod)
    lab.stop_agent(fresh_lab.node)
    name = _unrelated_link_at(fresh_lab, pod, record)
    restart_agent(fresh_lab)
    assert fresh_lab.get("/v1/status")["restored"]["collected"] == 1
    wait_until_reaped(fresh_lab)
    assert _link_index(fresh_lab, name) == record["host_ifindex"]


# -- what runtimes other than kubelet do ----------------------------------------------


def test_an_add_without_cni_args_gets_the_init_identity(node_lab: NodeLab) -> None:
    pod = node_lab.pod()
    exit_code, result = raw_call(node_lab, add_env(pod, CNI_ARGS="<unset>"), netconf(node_lab))
    assert exit_code == 0, result
    record = _endpoint(node_lab, pod)
    assert (record["identity"], record["labels"]) == (INIT_IDENTITY, {})
    prefix = result["ips"][0]["address"]
    (entry,) = [e for e in node_lab.get("/v1/bpf/ipcache") if e["prefix"] == prefix]
    assert entry["identity"] == INIT_IDENTITY
    assert node_lab.ping(pod, node_lab.router_ip)
    node_lab.cni(pod, "DEL")
    assert [i["id"] for i in node_lab.get("/v1/identities") if not i["reserved"]] == []


def test_del_then_an_immediate_add_of_the_same_attachment_succeeds_20_times(
    node_lab: NodeLab,
) -> None:
    pod = node_lab.pod()
    node_lab.add(pod)
    failures = []
    for _ in range(20):
        node_lab.cni(pod, "DEL")
        try:
            node_lab.add(pod)
        except lab.CniCallError as exc:
            failures.append(exc.error)
    assert failures == []
    assert node_lab.ping(pod, node_lab.router_ip)
    assert pod_links(pod) == ["eth0", "lo"]
    node_lab.cni(pod, "DEL")
    assert node_lab.wait_pod_links(0) == []


def test_a_second_interface_in_one_pod_is_refused_naming_cni_ifname(node_lab: NodeLab) -> None:
    pod = node_lab.pod()
    node_lab.add(pod)
    before = snapshot(node_lab)
    error = add_error(node_lab, pod, CNI_IFNAME="eth1")
    assert error["code"] == 4
    assert "CNI_IFNAME eth1" in error["msg"] and "eth0" in error["msg"], error
    assert "DEL eth0" in error["details"], error
    assert snapshot(node_lab) == before
    assert pod_links(pod) == ["eth0", "lo"]
    assert node_lab.ping(pod, node_lab.router_ip)
    node_lab.cni(pod, "DEL")


# -- hostile input -------------------------------------------------------------------------


@pytest.mark.parametrize("ifname", ["eth%d", "all", "default", "é" * 9, "lo"])
def test_an_ifname_the_kernel_would_not_take_as_given_is_refused(
    node_lab: NodeLab, ifname: str
) -> None:
    pod = node_lab.pod()
    before = snapshot(node_lab)
    error = add_error(node_lab, pod, CNI_IFNAME=ifname)
    if ifname == "lo":  # a valid name, taken in the pod already
        assert error["code"] == 100
        assert "already has a link named lo" in error["msg"], error
    else:
        assert error["code"] == 4
        assert f"CNI_IFNAME {ifname!r}" in error["msg"], error
    assert snapshot(node_lab) == before
    assert pod_links(pod) == ["lo"]


def test_a_netconf_nested_too_deeply_is_a_decoding_error(node_lab: NodeLab) -> None:
    pod = node_lab.pod()
    doc = json.loads(netconf(node_lab))
    body = json.dumps(doc)[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}"
    exit_code, error = raw_call(node_lab, add_env(pod), body)
    assert (exit_code, error["code"]) == (1, 6), error
    assert "too deeply" in error["msg"], error
    assert node_lab.get("/v1/healthz") == {"status": "ok"}


def test_a_repeated_add_naming_another_namespace_is_refused_as_code_4(node_lab: NodeLab) -> None:
    pod, other = node_lab.pod(), node_lab.pod()
    node_lab.add(pod)
    before = snapshot(node_lab)
    error = add_error(node_lab, pod, CNI_NETNS=f"/run/netns/{other.netns}")
    assert error["code"] == 4
    assert "CNI_NETNS" in error["msg"] and pod.netns in error["msg"], error
    assert snapshot(node_lab) == before
    node_lab.cni(pod, "DEL")


def test_an_agent_started_on_a_full_disk_says_so_and_the_pods_keep_forwarding(
    small_disk_lab: tuple[NodeLab, Path],
) -> None:
    """Its state cannot be opened: a clear refusal (exit 2, the directory and the
    free space named), no traceback; the pinned datapath keeps the pod reachable,
    and the agent starts once there is room again."""
    node_lab, state_dir = small_disk_lab
    pod = node_lab.pod("kept")
    node_lab.add(pod)
    assert pod.ip is not None
    router_ip = node_lab.router_ip
    lab.stop_agent(node_lab.node)
    log_before = Path(node_lab.node.log).read_text()
    with disk_full(state_dir):
        proc = lab.start_agent(node_lab.node, wait=False)
        assert proc.wait(timeout=60) == 2
        said = Path(node_lab.node.log).read_text()[len(log_before) :]
        assert "Traceback" not in said
        assert f"{state_dir} is on a full disk" in said, said[-2000:]
        assert node_lab.ping(pod, router_ip)
    lab.start_agent(node_lab.node)
    node_lab.state.save()
    assert [e["ip"] for e in node_lab.get("/v1/endpoints")] == [pod.ip]
    node_lab.cni(pod, "DEL")
