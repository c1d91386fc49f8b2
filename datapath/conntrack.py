"""The connection tracker (ciliate_ct_v2) seen from user space: list, garbage
collection of expired entries, flush.

The programs keep one entry per connection in a set-associative table (a
connection hashes to a set of CILIATE_CT_WAYS ways), keyed by the tuple of
the packet that opened it, and judge a packet of a live connection without
a policy lookup (bpf/include/ciliate/conntrack.h). An expired way is free for
the datapath already; :meth:`Conntrack.gc` clears expired ways so listings
show only live connections.

Deadlines are in jiffies (the programs' clock: bpf_jiffies64() is one
load); :func:`now` and :func:`hz` read the kernel's jiffies counter and
CONFIG_HZ from /proc.
"""

from __future__ import annotations

import functools
import gzip
import ipaddress
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ciliate.datapath import abi
from ciliate.datapath.maps import RawMap
from ciliate.datapath.pod_connections import OpenConnection

WAYS = abi.constant("CILIATE_CT_WAYS")
_F_SEEN_REPLY = abi.constant("CILIATE_CT_F_SEEN_REPLY")
_F_CLOSING = abi.constant("CILIATE_CT_F_CLOSING")
LIFETIMES = {
    "tcp": abi.constant("CILIATE_CT_LIFETIME_TCP"),
    "syn": abi.constant("CILIATE_CT_LIFETIME_SYN"),
    "close": abi.constant("CILIATE_CT_LIFETIME_CLOSE"),
    "nontcp": abi.constant("CILIATE_CT_LIFETIME_NONTCP"),
}
_ENTRY = abi.sizeof("ciliate_ct_entry")
_SET = abi.sizeof("ciliate_ct_set")
_KEY = abi.sizeof("ciliate_ct_key")
_EMPTY_KEY = bytes(_KEY)
_EXPIRES = struct.Struct("<Q")
_EXPIRES_AT = abi.offsetof("ciliate_ct_entry", "expires")


_JIFFIES = re.compile(rb"^jiffies: (\d+)$", re.M)
_CONFIG_HZ = re.compile(rb"^CONFIG_HZ=(\d+)$", re.M)


class ClockError(RuntimeError):
    """The kernel's jiffies or HZ cannot be read."""


def now() -> int:
    """The kernel's jiffies counter, the clock of the entries' deadlines."""
    try:
        match = _JIFFIES.search(Path("/proc/timer_list").read_bytes())
    except OSError as exc:
        raise ClockError(f"cannot read jiffies from /proc/timer_list: {exc}") from exc
    if match is None:
        raise ClockError("/proc/timer_list has no jiffies line")
    return int(match.group(1))


@functools.cache
def hz() -> int:
    """CONFIG_HZ, as libbpf resolved it for the programs (/proc/config.gz)."""
    try:
        config = gzip.decompress(Path("/proc/config.gz").read_bytes())
    except OSError as exc:
        raise ClockError(f"cannot read CONFIG_HZ from /proc/config.gz: {exc}") from exc
    match = _CONFIG_HZ.search(config)
    if match is None:
        raise ClockError("/proc/config.gz has no CONFIG_HZ")
    return int(match.group(1))


_GOLDEN = 0x9E3779B97F4A7C15
_U64 = (1 << 64) - 1


def set_index(key: bytes, sets: int) -> int:
    """The set of a connection whose ``ciliate_ct_key`` (either orientation) is ``key``:
    ct_set_of() in conntrack.h, which this must follow exactly (a test checks it
    against the datapath)."""
    addrs = int.from_bytes(key[0:4], "little") ^ int.from_bytes(key[4:8], "little")
    ports32 = int.from_bytes(key[8:12], "little")
    ports = (ports32 ^ (ports32 >> 16)) & 0xFFFF
    h = ((addrs << 32 | ports << 8 | key[12]) * _GOLDEN) & _U64
    return h >> (64 - (sets.bit_length() - 1))


def _key(
    protocol: int, src: tuple[ipaddress.IPv4Address, int], dst: tuple[ipaddress.IPv4Address, int]
) -> bytes:
    """A ciliate_ct_key: addresses and ports as they sit in the headers (a test
    checks the layout against abi.h)."""
    return src[0].packed + dst[0].packed + struct.pack("!HHB3x", src[1], dst[1], protocol)


