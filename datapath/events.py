"""Decoding of ciliate_events ring buffer records: drops, traces, policy
verdicts and service translations (a record of their own, struct
ciliate_lb_event, told apart by the type byte both records start with)."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from ciliate.datapath import abi, tables

_PROTOCOLS = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp", socket.IPPROTO_ICMP: "icmp"}
_PROTOCOLS[132] = "sctp"  # socket.IPPROTO_SCTP is missing on some builds


def protocol_name(protocol: int) -> str:
    return _PROTOCOLS.get(protocol, f"proto {protocol}")


_LB_EVENT = abi.constant("CILIATE_EVENT_LB")
# enum ciliate_lb_xlate: kind -> (name, text beside the enumerator).
_XLATE_KINDS = {
    value: (name.removeprefix("CILIATE_LB_XLATE_").lower(), abi.description(name))
    for name, value in abi.enum_members("ciliate_lb_xlate").items()
}


def _addr(value: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(value.to_bytes(4, "little"))  # network order in memory


@dataclass(frozen=True)
class SocketAddress:
    """One end of a translated tuple; address 0 / port 0 where unknown."""

    address: ipaddress.IPv4Address
    port: int

    def __str__(self) -> str:
        return f"{self.address}:{self.port}"


@dataclass(frozen=True)
class Translation:
    """What a service translation did: the tuple as it came, as it went on."""

    kind: str  # local, remote, reply, socket (enum ciliate_lb_xlate)
    protocol: int
    service_id: int  # the rev-NAT id; 0 = not known (replies)
    backend_id: int  # 0 = not known (replies)
    orig_source: SocketAddress
    orig_destination: SocketAddress
    source: SocketAddress
    destination: SocketAddress

    @property
    def text(self) -> str:
        """'10.96.0.10:80 => 10.244.1.10:8080 (to a backend on this node (DNAT))'."""
        described = next((d for n, d in _XLATE_KINDS.values() if n == self.kind), self.kind)
        proto = protocol_name(self.protocol)
        if self.kind == "socket":  # no packet: the address asked for and the backend given
            return f"{proto} {self.orig_destination} => {self.destination} ({described})"
        return (
            f"{proto} {self.orig_source} -> {self.orig_destination} => "
            f"{self.source} -> {self.destination} ({described})"
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "protocol": protocol_name(self.protocol),
            "service_id": self.service_id,
            "backend_id": self.backend_id,
            "original": {
                "source": str(self.orig_source),
                "destination": str(self.orig_destination),
            },
            "translated": {"source": str(self.source), "destination": str(self.destination)},
        }


def _translation(data: bytes) -> Translation:
    """The translation a ciliate_lb_event record carries."""
    head = abi.unpack("ciliate_lb_event", data)
    size = abi.sizeof("ciliate_lb_tuple")
    tuples = {}
    for name in ("orig", "xlated"):
        offset = abi.offsetof("ciliate_lb_event", name)
        tuples[name] = abi.unpack("ciliate_lb_tuple", data[offset : offset + size])

    def end(name: str, addr: str, port: str) -> SocketAddress:
        return SocketAddress(_addr(tuples[name][addr]), socket.ntohs(tuples[name][port]))

    kind = head["kind"]
    return Translation(
        kind=_XLATE_KINDS.get(kind, (f"kind {kind}", ""))[0],
        protocol=tuples["orig"]["protocol"],
        service_id=head["rev_nat_id"],
        backend_id=head["backend_id"],
        orig_source=end("orig", "saddr", "sport"),
        orig_destination=end("orig", "daddr", "dport"),
        source=end("xlated", "saddr", "sport"),
        destination=end("xlated", "daddr", "dport"),
    )


@dataclass(frozen=True)
class Event:
    type: int
    reason: int  # drop reason, trace point for traces, 0 for policy verdicts
    direction: int  # of the program; of the deciding policy for policy drops and verdicts
    source: str  # file of the drop site ('' for others)
    line: int
    ifindex: int
    target_ifindex: int
    orig_len: int
    ktime_ns: int
    data: bytes  # first bytes of the packet
    # Set when the policy stage looked at the packet (0 = not looked up).
    src_identity: int = 0
    dst_identity: int = 0
    protocol: int = 0
    dport: int = 0
    translation: Translation | None = None  # service translation records only

    @property
    def is_drop(self) -> bool:
        return self.type == tables.EventType["DROP"]

    @property
    def is_policy_verdict(self) -> bool:
        return self.type == tables.EventType["POLICY"]

    @property
    def kind(self) -> str:
        """'drop', 'trace', 'policy' (an allowed new connection) or 'lb' (a
        service translation)."""
        return tables.EventType(self.type).name.lower()

    @property
    def policy(self) -> str:
        """'identity 1001 -> 1002 tcp/80 (ingress)', or '' when no policy was looked at."""
        if not (self.src_identity or self.dst_identity):
            return ""
        where = tables.Direction(self.direction).name.lower()
        return (
            f"identity {self.src_identity} -> {self.dst_identity} "
            f"{protocol_name(self.protocol)}/{self.dport} ({where})"
        )

    @property
    def summary(self) -> str:
        if self.is_drop:
            text = f"DROP {tables.describe_reason(self.reason)} ({self.source}:{self.line})"
            return f"{text} {self.policy}" if self.policy else text
        if self.is_policy_verdict:
            return f"POLICY allowed {self.policy}"
        if self.translation is not None:
            return f"LB {self.translation.text}"
        return f"TRACE {tables.describe_trace(self.reason)}"

    @classmethod
    def from_bytes(cls, data: bytes) -> Event:
        if data[:1] == bytes([_LB_EVENT]):
            lb = abi.unpack("ciliate_lb_event", data)
            translation = _translation(data)
            return cls(
                type=lb["type"],
                reason=lb["kind"],
                direction=lb["direction"],
                source="",
                line=0,
                ifindex=lb["ifindex"],
                target_ifindex=0,
                orig_len=0,
                ktime_ns=lb["ktime_ns"],
                data=b"",
                protocol=translation.protocol,
                dport=translation.destination.port,
                translation=translation,
            )
        f = abi.unpack("ciliate_event", data)
        is_drop = f["type"] == tables.EventType["DROP"]
        return cls(
            type=f["type"],
            reason=f["reason"],
            direction=f["direction"],
            source=tables.source_file(f["source"]) if is_drop else "",
            line=f["line"],
            ifindex=f["ifindex"],
            target_ifindex=f["target_ifindex"],
            orig_len=f["orig_len"],
            ktime_ns=f["ktime_ns"],
            data=f["data"][: f["cap_len"]],
            src_identity=f["src_identity"],
            dst_identity=f["dst_identity"],
            protocol=f["protocol"],
            dport=f["dport"],
        )
