"""Installing the CNI plugin on a node: the ``ciliate-cni`` executable into the
runtime's plugin directory and a conflist that names it into its config
directory, both replaced atomically (a runtime may read or execute them at
any moment).

The executable is the C relay built with the package (``control/cni/shim``):
in a source checkout ``build/dev/cni/ciliate-cni`` (``ciliate bpf build``
builds it with the BPF objects), else the copy installed in the wheel under
``ciliate/control/cni/bin``.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from ciliate.datapath import objects

from .defaults import DEFAULT_AGENT_SOCKET
from .handler import SUPPORTED_VERSIONS

__all__ = ["CONFLIST_NAME", "PLUGIN_TYPE", "InstallError", "find_shim", "install", "register"]

PLUGIN_TYPE = "ciliate-cni"
CONFLIST_NAME = "05-ciliate.conflist"
_NETWORK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1


class InstallError(RuntimeError):
    """The plugin cannot be installed; the message says why and what to do."""


def find_shim() -> Path:
    """The built ``ciliate-cni``: the checkout's dev build, else the packaged one."""
    candidates = []
    build = objects.dev_build_dir()
    if build is not None:
        candidates.append(build / "cni" / PLUGIN_TYPE)
    packaged = importlib.resources.files("ciliate.control.cni") / "bin" / PLUGIN_TYPE
    candidates.append(Path(str(packaged)))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise InstallError(
        f"{PLUGIN_TYPE} is not built (looked at {', '.join(map(str, candidates))}): run "
        "`ciliate bpf build` in the checkout, or reinstall the package"
    )


def install(
    *,
    bin_dir: Path,
    conf_dir: Path,
    socket: str | None,
    network_name: str = "ciliate",
    cni_version: str = "1.0.0",
    shim: Path | None = None,
) -> list[Path]:
    """Install the plugin and its conflist; returns the paths written.

    ``socket`` is the agent's socket when not the default
    (:data:`~.defaults.DEFAULT_AGENT_SOCKET`); it goes into the conflist as
    ``agentSocket`` and must be absolute (the runtime's working directory is
    not ours). ``shim`` overrides :func:`find_shim`.
    """
    if not _NETWORK_NAME.fullmatch(network_name):
        raise InstallError(
            f"network name {network_name!r}: letters, digits, '_', '.' and '-' only, "
            "starting with a letter or digit"
        )
    if cni_version not in SUPPORTED_VERSIONS:
        raise InstallError(
            f"cniVersion {cni_version!r} is not one ciliate speaks: "
            + ", ".join(SUPPORTED_VERSIONS)
        )
    if socket is not None and (not socket.startswith("/") or len(socket.encode()) > _SUN_PATH_MAX):
        raise InstallError(
            f"agent socket {socket!r} must be an absolute path of at most {_SUN_PATH_MAX} bytes"
        )
    source = shim if shim is not None else find_shim()
    # portMappings: the runtime passes the pod's hostPorts, which the agent serves
    # through its load balancer (no portmap plugin needed). bandwidth: the pod's
    # kubernetes.io/egress-bandwidth, which the agent's bandwidth manager keeps
    # (no bandwidth plugin needed; its egress limit cannot work beside ciliate).
    plugin: dict[str, Any] = {
        "type": PLUGIN_TYPE,
        "capabilities": {"portMappings": True, "bandwidth": True},
    }
    if socket is not None:
        plugin["agentSocket"] = socket
    conflist = {"cniVersion": cni_version, "name": network_name, "plugins": [plugin]}

    binary = Path(bin_dir) / PLUGIN_TYPE
    conf = Path(conf_dir) / CONFLIST_NAME
    with source.open("rb") as src, _replace(binary, mode=0o755) as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    with _replace(conf, mode=0o644) as dst:
        dst.write((json.dumps(conflist, indent=2) + "\n").encode())
    return [binary, conf]


@contextmanager
def _replace(path: Path, *, mode: int) -> Iterator[IO[bytes]]:
    """Write ``path`` through a temporary file beside it, renamed over it once
    complete and on disk; the temporary file is removed on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            yield file
            file.flush()
            os.fchmod(file.fileno(), mode)
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# -- command line -----------------------------------------------------------


def _cli_install(args: argparse.Namespace) -> int:
    try:
        written = install(
            bin_dir=Path(args.bin_dir),
            conf_dir=Path(args.conf_dir),
            socket=args.socket,
            network_name=args.name,
            cni_version=args.cni_version,
        )
    except InstallError as exc:
        print(f"ciliate cni install: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``cni install`` to the ``ciliate`` command line."""
    cni = subparsers.add_parser("cni", help="the CNI plugin").add_subparsers(
        dest="cni_command", required=True
    )
    parser = cni.add_parser(
        "install", help="install ciliate-cni and its conflist for a container runtime"
    )
    parser.add_argument(
        "--bin-dir", required=True, metavar="DIR", help="the runtime's CNI plugin directory"
    )
    parser.add_argument(
        "--conf-dir", required=True, metavar="DIR", help="the runtime's CNI config directory"
    )
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help=f"the agent's socket, when not {DEFAULT_AGENT_SOCKET}",
    )
    parser.add_argument("--name", default="ciliate", help="network name (default: ciliate)")
    parser.add_argument(
        "--cni-version",
        default="1.0.0",
        choices=SUPPORTED_VERSIONS,
        help="cniVersion of the conflist (default: 1.0.0)",
    )
    parser.set_defaults(func=_cli_install)
