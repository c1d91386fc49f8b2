"""podman 4.3 (Debian) with its CNI backend, inside a lab node's network namespace.

``PodmanLab`` gives podman private everything: ``containers.conf`` and
``storage.conf`` (via ``CONTAINERS_CONF`` / ``CONTAINERS_STORAGE_CONF``), a
graph root, run root, tmp dir, file locks, events log and image-copy dir
under one tmp dir, a private ``registries.conf`` and ``XDG_RUNTIME_DIR``.
Every podman command runs under ``nsenter --net=<node netns>``, so the
host-side veths the CNI plugin creates, and the plugin's own traffic, stay in
the lab. Containers get a private cgroup parent, removed on ``close()``.

What podman 4.3 cannot make private, and how it is cleaned instead:
``/var/lib/cni/results`` (libcni's cache; entries go on DEL, empty dirs the
lab caused are removed), ``/run/netns/netns-<uuid>`` (removed by podman on
``rm``), ``/run/runc/<id>`` (runc state, removed on ``rm``) and
``/var/lib/containers/cache`` (the blob-info cache ``podman import`` writes,
removed if the lab created it).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from ciliate.control.lab.runtime.common import (
    REFERENCE_PLUGIN_DIR,
    RuntimeUnavailable,
    busybox_rootfs,
    cni_cache_entries,
    ensure_packages,
    in_netns,
    kill_cgroup,
    network_name,
    remove_cgroup,
    remove_if_created,
    remove_tree,
    rootfs_tarball,
    run,
)

PACKAGES = {
    "/usr/bin/podman": "podman",
    "/usr/sbin/runc": "runc",
    "/usr/bin/conmon": "conmon",
    "/usr/lib/cni/bridge": "containernetworking-plugins",
    "/bin/busybox": "busybox-static",
}
IMAGE = "localhost/crt-busybox:latest"
_HOST_CACHE = Path("/var/lib/containers")
_HOST_CNI = Path("/var/lib/cni")
_HOST_RUNC = Path("/run/runc")


def _toml_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


class PodmanLab:
    """Private podman in a node netns. Use as a context manager or call ``close()``.

    ``cni_conf_dir`` holds the network's conflist (podman's
    ``network_config_dir``; podman also keeps its ``cni.lock`` there),
    ``cni_plugin_dirs`` the plugin binaries, searched in order. ``network``
    is the network's name; by default the one libcni would pick from
    ``cni_conf_dir``.
    """

    def __init__(
        self,
        *,
        node_netns: str | os.PathLike[str],
        cni_conf_dir: str | os.PathLike[str],
        cni_plugin_dirs: Sequence[str | os.PathLike[str]] = (REFERENCE_PLUGIN_DIR,),
        network: str | None = None,
        storage_driver: str = "vfs",
        workdir: str | os.PathLike[str] | None = None,
        install: bool = True,
    ) -> None:
        self.node_netns = os.fspath(node_netns)
        self.cni_conf_dir = Path(cni_conf_dir)
        self.cni_plugin_dirs = [Path(d) for d in cni_plugin_dirs]
        self.network = network or network_name(self.cni_conf_dir)
        self.tag = "crt-" + secrets.token_hex(4)
        self.cgroup_parent = f"/{self.tag}"
        self.image = IMAGE
        self.storage_driver = storage_driver
        self._ids: dict[str, str] = {}  # running: name -> id
        self.history: list[str] = []  # every container id the lab started
        self._closed = False
        self._host_cache_existed = _HOST_CACHE.exists()
        self._host_cni_existed = _HOST_CNI.exists()
        self._host_runc_existed = _HOST_RUNC.exists()
        if not Path(self.node_netns).exists():
            raise FileNotFoundError(f"node netns {self.node_netns} does not exist")
        if install:
            ensure_packages(PACKAGES)
        self.root = Path(tempfile.mkdtemp(prefix=f"{self.tag}-podman-", dir=workdir))
        try:
            self._write_config()
            self._check_works()
            self._import_image()
        except BaseException:
            with contextlib.suppress(Exception):
                self.close()
            raise

    # -- set-up -------------------------------------------------------------------------

    def _write_config(self) -> None:
        r = self.root
        for sub in ("conf", "graph", "run", "tmp", "xdg", "imgtmp", "volumes"):
            (r / sub).mkdir(mode=0o700)
        (r / "conf" / "containers.conf").write_text(
            f"""\
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
log_driver = "k8s-file"

[network]
network_backend = "cni"
cni_plugin_dirs = {_toml_list([os.fspath(d) for d in self.cni_plugin_dirs])}
network_config_dir = {json.dumps(os.fspath(self.cni_conf_dir))}
default_network = {json.dumps(self.network)}

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = {json.dumps(os.fspath(r / "tmp" / "events.log"))}
runtime = "runc"
tmp_dir = {json.dumps(os.fspath(r / "tmp"))}
static_dir = {json.dumps(os.fspath(r / "graph" / "libpod"))}
volume_path = {json.dumps(os.fspath(r / "volumes"))}
image_copy_tmp_dir = {json.dumps(os.fspath(r / "imgtmp"))}
lock_type = "file"
"""
        )
        (r / "conf" / "storage.conf").write_text(
            f"""\
