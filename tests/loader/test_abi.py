"""The ctypes struct layouts in ciliate.loader._libbpf match the C compiler's view of the
libbpf and kernel headers installed on this machine."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest

from ciliate.loader import _libbpf as C


def _names(struct: type[ctypes.Structure], skip: str = "") -> dict[str, str]:
    return {f[0]: f[0] for f in struct._fields_ if f[0] != skip}


# (ctypes struct, C type, fields to compare; C field name may differ from the ctypes one)
STRUCTS: list[tuple[type[ctypes.Structure], str, dict[str, str]]] = [
    (
        C.bpf_object_open_opts,
        "struct bpf_object_open_opts",
        {
            "object_name": "object_name",
            "relaxed_maps": "relaxed_maps",
            "pin_root_path": "pin_root_path",
            "kconfig": "kconfig",
            "btf_custom_path": "btf_custom_path",
            "kernel_log_buf": "kernel_log_buf",
            "kernel_log_size": "kernel_log_size",
            "kernel_log_level": "kernel_log_level",
        },
    ),
    (
        C.bpf_test_run_opts,
        "struct bpf_test_run_opts",
        _names(C.bpf_test_run_opts),
    ),
    (
        C.bpf_map_batch_opts,
        "struct bpf_map_batch_opts",
        _names(C.bpf_map_batch_opts),
    ),
    (
        C.bpf_prog_query_opts,
        "struct bpf_prog_query_opts",
        _names(C.bpf_prog_query_opts),
    ),
    (C.bpf_tc_hook, "struct bpf_tc_hook", _names(C.bpf_tc_hook)),
    (C.bpf_tc_opts, "struct bpf_tc_opts", _names(C.bpf_tc_opts)),
    (
        C.bpf_map_info,
        "struct bpf_map_info",
        _names(C.bpf_map_info, skip="_pad"),
    ),
    (
        C.btf_type,
        "struct btf_type",
        {"name_off": "name_off", "info": "info", "size_or_type": "size"},
    ),
    (C.btf_member, "struct btf_member", _names(C.btf_member)),
    (C.btf_var_secinfo, "struct btf_var_secinfo", _names(C.btf_var_secinfo)),
]
# Partial views of kernel structs: only the offsets must match (the kernel takes a short
# info_len), and our size may be smaller.
PREFIXES: list[tuple[type[ctypes.Structure], str, dict[str, str]]] = [
    (
        C.bpf_prog_info,
        "struct bpf_prog_info",
        _names(C.bpf_prog_info),
    ),
    (
        C.bpf_link_info,
        "struct bpf_link_info",
        # the anonymous union (whose tcx arm we read) starts where raw_tracepoint does
        {"type": "type", "id": "id", "prog_id": "prog_id", "u": "raw_tracepoint"},
    ),
]
# Our own structs that must have the C size exactly.
EXACT_SIZE = {id(s) for s, _, _ in STRUCTS}


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang-16")
    if cc is None:
        pytest.skip("no C compiler")
    lines = []
    for _struct, ctype, fields in STRUCTS + PREFIXES:
        lines.append(f'printf("{ctype}=%zu\\n", sizeof({ctype}));')
        for cfield in fields.values():
            lines.append(f'printf("{ctype}.{cfield}=%zu\\n", offsetof({ctype}, {cfield}));')
    body = "\n    ".join(lines)
    src = f"""
#include <stddef.h>
#include <stdio.h>
#include <bpf/libbpf.h>
#include <bpf/bpf.h>
#include <linux/btf.h>
int main(void) {{
    {body}
    return 0;
}}
"""
    build = tmp_path_factory.mktemp("abi")
    (build / "abi.c").write_text(src)
    subprocess.run([cc, "-o", str(build / "abi"), str(build / "abi.c")], check=True)
    out = subprocess.run([str(build / "abi")], check=True, capture_output=True, text=True)
    return {k: int(v) for k, v in (line.split("=") for line in out.stdout.splitlines())}


@pytest.mark.parametrize(
    ("struct", "ctype", "fields"), STRUCTS + PREFIXES, ids=[c for _, c, _ in STRUCTS + PREFIXES]
)
def test_struct_layout_matches_c(
    c_layout: dict[str, int],
    struct: type[ctypes.Structure],
    ctype: str,
    fields: dict[str, str],
) -> None:
    for pyfield, cfield in fields.items():
        offset = getattr(struct, pyfield).offset
        assert offset == c_layout[f"{ctype}.{cfield}"], f"{ctype}.{cfield}"
    if id(struct) in EXACT_SIZE:
        assert ctypes.sizeof(struct) == c_layout[ctype]
    else:
        assert ctypes.sizeof(struct) <= c_layout[ctype]
