"""Map: CRUD, iteration, batches (and their fallback), per-CPU values, pinning."""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ciliate.loader import (
    BPF_EXIST,
    BPF_NOEXIST,
    BpfObject,
    Map,
    MapError,
    MapType,
    _libbpf,
    maps,
    possible_cpus,
)


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def lpm_key(prefixlen: int, a: int, b: int, c: int, d: int) -> bytes:
    return struct.pack("<I4B", prefixlen, a, b, c, d)


@pytest.fixture
def loaded(test_obj_path: Path) -> Iterator[BpfObject]:
    with BpfObject.open(test_obj_path) as obj:
        obj.load()
        yield obj


def test_hash_crud(loaded: BpfObject) -> None:
    m = loaded.map("verdicts")
    assert m.type == MapType.HASH and not m.percpu
    assert m.lookup(u32(1)) is None
    m.update(u32(1), u32(10))
    assert m.lookup(u32(1)) == u32(10)
    m.update(u32(1), u32(11), BPF_EXIST)
    assert m.lookup(u32(1)) == u32(11)
    with pytest.raises(MapError) as exists:
        m.update(u32(1), u32(12), BPF_NOEXIST)
    assert exists.value.errno == errno.EEXIST
    with pytest.raises(MapError) as missing:
        m.update(u32(2), u32(12), BPF_EXIST)
    assert missing.value.errno == errno.ENOENT
    assert m.delete(u32(1)) is True
    assert m.delete(u32(1)) is False
    assert m.lookup(u32(1)) is None


def test_wrong_sizes_are_rejected_before_the_syscall(loaded: BpfObject) -> None:
    m = loaded.map("verdicts")
    with pytest.raises(MapError, match="key_size is 4"):
        m.lookup(b"\x01")
    with pytest.raises(MapError, match="value_size is 4"):
        m.update(u32(1), b"\x01\x02")
    with pytest.raises(MapError, match="not per-CPU"):
        m.update(u32(1), [u32(1)])


def test_iteration_and_clear(loaded: BpfObject) -> None:
    m = loaded.map("verdicts")
    expected = {u32(k): u32(k * 100) for k in range(20)}
    for k, v in expected.items():
        m.update(k, v)
    assert sorted(m.keys()) == sorted(expected)
    assert dict(m.items()) == expected
    assert sorted(m) == sorted(expected)
    m.clear()
    assert list(m.keys()) == []


def test_array_clear_zeroes(loaded: BpfObject) -> None:
    m = loaded.map("shared_cfg")
    m.update(u32(0), u64(99))
    m.clear()
    assert m.lookup(u32(0)) == u64(0)
    with pytest.raises(MapError) as info:
        m.delete(u32(0))  # array elements cannot be deleted
    assert info.value.errno == errno.EINVAL


def test_batch_update_and_lookup_hash(loaded: BpfObject) -> None:
    m = loaded.map("verdicts")
    keys = [u32(k) for k in range(200)]
    values = [u32(k ^ 0x5A5A) for k in range(200)]
    assert m.update_batch(keys, values) == 200
    got = m.lookup_batch()
    assert len(got) == 200
    assert dict(got) == dict(zip(keys, values, strict=True))
    assert dict(m.items()) == dict(got)
    with pytest.raises(MapError, match="3 keys but 2 values"):
        m.update_batch(keys[:3], values[:2])


def test_batch_on_lpm_trie(loaded: BpfObject) -> None:
    m = loaded.map("prefixes")
    assert m.type == MapType.LPM_TRIE
    keys = [lpm_key(8, 10, 0, 0, 0), lpm_key(16, 10, 1, 0, 0), lpm_key(24, 10, 1, 2, 0)]
    values = [u32(1), u32(2), u32(3)]
    assert m.update_batch(keys, values) == 3
    assert dict(m.lookup_batch()) == dict(zip(keys, values, strict=True))
    # longest-prefix match through a plain lookup
    assert m.lookup(lpm_key(32, 10, 1, 2, 3)) == u32(3)
    assert m.lookup(lpm_key(32, 10, 9, 9, 9)) == u32(1)
    assert m.lookup(lpm_key(32, 11, 0, 0, 0)) is None


def _unsupported_batch(*_args: Any) -> int:
    return -_libbpf.ENOTSUPP


