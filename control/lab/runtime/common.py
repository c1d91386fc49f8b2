"""What the real-runtime labs share: packages, commands in a node netns, a
busybox image, the reference CNI network, and cleanup helpers.

Everything here runs as root and stays inside the lab: commands go through
``nsenter --net=<node netns>`` (same mount namespace, so the runtime's
``/run/netns`` bind mounts stay visible), images are named ``localhost/…``
and are never pulled, and every directory lives under a private tmp dir.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

REFERENCE_PLUGIN_DIR = Path("/usr/lib/cni")
BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "ping", "ip", "sleep", "cat", "ls", "hostname", "true", "nc", "wget")
CGROUP_ROOT = Path("/sys/fs/cgroup")


class RuntimeUnavailable(RuntimeError):
    """The runtime cannot run on this machine; the message says why (tests skip on it)."""


class CommandError(RuntimeError):
    """A lab command exited non-zero."""

    def __init__(self, cmd: Sequence[str], proc: subprocess.CompletedProcess[str]) -> None:
        super().__init__(
            f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}".rstrip()
        )
        self.cmd = list(cmd)
        self.proc = proc


def run(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    timeout: float = 120.0,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(cmd),
        env=dict(env) if env is not None else None,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        input=input,
    )
    if check and proc.returncode != 0:
        raise CommandError(cmd, proc)
    return proc


def in_netns(netns: str | os.PathLike[str], cmd: Sequence[str]) -> list[str]:
    """``cmd`` run inside a network namespace (a path), keeping the mount namespace."""
    return ["nsenter", f"--net={os.fspath(netns)}", "--", *cmd]


# -- packages ---------------------------------------------------------------------------


def ensure_packages(needed: Mapping[str, str], *, timeout: float = 900.0) -> None:
    """Install the Debian packages whose file is missing.

    ``needed`` maps a file that must exist (absolute path) to the package that
    ships it. Nothing is run when every file is there. Raises
    ``RuntimeUnavailable`` when something is missing and cannot be installed.
    """
    missing = sorted({pkg for path, pkg in needed.items() if not Path(path).exists()})
    if not missing:
        return
    if os.geteuid() != 0:
        raise RuntimeUnavailable(f"missing {', '.join(missing)} and not root to install them")
    if shutil.which("apt-get") is None:
        raise RuntimeUnavailable(f"missing {', '.join(missing)} and no apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [
        "apt-get",
        "-o",
        "DPkg::Lock::Timeout=300",
        "install",
        "-y",
        "-qq",
        "--no-install-recommends",
        *missing,
    ]
    proc = run(install, env=env, check=False, timeout=timeout)
    if proc.returncode != 0:
        run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "update", "-qq"], env=env, check=False)
        proc = run(install, env=env, check=False, timeout=timeout)
    still = sorted({pkg for path, pkg in needed.items() if not Path(path).exists()})
    if proc.returncode != 0 or still:
        raise RuntimeUnavailable(
            f"apt-get install {' '.join(missing)} failed ({proc.returncode}): "
            f"{(proc.stderr or proc.stdout).strip()[-500:]}"
        )


# -- images -----------------------------------------------------------------------------


def busybox_rootfs(root: Path, applets: Iterable[str] = APPLETS) -> Path:
    """A minimal rootfs: /bin/busybox (static) and symlinks for ``applets``."""
    if not BUSYBOX.exists():
        raise RuntimeUnavailable(f"{BUSYBOX} is missing (busybox-static)")
    bindir = root / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, bindir / "busybox")
    for applet in applets:
        link = bindir / applet
        if not link.exists():
            link.symlink_to("busybox")
    for sub in ("etc", "proc", "sys", "dev", "tmp", "run", "var"):
        (root / sub).mkdir(exist_ok=True)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    return root


def _tar_bytes(root: Path, *, compress: bool) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(root.rglob("*")):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(root)))
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if info.isreg():
                with path.open("rb") as fh:
                    tar.addfile(info, fh)
            else:
                tar.addfile(info)
    data = raw.getvalue()
    return gzip.compress(data, mtime=0) if compress else data


def rootfs_tarball(root: Path, out: Path) -> Path:
    """A plain tar of ``root`` (what ``podman import`` takes)."""
    out.write_bytes(_tar_bytes(root, compress=False))
    return out


def oci_archive(
    root: Path, out: Path, *, name: str, entrypoint: Sequence[str], arch: str = "amd64"
) -> Path:
    """An OCI image layout tarball of one layer (``ctr images import`` takes it).

    ``name`` goes into ``io.containerd.image.name``, so the image is stored
    under that exact reference.
    """
    layer_tar = _tar_bytes(root, compress=False)
    layer = gzip.compress(layer_tar, mtime=0)
    diff_id = "sha256:" + hashlib.sha256(layer_tar).hexdigest()
    config = json.dumps(
        {
            "architecture": arch,
            "os": "linux",
            "config": {"Entrypoint": list(entrypoint), "WorkingDir": "/", "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        },
        sort_keys=True,
    ).encode()

    def desc(media: str, blob: bytes) -> dict[str, object]:
        return {
            "mediaType": media,
            "digest": "sha256:" + hashlib.sha256(blob).hexdigest(),
            "size": len(blob),
        }

    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": desc("application/vnd.oci.image.config.v1+json", config),
            "layers": [desc("application/vnd.oci.image.layer.v1.tar+gzip", layer)],
        },
        sort_keys=True,
    ).encode()
    tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else "latest"
    mdesc = desc("application/vnd.oci.image.manifest.v1+json", manifest)
    mdesc["platform"] = {"architecture": arch, "os": "linux"}
    mdesc["annotations"] = {
        "io.containerd.image.name": name,
        "org.opencontainers.image.ref.name": tag,
    }
    index = json.dumps({"schemaVersion": 2, "manifests": [mdesc]}, sort_keys=True).encode()
    files: dict[str, bytes] = {
        "oci-layout": b'{"imageLayoutVersion":"1.0.0"}',
        "index.json": index,
    }
    for blob in (config, layer, manifest):
        files["blobs/sha256/" + hashlib.sha256(blob).hexdigest()] = blob
    with tarfile.open(out, mode="w") as tar:
        for dirname in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(dirname)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for arcname, blob in files.items():
            info = tarfile.TarInfo(arcname)
            info.size = len(blob)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(blob))
    return out


# -- CNI --------------------------------------------------------------------------------


def reference_conflist(
    *,
    name: str,
    subnet: str,
    bridge: str,
    data_dir: str | os.PathLike[str],
    cni_version: str = "0.4.0",
) -> dict[str, object]:
    """The reference network: ``bridge`` (gateway, no masquerade, hairpin) with
    ``host-local`` IPAM keeping its leases under ``data_dir`` (not /var/lib/cni)."""
    return {
        "cniVersion": cni_version,
        "name": name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": os.fspath(data_dir),
                    "ranges": [[{"subnet": subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            }
        ],
    }


def network_name(conf_dir: Path) -> str:
    """The name of the network libcni would pick in ``conf_dir`` (first file by name)."""
    for path in sorted(conf_dir.iterdir()):
        if path.suffix in (".conflist", ".conf", ".json"):
            name = json.loads(path.read_text()).get("name")
            if isinstance(name, str):
                return name
    raise FileNotFoundError(f"no CNI network config in {conf_dir}")


def merged_plugin_dir(target: Path, sources: Sequence[Path]) -> Path:
    """One directory of symlinks to the plugins of ``sources`` (earlier ones win),
    for runtimes that take a single CNI bin dir."""
    target.mkdir(parents=True, exist_ok=True)
    for src in sources:
        for plugin in sorted(src.iterdir()):
            link = target / plugin.name
            if not link.exists() and not link.is_symlink() and plugin.is_file():
                link.symlink_to(plugin.resolve())
    return target


CNI_RESULTS = Path("/var/lib/cni/results")


def cni_cache_entries(container_ids: Iterable[str]) -> list[Path]:
    """libcni's cached results (``/var/lib/cni/results``) that belong to these ids."""
    ids = [cid for cid in container_ids if cid]
    if not CNI_RESULTS.is_dir() or not ids:
        return []
    return [p for p in sorted(CNI_RESULTS.iterdir()) if any(cid in p.name for cid in ids)]


