"""Socket-level service load balancing with real sockets: the four cgroup
programs of bpf_sock_lb.c attached (pinned links) to a cgroup of this test,
clients run as processes in that cgroup inside a network namespace of the
test, backends are servers on loopback addresses in the same namespace.
Each server answers with its own address, so the client knows who served
it while the socket says it talks to the service."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ciliate.control.cli.show import format_event
from ciliate.datapath.lb import (
    Backend,
    BackendState,
    Frontend,
    L4Protocol,
    attach_socket_lb,
    detach_socket_lb,
)
from ciliate.datapath.tables import Direction, DropReason
from ciliate.datapath.testbed import Testbed
from ciliate.loader import cgroup2_root, enter_netns

pytestmark = pytest.mark.skipif(cgroup2_root() is None, reason="no cgroup v2 hierarchy mounted")

CLIENT = Path(__file__).with_name("sock_lb_client.py")
CLUSTER_IP = ipaddress.IPv4Address("10.96.0.10")
BACKEND_PORT = 8080
BACKEND_IPS = [ipaddress.IPv4Address(f"127.0.0.{i}") for i in (11, 12, 13)]


@dataclass(frozen=True)
class Lab:
    netns: str
    cgroup: Path
    links: Path

    def client(self, mode: str, frontend: Frontend, count: int = 1) -> dict[str, object]:
        """Run the client in the cgroup and the namespace; its JSON report."""
        procs = self.cgroup / "cgroup.procs"

        def enter_cgroup() -> None:
            procs.write_text(str(os.getpid()))

        cmd = ["ip", "netns", "exec", self.netns, sys.executable, str(CLIENT), mode]
        cmd += [str(frontend.address), str(frontend.port), str(count)]
        proc = subprocess.run(
            cmd, preexec_fn=enter_cgroup, capture_output=True, text=True, timeout=60, check=False
        )
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert isinstance(report, dict)
        return report


def _serve_tcp(sock: socket.socket, name: str) -> None:
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:
            return  # closed: the test is over
        with conn:
            conn.recv(16)
            conn.sendall(name.encode())


def _serve_udp(sock: socket.socket, name: str) -> None:
    while True:
        try:
            _, peer = sock.recvfrom(64)
            if peer is None:
                return  # shut down: the test is over
            sock.sendto(name.encode(), peer)
        except OSError:
            return


def _wake(sock: socket.socket) -> None:
    """Wake a server thread blocked in accept or recvfrom (before close)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture(scope="module")
def lab(testbed_session: Testbed) -> Iterator[Lab]:
    root = cgroup2_root()
    assert root is not None
    tag = f"t{secrets.token_hex(4)}"
    with contextlib.ExitStack() as undo:
        subprocess.run(["ip", "netns", "add", tag], check=True)
        undo.callback(subprocess.run, ["ip", "netns", "del", tag], check=False)
        subprocess.run(["ip", "-n", tag, "link", "set", "lo", "up"], check=True)
        cgroup = Path(root) / tag
        cgroup.mkdir()
        undo.callback(cgroup.rmdir)
        pins = Path("/sys/fs/bpf") / tag
        undo.callback(pins.rmdir)
        attach_socket_lb(testbed_session.datapath.programs, cgroup=cgroup, links_dir=pins)
        undo.callback(detach_socket_lb, pins)
        # Servers live in this process (not in the cgroup: untranslated).
        with enter_netns(f"/run/netns/{tag}"):
            for ip in BACKEND_IPS:
                name = f"{ip}:{BACKEND_PORT}"
                tcp = socket.create_server((str(ip), BACKEND_PORT))
                udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                udp.bind((str(ip), BACKEND_PORT))
                for sock, serve in ((tcp, _serve_tcp), (udp, _serve_udp)):
                    undo.callback(sock.close)
                    undo.callback(_wake, sock)
                    threading.Thread(target=serve, args=(sock, name), daemon=True).start()
        yield Lab(netns=tag, cgroup=cgroup, links=pins)


def _backends(*states: BackendState) -> list[Backend]:
    return [
        Backend(id=100 + i, address=ip, port=BACKEND_PORT, state=state)
        for i, (ip, state) in enumerate(zip(BACKEND_IPS, states, strict=False))
    ]


def _served(report: dict[str, object]) -> list[str]:
    rounds = report["rounds"]
    assert isinstance(rounds, list)
    return [r["served_by"] for r in rounds]


FRONTEND_TCP = Frontend(CLUSTER_IP, 80, L4Protocol.TCP)
FRONTEND_UDP = Frontend(CLUSTER_IP, 53, L4Protocol.UDP)
ALL_ACTIVE = (BackendState.ACTIVE,) * 3


