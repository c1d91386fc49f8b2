"""The operator's EndpointSlice controller, for a cluster: the slices of every
Service with a selector follow the Pod objects it selects and the addresses the
agents publish for their endpoints (``cluster/endpoints/<ip>``: address, pod,
node), whichever node the pod runs on. A pass runs whenever the cluster store's
revision moves (:mod:`ciliate.control.revision_loop`) and costs what changed: the
Services, Pods and slices changed since the last pass
(:class:`~ciliate.control.services.changes.ObjectChanges`) and the pods whose
published address moved (:class:`~ciliate.control.services.changes.KeyChanges`);
only the Services those touch are recomputed
(:class:`~ciliate.control.services.slices.SliceController`). The first pass, one
after a failure and one every ``full_resync_interval`` (an hour) start over from a
full listing; every ``relist_interval`` (30 s) a pass compares every key's revision
with the one it saw (keys only), so a change the count missed is caught cheaply.
On a lone node the agent does the same with its own endpoints."""

from __future__ import annotations

import json
import logging
import threading

from ciliate.control.cluster import keys
from ciliate.control.objects import KINDS, ObjectStore
from ciliate.control.revision_loop import RevisionLoop
from ciliate.control.services import slices
from ciliate.control.services.changes import KeyChanges, ObjectChanges, ResyncSchedule
from ciliate.control.store import Store

log = logging.getLogger("ciliate.operator.endpointslices")


class EndpointSliceController:
    def __init__(
        self,
        store: Store,
        *,
        poll_interval: float = 0.1,
        relist_interval: float = 30.0,
        full_resync_interval: float = 3600.0,
    ) -> None:
        self._store = store
        self._changes = ObjectChanges(
            store, [KINDS["Service"], KINDS["Pod"], KINDS["EndpointSlice"]]
        )
        self._controller = slices.SliceController(ObjectStore(store))
        # The agents' published endpoints (``cluster/endpoints/<ip>``), followed alike.
        self._endpoint_changes = KeyChanges(store, [keys.ENDPOINTS])
        self._published: dict[str, tuple[str, slices.PodAddress]] = {}
        self._schedule = ResyncSchedule(
            relist_interval=relist_interval, full_interval=full_resync_interval
        )
        self._lock = threading.Lock()
        self._loop = RevisionLoop(
            name="endpointslices",
            revision=store.revision,
            run_pass=self._pass,
            poll_interval=poll_interval,
        )

    def _follow_addresses(self) -> tuple[dict[str, slices.PodAddress], set[str] | None]:
        """``namespace/name`` -> address and node, of every published endpoint, and
        the pods whose address moved since the last pass (None: all may have); the
        documents are decoded only when written since the last pass."""
        full, written, deleted = self._endpoint_changes.poll_raw()
        if full:
            self._published = {}
        moved: set[str] = set()
        for key in deleted[keys.ENDPOINTS]:
            gone = self._published.pop(key, None)
            if gone is not None:
                moved.add(gone[0])
        for key, raw in written[keys.ENDPOINTS].items():
            published = slices.pod_address_from_published(
                key.removeprefix(keys.ENDPOINTS), json.loads(raw)
            )
            before = self._published.pop(key, None)
            if before is not None:
                moved.add(before[0])
            if published is not None:
                self._published[key] = published
                moved.add(published[0])
        return dict(self._published.values()), None if full else moved

    def resync(self) -> None:
        """The next pass starts over from a full listing."""
        self._changes.reset()

    def sync(self) -> slices.ReconcileResult:
        with self._lock:
            self._schedule.before_poll(self._changes, self._endpoint_changes)
            try:
                changes = self._changes.poll()
                if changes.full:
                    self._schedule.started_over()
                    self._endpoint_changes.reset()
                addresses, moved = self._follow_addresses()
                result = self._controller.sync(changes, addresses=addresses, moved=moved)
                self._changes.forget(result.removed)
            except Exception:
                # The next pass starts over.
                self._changes.reset()
                self._endpoint_changes.reset()
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
