"""Enter a network namespace on the calling thread for the duration of a ``with`` block."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager

from ._libbpf import CLONE_NEWNET, libc
from .errors import LoaderError

__all__ = ["enter_netns", "netns_path"]

_NETNS_RUN_DIR = "/run/netns"


def netns_path(netns: str | os.PathLike[str]) -> str:
    """A namespace path: ``/run/netns/NAME`` for a bare name, else the path itself."""
    text = os.fspath(netns)
    if os.sep not in text:
        return os.path.join(_NETNS_RUN_DIR, text)
    return text


def _setns(fd: int, what: str) -> None:
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise LoaderError(
            f"setns({what}, CLONE_NEWNET) failed: [Errno {err}] {os.strerror(err)}",
            errno=err,
            op="setns",
        )


@contextmanager
def enter_netns(netns: str | os.PathLike[str] | None) -> Iterator[None]:
    """Switch the calling thread into ``netns`` and back to its original namespace afterwards.

    ``netns`` is a path such as ``/run/netns/NAME`` or ``/proc/PID/ns/net``, a bare name from
    ``ip netns``, or ``None`` (stay where we are). Only this OS thread moves (``setns`` acts
    per thread); the original namespace is restored from an fd opened before the switch, also
    when the block raises. Sockets created inside keep their namespace after the block.
    """
    if netns is None:
        yield
        return
    target = netns_path(netns)
    try:
        target_fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise LoaderError(
            f"cannot open network namespace {target}: {exc}", errno=exc.errno
        ) from exc
    try:
        orig_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        os.close(target_fd)
        raise LoaderError(
            f"cannot open the current network namespace: {exc}", errno=exc.errno
        ) from exc
    try:
        _setns(target_fd, target)
        try:
            yield
        finally:
            _setns(orig_fd, "original namespace")
    finally:
        os.close(target_fd)
        os.close(orig_fd)
