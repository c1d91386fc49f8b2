"""The ABI Python reads from abi.h matches what clang compiled, and the
numbered tables stay consistent with the sources."""

from __future__ import annotations

from pathlib import Path

import pytest

from ciliate.datapath import abi, objects, render, tables
from ciliate.datapath import maps as dpmaps
from ciliate.loader import BpfObject, MapType

STRUCTS = [
    "ciliate_ipcache_key",
    "ciliate_ipcache_value",
    "ciliate_endpoint",
    "ciliate_metrics_value",
    "ciliate_runtime_config",
    "ciliate_event",
    "ciliate_policy_key",
    "ciliate_policy_value",
    "ciliate_policy_state",
    "ciliate_ct_key",
    "ciliate_ct_entry",
    "ciliate_ct_set",
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


# -- the map table (bpf/datapath.toml) is what clang compiled ------------------


@pytest.mark.parametrize("kind", ["lxc", "host", "uplink", "sock"])
def test_every_map_of_the_table_is_compiled_as_declared(bpf_objects: str, kind: str) -> None:
    with BpfObject.open(objects.object_path(kind)) as obj:
        compiled = {name: m for name, m in obj.maps.items() if not name.startswith(".")}
        assert set(compiled) == set(dpmaps.ALL)
        for spec in dpmaps.shape().maps:
            m = compiled[spec.name]
            assert MapType(m.type).name == spec.type, spec.name
            assert m.max_entries == dpmaps.max_entries(spec), spec.name
            if spec.key is not None and spec.value is not None:
                assert m.key_size == dpmaps.type_size(spec.key), spec.name
                assert m.value_size == dpmaps.type_size(spec.value), spec.name


def test_maps_of_a_disabled_feature_are_not_built(tmp_path: Path) -> None:
    table = (BPF_ROOT / "datapath.toml").read_text().replace("policy = true", "policy = false")
    config = tmp_path / "datapath.toml"
    config.write_text(table)
    header = render.render(BPF_ROOT / "src" / "maps.h.j2", config)
    assert "ciliate_ipcache SEC" in header
    policy_maps = [m.name for m in dpmaps.shape().all_maps if m.feature == "policy"]
    assert "ciliate_policy" in policy_maps and len(policy_maps) >= 3  # policy, state, ct, ...
    for name in policy_maps:
        assert f"{name} SEC" not in header, name
    assert "#define CILIATE_FEATURE_POLICY 0" in render.render(
        BPF_ROOT / "src" / "config.h.j2", config
    )


def test_names_python_uses_are_maps_of_the_table() -> None:
    table = {m.name for m in dpmaps.shape().all_maps}
    for name, value in vars(dpmaps).items():
        if name.isupper() and isinstance(value, str) and value.startswith("ciliate_"):
            assert value in table, name


@pytest.mark.parametrize(
    ("edit", "complaint"),
    [
        (('type = "ARRAY"', 'type = "ARRAYS"'), "type 'ARRAYS' is not one of"),
        (('max_entries = "endpoint_slots"', 'max_entries = "slots"'), "neither a [sizes] name"),
        (('feature = "policy"', 'feature = "polcy"'), "feature 'polcy' is not in [features]"),
        (('flags = ["NO_PREALLOC"]', 'flags = ["PREALLOC"]'), "unknown flag(s) ['PREALLOC']"),
    ],
)
def test_a_malformed_table_is_refused_naming_the_entry(
    tmp_path: Path, edit: tuple[str, str], complaint: str
) -> None:
    config = tmp_path / "datapath.toml"
    config.write_text((BPF_ROOT / "datapath.toml").read_text().replace(*edit, 1))
    with pytest.raises(render.ShapeError, match=r"maps\.ciliate_\w+: ") as err:
        render.load_shape(config)
    assert complaint in str(err.value)
