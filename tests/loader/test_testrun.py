"""Program.test_run: retval, rewritten packet, duration, ctx in/out."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from ciliate.loader import BpfObject, Btf, LibbpfError, RingBuffer

FRAME = bytes([0x11]) + bytes(range(1, 60))


@pytest.fixture
def loaded(test_obj_path: Path) -> Iterator[BpfObject]:
    with BpfObject.open(test_obj_path) as obj:
        obj.load()
        yield obj


def test_test_run_returns_retval_data_and_duration(loaded: BpfObject) -> None:
    prog = loaded.program("classify")
    result = prog.test_run(FRAME, repeat=50)
    assert result.retval == 0
    assert len(result.data) == len(FRAME)
    assert result.data[1] == 0xAB  # the byte the program rewrites
    assert result.data[0] == FRAME[0] and result.data[2:] == FRAME[2:]
    assert result.duration_ns > 0
    assert result.ctx is None
    # repeat=50 ran the program 50 times: the per-CPU counter says so
    counts = loaded.map("counters").lookup_percpu(bytes(4))
    assert counts is not None
    assert sum(struct.unpack("<Q", c)[0] for c in counts) == 50


def test_test_run_verdict_follows_map_entry(loaded: BpfObject) -> None:
    prog, verdicts = loaded.program("classify"), loaded.map("verdicts")
    verdicts.update(struct.pack("<I", 0x11), struct.pack("<I", 2))
    assert prog.test_run(FRAME).retval == 2
    other = bytes([0x12]) + FRAME[1:]
    assert prog.test_run(other).retval == 0
    verdicts.update(struct.pack("<I", 0x11), struct.pack("<i", -1))  # TC_ACT_UNSPEC
    assert prog.test_run(FRAME).retval == -1


def test_test_run_with_skb_ctx(loaded: BpfObject) -> None:
    with Btf.parse("/sys/kernel/btf/vmlinux") as vmlinux:
        skb = vmlinux.struct_layout("__sk_buff")
    ctx = bytearray(skb.size)
    offset, size = skb.members["mark"]
    ctx[offset : offset + size] = struct.pack("<I", 0xFEED)
    result = loaded.program("classify").test_run(FRAME, ctx=bytes(ctx))
    assert result.ctx is not None and len(result.ctx) == skb.size
    assert result.ctx[offset : offset + size] == struct.pack("<I", 0xFEED)
    event = loaded.btf.struct_layout("flow_event")
    with RingBuffer(loaded.map("events")) as rb:
        (record,) = rb.drain()
    moff, msize = event.members["mark"]
    assert record[moff : moff + msize] == struct.pack("<I", 0xFEED)


def test_test_run_errors_are_translated(loaded: BpfObject) -> None:
    with pytest.raises(LibbpfError) as info:
        loaded.program("classify").test_run(b"\x00" * 4)  # shorter than an Ethernet header
    assert info.value.op == "bpf_prog_test_run_opts"
    assert info.value.errno == 22
    with pytest.raises(LibbpfError, match="data_out_size") as small:
        loaded.program("classify").test_run(FRAME, data_out_size=8)
    assert small.value.errno == 28
