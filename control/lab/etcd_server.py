"""A private, single-member etcd for tests, benchmarks and the lab.

:class:`EtcdServer` runs Debian's ``/usr/bin/etcd`` (package ``etcd-server``) with its own
data directory, on loopback (or on an address inside a lab network namespace) and on free
ports, and waits until it answers ``/health``. It can be stopped and started again on the
same data directory and ports (restart tests), or SIGKILLed. Everything it creates lives
under one work directory (``<workdir>/data`` and the log ``<workdir>/etcd.log``), which
is removed by :meth:`EtcdServer.close` when the server created it.

Nothing is left behind: :meth:`close` (and the context manager) stops the process by its
PID; an ``atexit`` hook SIGKILLs servers the program forgot; and by default the child
gets ``PR_SET_PDEATHSIG=SIGKILL``, so it also dies if this process is killed. Linux ties
the death signal to the *thread* that started the child: start servers from a thread that
outlives them (the main thread), or pass ``die_with_parent=False``.

``netns`` (a name under ``/run/netns`` or a path) runs etcd inside that network namespace
through ``nsenter --net=...``; port probing and health checks then run in a short-lived
thread that has entered the same namespace, so nothing touches the root namespace.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import http.client
import json
import os
import secrets
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from ciliate.control.process import ChildProcess, netns_path

__all__ = [
    "ETCD_BINARY",
    "EtcdServer",
    "EtcdServerError",
    "etcd_available",
]

ETCD_BINARY = "/usr/bin/etcd"
CLONE_NEWNET = 0x40000000

_T = TypeVar("_T")

_live: set[EtcdServer] = set()
_live_lock = threading.Lock()


class EtcdServerError(RuntimeError):
    """etcd could not be started (or stopped); the message quotes its log."""


def etcd_available(binary: str = ETCD_BINARY) -> bool:
    """Whether the etcd binary is installed (Debian package ``etcd-server``)."""
    return os.access(binary, os.X_OK)


def _in_netns(netns: str | None, fn: Callable[[], _T]) -> _T:
    """Run ``fn`` in the network namespace ``netns`` (or here when ``None``).

    A fresh thread enters the namespace (namespaces are per thread on Linux) and exits
    after ``fn``; no other thread of this process changes namespace.
    """
    if netns is None:
        return fn()
    path = netns_path(netns)
    result: list[_T] = []
    error: list[BaseException] = []

    def worker() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({path}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=worker, name="etcd-netns", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def _free_ports(host: str, count: int) -> list[int]:
    """``count`` distinct TCP ports that are free on ``host`` right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _healthy(host: str, port: int, timeout: float) -> bool:
    # http.client, not urllib: no proxy environment variables apply to a loopback probe.
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()
    if response.status != 200:
        return False
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("health") in ("true", True)


