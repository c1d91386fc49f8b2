"""The lab's top-of-rack router: bird2 in the fabric namespace, one eBGP session
per node, learned pod CIDRs installed in the namespace's kernel table (``proto
bird``), nothing announced back (a plain ToR: no reflection, no defaults).

Graceful restart (RFC 4724) is on, as a ToR configured for nodes whose agents
restart: when a node's session ends without a NOTIFICATION (its speaker
restarting), bird keeps the node's routes, marked stale, for the restart time
the node announced in its OPEN, and replaces them when the node's new session
has sent its routes and End-of-RIB. A node that goes silent is dropped when the
hold time (3 s) expires, and its routes with it: a hold timer expiry is an
error, not a restart. A node that sends a NOTIFICATION (Cease) loses its routes
at once. Short connect/error-wait timers bring a restarted speaker back within a
second or two. ``graceful_restart=False`` turns it off (every session end takes
the routes at once).

bird runs in the foreground (``-f``) as our child, inside the namespace through
``nsenter`` (which execs it: the child's PID is bird's), with its config,
control socket and PID file in the workdir; ``birdc -s <socket>`` talks to it
from anywhere, and reconfiguration rewrites the file and runs ``configure``.

Errors::

    TorError
     +-- BirdMissingError   bird2 is not installed (``install_bird()`` does it)
     +-- BirdStartError     bird refused the config, exited or never answered
     +-- BirdConfigError    a new config was refused (the old one stays)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, ip_network
from pathlib import Path
from types import TracebackType
from typing import Self

from ciliate.control.process import ChildProcess, stop_child

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# sockaddr_un.sun_path holds 108 bytes with the terminating NUL.
_MAX_SOCKET_PATH = 107


class TorError(RuntimeError):
    """Base of this module's errors."""


class BirdMissingError(TorError):
    pass


class BirdStartError(TorError):
    pass


class BirdConfigError(TorError):
    pass


@dataclass(frozen=True)
class Neighbor:
    """A node peering with the ToR; ``name`` is its bird protocol name."""

    address: IPv4Address
    asn: int
    name: str | None = None

    @property
    def protocol(self) -> str:
        name = self.name or "node_" + str(self.address).replace(".", "_")
        if not _NAME.match(name):
            raise ValueError(f"{name!r} is not a bird protocol name")
        return name


@dataclass(frozen=True)
class Route:
    """A route bird installed in the ToR's kernel table."""

    prefix: IPv4Network
    via: IPv4Address | None
    dev: str | None


@dataclass(frozen=True)
class Protocol:
    """One line of ``birdc show protocols``."""

    name: str
    proto: str
    table: str
    state: str  # up, start, down, ...
    since: str
    info: str  # for BGP: Established, Active, Connect, OpenSent, ... and the last error

    @property
    def established(self) -> bool:
        return self.proto == "BGP" and self.info.split(" ", 1)[0] == "Established"


def parse_bird_routes(text: str) -> dict[IPv4Network, str]:
    """``birdc show route`` output: each IPv4 prefix, with what bird writes in
    brackets, the protocol it came from and when (``node1 12:00:00.062``): a route
    re-learned from a neighbour's new session has a new time."""
    routes: dict[IPv4Network, str] = {}
    for line in text.splitlines():
        fields = line.split()
        if not fields or "/" not in fields[0]:
            continue
        try:
            prefix = ip_network(fields[0])
        except ValueError:
            continue
        if isinstance(prefix, IPv4Network):
            start, end = line.find("["), line.find("]")
            routes[prefix] = line[start + 1 : end] if 0 <= start < end else ""
    return routes


