"""containerd 1.6 (Debian) with its CRI plugin, inside a lab node's network namespace.

``ContainerdLab`` starts a private containerd (root, state, sockets, opt dir,
runc root, CNI netns mounts, all under one tmp dir) under ``nsenter
--net=<node netns>``, imports a sandbox image (a busybox-static OCI archive
whose entrypoint is ``sleep``) with ``ctr -n k8s.io images import``, and
talks CRI v1 to it through ``CriClient``: a small gRPC client over stubs
generated at run time (grpcio-tools) from ``cri_v1.proto``, a trimmed copy of
the real API with its field numbers.

The CRI plugin runs the ``loopback`` plugin itself and then the network in
``conf_dir``; it takes one bin dir, so the lab builds a private one of
symlinks to the plugins of ``cni_plugin_dirs`` (earlier dirs win).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import platform
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

from ciliate.control.lab.runtime.common import (
    REFERENCE_PLUGIN_DIR,
    RuntimeUnavailable,
    busybox_rootfs,
    cni_cache_entries,
    ensure_packages,
    in_netns,
    kill_cgroup,
    merged_plugin_dir,
    oci_archive,
    remove_cgroup,
    remove_if_created,
    remove_tree,
    run,
)
from ciliate.control.process import stop_child

PACKAGES = {
    "/usr/bin/containerd": "containerd",
    "/usr/bin/ctr": "containerd",
    "/usr/sbin/runc": "runc",
    "/usr/lib/cni/bridge": "containernetworking-plugins",
    "/bin/busybox": "busybox-static",
}
SANDBOX_IMAGE = "localhost/crt-pause:latest"
PROTO = Path(__file__).with_name("cri_v1.proto")
SERVICE = "/runtime.v1.RuntimeService/"
_HOST_CNI = Path("/var/lib/cni")
_HOST_CONTAINERD_STATE = Path("/run/containerd")

_pb2: ModuleType | None = None


def _import(name: str) -> Any:
    """Import an optional module (grpc, grpc_tools) without static typing."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise RuntimeUnavailable(
            f"python module {name} is missing (pip install grpcio grpcio-tools)"
        ) from exc


def cri_messages() -> ModuleType:
    """The CRI v1 messages, compiled from ``cri_v1.proto`` with grpcio-tools (once per
    process, into a private tmp dir)."""
    global _pb2
    if _pb2 is not None:
        return _pb2
    protoc = _import("grpc_tools.protoc")
    out = Path(tempfile.mkdtemp(prefix="crt-cri-proto-"))
    try:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO.parent}",
            f"--python_out={out}",
            PROTO.name,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO}")
        spec = importlib.util.spec_from_file_location("cri_v1_pb2", out / "cri_v1_pb2.py")
        if spec is None or spec.loader is None:
            raise RuntimeError("cannot load the generated cri_v1_pb2")
        module = importlib.util.module_from_spec(spec)
        sys.modules["cri_v1_pb2"] = module
        spec.loader.exec_module(module)
    finally:
        remove_tree(out)
    _pb2 = module
    return module


@dataclass(frozen=True)
class Sandbox:
    id: str
    name: str
    namespace: str
    uid: str