class EtcdServer:
    """One private etcd member; see the module documentation.

        ``host`` is the address etcd listens on (client and peer), ``127.0.0.1`` by default;
        ports are picked free unless given. ``workdir`` defaults to a new temporary directory
        (removed by :meth:`close`); a given one is kept. ``max_txn_ops`` raises etcd's limit
        of compares/writes per transaction above etcd's default of 128: an EtcdStore transaction
    compares every key it read, so listing a large prefix needs more (``None``: etcd's default).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        client_port: int | None = None,
        peer_port: int | None = None,
        workdir: str | os.PathLike[str] | None = None,
        netns: str | None = None,
        name: str | None = None,
        binary: str = ETCD_BINARY,
        max_txn_ops: int | None = 8192,
        startup_timeout: float = 30.0,
        die_with_parent: bool = True,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.host = host
        self.netns = netns
        self.name = name or f"ciliate-{secrets.token_hex(4)}"
        self.binary = binary
        self.max_txn_ops = max_txn_ops
        self.startup_timeout = startup_timeout
        self.die_with_parent = die_with_parent
        self.extra_args = tuple(extra_args)
        self._fixed_ports = client_port is not None and peer_port is not None
        self._client_port = client_port
        self._peer_port = peer_port
        self._own_workdir = workdir is None
        self._workdir = Path(workdir) if workdir is not None else None
        self._child: ChildProcess | None = None
        self._closed = False

    # -- properties ----------------------------------------------------------------------

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="ciliate-etcd-"))
        return self._workdir

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def log_path(self) -> Path:
        return self.workdir / "etcd.log"

    @property
    def client_port(self) -> int:
        if self._client_port is None:
            raise EtcdServerError("etcd has not been started yet: no client port")
        return self._client_port

    @property
    def peer_port(self) -> int:
        if self._peer_port is None:
            raise EtcdServerError("etcd has not been started yet: no peer port")
        return self._peer_port

    @property
    def endpoint(self) -> str:
        """The client URL, ``http://127.0.0.1:<port>``: what EtcdStore takes."""
        return _url(self.host, self.client_port)

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    @property
    def running(self) -> bool:
        return self._child is not None and self._child.running

    def __repr__(self) -> str:
        where = f" in netns {self.netns}" if self.netns else ""
        port = self._client_port if self._client_port is not None else "?"
        return f"EtcdServer({self.name}, {self.host}:{port}{where}, pid={self.pid})"

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> EtcdServer:
        if not self.running:
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
        """Start etcd (again, on the same data directory and ports) and wait until healthy."""
        if self._closed:
            raise EtcdServerError(f"{self!r} was closed")
        if self.running:
            raise EtcdServerError(f"{self!r} is already running")
        if not etcd_available(self.binary):
            raise EtcdServerError(
                f"{self.binary} is missing; install Debian's etcd-server (apt-get install "
                "etcd-server)"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        attempts = 1 if self._fixed_ports else 3
        for attempt in range(attempts):
            if self._client_port is None or self._peer_port is None:
                self._client_port, self._peer_port = _in_netns(
                    self.netns, lambda: _free_ports(self.host, 2)
                )
            try:
                self._spawn_and_wait()
                return
            except EtcdServerError as exc:
                # Free ports can be taken between probing and etcd's bind; pick new ones
                # (only on a first start: a restart must keep the URLs clients know).
                first_start = not self.data_dir.joinpath("member").exists()
                retry = "address already in use" in str(exc) and attempt + 1 < attempts
                if retry and first_start:
                    self._client_port = self._peer_port = None
                    continue
                raise

    def _command(self) -> list[str]:
        peer = _url(self.host, self.peer_port)
        client = _url(self.host, self.client_port)
        cmd = [
            self.binary,
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"{self.name}={peer}",
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            self.name,
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
        ]
        if self.max_txn_ops is not None:
            cmd += ["--max-txn-ops", str(self.max_txn_ops)]
        cmd += self.extra_args
        return cmd

    def _spawn_and_wait(self) -> None:
        # etcd reads ETCD_* variables as flags; none of the caller's may leak in, and no
        # proxy settings matter to it either.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("ETCD_") and "proxy" not in k.lower()
        }
        child = ChildProcess(
            name="etcd",
            argv=self._command(),
            log_path=self.log_path,
            netns=self.netns,
            env=env,
            die_with_parent=self.die_with_parent,
        )
        child.start()
        self._child = child
        with _live_lock:
            _live.add(self)
        host, port = self.host, self.client_port
        try:
            child.wait_until(
                lambda: _in_netns(self.netns, lambda: _healthy(host, port, 1.0)),
                timeout=self.startup_timeout,
                what=f"become healthy (log {self.log_path})",
                error=EtcdServerError,
            )
        except EtcdServerError:
            self._forget()
            raise

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM etcd and wait for it (SIGKILL after ``timeout``). Keeps the data."""
        if self._child is not None:
            self._child.stop(timeout=timeout)
        self._forget()

    def kill(self) -> None:
        """SIGKILL etcd (a crash); the data directory stays, so :meth:`start` recovers."""
        if self._child is not None:
            self._child.kill()
        self._forget()

    def close(self) -> None:
        """Stop etcd and remove the work directory if this object created it."""
        if self._closed:
            return
        self.stop()
        self._closed = True
        if self._own_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def _forget(self) -> None:
        self._child = None
        with _live_lock:
            _live.discard(self)


@atexit.register
def _kill_leftovers() -> None:
    with _live_lock:
        servers = list(_live)
    for server in servers:
        with contextlib.suppress(Exception):
            server.kill()