def test_tcp_to_a_clusterip_reaches_backends_and_the_peer_is_the_service(
    tb: Testbed, lab: Lab
) -> None:
    tb.datapath.lb.upsert_service(FRONTEND_TCP, _backends(*ALL_ACTIVE), service_id=1)
    report = lab.client("tcp", FRONTEND_TCP, count=30)
    rounds = report["rounds"]
    assert isinstance(rounds, list)
    assert all(r["peer"] == [str(CLUSTER_IP), 80] for r in rounds)
    served = set(_served(report))
    translated = tb.datapath.metrics.get(DropReason.FORWARDED_LB_SOCKET, Direction.EGRESS)
    assert translated[0] == 30
    # Random per connection: 30 connections all to one of 3 backends would be 3^-29.
    assert len(served) > 1
    assert served <= {f"{ip}:{BACKEND_PORT}" for ip in BACKEND_IPS}


def test_a_connect_keeps_its_service_on_the_socket_not_in_the_socket_rev_nat_map(
    tb: Testbed, lab: Lab
) -> None:
    """Connected sockets carry their frontend in socket storage: no hash
    update per connect, nothing left behind when the socket closes; the
    rev-NAT hash is for unconnected UDP sends only."""
    tb.datapath.lb.upsert_service(FRONTEND_TCP, _backends(*ALL_ACTIVE), service_id=1)
    tb.datapath.lb.upsert_service(FRONTEND_UDP, _backends(*ALL_ACTIVE), service_id=2)
    sock_revnat = tb.datapath.maps["ciliate_lb_sock_revnat"]
    rounds = lab.client("tcp", FRONTEND_TCP, count=5)["rounds"]
    assert isinstance(rounds, list)
    assert all(r["peer"] == [str(CLUSTER_IP), 80] for r in rounds)
    assert lab.client("udp-connected", FRONTEND_UDP)["peer"] == [str(CLUSTER_IP), 53]
    assert list(sock_revnat.keys()) == []
    lab.client("udp", FRONTEND_UDP, count=3)
    assert len(list(sock_revnat.keys())) == 1  # one socket, one backend


def test_a_udp_socket_connected_again_straight_to_the_backend_sees_the_backend(
    tb: Testbed, lab: Lab
) -> None:
    tb.datapath.lb.upsert_service(FRONTEND_UDP, _backends(*ALL_ACTIVE), service_id=2)
    report = lab.client("udp-reconnect", FRONTEND_UDP)
    assert report["peer"] == [str(CLUSTER_IP), 53]
    address, _, port = str(report["served_by"]).partition(":")
    assert report["peer_after"] == [address, int(port)]


def test_udp_unconnected_sends_of_one_socket_keep_one_backend_and_replies_come_from_the_service(
    tb: Testbed, lab: Lab
) -> None:
    tb.datapath.lb.upsert_service(FRONTEND_UDP, _backends(*ALL_ACTIVE), service_id=2)
    for _ in range(3):
        report = lab.client("udp", FRONTEND_UDP, count=8)
        rounds = report["rounds"]
        assert isinstance(rounds, list)
        assert all(r["source"] == [str(CLUSTER_IP), 53] for r in rounds)
        assert len(set(_served(report))) == 1


def test_udp_connected_socket_sees_the_service_as_its_peer(tb: Testbed, lab: Lab) -> None:
    tb.datapath.lb.upsert_service(FRONTEND_UDP, _backends(*ALL_ACTIVE), service_id=2)
    report = lab.client("udp-connected", FRONTEND_UDP, count=3)
    assert report["peer"] == [str(CLUSTER_IP), 53]
    rounds = report["rounds"]
    assert isinstance(rounds, list)
    assert all(r["source"] == [str(CLUSTER_IP), 53] for r in rounds)
    assert len(set(_served(report))) == 1


def test_a_service_with_no_backend_refuses_at_once(tb: Testbed, lab: Lab) -> None:
    tb.datapath.lb.upsert_service(FRONTEND_TCP, [], service_id=1)
    assert lab.client("refused", FRONTEND_TCP)["errno"] == errno.ECONNREFUSED
    tb.datapath.lb.upsert_service(FRONTEND_UDP, [], service_id=2)
    assert lab.client("udp-refused", FRONTEND_UDP)["errno"] == errno.ECONNREFUSED


def test_a_service_whose_backends_all_terminate_serves_through_them(tb: Testbed, lab: Lab) -> None:
    """No active backend left: the terminating ones (the control plane keeps only
    serving ones) take new connections, as kube-proxy (KEP-1669) and Cilium fall
    back, rather than the service refusing."""
    states = (BackendState.TERMINATING,) * 3
    tb.datapath.lb.upsert_service(FRONTEND_TCP, _backends(*states), service_id=1)
    served = set(_served(lab.client("tcp", FRONTEND_TCP, count=20)))
    assert served and served <= {f"{ip}:{BACKEND_PORT}" for ip in BACKEND_IPS}


def test_terminating_backends_take_no_new_connections(tb: Testbed, lab: Lab) -> None:
    states = (BackendState.TERMINATING, BackendState.ACTIVE, BackendState.TERMINATING)
    tb.datapath.lb.upsert_service(FRONTEND_TCP, _backends(*states), service_id=1)
    assert set(_served(lab.client("tcp", FRONTEND_TCP, count=20))) == {
        f"{BACKEND_IPS[1]}:{BACKEND_PORT}"
    }


