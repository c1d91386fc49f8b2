"""The service table: from Services and EndpointSlices (and the node's name and
addresses) to the frontends a node's datapath serves and their backends, as
kube-proxy and Cilium's service manager read them.

Frontends, one per (address, port, protocol):

* ``ClusterIP``: the Service's ``clusterIP`` (none for a headless Service);
* ``NodePort``: each of the node's addresses at each ``nodePort`` (NodePort and
  LoadBalancer Services);
* ``ExternalIP``: each of ``spec.externalIPs``, at the service port;
* ``LoadBalancer``: each ``status.loadBalancer.ingress[].ip`` of a LoadBalancer
  Service, at the service port.

Backends come from the slices labelled ``kubernetes.io/service-name`` with the
Service's name in its namespace; a slice port is matched to a service port by
name and protocol, and an address listed twice (slices overlap while they are
rewritten) counts once, in its best state. Each backend is:

* ``active``: ``ready`` (a condition left out counts as true, as Kubernetes says);
* ``terminating``: not ready, but ``serving`` and ``terminating``: it keeps the
  flows it has and takes no new one, except when the frontend has no active
  backend at all, when the serving terminating ones take new flows too (kube-proxy
  and Cilium do the same, so a rolling update of the last pod loses nothing);
* left out: neither ready nor serving.

Traffic policies: ``internalTrafficPolicy: Local`` keeps only this node's backends
on the ClusterIP frontend; ``externalTrafficPolicy: Local`` does the same on the
NodePort, ExternalIP and LoadBalancer frontends. A frontend whose backends can take
no new flow (none at all, none on this node, or all terminating and none
serving) is marked ``refuses``: the datapath answers at once (TCP reset, ICMP
unreachable) instead of timing out.

Everything here is a pure function; numeric ids come from :mod:`.ids`.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ciliate.control.objects.service_validation import SERVICE_NAME_LABEL

__all__ = [
    "Backend",
    "BackendKey",
    "BackendState",
    "Frontend",
    "FrontendKey",
    "FrontendKind",
    "frontends_json",
    "service_table",
]


class FrontendKind(enum.StrEnum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    EXTERNAL_IP = "ExternalIP"
    LOAD_BALANCER = "LoadBalancer"


class BackendState(enum.StrEnum):
    ACTIVE = "active"
    TERMINATING = "terminating"


@dataclass(frozen=True, order=True)
class FrontendKey:
    """What the datapath looks a frontend up by (and numbers it by)."""

    ip: ipaddress.IPv4Address
    port: int
    protocol: str  # TCP | UDP | SCTP

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}/{self.protocol}"


@dataclass(frozen=True, order=True)
class BackendKey:
    """A backend's address, shared by every frontend that sends to it."""

    ip: ipaddress.IPv4Address
    port: int
    protocol: str

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}/{self.protocol}"


@dataclass(frozen=True)
class Backend:
    key: BackendKey
    state: BackendState
    node: str | None = None
    zone: str | None = None
    pod: str | None = None  # namespace/name, from the slice's targetRef


@dataclass(frozen=True)
class Frontend:
    key: FrontendKey
    kind: FrontendKind
    service: str  # namespace/name
    port_name: str
    backends: tuple[Backend, ...]  # sorted by address; only this node's when local_only
    affinity_timeout: int  # seconds of ClientIP affinity; 0 without affinity
    local_only: bool  # a traffic policy Local kept only this node's backends

    @property
    def new_flow_backends(self) -> tuple[Backend, ...]:
        """Those that take new flows: the active ones, or when there is none the
        serving terminating ones."""
        active = tuple(b for b in self.backends if b.state is BackendState.ACTIVE)
        return active or self.backends

    @property
    def refuses(self) -> bool:
        """No backend may take a new flow: refuse at once."""
        return not self.new_flow_backends


@functools.lru_cache(maxsize=1 << 17)
def _ipv4(text: str) -> ipaddress.IPv4Address:
    """Parsing dominates a 10,000-service table; the same addresses recur each pass."""
    return ipaddress.IPv4Address(text)


def _endpoint_state(conditions: Mapping[str, Any]) -> BackendState | None:
    ready = conditions.get("ready")
    ready = True if ready is None else bool(ready)
    if ready:
        return BackendState.ACTIVE
    serving = conditions.get("serving")
    serving = ready if serving is None else bool(serving)
    if serving and conditions.get("terminating"):
        return BackendState.TERMINATING
    return None


def _slice_backends(
    slices: Sequence[Mapping[str, Any]], *, port_name: str, protocol: str
) -> list[Backend]:
    best: dict[BackendKey, Backend] = {}
    for slice_ in slices:
        if slice_.get("addressType", "IPv4") != "IPv4":
            continue
        numbers = [
            p["port"]
            for p in slice_.get("ports") or []
            if (p.get("name") or "") == port_name
            and p.get("protocol", "TCP") == protocol
            and p.get("port")
        ]
        if not numbers:
            continue
        for endpoint in slice_.get("endpoints") or []:
            state = _endpoint_state(endpoint.get("conditions") or {})
            if state is None:
                continue
            ref = endpoint.get("targetRef") or {}
            pod = (
                f"{ref['namespace']}/{ref['name']}"
                if ref.get("name") and ref.get("namespace")
                else None
            )
            for text in endpoint.get("addresses") or []:
                key = BackendKey(_ipv4(text), numbers[0], protocol)
                backend = Backend(
                    key=key,
                    state=state,
                    node=endpoint.get("nodeName"),
                    zone=endpoint.get("zone"),
                    pod=pod,
                )
                known = best.get(key)
                if known is None or (
                    known.state is not BackendState.ACTIVE and state is BackendState.ACTIVE
                ):
                    best[key] = backend
    return [best[key] for key in sorted(best)]


