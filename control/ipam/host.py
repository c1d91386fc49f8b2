"""Host-scope IPAM: hands out pod IPv4 addresses from this node's pod CIDRs.

The node agent calls :meth:`HostIpam.allocate` / :meth:`HostIpam.release` inside its own
store transaction, so "allocate an IP + create the endpoint + ..." commits or vanishes as
one unit. HostIpam keeps no in-memory allocation state at all: every call derives what it
needs from the transaction (or, for the read-only queries, from committed store data).
So a rolled-back transaction cannot leave a stale cache behind, two HostIpam objects over
one store agree, and a restarted agent sees exactly what was committed. Deriving is cheap:
``allocate`` probes the few addresses after the cursor one key at a time and lists all
allocations only when those are taken (a crowded ring); even a full /24 searched end to
end stays around a third of a millisecond.

Allocation order follows CNI host-local: the usable addresses of the pod CIDRs, in the
configured order, form one ring; a persisted cursor remembers the last address handed
out and the search starts just after it. The first CIDR is filled before the next is
touched, and a released address is only handed out again once the ring has gone round,
so conntrack entries and peers that still remember the old pod have time to forget it.

Reserved: the network and broadcast address of every CIDR of /30 or larger, and the
router IP (the first usable address of the first CIDR, for the host side of the pod
network). /31 and /32 CIDRs have no network/broadcast address (RFC 3021): all their
addresses are usable. Pod CIDRs may change between restarts: allocations outside every
current CIDR (or on an address that is now reserved) are kept and listed by
:meth:`HostIpam.stale_allocations` until their owner releases them, and never handed out.

Store keys (values are JSON):

* ``ipam/v4/<ip>`` -> ``{"owner": "<container_id>/<ifname>", "cidr": "<pod CIDR>"}``
* ``ipam/owner/<container_id>/<ifname>`` -> ``{"ip": "<ip>"}``
* ``ipam/cursor/v4`` -> ``{"ip": "<last address handed out>"}``
"""

from __future__ import annotations

import ipaddress
import itertools
import re
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from ..store import Reader, Store, StoreDataError, Txn, decode_json

__all__ = [
    "HostIpam",
    "IpamConfigError",
    "IpamError",
    "IpamExhaustedError",
    "IpamOwnerError",
    "PoolUsage",
]

IP_PREFIX = "ipam/v4/"
OWNER_PREFIX = "ipam/owner/"
CURSOR_KEY = "ipam/cursor/v4"

# How many addresses after the cursor allocate() probes one by one before it reads all.
_PROBES = 8
_PARSE_MEMO_LIMIT = 1 << 16

# "<container_id>/<ifname>": exactly one slash, so ipam/owner/<container_id>/ lists
# every interface of one container.
_OWNER = re.compile(r"[^/\s]+/[^/\s]+")


class IpamError(Exception):
    """Base class for every host IPAM error."""


class IpamConfigError(IpamError, ValueError):
    """The pod CIDRs are unusable; the message says what to change."""


class IpamOwnerError(IpamError, ValueError):
    """An owner is not of the form ``<container_id>/<ifname>``."""


class IpamExhaustedError(IpamError):
    """Every usable address of every pod CIDR is in use."""


@dataclass(frozen=True)
class PoolUsage:
    """How full one pod CIDR is.

    ``capacity`` counts the addresses pods can get (reserved ones excluded); ``used`` the
    live allocations among them. A ``removed`` CIDR is one that is no longer configured but
    still has allocations: ``used`` counts those, ``capacity`` is 0 since nothing new is
    handed out there.
    """

    cidr: IPv4Network
    used: int
    capacity: int
    removed: bool = False


@dataclass(frozen=True)
class _Range:
    """The addresses pods may get from one pod CIDR, as inclusive integers."""

    cidr: IPv4Network
    first: int
    last: int

    @property
    def capacity(self) -> int:
        return max(0, self.last - self.first + 1)

    def __contains__(self, address: int) -> bool:
        return self.first <= address <= self.last


