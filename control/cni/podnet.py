"""What a pod's network namespace holds for one interface, read from the kernel.

The CNI handler asks two questions the endpoint records cannot answer: does the
pod already have an interface of the requested name (ADD must then fail, CNI spec
1.1), and are the interface, addresses and routes a CHECK's ``prevResult`` lists
still there as the kernel has them (a chained plugin or a person may have changed
them since ADD). Reading only; nothing here changes a namespace.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from ciliate.loader import LoaderError, enter_netns

__all__ = ["PodInterface", "PodNetError", "has_interface", "read_interface"]

_IFF_UP = 0x1
_RT_TABLE_MAIN = 254


class PodNetError(RuntimeError):
    """The namespace could not be read (gone, not a namespace, netlink refused)."""


Route = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ipaddress.IPv4Address | None]


@dataclass(frozen=True)
class PodInterface:
    """One link of a pod's namespace: its MAC, MTU, addresses and the main-table
    routes through it (destination, gateway or ``None`` for on-link)."""

    name: str
    mac: str
    mtu: int
    up: bool
    addresses: frozenset[ipaddress.IPv4Interface | ipaddress.IPv6Interface]
    routes: frozenset[Route]


def has_interface(netns: str, ifname: str) -> bool:
    """Whether the namespace at ``netns`` has a link called ``ifname`` (one ioctl:
    ADD asks this every time, so no netlink dump). Raises :class:`PodNetError`
    when the namespace cannot be entered."""
    try:
        with enter_netns(netns):
            try:
                socket.if_nametoindex(ifname)
            except OSError:
                return False
            return True
    except LoaderError as exc:
        raise PodNetError(f"cannot read {netns}: {exc}") from exc


def read_interface(netns: str, ifname: str) -> PodInterface | None:
    """The link ``ifname`` in the namespace at ``netns``; ``None`` when it has none
    of that name. Raises :class:`PodNetError` when the namespace cannot be read."""
    from pyroute2 import IPRoute  # the agent has it loaded; a plain import elsewhere

    try:
        with enter_netns(netns), IPRoute() as ipr:
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                return None
            index = found[0]
            (link,) = ipr.get_links(index)
            addresses = frozenset(
                ipaddress.ip_interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
                for a in ipr.get_addr(index=index)
                if a.get_attr("IFA_ADDRESS") is not None
            )
            routes = frozenset(
                _route(r)
                for family in (socket.AF_INET, socket.AF_INET6)
                for r in ipr.get_routes(family=family, table=_RT_TABLE_MAIN)
                if r.get_attr("RTA_OIF") == index
            )
    except (LoaderError, OSError) as exc:
        raise PodNetError(f"cannot read {netns}: {exc}") from exc
    return PodInterface(
        name=ifname,
        mac=str(link.get_attr("IFLA_ADDRESS") or "").lower(),
        mtu=int(link.get_attr("IFLA_MTU") or 0),
        up=bool(link["flags"] & _IFF_UP),
        addresses=addresses,
        routes=routes,
    )


def _route(message: object) -> Route:
    get = message.get_attr  # type: ignore[attr-defined]
    family = message["family"]  # type: ignore[index]
    length = message["dst_len"]  # type: ignore[index]
    dst = get("RTA_DST") or ("0.0.0.0" if family == socket.AF_INET else "::")
    gateway = get("RTA_GATEWAY")
    network = ipaddress.ip_network(f"{dst}/{length}", strict=False)
    via = ipaddress.IPv4Address(gateway) if gateway and family == socket.AF_INET else None
    return network, via
