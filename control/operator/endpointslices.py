"""The operator's EndpointSlice controller, for a cluster: the slices of every
Service with a selector follow the Pod objects it selects and the addresses the
agents publish for their endpoints (``cluster/endpoints/<ip>``: address, pod,
node), whichever node the pod runs on. A pass runs whenever the cluster store's
revision moves (:mod:`ciliate.control.revision_loop`) and costs what changed: the
Services, Pods and slices changed since the last pass
(:class:`~ciliate.control.services.changes.ObjectChanges`) and the pods whose
published address moved; only the Services those touch are recomputed
(:class:`~ciliate.control.services.slices.SliceController`). The first pass, one
after a failure and one every ``full_resync_interval`` start over from a full
listing. On a lone node the agent does the same with its own endpoints."""

from __future__ import annotations

import json
import logging
import threading
import time

from ciliate.control.cluster import keys
from ciliate.control.objects import KINDS, ObjectStore
from ciliate.control.revision_loop import RevisionLoop
from ciliate.control.services import slices
from ciliate.control.services.changes import ObjectChanges
from ciliate.control.store import Store

log = logging.getLogger("ciliate.operator.endpointslices")


class EndpointSliceController:
    def __init__(
        self, store: Store, *, poll_interval: float = 0.1, full_resync_interval: float = 300.0
    ) -> None:
        self._store = store
        self._changes = ObjectChanges(
            store, [KINDS["Service"], KINDS["Pod"], KINDS["EndpointSlice"]]
        )
        self._controller = slices.SliceController(ObjectStore(store))
        self._full_resync_interval = full_resync_interval
        self._last_full = time.monotonic()
        self._lock = threading.Lock()
        self._loop = RevisionLoop(
            name="endpointslices",
            revision=store.revision,
            run_pass=self._pass,
            poll_interval=poll_interval,
        )

    def addresses(self) -> dict[str, slices.PodAddress]:
        """``namespace/name`` -> address and node, of every published endpoint."""
        found = {}
        for key, raw in self._store.list(keys.ENDPOINTS):
            published = slices.pod_address_from_published(
                key.removeprefix(keys.ENDPOINTS), json.loads(raw)
            )
            if published is not None:
                found[published[0]] = published[1]
        return found

    def resync(self) -> None:
        """The next pass starts over from a full listing."""
        self._changes.reset()

    def sync(self) -> slices.ReconcileResult:
        with self._lock:
            if time.monotonic() - self._last_full >= self._full_resync_interval:
                self._changes.reset()
            try:
                changes = self._changes.poll()
                if changes.full:
                    self._last_full = time.monotonic()
                result = self._controller.sync(changes, addresses=self.addresses())
                self._changes.forget(result.removed)
            except Exception:
                self._changes.reset()  # the next pass starts over
                raise
        if result.changed:
            log.info(
                "endpointslices: %d created, %d updated, %d deleted",
                len(result.created),
                len(result.updated),
                len(result.deleted),
            )
        return result

    def _pass(self) -> None:
        self.sync()

    def start(self) -> None:
        self._loop.start()

    def close(self) -> None:
        self._loop.close()
