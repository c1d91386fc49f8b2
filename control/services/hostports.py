"""hostPort without portmap, as Cilium serves it: each hostPort of a pod is a
load-balancer frontend of its node alone, whose one backend is the pod.

A mapping (``hostIP``, ``hostPort``, ``protocol``) -> (pod IP, ``containerPort``)
becomes a frontend at each of the node's addresses (or at ``hostIP`` when the
mapping names one of them; another machine's address is not served, as portmap
matches local destinations only) and ``hostPort``, of kind ``HostPort``. The datapath serves it
as it serves a NodePort with a local backend: the socket LB gives a pod or the
node connecting to it the pod directly (no DNAT, so no reply to translate back),
and the uplink's per-packet LB does the same for clients outside the node.

Where the mappings come from: the CNI ``runtimeConfig.portMappings`` the runtime
passes (ciliate declares the ``portMappings`` capability) and the Pod object's
``spec.containers[].ports[].hostPort``; they live in the endpoint's record.

Two pods of one node cannot hold the same hostPort: as the scheduler's NodePorts
filter and kubelet read it, two mappings clash when their protocol and hostPort
are equal and their hostIPs overlap (equal, or either one unspecified, which means
every address; the cases of the scheduler's TestHostPortInfo_Check are in
tests/services/test_host_ports.py). A Service frontend at the same address and port keeps it (see
:mod:`.node`: a cluster-wide Service is not taken over by one pod's setting).

Pure functions; the agent feeds them its endpoint records.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ciliate.control.services.table import (
    Backend,
    BackendKey,
    BackendState,
    Frontend,
    FrontendKey,
    FrontendKind,
)

__all__ = [
    "OWNER_PREFIX",
    "PROTOCOLS",
    "HostPort",
    "HostPortError",
    "PodHostPorts",
    "clash",
    "from_pod",
    "frontends",
    "merged",
    "owner_ref",
]

PROTOCOLS = ("TCP", "UDP")  # what the load balancer serves
# Table owners of hostPort frontends sort after every Service (namespace/name:
# lowercase DNS labels), so a Service claiming the same frontend keeps it.
OWNER_PREFIX = "~hostport/"


class HostPortError(ValueError):
    """A mapping that cannot be served: the message names the field."""


@dataclass(frozen=True, order=True)
class HostPort:
    host_port: int
    protocol: str  # TCP | UDP
    container_port: int
    host_ip: ipaddress.IPv4Address | None = None  # None: every address of the node

    def __post_init__(self) -> None:
        for what, port in (("hostPort", self.host_port), ("containerPort", self.container_port)):
            if not 0 < port <= 0xFFFF:
                raise HostPortError(f"{what} {port} is outside 1..65535")
        if self.protocol not in PROTOCOLS:
            raise HostPortError(
                f"protocol {self.protocol!r}: ciliate serves hostPorts over "
                + " and ".join(PROTOCOLS)
            )

    def __str__(self) -> str:
        host = self.host_ip if self.host_ip is not None else "*"
        return f"{host}:{self.host_port}/{self.protocol} -> {self.container_port}"

    def overlaps(self, other: HostPort) -> bool:
        """Whether the two cannot be held at once (by two pods, or one)."""
        return (
            self.protocol == other.protocol
            and self.host_port == other.host_port
            and (self.host_ip is None or other.host_ip is None or self.host_ip == other.host_ip)
        )

    @classmethod
    def parse(
        cls, *, host_port: object, container_port: object, protocol: object, host_ip: object
    ) -> HostPort:
        """From the fields as CNI's portMappings and a Pod's ports give them:
        protocol in either case (TCP when left out), hostIP empty, ``0.0.0.0`` or
        left out for every address."""
        for what, value in (("hostPort", host_port), ("containerPort", container_port)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise HostPortError(f"{what} must be an integer, not {value!r}")
        if protocol is None or protocol == "":
            protocol = "TCP"
        if not isinstance(protocol, str):
            raise HostPortError(f"protocol must be a string, not {protocol!r}")
        address: ipaddress.IPv4Address | None = None
        if host_ip not in (None, "", "0.0.0.0"):
            if not isinstance(host_ip, str):
                raise HostPortError(f"hostIP must be a string, not {host_ip!r}")
            try:
                address = ipaddress.IPv4Address(host_ip)
            except ValueError:
                raise HostPortError(
                    f"hostIP {host_ip!r} is not an IPv4 address (ciliate's datapath is IPv4)"
                ) from None
        assert isinstance(host_port, int) and isinstance(container_port, int)
        return cls(host_port, protocol.upper(), container_port, address)

    def to_json(self) -> dict[str, Any]:
        return {
            "hostPort": self.host_port,
            "containerPort": self.container_port,
            "protocol": self.protocol,
            "hostIP": str(self.host_ip) if self.host_ip is not None else "",
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> HostPort:
        return cls.parse(
            host_port=doc.get("hostPort"),
            container_port=doc.get("containerPort"),
            protocol=doc.get("protocol"),
            host_ip=doc.get("hostIP"),
        )


def from_pod(pod: Mapping[str, Any]) -> list[HostPort]:
    """The hostPorts a Pod object asks for: every ``ports[]`` entry with a
    ``hostPort`` of its containers (and of its sidecars, init containers that keep
    running: ``restartPolicy: Always``), as kubelet passes them to CNI."""
    spec = pod.get("spec") or {}
    containers = list(spec.get("containers") or []) + [
        c for c in spec.get("initContainers") or [] if c.get("restartPolicy") == "Always"
    ]
    out = []
    for container in containers:
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                out.append(
                    HostPort.parse(
                        host_port=port.get("hostPort"),
                        container_port=port.get("containerPort"),
                        protocol=port.get("protocol"),
                        host_ip=port.get("hostIP"),
                    )
                )
    return out


def merged(*sources: Iterable[HostPort]) -> list[HostPort]:
    """The mappings of one pod from several sources (the runtime's, the Pod
    object's: kubelet derives the first from the second, so they repeat), each
    once; two that differ yet overlap are refused (a pod cannot hold one hostPort
    twice), the earlier source named first."""
    kept: list[HostPort] = []
    for source in sources:
        for mapping in source:
            if mapping in kept:
                continue
            other = next((k for k in kept if k.overlaps(mapping)), None)
            if other is not None:
                if other.container_port == mapping.container_port:
                    # The same port with and without a hostIP: the wider one holds.
                    if mapping.host_ip is None:
                        kept[kept.index(other)] = mapping
                    continue
                raise HostPortError(f"hostPort {other} and {mapping} of one pod overlap")
            kept.append(mapping)
    return sorted(kept, key=lambda m: (m.protocol, m.host_port, str(m.host_ip or "")))


def clash(
    wanted: Iterable[HostPort], taken: Iterable[tuple[str, Sequence[HostPort]]]
) -> tuple[HostPort, str, HostPort] | None:
    """The first of ``wanted`` that overlaps a mapping another pod holds
    (``taken``: (owner, its mappings)): (wanted, owner, held), or None."""
    held = [(owner, m) for owner, mappings in taken for m in mappings]
    for mapping in wanted:
        for owner, other in held:
            if mapping.overlaps(other):
                return mapping, owner, other
    return None


def owner_ref(owner: str) -> str:
    """The table owner of an endpoint's hostPort frontends (see OWNER_PREFIX)."""
    return f"{OWNER_PREFIX}{owner}"


@dataclass(frozen=True)
class PodHostPorts:
    owner: str  # the endpoint (container/ifname): unique on the node
    pod: str | None  # namespace/name, when the runtime said
    ip: ipaddress.IPv4Address
    mappings: Sequence[HostPort]


def frontends(
    pods: Iterable[PodHostPorts],
    *,
    node_name: str,
    node_ips: Sequence[ipaddress.IPv4Address],
) -> dict[str, list[Frontend]]:
    """The hostPort frontends of this node, by table owner (:func:`owner_ref`):
    one per mapping and address (``hostIP`` when it is one of ``node_ips``, or
    each of them), whose one backend is the pod at ``containerPort``, local and
    active."""
    out: dict[str, list[Frontend]] = {}
    for pod in pods:
        listed = []
        for mapping in pod.mappings:
            backend = Backend(
                key=BackendKey(pod.ip, mapping.container_port, mapping.protocol),
                state=BackendState.ACTIVE,
                node=node_name,
                pod=pod.pod,
            )
            # A hostIP that is not the node's is not served (portmap's DNAT, too,
            # matches only local destinations): the socket LB would otherwise take
            # this node's connections to another machine's address.
            addresses = [mapping.host_ip] if mapping.host_ip is not None else node_ips
            for address in sorted(set(addresses) & set(node_ips)):
                listed.append(
                    Frontend(
                        key=FrontendKey(address, mapping.host_port, mapping.protocol),
                        kind=FrontendKind.HOST_PORT,
                        service=pod.pod or pod.owner,
                        port_name="",
                        backends=(backend,),
                        affinity_timeout=0,
                        # One backend, the pod, on this node: no traffic policy to note.
                        local_only=False,
                    )
                )
        if listed:
            out[owner_ref(pod.owner)] = listed
    return out
