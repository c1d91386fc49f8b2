"""BpfObject: open / set_rodata / load / close, globals, BTF, auto-pinning, libbpf logging."""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ciliate.loader import (
    BpfObject,
    Btf,
    LibbpfError,
    LoaderError,
    MapError,
    ObjectOpenError,
)

ETH_FRAME = bytes([0x42]) + bytes(range(1, 64))  # dst MAC starts with 0x42


@pytest.fixture
def obj(test_obj_path: Path) -> Iterator[BpfObject]:
    with BpfObject.open(test_obj_path) as o:
        yield o


def test_open_load_close_leaks_no_fd(test_obj_path: Path, open_fds: Callable[[], set[str]]) -> None:
    # Warm up once so lazily created process-wide state (none expected) is not counted.
    with BpfObject.open(test_obj_path) as warm:
        warm.load()
    before = open_fds()
    for _ in range(3):
        o = BpfObject.open(test_obj_path)
        o.load()
        fd = o.program("classify").fd
        map_fd = o.map("verdicts").fd
        assert str(fd) in open_fds() and str(map_fd) in open_fds()
        o.close()
        o.close()  # idempotent
    assert open_fds() == before


def test_closed_object_refuses_use(test_obj_path: Path) -> None:
    o = BpfObject.open(test_obj_path)
    o.load()
    prog, verdicts = o.program("classify"), o.map("verdicts")
    o.close()
    assert o.closed
    with pytest.raises(LoaderError, match="closed"):
        _ = prog.fd
    with pytest.raises(MapError, match="closed"):
        verdicts.lookup(bytes(4))
    with pytest.raises(LoaderError, match="closed"):
        o.program("classify")


def test_open_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ObjectOpenError) as info:
        BpfObject.open(tmp_path / "nope.o")
    assert info.value.errno == 2
    assert "nope.o" in str(info.value)


def test_open_not_an_elf(tmp_path: Path, open_fds: Callable[[], set[str]]) -> None:
    junk = tmp_path / "junk.o"
    junk.write_bytes(b"this is not an ELF file" * 10)
    before = open_fds()
    with pytest.raises(ObjectOpenError) as info:
        BpfObject.open(junk)
    assert info.value.errno is not None
    assert "junk.o" in str(info.value)
    assert "Unknown error" not in str(info.value)  # libbpf's own codes are spelled out
    assert open_fds() == before


def test_programs_and_maps_are_listed(obj: BpfObject) -> None:
    assert list(obj.programs) == ["classify"]
    prog = obj.program("classify")
    assert prog.section == "tc"
    assert prog.type == 3  # BPF_PROG_TYPE_SCHED_CLS
    assert {"verdicts", "prefixes", "counters", "events", "shared_cfg"} <= set(obj.maps)
    assert {".rodata", ".data", ".bss"} <= set(obj.maps)
    verdicts = obj.map("verdicts")
    assert (verdicts.key_size, verdicts.value_size, verdicts.max_entries) == (4, 4, 256)
    with pytest.raises(MapError, match="load the object first"):
        _ = verdicts.fd


def test_unknown_program_and_map_names(obj: BpfObject) -> None:
    with pytest.raises(LoaderError, match=r"no program 'nope'.*classify"):
        obj.program("nope")
    with pytest.raises(LoaderError, match=r"no map 'nope'.*verdicts"):
        obj.map("nope")


def test_program_fd_and_id_after_load(obj: BpfObject) -> None:
    prog = obj.program("classify")
    with pytest.raises(LoaderError, match="not loaded"):
        _ = prog.fd
    obj.load()
    assert prog.fd >= 0
    info = prog.info()
    assert info.id == prog.id > 0
    assert info.name == "classify"
    with pytest.raises(LoaderError, match="already loaded"):
        obj.load()


def test_set_rodata_changes_the_verdict(test_obj_path: Path) -> None:
    with BpfObject.open(test_obj_path) as default:
        default.load()
        assert default.program("classify").test_run(ETH_FRAME).retval == 0
    with BpfObject.open(test_obj_path) as shot:
        shot.set_rodata({"default_verdict": 2})
        shot.load()
        assert shot.program("classify").test_run(ETH_FRAME).retval == 2
        assert shot.read_data(".rodata")["default_verdict"] == struct.pack("<I", 2)


def test_set_rodata_bytes_and_byte_sized_int(obj: BpfObject) -> None:
    obj.set_rodata({"rewrite_byte": 0x5A, "event_tag": b"abcdef"})
    obj.load()
    out = obj.program("classify").test_run(ETH_FRAME).data
    assert out[1] == 0x5A
    assert obj.read_data(".rodata")["event_tag"] == b"abcdef"


def test_set_rodata_unknown_name_lists_known(obj: BpfObject) -> None:
    with pytest.raises(LoaderError) as info:
        obj.set_rodata({"no_such_var": 1})
    message = str(info.value)
    assert "no_such_var" in message
    for known in ("default_verdict", "rewrite_byte", "event_tag"):
        assert known in message


def test_set_rodata_rejects_bad_sizes_and_late_calls(obj: BpfObject) -> None:
    with pytest.raises(LoaderError, match="6 bytes"):
        obj.set_rodata({"event_tag": b"short"})
    with pytest.raises(LoaderError, match="does not fit"):
        obj.set_rodata({"rewrite_byte": 256})
    obj.load()
    with pytest.raises(LoaderError, match="before load"):
        obj.set_rodata({"default_verdict": 1})