def _parse_cidrs(pod_cidrs: Sequence[IPv4Network | str]) -> list[IPv4Network]:
    if isinstance(pod_cidrs, str | IPv4Network):
        pod_cidrs = [pod_cidrs]  # a lone CIDR is an easy slip; accept it
    nets: list[IPv4Network] = []
    for cidr in pod_cidrs:
        try:
            net = ipaddress.ip_network(cidr) if isinstance(cidr, str) else cidr
        except ValueError as exc:
            raise IpamConfigError(f"pod CIDR {cidr!r} is not a valid CIDR: {exc}") from exc
        if not isinstance(net, IPv4Network):
            raise IpamConfigError(f"pod CIDR {cidr} is not IPv4; HostIpam handles IPv4 only")
        for other in nets:
            if net.overlaps(other):
                raise IpamConfigError(f"pod CIDRs {other} and {net} overlap; list each once")
        nets.append(net)
    if not nets:
        raise IpamConfigError("no pod CIDR given; the node needs at least one")
    return nets


def _usable(net: IPv4Network) -> tuple[int, int]:
    first, last = int(net.network_address), int(net.broadcast_address)
    if net.prefixlen <= 30:
        return first + 1, last - 1
    return first, last  # RFC 3021: /31 and /32 have no network or broadcast address


def _ip_from_key(key: str, prefix: str) -> IPv4Address:
    return IPv4Address(_int_from_key(key, prefix))


def _text(address: int) -> str:
    return socket.inet_ntoa(address.to_bytes(4, "big"))


def _int_from_key(key: str, prefix: str) -> int:
    text = key[len(prefix) :]
    # inet_aton is ~10x faster than IPv4Address(); the round trip rejects the non-dotted
    # forms it also accepts ("10.1"), so only canonical keys pass.
    try:
        packed = socket.inet_aton(text)
    except OSError:
        packed = b""
    if not packed or socket.inet_ntoa(packed) != text:
        raise StoreDataError(f"IPAM key {key!r} does not end in an IPv4 address")
    return int.from_bytes(packed, "big")


def _field(key: str, doc: object, name: str) -> str:
    value = doc.get(name) if isinstance(doc, dict) else None
    if not isinstance(value, str):
        raise StoreDataError(f"IPAM record {key!r} has no string {name!r}: {doc!r}")
    return value


def _check_owner(owner: str) -> None:
    if not isinstance(owner, str) or not owner.isprintable() or not _OWNER.fullmatch(owner):
        raise IpamOwnerError(
            f"IPAM owner must be '<container_id>/<ifname>' (printable, no spaces), not {owner!r}"
        )


