"""The agent's service loop: Services and EndpointSlices into the datapath's load
balancer.

One pass (:meth:`ServiceController.sync`):

1. on a lone node, the agent is the EndpointSlice controller: the slices of every
   Service with a selector follow the Pod objects it selects and this node's
   endpoints (:func:`ciliate.control.services.slices.reconcile`); in a cluster the
   operator does it, from the endpoints every agent publishes;
2. the node's service table (:func:`ciliate.control.services.node.compute`): a
   frontend per ClusterIP, NodePort on the node's addresses, external IP and
   LoadBalancer address, each with its backends (active or terminating), affinity
   and traffic policy, numbered with ids kept in the node's store;
3. every frontend whose service changed is written into the maps
   (``Datapath.lb.upsert_service``: a program sees the whole old or the whole new
   service), frontends gone are deleted. A service with no backend that can take a
   new flow is written with none, and the datapath refuses at once.

It runs on the same loop shape as the policy loop (:mod:`ciliate.control.revision_loop`).
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ciliate.control.objects import ObjectStore
from ciliate.control.revision_loop import RevisionLoop
from ciliate.control.services import node as node_services
from ciliate.control.services import slices, table
from ciliate.control.services.ids import LbIds
from ciliate.control.store import Store
from ciliate.datapath import lb
from ciliate.datapath.programs import Datapath

log = logging.getLogger(__name__)

_PROTOCOLS = {"TCP": lb.L4Protocol.TCP, "UDP": lb.L4Protocol.UDP}
_STATES = {
    table.BackendState.ACTIVE: lb.BackendState.ACTIVE,
    table.BackendState.TERMINATING: lb.BackendState.TERMINATING,
}


@dataclass
class ServiceSyncResult:
    written: list[str] = field(default_factory=list)  # frontends given a new service
    deleted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # frontends the datapath cannot serve
    slices_changed: bool = False


class ServiceController:
    def __init__(
        self,
        *,
        objects: ObjectStore,
        node_store: Store,
        revision: Callable[[], object],
        datapath: Datapath,
        node_name: str,
        node_ips: Sequence[ipaddress.IPv4Address],
        local_endpoints: Callable[[], Iterable[tuple[str | None, str]]] | None,
        poll_interval: float = 0.1,
        resync_interval: float = 10.0,
    ) -> None:
        """``local_endpoints`` (``(namespace/name, ip)`` of this node's pods) makes
        this agent the EndpointSlice controller: a lone node; None in a cluster."""
        self._objects = objects
        self._ids = LbIds(node_store)
        self._dp = datapath
        self._node_name = node_name
        self._node_ips = list(node_ips)
        self._local_endpoints = local_endpoints
        self._written: dict[lb.Frontend, lb.Service] = {
            service.frontend: service for service in datapath.lb.list()
        }
        self._last: node_services.NodeServices | None = None
        self._lock = threading.Lock()
        # Started, woken, asked for its status and closed by the agent.
        self.loop = RevisionLoop(
            name="services",
            revision=revision,
            run_pass=self._pass,
            poll_interval=poll_interval,
            resync_interval=resync_interval,
        )

    def sync(self) -> ServiceSyncResult:
        with self._lock:
            result = ServiceSyncResult()
            if self._local_endpoints is not None:
                addresses = node_services.local_addresses(
                    self._local_endpoints(), node_name=self._node_name
                )
                result.slices_changed = slices.reconcile(self._objects, addresses=addresses).changed
            computed = node_services.compute(
                self._objects, self._ids, node_name=self._node_name, node_ips=self._node_ips
            )
            wanted: dict[lb.Frontend, tuple[table.Frontend, int]] = {}
            for frontend in computed.frontends:
                protocol = _PROTOCOLS.get(frontend.key.protocol)
                if protocol is None:
                    result.skipped.append(str(frontend.key))
                    continue
                key = lb.Frontend(frontend.key.ip, frontend.key.port, protocol)
                wanted[key] = (frontend, computed.ids.frontend[frontend.key])
            for key, (frontend, service_id) in wanted.items():
                backends = [
                    lb.Backend(
                        id=computed.ids.backend[b.key],
                        address=b.key.ip,
                        port=b.key.port,
                        state=_STATES[b.state],
                        local=b.node == self._node_name,
                    )
                    for b in frontend.backends
                ]
                current = self._written.get(key)
                if (
                    current is not None
                    and current.service_id == service_id
                    and sorted(current.backends, key=lambda b: b.id)
                    == sorted(backends, key=lambda b: b.id)
                    and current.affinity_timeout == frontend.affinity_timeout
                    and current.external == (frontend.kind is not table.FrontendKind.CLUSTER_IP)
                ):
                    continue
                self._written[key] = self._dp.lb.upsert_service(
                    key,
                    backends,
                    service_id=service_id,
                    affinity_timeout=frontend.affinity_timeout,
                    external=frontend.kind is not table.FrontendKind.CLUSTER_IP,
                )
                result.written.append(str(key))
            for key in [k for k in self._written if k not in wanted]:
                self._dp.lb.delete_service(key)
                del self._written[key]
                result.deleted.append(str(key))
            self._last = computed
            return result

    def table(self) -> dict[str, Any]:
        """``GET /v1/services``: the last pass's frontends and backends, with ids."""
        last = self._last
        return last.to_json() if last is not None else {"frontends": []}

    # -- the loop ----------------------------------------------------------------------
    def _pass(self) -> None:
        result = self.sync()
        if result.written or result.deleted:
            log.info(
                "services: %d frontend(s) written, %d deleted%s",
                len(result.written),
                len(result.deleted),
                f"; not served (protocol): {', '.join(result.skipped)}" if result.skipped else "",
            )
