"""BPF iterators (``SEC("iter/...")``): a program run once per kernel object
(each UDP socket, say) while a file descriptor is read.

The link (``bpf_link_create(prog, 0, BPF_TRACE_ITER)``) ties the program to
its iterator; each ``bpf_iter_create(link)`` opens one walk, and reading it
to EOF runs the program over every object. The socket iterators (tcp, udp)
walk the sockets of the network namespace the walk was *created* in, so
:meth:`IterLink.run` enters ``netns`` around ``bpf_iter_create`` only.
"""

from __future__ import annotations

import os
from types import TracebackType

from ._libbpf import BPF_TRACE_ITER, lib
from .errors import AttachError, LoaderError, strerror
from .netns import enter_netns
from .object import Program

__all__ = ["IterLink"]

_READ_SIZE = 1 << 16


class IterLink:
    """An iterator program's link (a context manager: closing it detaches)."""

    def __init__(self, program: Program) -> None:
        link = int(lib.bpf_link_create(program.fd, 0, BPF_TRACE_ITER, None))
        if link < 0:
            raise AttachError(
                f"bpf_link_create (iterator {program.name}): {strerror(-link)}",
                errno=-link,
                op="bpf_link_create",
            )
        self._fd: int | None = link
        self.name = program.name

    def run(self, *, netns: str | os.PathLike[str] | None = None) -> bytes:
        """Walk once, in ``netns`` (a path, an ``ip netns`` name, or None: the
        caller's namespace), and return what the program printed (often
        nothing: the work is the side effect)."""
        if self._fd is None:
            raise LoaderError(f"iterator {self.name}: the link is closed", op="bpf_iter_create")
        with enter_netns(netns):
            fd = int(lib.bpf_iter_create(self._fd))
        if fd < 0:
            raise LoaderError(
                f"bpf_iter_create (iterator {self.name}, netns {netns or 'own'}): {strerror(-fd)}",
                errno=-fd,
                op="bpf_iter_create",
            )
        chunks = []
        try:
            while chunk := os.read(fd, _READ_SIZE):
                chunks.append(chunk)
        except OSError as exc:
            raise LoaderError(
                f"reading iterator {self.name} (netns {netns or 'own'}): {exc.strerror}",
                errno=exc.errno,
                op="read",
            ) from exc
        finally:
            os.close(fd)
        return b"".join(chunks)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> IterLink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
