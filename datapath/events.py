"""Decoding of ciliate_events ring buffer records: drops, traces and
policy verdicts."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from ciliate.datapath import abi, tables

_PROTOCOLS = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp", socket.IPPROTO_ICMP: "icmp"}
_PROTOCOLS[132] = "sctp"  # socket.IPPROTO_SCTP is missing on some builds


def protocol_name(protocol: int) -> str:
    return _PROTOCOLS.get(protocol, f"proto {protocol}")


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

    @property
    def is_drop(self) -> bool:
        return self.type == tables.EventType["DROP"]

    @property
    def is_policy_verdict(self) -> bool:
        return self.type == tables.EventType["POLICY"]

    @property
    def kind(self) -> str:
        """'drop', 'trace' or 'policy' (an allowed new connection)."""
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
        return f"TRACE {tables.describe_trace(self.reason)}"

    @classmethod
    def from_bytes(cls, data: bytes) -> Event:
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
