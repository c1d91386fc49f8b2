"""The exception tree and small process-wide helpers."""

from __future__ import annotations

import contextlib
import resource

import pytest

from ciliate.loader import (
    AttachError,
    LibbpfError,
    LoaderError,
    MapError,
    ObjectOpenError,
    VerifierError,
    bump_memlock_rlimit,
)
from ciliate.loader.errors import check, check_ptr, strerror


@pytest.mark.parametrize(
    "cls", [LibbpfError, ObjectOpenError, VerifierError, MapError, AttachError]
)
def test_every_error_is_a_loader_error(cls: type[Exception]) -> None:
    assert issubclass(cls, LoaderError)


def test_libbpf_error_names_op_and_errno() -> None:
    err = LibbpfError("bpf_map_update_elem", 7, "map 'x'")
    assert err.op == "bpf_map_update_elem"
    assert err.errno == 7
    assert str(err) == "bpf_map_update_elem failed: [Errno 7] Argument list too long: map 'x'"


def test_strerror_knows_kernel_and_libbpf_codes() -> None:
    assert "ENOTSUPP" in strerror(524)
    assert strerror(2) == "No such file or directory"
    assert strerror(4003) != "Unknown error 4003"  # LIBBPF_ERRNO__FORMAT via libbpf_strerror


def test_check_helpers() -> None:
    assert check(5, "op") == 5
    with pytest.raises(LibbpfError) as info:
        check(-22, "bpf_something")
    assert (info.value.op, info.value.errno) == ("bpf_something", 22)
    assert check_ptr(1234, "op") == 1234
    with pytest.raises(LibbpfError) as null:
        check_ptr(None, "ring_buffer__new")
    assert null.value.errno is not None and null.value.errno > 0


def test_bump_memlock_rlimit() -> None:
    soft_before, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    try:
        soft = bump_memlock_rlimit()
        assert soft == resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
        # infinity when allowed, else at least the hard limit
        assert soft == resource.RLIM_INFINITY or soft == hard
    finally:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (soft_before, hard))
