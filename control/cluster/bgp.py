"""The node's BGP speaker: exabgp as a child process, announcing the node's pod
CIDRs to its peers (the top-of-rack router) with the node's IP as next hop.

How exabgp is driven
--------------------
exabgp takes commands only from the *helper programs* its configuration names
(``process NAME { run ...; }``): it spawns each one itself, reads API commands
(``announce route ...``, ``withdraw route ...``) from the helper's stdout, and
writes its answers to the helper's stdin: an ack per command (``done`` or
``error``) and JSON events (with ``neighbor-changes``: a peer's session went
``connected``, ``up`` or ``down``). It closes every other descriptor when it
spawns a helper, so a pipe of ours cannot be handed down.

The speaker's helper is a relay of a dozen stdlib lines (``_RELAY``, written
into the workdir and run with ``python -S``): it connects to a UNIX socket the
speaker listens on (a path in the workdir: abstract socket names are per network
namespace, and exabgp may run in another one) and copies bytes both ways. So the
speaker writes command lines to a socket and one reader thread sorts what comes
back into acks (matched to commands in order: exabgp answers each line in turn)
and session states.

Graceful restart (RFC 4724)
---------------------------
The speaker announces the graceful-restart capability with a restart time
(``graceful_restart``, seconds; 0 turns it off) and the forwarding-state bit for
IPv4 unicast: the node's datapath keeps forwarding while its agent restarts. A
session that then ends *without* a NOTIFICATION tells the peer "restarting": the
peer keeps our routes (stale) for the restart time, and replaces them when the
new session has sent its routes and End-of-RIB. So:

* ``close()`` is a node leaving: it withdraws every route first (gone at the
  peer at once), then stops exabgp.
* ``close(keep_routes=True)`` is an agent restarting: no withdrawal; exabgp, on
  SIGTERM with graceful restart negotiated, closes the session without a
  NOTIFICATION. The peer keeps the routes until the next speaker is back, or the
  restart time has passed.
* The owner killed (no ``close()``): the socket closes and the relay exits;
  exabgp's respawned relays meet a refused connection, and with
  ``api.terminate`` exabgp shuts down, again without a NOTIFICATION: the same
  as a restart. Without graceful restart it sends a Cease and the peer drops
  the routes at once.
* A node that goes silent (its machine gone) is dropped by the peer's hold
  timer, routes and all (a hold timer expiry is an error, not a restart).

The next speaker must re-announce the routes *before* its End-of-RIB, or the peer
would flush the stale routes in the moment between the two: ``start(prefixes)``
writes the routes it is given into exabgp's configuration (a ``static`` block),
which exabgp sends in its first UPDATE, ahead of the End-of-RIB; later changes go
through the API.

Timing (measured, bird2 ToR in a namespace): ``start()`` ~0.3 s (exabgp's
imports), the first route at the ToR ~0.05 s later; ``close()`` withdraws first
(at the ToR ~10 ms later), then stops exabgp in ~0.35 s.

Errors::

    BgpError
     +-- ExabgpMissingError     exabgp is not importable nor on PATH
     +-- SpeakerStartError      exabgp exited or did not reach its API in time
     +-- SpeakerNotRunningError a command to a speaker that is not running
     +-- CommandError           exabgp answered ``error``, or nothing in time
"""

from __future__ import annotations

import contextlib
import enum
import importlib.util
import json
import logging
import os
import queue
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, ip_network
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from ciliate.control.process import ChildProcess

log = logging.getLogger(__name__)

# What exabgp needs to run as a child in the foreground and nothing else: no
# daemonising, the log on stdout (a file of ours), no CLI named pipes, an ack for
# every command, and an exit when its helper is lost for good (api.terminate:
# without it exabgp 5.0 keeps the session up, spinning, without an API).
# Run as root, exabgp drops to `nobody`; by default before it forks the helpers,
# and `nobody` could not reach our socket (a root-only workdir): fork first.
EXABGP_ENV = {
    "exabgp_daemon_daemonize": "false",
    "exabgp_daemon_drop": "false",
    "exabgp_log_destination": "stdout",
    "exabgp_log_statistics": "false",
    "exabgp_api_cli": "false",
    "exabgp_api_ack": "true",
    "exabgp_api_respawn": "true",
    "exabgp_api_terminate": "true",
}