def test_set_data_is_a_runtime_knob(obj: BpfObject) -> None:
    obj.load()
    prog = obj.program("classify")
    assert prog.test_run(ETH_FRAME).data[1] == 0xAB
    obj.set_data({"rewrite_offset": 5})  # after load: written to the live .data map
    out = prog.test_run(ETH_FRAME).data
    assert out[1] == ETH_FRAME[1] and out[5] == 0xAB
    assert obj.read_data(".data")["rewrite_offset"] == struct.pack("<I", 5)
    assert obj.read_data(".bss")["event_seq"] == struct.pack("<Q", 2)


def test_set_data_before_load_sets_initial_value(obj: BpfObject) -> None:
    obj.set_data({"rewrite_offset": 3})
    obj.load()
    out = obj.program("classify").test_run(ETH_FRAME).data
    assert out[3] == 0xAB and out[1] == ETH_FRAME[1]


def test_btf_struct_layout_of_test_struct(obj: BpfObject) -> None:
    layout = obj.btf.struct_layout("flow_event")
    assert layout.size == 40
    assert layout.members == {
        "ifindex": (0, 4),
        "len": (4, 4),
        "key": (8, 1),
        "rewritten": (9, 1),
        "proto": (10, 2),
        "verdict": (12, 4),
        "seq": (16, 8),
        "mark": (24, 4),  # anonymous union members are flattened
        "mark_bytes": (24, 4),
        "tag": (28, 6),
    }
    lpm = obj.btf.struct_layout("lpm_v4_key")
    assert lpm.members == {"prefixlen": (0, 4), "addr": (4, 4)}
    with pytest.raises(LoaderError, match=r"no struct or union 'nope'.*flow_event"):
        obj.btf.struct_layout("nope")


def test_btf_datasec_vars(obj: BpfObject) -> None:
    assert obj.btf.datasec_vars(".rodata") == {
        "default_verdict": (0, 4),
        "rewrite_byte": (4, 1),
        "event_tag": (5, 6),
    }
    assert obj.btf.datasec_vars(".data") == {"rewrite_offset": (0, 4)}
    with pytest.raises(LoaderError, match="no data section"):
        obj.btf.datasec_vars(".nope")


def test_btf_parse_vmlinux(open_fds: Callable[[], set[str]]) -> None:
    before = open_fds()
    with Btf.parse("/sys/kernel/btf/vmlinux") as btf:
        skb = btf.struct_layout("__sk_buff")
        assert skb.members["len"] == (0, 4)
        assert skb.members["mark"][1] == 4
        iphdr = btf.struct_layout("iphdr")
        assert iphdr.size == 20
        assert iphdr.members["saddr"] == (12, 4)
        # bitfields: ihl/version share the first byte
        assert iphdr.detail["ihl"].bit_size == 4 and iphdr.members["ihl"] == (0, 1)
    assert open_fds() == before


def test_no_pinning_without_pin_root(test_obj_path: Path) -> None:
    with BpfObject.open(test_obj_path) as o:
        o.load()
        assert not os.path.exists("/sys/fs/bpf/shared_cfg")


def test_pin_by_name_under_pin_root_is_reused(test_obj_path: Path, pin_dir: Path) -> None:
    key, value = bytes(4), struct.pack("<Q", 0xC0FFEE)
    with BpfObject.open(test_obj_path, pin_root=str(pin_dir)) as first:
        first.load()
        assert (pin_dir / "shared_cfg").exists()
        assert sorted(p.name for p in pin_dir.iterdir()) == ["shared_cfg"]
        first.map("shared_cfg").update(key, value)
        first_id = first.map("shared_cfg").id
    assert (pin_dir / "shared_cfg").exists()  # the pin outlives the object
    with BpfObject.open(test_obj_path, pin_root=pin_dir) as second:
        second.load()
        shared = second.map("shared_cfg")
        assert shared.id == first_id
        assert shared.lookup(key) == value
        second.unpin_maps()
    assert not (pin_dir / "shared_cfg").exists()


def test_libbpf_output_goes_to_python_logging(
    test_obj_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.DEBUG, logger="ciliate.loader.libbpf"),
        BpfObject.open(test_obj_path) as o,
    ):
        o.load()
    records = [r for r in caplog.records if r.name == "ciliate.loader.libbpf"]
    assert records, "libbpf debug output was not routed to logging"
    text = "\n".join(r.getMessage() for r in records)
    assert "classify" in text  # formatted arguments, not raw printf formats
    assert "%s" not in text and "%d" not in text
    assert all(not r.getMessage().startswith("libbpf: ") for r in records)
    assert {r.levelno for r in records} <= {logging.DEBUG, logging.INFO, logging.WARNING}


def test_load_failure_other_than_verifier_is_libbpf_error(
    test_obj_path: Path, pin_dir: Path
) -> None:
    # A file squatting on the pin path of a LIBBPF_PIN_BY_NAME map makes map reuse fail.
    (pin_dir / "shared_cfg").mkdir()
    try:
        with (
            BpfObject.open(test_obj_path, pin_root=pin_dir) as o,
            pytest.raises(LibbpfError) as info,
        ):
            o.load()
        assert info.value.op == "bpf_object__load"
        assert info.value.errno is not None
    finally:
        (pin_dir / "shared_cfg").rmdir()