class CriClient:
    """CRI v1 RuntimeService over a UNIX socket: just the pod sandbox calls."""

    def __init__(self, socket: str | os.PathLike[str], *, timeout: float = 60.0) -> None:
        grpc = _import("grpc")
        self.pb = cri_messages()
        self.timeout = timeout
        self.channel = grpc.insecure_channel(f"unix://{os.fspath(socket)}")
        self._calls: dict[str, Any] = {}

    def _call(self, method: str, request: Any, response: str, timeout: float | None = None) -> Any:
        stub = self._calls.get(method)
        if stub is None:
            stub = self.channel.unary_unary(
                SERVICE + method,
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=getattr(self.pb, response).FromString,
            )
            self._calls[method] = stub
        return stub(request, timeout=timeout or self.timeout)

    def version(self, timeout: float | None = None) -> dict[str, str]:
        r = self._call("Version", self.pb.VersionRequest(version="v1"), "VersionResponse", timeout)
        return {
            "version": r.version,
            "runtime_name": r.runtime_name,
            "runtime_version": r.runtime_version,
            "runtime_api_version": r.runtime_api_version,
        }

    def run_pod_sandbox(
        self,
        name: str,
        *,
        namespace: str = "default",
        uid: str | None = None,
        cgroup_parent: str = "",
        labels: Mapping[str, str] | None = None,
        runtime_handler: str = "",
    ) -> Sandbox:
        pb = self.pb
        uid = uid or str(uuid.uuid4())
        config = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, uid=uid, namespace=namespace, attempt=0),
            hostname=name,
            labels=dict(labels or {}),
            linux=pb.LinuxPodSandboxConfig(
                cgroup_parent=cgroup_parent,
                security_context=pb.LinuxSandboxSecurityContext(
                    namespace_options=pb.NamespaceOption(
                        network=pb.POD, pid=pb.CONTAINER, ipc=pb.POD
                    )
                ),
            ),
        )
        request = pb.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler)
        r = self._call("RunPodSandbox", request, "RunPodSandboxResponse")
        return Sandbox(id=r.pod_sandbox_id, name=name, namespace=namespace, uid=uid)

    def stop_pod_sandbox(self, sandbox_id: str) -> None:
        request = self.pb.StopPodSandboxRequest(pod_sandbox_id=sandbox_id)
        self._call("StopPodSandbox", request, "StopPodSandboxResponse")

    def remove_pod_sandbox(self, sandbox_id: str) -> None:
        request = self.pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id)
        self._call("RemovePodSandbox", request, "RemovePodSandboxResponse")

    def pod_sandbox_status(self, sandbox_id: str, *, verbose: bool = False) -> Any:
        """The ``PodSandboxStatusResponse`` (``.status``, and ``.info`` when verbose)."""
        request = self.pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=verbose)
        return self._call("PodSandboxStatus", request, "PodSandboxStatusResponse")

    def list_pod_sandbox(self) -> list[str]:
        r = self._call("ListPodSandbox", self.pb.ListPodSandboxRequest(), "ListPodSandboxResponse")
        return [item.id for item in r.items]

    def sandbox_ip(self, sandbox_id: str) -> str:
        return str(self.pod_sandbox_status(sandbox_id).status.network.ip)

    def sandbox_info(self, sandbox_id: str) -> dict[str, Any]:
        """containerd's verbose ``info`` JSON (pid, runtimeSpec, cniResult, …)."""
        info = self.pod_sandbox_status(sandbox_id, verbose=True).info
        parsed: dict[str, Any] = json.loads(info["info"]) if "info" in info else {}
        return parsed

    def sandbox_netns(self, sandbox_id: str) -> str:
        """The path of the sandbox's network namespace."""
        spec = self.sandbox_info(sandbox_id).get("runtimeSpec", {})
        for ns in spec.get("linux", {}).get("namespaces", []):
            if ns.get("type") == "network" and ns.get("path"):
                return str(ns["path"])
        raise LookupError(f"sandbox {sandbox_id} has no network namespace path")

    def close(self) -> None:
        self.channel.close()


def _arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