[storage]
driver = {json.dumps(self.storage_driver)}
graphroot = {json.dumps(os.fspath(r / "graph"))}
runroot = {json.dumps(os.fspath(r / "run"))}
"""
        )
        (r / "conf" / "registries.conf").write_text("unqualified-search-registries = []\n")
        self.env = {
            **os.environ,
            "CONTAINERS_CONF": os.fspath(r / "conf" / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": os.fspath(r / "conf" / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": os.fspath(r / "conf" / "registries.conf"),
            "XDG_RUNTIME_DIR": os.fspath(r / "xdg"),
            "TMPDIR": os.fspath(r / "imgtmp"),
        }

    def _check_works(self) -> None:
        proc = self.podman("info", "--format", "{{.Host.NetworkBackend}}", check=False)
        if proc.returncode != 0:
            raise RuntimeUnavailable(f"podman info failed: {proc.stderr.strip()[-500:]}")
        if proc.stdout.strip() != "cni":
            raise RuntimeUnavailable(f"podman uses {proc.stdout.strip()!r}, not the CNI backend")

    def _import_image(self) -> None:
        rootfs = busybox_rootfs(self.root / "rootfs")
        tarball = rootfs_tarball(rootfs, self.root / "rootfs.tar")
        self.podman("import", "--change", 'CMD ["/bin/sh"]', os.fspath(tarball), self.image)
        tarball.unlink()
        remove_tree(rootfs)

    # -- commands -----------------------------------------------------------------------

    def podman(
        self, *args: str, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """``podman args…`` with the lab's config, inside the node netns."""
        return run(
            in_netns(self.node_netns, ["podman", *args]), env=self.env, check=check, timeout=timeout
        )

    def run(self, name: str, cmd: Sequence[str] = ("sleep", "3600"), *extra: str) -> str:
        """Start a detached container on the lab's network; returns its id.

        ``extra`` are more ``podman run`` options (before the image)."""
        proc = self.podman(
            "run",
            "--detach",
            "--pull=never",
            "--name",
            name,
            "--network",
            self.network,
            "--cgroup-parent",
            self.cgroup_parent,
            "--label",
            f"ciliate.lab={self.tag}",
            *extra,
            self.image,
            *cmd,
        )
        cid = proc.stdout.strip().splitlines()[-1]
        self._ids[name] = cid
        self.history.append(cid)
        return cid

    def exec(
        self, name: str, cmd: Sequence[str], *, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` in a running container; never raises on a non-zero exit."""
        return self.podman("exec", name, *cmd, check=False, timeout=timeout)

    def rm(self, name: str, force: bool = True) -> None:
        """Remove a container (``rm -f -t 0``: no 10 s grace for a PID 1 that ignores TERM)."""
        args = ["rm", "--time", "0"]
        if force:
            args.append("--force")
        self.podman(*args, name)
        self._ids.pop(name, None)

    def inspect(self, name: str) -> dict[str, object]:
        out = json.loads(self.podman("inspect", "--type", "container", name).stdout)
        if not isinstance(out, list) or not out or not isinstance(out[0], dict):
            raise ValueError(f"podman inspect {name}: unexpected output")
        return out[0]

    def ip_of(self, name: str) -> str:
        """The container's IPv4 address on the lab's network."""
        proc = self.podman(
            "inspect",
            "--type",
            "container",
            "--format",
            f"{{{{(index .NetworkSettings.Networks {json.dumps(self.network)}).IPAddress}}}}",
            name,
        )
        ip = proc.stdout.strip()
        if not ip:
            raise LookupError(f"container {name} has no address on {self.network}")
        return ip

    def netns_of(self, name: str) -> str:
        """The path of the container's network namespace (``/run/netns/netns-…``)."""
        return self.podman(
            "inspect", "--type", "container", "--format", "{{.NetworkSettings.SandboxKey}}", name
        ).stdout.strip()

    def container_ids(self) -> list[str]:
        out = self.podman("ps", "--all", "--no-trunc", "--format", "{{.ID}}").stdout
        return out.split()

    def cycle(self, name: str, cmd: Sequence[str] = ("sleep", "3600")) -> float:
        """One ``run`` + ``rm -f``; returns the seconds it took."""
        start = time.perf_counter()
        self.run(name, cmd)
        self.rm(name)
        return time.perf_counter() - start

    # -- teardown -----------------------------------------------------------------------

    def leftovers(self) -> list[str]:
        """What the lab's containers left on the host (empty after a clean ``rm``)."""
        left = [f"cni cache {p}" for p in cni_cache_entries(self.history)]
        left += [f"runc state {_HOST_RUNC / c}" for c in self.history if (_HOST_RUNC / c).exists()]
        return left

    def close(self) -> None:
        """Remove every container and image, the storage and config, the cgroup parent."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        if (self.root / "conf" / "containers.conf").exists():
            for args in (("rm", "--all", "--force", "--time", "0"), ("rmi", "--all", "--force")):
                proc = self.podman(*args, check=False)
                if proc.returncode != 0:
                    errors.append(f"podman {' '.join(args)}: {proc.stderr.strip()}")
        killed = kill_cgroup(self.cgroup_parent)
        if killed:
            errors.append(f"killed processes left in {self.cgroup_parent}: {killed}")
        left = remove_cgroup(self.cgroup_parent)
        if left:
            errors.append(f"cgroups still busy: {left}")
        remove_tree(self.root)
        remove_if_created(_HOST_CACHE, self._host_cache_existed, {"blob-info-cache-v1.boltdb"})
        remove_if_created(_HOST_CNI, self._host_cni_existed)
        remove_if_created(_HOST_RUNC, self._host_runc_existed)
        if errors:
            raise RuntimeError("PodmanLab.close: " + "; ".join(errors))

    def __enter__(self) -> PodmanLab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
