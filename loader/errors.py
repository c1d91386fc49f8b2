"""The exception tree of :mod:`ciliate.loader` and the helpers that raise it from libbpf returns."""

from __future__ import annotations

import ctypes
import os
import re

from ._libbpf import ENOTSUPP, lib

__all__ = [
    "AttachError",
    "LibbpfError",
    "LoaderError",
    "MapError",
    "ObjectOpenError",
    "VerifierError",
    "strerror",
]


def strerror(errno: int) -> str:
    """``os.strerror`` that also knows the kernel-internal ENOTSUPP and libbpf's own codes."""
    if errno == ENOTSUPP:
        return "Operation not supported (ENOTSUPP)"
    if errno >= 4000:  # LIBBPF_ERRNO__START
        buf = ctypes.create_string_buffer(256)
        lib.libbpf_strerror(-errno, buf, len(buf))
        return buf.value.decode(errors="replace")
    return os.strerror(errno)


class LoaderError(Exception):
    """Root of the tree. ``errno`` is set when a system or libbpf call failed, else ``None``.

    ``op`` names the failing libbpf/libc function when there is one.
    """

    def __init__(self, message: str, *, errno: int | None = None, op: str | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        self.op = op


class LibbpfError(LoaderError):
    """A libbpf call failed. ``op`` is the function name, ``errno`` the positive error code."""

    def __init__(self, op: str, errno: int, detail: str | None = None) -> None:
        message = f"{op} failed: [Errno {errno}] {strerror(errno)}"
        if detail:
            message = f"{message}: {detail}"
        super().__init__(message, errno=errno, op=op)


class ObjectOpenError(LoaderError):
    """The BPF object file is missing, unreadable or not an ELF BPF object."""


class MapError(LoaderError):
    """A map operation failed (wrong key/value size, wrong map type, or the syscall failed)."""


class AttachError(LoaderError):
    """Attaching or detaching a program failed."""


# "; <source text> @ <file>:<line>" -- BTF line info the verifier prints before instructions.
_SOURCE_RE = re.compile(r"^; (?P<text>.*) @ (?P<file>\S+):(?P<line>\d+)$")
# Lines that are part of the instruction trace rather than the final error message.
_TRACE_RE = re.compile(r"^(\d+: |\d+:$|; |from \d+ to \d+|func#\d+ @|last_idx |regs=|parent )")
# Summary lines the verifier appends after the error.
_SUMMARY_RE = re.compile(
    r"^(processed \d+ insns|verification time|stack depth|-- END PROG LOAD LOG --|"
    r"mark_precise|max_states_per_insn)"
)


class VerifierError(LoaderError):
    """The kernel verifier rejected a program during :meth:`BpfObject.load`.

    ``log`` is the complete verifier log. ``source_file``/``source_line``/``source_text`` come
    from the last ``; <text> @ <file>:<line>`` line before the error (BTF line info; ``None``
    when the object has no line info), ``error_lines`` are the verifier's closing error lines.
    """

    def __init__(self, program: str, log: str, *, errno: int | None = None) -> None:
        self.program = program
        self.log = log
        self.error_lines: list[str] = []
        self.source_file: str | None = None
        self.source_line: int | None = None
        self.source_text: str | None = None
        self.errno = errno
        self._parse(log)
        super().__init__(self._message(), errno=errno, op="bpf_object__load")

    def _parse(self, log: str) -> None:
        lines = [line.rstrip() for line in log.splitlines() if line.strip()]
        while lines and _SUMMARY_RE.match(lines[-1]):
            lines.pop()
        end = len(lines)
        while end > 0 and not _TRACE_RE.match(lines[end - 1]):
            end -= 1
        self.error_lines = lines[end:] or lines[-1:]
        for line in reversed(lines[:end]):
            match = _SOURCE_RE.match(line)
            if match and int(match["line"]) > 0:  # line 0: compiler-generated code
                self.source_text = match["text"].strip()
                self.source_file = match["file"]
                self.source_line = int(match["line"])
                break

    def _message(self) -> str:
        where = ""
        if self.source_file is not None:
            where = f" at {self.source_file}:{self.source_line}"
            if self.source_text:
                where += f" `{self.source_text}`"
        reason = "; ".join(self.error_lines) if self.error_lines else "no verifier log"
        errno = f" [Errno {self.errno}]" if self.errno is not None else ""
        return f"verifier rejected program '{self.program}'{where}:{errno} {reason}"

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_verifier_error, (self.program, self.log, self.errno))


def _rebuild_verifier_error(program: str, log: str, errno: int | None) -> VerifierError:
    return VerifierError(program, log, errno=errno)


def check(ret: int, op: str, detail: str | None = None) -> int:
    """Return ``ret`` if it is >= 0, else raise :class:`LibbpfError` for ``-ret``."""
    if ret < 0:
        raise LibbpfError(op, -ret, detail)
    return ret


def ptr_errno(ptr: int | None) -> int:
    """The positive errno for a NULL pointer returned by libbpf (``libbpf_get_error``)."""
    err = -int(lib.libbpf_get_error(ptr))
    if err <= 0:
        err = ctypes.get_errno() or 22  # EINVAL when libbpf left nothing better
    return err


def check_ptr(ptr: int | None, op: str, detail: str | None = None) -> int:
    """Return the non-NULL pointer ``ptr`` or raise :class:`LibbpfError`."""
    if not ptr:
        raise LibbpfError(op, ptr_errno(ptr), detail)
    return ptr