class ContainerdLab:
    """Private containerd + CRI in a node netns. Use as a context manager or ``close()``.

    ``cni_conf_dir`` is the CRI plugin's ``conf_dir`` (it loads the first
    network there, ``max_conf_num = 1``), ``cni_plugin_dirs`` the plugin
    directories (merged into one private ``bin_dir``; ``loopback`` must be in
    one of them, the reference dir has it).
    """

    def __init__(
        self,
        *,
        node_netns: str | os.PathLike[str],
        cni_conf_dir: str | os.PathLike[str],
        cni_plugin_dirs: Sequence[str | os.PathLike[str]] = (REFERENCE_PLUGIN_DIR,),
        snapshotter: str = "native",
        workdir: str | os.PathLike[str] | None = None,
        install: bool = True,
        start_timeout: float = 30.0,
    ) -> None:
        self.node_netns = os.fspath(node_netns)
        self.cni_conf_dir = Path(cni_conf_dir)
        self.cni_plugin_dirs = [Path(d) for d in cni_plugin_dirs]
        self.snapshotter = snapshotter
        self.tag = "crt-" + secrets.token_hex(4)
        self.cgroup_parent = f"/{self.tag}"
        self.image = SANDBOX_IMAGE
        self.sandboxes: dict[str, Sandbox] = {}  # running or stopped, not removed
        self.history: list[str] = []  # every sandbox id the lab started
        self.proc: subprocess.Popen[bytes] | None = None
        self.cri: CriClient | None = None
        self._closed = False
        self._host_cni_existed = _HOST_CNI.exists()
        self._host_state_existed = _HOST_CONTAINERD_STATE.exists()
        if not Path(self.node_netns).exists():
            raise FileNotFoundError(f"node netns {self.node_netns} does not exist")
        if install:
            ensure_packages(PACKAGES)
        _import("grpc")
        self.root = Path(tempfile.mkdtemp(prefix=f"{self.tag}-containerd-", dir=workdir))
        self.socket = self.root / "containerd.sock"
        try:
            self._write_config()
            self._start(start_timeout)
            self._import_image()
        except BaseException:
            with contextlib.suppress(Exception):
                self.close()
            raise

    # -- set-up -------------------------------------------------------------------------

    def _write_config(self) -> None:
        r = self.root
        for sub in ("root", "state", "opt", "runc", "certs.d", "log"):
            (r / sub).mkdir(mode=0o700)
        self.bin_dir = merged_plugin_dir(r / "cni-bin", self.cni_plugin_dirs)
        if not (self.bin_dir / "loopback").exists():
            raise RuntimeUnavailable(f"no loopback plugin in {self.cni_plugin_dirs}")
        cri = '[plugins."io.containerd.grpc.v1.cri"'
        q = json.dumps
        self.config = r / "config.toml"
        self.config.write_text(
            f"""\
version = 2
root = {q(os.fspath(r / "root"))}
state = {q(os.fspath(r / "state"))}
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = {q(os.fspath(self.socket))}

[ttrpc]
  address = {q(os.fspath(r / "containerd.sock.ttrpc"))}

[metrics]
  address = ""

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = {q(os.fspath(r / "opt"))}
  [plugins."io.containerd.runtime.v1.linux"]
    runtime_root = {q(os.fspath(r / "runc-v1"))}
  {cri}]
    sandbox_image = {q(self.image)}
    restrict_oom_score_adj = true
    netns_mounts_under_state_dir = true
    disable_apparmor = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    {cri}.cni]
      bin_dir = {q(os.fspath(self.bin_dir))}
      conf_dir = {q(os.fspath(self.cni_conf_dir))}
      max_conf_num = 1
    {cri}.containerd]
      snapshotter = {q(self.snapshotter)}
      default_runtime_name = "runc"
      {cri}.containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        {cri}.containerd.runtimes.runc.options]
          SystemdCgroup = false
          Root = {q(os.fspath(r / "runc"))}
    {cri}.registry]
      config_path = {q(os.fspath(r / "certs.d"))}
"""
        )

    def _start(self, timeout: float) -> None:
        self.log = self.root / "log" / "containerd.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                in_netns(self.node_netns, ["containerd", "--config", os.fspath(self.config)]),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None:
                raise RuntimeUnavailable(f"containerd exited {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeUnavailable(f"containerd did not listen in {timeout}s: {self.tail()}")
            time.sleep(0.05)
        self.cri = CriClient(self.socket)
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                self.cri.version(timeout=2.0)
                return
            except Exception as exc:  # grpc.RpcError while the CRI plugin starts
                last = exc
                time.sleep(0.1)
        raise RuntimeUnavailable(f"CRI did not answer Version: {last}; {self.tail()}")

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ctr --address <lab socket> -n k8s.io args…``."""
        cmd = ["ctr", "--address", os.fspath(self.socket), "--namespace", "k8s.io", *args]
        return run(in_netns(self.node_netns, cmd), check=check)

    def _import_image(self) -> None:
        rootfs = busybox_rootfs(self.root / "rootfs")
        archive = oci_archive(
            rootfs,
            self.root / "pause.tar",
            name=self.image,
            entrypoint=["/bin/sleep", "2147483647"],
            arch=_arch(),
        )
        self.ctr("images", "import", "--snapshotter", self.snapshotter, os.fspath(archive))
        names = self.ctr("images", "list", "--quiet").stdout.split()
        if self.image not in names:
            raise RuntimeError(f"{self.image} not among imported images {names}")
        archive.unlink()
        remove_tree(rootfs)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- pod sandboxes --------------------------------------------------------------------

    def _client(self) -> CriClient:
        if self.cri is None:
            raise RuntimeError("containerd is not running")
        return self.cri

    def run_sandbox(self, name: str, *, namespace: str = "default") -> Sandbox:
        """RunPodSandbox (the CNI ADD happens in there); returns the sandbox."""
        sandbox = self._client().run_pod_sandbox(
            name,
            namespace=namespace,
            cgroup_parent=self.cgroup_parent,
            labels={"ciliate.lab": self.tag},
        )
        self.sandboxes[sandbox.id] = sandbox
        self.history.append(sandbox.id)
        return sandbox

    def ip_of(self, sandbox: Sandbox | str) -> str:
        return self._client().sandbox_ip(sandbox if isinstance(sandbox, str) else sandbox.id)

    def netns_of(self, sandbox: Sandbox | str) -> str:
        return self._client().sandbox_netns(sandbox if isinstance(sandbox, str) else sandbox.id)

    def exec_in_netns(
        self, sandbox: Sandbox | str, cmd: Sequence[str], *, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a host command inside the sandbox's network namespace (never raises)."""
        return run(in_netns(self.netns_of(sandbox), cmd), check=False, timeout=timeout)

    def stop(self, sandbox: Sandbox | str) -> None:
        self._client().stop_pod_sandbox(sandbox if isinstance(sandbox, str) else sandbox.id)

    def remove(self, sandbox: Sandbox | str) -> None:
        """StopPodSandbox then RemovePodSandbox (each sends a CNI DEL)."""
        sid = sandbox if isinstance(sandbox, str) else sandbox.id
        client = self._client()
        client.stop_pod_sandbox(sid)
        client.remove_pod_sandbox(sid)
        self.sandboxes.pop(sid, None)

    def cycle(self, name: str) -> float:
        """One RunPodSandbox + Stop + Remove; returns the seconds it took."""
        start = time.perf_counter()
        self.remove(self.run_sandbox(name))
        return time.perf_counter() - start

    # -- teardown -------------------------------------------------------------------------

    def shim_pids(self) -> list[int]:
        """containerd-shim processes started for this lab's containerd (by its socket)."""
        needle = os.fspath(self.socket).encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"containerd-shim" in cmdline and needle in cmdline:
                pids.append(int(entry.name))
        return pids

    def leftovers(self) -> list[str]:
        """What the lab's sandboxes left on the host (empty after clean removals)."""
        left = [f"cni cache {p}" for p in cni_cache_entries(self.history)]
        netns_dir = self.root / "state" / "io.containerd.grpc.v1.cri" / "netns"
        if netns_dir.is_dir():
            left += [f"netns {p}" for p in sorted(netns_dir.iterdir())]
        left += [f"shim pid {pid}" for pid in self.shim_pids()]
        return left

    def close(self) -> None:
        """Remove every sandbox, stop containerd and its shims, remove everything."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        if self.cri is not None and self.proc is not None and self.proc.poll() is None:
            try:
                ids = set(self.cri.list_pod_sandbox()) | set(self.sandboxes)
            except Exception as exc:
                errors.append(f"ListPodSandbox: {exc}")
                ids = set(self.sandboxes)
            for sid in ids:
                try:
                    self.remove(sid)
                except Exception as exc:
                    errors.append(f"remove sandbox {sid}: {exc}")
        if self.cri is not None:
            self.cri.close()
        if self.proc is not None:
            stop_child(self.proc, timeout=15, name="containerd")
        for pid in self.shim_pids():  # only shims of this lab's socket
            errors.append(f"killed leftover shim {pid}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed = kill_cgroup(self.cgroup_parent)
        if killed:
            errors.append(f"killed processes left in {self.cgroup_parent}: {killed}")
        left = remove_cgroup(self.cgroup_parent)
        if left:
            errors.append(f"cgroups still busy: {left}")
        remove_tree(self.root)
        remove_if_created(_HOST_CNI, self._host_cni_existed)
        remove_if_created(_HOST_CONTAINERD_STATE, self._host_state_existed)
        if errors:
            raise RuntimeError("ContainerdLab.close: " + "; ".join(errors))

    def __enter__(self) -> ContainerdLab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
