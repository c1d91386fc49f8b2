"""RingBuffer: records written by the program reach Python."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ciliate.loader import BpfObject, MapError, RingBuffer


@pytest.fixture
def loaded(test_obj_path: Path) -> Iterator[BpfObject]:
    with BpfObject.open(test_obj_path) as obj:
        obj.load()
        yield obj


def frame(key: int) -> bytes:
    return bytes([key]) + bytes(59)


def test_poll_delivers_records_to_the_callback(
    loaded: BpfObject, open_fds: Callable[[], set[str]]
) -> None:
    layout = loaded.btf.struct_layout("flow_event")
    prog = loaded.program("classify")
    records: list[bytes] = []
    before = open_fds()
    with RingBuffer(loaded.map("events"), records.append) as rb:
        assert rb.poll(0) == 0
        prog.test_run(frame(0x21))
        prog.test_run(frame(0x22))
        assert rb.poll(1000) == 2
    assert open_fds() == before
    assert len(records) == 2
    assert all(len(r) == layout.size for r in records)
    key_off = layout.offset("key")
    seq_off = layout.offset("seq")
    tag_off, tag_size = layout.members["tag"]
    assert [r[key_off] for r in records] == [0x21, 0x22]
    seqs = [struct.unpack_from("<Q", r, seq_off)[0] for r in records]
    assert seqs == [0, 1]
    assert records[0][tag_off : tag_off + tag_size] == b"ciliat"
    assert records[0][layout.offset("len")] == 60


def test_drain_and_consume(loaded: BpfObject) -> None:
    prog = loaded.program("classify")
    called: list[bytes] = []
    with RingBuffer(loaded.map("events"), called.append) as rb:
        assert rb.drain() == []
        for key in range(5):
            prog.test_run(frame(key))
        drained = rb.drain()
        assert len(drained) == 5 and called == []
        prog.test_run(frame(9))
        assert rb.consume() == 1 and len(called) == 1
        assert rb.fileno() >= 0
        rb.close()
        rb.close()
        with pytest.raises(Exception, match="closed"):
            rb.poll(0)


def test_callback_exception_propagates(loaded: BpfObject) -> None:
    def boom(_record: bytes) -> None:
        raise ValueError("boom")

    with RingBuffer(loaded.map("events"), boom) as rb:
        loaded.program("classify").test_run(frame(1))
        with pytest.raises(ValueError, match="boom"):
            rb.poll(100)


def test_only_ringbuf_maps(loaded: BpfObject) -> None:
    with pytest.raises(MapError, match="not a ring buffer"):
        RingBuffer(loaded.map("verdicts"), print)
