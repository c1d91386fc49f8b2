"""The connection tracker (ciliate_ct) seen from user space: list, garbage
collection of expired entries, flush.

The programs keep one entry per connection, keyed by its two ends in a
fixed order, and judge a packet of a live connection without a policy
lookup (bpf/include/ciliate/conntrack.h). The map is an LRU hash, so a full
table makes room by itself; :meth:`Conntrack.gc` removes entries whose
lifetime has passed, which the programs already treat as absent.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass

from ciliate.datapath import abi
from ciliate.datapath.maps import RawMap

_F_ORIG_HI = abi.constant("CILIATE_CT_F_ORIG_HI")
_F_SEEN_REPLY = abi.constant("CILIATE_CT_F_SEEN_REPLY")
_F_CLOSING = abi.constant("CILIATE_CT_F_CLOSING")
LIFETIMES = {
    "tcp": abi.constant("CILIATE_CT_LIFETIME_TCP"),
    "syn": abi.constant("CILIATE_CT_LIFETIME_SYN"),
    "close": abi.constant("CILIATE_CT_LIFETIME_CLOSE"),
    "nontcp": abi.constant("CILIATE_CT_LIFETIME_NONTCP"),
}


def monotonic_ns() -> int:
    """The clock of bpf_ktime_get_ns(), which the entries' deadlines use."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


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
    expires_in: float  # seconds from now; <= 0: expired, awaiting gc
    seen_reply: bool
    closing: bool
    orig_revision: int  # the opener's policy revision when last verified
    reply_revision: int

    @property
    def expired(self) -> bool:
        return self.expires_in <= 0


class Conntrack:
    """ciliate_ct."""

    def __init__(self, raw: RawMap) -> None:
        self._raw = raw

    def _entries(self) -> list[tuple[bytes, dict[str, int]]]:
        out = []
        for key, value in self._raw.items():
            if isinstance(value, list):
                raise TypeError("ciliate_ct values are not per-CPU")
            out.append((key, abi.unpack("ciliate_ct_entry", value)))
        return out

    def list(self) -> list[Connection]:
        now = monotonic_ns()
        connections = []
        for key, entry in self._entries():
            k = abi.unpack("ciliate_ct_key", key)
            lo = (_addr(k["addr_lo"]), _port(k["port_lo"]))
            hi = (_addr(k["addr_hi"]), _port(k["port_hi"]))
            opener_hi = bool(entry["flags"] & _F_ORIG_HI)
            connections.append(
                Connection(
                    protocol=k["protocol"],
                    src=hi if opener_hi else lo,
                    dst=lo if opener_hi else hi,
                    expires_in=(entry["expires_ns"] - now) / 1e9,
                    seen_reply=bool(entry["flags"] & _F_SEEN_REPLY),
                    closing=bool(entry["flags"] & _F_CLOSING),
                    orig_revision=entry["orig_revision"],
                    reply_revision=entry["reply_revision"],
                )
            )
        return sorted(connections, key=lambda c: (c.protocol, c.src, c.dst))

    def gc(self) -> int:
        """Remove expired entries; returns how many went."""
        now = monotonic_ns()
        removed = 0
        for key, entry in self._entries():
            if entry["expires_ns"] > now:
                continue
            # Read again just before deleting: a packet may have revived it.
            value = self._raw.lookup(key)
            if not isinstance(value, bytes):
                continue
            if abi.unpack("ciliate_ct_entry", value)["expires_ns"] <= now:
                removed += self._raw.delete(key)
        return removed

    def flush(self) -> int:
        """Remove every entry (connections are judged afresh); returns how many went."""
        removed = 0
        for key in list(self._raw.keys()):
            removed += self._raw.delete(key)
        return removed
