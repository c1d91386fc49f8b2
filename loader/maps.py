"""BPF maps: element CRUD, iteration, batch operations, per-CPU values and pinning."""

from __future__ import annotations

import ctypes
import errno as E
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from enum import IntEnum
from types import TracebackType
from typing import NamedTuple

from . import _libbpf as C
from ._libbpf import BPF_ANY, BPF_EXIST, BPF_NOEXIST, ENOTSUPP, lib
from .errors import MapError, strerror

__all__ = [
    "BPF_ANY",
    "BPF_EXIST",
    "BPF_NOEXIST",
    "Map",
    "MapInfo",
    "MapType",
    "MapValue",
    "possible_cpus",
]


class MapType(IntEnum):
    """``enum bpf_map_type`` (values from the kernel uapi)."""

    UNSPEC = 0
    HASH = 1
    ARRAY = 2
    PROG_ARRAY = 3
    PERF_EVENT_ARRAY = 4
    PERCPU_HASH = 5
    PERCPU_ARRAY = 6
    STACK_TRACE = 7
    CGROUP_ARRAY = 8
    LRU_HASH = 9
    LRU_PERCPU_HASH = 10
    LPM_TRIE = 11
    ARRAY_OF_MAPS = 12
    HASH_OF_MAPS = 13
    DEVMAP = 14
    SOCKMAP = 15
    CPUMAP = 16
    XSKMAP = 17
    SOCKHASH = 18
    CGROUP_STORAGE = 19
    REUSEPORT_SOCKARRAY = 20
    PERCPU_CGROUP_STORAGE = 21
    QUEUE = 22
    STACK = 23
    SK_STORAGE = 24
    DEVMAP_HASH = 25
    STRUCT_OPS = 26
    RINGBUF = 27
    INODE_STORAGE = 28
    TASK_STORAGE = 29
    BLOOM_FILTER = 30
    USER_RINGBUF = 31
    CGRP_STORAGE = 32


PERCPU_TYPES = frozenset(
    {
        MapType.PERCPU_HASH,
        MapType.PERCPU_ARRAY,
        MapType.LRU_PERCPU_HASH,
        MapType.PERCPU_CGROUP_STORAGE,
    }
)
_ARRAY_TYPES = frozenset({MapType.ARRAY, MapType.PERCPU_ARRAY})
# Errors meaning "this map type has no batch operation" across kernel versions.
_NO_BATCH = frozenset({E.EINVAL, E.EOPNOTSUPP, ENOTSUPP})


class _BatchUnsupported(MapError):
    """The map type has no batch lookup (callers fall back to iteration)."""


_BATCH_CHUNK = 8192

MapValue = bytes | list[bytes]


@functools.cache
def possible_cpus() -> int:
    """Number of possible CPUs (``libbpf_num_possible_cpus``): the per-CPU value count."""
    n = int(lib.libbpf_num_possible_cpus())
    if n <= 0:
        raise MapError("libbpf_num_possible_cpus failed", errno=-n, op="libbpf_num_possible_cpus")
    return n


class MapInfo(NamedTuple):
    id: int
    type: int
    name: str
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int


def map_info(fd: int) -> MapInfo:
    """``bpf_obj_get_info_by_fd`` for a map fd."""
    info = C.bpf_map_info()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    ret = int(lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)))
    if ret < 0:
        raise _map_error("bpf_obj_get_info_by_fd", -ret, f"fd {fd}")
    return MapInfo(
        id=int(info.id),
        type=int(info.type),
        name=info.name.decode(errors="replace"),
        key_size=int(info.key_size),
        value_size=int(info.value_size),
        max_entries=int(info.max_entries),
        map_flags=int(info.map_flags),
    )


def _map_error(op: str, err: int, what: str) -> MapError:
    return MapError(f"{op} on {what} failed: [Errno {err}] {strerror(err)}", errno=err, op=op)


def _is_map_fd(fd: int) -> bool:
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii", errors="replace") as f:
            return any(line.startswith("map_type:") for line in f)
    except OSError:
        return False


