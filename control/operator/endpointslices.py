"""The operator's EndpointSlice controller, for a cluster: the slices of every
Service with a selector follow the Pod objects it selects and the addresses the
agents publish for their endpoints (``cluster/endpoints/<ip>``: address, pod,
node), whichever node the pod runs on. A pass runs whenever the cluster store's
revision moves (:mod:`ciliate.control.revision_loop`); the work is
:func:`ciliate.control.services.slices.reconcile`. On a lone node the agent does
the same with its own endpoints."""

from __future__ import annotations

import json
import logging

from ciliate.control.cluster import keys
from ciliate.control.objects import ObjectStore
from ciliate.control.revision_loop import RevisionLoop
from ciliate.control.services import slices
from ciliate.control.store import Store

log = logging.getLogger("ciliate.operator.endpointslices")


class EndpointSliceController:
    def __init__(self, store: Store, *, poll_interval: float = 0.1) -> None:
        self._store = store
        self._objects = ObjectStore(store)
        self._loop = RevisionLoop(
            name="endpointslices",
            revision=store.revision,
            run_pass=self.sync,
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

    def sync(self) -> None:
        result = slices.reconcile(self._objects, addresses=self.addresses())
        if result.changed:
            log.info(
                "endpointslices: %d created, %d updated, %d deleted",
                len(result.created),
                len(result.updated),
                len(result.deleted),
            )

    def start(self) -> None:
        self._loop.start()

    def close(self) -> None:
        self._loop.close()