def test_batch_falls_back_where_unsupported(
    loaded: BpfObject, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This kernel supports batches on every map type used here, so force the kernel answer
    # older kernels give for e.g. LPM tries.
    monkeypatch.setattr(_libbpf.lib, "bpf_map_update_batch", _unsupported_batch)
    monkeypatch.setattr(_libbpf.lib, "bpf_map_lookup_batch", _unsupported_batch)
    m = loaded.map("prefixes")
    keys = [lpm_key(8, 10, 0, 0, 0), lpm_key(24, 192, 168, 1, 0)]
    assert m.update_batch(keys, [u32(7), u32(8)]) == 2
    assert dict(m.lookup_batch()) == {keys[0]: u32(7), keys[1]: u32(8)}


def test_batch_lookup_continues_and_grows_chunks(
    loaded: BpfObject, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One element per call: many continuation calls, and ENOSPC (a hash bucket holding two
    # elements) makes the chunk grow.
    monkeypatch.setattr(maps, "_BATCH_CHUNK", 1)
    m = loaded.map("verdicts")
    keys = [u32(k) for k in range(256)]
    m.update_batch(keys, keys)
    got = m.lookup_batch()
    assert len(got) == 256
    assert dict(got) == {k: k for k in keys}


def test_percpu_lookup_returns_one_value_per_cpu(loaded: BpfObject) -> None:
    m = loaded.map("counters")
    assert m.type == MapType.PERCPU_ARRAY and m.percpu
    ncpu = possible_cpus()
    last = Path("/sys/devices/system/cpu/possible").read_text().strip().split("-")[-1]
    assert ncpu == int(last) + 1
    values = m.lookup(u32(0))
    assert isinstance(values, list) and len(values) == ncpu
    assert all(v == u64(0) for v in values)
    per_cpu = [u64(100 + i) for i in range(ncpu)]
    m.update(u32(1), per_cpu)
    assert m.lookup(u32(1)) == per_cpu
    m.update(u32(2), u64(7))  # one value: written on every CPU
    assert m.lookup_percpu(u32(2)) == [u64(7)] * ncpu
    batch = dict(m.lookup_batch())
    assert len(batch) == 4 and batch[u32(1)] == per_cpu
    with pytest.raises(MapError, match="possible CPUs"):
        m.update(u32(3), [u64(1)] * (ncpu + 1))


def test_pin_open_pinned_unpin(
    loaded: BpfObject, pin_dir: Path, open_fds: Callable[[], set[str]]
) -> None:
    m = loaded.map("verdicts")
    m.update(u32(5), u32(55))
    path = pin_dir / "verdicts"
    m.pin(path)
    assert path.exists()
    before = open_fds()
    with Map.open_pinned(path) as pinned:
        assert pinned.name == "verdicts"
        assert (pinned.type, pinned.key_size, pinned.value_size, pinned.max_entries) == (
            MapType.HASH,
            4,
            4,
            256,
        )
        assert pinned.id == m.id
        assert pinned.lookup(u32(5)) == u32(55)
        pinned.update(u32(6), u32(66))  # same map: visible through the object's fd
        assert m.lookup(u32(6)) == u32(66)
    assert open_fds() == before
    with pytest.raises(MapError, match="closed"):
        pinned.lookup(u32(5))
    pinned.close()  # idempotent
    m.unpin()
    assert not path.exists()
    m.unpin()  # nothing left to unpin: no-op


def test_unpin_only_removes_own_pins(loaded: BpfObject, pin_dir: Path) -> None:
    m = loaded.map("verdicts")
    m.pin(pin_dir / "mine")
    with Map.open_pinned(pin_dir / "mine") as other:
        other.pin(pin_dir / "theirs")
        m.unpin()
        assert not (pin_dir / "mine").exists()
        assert (pin_dir / "theirs").exists()
        other.unpin()
    assert list(pin_dir.iterdir()) == []


def test_open_pinned_errors(pin_dir: Path, loaded: BpfObject) -> None:
    with pytest.raises(MapError) as info:
        Map.open_pinned(pin_dir / "absent")
    assert info.value.errno == errno.ENOENT
    m = loaded.map("verdicts")
    m.pin(pin_dir / "dup")
    with pytest.raises(MapError) as dup:
        m.pin(pin_dir / "dup")
    assert dup.value.errno == errno.EEXIST
    m.unpin()
