"""The node agent's components, wired together, and their start-up order.

Start: store -> datapath (maps re-opened from their pins, so forwarding
state survives) -> cilium_host/cilium_net and the pod CIDR routes -> the
host and uplink programs (pinned links, swapped to the new programs) ->
endpoints reconciled against the store -> the CNI DEL queue replayed.
Stop: nothing is torn down; pods keep forwarding without the agent.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ciliate.control.agent.endpoints import FILTER_HANDLE, FILTER_PRIORITY, EndpointManager
from ciliate.control.cluster.member import BgpConfig, ClusterError, ClusterIdentities, ClusterMember
from ciliate.control.identity.allocator import IdentityAllocator
from ciliate.control.ipam.host import HostIpam
from ciliate.control.store.sqlite import SqliteStore
from ciliate.datapath import devices
from ciliate.datapath import maps as dpmaps
from ciliate.datapath.maps import IpcacheEntry
from ciliate.datapath.programs import Datapath, NodeConfig
from ciliate.loader import (
    LoaderError,
    Map,
    attach_sk_msg,
    attach_sock_ops,
    attach_tc,
    cgroup2_root,
    detach_pinned_link,
    update_pinned_link,
)

log = logging.getLogger(__name__)

HOST_IDENTITY = 1


@dataclass(frozen=True)
class AgentConfig:
    node_name: str
    pod_cidrs: list[ipaddress.IPv4Network]
    state_dir: Path
    socket: Path
    bpffs_root: Path
    mtu: int = 1500
    node_ip: ipaddress.IPv4Address | None = None
    uplink: str | None = None
    etcd_endpoints: list[str] = field(default_factory=list)  # cluster mode when given
    bgp_local_as: int | None = None
    bgp_peers: list[tuple[ipaddress.IPv4Address, int]] = field(default_factory=list)
    socket_forwarding: bool = True
    cgroup_root: Path | None = None  # None: the root of the cgroup v2 mount

    @property
    def maps_dir(self) -> Path:
        return self.bpffs_root / "maps"

    @property
    def sock_ops_link(self) -> Path:
        return self.bpffs_root / "links" / "sock_ops"

    @property
    def del_queue_dir(self) -> Path:
        return self.socket.parent / "cni-del-queue"


class NodeAgent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.started = time.time()
        self._stack = contextlib.ExitStack()
        config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.cluster: ClusterMember | None = None
        self.pod_cidrs = list(config.pod_cidrs)
        if config.etcd_endpoints:
            self.cluster = self._join_cluster()
            self.pod_cidrs = self.cluster.wait_for_pod_cidrs()
            log.info("pod CIDRs from the operator: %s", ", ".join(map(str, self.pod_cidrs)))
        self.store = self._stack.enter_context(
            # Not fsynced per commit: a killed agent loses nothing (see SqliteStore),
            # and a power cut also ends every pod the last commits described.
            contextlib.closing(SqliteStore(config.state_dir / "state.db", synchronous="normal"))
        )
        self.ipam = HostIpam(self.store, self.pod_cidrs)
        self.identities: IdentityAllocator | ClusterIdentities = (
            self.cluster.identities if self.cluster else IdentityAllocator(self.store)
        )
        self.router_ip = self.ipam.router_ip
        self.node_ip = config.node_ip or self.router_ip
        self.datapath, self.fresh_maps = self._load_datapath()
        self._stack.callback(self.datapath.close)
        self.host = devices.ensure_host_devices(
            router_ip=self.router_ip, pod_cidrs=self.pod_cidrs, mtu=config.mtu
        )
        self._attach_node_programs()
        self.socket_forwarding = self._attach_socket_programs()
        self._write_node_ipcache()
        self.endpoints = EndpointManager(
            store=self.store,
            ipam=self.ipam,
            identities=self.identities,
            datapath=self.datapath,
            mtu=config.mtu,
            listener=self.cluster,
        )
        self._stack.callback(self.endpoints.close)
        counts = self.endpoints.reconcile(new_programs=True)
        log.info("endpoints reconciled: %s", counts)
        self.restore_counts = counts
        if self.cluster is not None:
            self.cluster.start_mirroring(self.datapath.ipcache)
            self.cluster.start_bgp(self.pod_cidrs)

    def _join_cluster(self) -> ClusterMember:
        from ciliate.control.store.etcd import EtcdStore

        if self.config.node_ip is None:
            raise ClusterError("cluster mode needs --node-ip (the address peers reach)")
        member = ClusterMember(
            store=EtcdStore(self.config.etcd_endpoints),
            node_name=self.config.node_name,
            node_ip=self.config.node_ip,
            workdir=self.config.state_dir,
            bgp=BgpConfig(self.config.bgp_local_as or 65000, self.config.bgp_peers)
            if self.config.bgp_peers
            else None,
        )
        self._stack.callback(member.close)
        member.register()
        return member

    # -- datapath ------------------------------------------------------------------
    def _load_datapath(self) -> tuple[Datapath, bool]:
        node = NodeConfig(router_ip=self.router_ip, node_ip=self.node_ip, pod_cidrs=self.pod_cidrs)
        maps_dir = self.config.maps_dir
        pins = {name: maps_dir / name for name in dpmaps.ALL}
        existing: dict[str, Map] = {}
        if all(p.exists() for p in pins.values()):
            with contextlib.ExitStack() as opened:
                for name, pin in pins.items():
                    existing[name] = opened.enter_context(Map.open_pinned(pin))
                # The objects dup the fds they reuse; ours close with this block.
                datapath = Datapath.load(node, existing_maps=existing)
            log.info("datapath loaded, maps re-opened from %s", maps_dir)
            return datapath, False
        for pin in pins.values():  # a partial set is no state to trust
            with contextlib.suppress(FileNotFoundError):
                pin.unlink()
        datapath = Datapath.load(node)
        maps_dir.mkdir(parents=True, exist_ok=True)
        for name, pin in pins.items():
            datapath.maps[name].pin(pin)
        log.info("datapath loaded, maps pinned under %s", maps_dir)
        return datapath, True

    def _attach_node_programs(self) -> None:
        """from_host on cilium_host's egress, from_netdev on the uplink's
        ingress: clsact filters at a fixed place, replaced in place when the
        agent restarts (no moment without a program)."""
        hooks: list[tuple[int, Literal["ingress", "egress"], str]] = [
            (self.host.cilium_host_ifindex, "egress", "from_host")
        ]
        if self.config.uplink:
            index = devices.ifindex_of(self.config.uplink)
            if index is None:
                raise LoaderError(f"uplink {self.config.uplink} does not exist")
            hooks.append((index, "ingress", "from_netdev"))
        for ifindex, direction, program in hooks:
            attach_tc(
                self.datapath.program(program),
                ifindex=ifindex,
                direction=direction,
                mode="clsact",
                handle=FILTER_HANDLE,
                priority=FILTER_PRIORITY,
                replace=True,
            ).close()

    def _attach_socket_programs(self) -> str | None:
        """sock_msg on the sockhash, sock_ops on the cgroup v2 root (a pinned
        link, swapped to the new program on restart); the cgroup watched, or
        None when socket forwarding is off."""
        pin = self.config.sock_ops_link
        if not self.config.socket_forwarding:
            if pin.exists():
                detach_pinned_link(pin)
            return None
        attach_sk_msg(self.datapath.program("sock_msg"), self.datapath.maps[dpmaps.SOCKHASH])
        cgroup = str(self.config.cgroup_root) if self.config.cgroup_root else cgroup2_root()
        if pin.exists():
            update_pinned_link(pin, self.datapath.program("sock_ops"))
        elif cgroup is None:
            log.warning("no cgroup v2 hierarchy is mounted: TCP between pods takes the packet path")
            return None
        else:
            pin.parent.mkdir(parents=True, exist_ok=True)
            attach_sock_ops(self.datapath.program("sock_ops"), cgroup, pin)
        log.info("socket forwarding between local pods: sockets under cgroup %s", cgroup)
        return cgroup

    def _write_node_ipcache(self) -> None:
        for cidr in self.pod_cidrs:
            self.datapath.ipcache.upsert(IpcacheEntry(cidr, identity=0, node_ip=None, flags=1))
        for address in {self.router_ip, self.node_ip}:
            self.datapath.ipcache.upsert(
                IpcacheEntry(
                    ipaddress.IPv4Network(f"{address}/32"), identity=HOST_IDENTITY, node_ip=None
                )
            )

    def close(self) -> None:
        self._stack.close()
