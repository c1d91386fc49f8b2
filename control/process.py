"""The daemons we start (exabgp, bird, etcd, ...): one supervised-child skeleton.

:class:`ChildProcess` runs one command as our child, optionally inside a network
namespace (``nsenter --net=...``, which execs it: the child's PID is the daemon's),
its stdout and stderr appended to a log file, in a session of its own (our
terminal's ^C is for us: the owner stops its children in order). It waits until
the daemon is ready by polling a check the caller gives, failing early, with the
log's last lines, if the daemon exits; and it stops it by its ``Popen`` handle
only (:func:`stop_child`), so nothing but our own child is ever signalled.

``die_with_parent`` asks the kernel to SIGKILL the daemon when its parent dies
(``PR_SET_PDEATHSIG``, through util-linux ``setpriv``, which execs the daemon).
Linux ties that signal to the *thread* that started the child: start such
daemons from a thread that outlives them.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
_PR_SET_PDEATHSIG = 1


class ChildError(RuntimeError):
    """A child did not start: it exited, or was not ready in time."""


def stop_child(
    proc: subprocess.Popen[Any], *, timeout: float, name: str = "", sig: int = signal.SIGTERM
) -> None:
    """Send ``sig`` and wait ``timeout`` seconds; SIGKILL if it is still there. Reaps it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning(
                "%s %d ignored %s for %s s: killing it",
                name or "child",
                proc.pid,
                signal.Signals(sig).name,
                timeout,
            )
            proc.kill()
    proc.wait()


def netns_path(netns: str) -> str:
    """A namespace given by name (under ``/run/netns``) or by path."""
    return netns if "/" in netns else str(NETNS_DIR / netns)


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class ChildProcess:
    """One daemon run as our child; see the module documentation.

    ``start()`` may be called again once the child has stopped (a restart on the
    same log); ``log_tail()`` shows what the last start wrote.
    """

    def __init__(
        self,
        *,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        netns: str | None = None,
        env: Mapping[str, str] | None = None,
        die_with_parent: bool = False,
    ) -> None:
        if not argv:
            raise ValueError(f"{name}: an empty command line")
        self.name = name
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.netns = netns
        self.env = dict(env) if env is not None else None
        self.die_with_parent = die_with_parent
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    @property
    def command(self) -> list[str]:
        """What is executed: ``setpriv`` and ``nsenter`` exec the daemon in turn."""
        return self._command()[0]

    def _command(self) -> tuple[list[str], bool]:
        """The command line, and whether the death signal is left to a preexec_fn
        (only without ``setpriv``: no fork handlers should run while other threads
        of ours may hold locks)."""
        cmd = list(self.argv)
        preexec = False
        if self.die_with_parent:
            setpriv = shutil.which("setpriv")
            if setpriv is not None:
                cmd = [setpriv, "--pdeathsig", "KILL", "--", *cmd]
            else:
                preexec = True
        if self.netns is not None:
            cmd = ["nsenter", f"--net={netns_path(self.netns)}", *cmd]
        return cmd, preexec

    @property
    def pid(self) -> int | None:
        """The daemon's PID while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def returncode(self) -> int | None:
        """The exit status once the child has ended (``None`` while it runs or before start)."""
        return self._proc.poll() if self._proc is not None else None

    def start(self) -> None:
        if self.running:
            raise ChildError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command, preexec = self._command()
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as logfile:
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
                preexec_fn=_set_pdeathsig if preexec else None,
            )

    def wait_until(
        self,
        ready: Callable[[], bool],
        *,
        timeout: float,
        what: str,
        error: type[Exception] = ChildError,
        interval: float = 0.05,
    ) -> float:
        """Poll ``ready`` until it holds; the seconds it took. Raises ``error``
        (with the log's last lines) if the child exits first or ``timeout`` passes;
        the child is then stopped."""
        proc = self._proc
        if proc is None:
            raise error(f"{self.name} was not started")
        started = time.monotonic()
        while not ready():
            if proc.poll() is not None:
                self._proc = None
                raise error(f"{self.name} exited with {proc.returncode}: {self.log_tail()}")
            if time.monotonic() - started > timeout:
                self.kill()
                raise error(f"{self.name} did not {what} within {timeout} s: {self.log_tail()}")
            time.sleep(interval)
        return time.monotonic() - started

    def stop(self, *, timeout: float, sig: int = signal.SIGTERM) -> None:
        """``sig``, then SIGKILL after ``timeout`` seconds; reaped. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_child(proc, timeout=timeout, name=self.name, sig=sig)

    def kill(self) -> None:
        """SIGKILL (a crash, as far as the daemon's peers can tell); reaped."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            proc.wait()

    def log_tail(self, lines: int = 15, *, limit: int = 4000) -> str:
        """The last lines the current (or last) start wrote to the log."""
        try:
            with open(self.log_path, "rb") as logfile:
                logfile.seek(self._log_offset)
                text = logfile.read().decode(errors="replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"
        return "\n".join(text.splitlines()[-lines:])[-limit:] or "(nothing in the log)"

    def __repr__(self) -> str:
        where = f" in {self.netns}" if self.netns else ""
        return f"ChildProcess({self.name}{where}, pid={self.pid})"
