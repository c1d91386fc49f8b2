"""The node agent's components, wired together, and their start-up order.

Start: the lock on the node's paths (one agent per state directory, socket
directory and bpffs root, see ``lock.py``) and on its network namespace ->
the configuration checked against the namespace (the uplink exists) ->
cluster membership (cluster mode) -> store -> IPAM -> datapath (maps re-opened from their pins, so
forwarding state survives) -> cilium_host/cilium_net and the pod CIDR
routes -> the host and uplink programs (clsact filters at a fixed handle,
their program replaced in place) -> socket forwarding (sock_ops through a
pinned link, updated in place) -> endpoints reconciled against the store ->
the API socket, bound last so that a relay calling during start-up queues
its DEL or is told to try again.

Every step that opens something registers its release at once: a failure
half-way closes what was opened, in reverse, and releases the lock, so a
retry starts clean.

Stop: only this process's handles are closed (sockets, map and program fds,
the store, the lock); nothing on the node is torn down, so pods keep
forwarding without the agent.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ciliate.control.agent.datapath_gc import DatapathGC
from ciliate.control.agent.endpoints import FILTER_HANDLE, FILTER_PRIORITY, EndpointManager
from ciliate.control.agent.lock import AgentLock, NamespaceLock, Place
from ciliate.control.agent.policy import PolicyController, PolicyFirstIpcache, cluster_view
from ciliate.control.agent.services import ServiceController
from ciliate.control.cluster.member import BgpConfig, ClusterError, ClusterMember
from ciliate.control.cni.defaults import DEFAULT_MTU
from ciliate.control.identity.allocator import RESERVED_IDENTITIES, IdentityAllocator
from ciliate.control.identity.cluster import ClusterIdentities
from ciliate.control.ipam.host import HostIpam, IpamConfigError
from ciliate.control.objects import ObjectStore
from ciliate.control.services import hostports
from ciliate.control.store import Store
from ciliate.control.store.etcd import EtcdStore
from ciliate.control.store.sqlite import SqliteStore
from ciliate.datapath import abi, bandwidth, devices, lb
from ciliate.datapath import maps as dpmaps
from ciliate.datapath.maps import IpcacheEntry
from ciliate.datapath.programs import Datapath, NodeConfig
from ciliate.loader import (
    attach_sk_msg,
    attach_sock_ops,
    attach_tc,
    cgroup2_root,
    detach_pinned_link,
    update_pinned_link,
)

log = logging.getLogger(__name__)

_HOST_IDENTITY = next(i for i, name in RESERVED_IDENTITIES.items() if name == "host")


class AgentConfigError(ValueError):
    """The agent's configuration does not fit the node: the message names
    the flag to fix."""


@dataclass(frozen=True)
class AgentConfig:
    node_name: str
    pod_cidrs: list[ipaddress.IPv4Network]
    state_dir: Path
    socket: Path
    bpffs_root: Path
    mtu: int = DEFAULT_MTU
    node_ip: ipaddress.IPv4Address | None = None
    uplink: str | None = None
    etcd_endpoints: list[str] = field(default_factory=list)  # cluster mode when given
    bgp_local_as: int | None = None
    bgp_peers: list[tuple[ipaddress.IPv4Address, int]] = field(default_factory=list)
    socket_forwarding: bool = True
    cgroup_root: Path | None = None  # None: the root of the cgroup v2 mount
    # False (--no-service-lb): ciliate balances no service (no socket LB, no
    # per-packet translation, its LB maps kept empty) and leaves services to
    # a kube-proxy, whose translated replies the datapath hands to the stack.
    service_lb: bool = True
    # Replies of connections the node's stack NATed (a kube-proxy, a chained
    # portmap, any DNAT in iptables/nftables) go back through the stack
    # (stack_nat.h). None: on exactly when ciliate's own LB is off or not built.
    stack_nat_replies: bool | None = None
    # Pods' egress bandwidth kept (kubernetes.io/egress-bandwidth): departure
    # times on the uplink's egress and the fq qdisc there (needs --uplink).
    bandwidth_manager: bool = False

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
    """A running agent: everything ``__init__`` opened is released by
    :meth:`close`, or by ``__init__`` itself when a step fails."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.started = time.time()
        self._stack = contextlib.ExitStack()
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise

    def _start(self) -> None:
        config = self.config
        lock = AgentLock(
            [
                Place("state directory", config.state_dir),
                Place("socket directory", config.socket.parent),
                Place("bpffs root", config.bpffs_root),
            ]
        )
        self._stack.callback(lock.release)
        namespace_lock = NamespaceLock()
        self._stack.callback(namespace_lock.release)
        uplink_ifindex = self._uplink_ifindex()
        if config.bandwidth_manager and config.uplink is None:
            raise AgentConfigError(
                "--bandwidth-manager needs --uplink: pods' egress is limited where it "
                "leaves the node"
            )
        self.cluster: ClusterMember | None = None
        self.cluster_store: EtcdStore | None = None
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
        try:
            self.ipam = HostIpam(self.store, self.pod_cidrs)
        except IpamConfigError as exc:
            where = "from the operator" if self.cluster else "(--pod-cidr)"
            raise AgentConfigError(f"pod CIDRs {where}: {exc}") from exc
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
        self._attach_node_programs(uplink_ifindex)
        self.bandwidth = bandwidth.Manager(
            self.datapath.throttle,
            mode=self._install_bandwidth_manager()
            if config.bandwidth_manager
            else bandwidth.Mode.OFF,
            device=config.uplink,
        )
        self.socket_forwarding = self._attach_socket_programs()
        self._write_node_ipcache()
        self.endpoints = EndpointManager(
            store=self.store,
            ipam=self.ipam,
            identities=self.identities,
            datapath=self.datapath,
            mtu=config.mtu,
            listener=self.cluster,
            objects=ObjectStore(self.objects_store),
            bandwidth=self.bandwidth,
        )
        # Closing drains the queued veth deletions before the process goes.
        self._stack.callback(self.endpoints.close)
        if self.cluster is not None:
            # The endpoint records say which identities this node holds; reconcile
            # then releases those of the endpoints it collects.
            self.cluster.identities.restore((r.identity, r.labels) for r in self.endpoints.list())
        counts = self.endpoints.reconcile(new_programs=True)
        log.info("endpoints reconciled: %s", counts)
        self.restore_counts = counts
        self.policy = self._start_policy()
        self.services = self._start_services()
        self.gc = DatapathGC(
            self.datapath,
            conntrack=dpmaps.shape().enabled("policy"),
            services=self.services is not None,
        )
        self.gc.loop.start()
        self._stack.callback(self.gc.loop.close)
        if self.cluster is not None:
            self.cluster.start_mirroring(PolicyFirstIpcache(self.datapath.ipcache, self.policy))
            self.cluster.start_bgp(self.pod_cidrs)
        self.api_socket = self._listen()

    def _start_policy(self) -> PolicyController:
        """The policy loop over the objects (the cluster store in a cluster, the
        node's own otherwise): one pass now, so policy holds before the API serves,
        then in the background."""
        controller = PolicyController(
            objects=ObjectStore(self.objects_store),
            revision=self.revision,
            endpoints=self.endpoints,
            datapath=self.datapath,
            host_ips={self.router_ip, self.node_ip},
            cluster=cluster_view(
                store=self.objects_store,
                identities=self.cluster.identities,
                node_name=self.config.node_name,
            )
            if self.cluster
            else None,
        )
        self.endpoints.policy_source = controller
        try:
            result = controller.sync()
        except Exception:  # etcd down at start: the pinned policy keeps applying
            log.exception("policy: first pass failed; the loop retries")
        else:
            log.info("policy: %d endpoint(s) given their policy", len(result.written))
        controller.loop.start()
        self._stack.callback(controller.loop.close)
        return controller

    @property
    def objects_store(self) -> Store:
        """Where the cluster objects live: etcd in a cluster, the node's store alone."""
        return self.cluster_store if self.cluster_store else self.store

    def revision(self) -> tuple[int, int]:
        """What the controllers watch: the objects' store and the node's (endpoints)."""
        return (self.objects_store.revision(), self.store.revision())

    def objects_changed(self) -> None:
        """An apply or delete through this agent: its loops pass at once."""
        self.policy.loop.wake()
        if self.services is not None:
            self.services.loop.wake()

    def _start_services(self) -> ServiceController | None:
        """Service load balancing (unless switched off or not built): the socket LB
        on the cgroup (pinned links, swapped in place on restart) and the service
        loop, one pass now and then in the background."""
        links = self.config.bpffs_root / "links" / "sock_lb"
        if not (self.config.service_lb and self.datapath.has_services):
            lb.detach_socket_lb(links)
            log.info("pods' hostPorts are kept but not served: chain portmap to serve them")
            return None
        cgroup = str(self.config.cgroup_root) if self.config.cgroup_root else cgroup2_root()
        if cgroup is None:
            log.warning("no cgroup v2 hierarchy is mounted: services are not balanced")
            return None
        # Every node's socket programs see every socket of the cgroup tree (nodes of
        # the lab share one): each translates only its own namespace's and its pods'.
        self.datapath.lb.restrict_sockets(
            [devices.netns_cookie("/proc/self/ns/net")]
            + [r.netns_cookie for r in self.endpoints.list() if r.netns_cookie]
        )
        lb.attach_socket_lb(
            {name: self.datapath.program(name) for name in lb.SOCKET_LB_PROGRAMS},
            cgroup=cgroup,
            links_dir=links,
        )
        node_ips = sorted({self.node_ip, self.router_ip})
        controller = ServiceController(
            objects_store=self.objects_store,
            node_store=self.store,
            revision=self.revision,
            datapath=self.datapath,
            node_name=self.config.node_name,
            node_ips=node_ips,
            host_ports=lambda: hostports.frontends(
                self.endpoints.host_ports(), node_name=self.config.node_name, node_ips=node_ips
            ),
            pod_netns=lambda: [r.netns for r in self.endpoints.list()],
            # A lone node is its own EndpointSlice controller; in a cluster the operator is.
            local_endpoints=None
            if self.cluster
            else lambda: [(r.pod, r.ip) for r in self.endpoints.list()],
        )
        try:
            controller.sync()
        except Exception:  # etcd down at start: the pinned services keep working
            log.exception("services: first pass failed; the loop retries")
        controller.loop.start()
        self._stack.callback(controller.loop.close)
        log.info("service load balancing: socket LB on cgroup %s", cgroup)
        return controller

    def _uplink_ifindex(self) -> int | None:
        """The uplink's ifindex, checked before anything is loaded: a typo in
        --uplink is a configuration error, not a datapath one."""
        name = self.config.uplink
        if name is None:
            return None
        index = devices.ifindex_of(name)
        if index is None:
            raise AgentConfigError(
                f"--uplink {name}: no such device in this network namespace "
                f"(have: {', '.join(sorted(devices.link_names().values()))})"
            )
        return index

    def _listen(self) -> socket.socket:
        """The API socket, mode 0600 from the start (umask around bind). A
        file already at the path is a killed agent's: we hold the lock on its
        directory, so no live agent is serving on it."""
        path = self.config.socket
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._stack.callback(sock.close)
        try:
            if path.exists() or path.is_symlink():
                path.unlink()
            old = os.umask(0o177)
            try:
                sock.bind(str(path))
            finally:
                os.umask(old)
        except OSError as exc:
            raise AgentConfigError(
                f"--socket {path}: cannot listen there ({exc.strerror or exc})"
            ) from exc
        bound = path.stat()
        self._stack.callback(self._unlink_socket, (bound.st_dev, bound.st_ino))
        sock.listen(128)
        return sock

    def _unlink_socket(self, bound: tuple[int, int]) -> None:
        """Remove the socket file if it is still the one we bound."""
        path = self.config.socket
        with contextlib.suppress(FileNotFoundError):
            st = path.stat()
            if (st.st_dev, st.st_ino) == bound:
                path.unlink()

    def _join_cluster(self) -> ClusterMember:
        if self.config.node_ip is None:
            raise ClusterError("cluster mode needs --node-ip (the address peers reach)")
        with contextlib.ExitStack() as undo:
            store = EtcdStore(self.config.etcd_endpoints)
            undo.callback(store.close)
            self.cluster_store = store
            member = ClusterMember(
                store=store,
                node_name=self.config.node_name,
                node_ip=self.config.node_ip,
                workdir=self.config.state_dir,
                bgp=BgpConfig(self.config.bgp_local_as or 65000, self.config.bgp_peers)
                if self.config.bgp_peers
                else None,
            )
            undo.pop_all()
        self._stack.callback(member.close)  # closes the store too
        member.register()
        return member

    # -- datapath ------------------------------------------------------------------
    def _load_datapath(self) -> tuple[Datapath, bool]:
        # Without ciliate's own LB (switched off or not built) a kube-proxy
        # may NAT in the stack: its replies must not bypass the stack. With it,
        # only when asked (--stack-nat-replies: portmap or another DNAT beside).
        kube_proxy_beside = not (self.config.service_lb and dpmaps.shape().enabled("services"))
        stack_nat_replies = self.config.stack_nat_replies
        node = NodeConfig(
            router_ip=self.router_ip,
            node_ip=self.node_ip,
            pod_cidrs=self.pod_cidrs,
            stack_nat_replies=kube_proxy_beside if stack_nat_replies is None else stack_nat_replies,
        )
        # Pinned maps are re-opened (forwarding survives a restart); maps new
        # since the agent that pinned the others (a feature turned on) are
        # created and pinned beside them.
        loaded = Datapath.load_pinned(node, self.config.maps_dir)
        if loaded.created:
            log.info(
                "maps created and pinned under %s: %s",
                self.config.maps_dir,
                ", ".join(loaded.created),
            )
        if loaded.reused:
            log.info("maps re-opened from %s: %s", self.config.maps_dir, ", ".join(loaded.reused))
        if not self.config.service_lb and loaded.datapath.has_services:
            # Services left by a run with the LB on would still be translated.
            loaded.datapath.lb.clear()
            log.info("service load balancing off: replies NATed by the stack go through it")
        return loaded.datapath, not loaded.reused

    def _attach_node_programs(self, uplink_ifindex: int | None) -> None:
        """from_host on cilium_host's egress, from_netdev and to_netdev on the
        uplink's ingress and egress: clsact filters at a fixed place, replaced
        in place when the agent restarts (no moment without a program)."""
        hooks: list[tuple[int, Literal["ingress", "egress"], str]] = [
            (self.host.cilium_host_ifindex, "egress", "from_host")
        ]
        if uplink_ifindex is not None:
            hooks.append((uplink_ifindex, "ingress", "from_netdev"))
            hooks.append((uplink_ifindex, "egress", "to_netdev"))
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

    def _install_bandwidth_manager(self) -> bandwidth.Mode:
        """The fq qdisc on the uplink that keeps the departure times to_netdev
        gives rate-limited pods' packets (datapath.bandwidth); on a kernel
        without fq, an htb qdisc whose classes shape them."""
        assert self.config.uplink is not None  # checked at start
        try:
            mode = bandwidth.install(self.config.uplink)
        except bandwidth.QdiscError as exc:
            raise AgentConfigError(f"--bandwidth-manager: {exc}") from exc
        if mode is bandwidth.Mode.PACED:
            log.info("bandwidth manager: fq on %s paces pods' egress", self.config.uplink)
        else:
            log.warning(
                "bandwidth manager: this kernel has no fq qdisc (CONFIG_NET_SCH_FQ): pods' "
                "egress bandwidth is shaped by htb classes on %s, not paced",
                self.config.uplink,
            )
        return mode

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
            self.datapath.ipcache.upsert(
                IpcacheEntry(
                    cidr, identity=0, node_ip=None, flags=abi.constant("CILIATE_IPCACHE_F_LOCAL")
                )
            )
        for address in {self.router_ip, self.node_ip}:
            self.datapath.ipcache.upsert(
                IpcacheEntry(
                    ipaddress.IPv4Network(f"{address}/32"), identity=_HOST_IDENTITY, node_ip=None
                )
            )

    def close(self) -> None:
        """Release what start-up opened, in reverse; the lock goes last."""
        self._stack.close()