def _addresses(texts: Iterable[object]) -> list[ipaddress.IPv4Address]:
    out = []
    for text in texts:
        if isinstance(text, str) and text:
            ip = ipaddress.ip_address(text)
            if isinstance(ip, ipaddress.IPv4Address):
                out.append(ip)
    return out


def service_table(
    *,
    services: Iterable[Mapping[str, Any]],
    slices: Iterable[Mapping[str, Any]],
    node_name: str,
    node_ips: Sequence[ipaddress.IPv4Address] = (),
) -> list[Frontend]:
    """Every frontend this node serves, sorted by key. ``node_ips`` are the node's
    addresses NodePorts listen on; ``node_name`` decides which backends are local."""
    by_service: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for slice_ in slices:
        meta = slice_["metadata"]
        name = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
        if name:
            by_service.setdefault((meta["namespace"], name), []).append(slice_)
    frontends: list[Frontend] = []
    for service in services:
        meta, spec = service["metadata"], service["spec"]
        ref = f"{meta['namespace']}/{meta['name']}"
        own_slices = by_service.get((meta["namespace"], meta["name"]), [])
        affinity = (
            int(spec["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"])
            if spec.get("sessionAffinity") == "ClientIP"
            else 0
        )
        internal_local = spec.get("internalTrafficPolicy") == "Local"
        external_local = spec.get("externalTrafficPolicy") == "Local"
        lb_ips = (
            _addresses(
                i.get("ip")
                for i in service.get("status", {}).get("loadBalancer", {}).get("ingress", [])
            )
            if spec.get("type") == "LoadBalancer"
            else []
        )
        for port in spec.get("ports", []):
            protocol = port.get("protocol", "TCP")
            name = port.get("name", "")
            backends = _slice_backends(own_slices, port_name=name, protocol=protocol)
            local = [b for b in backends if b.node == node_name]
            places: list[tuple[FrontendKind, ipaddress.IPv4Address, int, bool]] = []
            if spec.get("clusterIP") not in (None, "", "None"):
                places.append(
                    (
                        FrontendKind.CLUSTER_IP,
                        _ipv4(spec["clusterIP"]),
                        port["port"],
                        internal_local,
                    )
                )
            if port.get("nodePort"):
                places += [
                    (FrontendKind.NODE_PORT, ip, port["nodePort"], external_local)
                    for ip in node_ips
                ]
            places += [
                (FrontendKind.EXTERNAL_IP, ip, port["port"], external_local)
                for ip in _addresses(spec.get("externalIPs", []))
            ]
            places += [
                (FrontendKind.LOAD_BALANCER, ip, port["port"], external_local) for ip in lb_ips
            ]
            for kind, ip, number, local_only in places:
                frontends.append(
                    Frontend(
                        key=FrontendKey(ip, number, protocol),
                        kind=kind,
                        service=ref,
                        port_name=name,
                        backends=tuple(local if local_only else backends),
                        affinity_timeout=affinity,
                        local_only=local_only,
                    )
                )
    return _one_per_key(frontends)


def _one_per_key(frontends: list[Frontend]) -> list[Frontend]:
    """Two Services cannot share a ClusterIP or a NodePort, but an external IP or a
    load balancer address and port may be claimed by two: the first in
    namespace/name order keeps it, so the choice never flips between passes."""
    seen: dict[FrontendKey, Frontend] = {}
    for frontend in frontends:
        seen.setdefault(frontend.key, frontend)
    return [seen[key] for key in sorted(seen)]


def frontends_json(
    frontends: Sequence[Frontend],
    *,
    frontend_ids: Mapping[FrontendKey, int] | None = None,
    backend_ids: Mapping[BackendKey, int] | None = None,
) -> list[dict[str, Any]]:
    """The table as the agent's ``GET /v1/services`` answers it and ``ciliate service
    list`` prints it (ids are null when computed from the objects alone)."""
    out = []
    for frontend in frontends:
        new_flows = {b.key for b in frontend.new_flow_backends}
        out.append(
            {
                "id": (frontend_ids or {}).get(frontend.key),
                "frontend": str(frontend.key),
                "ip": str(frontend.key.ip),
                "port": frontend.key.port,
                "protocol": frontend.key.protocol,
                "type": str(frontend.kind),
                "service": frontend.service,
                "port_name": frontend.port_name,
                "affinity_timeout": frontend.affinity_timeout,
                "local_only": frontend.local_only,
                "refuses": frontend.refuses,
                "backends": [
                    {
                        "id": (backend_ids or {}).get(backend.key),
                        "address": str(backend.key),
                        "ip": str(backend.key.ip),
                        "port": backend.key.port,
                        "state": str(backend.state),
                        "new_flows": backend.key in new_flows,
                        "node": backend.node,
                        "zone": backend.zone,
                        "pod": backend.pod,
                    }
                    for backend in frontend.backends
                ],
            }
        )
    return out