def run_birdc(birdc: str, socket_path: Path, *args: str) -> str:
    """A ``birdc`` command through bird's control socket (from any namespace)."""
    proc = subprocess.run(
        [birdc, "-s", str(socket_path), *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise TorError(f"birdc {' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def bird_routes(birdc: str, socket_path: Path) -> dict[IPv4Network, str]:
    """The routes in bird's table (see :func:`parse_bird_routes`)."""
    return parse_bird_routes(run_birdc(birdc, socket_path, "show", "route"))


def bird_restarting(birdc: str, socket_path: Path, protocol: str) -> bool:
    """Whether bird holds the routes of BGP ``protocol`` through the neighbour's
    graceful restart (its session ended without a NOTIFICATION; the restart
    timer runs, the routes stay)."""
    out = run_birdc(birdc, socket_path, "show", "protocols", "all", protocol)
    return "Neighbor graceful restart active" in out


def parse_bird_protocols(text: str) -> dict[str, Protocol]:
    """``birdc show protocols`` output, by protocol name."""
    protocols: dict[str, Protocol] = {}
    for line in text.splitlines():
        fields = line.split(None, 5)
        if len(fields) < 5 or fields[0] in ("BIRD", "Name"):
            continue
        name, proto, table, state, since = fields[:5]
        info = fields[5].strip() if len(fields) > 5 else ""
        protocols[name] = Protocol(name, proto, table, state, since, info)
    return protocols


class RouteMonitor:
    """``ip monitor route`` in a namespace, in the background: every route the
    kernel deleted while it ran. A route bird replaces in place (a stale route
    refreshed after a graceful restart) is not a deletion; a flush and re-add is.

    A context manager; ``ready`` waits until the monitor is subscribed."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.lines: list[str] = []
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> Self:
        self._proc = subprocess.Popen(
            ["ip", "-n", self.netns, "monitor", "route"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, name="route-monitor", daemon=True)
        self._reader.start()
        self._wait_subscribed()
        return self

    def _wait_subscribed(self, timeout: float = 5.0) -> None:
        # `ip monitor` prints nothing until an event: its netlink socket, bound to the
        # route groups, is the sign that it listens.
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._proc.poll() is None:
            for entry in Path(f"/proc/{self._proc.pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(entry).startswith("socket:"):
                        time.sleep(0.05)  # bind and subscribe follow socket()
                        return
            time.sleep(0.01)
        raise TorError(f"ip monitor route in {self.netns} did not start")

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def deleted(self, prefix: IPv4Network | None = None) -> list[str]:
        """The deletions seen (of ``prefix`` only, if given)."""
        return [
            line
            for line in list(self.lines)
            if line.startswith("Deleted ")
            and (prefix is None or line.split()[1] in (str(prefix), str(prefix.network_address)))
        ]

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_child(proc, timeout=2, name="ip monitor")
        if self._reader is not None:
            self._reader.join(timeout=2)


def find_bird() -> tuple[str, str]:
    """The paths of ``bird`` and ``birdc``."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    bird, birdc = shutil.which("bird", path=path), shutil.which("birdc", path=path)
    if bird is None or birdc is None:
        raise BirdMissingError("bird2 is not installed: apt-get install bird2")
    return bird, birdc


def install_bird() -> tuple[str, str]:
    """``apt-get install bird2`` when bird is missing. On a host whose init runs
    package services (not a container with ``policy-rc.d``), Debian's package also
    starts a system bird with its stock config, which exports no routes."""
    with contextlib.suppress(BirdMissingError):
        return find_bird()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", "bird2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        # The package lists may be missing (a fresh image): refresh once.
        subprocess.run(["apt-get", "update"], capture_output=True, env=env, check=False)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise BirdMissingError(f"apt-get install bird2 failed: {proc.stderr.strip()[-500:]}")
    return find_bird()


class TorRouter:
    """bird2 as the top-of-rack router of the lab, in namespace ``netns``.

    A context manager; ``start()``/``close()`` may be called directly and a closed
    router started again. ``forward`` turns IPv4 forwarding on in the namespace
    (a router forwards; the namespace is the lab's, never the root one).
    """

    def __init__(
        self,
        *,
        netns: str,
        router_id: IPv4Address,
        local_as: int,
        neighbors: Sequence[Neighbor],
        workdir: Path,
        hold_time: int = 3,
        keepalive_time: int = 1,
        graceful_restart: bool = True,
        forward: bool = True,
        start_timeout: float = 10.0,
        stop_timeout: float = 5.0,
    ) -> None:
        if not netns:
            raise ValueError("the ToR runs in a namespace of its own, never the root one")
        if not 1 <= local_as <= 0xFFFFFFFF:
            raise ValueError(f"AS number {local_as} out of range")
        if hold_time < 3 or not 1 <= keepalive_time < hold_time:
            raise ValueError("hold time >= 3 s and keepalive time in [1, hold time)")
        self.netns = netns
        self.router_id = router_id
        self.local_as = local_as
        self.workdir = Path(workdir)
        self.hold_time = hold_time
        self.keepalive_time = keepalive_time
        self.graceful_restart = graceful_restart
        self.forward = forward
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._neighbors: list[Neighbor] = []
        for neighbor in neighbors:
            self._add(neighbor)
        self._child: ChildProcess | None = None
        self._bird = ""
        self._birdc = ""

    @property
    def neighbors(self) -> list[Neighbor]:
        return list(self._neighbors)

    def _add(self, neighbor: Neighbor) -> None:
        if not 1 <= neighbor.asn <= 0xFFFFFFFF:
            raise ValueError(f"AS number {neighbor.asn} out of range")
        if any(n.address == neighbor.address for n in self._neighbors):
            raise ValueError(f"{neighbor.address} is already a neighbor")
        if any(n.protocol == neighbor.protocol for n in self._neighbors):
            raise ValueError(f"protocol name {neighbor.protocol} is taken")
        self._neighbors.append(neighbor)

    # -- files ---------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.workdir / "bird.conf"

    @property
    def socket_path(self) -> Path:
        return self.workdir / "bird.ctl"

    @property
    def pid_path(self) -> Path:
        return self.workdir / "bird.pid"

    @property
    def log_path(self) -> Path:
        return self.workdir / "bird.log"

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    def render_config(self, neighbors: Sequence[Neighbor] | None = None) -> str:
        lines = [
            "# generated by ciliate.control.lab.tor",
            f"router id {self.router_id};",
            "log stderr all;",
            'timeformat protocol "%FT%T";',  # one token in `show protocols`
            "",
            "protocol device { scan time 10; }",
            "",
            "# learned pod CIDRs go to the kernel table (proto bird)",
            "protocol kernel {",
            "    ipv4 { import none; export all; };",
            "}",
        ]
        for neighbor in self._neighbors if neighbors is None else neighbors:
            lines += [
                "",
                f"protocol bgp {neighbor.protocol} {{",
                f"    local as {self.local_as};",
                f"    neighbor {neighbor.address} as {neighbor.asn};",
                f"    hold time {self.hold_time};",
                f"    keepalive time {self.keepalive_time};",
                "    connect delay time 1;",
                "    connect retry time 2;",
                "    error wait time 1, 5;",
                f"    graceful restart {'on' if self.graceful_restart else 'off'};",
                "    ipv4 { import all; export none; };",
                "}",
            ]
        return "\n".join(lines) + "\n"

    def _write_config(self) -> None:
        """Write the config through a checked temporary file: a refused config
        never replaces the one bird runs."""
        tmp = self.config_path.with_suffix(".new")
        tmp.write_text(self.render_config())
        check = subprocess.run(
            [self._bird, "-p", "-c", str(tmp)], capture_output=True, text=True, check=False
        )
        if check.returncode != 0:
            raise BirdConfigError(f"bird refused its config: {check.stderr.strip()}")
        os.replace(tmp, self.config_path)

    # -- life cycle ----------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        if self._child is not None:
            raise TorError("the ToR is already running")
        if not Path(f"/run/netns/{self.netns}").exists():
            raise TorError(f"no network namespace {self.netns}")
        self._bird, self._birdc = find_bird()
        self.workdir.mkdir(parents=True, exist_ok=True)
        if len(str(self.socket_path)) > _MAX_SOCKET_PATH:
            raise ValueError(f"workdir {self.workdir} is too long for a UNIX socket path")
        self._write_config()
        self.socket_path.unlink(missing_ok=True)
        if self.forward:
            subprocess.run(
                [
                    "nsenter",
                    f"--net=/run/netns/{self.netns}",
                    "sysctl",
                    "-qw",
                    "net.ipv4.ip_forward=1",
                ],
                capture_output=True,
                check=True,
            )
        self._child = ChildProcess(
            name="bird",
            argv=[
                self._bird,
                "-f",
                "-c",
                str(self.config_path),
                "-s",
                str(self.socket_path),
                "-P",
                str(self.pid_path),
            ],
            log_path=self.log_path,
            netns=self.netns,
        )
        self._child.start()
        try:
            took = self._child.wait_until(
                lambda: self._birdc_run("show", "status", check=False).returncode == 0,
                timeout=self.start_timeout,
                what="answer on its control socket",
                error=BirdStartError,
            )
        except BaseException:
            self.close()
            raise
        log.info("bird %d up in %s (%.0f ms)", self._child.pid, self.netns, took * 1000)

    def close(self) -> None:
        """SIGTERM bird (it sends each neighbour a Cease and removes its kernel
        routes), SIGKILL after ``stop_timeout``. Idempotent."""
        child, self._child = self._child, None
        if child is None:
            return
        child.stop(timeout=self.stop_timeout)
        self.socket_path.unlink(missing_ok=True)
        self.pid_path.unlink(missing_ok=True)

    def _birdc_run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self._birdc, "-s", str(self.socket_path), *args],
            capture_output=True,
            text=True,
            check=False,
        )
        if check and proc.returncode != 0:
            raise TorError(f"birdc {' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    def birdc(self, *args: str) -> str:
        """A ``birdc`` command's output (e.g. ``birdc("show", "route")``)."""
        if self._child is None:
            raise TorError("the ToR is not running")
        return self._birdc_run(*args).stdout

    # -- neighbours ----------------------------------------------------------------

    def add_neighbor(self, neighbor: Neighbor) -> None:
        self.reconfigure([*self._neighbors, neighbor])

    def remove_neighbor(self, address: IPv4Address) -> None:
        self.reconfigure([n for n in self._neighbors if n.address != address])

    def reconfigure(self, neighbors: Sequence[Neighbor] | None = None) -> None:
        """Take ``neighbors`` (default: the current ones) and have bird load the
        new config: added sessions start, removed ones end (their routes go),
        unchanged ones stay up."""
        old = self._neighbors
        if neighbors is not None:
            self._neighbors = []
            try:
                for neighbor in neighbors:
                    self._add(neighbor)
            except ValueError:
                self._neighbors = old
                raise
        if self._child is None:
            return
        try:
            self._write_config()
        except BirdConfigError:
            self._neighbors = old
            raise
        out = self.birdc("configure")
        if "Reconfigured" not in out and "Reconfiguration in progress" not in out:
            raise BirdConfigError(f"birdc configure: {out.strip()}")

    # -- state ---------------------------------------------------------------------

    def routes(self) -> list[Route]:
        """The kernel routes bird installed in the ToR's namespace."""
        out = subprocess.run(
            ["ip", "-n", self.netns, "-j", "route", "show", "proto", "bird"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        routes: list[Route] = []
        for entry in json.loads(out or "[]"):
            prefix = ip_network(entry["dst"] if "/" in entry["dst"] else entry["dst"] + "/32")
            gateway = entry.get("gateway")
            if gateway is None and entry.get("nexthops"):
                gateway = entry["nexthops"][0].get("gateway")
            if isinstance(prefix, IPv4Network):
                routes.append(
                    Route(
                        prefix=prefix,
                        via=IPv4Address(gateway) if gateway else None,
                        dev=entry.get("dev"),
                    )
                )
        return routes

    def bird_routes(self) -> dict[IPv4Network, str]:
        """bird's own table: each prefix, with its protocol and time."""
        if self._child is None:
            raise TorError("the ToR is not running")
        return bird_routes(self._birdc, self.socket_path)

    def restarting(self, neighbor: Neighbor) -> bool:
        """Whether bird holds ``neighbor``'s routes through its graceful restart (the
        session ended without a NOTIFICATION; the restart timer runs)."""
        if self._child is None:
            raise TorError("the ToR is not running")
        return bird_restarting(self._birdc, self.socket_path, neighbor.protocol)

    def protocols(self) -> dict[str, Protocol]:
        """``birdc show protocols``, by protocol name."""
        return parse_bird_protocols(self.birdc("show", "protocols"))

    def sessions(self) -> dict[Neighbor, str]:
        """Each neighbour's BGP state as bird names it (``Established``,
        ``Active``, ``Connect``, ``OpenSent``, ...; ``down`` when disabled)."""
        protocols = self.protocols()
        states: dict[Neighbor, str] = {}
        for neighbor in self._neighbors:
            protocol = protocols.get(neighbor.protocol)
            if protocol is None:
                states[neighbor] = "unknown"
            else:
                states[neighbor] = protocol.info.split(" ", 1)[0] or protocol.state
        return states
