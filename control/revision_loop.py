"""One background loop shape for the controllers (the agent's policy and services,
the operator's EndpointSlices): a pass whenever the stores' revision moves
(checked every ``poll_interval``), when woken (a change made through this
process), and every ``resync_interval``
regardless, so a missed change cannot stick. A failed pass is logged and
retried; the revision seen is the one from before the pass, so a change made
during it (by the pass itself, or by anyone) makes the next tick run another.
A pass that did all it could and reports the rest (:class:`PassIncomplete`:
an object too big for a map) is not retried at every tick, where it would
fail alike, but at the next change or resync; its error stays in the status
until a pass succeeds."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class PassIncomplete(Exception):
    """Raised by a pass that wrote what it could: retried at the next change or
    resync, not at every tick."""


class RevisionLoop:
    def __init__(
        self,
        *,
        name: str,
        revision: Callable[[], object],
        run_pass: Callable[[], None],
        poll_interval: float = 0.1,
        resync_interval: float = 10.0,
    ) -> None:
        self._name = name
        self._revision = revision
        self._run_pass = run_pass
        self._poll = poll_interval
        self._resync = resync_interval
        self._seen: object = None
        self._passes = 0
        self._last_error: str | None = None
        self._last_pass_s = 0.0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Something changed here: pass now, not at the next poll."""
        self._wake.set()

    def status(self) -> dict[str, Any]:
        """Whether the last pass saw the current revision (``pending`` False)."""
        try:
            pending = self._revision() != self._seen
        except Exception as exc:  # the store is down
            return {"pending": None, "error": str(exc), "passes": self._passes}
        return {
            "pending": pending,
            "passes": self._passes,
            "last_pass_ms": round(self._last_pass_s * 1000, 1),
            "last_error": self._last_error,
        }

    def _run(self) -> None:
        since_resync = 0.0
        while not self._stop.is_set():
            woken = self._wake.wait(self._poll)
            self._wake.clear()
            if self._stop.is_set():
                return
            since_resync += self._poll
            try:
                revision = self._revision()
            except Exception:  # the store may be down: keep what is in force
                log.debug("%s: store revision unavailable", self._name, exc_info=True)
                continue
            if not woken and revision == self._seen and since_resync < self._resync:
                continue
            started = time.perf_counter()
            self._passes += 1
            try:
                self._run_pass()
            except PassIncomplete as exc:
                self._last_error = f"{type(exc).__name__}: {exc}"
                log.warning("%s: pass incomplete: %s", self._name, exc)
                self._seen, since_resync = revision, 0.0
                self._last_pass_s = time.perf_counter() - started
                continue
            except Exception as exc:
                self._last_error = f"{type(exc).__name__}: {exc}"
                log.exception("%s: pass failed; retrying", self._name)
                continue
            self._seen, since_resync, self._last_error = revision, 0.0, None
            self._last_pass_s = time.perf_counter() - started

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
