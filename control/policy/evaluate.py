"""The reference evaluator: the decision the BPF datapath makes, in Python.

A packet from A to B passes A's egress policy with B's identity as the peer, then
B's ingress policy with A's identity as the peer; each peer identity is what the
ipcache's longest matching prefix says, world (2) when nothing matches. A direction
passes if it is not enforced, or if no deny entry matches (the peer's identity or
identity 0, its protocol and port) and some allow entry does. :func:`trace` says
which rule (or which default) decided, for ``ciliate policy trace``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ciliate.control.policy.model import (
    PROTOCOL_NAMES,
    PROTOCOL_NUMBERS,
    WORLD_IDENTITY,
    Direction,
    EndpointPolicy,
    PodEndpoint,
    PolicyEntry,
    PolicyResult,
    covers,
    describe,
)

__all__ = ["Ipcache", "Trace", "Verdict", "decide", "parse_port", "trace"]


@dataclass(frozen=True)
class Ipcache:
    """Prefix -> identity, looked up by longest prefix, as the datapath's ipcache."""

    entries: Mapping[ipaddress.IPv4Network, int]

    @classmethod
    def build(
        cls,
        *,
        pods: Sequence[PodEndpoint],
        result: PolicyResult,
        node_identities: Mapping[ipaddress.IPv4Address, int] | None = None,
    ) -> Ipcache:
        entries = dict(result.cidr_identities)
        for address, identity in (node_identities or {}).items():
            entries[ipaddress.IPv4Network(address)] = identity
        for pod in pods:
            if pod.ip is not None:
                entries[ipaddress.IPv4Network(pod.ip)] = pod.identity
        return cls(entries)

    def lookup(self, address: ipaddress.IPv4Address) -> int:
        best: tuple[int, int] | None = None
        for prefix, identity in self.entries.items():
            if address in prefix and (best is None or prefix.prefixlen > best[0]):
                best = (prefix.prefixlen, identity)
        return WORLD_IDENTITY if best is None else best[1]


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    direction: Direction
    endpoint: str
    peer_identity: int
    entry: PolicyEntry | None  # the entry that decided; None for a default
    because: str

    def __str__(self) -> str:
        word = "allowed" if self.allowed else "denied"
        return f"{self.direction} at {self.endpoint}: {word}: {self.because}"


def decide(
    policy: EndpointPolicy | None,
    *,
    endpoint: str,
    direction: Direction,
    peer_identity: int,
    protocol: int,
    port: int,
) -> Verdict:
    """The datapath's decision for one direction at one endpoint."""
    if policy is None or not policy.enforced(direction):
        return Verdict(
            True,
            direction,
            endpoint,
            peer_identity,
            None,
            f"no policy selects {endpoint} for {direction} (not enforced: default allow)",
        )

    def matching(deny: bool) -> PolicyEntry | None:
        for entry in policy.entries:
            if (
                entry.direction == direction
                and entry.deny == deny
                and entry.identity in (0, peer_identity)
                and covers(entry, protocol=protocol, port=port)
            ):
                return entry
        return None

    def origin(entry: PolicyEntry) -> str:
        refs = policy.origins.get(entry, ())
        return " and ".join(str(r) for r in refs) or "an entry of unknown origin"

    if (deny := matching(True)) is not None:
        return Verdict(
            False, direction, endpoint, peer_identity, deny, f"{origin(deny)} ({describe(deny)})"
        )
    if (allow := matching(False)) is not None:
        return Verdict(
            True, direction, endpoint, peer_identity, allow, f"{origin(allow)} ({describe(allow)})"
        )
    isolating = ", ".join(policy.isolated_by.get(direction, ())) or "a policy"
    proto = PROTOCOL_NAMES.get(protocol, str(protocol))
    return Verdict(
        False,
        direction,
        endpoint,
        peer_identity,
        None,
        f"{endpoint} is isolated for {direction} by {isolating} and no rule allows identity "
        f"{peer_identity} {proto}/{port} (default deny)",
    )


@dataclass(frozen=True)
class Trace:
    allowed: bool
    verdicts: tuple[Verdict, ...]

    def lines(self) -> list[str]:
        return [str(v) for v in self.verdicts] + [
            "verdict: " + ("ALLOWED" if self.allowed else "DENIED")
        ]


def trace(
    result: PolicyResult,
    *,
    src: PodEndpoint,
    dst: PodEndpoint,
    protocol: int,
    port: int,
    ipcache: Ipcache,
) -> Trace:
    """Source egress, then destination ingress (the first denial decides)."""
    dst_identity = ipcache.lookup(dst.ip) if dst.ip is not None else dst.identity
    src_identity = ipcache.lookup(src.ip) if src.ip is not None else src.identity
    verdicts = [
        decide(
            result.endpoints.get(src.ref),
            endpoint=src.ref,
            direction="egress",
            peer_identity=dst_identity,
            protocol=protocol,
            port=port,
        )
    ]
    if verdicts[0].allowed:
        verdicts.append(
            decide(
                result.endpoints.get(dst.ref),
                endpoint=dst.ref,
                direction="ingress",
                peer_identity=src_identity,
                protocol=protocol,
                port=port,
            )
        )
    return Trace(all(v.allowed for v in verdicts), tuple(verdicts))


def parse_port(text: str) -> tuple[int, int]:
    """``80/tcp`` (or ``80``, TCP) -> (protocol number, port)."""
    number, _, name = text.partition("/")
    protocol = PROTOCOL_NUMBERS.get((name or "tcp").upper())
    if protocol is None or not number.isdigit() or not 0 < int(number) <= 65535:
        raise ValueError(f"{text!r} is not PORT[/tcp|udp|sctp], e.g. 80/tcp")
    return protocol, int(number)
