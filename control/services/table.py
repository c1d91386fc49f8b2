"""The service table: from Services and EndpointSlices (and the node's name and
addresses) to the frontends a node's datapath serves and their backends, as
kube-proxy and Cilium's service manager read them.

Frontends, one per (address, port, protocol):

* ``ClusterIP``: the Service's ``clusterIP`` (none for a headless Service);
* ``NodePort``: each of the node's addresses at each ``nodePort`` (NodePort and
  LoadBalancer Services);
* ``ExternalIP``: each of ``spec.externalIPs``, at the service port;
* ``LoadBalancer``: each ``status.loadBalancer.ingress[].ip`` of a LoadBalancer
  Service, at the service port, but those of ``ipMode: Proxy`` (KEP-1860: the
  load balancer proxies to the nodes itself).

A Service of type ``ExternalName`` is a DNS alias and has none.

Backends come from the slices labelled ``kubernetes.io/service-name`` with the
Service's name in its namespace (every such slice, the controller's and the
user's); a slice port is matched to a service port by name and protocol, an
endpoint is read at its first address (the others are interchangeable, the API
says; kube-proxy and Cilium read the first alone), only IPv4 slices count, and an
address listed twice (slices overlap while they are rewritten) counts once, in its
best state. Each backend is:

* ``active``: ``ready`` (a condition left out counts as true, as Kubernetes says);
* ``terminating``: not ready, but ``serving`` and ``terminating``: it keeps the
  flows it has and takes no new one, except when the frontend has no active
  backend at all, when the serving terminating ones take new flows too (KEP-1669,
  as kube-proxy and Cilium do, so a rolling update of the last pod loses nothing);
* left out: neither ready nor serving.

Traffic policies: ``internalTrafficPolicy: Local`` keeps only this node's backends
on the ClusterIP frontend; ``externalTrafficPolicy: Local`` does the same on the
NodePort, ExternalIP and LoadBalancer frontends for clients outside the cluster,
while clients inside it (pods, the node) reaching those addresses get every
backend (kube-proxy: such traffic is "subject to neither form of traffic policy";
Cilium keeps it in a second scope, ``Frontend.internal_backends``). The fallback
to terminating backends happens among the backends a policy leaves. A frontend
whose backends can take no new flow (none at all, none on this node, or all
terminating and none serving) is marked ``refuses``: the datapath answers at once
(TCP reset, ICMP unreachable) instead of timing out. ``sessionAffinity: ClientIP``
without a timeout holds 10,800 s, the API's default.

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
    "service_frontends",
    "service_table",
    "slice_service",
]


class FrontendKind(enum.StrEnum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    EXTERNAL_IP = "ExternalIP"
    LOAD_BALANCER = "LoadBalancer"
    HOST_PORT = "HostPort"  # a pod's hostPort on this node (.hostports), not a Service's


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

    def __hash__(self) -> int:
        # IPv4Address hashes through a hex string: the table hashes keys by the
        # hundred thousand in a full pass, so the address's integer is used.
        return hash((int(self.ip), self.port, self.protocol))


@dataclass(frozen=True, order=True)
class BackendKey:
    """A backend's address, shared by every frontend that sends to it."""

    ip: ipaddress.IPv4Address
    port: int
    protocol: str

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}/{self.protocol}"

    def __hash__(self) -> int:
        return hash((int(self.ip), self.port, self.protocol))


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
    # What clients inside the cluster (pods, the node) reach at this frontend when it
    # differs from ``backends``: every backend of an externalTrafficPolicy Local
    # Service's NodePort or external address; None: the same as ``backends``.
    internal_backends: tuple[Backend, ...] | None = None

    @property
    def new_flow_backends(self) -> tuple[Backend, ...]:
        """Those that take new flows: the active ones, or when there is none the
        serving terminating ones."""
        return _new_flow(self.backends)

    @property
    def refuses(self) -> bool:
        """No backend may take a new flow: refuse at once."""
        return not self.new_flow_backends


def _new_flow(backends: tuple[Backend, ...]) -> tuple[Backend, ...]:
    active = tuple(b for b in backends if b.state is BackendState.ACTIVE)
    return active or backends


@functools.lru_cache(maxsize=1 << 17)
def _ipv4(text: str) -> ipaddress.IPv4Address:
    """Parsing dominates a 10,000-service table; the same addresses recur each pass."""
    return ipaddress.IPv4Address(text)


def _endpoint_state(conditions: Mapping[str, Any]) -> BackendState | None:
    # Left out, ready and serving count as true and terminating as false, as
    # kube-proxy reads them (endpointslicecache.go).
    if conditions.get("ready") is not False:
        return BackendState.ACTIVE
    if conditions.get("serving") is not False and conditions.get("terminating") is True:
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
            addresses = endpoint.get("addresses") or []
            if not addresses:
                continue
            # Only the first address: the API says the others are interchangeable and
            # kube-proxy and Cilium read the first alone.
            key = BackendKey(_ipv4(addresses[0]), numbers[0], protocol)
            known = best.get(key)
            if known is None or (
                known.state is not BackendState.ACTIVE and state is BackendState.ACTIVE
            ):
                best[key] = Backend(
                    key=key,
                    state=state,
                    node=endpoint.get("nodeName"),
                    zone=endpoint.get("zone"),
                    pod=pod,
                )
    return [best[key] for key in sorted(best)]


