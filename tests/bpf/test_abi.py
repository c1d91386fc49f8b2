"""The ABI Python reads from abi.h matches what clang compiled, and the
numbered tables stay consistent with the sources."""

from __future__ import annotations

from pathlib import Path

import pytest

from ciliate.datapath import abi, objects, tables
from ciliate.loader import BpfObject

STRUCTS = [
    "ciliate_ipcache_key",
    "ciliate_ipcache_value",
    "ciliate_endpoint",
    "ciliate_metrics_value",
    "ciliate_runtime_config",
    "ciliate_event",
]
BPF_ROOT = Path(__file__).resolve().parents[2] / "bpf"


@pytest.mark.parametrize("kind", ["lxc", "host", "uplink"])
@pytest.mark.parametrize("struct", STRUCTS)
def test_struct_layout_matches_the_compiled_objects_btf(
    bpf_objects: str, kind: str, struct: str
) -> None:
    with BpfObject.open(objects.object_path(kind)) as obj:
        try:
            layout = obj.btf.struct_layout(struct)
        except Exception:
            pytest.skip(f"{struct} not used by {kind}")  # clang keeps only used types
        assert layout.size == abi.sizeof(struct)
        assert set(layout.members) == set(abi.field_names(struct))
        for name, (offset, _size) in layout.members.items():
            assert offset == abi.offsetof(struct, name), f"{struct}.{name}"


def test_every_source_id_names_a_file_in_bpf() -> None:
    names = {p.name.removesuffix(".j2") for p in BPF_ROOT.rglob("*") if p.is_file()}
    for source in tables.Source:
        if source.name != "UNKNOWN":
            assert tables.source_file(source) in names


def test_every_drop_reason_has_a_description_and_a_unique_code() -> None:
    codes = [r.value for r in tables.DropReason]
    assert len(codes) == len(set(codes))
    for reason in tables.DropReason:
        assert tables.describe_reason(reason) and not tables.describe_reason(reason).startswith(
            "unknown"
        )
