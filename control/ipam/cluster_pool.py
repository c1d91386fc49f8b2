"""Cilium-style cluster-pool IPAM: per-node pod CIDRs from several cluster CIDRs per family.

Each configured family (IPv4, IPv6) has one or more cluster CIDRs, each backed by a
:class:`~ciliate.control.ipam.cidrset.CidrSet` with the family's node mask. A node gets one
CIDR per configured family, taken from the first cluster CIDR that still has room (the
order of the configuration list). On operator start, the CIDRs existing nodes already hold
are re-occupied before anything new is allocated, so no CIDR is handed out twice.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import Generic, TypeVar, cast

from .cidrset import CLUSTER_SUBNET_MAX_DIFF, CidrSet, Network

__all__ = [
    "CidrConflictError",
    "CidrNotInPoolError",
    "ClusterPool",
    "InvalidCidrError",
    "NodeCidrs",
    "PoolConfigError",
    "PoolError",
    "PoolExhaustedError",
]

_N = TypeVar("_N", IPv4Network, IPv6Network)


class PoolError(Exception):
    """Base class for every ClusterPool error."""


class PoolConfigError(PoolError, ValueError):
    """The pool configuration is unusable; the message says what to change."""


class PoolExhaustedError(PoolError):
    """Every cluster CIDR of a family is full."""


class InvalidCidrError(PoolError, ValueError):
    """A CIDR string given to :meth:`ClusterPool.occupy` does not parse."""


class CidrNotInPoolError(PoolError, ValueError):
    """A CIDR lies outside every cluster CIDR of its family (or the family is not configured)."""


class CidrConflictError(PoolError):
    """A CIDR overlaps one that another node (or another CIDR of the same node) holds."""


@dataclass(frozen=True)
class NodeCidrs:
    """The pod CIDRs one node holds, per family."""

    ipv4: list[IPv4Network] = field(default_factory=list)
    ipv6: list[IPv6Network] = field(default_factory=list)

    @property
    def cidrs(self) -> list[Network]:
        """All CIDRs, IPv4 first (the order CiliumNode ``spec.ipam.podCIDRs`` uses)."""
        return [*self.ipv4, *self.ipv6]


class _Family(Generic[_N]):
    """The cluster CIDRs of one IP family and which node holds what in them."""

    def __init__(self, net_type: type[_N], cidrs: Sequence[str], mask: int) -> None:
        self.net_type: type[_N] = net_type
        self.version = 4 if net_type is IPv4Network else 6
        self.name = f"IPv{self.version}"
        self.mask = mask
        self.sets = [CidrSet(net, mask) for net in self._validate(cidrs, mask)]
        self.held: dict[str, list[_N]] = {}

    def _validate(self, cidrs: Sequence[str], mask: int) -> list[_N]:
        opt = f"ipv{self.version}"
        max_bits = 32 if self.version == 4 else 128
        if isinstance(mask, bool) or not isinstance(mask, int):
            raise PoolConfigError(f"{opt}_mask must be an integer prefix length, got {mask!r}")
        if not 0 <= mask <= max_bits:
            raise PoolConfigError(
                f"{opt}_mask {mask} is not a valid {self.name} prefix length (0..{max_bits})"
            )
        nets: list[_N] = []
        for text in cidrs:
            try:
                parsed = ipaddress.ip_network(str(text).strip(), strict=False)
            except ValueError as exc:
                raise PoolConfigError(
                    f"{opt}_cidrs entry {text!r} is not a valid CIDR ({exc}); write it as "
                    f"{'10.0.0.0/8' if self.version == 4 else 'fd00::/104'}"
                ) from None
            if not isinstance(parsed, self.net_type):
                raise PoolConfigError(
                    f"{opt}_cidrs entry {text!r} is an IPv{parsed.version} CIDR; "
                    f"move it to ipv{parsed.version}_cidrs"
                )
            net = parsed
            if mask < net.prefixlen:
                raise PoolConfigError(
                    f"{opt}_mask {mask} is shorter than the /{net.prefixlen} prefix of cluster "
                    f"CIDR {net}, so a node CIDR would not fit inside it: use an {opt}_mask of "
                    f"at least {net.prefixlen} or a larger cluster CIDR"
                )
            if self.version == 6 and mask - net.prefixlen > CLUSTER_SUBNET_MAX_DIFF:
                raise PoolConfigError(
                    f"ipv6_mask {mask} is {mask - net.prefixlen} bits longer than the "
                    f"/{net.prefixlen} prefix of cluster CIDR {net}; at most "
                    f"{CLUSTER_SUBNET_MAX_DIFF} bits are supported: use an ipv6_mask of at "
                    f"most {net.prefixlen + CLUSTER_SUBNET_MAX_DIFF} or a cluster CIDR of "
                    f"/{mask - CLUSTER_SUBNET_MAX_DIFF} or longer"
                )
            for other in nets:
                if net.overlaps(other):
                    raise PoolConfigError(
                        f"{opt}_cidrs entries {other} and {net} overlap, so the same node CIDR "
                        f"could be handed out twice: remove one or make them disjoint"
                    )
            nets.append(net)
        return nets

    def describe(self) -> str:
        return ", ".join(str(s.cluster_cidr) for s in self.sets)

    def allocate(self, node: str) -> _N:
        for cidr_set in self.sets:
            # First cluster CIDR with room, in configuration order (as Cilium does).
            if not cidr_set.is_full:
                return cast(_N, cidr_set.allocate_next())
        raise PoolExhaustedError(
            f"{self.name} pool exhausted: no free /{self.mask} node CIDR left for node "
            f"{node!r} in cluster CIDRs {self.describe()}; add a cluster CIDR to "
            f"ipv{self.version}_cidrs"
        )

    def set_for(self, net: _N) -> CidrSet | None:
        for cidr_set in self.sets:
            if net.subnet_of(cast(_N, cidr_set.cluster_cidr)):
                return cidr_set
        return None

    def release(self, net: _N) -> None:
        cidr_set = self.set_for(net)
        if cidr_set is not None:
            cidr_set.release(net)

    def holders_of(self, net: _N) -> list[tuple[str, _N]]:
        """Which nodes hold a CIDR that shares a node block with ``net`` (error path only)."""
        wanted = self.blocks(net)
        return [
            (node, held)
            for node, nets in self.held.items()
            for held in nets
            if self.blocks(held).overlaps(wanted)
        ]

    def blocks(self, net: _N) -> _N:
        # A CIDR smaller than the node mask still uses its whole covering node block.
        return net.supernet(new_prefix=self.mask) if net.prefixlen > self.mask else net


class ClusterPool:
    """Hands out one pod CIDR per configured family to each node."""

    def __init__(
        self,
        *,
        ipv4_cidrs: Sequence[str] = (),
        ipv4_mask: int | None = None,
        ipv6_cidrs: Sequence[str] = (),
        ipv6_mask: int | None = None,
    ) -> None:
        self._v4 = self._family(IPv4Network, ipv4_cidrs, ipv4_mask)
        self._v6 = self._family(IPv6Network, ipv6_cidrs, ipv6_mask)
        if self._v4 is None and self._v6 is None:
            raise PoolConfigError(
                "no cluster CIDRs configured: set ipv4_cidrs and ipv4_mask, "
                "ipv6_cidrs and ipv6_mask, or both"
            )
        self._lock = threading.Lock()

    @staticmethod
    def _family(net_type: type[_N], cidrs: Sequence[str], mask: int | None) -> _Family[_N] | None:
        opt = "ipv4" if net_type is IPv4Network else "ipv6"
        if isinstance(cidrs, str):
            raise PoolConfigError(
                f"{opt}_cidrs must be a list of CIDR strings, not the single string {cidrs!r}: "
                f"write [{cidrs!r}]"
            )
        if not cidrs and mask is None:
            return None
        if not cidrs:
            raise PoolConfigError(
                f"{opt}_mask is set but {opt}_cidrs is empty: add at least one cluster CIDR "
                f"to {opt}_cidrs or drop {opt}_mask"
            )
        if mask is None:
            raise PoolConfigError(
                f"{opt}_cidrs is set but {opt}_mask is missing: set the per-node prefix "
                f"length (for example {24 if opt == 'ipv4' else 64})"
            )
        return _Family(net_type, cidrs, mask)

    @property
    def ipv4_cidrs(self) -> list[IPv4Network]:
        return [cast(IPv4Network, s.cluster_cidr) for s in self._v4.sets] if self._v4 else []

    @property
    def ipv6_cidrs(self) -> list[IPv6Network]:
        return [cast(IPv6Network, s.cluster_cidr) for s in self._v6.sets] if self._v6 else []

    def allocate(self, node: str) -> NodeCidrs:
        """Give ``node`` one CIDR per configured family it does not hold yet.

        Idempotent: a node that already holds CIDRs of every configured family gets them
        back unchanged. On exhaustion nothing stays allocated for this call.
        """
        with self._lock:
            new_v4: IPv4Network | None = None
            new_v6: IPv6Network | None = None
            if self._v4 is not None and node not in self._v4.held:
                new_v4 = self._v4.allocate(node)
            if self._v6 is not None and node not in self._v6.held:
                try:
                    new_v6 = self._v6.allocate(node)
                except PoolExhaustedError:
                    # Don't leak a half allocation: the node would hold only one family.
                    if new_v4 is not None and self._v4 is not None:
                        self._v4.release(new_v4)
                    raise
            if new_v4 is not None and self._v4 is not None:
                self._v4.held[node] = [new_v4]
            if new_v6 is not None and self._v6 is not None:
                self._v6.held[node] = [new_v6]
            return self._node_cidrs(node) or NodeCidrs()

    def occupy(self, node: str, cidrs: Sequence[str]) -> None:
        """Record that ``node`` already holds ``cidrs`` (e.g. from its CiliumNode on restart).

        All or nothing: every CIDR is checked before any is recorded. CIDRs the node already
        holds are skipped, so re-occupying is harmless.
        """
        if isinstance(cidrs, str):
            raise TypeError(f"cidrs must be a sequence of CIDR strings, not the string {cidrs!r}")
        with self._lock:
            v4: list[tuple[IPv4Network, CidrSet]] = []
            v6: list[tuple[IPv6Network, CidrSet]] = []
            for text in cidrs:
                try:
                    net = ipaddress.ip_network(str(text).strip(), strict=False)
                except ValueError as exc:
                    raise InvalidCidrError(
                        f"node {node!r}: {text!r} is not a valid CIDR ({exc})"
                    ) from None
                if isinstance(net, IPv4Network):
                    self._check_occupy(self._v4, node, net, v4)
                else:
                    self._check_occupy(self._v6, node, net, v6)
            self._record(self._v4, node, v4)
            self._record(self._v6, node, v6)

    @staticmethod
    def _check_occupy(
        family: _Family[_N] | None, node: str, net: _N, batch: list[tuple[_N, CidrSet]]
    ) -> None:
        if family is None:
            raise CidrNotInPoolError(
                f"node {node!r}: {net} is an IPv{net.version} CIDR but the pool has no "
                f"IPv{net.version} cluster CIDRs"
            )
        if net in family.held.get(node, ()) or any(net == seen for seen, _ in batch):
            return
        cidr_set = family.set_for(net)
        if cidr_set is None:
            raise CidrNotInPoolError(
                f"node {node!r}: {net} is outside every {family.name} cluster CIDR "
                f"({family.describe()})"
            )
        for seen, _ in batch:
            if family.blocks(seen).overlaps(family.blocks(net)):
                raise CidrConflictError(f"node {node!r}: {net} and {seen} overlap each other")
        if cidr_set.allocated_in(net):
            holders = ", ".join(
                f"{held} held by node {owner!r}" for owner, held in family.holders_of(net)
            )
            raise CidrConflictError(
                f"node {node!r}: {net} overlaps {holders or 'a CIDR already in use'}"
            )
        batch.append((net, cidr_set))

    @staticmethod
    def _record(family: _Family[_N] | None, node: str, batch: list[tuple[_N, CidrSet]]) -> None:
        if family is None:
            return  # _check_occupy let nothing of this family into the batch
        for net, cidr_set in batch:
            cidr_set.occupy(net)
            family.held.setdefault(node, []).append(net)

    def release(self, node: str) -> None:
        """Give back every CIDR ``node`` holds (a deleted node); unknown nodes are a no-op."""
        with self._lock:
            if self._v4 is not None:
                for net4 in self._v4.held.pop(node, []):
                    self._v4.release(net4)
            if self._v6 is not None:
                for net6 in self._v6.held.pop(node, []):
                    self._v6.release(net6)

    def node_cidrs(self, node: str) -> NodeCidrs | None:
        """The CIDRs ``node`` holds, or None if it holds none."""
        with self._lock:
            return self._node_cidrs(node)

    def nodes(self) -> dict[str, NodeCidrs]:
        """Every node that holds a CIDR, with its CIDRs."""
        with self._lock:
            names = dict.fromkeys(
                [*(self._v4.held if self._v4 else ()), *(self._v6.held if self._v6 else ())]
            )
            return {name: self._node_cidrs(name) or NodeCidrs() for name in names}

    def _node_cidrs(self, node: str) -> NodeCidrs | None:
        v4 = list(self._v4.held.get(node, ())) if self._v4 else []
        v6 = list(self._v6.held.get(node, ())) if self._v6 else []
        if not v4 and not v6:
            return None
        return NodeCidrs(ipv4=v4, ipv6=v6)
