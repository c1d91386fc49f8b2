"""``BPF_MAP_TYPE_RINGBUF`` consumer over libbpf's ``ring_buffer__*`` API."""

from __future__ import annotations

import ctypes
import errno as E
from collections.abc import Callable
from types import TracebackType

from ._libbpf import RINGBUF_SAMPLE_FN, lib
from .errors import LibbpfError, LoaderError, MapError, check_ptr
from .maps import Map, MapType

__all__ = ["RingBuffer"]

Callback = Callable[[bytes], None]


class RingBuffer:
    """Consume records from one or more ring buffer maps.

    ``callback`` receives each record as ``bytes`` (a copy). An exception raised by a callback
    stops consumption and is re-raised from :meth:`poll`/:meth:`consume`. The ctypes
    trampolines are kept referenced for the lifetime of this object. Close it (or use it as
    a context manager) before closing the maps' object.
    """

    def __init__(self, map: Map, callback: Callback | None = None) -> None:
        self._ptr: int | None = None
        self._trampolines: list[object] = []
        self._callbacks: list[Callback | None] = []
        self._sink: list[bytes] | None = None
        self._error: BaseException | None = None
        fd = self._ring_fd(map)
        trampoline = self._make_trampoline(callback)
        self._ptr = check_ptr(
            lib.ring_buffer__new(fd, trampoline, None, None),
            "ring_buffer__new",
            f"map {map.name!r}",
        )

    def add(self, map: Map, callback: Callback | None = None) -> None:
        """Also consume ``map`` (``ring_buffer__add``), with its own callback."""
        fd = self._ring_fd(map)
        trampoline = self._make_trampoline(callback)
        ret = int(lib.ring_buffer__add(self._check_open(), fd, trampoline, None))
        if ret < 0:
            raise LibbpfError("ring_buffer__add", -ret, f"map {map.name!r}")

    @staticmethod
    def _ring_fd(map: Map) -> int:
        if map.type != MapType.RINGBUF:
            raise MapError(f"map {map.name!r} is not a ring buffer (type {map.type_name})")
        return map.fd

    def _make_trampoline(self, callback: Callback | None) -> object:
        def sample(_ctx: int | None, data: int | None, size: int) -> int:
            try:
                record = ctypes.string_at(data, size) if data else b""
                if self._sink is not None:
                    self._sink.append(record)
                elif callback is not None:
                    callback(record)
            except BaseException as exc:  # never unwind into C; re-raised by poll/consume
                self._error = exc
                return -E.ECANCELED
            return 0

        trampoline = RINGBUF_SAMPLE_FN(sample)
        self._trampolines.append(trampoline)
        self._callbacks.append(callback)
        return trampoline

    def _check_open(self) -> int:
        if self._ptr is None:
            raise LoaderError("ring buffer is closed")
        return self._ptr

    def _result(self, ret: int, op: str) -> int:
        if self._error is not None:
            exc, self._error = self._error, None
            raise exc
        if ret == -E.EINTR:
            return 0
        if ret < 0:
            raise LibbpfError(op, -ret)
        return ret

    def poll(self, timeout_ms: int) -> int:
        """Wait up to ``timeout_ms`` (-1: forever) for records and consume them; returns the
        number of records consumed (0 on timeout or EINTR)."""
        return self._result(
            int(lib.ring_buffer__poll(self._check_open(), timeout_ms)), "ring_buffer__poll"
        )

    def consume(self) -> int:
        """Consume the records available now without waiting; returns how many."""
        return self._result(
            int(lib.ring_buffer__consume(self._check_open())), "ring_buffer__consume"
        )

    def drain(self) -> list[bytes]:
        """Consume every record available now and return them (instead of calling callbacks)."""
        ptr = self._check_open()
        sink: list[bytes] = []
        self._sink = sink
        try:
            self._result(int(lib.ring_buffer__consume(ptr)), "ring_buffer__consume")
        finally:
            self._sink = None
        return sink

    def fileno(self) -> int:
        """The epoll fd, readable when records are available (for selectors/asyncio)."""
        return int(lib.ring_buffer__epoll_fd(self._check_open()))

    def close(self) -> None:
        """Free the ring buffer manager (``ring_buffer__free``). Idempotent."""
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            lib.ring_buffer__free(ptr)

    def __enter__(self) -> RingBuffer:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
