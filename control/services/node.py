"""What a node's agent runs each pass, in one place: its service table from the
stored objects, numbered with the ids kept in its own store, and the answer of
``GET /v1/services`` (what ``ciliate service list --socket`` prints).

:class:`NodeTable` keeps the table between passes and recomputes only the Services
whose Service object or EndpointSlices changed (:class:`~.changes.Changes`); the
pure :func:`compute` builds the whole table at once (the CLI, the tests).

On a lone node the agent is also the EndpointSlice controller: it passes its own
endpoints to :class:`ciliate.control.services.slices.SliceController` through
:func:`local_addresses`. In a cluster the operator runs the controller with the
addresses the agents published (:func:`~.slices.pod_address_from_published`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ciliate.control.objects import KINDS, ObjectStore, parse_key
from ciliate.control.services.changes import Changes
from ciliate.control.services.ids import LbIds, LoadBalancerIds
from ciliate.control.services.slices import PodAddress, without_server_fields
from ciliate.control.services.table import (
    BackendKey,
    Frontend,
    FrontendKey,
    frontends_json,
    service_frontends,
    service_table,
    slice_service,
)

__all__ = ["NodeServices", "NodeTable", "TableDelta", "compute", "local_addresses"]


@dataclass(frozen=True)
class NodeServices:
    frontends: list[Frontend]
    ids: LoadBalancerIds

    def to_json(self) -> dict[str, Any]:
        """The body of ``GET /v1/services``."""
        return {
            "frontends": frontends_json(
                self.frontends, frontend_ids=self.ids.frontend, backend_ids=self.ids.backend
            )
        }


def compute(
    objects: ObjectStore,
    ids: LbIds,
    *,
    node_name: str,
    node_ips: Sequence[ipaddress.IPv4Address],
) -> NodeServices:
    """The node's table from the Services and EndpointSlices in ``objects``, with
    ids from (and kept in) ``ids``."""
    frontends = service_table(
        services=objects.list(KINDS["Service"]),
        slices=objects.list(KINDS["EndpointSlice"]),
        node_name=node_name,
        node_ips=node_ips,
    )
    return NodeServices(frontends=frontends, ids=ids.sync(frontends))


def local_addresses(
    endpoints: Iterable[tuple[str | None, str]], *, node_name: str
) -> dict[str, PodAddress]:
    """The node's own endpoints as the controller reads them: ``(namespace/name or
    None, ip)`` pairs (endpoints of runtimes that gave no pod name are skipped)."""
    return {pod: PodAddress(ipaddress.IPv4Address(ip), node_name) for pod, ip in endpoints if pod}


@dataclass
class TableDelta:
    """What one :meth:`NodeTable.update` changed."""

    full: bool  # the table was rebuilt: compare everything
    changed: dict[FrontendKey, Frontend | None] = field(default_factory=dict)  # None: gone
    new_backends: set[BackendKey] = field(default_factory=set)  # first frontend to use them
    released_backends: set[BackendKey] = field(default_factory=set)  # last user gone
    services_recomputed: int = 0


def _ref_of_key(key: str) -> str:
    parsed = parse_key(key)
    if parsed is None or parsed.namespace is None:
        raise ValueError(f"{key!r} is not the key of a namespaced object")
    return f"{parsed.namespace}/{parsed.name}"


def _backends_of(frontend: Frontend | None) -> set[BackendKey]:
    if frontend is None:
        return set()
    return {b.key for b in (*frontend.backends, *(frontend.internal_backends or ()))}


class NodeTable:
    """The node's service table between passes: each Service's frontends, which
    Service holds each frontend key (two may claim one external address: the first
    in ``namespace/name`` order keeps it, as :func:`service_table` decides), and how
    many frontends use each backend (its id is freed with the last)."""

    def __init__(self, *, node_name: str, node_ips: Sequence[ipaddress.IPv4Address]) -> None:
        self._node_name = node_name
        self._node_ips = list(node_ips)
        self._clear()

    def _clear(self) -> None:
        self._services: dict[str, Mapping[str, Any]] = {}
        # Frontends of other owners than Services (pods' hostPorts, .hostports),
        # by owner ref; they claim keys as Services do.
        self._extra: dict[str, tuple[Frontend, ...]] = {}
        self._slices: dict[str, Mapping[str, Any]] = {}  # store key -> slice
        self._slices_of: dict[str, set[str]] = {}  # service ref -> slice keys
        self._frontends_of: dict[str, list[Frontend]] = {}
        self._claims: dict[FrontendKey, dict[str, Frontend]] = {}
        self._winners: dict[FrontendKey, Frontend] = {}
        self._backend_users: dict[BackendKey, int] = {}
        self._users_before: dict[BackendKey, int] = {}  # during an update

    def frontends(self) -> list[Frontend]:
        return [self._winners[key] for key in sorted(self._winners)]

    def get(self, key: FrontendKey) -> Frontend | None:
        return self._winners.get(key)

    def update(
        self,
        changes: Changes,
        *,
        written: Mapping[str, Mapping[str, Any]] | None = None,
        removed: Iterable[str] = (),
        extra: Mapping[str, Sequence[Frontend]] | None = None,
    ) -> TableDelta:
        """Take the changes of Services and EndpointSlices (plus slices this pass
        wrote or removed itself, by store key) and recompute the Services they touch.
        ``extra``: every frontend of other owners (hostPorts), by owner ref (sorting
        after the Services it should yield to); None leaves them as they are."""
        delta = TableDelta(full=changes.full)
        previous: dict[FrontendKey, Frontend] = {}
        if changes.full:
            previous = self._winners
            self._clear()
        dirty: set[str] = set()
        for key in changes.gone("Service"):
            ref = _ref_of_key(key)
            self._services.pop(ref, None)
            dirty.add(ref)
        for service in changes.of("Service").values():
            meta = service["metadata"]
            ref = f"{meta['namespace']}/{meta['name']}"
            self._services[ref] = service
            dirty.add(ref)
        slice_changes: dict[str, Mapping[str, Any] | None] = {
            key: None for key in (*changes.gone("EndpointSlice"), *removed)
        }
        slice_changes.update(changes.of("EndpointSlice"))
        slice_changes.update(written or {})
        for key, slice_ in slice_changes.items():
            old = self._slices.get(key)
            if (
                slice_ is not None
                and old is not None
                and without_server_fields(old) == without_server_fields(slice_)
            ):
                self._slices[key] = slice_  # a slice this pass wrote, back from the store
                continue
            for owner in {self._set_slice(key, slice_), slice_service(slice_) if slice_ else None}:
                if owner is not None:
                    dirty.add(owner)
        if extra is not None:
            for ref in set(self._extra) | set(extra):
                wanted = tuple(extra.get(ref, ()))
                if self._extra.get(ref, ()) != wanted:
                    if wanted:
                        self._extra[ref] = wanted
                    else:
                        self._extra.pop(ref, None)
                    dirty.add(ref)
        delta.services_recomputed = len(dirty)
        self._users_before = {}
        for ref in sorted(dirty):
            self._recompute(ref, delta)
        self._backend_changes(delta)
        if changes.full:
            for frontend_key in previous.keys() - self._winners.keys():
                delta.changed[frontend_key] = None
            delta.released_backends = {
                b for f in previous.values() for b in _backends_of(f)
            } - self._backend_users.keys()
        return delta

    def _set_slice(self, key: str, slice_: Mapping[str, Any] | None) -> str | None:
        """Keep or forget a slice; the Service it belonged to before."""
        old = self._slices.pop(key, None)
        owner = slice_service(old) if old is not None else None
        if owner is not None:
            keys = self._slices_of.get(owner, set())
            keys.discard(key)
            if not keys:
                self._slices_of.pop(owner, None)
        if slice_ is not None:
            self._slices[key] = slice_
            new_owner = slice_service(slice_)
            if new_owner is not None:
                self._slices_of.setdefault(new_owner, set()).add(key)
        return owner

    def _recompute(self, ref: str, delta: TableDelta) -> None:
        service = self._services.get(ref)
        new = (
            service_frontends(
                service,
                [self._slices[k] for k in sorted(self._slices_of.get(ref, ()))],
                node_name=self._node_name,
                node_ips=self._node_ips,
            )
            if service is not None
            else list(self._extra.get(ref, ()))
        )
        old = self._frontends_of.pop(ref, [])
        if new:
            self._frontends_of[ref] = new
        keys: set[FrontendKey] = set()
        for frontend in old:
            claims = self._claims.get(frontend.key, {})
            claims.pop(ref, None)
            keys.add(frontend.key)
        for frontend in new:
            # One Service lists a frontend key once per port; a repeat keeps the first.
            self._claims.setdefault(frontend.key, {}).setdefault(ref, frontend)
            keys.add(frontend.key)
        for key in keys:
            claims = self._claims.get(key, {})
            winner = claims[min(claims)] if claims else None
            if not claims:
                self._claims.pop(key, None)
            before = self._winners.get(key)
            if winner == before:
                continue
            self._count_backends(before, -1, delta)
            self._count_backends(winner, +1, delta)
            if winner is None:
                self._winners.pop(key, None)
            else:
                self._winners[key] = winner
            delta.changed[key] = winner

    def _count_backends(self, frontend: Frontend | None, step: int, delta: TableDelta) -> None:
        for backend in _backends_of(frontend):
            users = self._backend_users.get(backend, 0)
            self._users_before.setdefault(backend, users)
            if users + step > 0:
                self._backend_users[backend] = users + step
            else:
                self._backend_users.pop(backend, None)

    def _backend_changes(self, delta: TableDelta) -> None:
        """Backends used now and not before the update, and the reverse."""
        for backend, before in self._users_before.items():
            now = self._backend_users.get(backend, 0)
            if now and not before:
                delta.new_backends.add(backend)
            elif before and not now:
                delta.released_backends.add(backend)
        self._users_before = {}
