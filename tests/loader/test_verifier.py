"""VerifierError: the program, the source location and the verifier's reason."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import pytest

from ciliate.loader import BpfObject, LoaderError, VerifierError

BROKEN_SRC = Path(__file__).parent / "progs" / "broken.bpf.c"


def _broken_line() -> tuple[int, str]:
    for number, line in enumerate(BROKEN_SRC.read_text().splitlines(), start=1):
        if "BROKEN" in line and "pkt[" in line:
            return number, line.strip()
    raise AssertionError("marker line not found in broken.bpf.c")


def test_verifier_error_names_program_line_and_reason(
    broken_obj_path: Path, open_fds: Callable[[], set[str]]
) -> None:
    line, text = _broken_line()
    before = open_fds()
    with BpfObject.open(broken_obj_path) as obj, pytest.raises(VerifierError) as info:
        obj.load()
    assert open_fds() == before
    err = info.value
    assert isinstance(err, LoaderError)
    assert err.program == "bad_read"  # not accept_all, which loads fine before it
    assert err.errno == 13  # EACCES
    assert err.source_file is not None and err.source_file.endswith("broken.bpf.c")
    assert err.source_line == line
    assert err.source_text == text
    assert any("invalid access to packet" in e for e in err.error_lines)
    # the full log, including the instruction trace
    assert "invalid access to packet" in err.log
    assert "processed" in err.log and "insns" in err.log
    message = str(err)
    assert "bad_read" in message
    assert f"broken.bpf.c:{line}" in message
    assert "pkt[12]" in message
    assert "invalid access to packet" in message
    assert "outside of the packet" in message


def test_object_cannot_be_loaded_twice_after_failure(broken_obj_path: Path) -> None:
    with BpfObject.open(broken_obj_path) as obj:
        with pytest.raises(VerifierError):
            obj.load()
        with pytest.raises(LoaderError, match="already loaded"):
            obj.load()


LOG = """func#0 @0
0: R1=ctx() R10=fp0
; int f(struct __sk_buff *skb) @ prog.bpf.c:10
0: (bf) r6 = r1                       ; R1=ctx() R6=ctx()
;  @ prog.bpf.c:0
1: (61) r1 = *(u32 *)(r6 +76)
; x = *(__u32 *)(p + 4); @ /src/prog.bpf.c:14
2: (61) r0 = *(u32 *)(r1 +4)
R1 invalid mem access 'scalar'
processed 3 insns (limit 1000000) max_states_per_insn 0 total_states 0 peak_states 0 mark_read 0
"""


def test_verifier_log_parsing() -> None:
    err = VerifierError("f", LOG, errno=13)
    assert (err.source_file, err.source_line) == ("/src/prog.bpf.c", 14)
    assert err.source_text == "x = *(__u32 *)(p + 4);"
    assert err.error_lines == ["R1 invalid mem access 'scalar'"]
    assert "f" in str(err) and "/src/prog.bpf.c:14" in str(err)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.program, copy.log, copy.errno) == ("f", LOG, 13)


def test_verifier_error_without_line_info() -> None:
    err = VerifierError("g", "0: (b7) r0 = 0\nR0 !read_ok\n")
    assert err.source_file is None and err.source_line is None and err.source_text is None
    assert err.error_lines == ["R0 !read_ok"]
    assert "'g'" in str(err) and "R0 !read_ok" in str(err)