class HostIpam:
    """Pod IPv4 allocation for one node; see the module documentation."""

    def __init__(self, store: Store, pod_cidrs: Sequence[IPv4Network | str]) -> None:
        self._store = store
        self.pod_cidrs: tuple[IPv4Network, ...] = tuple(_parse_cidrs(pod_cidrs))
        first, last = _usable(self.pod_cidrs[0])
        self.router_ip: IPv4Address = IPv4Address(first)
        ranges = [_Range(self.pod_cidrs[0], first + 1, last)]
        ranges += [_Range(net, *_usable(net)) for net in self.pod_cidrs[1:]]
        self._ranges = tuple(ranges)
        # Only non-empty ranges take part in the ring (a /32 first CIDR is all router).
        self._ring = tuple(r for r in ranges if r.capacity)
        self._parsed_keys: dict[str, int] = {}
        if not self._ring:
            raise IpamConfigError(
                f"pod CIDR {self.pod_cidrs[0]} holds only the router IP {self.router_ip} "
                "and no address for pods; give the node a /30 or larger pod CIDR"
            )

    @property
    def capacity(self) -> int:
        """How many pods the configured CIDRs can address at once."""
        return sum(r.capacity for r in self._ranges)

    def allocate(self, txn: Txn, *, owner: str) -> IPv4Address:
        """The address of ``owner`` (``<container_id>/<ifname>``), allocating one if it has
        none; written in ``txn``. Idempotent: the same owner always gets the same address.

        Raises :class:`IpamExhaustedError` when every usable address is taken.
        """
        _check_owner(owner)
        existing = self._owned(txn, owner)
        if existing is not None:
            return existing  # a retried CNI ADD must get the address it already has
        candidate = self._free_address(txn, owner)
        ip = IPv4Address(candidate)
        cidr = next(r.cidr for r in self._ring if candidate in r)
        txn.put_json(f"{IP_PREFIX}{ip}", {"owner": owner, "cidr": str(cidr)})
        txn.put_json(f"{OWNER_PREFIX}{owner}", {"ip": str(ip)})
        txn.put_json(CURSOR_KEY, {"ip": str(ip)})
        return ip

    def release(self, txn: Txn, *, owner: str) -> IPv4Address | None:
        """Free the address of ``owner`` in ``txn``; the address it had, or ``None`` if it
        had none (so a repeated CNI DEL is harmless)."""
        _check_owner(owner)
        owner_key = f"{OWNER_PREFIX}{owner}"
        ip = self._owned(txn, owner)
        if ip is None:
            return None
        txn.delete(owner_key)
        ip_key = f"{IP_PREFIX}{ip}"
        # Only drop the address record if it is really this owner's; a mismatch would be
        # store damage, and deleting another owner's record would double-allocate.
        if (doc := txn.get_json(ip_key)) is not None and _field(ip_key, doc, "owner") == owner:
            txn.delete(ip_key)
        return ip

    def owner_of(self, ip: IPv4Address | str, *, txn: Txn | None = None) -> str | None:
        """Who holds ``ip`` (committed data, or ``txn``'s view), ``None`` if nobody."""
        address = IPv4Address(ip)
        key = f"{IP_PREFIX}{address}"
        doc = self._reader(txn).get_json(key)
        return None if doc is None else _field(key, doc, "owner")

    def ip_of(self, owner: str, *, txn: Txn | None = None) -> IPv4Address | None:
        """The address ``owner`` holds, ``None`` if it holds none."""
        _check_owner(owner)
        return self._owned(self._reader(txn), owner)

    def allocations(self, *, txn: Txn | None = None) -> dict[IPv4Address, str]:
        """Every live allocation, address -> owner, including stale ones."""
        return {
            _ip_from_key(key, IP_PREFIX): owner
            for key, owner, _ in self._records(self._reader(txn))
        }

    def stale_allocations(self, *, txn: Txn | None = None) -> dict[IPv4Address, str]:
        """Allocations the current pod CIDRs would never hand out: their CIDR was removed,
        or their address is now reserved. Kept until their owner releases them."""
        return {
            ip: owner
            for ip, owner in self.allocations(txn=txn).items()
            if not any(int(ip) in r for r in self._ranges)
        }

    def usage(self, *, txn: Txn | None = None) -> list[PoolUsage]:
        """Per configured CIDR (in order), then per removed CIDR that still has
        allocations: how many addresses are used out of how many."""
        used = dict.fromkeys(self.pod_cidrs, 0)
        removed: dict[IPv4Network, int] = {}
        for key, _, cidr_text in self._records(self._reader(txn)):
            address = _int_from_key(key, IP_PREFIX)
            current = next((r for r in self._ranges if address in r), None)
            if current is not None:
                used[current.cidr] += 1
            elif not any(IPv4Address(address) in net for net in self.pod_cidrs):
                cidr = _record_cidr(cidr_text, address)
                removed[cidr] = removed.get(cidr, 0) + 1
            # else: a now-reserved address inside a current CIDR; see stale_allocations().
        pools = [PoolUsage(r.cidr, used[r.cidr], r.capacity) for r in self._ranges]
        pools += [
            PoolUsage(cidr, count, 0, removed=True) for cidr, count in sorted(removed.items())
        ]
        return pools

    # -- internals -------------------------------------------------------------------------

    def _reader(self, txn: Txn | None) -> Reader:
        return self._store if txn is None else txn

    def _owned(self, reader: Reader, owner: str) -> IPv4Address | None:
        key = f"{OWNER_PREFIX}{owner}"
        doc = reader.get_json(key)
        if doc is None:
            return None
        try:
            return IPv4Address(_field(key, doc, "ip"))
        except ValueError as exc:
            raise StoreDataError(f"IPAM record {key!r} holds a bad address: {doc!r}") from exc

    def _records(self, reader: Reader) -> Iterator[tuple[str, str, str | None]]:
        """(key, owner, cidr) of every address record."""
        for key, raw in reader.list(IP_PREFIX):
            doc = decode_json(key, raw)
            cidr = doc.get("cidr") if isinstance(doc, dict) else None
            yield key, _field(key, doc, "owner"), cidr if isinstance(cidr, str) else None

    def _free_address(self, txn: Txn, owner: str) -> int:
        candidates = self._candidates(self._cursor(txn))
        # Usually the address after the cursor is free: probing a few directly is far
        # cheaper than reading every allocation ...
        for candidate in itertools.islice(candidates, _PROBES):
            if txn.get(f"{IP_PREFIX}{_text(candidate)}") is None:
                return candidate
        # ... which only a crowded ring needs; the generator resumes after the probes.
        taken = {self._parse_key(key) for key, _ in txn.list(IP_PREFIX)}
        for candidate in candidates:
            if candidate not in taken:
                return candidate
        raise IpamExhaustedError(self._exhausted_message(owner, taken))

    def _parse_key(self, key: str) -> int:
        # Parsing dominates a crowded allocate; a key always means the same address, so
        # memoising is safe whatever transactions commit or roll back.
        address = self._parsed_keys.get(key)
        if address is None:
            if len(self._parsed_keys) >= _PARSE_MEMO_LIMIT:
                self._parsed_keys.clear()
            address = self._parsed_keys[key] = _int_from_key(key, IP_PREFIX)
        return address

    def _cursor(self, txn: Txn) -> int | None:
        doc = txn.get_json(CURSOR_KEY)
        if doc is None:
            return None
        try:
            return int(IPv4Address(_field(CURSOR_KEY, doc, "ip")))
        except ValueError:
            return None  # a damaged cursor only costs the rotation, not correctness

    def _candidates(self, cursor: int | None) -> Iterator[int]:
        """Every allocatable address once, in ring order, starting just after ``cursor``."""
        ring = self._ring
        start, start_at = 0, ring[0].first
        if cursor is not None:
            for index, r in enumerate(ring):
                if cursor in r:
                    start, start_at = index, cursor + 1
                    break
        count = len(ring)
        for step in range(count + 1):
            r = ring[(start + step) % count]
            if step == 0:
                yield from range(start_at, r.last + 1)
            elif step == count:
                yield from range(r.first, start_at)  # wrapped round: the skipped head
            else:
                yield from range(r.first, r.last + 1)

    def _exhausted_message(self, owner: str, taken: set[int]) -> str:
        parts = []
        for r in self._ranges:
            in_use = sum(1 for address in taken if address in r)
            parts.append(f"{r.cidr} has {r.capacity} addresses for pods, {in_use} in use")
        return (
            f"no free pod IP address for {owner}: " + "; ".join(parts) + ". "
            "Add a pod CIDR to this node or delete pods on it to free addresses."
        )


def _record_cidr(cidr_text: str | None, address: int) -> IPv4Network:
    """The CIDR an allocation was made from; its /32 if the record does not say."""
    if cidr_text is not None:
        try:
            return IPv4Network(cidr_text)
        except ValueError:
            pass
    return IPv4Network(address)
