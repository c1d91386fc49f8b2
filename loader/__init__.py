"""ctypes bindings over the system libbpf (``libbpf.so.1``, 1.1 API) for ciliate's datapath.

Loader order (as in libbpf-bootstrap)::

    with BpfObject.open("datapath.bpf.o", pin_root="/sys/fs/bpf/ciliate") as obj:  # print cb set
        obj.set_rodata({"cfg_ifindex": 4})        # const volatile globals, before load
        obj.load()                                # VerifierError carries the verifier log
        with attach_tc(obj.program("from_pod"), ifname="eth0", direction="ingress",
                       netns="/run/netns/pod1") as link, \\
             RingBuffer(obj.map("events"), handle_event) as rb:
            while running:
                rb.poll(100)
    # leaving the blocks destroys only what this run created (link, ring buffer, object)

libbpf's own messages go to the ``ciliate.loader.libbpf`` logger (WARN/INFO/DEBUG map to
WARNING/INFO/DEBUG).

Exceptions::

    LoaderError                 .errno: int | None, .op: str | None
     +-- LibbpfError            a libbpf call failed (.op = function name)
     +-- ObjectOpenError        object file missing / not an ELF BPF object
     +-- VerifierError          program rejected at load (.program, .log, .source_file,
     |                          .source_line, .source_text, .error_lines)
     +-- MapError               map operation failed / wrong key or value size / wrong type
     +-- AttachError            tc attach/detach/query failed
"""

from __future__ import annotations

import resource

from ._libbpf import BPF_ANY, BPF_EXIST, BPF_NOEXIST
from .btf import Btf, StructLayout, StructMember
from .errors import (
    AttachError,
    LibbpfError,
    LoaderError,
    MapError,
    ObjectOpenError,
    VerifierError,
)
from .iter import IterLink
from .maps import Map, MapInfo, MapType, possible_cpus
from .netns import enter_netns
from .object import BpfObject, ProgInfo, Program, prog_info
from .ringbuf import RingBuffer
from .sock import (
    SOCK_ADDR_HOOKS,
    attach_sk_msg,
    attach_sock_addr,
    attach_sock_ops,
    cgroup2_root,
    detach_sk_msg,
)
from .tc import (
    TcAttachment,
    attach_tc,
    clsact_program_id,
    detach_pinned_link,
    open_pinned_link,
    tc_links,
    update_pinned_link,
)
from .testrun import TestRunResult

__all__ = [
    "BPF_ANY",
    "BPF_EXIST",
    "BPF_NOEXIST",
    "SOCK_ADDR_HOOKS",
    "AttachError",
    "BpfObject",
    "Btf",
    "IterLink",
    "LibbpfError",
    "LoaderError",
    "Map",
    "MapError",
    "MapInfo",
    "MapType",
    "ObjectOpenError",
    "ProgInfo",
    "Program",
    "RingBuffer",
    "StructLayout",
    "StructMember",
    "TcAttachment",
    "TestRunResult",
    "VerifierError",
    "attach_sk_msg",
    "attach_sock_addr",
    "attach_sock_ops",
    "attach_tc",
    "bump_memlock_rlimit",
    "cgroup2_root",
    "clsact_program_id",
    "detach_pinned_link",
    "detach_sk_msg",
    "enter_netns",
    "open_pinned_link",
    "possible_cpus",
    "prog_info",
    "tc_links",
    "update_pinned_link",
]


def bump_memlock_rlimit() -> int:
    """Raise RLIMIT_MEMLOCK as far as allowed and return the new soft limit.

    Only kernels < 5.11 (before memcg accounting of BPF memory) need this; elsewhere it is
    harmless. Infinity is tried first; without CAP_SYS_RESOURCE (e.g. in a container, even as
    root) the soft limit is raised to the hard limit instead.
    """
    infinity = resource.RLIM_INFINITY
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (infinity, infinity))
    except (OSError, ValueError):
        _soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        try:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))
        except (OSError, ValueError) as exc:
            raise LoaderError(f"cannot raise RLIMIT_MEMLOCK: {exc}", op="setrlimit") from exc
    return resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
