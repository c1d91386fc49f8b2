"""Raw ctypes prototypes for the system ``libbpf.so.1`` (1.1 API) and the bits of libc we need.

This is the only module that declares foreign functions or C struct layouts. Every function
used anywhere in :mod:`ciliate.loader` gets its ``argtypes``/``restype`` here, and both
libraries are opened with ``use_errno=True`` so :func:`ctypes.get_errno` is meaningful right
after a call.

libbpf 1.x conventions (the "1.0 mode" is the only mode in 1.1):

* functions returning ``int`` return ``-errno`` on failure (and also set ``errno``);
* functions returning a pointer return ``NULL`` on failure and set ``errno``;
  ``libbpf_get_error(ptr)`` turns that into ``-errno``.

Struct layouts are transcribed from ``/usr/include/bpf/{bpf,libbpf}.h`` and
``/usr/include/linux/{bpf,btf}.h``; ``tests/loader/test_abi.py`` checks them against the C
compiler's ``sizeof``/``offsetof``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    Union,
    c_bool,
    c_char,
    c_char_p,
    c_int,
    c_int64,
    c_size_t,
    c_uint8,
    c_uint32,
    c_uint64,
    c_void_p,
)
from typing import Any

__all__ = ["lib", "libc"]


def _open(name: str) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(name, use_errno=True)
    except OSError as exc:  # pragma: no cover - depends on the machine
        raise ImportError(f"ciliate.loader needs {name}: {exc}") from exc


lib = _open("libbpf.so.1")
libc = _open(ctypes.util.find_library("c") or "libc.so.6")

# --------------------------------------------------------------------------- constants

# enum libbpf_print_level
LIBBPF_WARN = 0
LIBBPF_INFO = 1
LIBBPF_DEBUG = 2

# enum bpf_attach_type (only the ones used here; TCX is newer than the 6.1 uapi headers)
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
BPF_CGROUP_SOCK_OPS = 3
BPF_SK_MSG_VERDICT = 7
BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_UDP4_SENDMSG = 14
BPF_CGROUP_UDP4_RECVMSG = 19
BPF_CGROUP_INET4_GETPEERNAME = 29
BPF_TRACE_ITER = 28

# enum bpf_link_type
BPF_LINK_TYPE_TCX = 11

# enum bpf_tc_attach_point
BPF_TC_INGRESS = 1 << 0
BPF_TC_EGRESS = 1 << 1

# map update flags
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

# BTF kinds (linux/btf.h)
BTF_KIND_INT = 1
BTF_KIND_PTR = 2
BTF_KIND_ARRAY = 3
BTF_KIND_STRUCT = 4
BTF_KIND_UNION = 5
BTF_KIND_ENUM = 6
BTF_KIND_FWD = 7
BTF_KIND_TYPEDEF = 8
BTF_KIND_VOLATILE = 9
BTF_KIND_CONST = 10
BTF_KIND_RESTRICT = 11
BTF_KIND_FUNC = 12
BTF_KIND_FUNC_PROTO = 13
BTF_KIND_VAR = 14
BTF_KIND_DATASEC = 15
BTF_KIND_FLOAT = 16
BTF_KIND_DECL_TAG = 17
BTF_KIND_TYPE_TAG = 18
BTF_KIND_ENUM64 = 19

# Linux errno that Python's errno module does not know (include/linux/errno.h).
ENOTSUPP = 524

# setns(2)
CLONE_NEWNET = 0x40000000

# Size of a va_list object, used to va_copy() by memcpy in the print callback. On x86_64
# va_list is ``__va_list_tag[1]`` (24 bytes), on aarch64 a 32-byte struct passed by
# reference; both reach a callback as a pointer. Unknown ABIs format once, without a copy.
VA_LIST_SIZE: int | None = {"x86_64": 24, "amd64": 24, "aarch64": 32, "arm64": 32}.get(
    platform.machine().lower()
)

# --------------------------------------------------------------------------- structs


class bpf_object_open_opts(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("object_name", c_char_p),
        ("relaxed_maps", c_bool),
        ("pin_root_path", c_char_p),
        ("_removed_attach_prog_fd", c_uint32),
        ("kconfig", c_char_p),
        ("btf_custom_path", c_char_p),
        ("kernel_log_buf", c_void_p),
        ("kernel_log_size", c_size_t),
        ("kernel_log_level", c_uint32),
    ]


class bpf_test_run_opts(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("data_in", c_void_p),
        ("data_out", c_void_p),
        ("data_size_in", c_uint32),
        ("data_size_out", c_uint32),
        ("ctx_in", c_void_p),
        ("ctx_out", c_void_p),
        ("ctx_size_in", c_uint32),
        ("ctx_size_out", c_uint32),
        ("retval", c_uint32),
        ("repeat", c_int),
        ("duration", c_uint32),
        ("flags", c_uint32),
        ("cpu", c_uint32),
        ("batch_size", c_uint32),
    ]


class bpf_map_batch_opts(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("elem_flags", c_uint64),
        ("flags", c_uint64),
    ]


class bpf_prog_query_opts(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("query_flags", c_uint32),
        ("attach_flags", c_uint32),
        ("prog_ids", POINTER(c_uint32)),
        ("prog_cnt", c_uint32),
        ("prog_attach_flags", POINTER(c_uint32)),
    ]


class bpf_tc_hook(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("ifindex", c_int),
        ("attach_point", c_uint32),
        ("parent", c_uint32),
    ]


class bpf_tc_opts(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("prog_fd", c_int),
        ("flags", c_uint32),
        ("prog_id", c_uint32),
        ("handle", c_uint32),
        ("priority", c_uint32),
    ]


class bpf_map_info(Structure):
    _fields_ = [
        ("type", c_uint32),
        ("id", c_uint32),
        ("key_size", c_uint32),
        ("value_size", c_uint32),
        ("max_entries", c_uint32),
        ("map_flags", c_uint32),
        ("name", c_char * 16),
        ("ifindex", c_uint32),
        ("btf_vmlinux_value_type_id", c_uint32),
        ("netns_dev", c_uint64),
        ("netns_ino", c_uint64),
        ("btf_id", c_uint32),
        ("btf_key_type_id", c_uint32),
        ("btf_value_type_id", c_uint32),
        ("_pad", c_uint32),
        ("map_extra", c_uint64),
    ]


class bpf_prog_info(Structure):
    """The head of ``struct bpf_prog_info`` up to ``name`` (the kernel accepts a short info_len)."""

    _fields_ = [
        ("type", c_uint32),
        ("id", c_uint32),
        ("tag", c_uint8 * 8),
        ("jited_prog_len", c_uint32),
        ("xlated_prog_len", c_uint32),
        ("jited_prog_insns", c_uint64),
        ("xlated_prog_insns", c_uint64),
        ("load_time", c_uint64),
        ("created_by_uid", c_uint32),
        ("nr_map_ids", c_uint32),
        ("map_ids", c_uint64),
        ("name", c_char * 16),
    ]


class _bpf_link_info_tcx(Structure):
    _fields_ = [("ifindex", c_uint32), ("attach_type", c_uint32)]


class _bpf_link_info_union(Union):
    _fields_ = [("tcx", _bpf_link_info_tcx), ("_raw", c_uint64 * 4)]


class bpf_link_info(Structure):
    """The head of ``struct bpf_link_info`` with the ``tcx`` arm of its union (kernel >= 6.6)."""

    _fields_ = [
        ("type", c_uint32),
        ("id", c_uint32),
        ("prog_id", c_uint32),
        ("_pad", c_uint32),
        ("u", _bpf_link_info_union),
    ]


class btf_type(Structure):
    _fields_ = [
        ("name_off", c_uint32),
        ("info", c_uint32),
        ("size_or_type", c_uint32),
    ]


class btf_member(Structure):
    _fields_ = [("name_off", c_uint32), ("type", c_uint32), ("offset", c_uint32)]


class btf_var_secinfo(Structure):
    _fields_ = [("type", c_uint32), ("offset", c_uint32), ("size", c_uint32)]


# --------------------------------------------------------------------------- callbacks

# typedef int (*libbpf_print_fn_t)(enum libbpf_print_level, const char *, va_list);
PRINT_FN = CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)
# typedef int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size);
RINGBUF_SAMPLE_FN = CFUNCTYPE(c_int, c_void_p, c_void_p, c_size_t)

# --------------------------------------------------------------------------- prototypes

_P = c_void_p  # opaque pointers: struct bpf_object *, struct bpf_program *, ...
_U32P = POINTER(c_uint32)

_LIBBPF: dict[str, tuple[Any, list[Any]]] = {
    # print / errors / misc
    "libbpf_set_print": (c_void_p, [PRINT_FN]),
    "libbpf_get_error": (ctypes.c_long, [c_void_p]),
    "libbpf_strerror": (c_int, [c_int, c_char_p, c_size_t]),
    "libbpf_num_possible_cpus": (c_int, []),
    # bpf_object
    "bpf_object__open_file": (_P, [c_char_p, POINTER(bpf_object_open_opts)]),
    "bpf_object__load": (c_int, [_P]),
    "bpf_object__close": (None, [_P]),
    "bpf_object__name": (c_char_p, [_P]),
    "bpf_object__btf": (_P, [_P]),
    "bpf_object__next_program": (_P, [_P, _P]),
    "bpf_object__next_map": (_P, [_P, _P]),
    "bpf_object__find_program_by_name": (_P, [_P, c_char_p]),
    "bpf_object__find_map_by_name": (_P, [_P, c_char_p]),
    "bpf_object__unpin_maps": (c_int, [_P, c_char_p]),
    # bpf_program
    "bpf_program__name": (c_char_p, [_P]),
    "bpf_program__section_name": (c_char_p, [_P]),
    "bpf_program__fd": (c_int, [_P]),
    "bpf_program__type": (c_int, [_P]),
    # bpf_map
    "bpf_map__name": (c_char_p, [_P]),
    "bpf_map__fd": (c_int, [_P]),
    "bpf_map__type": (c_int, [_P]),
    "bpf_map__key_size": (c_uint32, [_P]),
    "bpf_map__value_size": (c_uint32, [_P]),
    "bpf_map__max_entries": (c_uint32, [_P]),
    "bpf_map__initial_value": (c_void_p, [_P, POINTER(c_size_t)]),
    "bpf_map__is_internal": (c_bool, [_P]),
    "bpf_map__pin_path": (c_char_p, [_P]),
    "bpf_map__set_pin_path": (c_int, [_P, c_char_p]),
    "bpf_map__reuse_fd": (c_int, [_P, c_int]),
    # btf
    "btf__parse": (_P, [c_char_p, c_void_p]),
    "btf__free": (None, [_P]),
    "btf__find_by_name_kind": (ctypes.c_int32, [_P, c_char_p, c_uint32]),
    "btf__type_by_id": (c_void_p, [_P, c_uint32]),
    "btf__type_cnt": (c_uint32, [_P]),
    "btf__name_by_offset": (c_char_p, [_P, c_uint32]),
    "btf__resolve_size": (c_int64, [_P, c_uint32]),
    "btf__resolve_type": (c_int, [_P, c_uint32]),
    # low-level bpf(2) wrappers (bpf.h)
    "bpf_map_lookup_elem": (c_int, [c_int, c_void_p, c_void_p]),
    "bpf_map_update_elem": (c_int, [c_int, c_void_p, c_void_p, c_uint64]),
    "bpf_map_delete_elem": (c_int, [c_int, c_void_p]),
    "bpf_map_get_next_key": (c_int, [c_int, c_void_p, c_void_p]),
    "bpf_map_lookup_batch": (
        c_int,
        [c_int, c_void_p, c_void_p, c_void_p, c_void_p, _U32P, POINTER(bpf_map_batch_opts)],
    ),
    "bpf_map_update_batch": (
        c_int,
        [c_int, c_void_p, c_void_p, _U32P, POINTER(bpf_map_batch_opts)],
    ),
    "bpf_obj_pin": (c_int, [c_int, c_char_p]),
    "bpf_obj_get": (c_int, [c_char_p]),
    "bpf_obj_get_info_by_fd": (c_int, [c_int, c_void_p, _U32P]),
    "bpf_prog_get_fd_by_id": (c_int, [c_uint32]),
    "bpf_prog_test_run_opts": (c_int, [c_int, POINTER(bpf_test_run_opts)]),
    "bpf_prog_query_opts": (c_int, [c_int, c_int, POINTER(bpf_prog_query_opts)]),
    "bpf_link_create": (c_int, [c_int, c_int, c_int, c_void_p]),
    "bpf_link_update": (c_int, [c_int, c_int, c_void_p]),
    "bpf_link_detach": (c_int, [c_int]),
    "bpf_iter_create": (c_int, [c_int]),
    "bpf_prog_attach": (c_int, [c_int, c_int, c_int, c_uint32]),
    "bpf_prog_detach2": (c_int, [c_int, c_int, c_int]),
    # tc (netlink) helpers
    "bpf_tc_hook_create": (c_int, [POINTER(bpf_tc_hook)]),
    "bpf_tc_hook_destroy": (c_int, [POINTER(bpf_tc_hook)]),
    "bpf_tc_attach": (c_int, [POINTER(bpf_tc_hook), POINTER(bpf_tc_opts)]),
    "bpf_tc_query": (c_int, [POINTER(bpf_tc_hook), POINTER(bpf_tc_opts)]),
    "bpf_tc_detach": (c_int, [POINTER(bpf_tc_hook), POINTER(bpf_tc_opts)]),
    # ring buffer
    "ring_buffer__new": (_P, [c_int, RINGBUF_SAMPLE_FN, c_void_p, c_void_p]),
    "ring_buffer__add": (c_int, [_P, c_int, RINGBUF_SAMPLE_FN, c_void_p]),
    "ring_buffer__poll": (c_int, [_P, c_int]),
    "ring_buffer__consume": (c_int, [_P]),
    "ring_buffer__epoll_fd": (c_int, [_P]),
    "ring_buffer__free": (None, [_P]),
}

_LIBC: dict[str, tuple[Any, list[Any]]] = {
    "vsnprintf": (c_int, [c_void_p, c_size_t, c_char_p, c_void_p]),
    "setns": (c_int, [c_int, c_int]),
}


def _declare(dll: ctypes.CDLL, table: dict[str, tuple[Any, list[Any]]]) -> None:
    for name, (restype, argtypes) in table.items():
        fn = getattr(dll, name)
        fn.restype = restype
        fn.argtypes = argtypes


_declare(lib, _LIBBPF)
_declare(libc, _LIBC)