def _reversed_key(key: bytes) -> bytes:
    return key[4:8] + key[0:4] + key[10:12] + key[8:10] + key[12:]


def _addr(value: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(value.to_bytes(4, "little"))


def _port(value: int) -> int:
    return int.from_bytes(value.to_bytes(2, "little"), "big")


@dataclass(frozen=True)
class Connection:
    """One tracked connection, from the end that opened it."""

    protocol: int
    src: tuple[ipaddress.IPv4Address, int]  # the opener (ICMP echo: its id)
    dst: tuple[ipaddress.IPv4Address, int]
    expires_in: float  # seconds from now; <= 0: expired (a free way)
    seen_reply: bool
    closing: bool
    orig_revision: int  # the opener's policy revision when last verified
    reply_revision: int
    orig_identity: int  # the opener's identity when last verified
    reply_identity: int

    @property
    def expired(self) -> bool:
        return self.expires_in <= 0


@dataclass(frozen=True)
class Way:
    """Where an entry sits: its set (the array index) and way."""

    set_index: int
    way: int


class Conntrack:
    """ciliate_ct_v2."""

    def __init__(self, raw: RawMap) -> None:
        self._raw = raw

    def _used_sets(self) -> Iterator[tuple[int, bytes]]:
        """(set index, set bytes) of every set with a way in use: one batch
        scan, empty chunks skipped at C speed."""
        for keys, values, count in self._raw.lookup_batch_raw():
            if not values[: count * _SET].strip(b"\x00"):
                continue
            for i in range(count):
                value = values[i * _SET : (i + 1) * _SET]
                if value.strip(b"\x00"):
                    yield int.from_bytes(keys[i * 4 : i * 4 + 4], "little"), value

    def entries(self) -> Iterator[tuple[Way, dict[str, int], dict[str, int]]]:
        """Every way holding a key (live or expired): where, key, entry."""
        for index, value in self._used_sets():
            for way in range(WAYS):
                raw = value[way * _ENTRY : (way + 1) * _ENTRY]
                if raw[:_KEY] != _EMPTY_KEY:
                    yield (
                        Way(index, way),
                        abi.unpack("ciliate_ct_key", raw[:_KEY]),
                        abi.unpack("ciliate_ct_entry", raw),
                    )

    def list(self, *, include_expired: bool = True) -> list[Connection]:
        ticks, per_second = now(), hz()
        connections = []
        for _, key, entry in self.entries():
            connection = Connection(
                protocol=key["protocol"],
                src=(_addr(key["saddr"]), _port(key["sport"])),
                dst=(_addr(key["daddr"]), _port(key["dport"])),
                expires_in=(entry["expires"] - ticks) / per_second,
                seen_reply=bool(entry["flags"] & _F_SEEN_REPLY),
                closing=bool(entry["flags"] & _F_CLOSING),
                orig_revision=entry["orig_revision"],
                reply_revision=entry["reply_revision"],
                orig_identity=entry["orig_identity"],
                reply_identity=entry["reply_identity"],
            )
            if include_expired or not connection.expired:
                connections.append(connection)
        return sorted(connections, key=lambda c: (c.protocol, c.src, c.dst))

    def _rewrite(self, index: int, *, expired_before: int) -> int:
        """Clear the ways of set `index` that expired before `expired_before`;
        returns how many went. The set is
        read again just before it is written back: the datapath may have
        used it meanwhile (a way it fills in that instant is lost, and its
        connection judged again as new)."""
        key = index.to_bytes(4, "little")
        raw = self._raw.lookup(key)
        if not isinstance(raw, bytes):
            return 0
        value = bytearray(raw)
        cleared = 0
        for way in range(WAYS):
            at = way * _ENTRY
            if bytes(value[at : at + _KEY]) == _EMPTY_KEY:
                continue
            entry = abi.unpack("ciliate_ct_entry", bytes(value[at : at + _ENTRY]))
            if entry["expires"] <= expired_before:
                value[at : at + _ENTRY] = bytes(_ENTRY)
                cleared += 1
        if cleared:
            self._raw.update(key, bytes(value))
        return cleared

    def gc(self) -> int:
        """Clear expired ways; returns how many went."""
        ticks = now()
        stale = {way.set_index for way, _, entry in self.entries() if entry["expires"] <= ticks}
        return sum(self._rewrite(index, expired_before=ticks) for index in sorted(stale))

    def flush(self) -> int:
        """Forget every connection (each is judged afresh); returns how many went."""
        removed = 0
        for index, _ in list(self._used_sets()):
            removed += self._rewrite(index, expired_before=2**64 - 1)
        return removed

    def adopt(self, connections: Iterable[OpenConnection]) -> int:
        """Track connections the datapath has not seen open (read from a pod's
        sockets when policy starts to apply to it: :mod:`ciliate.datapath.pod_connections`),
        each keyed from its opener with a verification that matches nothing, so its
        next packet judges it as its opener sent it. A connection the table holds
        already keeps its entry; one whose set has no free or expired way is left
        out (its packets are judged as they come, as before). Returns how many were
        adopted. Like :meth:`gc`, it writes whole sets: a way the datapath fills in
        that same instant is lost, and its connection judged again as new."""
        ticks, per_second = now(), hz()
        by_set: dict[int, list[OpenConnection]] = {}
        for connection in connections:
            key = _key(connection.protocol, connection.opener, connection.other)
            by_set.setdefault(set_index(key, self._raw.max_entries), []).append(connection)
        adopted = 0
        for index, arriving in by_set.items():
            raw = self._raw.lookup(index.to_bytes(4, "little"))
            if not isinstance(raw, bytes):
                continue
            value = bytearray(raw)
            taken = 0
            for connection in arriving:
                key = _key(connection.protocol, connection.opener, connection.other)
                keys = {bytes(value[w * _ENTRY : w * _ENTRY + _KEY]) for w in range(WAYS)}
                if key in keys or _reversed_key(key) in keys:
                    continue
                free = next(
                    (
                        w
                        for w in range(WAYS)
                        if _EXPIRES.unpack_from(value, w * _ENTRY + _EXPIRES_AT)[0] <= ticks
                    ),
                    None,
                )
                if free is None:
                    continue
                flags = (_F_SEEN_REPLY if connection.answered else 0) | (
                    _F_CLOSING if connection.closing else 0
                )
                lifetime = per_second * self._lifetime(connection.protocol, flags)
                entry = abi.pack(
                    "ciliate_ct_entry", expires=ticks + lifetime, flags=flags, lifetime=lifetime
                )
                value[free * _ENTRY : (free + 1) * _ENTRY] = key + entry[_KEY:]
                taken += 1
            if taken:
                self._raw.update(index.to_bytes(4, "little"), bytes(value))
                adopted += taken
        return adopted

    @staticmethod
    def _lifetime(protocol: int, flags: int) -> int:
        """Seconds: ct_lifetime() in conntrack.h."""
        if protocol != 6:  # IPPROTO_TCP
            return LIFETIMES["nontcp"]
        if flags & _F_CLOSING:
            return LIFETIMES["close"]
        return LIFETIMES["tcp"] if flags & _F_SEEN_REPLY else LIFETIMES["syn"]

    def delete(self, way: Way) -> None:
        """Forget the connection in one way (it is judged afresh)."""
        self._patch(way, 0, bytes(_ENTRY))

    def set_expiry(self, way: Way, expires: int) -> None:
        """Move one entry's deadline, in jiffies (tests age connections with it)."""
        offset = abi.offsetof("ciliate_ct_entry", "expires")
        self._patch(way, offset, expires.to_bytes(8, "little"))

    def _patch(self, way: Way, offset: int, data: bytes) -> None:
        key = way.set_index.to_bytes(4, "little")
        raw = self._raw.lookup(key)
        if not isinstance(raw, bytes):
            raise KeyError(f"no conntrack set {way.set_index}")
        value = bytearray(raw)
        at = way.way * _ENTRY + offset
        value[at : at + len(data)] = data
        self._raw.update(key, bytes(value))
