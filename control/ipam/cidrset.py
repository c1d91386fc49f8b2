"""Fixed-size node blocks carved out of one cluster CIDR (Kubernetes nodeipam ``cidrset``).

Re-builds the semantics of Kubernetes' ``pkg/controller/nodeipam/ipam/cidrset``:

* the cluster CIDR is split into ``2 ** (node_mask - cluster_prefix)`` node blocks, one bit
  each in a bitmap;
* ``allocate_next`` hands out the first free block at or after a rotating candidate index
  and moves the candidate just past it (wrapping around), so a block that was just released
  is not handed out again until the search has gone round the whole range;
* ``occupy`` / ``release`` take a CIDR of any size that overlaps the cluster CIDR and flip
  every node block it touches; the allocated count changes only by blocks whose state
  actually changed, and neither moves the candidate index;
* for IPv6 the node mask may be at most 16 bits longer than the cluster prefix.
"""

from __future__ import annotations

import ipaddress
import re
import threading
from ipaddress import IPv4Network, IPv6Network

__all__ = [
    "CLUSTER_SUBNET_MAX_DIFF",
    "CidrMaskError",
    "CidrOutOfRangeError",
    "CidrSet",
    "CidrSetError",
    "CidrSetFullError",
    "Network",
]

Network = IPv4Network | IPv6Network

# Kubernetes caps the IPv6 block count at 2**16 (its bitmap is uncompressed); keeping the
# same cap keeps configurations portable between the two and the bitmap small.
CLUSTER_SUBNET_MAX_DIFF = 16

# Finds the first bitmap byte that still has a free bit, scanning in C rather than Python.
_HAS_FREE_BIT = re.compile(rb"[^\xff]")


class CidrSetError(Exception):
    """Base class for every CidrSet error."""


class CidrSetFullError(CidrSetError):
    """Every node block of the cluster CIDR is in use."""


class CidrOutOfRangeError(CidrSetError, ValueError):
    """The CIDR is of the other IP family or does not overlap the cluster CIDR."""


class CidrMaskError(CidrSetError, ValueError):
    """The node mask cannot be used with this cluster CIDR."""


def _parse(cidr: str | Network) -> Network:
    if isinstance(cidr, IPv4Network | IPv6Network):
        return cidr
    # Host bits are masked off, like Go's net.ParseCIDR does for Kubernetes.
    return ipaddress.ip_network(cidr, strict=False)


def _lowest_bit(x: int) -> int:
    return (x & -x).bit_length() - 1


