"""``BPF_PROG_TEST_RUN``: run a loaded program on a buffer without attaching it."""

from __future__ import annotations

import ctypes
from typing import NamedTuple

from . import _libbpf as C
from ._libbpf import lib
from .errors import LibbpfError

__all__ = ["TestRunResult", "test_run"]

_DEFAULT_HEADROOM = 256


class TestRunResult(NamedTuple):
    retval: int  # the program's return value (as a signed 32-bit int)
    data: bytes  # the packet after the run (data_out)
    duration_ns: int  # average duration of one repetition
    ctx: bytes | None  # ctx_out when a context was passed or ctx_out_size given


def test_run(
    prog_fd: int,
    data: bytes,
    *,
    repeat: int = 1,
    ctx: bytes | None = None,
    data_out_size: int | None = None,
    ctx_out_size: int | None = None,
) -> TestRunResult:
    """``bpf_prog_test_run_opts`` on ``prog_fd``.

    ``data_out_size`` defaults to ``len(data) + 256`` (room for a program that grows the
    packet); ``ctx_out_size`` defaults to ``len(ctx)`` when ``ctx`` is given.
    """
    data = bytes(data)
    if data_out_size is None:
        data_out_size = len(data) + _DEFAULT_HEADROOM if data else 0
    if ctx_out_size is None:
        ctx_out_size = len(ctx) if ctx is not None else 0
    data_out = ctypes.create_string_buffer(max(data_out_size, 1))
    ctx_out = ctypes.create_string_buffer(max(ctx_out_size, 1))
    data_in = ctypes.create_string_buffer(data, max(len(data), 1))
    ctx_in = ctypes.create_string_buffer(ctx, max(len(ctx), 1)) if ctx is not None else None

    opts = C.bpf_test_run_opts(sz=ctypes.sizeof(C.bpf_test_run_opts))
    opts.repeat = repeat
    if data:
        opts.data_in = ctypes.addressof(data_in)
        opts.data_size_in = len(data)
    if data_out_size:
        opts.data_out = ctypes.addressof(data_out)
        opts.data_size_out = data_out_size
    if ctx_in is not None and ctx:
        opts.ctx_in = ctypes.addressof(ctx_in)
        opts.ctx_size_in = len(ctx or b"")
    if ctx_out_size:
        opts.ctx_out = ctypes.addressof(ctx_out)
        opts.ctx_size_out = ctx_out_size

    ret = int(lib.bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)))
    if ret < 0:
        detail = None
        if -ret == 28:  # ENOSPC
            detail = (
                f"output needs {opts.data_size_out} bytes of data and {opts.ctx_size_out} of "
                "context: pass a larger data_out_size or ctx_out_size (or ctx_out_size=0)"
            )
        raise LibbpfError("bpf_prog_test_run_opts", -ret, detail)
    retval = int(opts.retval)
    if retval >= 1 << 31:
        retval -= 1 << 32
    return TestRunResult(
        retval=retval,
        data=data_out.raw[: opts.data_size_out] if data_out_size else b"",
        duration_ns=int(opts.duration),
        ctx=ctx_out.raw[: opts.ctx_size_out] if ctx_out_size else None,
    )


# Not pytest tests, despite their names.
TestRunResult.__test__ = False  # type: ignore[attr-defined]
test_run.__test__ = False  # type: ignore[attr-defined]
