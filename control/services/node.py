"""What a node's agent runs each pass, in one place: its service table from the
stored objects, numbered with the ids kept in its own store, and the answer of
``GET /v1/services`` (what ``ciliate service list --socket`` prints).

On a lone node the agent is also the EndpointSlice controller: it passes its own
endpoints to :func:`ciliate.control.services.slices.reconcile` through
:func:`local_addresses`. In a cluster the operator runs the controller with the
addresses the agents published (:func:`~.slices.pod_address_from_published`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ciliate.control.objects import KINDS, ObjectStore
from ciliate.control.services.ids import LbIds, LoadBalancerIds
from ciliate.control.services.slices import PodAddress
from ciliate.control.services.table import Frontend, frontends_json, service_table

__all__ = ["NodeServices", "compute", "local_addresses"]


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
