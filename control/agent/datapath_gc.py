"""The datapath's garbage collector: connections and uplink flows past their
lifetime leave the tables (as Cilium's conntrack GC does), every ``interval``.

The programs take a dead entry's place themselves when they need it (a way of
the conntrack's set, a flow's tuple or SNAT port), so this is housekeeping, not
correctness: ``ciliate bpf ct list`` and ``bpf lb flows`` show live state, and
the LRU tables keep their room for live flows. It runs on the controllers' loop
shape with a revision that never moves, so it passes once at start and then
every ``interval``; a failed pass is logged and retried at the next.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ciliate.control.revision_loop import RevisionLoop
from ciliate.datapath.programs import Datapath

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 30.0  # seconds; the shortest lifetime (closing TCP) is 10 s


@dataclass
class GcTotals:
    connections: int = 0  # conntrack ways freed
    flows: int = 0  # uplink LB flows freed, with their reply entries


class DatapathGC:
    def __init__(
        self,
        datapath: Datapath,
        *,
        conntrack: bool,
        services: bool,
        interval: float = DEFAULT_INTERVAL,
    ) -> None:
        self._dp = datapath
        self._conntrack = conntrack  # built with [features] policy
        self._services = services  # the uplink LB's flows are ours to free
        self.totals = GcTotals()
        self.loop = RevisionLoop(
            name="datapath-gc",
            revision=lambda: 0,
            run_pass=self._pass,
            poll_interval=min(1.0, interval),
            resync_interval=interval,
        )

    def _pass(self) -> None:
        self.collect()

    def collect(self) -> GcTotals:
        """One pass; returns what it freed."""
        freed = GcTotals()
        if self._conntrack:
            freed.connections = self._dp.conntrack.gc()
        if self._services:
            freed.flows = self._dp.lb.expire_flows()
        self.totals.connections += freed.connections
        self.totals.flows += freed.flows
        if freed.connections or freed.flows:
            log.debug(
                "datapath gc: %d connection(s), %d uplink flow(s) expired",
                freed.connections,
                freed.flows,
            )
        return freed