def test_client_ip_affinity_keeps_one_backend_for_every_socket_of_a_pod(
    tb: Testbed, lab: Lab
) -> None:
    tb.datapath.lb.upsert_service(
        FRONTEND_TCP, _backends(*ALL_ACTIVE), service_id=1, affinity_timeout=60
    )
    served = [s for _ in range(3) for s in _served(lab.client("tcp", FRONTEND_TCP, count=10))]
    assert len(set(served)) == 1
    # The kept backend going away (terminating) moves the client to another.
    kept = BACKEND_IPS.index(ipaddress.IPv4Address(served[0].split(":")[0]))
    states = [BackendState.ACTIVE] * 3
    states[kept] = BackendState.TERMINATING
    tb.datapath.lb.upsert_service(
        FRONTEND_TCP, _backends(*states), service_id=1, affinity_timeout=60
    )
    moved = set(_served(lab.client("tcp", FRONTEND_TCP, count=10)))
    assert len(moved) == 1 and served[0] not in moved


def test_addresses_that_are_no_service_are_left_alone(tb: Testbed, lab: Lab) -> None:
    tb.datapath.lb.upsert_service(FRONTEND_TCP, _backends(*ALL_ACTIVE), service_id=1)
    direct = Frontend(BACKEND_IPS[2], BACKEND_PORT)
    report = lab.client("tcp", direct, count=3)
    rounds = report["rounds"]
    assert isinstance(rounds, list)
    assert all(r["peer"] == [str(BACKEND_IPS[2]), BACKEND_PORT] for r in rounds)
    assert set(_served(report)) == {f"{BACKEND_IPS[2]}:{BACKEND_PORT}"}
    # Another port of the service's address is no service either: no route here.
    tb.datapath.lb.delete_service(FRONTEND_TCP)
    assert lab.client("refused", FRONTEND_TCP)["errno"] == errno.ENETUNREACH


def test_attaching_again_swaps_the_programs_and_detaching_stops_the_translation(
    tb: Testbed, lab: Lab
) -> None:
    tb.datapath.lb.upsert_service(FRONTEND_TCP, _backends(*ALL_ACTIVE), service_id=1)
    # An agent restart: the links are pinned already, the programs swapped in.
    attach_socket_lb(tb.datapath.programs, cgroup=lab.cgroup, links_dir=lab.links)
    assert len(_served(lab.client("tcp", FRONTEND_TCP, count=2))) == 2
    detach_socket_lb(lab.links)
    try:
        assert not any(lab.links.iterdir())
        assert lab.client("refused", FRONTEND_TCP)["errno"] == errno.ENETUNREACH
    finally:
        attach_socket_lb(tb.datapath.programs, cgroup=lab.cgroup, links_dir=lab.links)


SO_NETNS_COOKIE = 71  # socket(7), Linux >= 5.14


def _netns_cookie(netns: str | None) -> int:
    """The cookie of a namespace (None: this thread's)."""
    with (
        enter_netns(None if netns is None else f"/run/netns/{netns}"),
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock,
    ):
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    return int.from_bytes(raw, sys.byteorder)


def test_restricted_to_its_own_namespaces_a_node_leaves_other_sockets_alone(
    tb: Testbed, lab: Lab
) -> None:
    lb = tb.datapath.lb
    lb.upsert_service(FRONTEND_TCP, _backends(*ALL_ACTIVE), service_id=1)
    client_netns = _netns_cookie(lab.netns)
    # Another node's sockets (here: only the root namespace is "ours").
    ours = _netns_cookie(None)
    assert ours != client_netns
    lb.restrict_sockets([ours])
    assert lab.client("refused", FRONTEND_TCP)["errno"] == errno.ENETUNREACH
    lb.allow_netns(client_netns)
    assert len(_served(lab.client("tcp", FRONTEND_TCP, count=2))) == 2
    lb.forget_netns(client_netns)
    assert lab.client("refused", FRONTEND_TCP)["errno"] == errno.ENETUNREACH
    lb.unrestrict_sockets()
    assert len(_served(lab.client("tcp", FRONTEND_TCP, count=2))) == 2


def test_a_translated_connect_is_traced_while_tracing_is_on(tb: Testbed, lab: Lab) -> None:
    """A socket has no packet to show: the record names the service asked
    for and the backend given, and the monitor prints it as on a socket."""
    tb.datapath.lb.upsert_service(FRONTEND_TCP, _backends(*ALL_ACTIVE), service_id=1)
    lab.client("tcp", FRONTEND_TCP)
    assert [e for e in tb.events() if e.translation is not None] == []
    tb.datapath.config.set_trace(True)
    [served] = _served(lab.client("tcp", FRONTEND_TCP))
    [event] = [e for e in tb.events() if e.translation is not None]
    t = event.translation
    assert t is not None and (t.kind, t.service_id, t.protocol) == ("socket", 1, socket.IPPROTO_TCP)
    assert str(t.orig_destination) == f"{CLUSTER_IP}:80"
    assert str(t.destination) == served
    assert t.backend_id == 100 + BACKEND_IPS.index(ipaddress.IPv4Address(served.split(":")[0]))
    line = format_event(event, "table")
    assert f"socket        LB tcp {CLUSTER_IP}:80 => {served}" in line