class CidrSet:
    """Allocator of ``/node_mask`` blocks from one cluster CIDR.

    Bit ``i`` of the bitmap (bit ``i & 7`` of byte ``i >> 3``) is node block ``i``, the
    block at ``cluster_address + (i << (address_bits - node_mask))``. The padding bits past
    the last block are kept set so the free-byte scan never stops on them.
    """

    def __init__(self, cluster_cidr: str | Network, node_mask: int) -> None:
        cluster = _parse(cluster_cidr)
        if isinstance(node_mask, bool) or not isinstance(node_mask, int):
            raise CidrMaskError(f"node mask must be an integer prefix length, got {node_mask!r}")
        if node_mask < cluster.prefixlen:
            raise CidrMaskError(
                f"node mask /{node_mask} is shorter than the /{cluster.prefixlen} prefix of "
                f"cluster CIDR {cluster}: it must be at least {cluster.prefixlen}"
            )
        if node_mask > cluster.max_prefixlen:
            raise CidrMaskError(
                f"node mask /{node_mask} is longer than an IPv{cluster.version} address "
                f"({cluster.max_prefixlen} bits)"
            )
        if cluster.version == 6 and node_mask - cluster.prefixlen > CLUSTER_SUBNET_MAX_DIFF:
            raise CidrMaskError(
                f"node mask /{node_mask} is {node_mask - cluster.prefixlen} bits longer than the "
                f"/{cluster.prefixlen} prefix of IPv6 cluster CIDR {cluster}; at most "
                f"{CLUSTER_SUBNET_MAX_DIFF} is supported (use a node mask of at most "
                f"{cluster.prefixlen + CLUSTER_SUBNET_MAX_DIFF})"
            )
        self._cluster = cluster
        self._node_mask = node_mask
        self._shift = cluster.max_prefixlen - node_mask
        self._base = int(cluster.network_address)
        self._max = 1 << (node_mask - cluster.prefixlen)
        self._net_type: type[IPv4Network] | type[IPv6Network] = type(cluster)
        nbytes = (self._max + 7) >> 3
        self._used = bytearray(nbytes)
        padding = nbytes * 8 - self._max
        if padding:
            self._used[-1] = (0xFF << (8 - padding)) & 0xFF
        self._allocated = 0
        self._next = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"CidrSet({str(self._cluster)!r}, node_mask={self._node_mask}, "
            f"allocated={self._allocated}/{self._max})"
        )

    @property
    def cluster_cidr(self) -> Network:
        return self._cluster

    @property
    def node_mask(self) -> int:
        return self._node_mask

    @property
    def max_cidrs(self) -> int:
        return self._max

    @property
    def allocated_count(self) -> int:
        return self._allocated

    @property
    def free_count(self) -> int:
        return self._max - self._allocated

    @property
    def is_full(self) -> bool:
        return self._allocated == self._max

    def allocate_next(self) -> Network:
        """Mark the next free node block used and return it."""
        with self._lock:
            if self._allocated == self._max:
                raise CidrSetFullError(
                    f"no free /{self._node_mask} block left in cluster CIDR {self._cluster} "
                    f"({self._max} in use)"
                )
            index = self._find_free_from(self._next)
            if index < 0:
                # Nothing free at or after the candidate: wrap around to the start.
                index = self._find_free_from(0)
            self._used[index >> 3] |= 1 << (index & 7)
            self._allocated += 1
            self._next = (index + 1) % self._max
            return self._block(index)

    def occupy(self, cidr: str | Network) -> None:
        """Mark every node block that ``cidr`` overlaps as used (already-used ones stay so)."""
        begin, end = self._indices(cidr)
        with self._lock:
            self._allocated += self._fill(begin, end, used=True)

    def release(self, cidr: str | Network) -> None:
        """Free every node block that ``cidr`` overlaps (already-free ones stay so)."""
        begin, end = self._indices(cidr)
        with self._lock:
            self._allocated -= self._fill(begin, end, used=False)

    def allocated_in(self, cidr: str | Network) -> int:
        """How many of the node blocks that ``cidr`` overlaps are in use."""
        begin, end = self._indices(cidr)
        with self._lock:
            window, offset, _ = self._window(begin, end)
            return ((window >> offset) & ((1 << (end - begin)) - 1)).bit_count()

    def _block(self, index: int) -> Network:
        return self._net_type((self._base | (index << self._shift), self._node_mask))

    def _find_free_from(self, start: int) -> int:
        """Index of the first free block at or after ``start``, or -1."""
        buf = self._used
        byte = start >> 3
        # Only bits at or above ``start`` count in the first byte.
        free = ~buf[byte] & (0xFF << (start & 7)) & 0xFF
        if free:
            return (byte << 3) | _lowest_bit(free)
        found = _HAS_FREE_BIT.search(buf, byte + 1)
        if found is None:
            return -1
        byte = found.start()
        return (byte << 3) | _lowest_bit(~buf[byte] & 0xFF)

    def _indices(self, cidr: str | Network) -> tuple[int, int]:
        """Half-open range of node-block indices that ``cidr`` overlaps."""
        net = _parse(cidr)
        if net.version != self._cluster.version:
            raise CidrOutOfRangeError(
                f"{net} is an IPv{net.version} CIDR but cluster CIDR {self._cluster} is "
                f"IPv{self._cluster.version}"
            )
        if not net.overlaps(self._cluster):
            raise CidrOutOfRangeError(f"{net} is outside cluster CIDR {self._cluster}")
        if net.prefixlen <= self._cluster.prefixlen:
            # CIDRs never partially overlap: this one contains the whole cluster CIDR.
            return 0, self._max
        first = int(net.network_address)
        last = first | ((1 << (net.max_prefixlen - net.prefixlen)) - 1)
        return (first - self._base) >> self._shift, ((last - self._base) >> self._shift) + 1

    def _window(self, begin: int, end: int) -> tuple[int, int, slice]:
        """The bitmap bytes holding blocks [begin, end) as an int, with begin's bit offset."""
        span = slice(begin >> 3, (end + 7) >> 3)
        return int.from_bytes(self._used[span], "little"), begin & 7, span

    def _fill(self, begin: int, end: int, *, used: bool) -> int:
        """Set blocks [begin, end) to ``used``; return how many changed state."""
        # Whole-window big-int arithmetic keeps large ranges (a /8 of /32s) at C speed.
        window, offset, span = self._window(begin, end)
        mask = ((1 << (end - begin)) - 1) << offset
        updated = window | mask if used else window & ~mask
        self._used[span] = updated.to_bytes(span.stop - span.start, "little")
        return (window ^ updated).bit_count()
