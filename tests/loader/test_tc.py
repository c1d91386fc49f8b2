"""tc attachment (tcx and clsact) to a veth inside a namespace the test creates."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ciliate.loader import (
    AttachError,
    BpfObject,
    LoaderError,
    Program,
    RingBuffer,
    attach_tc,
    detach_pinned_link,
    enter_netns,
    open_pinned_link,
    prog_info,
    tc_links,
)

from .conftest import Netns


@pytest.fixture
def loaded(test_obj_path: Path) -> Iterator[BpfObject]:
    with BpfObject.open(test_obj_path) as obj:
        obj.load()
        yield obj


def _netns_ino() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def _ifindex(ns: Netns, name: str) -> int:
    with enter_netns(ns.path):
        return socket.if_nametoindex(name)


def _send_frame(ns: Netns, dev: str, first_byte: int) -> None:
    """Transmit one raw Ethernet frame on ``dev`` (runs tc egress of ``dev``)."""
    with enter_netns(ns.path):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    with sock:
        sock.bind((dev, 0))
        dst = bytes([first_byte, 0, 0, 0, 0, 1])
        src = bytes([0x02, 0, 0, 0, 0, 2])
        sock.send(dst + src + b"\x88\xb5" + bytes(46))  # local experimental ethertype


def test_enter_netns_switches_and_restores(netns: Netns) -> None:
    root = _netns_ino()
    with enter_netns(netns.path):
        assert _netns_ino() == os.stat(netns.path).st_ino != root
        assert netns.veth in os.listdir("/sys/class/net") or socket.if_nametoindex(netns.veth)
    assert _netns_ino() == root
    with pytest.raises(RuntimeError), enter_netns(netns.name):  # bare names work too
        assert _netns_ino() != root
        raise RuntimeError("inside")
    assert _netns_ino() == root
    with (
        pytest.raises(LoaderError, match="cannot open network namespace"),
        enter_netns("/run/netns/does-not-exist-ldr"),
    ):
        pass
    assert _netns_ino() == root


def test_enter_netns_moves_only_the_calling_thread(netns: Netns) -> None:
    root = _netns_ino()
    inside, release = threading.Event(), threading.Event()
    seen: list[int] = []

    def worker() -> None:
        with enter_netns(netns.path):
            seen.append(_netns_ino())
            inside.set()
            release.wait(10)
        seen.append(_netns_ino())

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert inside.wait(10)
        assert _netns_ino() == root  # this thread stayed put
    finally:
        release.set()
        thread.join(10)
    assert seen == [os.stat(netns.path).st_ino, root]


def test_tcx_attach_query_detach(
    loaded: BpfObject, netns: Netns, open_fds: Callable[[], set[str]]
) -> None:
    prog = loaded.program("classify")
    before = open_fds()
    assert tc_links(netns.veth, netns=netns.path) == {"ingress": [], "egress": []}
    with attach_tc(prog, ifname=netns.veth, direction="egress", netns=netns.path) as att:
        assert att.kind == "tcx"
        assert att.ifindex == _ifindex(netns, netns.veth)
        assert att.link_fd >= 0 and att.link_id
        assert att.prog_id == prog.id
        links = tc_links(att.ifindex, netns=netns.path)
        assert links == {"ingress": [], "egress": [prog.id]}
        assert prog_info(prog.id).name == "classify"
        # the peer is untouched
        assert tc_links(netns.peer, netns=netns.path) == {"ingress": [], "egress": []}
    assert not att.active
    assert tc_links(netns.veth, netns=netns.path) == {"ingress": [], "egress": []}
    assert open_fds() == before
    att.detach()  # idempotent


def test_tcx_program_sees_traffic(loaded: BpfObject, netns: Netns) -> None:
    prog = loaded.program("classify")
    ifindex = _ifindex(netns, netns.veth)
    key_off = loaded.btf.struct_layout("flow_event").offset("key")
    seen: list[bytes] = []

    def ours() -> list[bytes]:
        return [r for r in seen if r[key_off] == 0x42]

    with (
        RingBuffer(loaded.map("events"), seen.append) as rb,
        attach_tc(prog, ifindex=ifindex, direction="egress", netns=netns.path),
        attach_tc(prog, ifname=netns.peer, direction="ingress", netns=netns.path),
    ):
        rb.drain()  # forget background traffic (IPv6 DAD and the like)
        _send_frame(netns, netns.veth, 0x42)
        # egress runs in send(); the peer's ingress may run later, in NET_RX softirq
        deadline = time.monotonic() + 5
        while len(ours()) < 2 and time.monotonic() < deadline:
            rb.poll(100)
    records = ours()
    # seen on veth egress, then (with byte 1 rewritten) on the peer's ingress
    ifindexes = sorted(int.from_bytes(r[0:4], "little") for r in records)
    assert ifindexes == sorted([ifindex, _ifindex(netns, netns.peer)])


def test_pinned_tcx_link_survives_close(loaded: BpfObject, netns: Netns, pin_dir: Path) -> None:
    prog = loaded.program("classify")
    path = pin_dir / "link_ingress"
    att = attach_tc(prog, ifname=netns.veth, direction="ingress", netns=netns.path)
    att.pin(path)
    assert att.pinned_path == str(path)
    att.close()  # our fd is gone, the pin keeps the link attached
    assert tc_links(netns.veth, netns=netns.path)["ingress"] == [prog.id]
    fd = open_pinned_link(path)
    os.close(fd)
    detach_pinned_link(path)
    assert not path.exists()
    assert tc_links(netns.veth, netns=netns.path)["ingress"] == []


def test_unpinned_tcx_link_goes_with_its_fd(loaded: BpfObject, netns: Netns) -> None:
    prog = loaded.program("classify")
    att = attach_tc(prog, ifname=netns.veth, direction="ingress", netns=netns.path)
    assert tc_links(netns.veth, netns=netns.path)["ingress"] == [prog.id]
    att.close()
    assert tc_links(netns.veth, netns=netns.path)["ingress"] == []


def test_detach_removes_own_pin(loaded: BpfObject, netns: Netns, pin_dir: Path) -> None:
    with attach_tc(
        loaded.program("classify"), ifname=netns.veth, direction="egress", netns=netns.path
    ) as att:
        att.pin(pin_dir / "l")
    assert not (pin_dir / "l").exists()
    assert tc_links(netns.veth, netns=netns.path)["egress"] == []


def test_two_programs_in_order(test_obj_path: Path, netns: Netns) -> None:
    with BpfObject.open(test_obj_path) as a, BpfObject.open(test_obj_path) as b:
        a.load()
        b.load()
        pa, pb = a.program("classify"), b.program("classify")
        with (
            attach_tc(pa, ifname=netns.veth, direction="ingress", netns=netns.path),
            attach_tc(pb, ifname=netns.veth, direction="ingress", netns=netns.path) as second,
        ):
            assert tc_links(netns.veth, netns=netns.path)["ingress"] == [pa.id, pb.id]
            second.detach()
            assert tc_links(netns.veth, netns=netns.path)["ingress"] == [pa.id]


def _clsact_present(ns: Netns, dev: str) -> bool:
    return "clsact" in ns.tc("qdisc", "show", "dev", dev)


def test_clsact_attach_creates_and_removes_qdisc(loaded: BpfObject, netns: Netns) -> None:
    prog: Program = loaded.program("classify")
    assert not _clsact_present(netns, netns.veth)
    with attach_tc(
        prog, ifname=netns.veth, direction="ingress", netns=netns.path, mode="clsact"
    ) as att:
        assert att.kind == "clsact" and att.created_qdisc
        assert att.handle and att.priority and att.prog_id == prog.id
        assert _clsact_present(netns, netns.veth)
        filters = netns.tc("filter", "show", "dev", netns.veth, "ingress")
        assert "classify" in filters and f"id {prog.id}" in filters
        with pytest.raises(AttachError, match="only tcx"):
            att.pin("/sys/fs/bpf/never")
        assert tc_links(netns.veth, netns=netns.path)["ingress"] == []  # not a tcx link
    assert not _clsact_present(netns, netns.veth)


def test_clsact_keeps_a_qdisc_it_did_not_create(loaded: BpfObject, netns: Netns) -> None:
    netns.tc("qdisc", "add", "dev", netns.veth, "clsact")
    prog = loaded.program("classify")
    with attach_tc(
        prog, ifname=netns.veth, direction="egress", netns=netns.path, mode="clsact"
    ) as att:
        assert not att.created_qdisc
        assert "classify" in netns.tc("filter", "show", "dev", netns.veth, "egress")
    assert _clsact_present(netns, netns.veth)
    assert "classify" not in netns.tc("filter", "show", "dev", netns.veth, "egress")


def test_attach_errors(loaded: BpfObject, netns: Netns) -> None:
    prog = loaded.program("classify")
    root = _netns_ino()
    with pytest.raises(AttachError, match="no network device"):
        attach_tc(prog, ifname="nope0", direction="ingress", netns=netns.path)
    assert _netns_ino() == root  # restored after the error
    with pytest.raises(AttachError, match="exactly one"):
        attach_tc(prog, direction="ingress", netns=netns.path)
    with pytest.raises(AttachError, match="direction"):
        attach_tc(prog, ifname=netns.veth, direction="sideways", netns=netns.path)  # type: ignore[arg-type]
    with pytest.raises(AttachError) as info:
        attach_tc(prog, ifindex=999_999, direction="ingress", netns=netns.path, mode="tcx")
    assert info.value.errno is not None
    with pytest.raises(AttachError):
        detach_pinned_link("/sys/fs/bpf/ldr-does-not-exist")
