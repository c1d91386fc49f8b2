"""CNI test fixtures: the built shim, a fake agent on a UNIX socket, a
network namespace to point CNI_NETNS at, and a way to run the shim the way
a container runtime does (CNI_* variables, netconf on stdin)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ciliate.control.cni.defaults import DEFAULT_AGENT_SOCKET
from ciliate.datapath import objects

from .fakes import POD_IP, POD_MAC, ROUTER_IP, FakeAgent

SHIM_SOURCE = Path(__file__).resolve().parents[2] / "control" / "cni" / "shim" / "ciliate_cni.c"
# What CMake passes when it builds the shim (see CMakeLists.txt).
SHIM_DEFINES = [f'-DCILIATE_DEFAULT_AGENT_SOCKET="{DEFAULT_AGENT_SOCKET}"']
CONTAINER_ID = "3f6940ab5ab43bc522569d15b23f8c1bbde1d7678b080398506924fc01d72755"


@pytest.fixture(scope="session")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ciliate-cni`` as CMake builds it (``build/dev/cni``); compiled
    directly with the same flags only when the checkout's build fails for
    reasons of its own (another part of the tree being edited)."""
    if objects.source_root() is not None:
        try:
            objects.build()
        except objects.BuildError as exc:
            warnings.warn(f"build/dev failed, compiling the shim alone: {exc}", stacklevel=1)
        else:
            build = objects.dev_build_dir()
            assert build is not None
            built = build / "cni" / "ciliate-cni"
            assert built.is_file(), f"the CMake build did not produce {built}"
            return built
    out = tmp_path_factory.mktemp("shim") / "ciliate-cni"
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build ciliate-cni")
    flags = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", *SHIM_DEFINES]
    subprocess.run(
        [cc, *flags, "-o", str(out), str(SHIM_SOURCE)],
        check=True,
    )
    return out


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for sockets (sun_path holds 107 bytes; pytest's
    tmp_path with a long test name does not fit)."""
    path = Path(tempfile.mkdtemp(prefix="cni", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def agent(sock_dir: Path) -> Iterator[FakeAgent]:
    with FakeAgent(sock_dir / "agent.sock") as fake:
        yield fake


@pytest.fixture(scope="session")
def pod_netns() -> Iterator[str]:
    """The network namespace of a sleeping process: a real netns path that
    is not the test's own, with nothing mounted or created on the host."""
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) for a network namespace")
    proc = subprocess.Popen([unshare, "--net", "sleep", "3600"])
    path = f"/proc/{proc.pid}/ns/net"
    own = os.stat("/proc/self/ns/net").st_ino
    deadline = time.monotonic() + 5
    while os.stat(path).st_ino == own:  # until unshare has switched
        assert time.monotonic() < deadline, "unshare --net did not create a netns"
        time.sleep(0.005)
    yield path
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(5)


@dataclass(frozen=True)
class ConfiguredPod:
    """A pod namespace holding what ciliate's ADD leaves in one (fakes.add_result):
    ``eth0`` with its MAC, address and routes (the veth's peer stays inside too)."""

    netns: str

    def ip(self, *args: str) -> None:
        subprocess.run(["nsenter", f"--net={self.netns}", "ip", *args], check=True)


@pytest.fixture
def configured_pod() -> Iterator[ConfiguredPod]:
    """A fresh namespace (of a sleeping process) set up as ADD would set it up."""
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) for a network namespace")
    proc = subprocess.Popen([unshare, "--net", "sleep", "3600"])
    try:
        path = f"/proc/{proc.pid}/ns/net"
        own = os.stat("/proc/self/ns/net").st_ino
        deadline = time.monotonic() + 5
        while os.stat(path).st_ino == own:
            assert time.monotonic() < deadline, "unshare --net did not create a netns"
            time.sleep(0.005)
        pod = ConfiguredPod(path)
        pod.ip("link", "add", "eth0", "address", POD_MAC, "type", "veth", "peer", "name", "peer0")
        pod.ip("link", "set", "peer0", "up")
        pod.ip("link", "set", "eth0", "up")
        pod.ip("address", "add", POD_IP, "dev", "eth0")
        pod.ip("route", "add", f"{ROUTER_IP}/32", "dev", "eth0", "scope", "link")
        pod.ip("route", "add", "default", "via", ROUTER_IP, "dev", "eth0")
        yield pod
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(5)


def netconf(version: str = "1.0.0", **fields: Any) -> dict[str, Any]:
    return {"cniVersion": version, "name": "ciliate", "type": "ciliate-cni", **fields}


def cni_env(command: str, **extra: str) -> dict[str, str]:
    """The variables a runtime sets for ``command`` (podman/containerd style)."""
    env = {"CNI_COMMAND": command, "CNI_PATH": "/opt/cni/bin"}
    if command in ("ADD", "DEL", "CHECK"):
        env.update(
            CNI_CONTAINERID=CONTAINER_ID,
            CNI_NETNS="/run/netns/pod",
            CNI_IFNAME="eth0",
            CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0",
        )
    env.update(extra)
    return env


def run_shim(
    shim: Path,
    env: Mapping[str, str],
    stdin: bytes | str | Mapping[str, Any],
    *,
    timeout: float = 20,
    wrapper: list[str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run the shim as a runtime does, with nothing else in its environment."""
    if isinstance(stdin, Mapping):
        stdin = json.dumps(stdin)
    if isinstance(stdin, str):
        stdin = stdin.encode()
    return subprocess.run(
        [*(wrapper or []), str(shim)],
        input=stdin,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **env},
        capture_output=True,
        timeout=timeout,
        check=False,
    )