# The relay between exabgp's helper pipes and the speaker's socket; stdlib only
# (it runs with ``-S``) and exits as soon as either side closes.
_RELAY = '''\
"""ciliate BGP speaker relay: socket -> stdout (commands to exabgp),
stdin (exabgp's acks and events) -> socket."""
import os
import socket
import sys
import threading

sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])


def answers():
    try:
        while data := os.read(0, 65536):
            sock.sendall(data)
    finally:
        os._exit(0)


threading.Thread(target=answers, daemon=True).start()
try:
    while data := sock.recv(65536):
        while data:
            data = data[os.write(1, data):]
finally:
    os._exit(0)
'''

_PROCESS_NAME = "ciliate"
# RFC 4724: the restart time is a 12-bit field.
MAX_RESTART_TIME = 4095
# What a restart may take by default, as the usual routers' default.
DEFAULT_RESTART_TIME = 120
# sockaddr_un.sun_path holds 108 bytes with the terminating NUL.
_MAX_SOCKET_PATH = 107


class BgpError(RuntimeError):
    """Base of this module's errors."""


class ExabgpMissingError(BgpError):
    pass


class SpeakerStartError(BgpError):
    pass


class SpeakerNotRunningError(BgpError):
    pass


class CommandError(BgpError):
    def __init__(self, message: str, failed: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.failed = list(failed)


@dataclass(frozen=True)
class Peer:
    """A BGP neighbour of the node. ``local_address`` is the node's address the
    session runs from (default: the speaker's next hop)."""

    address: IPv4Address
    asn: int
    local_address: IPv4Address | None = None


class SessionState(enum.StrEnum):
    """What exabgp has said of a session (``neighbor-changes`` events)."""

    IDLE = "idle"  # nothing yet: exabgp is connecting (with back-off)
    CONNECTED = "connected"  # TCP up, OPENs being exchanged
    ESTABLISHED = "established"
    DOWN = "down"  # was connected, went down; exabgp reconnects


_EVENT_STATES = {
    "connected": SessionState.CONNECTED,
    "up": SessionState.ESTABLISHED,
    "down": SessionState.DOWN,
}


def exabgp_command() -> list[str]:
    """How to run exabgp: this interpreter's package if it has one, else PATH."""
    if importlib.util.find_spec("exabgp") is not None:
        return [sys.executable, "-m", "exabgp"]
    found = shutil.which("exabgp")
    if found is None:
        raise ExabgpMissingError("exabgp is not installed: pip install 'exabgp>=5,<6'")
    return [found]


def _check_token(value: str, what: str) -> str:
    # Paths go into exabgp's configuration, which is whitespace- and ';'-delimited.
    if not value or any(c.isspace() or c in ";{}[]\"'" for c in value):
        raise ValueError(f"{what} {value!r} cannot go into an exabgp configuration")
    return value


def _check_asn(asn: int) -> int:
    if not 1 <= asn <= 0xFFFFFFFF:
        raise ValueError(f"AS number {asn} out of range")
    return asn


def _networks(prefixes: Iterable[IPv4Network]) -> list[IPv4Network]:
    out: list[IPv4Network] = []
    for prefix in prefixes:
        network = ip_network(str(prefix))
        if not isinstance(network, IPv4Network):
            raise ValueError(f"{prefix}: only IPv4 prefixes are announced")
        if network not in out:
            out.append(network)
    return out


class BgpSpeaker:
    """exabgp announcing prefixes with ``next_hop`` to ``peers``.

    A context manager; ``start()``/``close()`` may also be called directly, and a
    closed speaker can be started again (it then announces nothing until told).
    ``netns`` runs exabgp in ``/run/netns/<netns>`` (the lab); ``None`` runs it in
    the caller's namespace (the agent, which lives in its node's namespace).
    """

    def __init__(
        self,
        *,
        router_id: IPv4Address,
        local_as: int,
        peers: Sequence[Peer],
        next_hop: IPv4Address,
        workdir: Path,
        netns: str | None = None,
        hold_time: int = 3,
        graceful_restart: int = DEFAULT_RESTART_TIME,
        listen: bool = True,
        start_timeout: float = 15.0,
        command_timeout: float = 5.0,
        stop_timeout: float = 6.0,
    ) -> None:
        if not peers:
            raise ValueError("a BGP speaker needs at least one peer")
        if hold_time != 0 and hold_time < 3:
            raise ValueError("hold time is 0 or at least 3 s (RFC 4271)")
        if not 0 <= graceful_restart <= MAX_RESTART_TIME:
            raise ValueError(
                f"graceful restart time {graceful_restart} s: 0 (off) to {MAX_RESTART_TIME} s"
            )
        if len({peer.address for peer in peers}) != len(peers):
            raise ValueError("peers must have distinct addresses")
        for peer in peers:
            _check_asn(peer.asn)
        self.router_id = router_id
        self.local_as = _check_asn(local_as)
        self.peers = tuple(peers)
        self.next_hop = next_hop
        self.workdir = Path(workdir)
        self.netns = netns
        self.hold_time = hold_time
        self.graceful_restart = graceful_restart
        self.listen = listen
        self.start_timeout = start_timeout
        self.command_timeout = command_timeout
        self.stop_timeout = stop_timeout

        self._child: ChildProcess | None = None
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._state_lock = threading.Lock()  # _conn, _states, _skip_acks
        self._command_lock = threading.RLock()  # one change of routes at a time
        self._acks: queue.Queue[str] = queue.Queue()
        self._skip_acks = 0
        self._answers: queue.Queue[str] = queue.Queue()  # `show ... json` output lines
        self._states: dict[IPv4Address, SessionState] = {}
        self._announced: list[IPv4Network] = []

    # -- files ---------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.workdir / "exabgp.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "exabgp.log"

    @property
    def socket_path(self) -> Path:
        return self.workdir / "api.sock"

    @property
    def relay_path(self) -> Path:
        return self.workdir / "api-relay.py"

    @property
    def pid_path(self) -> Path:
        return self.workdir / "exabgp.pid"

    def _stop_previous(self) -> None:
        """SIGKILL the exabgp a previous owner of this workdir left running (an agent
        killed hard: its exabgp stops by itself, but a second or so later). Left
        alone, it would hold the session and could connect its respawned relay to
        our new socket. SIGKILL sends no NOTIFICATION: the peer keeps our routes
        (graceful restart) until the new session replaces them."""
        try:
            pid = int(self.pid_path.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            return
        if str(self.config_path) not in cmdline:
            return  # gone, and its PID reused by someone else's process
        log.warning("exabgp %d of a previous owner still runs: killing it", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
            except (OSError, IndexError):
                return
            if state == "Z":
                return  # dead, waiting for its parent (gone too) to be reaped by init
            time.sleep(0.01)

    @property
    def pid(self) -> int | None:
        """exabgp's PID while it runs (``nsenter`` execs it: same process)."""
        return self._child.pid if self._child is not None else None

    def render_config(self, prefixes: Sequence[IPv4Network] = ()) -> str:
        """exabgp's configuration; ``prefixes`` are announced in the first UPDATE of
        every session (before its End-of-RIB)."""
        relay = f"{_check_token(sys.executable, 'python')} -S {self.relay_path} {self.socket_path}"
        lines = [
            f"process {_PROCESS_NAME} {{",
            f"    run {relay};",
            "    encoder json;",
            "}",
        ]
        for peer in self.peers:
            lines += [
                f"neighbor {peer.address} {{",
                f"    router-id {self.router_id};",
                f"    local-address {peer.local_address or self.next_hop};",
                f"    local-as {self.local_as};",
                f"    peer-as {peer.asn};",
                f"    hold-time {self.hold_time};",
                # Accept the peer's connections too: after an outage the peer's retry
                # timer, not exabgp's back-off (up to 60 s), bounds the reconnection.
                *(["    listen 179;"] if self.listen else []),
                "    adj-rib-out true;",  # re-send our routes when a session comes back
                "    family { ipv4 unicast; }",
                *(
                    [f"    capability {{ graceful-restart {self.graceful_restart}; }}"]
                    if self.graceful_restart
                    else []
                ),
                *(
                    ["    static {"]
                    + [f"        route {p} next-hop {self.next_hop};" for p in prefixes]
                    + ["    }"]
                    if prefixes
                    else []
                ),
                f"    api {{ processes [ {_PROCESS_NAME} ]; neighbor-changes; }}",
                "}",
            ]
        return "\n".join(lines) + "\n"

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

    @property
    def running(self) -> bool:
        return self.pid is not None

    def start(self, prefixes: Iterable[IPv4Network] = ()) -> None:
        """Run exabgp announcing ``prefixes`` and wait until its API is connected
        (not for the sessions: see ``wait_established``). A speaker whose exabgp
        died may be started again."""
        if self.running:
            raise BgpError("the speaker is already running")
        if self._child is not None:
            log.warning("exabgp had exited with %s", self._child.returncode)
            self.close()
        initial = _networks(prefixes)
        command = exabgp_command()
        self.workdir.mkdir(parents=True, exist_ok=True)
        _check_token(str(self.workdir), "workdir")
        if len(str(self.socket_path)) > _MAX_SOCKET_PATH:
            raise ValueError(f"workdir {self.workdir} is too long for a UNIX socket path")
        self._stop_previous()
        self.relay_path.write_text(_RELAY)
        self.config_path.write_text(self.render_config(initial))
        self.socket_path.unlink(missing_ok=True)

        self._stopping.clear()
        self._connected.clear()
        self._acks = queue.Queue()
        self._skip_acks = 0
        self._announced = list(initial)
        with self._state_lock:
            self._states = {peer.address: SessionState.IDLE for peer in self.peers}

        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.socket_path))
            listener.listen(4)
            listener.settimeout(0.2)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self._thread = threading.Thread(
            target=self._serve, name=f"bgp-api-{self.next_hop}", daemon=True
        )
        self._thread.start()

        self._child = ChildProcess(
            name="exabgp",
            argv=[*command, "server", str(self.config_path)],
            log_path=self.log_path,
            netns=self.netns,
            env={**os.environ, **EXABGP_ENV},
        )
        try:
            self._child.start()
            took = self._child.wait_until(
                self._connected.is_set,
                timeout=self.start_timeout,
                what="connect its API",
                error=SpeakerStartError,
            )
        except BaseException:
            self.close()
            raise
        self.pid_path.write_text(f"{self._child.pid}\n")
        log.info(
            "exabgp %s up in %.0f ms (%s)",
            self._child.pid,
            took * 1000,
            self.netns or "current netns",
        )

    def close(self, *, keep_routes: bool = False) -> None:
        """Withdraw everything (unless ``keep_routes``: a restart, see the module
        documentation), stop exabgp (SIGTERM, then SIGKILL after ``stop_timeout``)
        and release the socket. Idempotent."""
        if self._announced and self._conn is not None and not keep_routes:
            try:
                self._withdraw_sent(self._announced, timeout=2.0)
            except BgpError as exc:
                # Without graceful restart exabgp's shutdown sends a Cease, which drops
                # our routes anyway; with it, the peer keeps them for the restart time.
                log.warning("withdraw before stop failed: %s", exc)
        self._announced = []
        child, self._child = self._child, None
        if child is not None:
            child.stop(timeout=self.stop_timeout)
            self.pid_path.unlink(missing_ok=True)
        self._stopping.set()
        with self._state_lock:
            conn, self._conn = self._conn, None
            self._states = {peer.address: SessionState.IDLE for peer in self.peers}
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self.socket_path.unlink(missing_ok=True)

    # -- the API socket ------------------------------------------------------------

    def _serve(self) -> None:
        """Accept the relay (again, if exabgp respawned it) and read what it says."""
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.setblocking(True)
            with self._state_lock:
                old, self._conn = self._conn, conn
            if old is not None:
                old.close()
            self._connected.set()
            try:
                with conn.makefile("rb") as stream:
                    for raw in stream:
                        self._received(raw.decode(errors="replace").strip())
            except OSError:
                pass
            finally:
                with self._state_lock:
                    if self._conn is conn:
                        self._conn = None
                conn.close()

    def _received(self, line: str) -> None:
        if line in ("done", "error"):
            with self._state_lock:
                if self._skip_acks:
                    self._skip_acks -= 1  # the late answer to a command that timed out
                    return
            self._acks.put(line)
        elif line.startswith("["):
            self._answers.put(line)  # a JSON list: what `show neighbor json` answers
        elif line.startswith("{"):
            try:
                event = json.loads(line)
            except ValueError:
                log.warning("exabgp said %r", line)
                return
            self._event(event)
        elif line:
            log.debug("exabgp said %r", line)

    def _event(self, event: dict[str, Any]) -> None:
        if event.get("type") == "state":
            neighbor = event.get("neighbor", {})
            state = _EVENT_STATES.get(neighbor.get("state", ""))
            try:
                address = IPv4Address(neighbor["address"]["peer"])
            except (KeyError, TypeError, ValueError):
                return
            if state is not None:
                with self._state_lock:
                    self._states[address] = state
                log.info("BGP session with %s: %s %s", address, state, neighbor.get("reason", ""))
        elif event.get("type") == "notification" and event.get("notification") == "shutdown":
            with self._state_lock:
                self._states = {a: SessionState.DOWN for a in self._states}

    def _updates_sent(self, timeout: float) -> dict[str, int]:
        """UPDATEs exabgp has written to each established session (``show
        neighbor json``), by peer address."""
        with self._command_lock:
            while not self._answers.empty():
                self._answers.get_nowait()
            self._send(["show neighbor json"], timeout=timeout)
            try:
                answer = json.loads(self._answers.get(timeout=timeout))
            except (queue.Empty, ValueError) as exc:
                raise CommandError(f"exabgp did not describe its neighbors: {exc!r}") from None
        sent: dict[str, int] = {}
        for neighbor in answer if isinstance(answer, list) else []:
            with contextlib.suppress(KeyError, TypeError, ValueError):
                if neighbor["state"] == "up":
                    address = str(neighbor["peer"]["address"])
                    sent[address] = int(neighbor["messages"]["sent"]["update"])
        return sent

    def _withdraw_sent(self, prefixes: Sequence[IPv4Network], timeout: float) -> None:
        """Withdraw ``prefixes`` and return once every established session has been
        sent an UPDATE since. exabgp acknowledges a command when its RIB has it and
        writes the UPDATE on a later turn of its loop; a stop right after the
        acknowledgement, without a NOTIFICATION (graceful restart), would leave the
        withdrawn routes at the peer for the restart time."""
        deadline = time.monotonic() + timeout
        before = self._updates_sent(timeout)
        failed = self._send([f"withdraw route {p}" for p in prefixes], timeout=timeout)
        if failed:
            raise CommandError(f"exabgp refused: {failed}", failed)
        while True:
            after = self._updates_sent(max(0.1, deadline - time.monotonic()))
            if all(after.get(peer, 0) > count for peer, count in before.items()):
                return
            if time.monotonic() > deadline:
                raise CommandError(f"exabgp did not send the withdrawal within {timeout} s")
            time.sleep(0.01)

    def _send(self, lines: Sequence[str], timeout: float | None = None) -> list[str]:
        """Send command lines; return those exabgp answered ``error`` to."""
        if not lines:
            return []
        limit = self.command_timeout if timeout is None else timeout
        with self._command_lock:
            conn = self._conn
            if conn is None or not self.running:
                raise SpeakerNotRunningError("the BGP speaker is not running")
            try:
                conn.sendall("".join(f"{line}\n" for line in lines).encode())
            except OSError as exc:
                raise SpeakerNotRunningError(f"exabgp's API is gone: {exc}") from exc
            deadline = time.monotonic() + limit
            failed: list[str] = []
            for index, line in enumerate(lines):
                try:
                    answer = self._acks.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    with self._state_lock:
                        self._skip_acks += len(lines) - index
                    raise CommandError(
                        f"exabgp did not answer {line!r} within {limit} s", lines[index:]
                    ) from None
                if answer != "done":
                    failed.append(line)
            return failed

    # -- routes --------------------------------------------------------------------

    @property
    def prefixes(self) -> list[IPv4Network]:
        """What this speaker announces now."""
        return list(self._announced)

    def announce(self, prefixes: Iterable[IPv4Network]) -> None:
        with self._command_lock:
            self._announce(prefixes)

    def _announce(self, prefixes: Iterable[IPv4Network]) -> None:
        commands = {
            f"announce route {p} next-hop {self.next_hop}": p
            for p in _networks(prefixes)
            if p not in self._announced
        }
        failed = self._send(list(commands))
        self._announced += [p for line, p in commands.items() if line not in failed]
        if failed:
            raise CommandError(f"exabgp refused: {failed}", failed)

    def withdraw(self, prefixes: Iterable[IPv4Network]) -> None:
        with self._command_lock:
            self._withdraw(prefixes)

    def _withdraw(self, prefixes: Iterable[IPv4Network]) -> None:
        commands = {f"withdraw route {p}": p for p in _networks(prefixes) if p in self._announced}
        failed = self._send(list(commands))
        gone = {p for line, p in commands.items() if line not in failed}
        self._announced = [p for p in self._announced if p not in gone]
        if failed:
            raise CommandError(f"exabgp refused: {failed}", failed)

    def set_prefixes(self, prefixes: Iterable[IPv4Network]) -> None:
        """Announce exactly ``prefixes``: the new first, then withdraw the gone
        (make before break)."""
        wanted = _networks(prefixes)
        with self._command_lock:
            self._announce(wanted)
            self._withdraw([p for p in self._announced if p not in wanted])

    # -- sessions ------------------------------------------------------------------

    def sessions(self) -> dict[Peer, SessionState]:
        """Each peer's session as exabgp last reported it (``DOWN`` for all if
        exabgp has died; ``IDLE`` before start and after close)."""
        if self._child is not None and not self._child.running:
            return dict.fromkeys(self.peers, SessionState.DOWN)
        with self._state_lock:
            return {peer: self._states.get(peer.address, SessionState.IDLE) for peer in self.peers}

    def established(self) -> bool:
        return all(s is SessionState.ESTABLISHED for s in self.sessions().values())

    def wait_established(self, timeout: float = 10.0) -> bool:
        """Wait until every session is established; False on timeout."""
        deadline = time.monotonic() + timeout
        while not self.established():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True
