"""Stopping a child process we started: the signal, a grace period, SIGKILL.

Only by the ``Popen`` handle, so only our own child is ever signalled."""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess

log = logging.getLogger(__name__)


def stop_child(
    proc: subprocess.Popen[bytes], *, timeout: float, name: str = "", sig: int = signal.SIGTERM
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
