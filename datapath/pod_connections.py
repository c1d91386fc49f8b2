"""The connections a pod's sockets hold, read from its socket tables inside its
network namespace: what the connection tracker adopts when policy starts to apply to a
pod (:meth:`ciliate.datapath.conntrack.Conntrack.adopt`).

The tracker only learns connections while a policy is enforced on one of their
ends; one opened before then has no entry. Without one, the first packet after
enforcement starts is judged as if it opened the connection: a server's answer
to a request the pod sent before its ingress was isolated would be an "incoming
connection" and dropped, though the connection is the pod's own and allowed.
Cilium and the iptables-based engines keep such connections (their conntrack
saw them from the start); reading them from the pod's sockets gives ciliate the
same, at no cost per packet.

Which end opened a TCP connection: the other end when the socket's local address
and port are those of one of the pod's listening sockets (it was accepted), or,
with no listener there (closed since), when the local port is outside the
namespace's ephemeral range (``ip_local_port_range``) and the remote one inside
it; else the pod's. A connected UDP socket opened its flow.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

from ciliate.loader import enter_netns

# include/net/tcp_states.h
_TCP_ESTABLISHED, _TCP_SYN_SENT, _TCP_LISTEN = 1, 2, 10
_TCP_FIN_WAIT1, _TCP_FIN_WAIT2, _TCP_CLOSE_WAIT, _TCP_LAST_ACK, _TCP_CLOSING = 4, 5, 8, 9, 11
# Past a FIN one way, bytes may still flow the other (a half-closed connection).
_TCP_CLOSING_STATES = frozenset(
    {_TCP_FIN_WAIT1, _TCP_FIN_WAIT2, _TCP_CLOSE_WAIT, _TCP_LAST_ACK, _TCP_CLOSING}
)
_TCP_STATES = frozenset({_TCP_ESTABLISHED, _TCP_SYN_SENT, _TCP_LISTEN}) | _TCP_CLOSING_STATES

Endpoint = tuple[ipaddress.IPv4Address, int]


@dataclass(frozen=True)
class OpenConnection:
    """A connection of a pod's socket, from the end that opened it."""

    protocol: int  # socket.IPPROTO_TCP or IPPROTO_UDP
    opener: Endpoint
    other: Endpoint
    answered: bool  # the other end has sent (TCP past SYN_SENT; UDP: unknown, taken as so)
    closing: bool  # TCP: a FIN has passed


def _table(name: str) -> list[tuple[int, Endpoint, Endpoint]]:
    """(state, local, remote) of each socket in /proc/thread-self/net/<name>: the
    calling thread's namespace (``/proc/net`` is the process's). Addresses are
    printed as the host-order hex of the network-order word, ports as host-order hex.
    Read as text rather than through sock_diag: 10-20x faster here (pyroute2's
    request is ~0.2 ms per socket), and the pass holds the policy lock meanwhile."""
    rows = []
    with open(f"/proc/thread-self/net/{name}", encoding="ascii") as table:
        next(table)  # the header
        for line in table:
            fields = line.split(maxsplit=4)
            local, remote, state = fields[1], fields[2], int(fields[3], 16)
            rows.append((state, _endpoint(local), _endpoint(remote)))
    return rows


def _endpoint(text: str) -> Endpoint:
    address, _, port = text.partition(":")
    return ipaddress.IPv4Address(int(address, 16).to_bytes(4, "little")), int(port, 16)


def open_connections(netns: str) -> list[OpenConnection]:
    """The IPv4 TCP connections and connected UDP sockets in ``netns`` (a path such as
    ``/var/run/netns/NAME``). Raises ``OSError``/``LoaderError`` when the namespace
    cannot be entered or read."""
    with enter_netns(netns):
        # Per namespace: read from inside (net sysctls follow the reading thread).
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        tcp = _table("tcp")
        udp = _table("udp")
    listening = {local for state, local, _ in tcp if state == _TCP_LISTEN}
    any_address = ipaddress.IPv4Address(0)
    connections = []
    for state, local, remote in tcp:
        if state not in _TCP_STATES or state == _TCP_LISTEN:
            continue
        if local in listening or (any_address, local[1]) in listening:
            accepted = True
        else:
            accepted = not low <= local[1] <= high and low <= remote[1] <= high
        connections.append(
            OpenConnection(
                protocol=socket.IPPROTO_TCP,
                opener=remote if accepted else local,
                other=local if accepted else remote,
                answered=state != _TCP_SYN_SENT,
                closing=state in _TCP_CLOSING_STATES,
            )
        )
    for state, local, remote in udp:
        if state != _TCP_ESTABLISHED or remote[1] == 0:
            continue  # bound, not connected
        connections.append(
            OpenConnection(
                protocol=socket.IPPROTO_UDP,
                opener=local,
                other=remote,
                answered=True,
                closing=False,
            )
        )
    return connections
