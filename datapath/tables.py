"""The numbered tables of abi.h as Python enums: drop reasons, trace points,
directions, event types and source files.

Built from the header at import, so C and Python share one table; the
``describe`` functions return the text written beside each enumerator.
"""

from __future__ import annotations

import enum

from ciliate.datapath import abi


def _members(c_enum: str, prefix: str) -> dict[str, int]:
    return {name.removeprefix(prefix): value for name, value in abi.enum_members(c_enum).items()}


def _reason_members() -> dict[str, int]:
    # Drops are CILIATE_DROP_*; the verdicts that are not drops (forwarded,
    # forwarded socket to socket) are CILIATE_FORWARDED*.
    members = {
        name.removeprefix("CILIATE_DROP_").removeprefix("CILIATE_"): value
        for name, value in abi.enum_members("ciliate_drop_reason").items()
    }
    return dict(sorted(members.items(), key=lambda kv: kv[1]))


def _c_name(reason_name: str) -> str:
    if reason_name.startswith("FORWARDED"):
        return f"CILIATE_{reason_name}"
    return f"CILIATE_DROP_{reason_name}"


# Functional enums: the members come from abi.h, not from this file.
DropReason = enum.IntEnum("DropReason", _reason_members())  # type: ignore[misc]
TracePoint = enum.IntEnum("TracePoint", _members("ciliate_trace_point", "CILIATE_TRACE_"))  # type: ignore[misc]
Direction = enum.IntEnum("Direction", _members("ciliate_direction", "CILIATE_DIR_"))  # type: ignore[misc]
EventType = enum.IntEnum("EventType", _members("ciliate_event_type", "CILIATE_EVENT_"))  # type: ignore[misc]
Source = enum.IntEnum("Source", _members("ciliate_source", "CILIATE_SRC_"))  # type: ignore[misc]


def describe_reason(reason: int) -> str:
    try:
        name = DropReason(reason).name
    except ValueError:
        return f"unknown reason {reason}"
    return abi.description(_c_name(name)) or name.lower()


def describe_trace(point: int) -> str:
    try:
        name = TracePoint(point).name
    except ValueError:
        return f"unknown trace point {point}"
    return abi.description(f"CILIATE_TRACE_{name}") or name.lower()


def source_file(source: int) -> str:
    """File name of a source id: BPF_LXC_C -> bpf_lxc.c."""
    try:
        name = Source(source).name
    except ValueError:
        return f"source#{source}"
    if name == "UNKNOWN":
        return "?"
    stem, _, ext = name.lower().rpartition("_")
    return f"{stem}.{ext}"
