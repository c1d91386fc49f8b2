"""attach_sock_addr: a cgroup sock_addr program through a pinned BPF link.
A client process in the test's cgroup (inside the test's namespace)
connects to port 9 of its loopback: EHOSTUNREACH while the program is
attached (its verdict), ECONNREFUSED (the kernel's, nothing listens) once
the pin is removed."""

from __future__ import annotations

import errno
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ciliate.loader import AttachError, BpfObject, attach_sock_addr, cgroup2_root

from .conftest import Netns, _compile

pytestmark = pytest.mark.skipif(cgroup2_root() is None, reason="no cgroup v2 hierarchy mounted")

_CONNECT = """
import socket, sys
s = socket.socket()
try:
    s.connect(("127.0.0.1", 9))
    print(0)
except OSError as exc:
    print(exc.errno)
"""


@pytest.fixture(scope="module")
def sock_addr_obj(bpf_build: Path) -> Iterator[BpfObject]:
    with BpfObject.open(_compile(bpf_build, "sock_addr")) as obj:
        obj.load()
        yield obj


@pytest.fixture
def cgroup(run_id: str) -> Iterator[Path]:
    root = cgroup2_root()
    assert root is not None
    path = Path(root) / f"{run_id}-{secrets.token_hex(2)}"
    path.mkdir()
    yield path
    path.rmdir()


def connect_errno(netns: Netns, cgroup: Path) -> int:
    procs = cgroup / "cgroup.procs"
    out = subprocess.run(
        ["ip", "netns", "exec", netns.name, sys.executable, "-c", _CONNECT],
        preexec_fn=lambda: procs.write_text(str(os.getpid())),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out)


def test_connect4_attached_by_a_pinned_link_until_the_pin_goes(
    sock_addr_obj: BpfObject, netns: Netns, cgroup: Path, pin_dir: Path
) -> None:
    netns.ip("link", "set", "lo", "up")
    pin = pin_dir / "connect4"
    attach_sock_addr(sock_addr_obj.program("refuse_discard"), cgroup, pin)
    assert pin.exists()
    assert connect_errno(netns, cgroup) == errno.EHOSTUNREACH
    pin.unlink()  # the last reference: the link detaches
    assert connect_errno(netns, cgroup) == errno.ECONNREFUSED


def test_a_program_that_is_no_sock_addr_hook_is_refused_naming_the_hooks(
    sock_addr_obj: BpfObject, cgroup: Path, pin_dir: Path
) -> None:
    with pytest.raises(AttachError, match=r"section 'tc', not a sock_addr hook \(cgroup/connect4"):
        attach_sock_addr(sock_addr_obj.program("not_a_hook"), cgroup, pin_dir / "x")
    assert not (pin_dir / "x").exists()


def test_a_missing_cgroup_is_named(sock_addr_obj: BpfObject, pin_dir: Path) -> None:
    with pytest.raises(AttachError, match="cgroup /nonexistent-cgroup: No such file"):
        attach_sock_addr(
            sock_addr_obj.program("refuse_discard"), "/nonexistent-cgroup", pin_dir / "x"
        )
