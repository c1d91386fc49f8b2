"""Route libbpf's print output to Python logging (logger ``ciliate.loader.libbpf``).

libbpf calls a ``printf``-style callback with a format string and a ``va_list``; the ctypes
callback formats it with libc ``vsnprintf``. Messages are also appended to a per-thread
capture list while :func:`capture` is active, which is how :meth:`BpfObject.load` gets the
verifier log libbpf prints in its ``-- BEGIN PROG LOAD LOG --`` block.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ._libbpf import LIBBPF_DEBUG, LIBBPF_INFO, LIBBPF_WARN, PRINT_FN, VA_LIST_SIZE, lib, libc

__all__ = ["LOGGER", "Message", "capture", "install_print_callback"]

LOGGER = logging.getLogger("ciliate.loader.libbpf")

_LEVELS = {LIBBPF_WARN: logging.WARNING, LIBBPF_INFO: logging.INFO, LIBBPF_DEBUG: logging.DEBUG}

# First formatting attempt; a longer message (a verifier log) is formatted again at its size.
_FIRST_BUF = 4096
# Without a known va_list size we can format only once: use a buffer this large.
_FALLBACK_BUF = 1 << 20


@dataclass(frozen=True)
class Message:
    level: int  # libbpf level (LIBBPF_WARN/INFO/DEBUG)
    text: str  # formatted, without the "libbpf: " prefix and trailing newline


_tls = threading.local()
_lock = threading.Lock()
_installed: object | None = None  # keeps the ctypes callback alive for the process lifetime


def _vformat(fmt: bytes, ap: int | None) -> str:
    if VA_LIST_SIZE is None:
        buf = ctypes.create_string_buffer(_FALLBACK_BUF)
        libc.vsnprintf(buf, len(buf), fmt, ap)
        return buf.value.decode(errors="replace")
    # va_copy: the va_list object is plain memory on the supported ABIs.
    ap_copy = ctypes.create_string_buffer(VA_LIST_SIZE)
    ctypes.memmove(ap_copy, ap or 0, VA_LIST_SIZE)
    buf = ctypes.create_string_buffer(_FIRST_BUF)
    needed = int(libc.vsnprintf(buf, len(buf), fmt, ap_copy))
    if needed < len(buf):
        return buf.value.decode(errors="replace")
    big = ctypes.create_string_buffer(needed + 1)
    libc.vsnprintf(big, len(big), fmt, ap)
    return big.value.decode(errors="replace")


def _on_print(level: int, fmt: bytes | None, ap: int | None) -> int:
    try:
        pylevel = (
            logging.DEBUG if getattr(_tls, "demote", False) else _LEVELS.get(level, logging.DEBUG)
        )
        sink: list[Message] | None = getattr(_tls, "sink", None)
        if fmt is None or (sink is None and not LOGGER.isEnabledFor(pylevel)):
            return 0
        text = _vformat(fmt, ap).removeprefix("libbpf: ").rstrip("\n")
        if sink is not None:
            sink.append(Message(level, text))
        LOGGER.log(pylevel, "%s", text)
    except BaseException:  # never let an exception unwind into C
        return 0
    return 0


def install_print_callback() -> None:
    """Install the libbpf print callback once per process (idempotent, thread-safe)."""
    global _installed
    with _lock:
        if _installed is None:
            callback = PRINT_FN(_on_print)
            lib.libbpf_set_print(callback)
            _installed = callback


@contextmanager
def capture() -> Iterator[list[Message]]:
    """Collect every libbpf message printed on this thread inside the ``with`` block."""
    install_print_callback()
    previous: list[Message] | None = getattr(_tls, "sink", None)
    sink: list[Message] = []
    _tls.sink = sink
    try:
        yield sink
    finally:
        _tls.sink = previous
        if previous is not None:
            previous.extend(sink)


@contextmanager
def demoted() -> Iterator[None]:
    """Log libbpf's messages on this thread at DEBUG inside the block: for calls whose
    failure is an expected answer (a clsact qdisc that already exists)."""
    install_print_callback()
    previous = getattr(_tls, "demote", False)
    _tls.demote = True
    try:
        yield
    finally:
        _tls.demote = previous
