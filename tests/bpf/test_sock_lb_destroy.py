"""Connected UDP sockets to a removed backend are destroyed (sock4_destroy_udp,
an iter/udp program calling the bpf_sock_destroy kfunc, run through
LoadBalancer.destroy_sockets_to), as Cilium does: the application sees
ECONNABORTED and connects again instead of sending into nothing.

Real parts: the socket LB programs attached to a cgroup of this test, a
client process in that cgroup inside a network namespace of the test, a UDP
server per backend address on that namespace's loopback."""

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

from ciliate.datapath.lb import Backend, Frontend, L4Protocol, attach_socket_lb, detach_socket_lb
from ciliate.datapath.testbed import Testbed
from ciliate.loader import cgroup2_root, enter_netns

pytestmark = pytest.mark.skipif(cgroup2_root() is None, reason="no cgroup v2 hierarchy mounted")

FRONTEND = Frontend(ipaddress.IPv4Address("10.96.0.53"), 53, L4Protocol.UDP)
PORT = 8053
BACKEND_IPS = [ipaddress.IPv4Address("127.0.0.21"), ipaddress.IPv4Address("127.0.0.22")]

# The client: one socket connected to the service, one straight to the first
# backend; prints who answered each, waits for a line on stdin (the test
# destroys meanwhile), then prints the error pending on the first (SO_ERROR:
# what its next call would have failed with) and asks both again.
CLIENT = """
import json, socket, sys
vip, port, direct = sys.argv[1], int(sys.argv[2]), sys.argv[3]
host, _, dport = direct.partition(":")
via = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
straight = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for s in (via, straight):
    s.settimeout(5)
via.connect((vip, port))
straight.connect((host, int(dport)))
def ask(s):
    try:
        s.send(b"who")
        return s.recv(64).decode()
    except OSError as exc:
        return exc.errno
print(json.dumps({"via": ask(via), "straight": ask(straight)}), flush=True)
sys.stdin.readline()
error = via.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
print(json.dumps({"via_error": error, "via": ask(via), "straight": ask(straight)}), flush=True)
"""


@dataclass(frozen=True)
class Lab:
    netns: str
    cgroup: Path


def _serve(sock: socket.socket, name: str) -> None:
    while True:
        try:
            _, peer = sock.recvfrom(64)
            if peer is None:
                return
            sock.sendto(name.encode(), peer)
        except OSError:
            return


def _wake(sock: socket.socket) -> None:
    """Wake the server thread blocked in recvfrom (before close)."""
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
        with enter_netns(f"/run/netns/{tag}"):
            for ip in BACKEND_IPS:
                udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                udp.bind((str(ip), PORT))
                undo.callback(udp.close)
                undo.callback(_wake, udp)
                threading.Thread(target=_serve, args=(udp, f"{ip}"), daemon=True).start()
        yield Lab(netns=tag, cgroup=cgroup)


def _backends() -> list[Backend]:
    return [Backend(id=200 + i, address=ip, port=PORT) for i, ip in enumerate(BACKEND_IPS)]


def _start_client(lab: Lab, direct: str) -> subprocess.Popen[str]:
    procs = lab.cgroup / "cgroup.procs"

    def enter_cgroup() -> None:
        procs.write_text(str(os.getpid()))

    cmd = ["ip", "netns", "exec", lab.netns, sys.executable, "-c", CLIENT]
    cmd += [str(FRONTEND.address), str(FRONTEND.port), direct]
    return subprocess.Popen(
        cmd,
        preexec_fn=enter_cgroup,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _line(proc: subprocess.Popen[str]) -> dict[str, object]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=10)
        assert proc.stderr is not None
        pytest.fail(f"client ended: {proc.stderr.read()}")
    report = json.loads(line)
    assert isinstance(report, dict)
    return report


def _first_and_then(lab: Lab, tb: Testbed, *, removed: str) -> tuple[dict[str, object], ...]:
    """Run the client; ``removed`` ('served': the backend the service gave it,
    'other': the one it did not get) is destroyed between its two rounds."""
    tb.datapath.lb.upsert_service(FRONTEND, _backends(), service_id=7)
    # The straight socket goes to the first backend; the service picks at random.
    proc = _start_client(lab, f"{BACKEND_IPS[0]}:{PORT}")
    try:
        first = _line(proc)
        served = ipaddress.IPv4Address(str(first["via"]))
        gone = served if removed == "served" else next(ip for ip in BACKEND_IPS if ip != served)
        # A pod deleted meanwhile: its namespace is gone, the walk skips it.
        vanished = f"/run/netns/{lab.netns}-gone"
        walked = tb.datapath.lb.destroy_sockets_to(
            [b for b in _backends() if b.address == gone],
            netns=[vanished, f"/run/netns/{lab.netns}"],
        )
        assert walked == 1
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        then = _line(proc)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return first, then, {"gone": str(gone), "served": str(served)}


def test_a_socket_connected_through_the_service_to_a_removed_backend_is_aborted(
    tb: Testbed, lab: Lab
) -> None:
    first, then, who = _first_and_then(lab, tb, removed="served")
    assert first["straight"] == str(BACKEND_IPS[0])
    assert then["via_error"] == errno.ECONNABORTED
    assert isinstance(then["via"], int)  # disconnected: no send into nothing
    # A socket the application connected straight to a pod IP is its own business.
    assert then["straight"] == str(BACKEND_IPS[0])
    # The map of removed backends is empty again after the walk.
    assert list(tb.datapath.maps["ciliate_lb_sock_destroy"].keys()) == []
    assert who["gone"] == who["served"]


def test_a_socket_whose_backend_stays_is_left_alone(tb: Testbed, lab: Lab) -> None:
    first, then, who = _first_and_then(lab, tb, removed="other")
    assert who["gone"] != who["served"]
    assert first["straight"] == str(BACKEND_IPS[0])
    assert then["via_error"] == 0
    assert then["via"] == who["served"]
    assert then["straight"] == str(BACKEND_IPS[0])
