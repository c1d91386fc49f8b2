"""Where the compiled BPF objects are, and the incremental build behind them.

Three places, first match wins:

1. ``$CILIATE_BPF_DIR``, for a developer pointing at any build;
2. in a source checkout, ``build/dev/bpf``: the incremental CMake build that
   ``ciliate bpf build`` (and the test suite, at its start) keeps current;
3. the objects installed with the package (compiled when it was built).
"""

from __future__ import annotations

import importlib.resources
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

OBJECTS = {
    "lxc": "bpf_lxc.o",
    "host": "bpf_host.o",
    "uplink": "bpf_uplink.o",
    "sock": "bpf_sock.o",
    "sock_lb": "bpf_sock_lb.o",
    "empty": "bench_empty.o",
}
# The order a datapath loads its objects in: the first creates the maps.
LOAD_ORDER = ("lxc", "host", "uplink", "sock", "sock_lb")


class BuildError(RuntimeError):
    """The BPF build failed; the message carries the compiler's output."""


def source_root() -> Path | None:
    """The checkout this package runs from (editable install), if any."""
    root = Path(__file__).resolve().parent.parent
    if (root / "CMakeLists.txt").is_file() and (root / "bpf" / "src").is_dir():
        return root
    return None


def dev_build_dir() -> Path | None:
    root = source_root()
    return None if root is None else root / "build" / "dev"


def object_dir() -> Path:
    env = os.environ.get("CILIATE_BPF_DIR")
    if env:
        return Path(env)
    build = dev_build_dir()
    if build is not None and (build / "bpf" / OBJECTS["lxc"]).is_file():
        return build / "bpf"
    return Path(str(importlib.resources.files("ciliate.datapath") / "bpf"))


def object_path(kind: str) -> Path:
    path = object_dir() / OBJECTS[kind]
    if not path.is_file():
        raise FileNotFoundError(
            f"BPF object {path} is missing: run `ciliate bpf build` in the checkout "
            "or reinstall the package"
        )
    return path


@dataclass(frozen=True)
class BuildResult:
    rebuilt: list[str]
    seconds: float
    output: str


def build(*, verbose: bool = False) -> BuildResult:
    """Configure (once) and build ``build/dev`` incrementally."""
    build_dir = dev_build_dir()
    root = source_root()
    if build_dir is None or root is None:
        raise BuildError("not running from a source checkout: nothing to build")
    cmake = shutil.which("cmake")
    if cmake is None:
        raise BuildError("cmake not found: install it (apt-get install cmake)")
    started = time.monotonic()
    before = _mtimes(build_dir / "bpf")
    output = []
    if not (build_dir / "CMakeCache.txt").is_file():
        output.append(
            _run(
                [
                    cmake,
                    "-S",
                    str(root),
                    "-B",
                    str(build_dir),
                    f"-DPython3_EXECUTABLE={sys.executable}",
                ]
            )
        )
    output.append(_run([cmake, "--build", str(build_dir), "--parallel", str(os.cpu_count() or 2)]))
    after = _mtimes(build_dir / "bpf")
    rebuilt = sorted(name for name, mtime in after.items() if before.get(name) != mtime)
    text = "".join(output)
    if verbose:
        print(text, end="")
    return BuildResult(rebuilt=rebuilt, seconds=time.monotonic() - started, output=text)


def _mtimes(directory: Path) -> dict[str, int]:
    if not directory.is_dir():
        return {}
    return {p.name: p.stat().st_mtime_ns for p in directory.glob("*.o")}


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")
    return proc.stdout
