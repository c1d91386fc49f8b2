"""A broken template fails at load with an error that names the program and
the source line the verifier rejected."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ciliate.datapath import objects
from ciliate.loader import BpfObject, VerifierError

ROOT = Path(__file__).resolve().parents[2]
BROKEN = "\tif (*(__u8 *)(long)ctx->data == 0xff) /* no bounds check: rejected */\n"


@pytest.fixture(scope="module")
def broken_lxc(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """bpf_lxc.o built from a copy of the tree with an unchecked packet read."""
    if objects.source_root() is None:
        pytest.skip("needs a source checkout")
    src = tmp_path_factory.mktemp("broken-src")
    # The whole build: the BPF objects and the CNI relay CMake also builds
    # (with the default agent socket it reads from defaults.py).
    for item in (
        "CMakeLists.txt",
        "bpf",
        "datapath",
        "control/cni/shim",
        "control/cni/defaults.py",
    ):
        (src / item).parent.mkdir(parents=True, exist_ok=True)
        copy = shutil.copytree if (ROOT / item).is_dir() else shutil.copy
        copy(ROOT / item, src / item)
    template = src / "bpf" / "src" / "bpf_lxc.c.j2"
    lines = template.read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if "int ret = handle_from_container" in line) + 1
    lines[at:at] = [BROKEN, "\t\treturn TC_ACT_SHOT;\n"]
    template.write_text("".join(lines))
    build = src / "build"
    configure = [
        "cmake",
        "-S",
        str(src),
        "-B",
        str(build),
        f"-DPython3_EXECUTABLE={sys.executable}",
    ]
    for cmd in (configure, ["cmake", "--build", str(build), "--target", "bpf"]):
        subprocess.run(cmd, check=True, capture_output=True)
    return build / "bpf" / "bpf_lxc.o", at + 1


def test_a_rejected_program_is_named_with_the_line_the_verifier_points_at(
    broken_lxc: tuple[Path, int],
) -> None:
    path, line = broken_lxc
    with BpfObject.open(path) as obj, pytest.raises(VerifierError) as caught:
        obj.load()
    err = caught.value
    assert err.program == "from_container"
    assert err.source_file is not None and err.source_file.endswith("bpf_lxc.c")
    assert err.source_line == line
    assert err.source_text is not None and "ctx->data == 0xff" in err.source_text
    message = str(err)
    assert "from_container" in message and f"bpf_lxc.c:{line}" in message
    assert "invalid access to packet" in err.log or "R" in err.log
