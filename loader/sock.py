"""Attachments of socket programs: sock_ops on a cgroup, sk_msg on a sockmap.

A sock_ops program is attached to a cgroup v2 directory through a BPF link
(``bpf_link_create(prog, cgroup_fd, BPF_CGROUP_SOCK_OPS)``); links from
different owners coexist on one cgroup, and a pinned link keeps the
program attached after its process exits, until the pin is removed. An
sk_msg program is attached to a sockmap or sockhash
(``bpf_prog_attach(prog, map, BPF_SK_MSG_VERDICT)``) and stays with the
map: attaching another program replaces it.
"""

from __future__ import annotations

import os

from ._libbpf import BPF_CGROUP_SOCK_OPS, BPF_SK_MSG_VERDICT, lib
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


def attach_sock_ops(
    program: Program, cgroup: str | os.PathLike[str], pin: str | os.PathLike[str]
) -> None:
    """Attach a sock_ops program to a cgroup v2 directory and pin the link at ``pin``."""
    where = os.fsdecode(cgroup)
    try:
        cgroup_fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise AttachError(f"cgroup {where}: {e.strerror}", errno=e.errno, op="open") from e
    try:
        link = int(lib.bpf_link_create(program.fd, cgroup_fd, BPF_CGROUP_SOCK_OPS, None))
        if link < 0:
            raise _err("bpf_link_create", -link, f"sock_ops {program.name} on {where}")
    finally:
        os.close(cgroup_fd)
    try:
        raw = os.fsencode(pin)
        ret = int(lib.bpf_obj_pin(link, raw))
        if ret < 0:
            raise _err("bpf_obj_pin", -ret, os.fsdecode(raw))
    finally:
        os.close(link)  # pinned, or (on failure) detached as the last fd goes


def attach_sk_msg(program: Program, sockmap: Map) -> None:
    """Attach (or replace) the sk_msg verdict program of a sockmap or sockhash."""
    ret = int(lib.bpf_prog_attach(program.fd, sockmap.fd, BPF_SK_MSG_VERDICT, 0))
    if ret < 0:
        raise _err("bpf_prog_attach", -ret, f"sk_msg {program.name} on map {sockmap.name}")


def detach_sk_msg(program: Program, sockmap: Map) -> None:
    ret = int(lib.bpf_prog_detach2(program.fd, sockmap.fd, BPF_SK_MSG_VERDICT))
    if ret < 0:
        raise _err("bpf_prog_detach2", -ret, f"sk_msg {program.name} on map {sockmap.name}")
