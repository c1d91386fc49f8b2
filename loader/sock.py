"""Attachments of socket programs: sock_ops and sock_addr (connect4,
sendmsg4, recvmsg4, getpeername4) on a cgroup, sk_msg on a sockmap.

A sock_ops or sock_addr program is attached to a cgroup v2 directory through a BPF link
(``bpf_link_create(prog, cgroup_fd, BPF_CGROUP_SOCK_OPS)``); links from
different owners coexist on one cgroup, and a pinned link keeps the
program attached after its process exits, until the pin is removed. An
sk_msg program is attached to a sockmap or sockhash
(``bpf_prog_attach(prog, map, BPF_SK_MSG_VERDICT)``) and stays with the
map: attaching another program replaces it.
"""

from __future__ import annotations

import os

from ._libbpf import (
    BPF_CGROUP_INET4_CONNECT,
    BPF_CGROUP_INET4_GETPEERNAME,
    BPF_CGROUP_SOCK_OPS,
    BPF_CGROUP_UDP4_RECVMSG,
    BPF_CGROUP_UDP4_SENDMSG,
    BPF_SK_MSG_VERDICT,
    lib,
)
from .errors import AttachError, strerror
from .maps import Map
from .object import Program


def _err(op: str, err: int, what: str) -> AttachError:
    return AttachError(f"{op} ({what}): {strerror(err)}", errno=err, op=op)


def cgroup2_root(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup`` on a unified
    system, ``/sys/fs/cgroup/unified`` on a hybrid one), or None."""
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] == "cgroup2" and fields[3] == "/":
                return fields[4]
    return None


# Section of a sock_addr program (libbpf's names) -> its cgroup attach type.
SOCK_ADDR_HOOKS = {
    "cgroup/connect4": BPF_CGROUP_INET4_CONNECT,
    "cgroup/sendmsg4": BPF_CGROUP_UDP4_SENDMSG,
    "cgroup/recvmsg4": BPF_CGROUP_UDP4_RECVMSG,
    "cgroup/getpeername4": BPF_CGROUP_INET4_GETPEERNAME,
}


def _attach_cgroup_link(
    program: Program,
    cgroup: str | os.PathLike[str],
    pin: str | os.PathLike[str],
    *,
    attach_type: int,
    what: str,
) -> None:
    where = os.fsdecode(cgroup)
    try:
        cgroup_fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise AttachError(f"cgroup {where}: {e.strerror}", errno=e.errno, op="open") from e
    try:
        link = int(lib.bpf_link_create(program.fd, cgroup_fd, attach_type, None))
        if link < 0:
            raise _err("bpf_link_create", -link, f"{what} {program.name} on {where}")
    finally:
        os.close(cgroup_fd)
    try:
        raw = os.fsencode(pin)
        ret = int(lib.bpf_obj_pin(link, raw))
        if ret < 0:
            raise _err("bpf_obj_pin", -ret, os.fsdecode(raw))
    finally:
        os.close(link)  # pinned, or (on failure) detached as the last fd goes


def attach_sock_ops(
    program: Program, cgroup: str | os.PathLike[str], pin: str | os.PathLike[str]
) -> None:
    """Attach a sock_ops program to a cgroup v2 directory and pin the link at ``pin``."""
    _attach_cgroup_link(program, cgroup, pin, attach_type=BPF_CGROUP_SOCK_OPS, what="sock_ops")


def attach_sock_addr(
    program: Program, cgroup: str | os.PathLike[str], pin: str | os.PathLike[str]
) -> None:
    """Attach a sock_addr program (section ``cgroup/connect4``, ``sendmsg4``,
    ``recvmsg4`` or ``getpeername4``) to a cgroup v2 directory and pin the
    link at ``pin``; removing the pin detaches it."""
    attach_type = SOCK_ADDR_HOOKS.get(program.section)
    if attach_type is None:
        raise AttachError(
            f"program {program.name} is in section {program.section!r}, not a sock_addr hook "
            f"({', '.join(sorted(SOCK_ADDR_HOOKS))})",
            op="bpf_link_create",
        )
    _attach_cgroup_link(program, cgroup, pin, attach_type=attach_type, what=program.section)


def attach_sk_msg(program: Program, sockmap: Map) -> None:
    """Attach (or replace) the sk_msg verdict program of a sockmap or sockhash."""
    ret = int(lib.bpf_prog_attach(program.fd, sockmap.fd, BPF_SK_MSG_VERDICT, 0))
    if ret < 0:
        raise _err("bpf_prog_attach", -ret, f"sk_msg {program.name} on map {sockmap.name}")


def detach_sk_msg(program: Program, sockmap: Map) -> None:
    ret = int(lib.bpf_prog_detach2(program.fd, sockmap.fd, BPF_SK_MSG_VERDICT))
    if ret < 0:
        raise _err("bpf_prog_detach2", -ret, f"sk_msg {program.name} on map {sockmap.name}")