# -- cleanup ----------------------------------------------------------------------------


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root``, deepest first."""
    prefix = os.fspath(root.resolve())
    found: list[str] = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(set(found), key=lambda p: (-p.count("/"), p))


def unmount_all(root: Path) -> list[str]:
    """Lazily unmount whatever is still mounted below ``root``; returns what was."""
    points = mounts_under(root)
    for point in points:
        run(["umount", "-l", point], check=False)
    return points


def remove_tree(root: Path) -> None:
    """Remove a lab directory, never following a still-mounted path into something else."""
    if not root.exists():
        return
    unmount_all(root)
    if mounts_under(root):
        raise RuntimeError(f"mounts left under {root}: {mounts_under(root)}")
    shutil.rmtree(root, ignore_errors=True)
    if root.exists():
        run(["chattr", "-R", "-i", os.fspath(root)], check=False)
        shutil.rmtree(root)


def cgroup_dirs(parent: str) -> list[Path]:
    """Every cgroup directory named ``parent`` (a path like ``/crt-x``), in each hierarchy."""
    rel = parent.strip("/")
    found = []
    candidates = [CGROUP_ROOT / rel]
    if CGROUP_ROOT.is_dir():
        candidates += [h / rel for h in CGROUP_ROOT.iterdir() if h.is_dir()]
    for path in candidates:
        if path.is_dir() and path not in found:
            found.append(path)
    return found


def cgroup_pids(parent: str) -> set[int]:
    """PIDs in the cgroup ``parent`` or below it, in any hierarchy."""
    pids: set[int] = set()
    for top in cgroup_dirs(parent):
        for procs in top.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                pids.update(int(x) for x in procs.read_text().split())
    return pids


def kill_cgroup(parent: str) -> list[int]:
    """SIGKILL what is still in the lab's own cgroup ``parent`` (processes the lab
    started, e.g. when a runtime failed to stop them); returns their PIDs."""
    pids = sorted(cgroup_pids(parent))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def remove_cgroup(parent: str, *, timeout: float = 5.0) -> list[Path]:
    """rmdir the cgroup ``parent`` and its children in every hierarchy (cgroup v1 and v2);
    returns the directories that could not be removed (still had processes)."""
    left: list[Path] = []
    deadline = time.monotonic() + timeout
    for top in cgroup_dirs(parent):
        dirs = sorted(
            (p for p in [top, *top.rglob("*")] if p.is_dir()),
            key=lambda p: -len(p.parts),
        )
        for d in dirs:
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        left.append(d)
                        break
                    time.sleep(0.05)
    return left


def remove_if_created(path: Path, existed: bool, allowed: Iterable[str] = ()) -> None:
    """Remove a host directory we caused to exist (e.g. ``/var/lib/cni``), but only
    if it did not exist before and holds nothing but empty dirs and ``allowed`` files."""
    if existed or not path.is_dir():
        return
    names = set(allowed)
    for sub in sorted(path.rglob("*"), key=lambda p: -len(p.parts)):
        if sub.is_dir():
            with contextlib.suppress(OSError):
                sub.rmdir()
        elif sub.name in names:
            sub.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.rmdir()


_TRACER = """\
#!{python} -S
# Records one CNI call (environment, netconf) as a JSON line, then runs the real plugin.
import json, os, subprocess, sys
data = sys.stdin.buffer.read()
env = {{k: v for k, v in os.environ.items() if k.startswith("CNI_")}}
try:
    conf = json.loads(data or b"null")
