"""The agent's service loop: Services and EndpointSlices into the datapath's load
balancer, at the cost of what changed since the last pass.

One pass (:meth:`ServiceController.sync`):

1. what changed among Services, Pods and EndpointSlices since the last pass
   (:class:`ciliate.control.services.changes.ObjectChanges`: keys and revisions
   listed, values read only where the revision moved);
2. on a lone node, the agent is the EndpointSlice controller: the slices of the
   Services those changes touch follow the Pod objects they select and this node's
   endpoints (:class:`ciliate.control.services.slices.SliceController`); in a
   cluster the operator does it, from the endpoints every agent publishes;
3. the node's service table (:class:`ciliate.control.services.node.NodeTable`):
   the frontends of the Services whose object or slices changed are recomputed (a
   frontend per ClusterIP, NodePort on the node's addresses, external IP and
   LoadBalancer address, each with its backends, affinity and traffic policy),
   and the hostPorts of this node's pods (one frontend per mapping and address,
   the pod its one backend: :mod:`ciliate.control.services.hostports`);
   ids for new frontends and backends are taken from (and kept in) the node's store;
4. each frontend that changed is written into the maps
   (``Datapath.lb.upsert_service``: a program sees the whole old or the whole new
   service), frontends gone are deleted. A service with no backend that can take a
   new flow is written with none, and the datapath refuses at once.

The first pass, a pass after a failed one, and one every ``full_resync_interval``
(an hour) start over from a full listing and compare everything with the maps, so
a change missed or a map entry lost is put right (at 10,000 Services that pass
takes seconds); every ``relist_interval`` (30 s) a pass compares every key's
revision with the one it saw (keys only, a few ms), so a change the feed's count
missed is caught cheaply. It runs on the same loop shape as the
policy loop (:mod:`ciliate.control.revision_loop`).
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ciliate.control.objects import KINDS, ObjectStore
from ciliate.control.revision_loop import RevisionLoop
from ciliate.control.services import node as node_services
from ciliate.control.services import slices, table
from ciliate.control.services.changes import ObjectChanges, ResyncSchedule
from ciliate.control.services.ids import LbIds
from ciliate.control.store import Store
from ciliate.datapath import lb
from ciliate.datapath.programs import Datapath
from ciliate.loader import LoaderError, MapError

log = logging.getLogger(__name__)

_PROTOCOLS = {"TCP": lb.L4Protocol.TCP, "UDP": lb.L4Protocol.UDP}
_STATES = {
    table.BackendState.ACTIVE: lb.BackendState.ACTIVE,
    table.BackendState.TERMINATING: lb.BackendState.TERMINATING,
}
_KINDS = [KINDS["Service"], KINDS["Pod"], KINDS["EndpointSlice"]]


@dataclass
class ServiceSyncResult:
    written: list[str] = field(default_factory=list)  # frontends given a new service
    deleted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # frontends the datapath cannot serve
    slices_changed: bool = False
    full: bool = False  # started over from a full listing
    services_recomputed: int = 0  # Services whose frontends were recomputed


class ServiceController:
    def __init__(
        self,
        *,
        objects_store: Store,
        node_store: Store,
        revision: Callable[[], object],
        datapath: Datapath,
        node_name: str,
        node_ips: Sequence[ipaddress.IPv4Address],
        local_endpoints: Callable[[], Iterable[tuple[str | None, str]]] | None,
        host_ports: Callable[[], Mapping[str, Sequence[table.Frontend]]] | None = None,
        pod_netns: Callable[[], Iterable[str]] | None = None,
        poll_interval: float = 0.1,
        resync_interval: float = 10.0,
        relist_interval: float = 30.0,
        full_resync_interval: float = 3600.0,
    ) -> None:
        """``local_endpoints`` (``(namespace/name, ip)`` of this node's pods) makes
        this agent the EndpointSlice controller: a lone node; None in a cluster.
        ``objects_store`` holds the objects (etcd in a cluster), ``node_store`` the
        node's own state (the ids). ``host_ports``: this node's pods' hostPort
        frontends by owner (:mod:`ciliate.control.services.hostports`), read each pass.
        ``pod_netns``: the network namespace paths of this node's pods, where
        connected UDP sockets to a removed backend are looked for (with the
        agent's own, the node's)."""
        self._pod_netns = pod_netns
        self._ids = LbIds(node_store)
        self._dp = datapath
        self._node_name = node_name
        self._local_endpoints = local_endpoints
        self._host_ports = host_ports
        self._changes = ObjectChanges(objects_store, _KINDS)
        self._slices = (
            slices.SliceController(ObjectStore(objects_store))
            if local_endpoints is not None
            else None
        )
        self._table = node_services.NodeTable(node_name=node_name, node_ips=node_ips)
        self._written: dict[lb.Frontend, lb.Service] = {
            service.frontend: service for service in datapath.lb.list()
        }
        # Frontends the maps refused (full, too many backends), with why: kept out
        # of every pass's failure, retried when a pass frees entries or every
        # ``resync_interval``, and reported by status().
        self._unwritten: dict[lb.Frontend, tuple[table.Frontend, str]] = {}
        self._retry_interval = resync_interval
        self._last_retry = time.monotonic()
        self._schedule = ResyncSchedule(
            relist_interval=relist_interval, full_interval=full_resync_interval
        )
        self._lock = threading.Lock()
        # Started, woken, asked for its status and closed by the agent.
        self.loop = RevisionLoop(
            name="services",
            revision=revision,
            run_pass=self._pass,
            poll_interval=poll_interval,
            resync_interval=resync_interval,
        )

    def resync(self) -> None:
        """The next pass starts over from a full listing."""
        self._changes.reset()

    def sync(self) -> ServiceSyncResult:
        with self._lock:
            self._schedule.before_poll(self._changes)
            try:
                return self._sync()
            except Exception:
                # Whatever this pass had read or half written, the next starts over.
                self._changes.reset()
                self._ids.forget()
                raise

    def _sync(self) -> ServiceSyncResult:
        changes = self._changes.poll()
        result = ServiceSyncResult(full=changes.full)
        if changes.full:
            self._schedule.started_over()
        written: dict[str, dict[str, Any]] = {}
        removed: set[str] = set()
        if self._slices is not None and self._local_endpoints is not None:
            addresses = node_services.local_addresses(
                self._local_endpoints(), node_name=self._node_name
            )
            reconciled = self._slices.sync(changes, addresses=addresses)
            result.slices_changed = reconciled.changed
            # Its own writes go into the table now, not a pass later.
            written, removed = reconciled.written, reconciled.removed
            self._changes.forget(removed)
        delta = self._table.update(
            changes,
            written=written,
            removed=removed,
            extra=self._host_ports() if self._host_ports is not None else None,
        )
        result.services_recomputed = delta.services_recomputed
        if delta.full:
            self._ids.sync(self._table.frontends())
        else:
            self._ids.update(
                frontends=[k for k, f in delta.changed.items() if f is not None],
                backends=delta.new_backends,
                released_frontends=[k for k, f in delta.changed.items() if f is None],
                released_backends=delta.released_backends,
            )
        self._write(delta, result)
        return result

    def _write(self, delta: node_services.TableDelta, result: ServiceSyncResult) -> None:
        wanted: dict[lb.Frontend, table.Frontend | None] = {}
        for table_key, frontend in delta.changed.items():
            protocol = _PROTOCOLS.get(table_key.protocol)
            if protocol is None:
                if frontend is not None:
                    result.skipped.append(str(table_key))
                continue
            wanted[lb.Frontend(table_key.ip, table_key.port, protocol)] = frontend
        if delta.full:
            # Compared with what the datapath holds now, not with what this loop
            # last wrote: a service removed or rewritten behind its back is put right.
            self._written = {service.frontend: service for service in self._dp.lb.list()}
            wanted.update({k: None for k in self._written if k not in wanted})
        # The backends of the UDP frontends about to change: those no frontend
        # keeps after the writes are removed, and sockets connected to them go.
        leaving = {
            b
            for key in wanted
            if key.protocol is lb.L4Protocol.UDP and (old := self._written.get(key)) is not None
            for b in (*old.backends, *(old.internal_backends or ()))
        }
        # Deletions first: the entries they free may take what did not fit before.
        for key in [k for k, f in wanted.items() if f is None]:
            self._unwritten.pop(key, None)
            if self._written.pop(key, None) is not None:
                self._dp.lb.delete_service(key)
                result.deleted.append(str(key))
        now = time.monotonic()
        if self._unwritten and (result.deleted or now - self._last_retry >= self._retry_interval):
            self._last_retry = now
            for key, (frontend, _) in self._unwritten.items():
                wanted.setdefault(key, frontend)
        for key, frontend in wanted.items():
            if frontend is None:
                continue
            try:
                self._upsert(key, frontend, result)
            except (MapError, ValueError) as exc:
                # This frontend alone stays out (or keeps what the maps hold);
                # the others are written, and the next pass does not start over.
                self._unwritten[key] = (frontend, str(exc))
                log.error("services: %s is not in the datapath: %s", key, exc)
            else:
                self._unwritten.pop(key, None)
        self._destroy_sockets_to(leaving)

    def _destroy_sockets_to(self, leaving: set[lb.Backend]) -> None:
        """Destroy the connected UDP sockets the socket LB sent to a backend that
        is no longer in the maps (as Cilium does; kube-proxy clears the conntrack
        entries of a removed UDP endpoint): the application sees ECONNABORTED and
        connects again, instead of sending into nothing. In every pod's namespace
        and the node's (a socket walk sees only its own namespace's sockets). A
        failure is logged, not the pass's: the maps are right either way."""
        removed = [b for b in leaving if not self._dp.lb.backend_in_use(b.id)]
        if not removed or not self._dp.lb.destroys_sockets:
            return
        pods = list(self._pod_netns()) if self._pod_netns is not None else []
        try:
            self._dp.lb.destroy_sockets_to(removed, netns=[None, *pods])
        except (LoaderError, MapError, OSError) as exc:
            log.error(
                "services: UDP sockets to removed backend(s) %s not destroyed: %s",
                ", ".join(sorted(map(str, removed))),
                exc,
            )

    def _upsert(
        self, key: lb.Frontend, frontend: table.Frontend, result: ServiceSyncResult
    ) -> None:
        service_id = self._ids.frontend_id(frontend.key)
        assert service_id is not None, f"{frontend.key} has no id"
        backends = self._lb_backends(frontend.backends)
        internal = (
            None
            if frontend.internal_backends is None
            else self._lb_backends(frontend.internal_backends)
        )
        external = frontend.kind is not table.FrontendKind.CLUSTER_IP
        current = self._written.get(key)
        if (
            current is not None
            and current.service_id == service_id
            and _same(current.backends, backends)
            and _same(current.internal_backends, internal)
            and current.affinity_timeout == frontend.affinity_timeout
            and current.external == external
        ):
            return
        self._written[key] = self._dp.lb.upsert_service(
            key,
            backends,
            service_id=service_id,
            affinity_timeout=frontend.affinity_timeout,
            external=external,
            internal_backends=internal,
        )
        result.written.append(str(key))

    def _lb_backends(self, backends: Iterable[table.Backend]) -> list[lb.Backend]:
        out = []
        for b in backends:
            backend_id = self._ids.backend_id(b.key)
            assert backend_id is not None, f"{b.key} has no id"
            out.append(
                lb.Backend(
                    id=backend_id,
                    address=b.key.ip,
                    port=b.key.port,
                    state=_STATES[b.state],
                    local=b.node == self._node_name,
                )
            )
        return out

    def table(self) -> dict[str, Any]:
        """``GET /v1/services``: the table as of the last pass, with ids."""
        with self._lock:
            frontends = self._table.frontends()
            return {
                "frontends": table.frontends_json(
                    frontends,
                    frontend_ids={
                        f.key: i for f in frontends if (i := self._ids.frontend_id(f.key))
                    },
                    backend_ids={
                        b.key: i
                        for f in frontends
                        for b in (*f.backends, *(f.internal_backends or ()))
                        if (i := self._ids.backend_id(b.key))
                    },
                )
            }

    def status(self) -> dict[str, Any]:
        """The loop's status, and the frontends the maps could not take."""
        status = self.loop.status()
        with self._lock:
            unwritten = {str(k): why for k, (_, why) in sorted(self._unwritten.items())}
        if unwritten:
            status["unwritten"] = unwritten
            if not status.get("last_error"):
                first = next(iter(unwritten.values()))
                status["last_error"] = f"{len(unwritten)} frontend(s) not in the datapath: {first}"
        return status

    # -- the loop ----------------------------------------------------------------------
    def _pass(self) -> None:
        result = self.sync()
        if result.written or result.deleted:
            log.info(
                "services: %d frontend(s) written, %d deleted (%d service(s) recomputed%s)%s",
                len(result.written),
                len(result.deleted),
                result.services_recomputed,
                ", full resync" if result.full else "",
                f"; not served (protocol): {', '.join(result.skipped)}" if result.skipped else "",
            )


def _same(a: Sequence[lb.Backend] | None, b: Sequence[lb.Backend] | None) -> bool:
    if a is None or b is None:
        return a is b
    return sorted(a, key=lambda x: x.id) == sorted(b, key=lambda x: x.id)
