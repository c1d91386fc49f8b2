"""CIDR identities: the local-scope identities (>= 1 << 24) of the prefixes policies
name, and what a CIDR peer (ipBlock, fromCIDR, CIDRSet) expands to.

The datapath finds a peer's identity by the longest prefix in the ipcache, so a CIDR
peer must allow the identity of every ipcache prefix inside it that no ``except``
covers, and, for Kubernetes ``ipBlock``, the identities of pods and nodes whose
address is inside it (their /32 entries are longer than any policy prefix). ``/0``
is the world identity itself: an address no prefix covers is world.
"""

from __future__ import annotations

import bisect
import collections
import ipaddress
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ciliate.control.policy.model import CIDR_IDENTITY_BASE, WORLD_IDENTITY, PodEndpoint

__all__ = ["BlockIndex", "CidrBlock", "CidrIdentities"]

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


class BlockIndex:
    """What CIDR peers can expand to, indexed by address so a block finds the prefixes
    and hosts inside it by bisection, not by scanning them all."""

    def __init__(
        self,
        *,
        cidr_ids: Mapping[Network, int],
        pods: Sequence[PodEndpoint],
        node_identities: Mapping[ipaddress.IPv4Address, int],
    ) -> None:
        self._prefixes = sorted(
            (int(p.network_address), p.prefixlen, identity) for p, identity in cidr_ids.items()
        )
        hosts = [(int(pod.ip), pod.identity) for pod in pods if pod.ip is not None]
        # How many pods carry each identity: a block must hold them all (expand).
        self._pods_per_identity = collections.Counter(identity for _, identity in hosts)
        hosts += [(int(address), identity) for address, identity in node_identities.items()]
        self._hosts = sorted(hosts)

    @staticmethod
    def _span(network: Network) -> tuple[int, int]:
        return int(network.network_address), int(network.broadcast_address)

    def expand(self, block: CidrBlock, *, match_pods: bool) -> set[int]:
        """The peer identities a CIDR peer allows (see the module documentation).

        With ``match_pods`` (Kubernetes ipBlock), pods and nodes inside the block count
        with their own identities. Identities are shared by pods with equal labels, so
        a pod identity counts only if the block holds every one of its pods (inside the
        cidr, in no ``except``): a pod the block does not hold is never let in through
        a labelmate. A node identity counts if one of its nodes is held and none excepted.
        """
        ids: set[int] = set()
        if block.cidr.prefixlen == 0 and not any(e.prefixlen == 0 for e in block.excepts):
            ids.add(WORLD_IDENTITY)
        low, high = self._span(block.cidr)
        excepts = [(self._span(e), e.prefixlen) for e in block.excepts]
        start = bisect.bisect_left(self._prefixes, (low, -1, -1))
        for address, length, identity in itertools.islice(self._prefixes, start, None):
            if address > high:
                break
            if length < block.cidr.prefixlen:
                continue
            if any(lo <= address <= hi and length >= e_len for (lo, hi), e_len in excepts):
                continue  # inside an except: the prefix is excluded
            ids.add(identity)
        if match_pods:
            held: collections.Counter[int] = collections.Counter()
            excepted: set[int] = set()
            start = bisect.bisect_left(self._hosts, (low, -1))
            for address, identity in itertools.islice(self._hosts, start, None):
                if address > high:
                    break
                if any(lo <= address <= hi for (lo, hi), _ in excepts):
                    excepted.add(identity)
                else:
                    held[identity] += 1
            ids |= {
                identity
                for identity, count in held.items()
                if identity not in excepted and count >= self._pods_per_identity.get(identity, 0)
            }
        return ids
