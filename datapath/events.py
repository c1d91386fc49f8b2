"""Decoding of ciliate_events ring buffer records (drops and traces)."""

from __future__ import annotations

from dataclasses import dataclass

from ciliate.datapath import abi, tables


@dataclass(frozen=True)
class Event:
    type: int
    reason: int  # drop reason, or trace point for traces
    direction: int
    source: str  # file of the drop site ('' for traces)
    line: int
    ifindex: int
    target_ifindex: int
    orig_len: int
    ktime_ns: int
    data: bytes  # first bytes of the packet

    @property
    def is_drop(self) -> bool:
        return self.type == tables.EventType["DROP"]

    @property
    def summary(self) -> str:
        if self.is_drop:
            return f"DROP {tables.describe_reason(self.reason)} ({self.source}:{self.line})"
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
        )
