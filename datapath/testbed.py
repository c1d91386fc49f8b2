"""A packet testbed: the node's datapath loaded, unpinned, beside a private
network namespace holding real veths for two pods, cilium_host and an
uplink, so BPF_PROG_TEST_RUN sees real ifindexes.

Shared by the BPF tests and the datapath benchmark. Nothing is sent on any
wire: test-run hands the packet to the program and returns what the program
made of it. Everything created is named with a per-run prefix and removed
by ``close()``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import secrets
import struct
import subprocess
from dataclasses import dataclass
from types import TracebackType

from ciliate.datapath import abi
from ciliate.datapath.events import Event
from ciliate.datapath.maps import IPCACHE_F_LOCAL, Endpoint, IpcacheEntry
from ciliate.datapath.programs import Datapath, NodeConfig
from ciliate.loader import Program, RingBuffer, TestRunResult, enter_netns

POD_CIDR = ipaddress.IPv4Network("10.244.1.0/24")
ROUTER_IP = ipaddress.IPv4Address("10.244.1.1")
NODE_IP = ipaddress.IPv4Address("192.168.200.2")
REMOTE_POD_CIDR = ipaddress.IPv4Network("10.244.2.0/24")
REMOTE_NODE_IP = ipaddress.IPv4Address("192.168.200.3")
WORLD_IP = ipaddress.IPv4Address("198.51.100.7")  # TEST-NET-2: never routed here
# route_uplink(): the fabric's gateway and the remote node, as neighbours.
GATEWAY_IP = ipaddress.IPv4Address("192.168.200.1")
GATEWAY_MAC = "02:00:00:00:00:01"
REMOTE_NODE_MAC = "02:00:00:00:00:03"
HOST_IDENTITY = abi.constant("CILIATE_IDENTITY_HOST")

# struct __sk_buff (uapi/linux/bpf.h, stable ABI): ifindex at byte 40. The
# test run binds the skb to that device, so the programs see a real ifindex.
_SKB_IFINDEX_OFFSET = 40
_SKB_CTX_SIZE = 48


def skb_ctx(ifindex: int) -> bytes:
    ctx = bytearray(_SKB_CTX_SIZE)
    struct.pack_into("<I", ctx, _SKB_IFINDEX_OFFSET, ifindex)
    return bytes(ctx)


@dataclass(frozen=True)
class Link:
    name: str
    ifindex: int
    mac: str


@dataclass(frozen=True)
class Pod:
    """A pod as the datapath sees it: its IP, eth0 and the host-side veth."""

    ip: ipaddress.IPv4Address
    eth0: Link
    lxc: Link

    def endpoint(self, *, identity: int = 0, endpoint_id: int = 0) -> Endpoint:
        return Endpoint(
            ipv4=self.ip,
            ifindex=self.lxc.ifindex,
            mac=self.eth0.mac,
            node_mac=self.lxc.mac,
            identity=identity,
            endpoint_id=endpoint_id,
        )


def _ip(*args: str) -> str:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


class Testbed:
    """Network namespace with veths plus a loaded datapath (context manager)."""

    __test__ = False  # not a pytest class, despite the name

    def __init__(self, *, prefix: str = "cbt") -> None:
        self.netns = f"{prefix}-{secrets.token_hex(3)}"
        self.netns_path = f"/run/netns/{self.netns}"
        self._cleanup = contextlib.ExitStack()
        try:
            self._create_links()
            self.config = NodeConfig(router_ip=ROUTER_IP, node_ip=NODE_IP, pod_cidrs=[POD_CIDR])
            self.datapath = self._cleanup.enter_context(Datapath.load(self.config))
            self._events = self._cleanup.enter_context(
                RingBuffer(self.datapath.maps["ciliate_events"], self._on_event)
            )
        except BaseException:
            self._cleanup.close()
            raise
        self._received: list[Event] = []

    def _create_links(self) -> None:
        _ip("netns", "add", self.netns)
        self._cleanup.callback(_ip, "netns", "del", self.netns)
        pairs = {
            "lxc_a": "eth0_a",
            "lxc_b": "eth0_b",
            "cilium_host": "cilium_net",
            "uplink": "fabric",
        }
        for host_side, peer in pairs.items():
            _ip("-n", self.netns, "link", "add", host_side, "type", "veth", "peer", "name", peer)
        links = {
            entry["ifname"]: Link(entry["ifname"], entry["ifindex"], entry["address"])
            for entry in json.loads(_ip("-n", self.netns, "-j", "link", "show"))
        }
        self.links = links
        self.pod_a = Pod(POD_CIDR[10], links["eth0_a"], links["lxc_a"])
        self.pod_b = Pod(POD_CIDR[11], links["eth0_b"], links["lxc_b"])
        self.cilium_host = links["cilium_host"]
        self.uplink = links["uplink"]

    def route_uplink(self) -> None:
        """Give the uplink the node IP, a default route to GATEWAY_IP and a
        route to the remote node's pod CIDR, both neighbours permanent, and
        switch forwarding on: the FIB lookups of translated service packets
        (lb.h) then answer as on a node. Nothing is sent anywhere."""
        _ip("netns", "exec", self.netns, "sysctl", "-qw", "net.ipv4.conf.all.forwarding=1")
        for link in ("uplink", "fabric"):
            _ip("-n", self.netns, "link", "set", link, "up")
        _ip("-n", self.netns, "addr", "replace", f"{NODE_IP}/24", "dev", "uplink")
        for neighbour, mac in ((GATEWAY_IP, GATEWAY_MAC), (REMOTE_NODE_IP, REMOTE_NODE_MAC)):
            _ip(
                "-n",
                self.netns,
                "neigh",
                "replace",
                str(neighbour),
                "lladdr",
                mac,
                "dev",
                "uplink",
                "nud",
                "permanent",
            )
        _ip("-n", self.netns, "route", "replace", "default", "via", str(GATEWAY_IP))
        _ip("-n", self.netns, "route", "replace", str(REMOTE_POD_CIDR), "via", str(REMOTE_NODE_IP))

    # -- maps -------------------------------------------------------------
    def reset(self) -> None:
        """Empty maps and pending events: every test starts clean."""
        self.datapath.reset_maps()
        self.events()

    def add_pods(self) -> None:
        """Both pods as endpoints (identities 1001 and 1002, endpoint ids 1
        and 2), their CIDR local, a remote node's CIDR known, the node's own
        addresses as the host identity (as the agent writes them)."""
        for i, pod in enumerate((self.pod_a, self.pod_b), start=1):
            self.datapath.endpoints.upsert(pod.endpoint(identity=1000 + i, endpoint_id=i))
        self.datapath.ipcache.upsert(
            IpcacheEntry(POD_CIDR, identity=0, node_ip=None, flags=IPCACHE_F_LOCAL)
        )
        self.datapath.ipcache.upsert(
            IpcacheEntry(REMOTE_POD_CIDR, identity=0, node_ip=REMOTE_NODE_IP)
        )
        for address in (ROUTER_IP, NODE_IP):
            self.datapath.ipcache.upsert(
                IpcacheEntry(
                    ipaddress.IPv4Network(f"{address}/32"), identity=HOST_IDENTITY, node_ip=None
                )
            )

    # -- running ----------------------------------------------------------
    def run(
        self, program: str | Program, packet: bytes, *, ifindex: int, repeat: int = 1
    ) -> TestRunResult:
        prog = self.datapath.program(program) if isinstance(program, str) else program
        with enter_netns(self.netns_path):
            return prog.test_run(packet, repeat=repeat, ctx=skb_ctx(ifindex), ctx_out_size=0)

    def _on_event(self, data: bytes) -> None:
        self._received.append(Event.from_bytes(data))

    def events(self) -> list[Event]:
        """Events the programs sent since the last call."""
        self._events.consume()
        received, self._received = self._received, []
        return received

    def close(self) -> None:
        self._cleanup.close()

    def __enter__(self) -> Testbed:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