except ValueError:
    conf = None
proc = subprocess.run([{real!r}], input=data, capture_output=True)
line = json.dumps({{"plugin": {name!r}, "env": env, "conf": conf, "rc": proc.returncode,
                   "out": proc.stdout.decode(errors="replace")}}) + "\\n"
fd = os.open({log!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
os.write(fd, line.encode())
os.close(fd)
sys.stdout.buffer.write(proc.stdout)
sys.stderr.buffer.write(proc.stderr)
sys.exit(proc.returncode)
"""


def traced_plugin_dir(
    target: Path, plugin_dirs: Sequence[Path], plugins: Iterable[str], log: Path
) -> Path:
    """A plugin dir whose ``plugins`` record every call (one JSON line each in ``log``:
    ``plugin``, ``env`` (the CNI_* variables), ``conf`` (stdin), ``rc``, ``out``) and
    then run the real binary found in ``plugin_dirs``. Put it first in the search path."""
    target.mkdir(parents=True, exist_ok=True)
    for name in plugins:
        real = next((d / name for d in plugin_dirs if (d / name).is_file()), None)
        if real is None:
            raise FileNotFoundError(f"plugin {name} not in {list(map(str, plugin_dirs))}")
        wrapper = target / name
        wrapper.write_text(
            _TRACER.format(python=sys.executable, real=str(real), name=name, log=str(log))
        )
        wrapper.chmod(0o755)
    return target


def read_trace(log: Path) -> list[dict[str, object]]:
    """The calls recorded by ``traced_plugin_dir`` plugins, in order."""
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