def _addresses(texts: Iterable[object]) -> list[ipaddress.IPv4Address]:
    out = []
    for text in texts:
        if isinstance(text, str) and text:
            ip = ipaddress.ip_address(text)
            if isinstance(ip, ipaddress.IPv4Address):
                out.append(ip)
    return out


DEFAULT_AFFINITY_TIMEOUT = 10800  # seconds: sessionAffinityConfig.clientIP's default


def service_table(
    *,
    services: Iterable[Mapping[str, Any]],
    slices: Iterable[Mapping[str, Any]],
    node_name: str,
    node_ips: Sequence[ipaddress.IPv4Address] = (),
) -> list[Frontend]:
    """Every frontend this node serves, sorted by key. ``node_ips`` are the node's
    addresses NodePorts listen on; ``node_name`` decides which backends are local."""
    by_service: dict[str, list[Mapping[str, Any]]] = {}
    for slice_ in slices:
        owner = slice_service(slice_)
        if owner is not None:
            by_service.setdefault(owner, []).append(slice_)
    frontends: list[Frontend] = []
    for service in services:
        meta = service["metadata"]
        frontends += service_frontends(
            service,
            by_service.get(f"{meta['namespace']}/{meta['name']}", []),
            node_name=node_name,
            node_ips=node_ips,
        )
    return _one_per_key(frontends)


def slice_service(slice_: Mapping[str, Any]) -> str | None:
    """``namespace/name`` of the Service a slice serves (its service-name label)."""
    meta = slice_["metadata"]
    name = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
    return f"{meta['namespace']}/{name}" if name else None


def _affinity_timeout(spec: Mapping[str, Any]) -> int:
    if spec.get("sessionAffinity") != "ClientIP":
        return 0
    config = (spec.get("sessionAffinityConfig") or {}).get("clientIP") or {}
    timeout = config.get("timeoutSeconds")
    return int(timeout) if isinstance(timeout, int) and timeout > 0 else DEFAULT_AFFINITY_TIMEOUT


def service_frontends(
    service: Mapping[str, Any],
    slices: Sequence[Mapping[str, Any]],
    *,
    node_name: str,
    node_ips: Sequence[ipaddress.IPv4Address] = (),
) -> list[Frontend]:
    """The frontends of one Service from its slices (those labelled with its name),
    unsorted; where two Services claim one frontend :func:`service_table` decides."""
    meta, spec = service["metadata"], service["spec"]
    if spec.get("type") == "ExternalName":
        return []  # a DNS alias: nothing to balance (kube-proxy and Cilium skip it)
    ref = f"{meta['namespace']}/{meta['name']}"
    affinity = _affinity_timeout(spec)
    internal_local = spec.get("internalTrafficPolicy") == "Local"
    external_local = spec.get("externalTrafficPolicy") == "Local"
    lb_ips = (
        _addresses(
            i.get("ip")
            for i in (service.get("status") or {}).get("loadBalancer", {}).get("ingress", [])
            # ipMode Proxy: the load balancer proxies to the nodes itself, so its
            # address is not the nodes' to serve (kube-proxy skips it too, KEP-1860).
            if isinstance(i, dict) and i.get("ipMode") != "Proxy"
        )
        if spec.get("type") == "LoadBalancer"
        else []
    )
    external_ips = _addresses(spec.get("externalIPs", []))
    frontends = []
    for port in spec.get("ports", []):
        protocol = port.get("protocol", "TCP")
        name = port.get("name", "")
        backends = tuple(_slice_backends(slices, port_name=name, protocol=protocol))
        local = tuple(b for b in backends if b.node == node_name)
        places: list[tuple[FrontendKind, ipaddress.IPv4Address, int]] = []
        if spec.get("clusterIP") not in (None, "", "None"):
            places.append((FrontendKind.CLUSTER_IP, _ipv4(spec["clusterIP"]), port["port"]))
        if port.get("nodePort"):
            places += [(FrontendKind.NODE_PORT, ip, port["nodePort"]) for ip in node_ips]
        places += [(FrontendKind.EXTERNAL_IP, ip, port["port"]) for ip in external_ips]
        places += [(FrontendKind.LOAD_BALANCER, ip, port["port"]) for ip in lb_ips]
        for kind, ip, number in places:
            # internalTrafficPolicy governs the ClusterIP alone, externalTrafficPolicy
            # the outside addresses; a client inside the cluster reaching an outside
            # address of a Local Service is held to neither (kube-proxy: "pod
            # traffic for external destinations" goes to every endpoint).
            local_only = internal_local if kind is FrontendKind.CLUSTER_IP else external_local
            two_scopes = local_only and kind is not FrontendKind.CLUSTER_IP
            frontends.append(
                Frontend(
                    key=FrontendKey(ip, number, protocol),
                    kind=kind,
                    service=ref,
                    port_name=name,
                    backends=local if local_only else backends,
                    affinity_timeout=affinity,
                    local_only=local_only,
                    internal_backends=backends if two_scopes and local != backends else None,
                )
            )
    return frontends


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

    def listed(backends: Sequence[Backend]) -> list[dict[str, Any]]:
        new_flows = {b.key for b in _new_flow(tuple(backends))}
        return [
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
            for backend in backends
        ]

    for frontend in frontends:
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
                "backends": listed(frontend.backends),
                # Clients inside the cluster, when they reach other backends
                # (externalTrafficPolicy Local on an outside address); null: the same.
                "in_cluster_backends": None
                if frontend.internal_backends is None
                else listed(frontend.internal_backends),
            }
        )
    return out
