"""The read-only CLI commands: status, endpoints, identities, IPAM, maps,
and the live monitor. Each prints a table, or JSON with ``-o json``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from ciliate.control.agent.client import DEFAULT_SOCKET, AgentClient

if TYPE_CHECKING:  # the datapath's ABI loads on first use, not at every CLI start
    from ciliate.datapath.events import Event


def _print(data: Any, output: str, *, columns: Sequence[str] = (), title: str = "") -> None:
    if output == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
        return
    if isinstance(data, dict) and not columns:
        table = Table(title=title, show_header=False)
        table.add_column("key", style="bold")
        table.add_column("value")
        for key, value in data.items():
            table.add_row(key, value if isinstance(value, str) else json.dumps(value))
        Console().print(table)
        return
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in data:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    Console().print(table)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return "\n".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def _client(args: argparse.Namespace) -> AgentClient:
    return AgentClient(args.socket)


def status(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _print(c.get("/v1/status"), args.output, title="ciliate agent")
    return 0


def endpoint_list(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _print(
            c.get("/v1/endpoints"),
            args.output,
            title="endpoints",
            columns=(
                "endpoint_id",
                "ip",
                "host_ifname",
                "host_ifindex",
                "identity",
                "labels",
                "policy",
                "container_id",
                "ifname",
            ),
        )
    return 0


def endpoint_get(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _print(c.get(f"/v1/endpoints/{args.id}"), args.output, title=f"endpoint {args.id}")
    return 0


def identity_list(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _print(
            c.get("/v1/identities"),
            args.output,
            title="identities",
            columns=("id", "labels", "refcount", "reserved"),
        )
    return 0


def ipam(args: argparse.Namespace) -> int:
    with _client(args) as c:
        data = c.get("/v1/ipam")
    if args.output == "json":
        _print(data, "json")
        return 0
    _print(
        data["pools"],
        "table",
        title=f"IPAM (router {data['router_ip']})",
        columns=("cidr", "used", "capacity"),
    )
    _print(
        [{"ip": ip, "owner": owner} for ip, owner in data["allocations"].items()],
        "table",
        title="allocations",
        columns=("ip", "owner"),
    )
    return 0


_MAP_COLUMNS = {
    "ipcache": ("prefix", "identity", "node_ip", "flags"),
    "endpoints": ("ip", "ifindex", "mac", "node_mac", "identity", "endpoint_id"),
    "metrics": ("description", "direction", "packets", "bytes"),
    "sockets": ("local", "remote"),
    "lb": ("frontend", "service_id", "external", "affinity_timeout", "backends"),
}


def bpf_list(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _print(
            c.get(f"/v1/bpf/{args.map}"),
            args.output,
            title=f"ciliate {args.map}",
            columns=_MAP_COLUMNS[args.map],
        )
    return 0


def monitor(args: argparse.Namespace) -> int:
    """Live drop, trace, policy and service translation events from the
    pinned ring buffer, decoded. Tracing (forwarded packets, allowed new
    connections, translations) is on while a monitor listens."""
    from ciliate.datapath.events import Event
    from ciliate.loader import Map, RingBuffer

    if args.bpffs_root:
        pin = Path(args.bpffs_root) / "maps" / "ciliate_events"
    else:  # where this agent pinned its maps
        with _client(args) as c:
            pin = Path(c.get("/v1/status")["datapath"]["maps_pinned_at"]) / "ciliate_events"
    seen = 0
    deadline = time.monotonic() + args.timeout if args.timeout else None

    def on_event(data: bytes) -> None:
        nonlocal seen
        if args.count is not None and seen >= args.count:
            return
        seen += 1
        print(format_event(Event.from_bytes(data), args.output), flush=True)

    with (
        _client(args) as client,
        Map.open_pinned(pin) as events,
        RingBuffer(events, on_event) as rb,
    ):
        if not args.drops_only:
            client.put("/v1/datapath/config", {"trace": True})
        try:
            print(f"listening on {pin} (Ctrl-C to stop)", file=sys.stderr)
            while (args.count is None or seen < args.count) and (
                deadline is None or time.monotonic() < deadline
            ):
                rb.poll(200)
        except KeyboardInterrupt:
            pass
        finally:
            if not args.drops_only:
                client.put("/v1/datapath/config", {"trace": False})
    return 0


def format_event(event: Event, output: str) -> str:
    """One monitor line: a table row, or a JSON document (``output`` "json")."""
    packet = _decode_packet(event.data) if event.data else ""
    if output == "json":
        doc = {
            "type": event.kind,  # drop, trace, policy (a verdict) or lb (a translation)
            "summary": event.summary,
            "policy": event.policy,
            "reason": event.reason,
            "source": event.source,
            "line": event.line,
            "ifindex": event.ifindex,
            "target_ifindex": event.target_ifindex,
            "length": event.orig_len,
            "ktime_ns": event.ktime_ns,
            "packet": packet,
        }
        if event.translation is not None:
            doc["translation"] = event.translation.to_dict()
        return json.dumps(doc)
    on_socket = event.translation is not None and event.translation.kind == "socket"
    where = "socket       " if on_socket else f"ifindex {event.ifindex:<5}"
    return f"{event.ktime_ns / 1e9:14.6f} {where} {event.summary:<60} {packet}".rstrip()


def node_list(args: argparse.Namespace) -> int:
    with _client(args) as c:
        nodes = c.get("/v1/cluster/nodes")
    rows = [
        {
            **n,
            "podCIDRs": ", ".join(n["podCIDRs"]) or (n["ipamError"] or "(waiting)"),
            "bgp": ", ".join(f"{peer} {state}" for peer, state in n["bgp"].items()),
            "alive": "yes" if n["alive"] else "no",
        }
        for n in nodes
    ]
    _print(
        nodes if args.output == "json" else rows,
        args.output,
        title="nodes",
        columns=("name", "nodeIP", "podCIDRs", "alive", "bgp"),
    )
    return 0


def node_delete(args: argparse.Namespace) -> int:
    with _client(args) as c:
        c._call("DELETE", f"/v1/cluster/nodes/{args.name}")
    print(f"node {args.name} deleted: the operator frees its pod CIDRs")
    return 0


def _decode_packet(data: bytes) -> str:
    import scapy.layers.inet  # noqa: F401 - binds IPv4, ICMP, TCP, UDP under Ether
    from scapy.layers.l2 import Ether

    try:
        return str(Ether(data).summary())
    except Exception:
        return data.hex()


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--socket", default=str(DEFAULT_SOCKET), help="the agent's API socket")
        p.add_argument("-o", "--output", choices=("table", "json"), default="table")
        return p

    common(sub.add_parser("status", help="the agent's state")).set_defaults(func=status)
    endpoint = sub.add_parser("endpoint", help="endpoints").add_subparsers(
        dest="endpoint_command", required=True
    )
    common(endpoint.add_parser("list")).set_defaults(func=endpoint_list)
    get = common(endpoint.add_parser("get"))
    get.add_argument("id", type=int)
    get.set_defaults(func=endpoint_get)
    identity = sub.add_parser("identity", help="security identities").add_subparsers(
        dest="identity_command", required=True
    )
    common(identity.add_parser("list")).set_defaults(func=identity_list)
    common(sub.add_parser("ipam", help="pod IP pools and allocations")).set_defaults(func=ipam)
    node = sub.add_parser("node", help="cluster nodes").add_subparsers(
        dest="node_command", required=True
    )
    common(node.add_parser("list")).set_defaults(func=node_list)
    delete = common(node.add_parser("delete", help="remove a node from the cluster"))
    delete.add_argument("name")
    delete.set_defaults(func=node_delete)
    mon = common(
        sub.add_parser("monitor", help="live drop, trace, policy and service translation events")
    )
    mon.add_argument("--bpffs-root", help="default: where the agent pinned its maps")
    mon.add_argument("--count", type=int, help="stop after this many events")
    mon.add_argument("--timeout", type=float, help="stop after this many seconds")
    mon.add_argument("--drops-only", action="store_true", help="do not switch tracing on")
    mon.set_defaults(func=monitor)


def bpf_policy_get(args: argparse.Namespace) -> int:
    """One endpoint's policy entries as the datapath holds them, with their rules."""
    from ciliate.control.policy.model import PROTOCOL_NAMES  # loads the datapath's ABI

    with _client(args) as c:
        data = c.get(f"/v1/bpf/policy/{args.endpoint}")
    if args.output == "json":
        _print(data, "json")
        return 0
    enforced = [d for d in ("ingress", "egress") if data[f"{d}_enforced"]]
    rows = [
        {
            "direction": e["direction"],
            "identity": e["identity"] or "any",
            "protocol": PROTOCOL_NAMES.get(e["protocol"], e["protocol"])
            if e["protocol"]
            else "any",
            "port": (
                "any"
                if not e["port"]
                else f"{e['port']}-{e['port_end']}"
                if e["port_end"]
                else e["port"]
            ),
            "verdict": "deny" if e["deny"] else "allow",
            "rule": "; ".join(e["origin"]),
        }
        for e in data["entries"]
    ]
    _print(
        rows,
        "table",
        title=f"endpoint {args.endpoint}: enforced {', '.join(enforced) or 'nowhere'}, "
        f"revision {data['revision']}",
        columns=("direction", "identity", "protocol", "port", "verdict", "rule"),
    )
    return 0


def bpf_ct_list(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _print(
            c.get("/v1/bpf/ct"),
            args.output,
            title="ciliate_ct_v2 (live connections)",
            columns=("protocol", "src", "dst", "expires_in", "seen_reply", "closing"),
        )
    return 0


def register_bpf(bpf: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--socket", default=str(DEFAULT_SOCKET))
        p.add_argument("-o", "--output", choices=("table", "json"), default="table")
        return p

    policy = bpf.add_parser("policy", help="an endpoint's policy entries").add_subparsers(
        dest="policy_command", required=True
    )
    get = common(policy.add_parser("get"))
    get.add_argument("endpoint", type=int, help="the endpoint id (ciliate endpoint list)")
    get.set_defaults(func=bpf_policy_get)
    ct = bpf.add_parser("ct", help="the connection tracker").add_subparsers(
        dest="ct_command", required=True
    )
    common(ct.add_parser("list")).set_defaults(func=bpf_ct_list)
    for name in _MAP_COLUMNS:
        m = bpf.add_parser(name, help=f"the {name} map").add_subparsers(
            dest=f"{name}_command", required=True
        )
        common(m.add_parser("list")).set_defaults(func=bpf_list, map=name)
