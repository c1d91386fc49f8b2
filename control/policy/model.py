"""The data the policy engine reads and writes.

``PolicyEntry`` is the datapath's own (:mod:`ciliate.datapath.policy`), so the engine's
output goes into the maps as it is: one entry per (direction, peer identity, protocol,
port range, allow/deny).
Semantics the datapath implements and :mod:`.evaluate` reproduces: a packet passes a
direction if that direction is not enforced, or if no deny entry matches it (with its
peer identity or identity 0) and some allow entry does. ``port`` 0 is any port;
``port_end`` 0 means the single port ``port``, otherwise the inclusive end of a range;
``protocol`` 0 is any protocol.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from ciliate.datapath.policy import PolicyEntry

__all__ = [
    "ANY_IDENTITY",
    "CIDR_IDENTITY_BASE",
    "HOST_IDENTITY",
    "PROTOCOL_NUMBERS",
    "REMOTE_NODE_IDENTITY",
    "WORLD_IDENTITY",
    "ContainerPort",
    "Direction",
    "EndpointPolicy",
    "PodEndpoint",
    "PolicyEntry",
    "PolicyResult",
    "RuleRef",
    "covers",
    "covers_entry",
    "describe",
    "last_port",
]

Direction = Literal["ingress", "egress"]

ANY_IDENTITY = 0
HOST_IDENTITY = 1
WORLD_IDENTITY = 2
REMOTE_NODE_IDENTITY = 6
# Cilium's local-scope identities (CIDR identities) start at 1 << 24.
CIDR_IDENTITY_BASE = 1 << 24
# Reserved identities the `cluster` entity covers besides every pod (Cilium's list):
# host, unmanaged, health, init, remote-node, kube-apiserver, ingress.
CLUSTER_RESERVED_IDENTITIES = (1, 3, 4, 5, 6, 7, 8)

PROTOCOL_NUMBERS: Mapping[str, int] = MappingProxyType({"TCP": 6, "UDP": 17, "SCTP": 132})
PROTOCOL_NAMES: Mapping[int, str] = MappingProxyType(
    {number: name for name, number in PROTOCOL_NUMBERS.items()}
)


def last_port(entry: PolicyEntry) -> int:
    return entry.port_end or entry.port


def covers(entry: PolicyEntry, *, protocol: int, port: int) -> bool:
    """Whether a packet of ``protocol`` to ``port`` falls in the entry's L4 part."""
    if entry.protocol not in (0, protocol):
        return False
    return entry.port == 0 or entry.port <= port <= last_port(entry)


def covers_entry(outer: PolicyEntry, inner: PolicyEntry) -> bool:
    """Whether every packet ``inner`` matches is matched by ``outer`` too."""
    if outer.direction != inner.direction or outer.identity not in (0, inner.identity):
        return False
    if outer.protocol not in (0, inner.protocol):
        return False
    if outer.port == 0:
        return True
    return inner.port != 0 and outer.port <= inner.port and last_port(inner) <= last_port(outer)


def describe(entry: PolicyEntry) -> str:
    """``allow ingress identity 257 TCP port 80``."""
    peer = "any peer" if entry.identity == ANY_IDENTITY else f"identity {entry.identity}"
    proto = PROTOCOL_NAMES.get(entry.protocol, str(entry.protocol)) if entry.protocol else "any"
    if entry.port == 0:
        ports = "any port"
    elif entry.port_end:
        ports = f"ports {entry.port}-{entry.port_end}"
    else:
        ports = f"port {entry.port}"
    verb = "deny" if entry.deny else "allow"
    return f"{verb} {entry.direction} {peer} {proto} {ports}"


@dataclass(frozen=True)
class ContainerPort:
    """A named container port (``spec.containers[].ports[]``), for named policy ports."""

    name: str
    port: int
    protocol: int


@dataclass(frozen=True)
class PodEndpoint:
    """A pod as policy sees it: where it is, its identity and the labels behind it."""

    namespace: str
    name: str
    identity: int
    labels: Mapping[str, str]  # its identity's labels (identity.labels.security_labels)
    ip: ipaddress.IPv4Address | None = None
    ports: tuple[ContainerPort, ...] = ()

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class RuleRef:
    """Where an entry comes from: a policy and the rule in it, or a built-in default."""

    policy: str  # "NetworkPolicy x/allow-web", or "default"
    path: str  # "spec.ingress[0]"; or what the default is

    def __str__(self) -> str:
        return f"{self.policy} {self.path}"


@dataclass(frozen=True)
class EndpointPolicy:
    """What the datapath enforces for one endpoint."""

    ingress_enforced: bool
    egress_enforced: bool
    entries: tuple[PolicyEntry, ...]
    # Which rules produced each entry, and which policies isolate each direction.
    origins: Mapping[PolicyEntry, tuple[RuleRef, ...]] = field(default_factory=dict)
    isolated_by: Mapping[Direction, tuple[str, ...]] = field(default_factory=dict)

    def enforced(self, direction: Direction) -> bool:
        return self.ingress_enforced if direction == "ingress" else self.egress_enforced


@dataclass(frozen=True)
class PolicyResult:
    """The engine's output: each endpoint's policy, and the CIDR identities the ipcache
    must hold (every IPv4 prefix a policy names, except pod and node host prefixes,
    which keep their own identities)."""

    endpoints: Mapping[str, EndpointPolicy]  # by "namespace/name"
    cidr_identities: Mapping[ipaddress.IPv4Network, int]
