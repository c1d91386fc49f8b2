"""Fixtures for ciliate.loader tests: these run against the real kernel, as root.

Everything created on the machine (bpffs pins, network namespaces, veths) is named with a
per-run random prefix and removed in fixture teardown. Nothing touches the root namespace's
interfaces, routes or firewall.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PROGS = Path(__file__).parent / "progs"
BPFFS = Path("/sys/fs/bpf")
CLANG = shutil.which("clang-16") or shutil.which("clang")
BPFTOOL = shutil.which("bpftool")
IP = shutil.which("ip")


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "loader tests need root (BPF syscalls, netns)"
    if not Path("/sys/kernel/btf/vmlinux").exists():
        return "kernel without BTF (/sys/kernel/btf/vmlinux)"
    if CLANG is None or BPFTOOL is None:
        return "clang and bpftool are needed to build the test programs"
    return None


_REASON = _missing()
if _REASON is not None:
    pytest.skip(_REASON, allow_module_level=True)


def run(*cmd: str) -> str:
    """Run a command; raise with its stderr on failure."""
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


@pytest.fixture(scope="session")
def run_id() -> str:
    """Per-run random prefix for every name the tests create."""
    return "ldr" + secrets.token_hex(3)


@pytest.fixture(scope="session")
def bpf_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A build dir holding vmlinux.h (from the running kernel's BTF)."""
    build = tmp_path_factory.mktemp("bpf-build")
    assert BPFTOOL is not None
    header = run(BPFTOOL, "btf", "dump", "file", "/sys/kernel/btf/vmlinux", "format", "c")
    (build / "vmlinux.h").write_text(header)
    return build


def _compile(build: Path, name: str) -> Path:
    assert CLANG is not None
    out = build / f"{name}.o"
    src = PROGS / f"{name}.bpf.c"
    run(CLANG, "-O2", "-g", "-target", "bpf", f"-I{build}", "-c", str(src), "-o", str(out))
    return out


@pytest.fixture(scope="session")
def test_obj_path(bpf_build: Path) -> Path:
    return _compile(bpf_build, "loader_test")


@pytest.fixture(scope="session")
def broken_obj_path(bpf_build: Path) -> Path:
    return _compile(bpf_build, "broken")


@pytest.fixture(scope="session", autouse=True)
def bpffs_mounted() -> None:
    if not os.path.ismount(BPFFS):
        run("mount", "-t", "bpf", "bpf", str(BPFFS))


@pytest.fixture
def pin_dir(run_id: str, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh directory in bpffs, removed (with anything left in it) afterwards."""
    path = BPFFS / f"{run_id}-{secrets.token_hex(2)}"
    path.mkdir()
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


@pytest.fixture(scope="session", autouse=True)
def bpffs_left_clean(run_id: str) -> Iterator[None]:
    """At the end of the run, nothing named with our prefix may remain in bpffs."""
    yield
    leftovers = [p.name for p in BPFFS.iterdir() if p.name.startswith(run_id)]
    assert not leftovers, f"left in {BPFFS}: {leftovers}"


@dataclass(frozen=True)
class Netns:
    name: str
    path: str
    veth: str  # end the tests attach to
    peer: str  # its peer, in the same namespace

    def ip(self, *args: str) -> str:
        assert IP is not None
        return run(IP, "-n", self.name, *args)

    def tc(self, *args: str) -> str:
        tc = shutil.which("tc")
        assert tc is not None
        return run(tc, "-n", self.name, *args)


@pytest.fixture
def netns(run_id: str) -> Iterator[Netns]:
    """A fresh network namespace with an up veth pair inside it; deleted afterwards."""
    if IP is None:
        pytest.skip("iproute2 is needed for netns tests")
    suffix = secrets.token_hex(2)
    name = f"{run_id}-{suffix}"
    run(IP, "netns", "add", name)
    try:
        ns = Netns(name=name, path=f"/run/netns/{name}", veth=f"{run_id}a", peer=f"{run_id}b")
        ns.ip("link", "add", ns.veth, "type", "veth", "peer", "name", ns.peer)
        ns.ip("link", "set", ns.veth, "up")
        ns.ip("link", "set", ns.peer, "up")
        yield ns
    finally:
        run(IP, "netns", "del", name)
    assert not os.path.exists(f"/run/netns/{name}")


@pytest.fixture
def open_fds() -> Callable[[], set[str]]:
    """A function listing this process's open file descriptors."""

    def listing() -> set[str]:
        return set(os.listdir("/proc/self/fd"))

    return listing
