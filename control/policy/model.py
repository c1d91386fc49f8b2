"""The data the policy engine reads and writes.

``PolicyEntry`` is the datapath's interface (``ciliate.datapath`` implements the same
shape): one entry per (direction, peer identity, protocol, port range, allow/deny).
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


@dataclass(frozen=True, order=True)
class PolicyEntry:
    direction: Direction
    identity: int  # peer identity; 0 = any peer
    protocol: int = 0  # 0 any, 6 TCP, 17 UDP, 132 SCTP
    port: int = 0  # 0 any
    port_end: int = 0  # inclusive range end; 0 = just `port`
    deny: bool = False

    @property
    def last_port(self) -> int:
        return self.port_end or self.port

    def covers(self, *, protocol: int, port: int) -> bool:
        """Whether a packet of ``protocol`` to ``port`` falls in this entry's L4 part."""
        if self.protocol not in (0, protocol):
            return False
        return self.port == 0 or self.port <= port <= self.last_port

    def covers_entry(self, other: PolicyEntry) -> bool:
        """Whether every packet ``other`` matches is matched by this entry too."""
        if self.direction != other.direction or self.identity not in (0, other.identity):
            return False
        if self.protocol not in (0, other.protocol):
            return False
        if self.port == 0:
            return True
        return other.port != 0 and self.port <= other.port and other.last_port <= self.last_port

    def describe(self) -> str:
        peer = "any peer" if self.identity == ANY_IDENTITY else f"identity {self.identity}"
        proto = PROTOCOL_NAMES.get(self.protocol, str(self.protocol)) if self.protocol else "any"
        ports = (
            "any port"
            if self.port == 0
            else (
                f"port {self.port}" if not self.port_end else f"ports {self.port}-{self.port_end}"
            )
        )
        verb = "deny" if self.deny else "allow"
        return f"{verb} {self.direction} {peer} {proto} {ports}"


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
