"""CIDR identities: the local-scope identities (>= 1 << 24) of the prefixes policies
name, and what a CIDR peer (ipBlock, fromCIDR, CIDRSet) expands to.

The datapath finds a peer's identity by the longest prefix in the ipcache, so a CIDR
peer must allow the identity of every ipcache prefix inside it that no ``except``
covers, and, for Kubernetes ``ipBlock``, the identities of pods and nodes whose
address is inside it (their /32 entries are longer than any policy prefix). ``/0``
is the world identity itself: an address no prefix covers is world.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ciliate.control.policy.model import CIDR_IDENTITY_BASE, WORLD_IDENTITY, PodEndpoint

__all__ = ["CidrBlock", "CidrIdentities", "expand_block"]

Network = ipaddress.IPv4Network


@dataclass(frozen=True)
class CidrBlock:
    cidr: Network
    excepts: tuple[Network, ...] = ()

    def holds(self, address: ipaddress.IPv4Address) -> bool:
        return address in self.cidr and not any(address in e for e in self.excepts)


class CidrIdentities:
    """Stable identities for prefixes: a prefix keeps its id while some policy names
    it; a new prefix takes the lowest free id (so ids stay dense and reusable)."""

    def __init__(self) -> None:
        self._ids: dict[Network, int] = {}

    def assign(self, prefixes: Iterable[Network]) -> dict[Network, int]:
        wanted = set(prefixes)
        self._ids = {p: i for p, i in self._ids.items() if p in wanted}
        used = set(self._ids.values())
        candidate = CIDR_IDENTITY_BASE
        for prefix in sorted(
            wanted - set(self._ids), key=lambda n: (n.network_address, n.prefixlen)
        ):
            while candidate in used:
                candidate += 1
            self._ids[prefix] = candidate
            used.add(candidate)
        return dict(sorted(self._ids.items(), key=lambda item: item[1]))


def expand_block(
    block: CidrBlock,
    *,
    cidr_ids: Mapping[Network, int],
    pods: Sequence[PodEndpoint],
    node_identities: Mapping[ipaddress.IPv4Address, int],
    match_pods: bool,
) -> set[int]:
    """The peer identities a CIDR peer allows (see the module documentation).

    With ``match_pods`` (Kubernetes ipBlock), pods and nodes inside the block count with
    their own identities. Identities are shared by pods with equal labels, so an
    identity counts only if one of its pods is inside and none of its pods is inside
    an ``except``: an excepted pod is never let in through a labelmate.
    """
    ids: set[int] = set()
    if block.cidr.prefixlen == 0 and not any(e.prefixlen == 0 for e in block.excepts):
        ids.add(WORLD_IDENTITY)
    for prefix, identity in cidr_ids.items():
        if prefix.subnet_of(block.cidr) and not any(prefix.subnet_of(e) for e in block.excepts):
            ids.add(identity)
    if match_pods:
        inside: set[int] = set()
        excepted: set[int] = set()
        members = [(pod.ip, pod.identity) for pod in pods if pod.ip is not None]
        members += list(node_identities.items())
        for address, identity in members:
            if address is None or address not in block.cidr:
                continue
            (inside if block.holds(address) else excepted).add(identity)
        ids |= inside - excepted
    return ids