class Map:
    """A BPF map.

    Maps obtained from :meth:`BpfObject.map` belong to the object (their fd closes with it and
    :meth:`close` is a no-op); maps from :meth:`Map.open_pinned` own their fd and must be closed
    (context manager). Keys and values are raw ``bytes`` of exactly ``key_size`` /
    ``value_size``; per-CPU maps (:attr:`percpu`) take and return one value per possible CPU.
    """

    def __init__(
        self,
        *,
        name: str,
        map_type: int,
        key_size: int,
        value_size: int,
        max_entries: int,
        fd: int = -1,
        fd_getter: Callable[[], int] | None = None,
    ) -> None:
        self.name = name
        self.type = map_type
        self.key_size = key_size
        self.value_size = value_size
        self.max_entries = max_entries
        self.percpu = map_type in PERCPU_TYPES
        self._fd = fd
        self._fd_getter = fd_getter
        self._owns_fd = fd_getter is None
        self._pinned: list[str] = []

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open_pinned(cls, path: str | os.PathLike[str]) -> Map:
        """Open a map pinned in bpffs (``bpf_obj_get``). The returned Map owns its fd."""
        raw = os.fsencode(path)
        fd = int(lib.bpf_obj_get(raw))
        if fd < 0:
            raise _map_error("bpf_obj_get", -fd, os.fsdecode(raw))
        try:
            if not _is_map_fd(fd):
                raise MapError(f"{os.fsdecode(raw)} is not a pinned map")
            info = map_info(fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(
            name=info.name,
            map_type=info.type,
            key_size=info.key_size,
            value_size=info.value_size,
            max_entries=info.max_entries,
            fd=fd,
        )

    @property
    def fd(self) -> int:
        if self._fd_getter is not None:
            return self._fd_getter()
        if self._fd < 0:
            raise MapError(f"map {self.name!r} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        if self._fd_getter is not None:
            try:
                self._fd_getter()
            except MapError:
                return True
            return False
        return self._fd < 0

    def close(self) -> None:
        """Close the fd if this Map owns it (idempotent). Pins are left in place."""
        if self._owns_fd and self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Map:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def info(self) -> MapInfo:
        return map_info(self.fd)

    @property
    def id(self) -> int:
        return self.info().id

    @property
    def type_name(self) -> str:
        try:
            return MapType(self.type).name
        except ValueError:
            return str(self.type)

    def __repr__(self) -> str:
        return (
            f"<Map {self.name!r} type={self.type_name} key={self.key_size} "
            f"value={self.value_size} max_entries={self.max_entries}>"
        )

    # ------------------------------------------------------------------ value encoding

    @property
    def _stride(self) -> int:
        return (self.value_size + 7) & ~7

    @property
    def _value_buf_size(self) -> int:
        return self._stride * possible_cpus() if self.percpu else self.value_size

    def _key(self, key: bytes) -> bytes:
        key = bytes(key)
        if len(key) != self.key_size:
            raise MapError(
                f"map {self.name!r}: key is {len(key)} bytes, the map's key_size is {self.key_size}"
            )
        return key

    def _value(self, value: bytes | Sequence[bytes]) -> bytes:
        if isinstance(value, bytes | bytearray | memoryview):
            value = bytes(value)
            if not self.percpu:
                if len(value) != self.value_size:
                    raise MapError(
                        f"map {self.name!r}: value is {len(value)} bytes, the map's value_size "
                        f"is {self.value_size}"
                    )
                return value
            if len(value) == self._value_buf_size:
                return value  # already laid out per CPU
            if len(value) != self.value_size:
                raise MapError(
                    f"per-CPU map {self.name!r}: value must be {self.value_size} bytes (same "
                    f"for every CPU), {self._value_buf_size} bytes, or one value per CPU"
                )
            value = [value] * possible_cpus()
        if not self.percpu:
            raise MapError(f"map {self.name!r} is not per-CPU: pass one bytes value")
        values = list(value)
        if len(values) != possible_cpus():
            raise MapError(
                f"per-CPU map {self.name!r}: got {len(values)} values, "
                f"there are {possible_cpus()} possible CPUs"
            )
        pad = bytes(self._stride - self.value_size)
        out = bytearray()
        for v in values:
            v = bytes(v)
            if len(v) != self.value_size:
                raise MapError(
                    f"per-CPU map {self.name!r}: each value must be {self.value_size} bytes"
                )
            out += v + pad
        return bytes(out)

    def _decode(self, raw: bytes) -> MapValue:
        if not self.percpu:
            return raw[: self.value_size]
        return [
            raw[i * self._stride : i * self._stride + self.value_size]
            for i in range(possible_cpus())
        ]

    # ------------------------------------------------------------------ elements

    def lookup(self, key: bytes) -> MapValue | None:
        """The value for ``key``, ``None`` when absent. Per-CPU maps: a list, one per CPU."""
        k = self._key(key)
        buf = ctypes.create_string_buffer(self._value_buf_size)
        ret = int(lib.bpf_map_lookup_elem(self.fd, k, buf))
        if ret == -E.ENOENT:
            return None
        if ret < 0:
            raise _map_error("bpf_map_lookup_elem", -ret, f"map {self.name!r}")
        return self._decode(buf.raw)

    def lookup_percpu(self, key: bytes) -> list[bytes] | None:
        """Like :meth:`lookup` for a per-CPU map, typed as a list."""
        if not self.percpu:
            raise MapError(f"map {self.name!r} is not per-CPU")
        value = self.lookup(key)
        assert value is None or isinstance(value, list)
        return value

    def update(self, key: bytes, value: bytes | Sequence[bytes], flags: int = BPF_ANY) -> None:
        """Create or update ``key`` (``BPF_ANY``/``BPF_NOEXIST``/``BPF_EXIST``).

        For per-CPU maps ``value`` is one value (written to every CPU) or a sequence with one
        value per possible CPU.
        """
        k = self._key(key)
        v = self._value(value)
        ret = int(lib.bpf_map_update_elem(self.fd, k, v, flags))
        if ret < 0:
            raise _map_error("bpf_map_update_elem", -ret, f"map {self.name!r}")

    def delete(self, key: bytes) -> bool:
        """Delete ``key``; ``False`` when it was absent."""
        k = self._key(key)
        ret = int(lib.bpf_map_delete_elem(self.fd, k))
        if ret == -E.ENOENT:
            return False
        if ret < 0:
            raise _map_error("bpf_map_delete_elem", -ret, f"map {self.name!r}")
        return True

    def keys(self) -> Iterator[bytes]:
        """Iterate over keys with ``bpf_map_get_next_key``."""
        fd = self.fd
        nxt = ctypes.create_string_buffer(max(self.key_size, 1))
        cur: bytes | None = None
        while True:
            ret = int(lib.bpf_map_get_next_key(fd, cur, nxt))
            if ret == -E.ENOENT:
                return
            if ret < 0:
                raise _map_error("bpf_map_get_next_key", -ret, f"map {self.name!r}")
            cur = nxt.raw[: self.key_size]
            yield cur

    __iter__ = keys

    def items(self) -> Iterator[tuple[bytes, MapValue]]:
        """Iterate over (key, value) pairs; keys deleted meanwhile are skipped."""
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:
                yield key, value

    def clear(self) -> None:
        """Delete every element; arrays (whose elements cannot be deleted) are zeroed."""
        if self.type in _ARRAY_TYPES:
            zero = bytes(self.value_size)
            for index in range(self.max_entries):
                self.update(index.to_bytes(self.key_size, "little"), zero)
            return
        for key in list(self.keys()):
            self.delete(key)

    # ------------------------------------------------------------------ batches

    def update_batch(
        self, keys: Sequence[bytes], values: Sequence[bytes], flags: int = BPF_ANY
    ) -> int:
        """Update many elements with one ``bpf_map_update_batch``; returns the count written.

        Map types without batch support (the kernel answers EINVAL/ENOTSUPP before touching
        any element) fall back to one update per element.
        """
        if len(keys) != len(values):
            raise MapError(f"update_batch: {len(keys)} keys but {len(values)} values")
        if not keys:
            return 0
        kbuf = b"".join(self._key(k) for k in keys)
        vbuf = b"".join(self._value(v) for v in values)
        n = len(keys)
        count = ctypes.c_uint32(n)
        opts = C.bpf_map_batch_opts(sz=ctypes.sizeof(C.bpf_map_batch_opts), elem_flags=flags)
        ret = int(
            lib.bpf_map_update_batch(self.fd, kbuf, vbuf, ctypes.byref(count), ctypes.byref(opts))
        )
        if ret == 0:
            return int(count.value)
        if -ret in _NO_BATCH and count.value in (0, n):
            for k, v in zip(keys, values, strict=True):
                self.update(k, v, flags)
            return n
        raise _map_error(
            "bpf_map_update_batch", -ret, f"map {self.name!r} ({count.value} of {n} written)"
        )

    def lookup_batch(self) -> list[tuple[bytes, MapValue]]:
        """All (key, value) pairs via ``bpf_map_lookup_batch``, or by iteration where the map
        type has no batch lookup."""
        ks, vs = self.key_size, self._value_buf_size
        result: list[tuple[bytes, MapValue]] = []
        try:
            for kraw, vraw, count in self.lookup_batch_raw():
                for i in range(count):
                    result.append(
                        (kraw[i * ks : (i + 1) * ks], self._decode(vraw[i * vs : (i + 1) * vs]))
                    )
        except _BatchUnsupported:
            return list(self.items())
        return result

    def lookup_batch_raw(self) -> Iterator[tuple[bytes, bytes, int]]:
        """The map's contents as raw chunks ``(keys, values, count)`` of packed keys and
        values (per-CPU values: one rounded slot per possible CPU), for callers that scan
        large arrays without making one Python object per entry. Raises MapError when the
        map type has no batch lookup."""
        fd = self.fd
        ks, vs = self.key_size, self._value_buf_size
        chunk = max(1, min(self.max_entries, _BATCH_CHUNK))
        token_size = max(self.key_size, 8)
        in_batch: ctypes.Array[ctypes.c_char] | None = None
        out_batch = ctypes.create_string_buffer(token_size)
        opts = C.bpf_map_batch_opts(sz=ctypes.sizeof(C.bpf_map_batch_opts))
        first = True
        while True:
            keys_buf = ctypes.create_string_buffer(ks * chunk)
            vals_buf = ctypes.create_string_buffer(vs * chunk)
            count = ctypes.c_uint32(chunk)
            ret = int(
                lib.bpf_map_lookup_batch(
                    fd,
                    in_batch,
                    out_batch,
                    keys_buf,
                    vals_buf,
                    ctypes.byref(count),
                    ctypes.byref(opts),
                )
            )
            err = -ret if ret < 0 else 0
            if err == E.ENOSPC:  # a hash bucket holds more elements than `chunk`
                chunk *= 2
                continue
            if err and err != E.ENOENT:
                if first and err in _NO_BATCH:
                    raise _BatchUnsupported(
                        f"map {self.name!r}: no batch lookup",
                        errno=err,
                        op="bpf_map_lookup_batch",
                    )
                raise _map_error("bpf_map_lookup_batch", err, f"map {self.name!r}")
            yield keys_buf.raw, vals_buf.raw, count.value
            if err == E.ENOENT:
                return
            in_batch = ctypes.create_string_buffer(out_batch.raw, token_size)
            first = False

    # ------------------------------------------------------------------ pinning

    def pin(self, path: str | os.PathLike[str]) -> None:
        """Pin the map at ``path`` in bpffs (``bpf_obj_pin``). :meth:`unpin` removes it."""
        raw = os.fsencode(path)
        ret = int(lib.bpf_obj_pin(self.fd, raw))
        if ret < 0:
            raise _map_error("bpf_obj_pin", -ret, f"map {self.name!r} at {os.fsdecode(raw)}")
        self._pinned.append(os.fsdecode(raw))

    def unpin(self) -> None:
        """Remove the pins this Map created (and only those); no-op when there are none."""
        while self._pinned:
            path = self._pinned.pop()
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                self._pinned.append(path)
                raise MapError(f"cannot unpin {path}: {exc}", errno=exc.errno, op="unlink") from exc
