"""Devices of a node's datapath: ``cilium_host``/``cilium_net``, the routes
of the pod CIDRs, and the veth of each pod.

Node set-up uses pyroute2; the per-pod veth goes through the small
synchronous client in ``ciliate.datapath.netlink`` because kubelet waits on
it. Everything here acts on the network namespace the calling thread is in
(the node's), except what is explicitly done inside a pod's namespace.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import ipaddress
import os
import secrets
import socket
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ciliate.datapath.netlink import NetlinkError, Rtnl
from ciliate.loader import LoaderError, enter_netns

CILIUM_HOST = "cilium_host"
CILIUM_NET = "cilium_net"
HOST_IFNAME_PREFIX = "lxc"
# Pod veths get ifindexes from this range (ciliate_ep_dev is indexed by
# ifindex and has bpf/datapath.toml maps.max_ifindex slots).
FIRST_POD_IFINDEX = 1024


# <linux/nsfs.h>: NS_GET_NSTYPE = _IO(0xb7, 0x3); <linux/sched.h>: CLONE_NEWNET.
_NS_GET_NSTYPE = 0xB703
_CLONE_NEWNET = 0x40000000
# Link names the kernel refuses: they would clash with /proc/sys/net/*/conf/{all,default}.
RESERVED_IFNAMES = ("all", "default")


class DeviceError(RuntimeError):
    """A device could not be created or configured."""


class NetnsError(ValueError):
    """A path that should name a pod's network namespace does not; the message
    says why (it follows the path, e.g. ``CNI_NETNS '/x' is ...``)."""


def random_mac() -> str:
    """A random locally administered unicast MAC."""
    octets = bytearray(secrets.token_bytes(6))
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


def host_ifname(container_id: str, ifname: str) -> str:
    """The node-side veth name of an endpoint: stable, 14 characters."""
    digest = hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()
    return HOST_IFNAME_PREFIX + digest[:11]


def in_root_netns() -> bool:
    """True when this process shares the network namespace of PID 1."""
    try:
        return os.stat("/proc/self/ns/net").st_ino == os.stat("/proc/1/ns/net").st_ino
    except OSError:
        return False


def check_pod_netns(path: str) -> None:
    """Raise :class:`NetnsError` unless ``path`` is a network namespace other
    than this process's own (the node's). A stat (is it on nsfs?) and an
    ioctl (is it a *network* namespace?): a few microseconds."""
    problem = _netns_problem(path, allow_own=False)
    if problem is not None:
        raise NetnsError(problem)


def is_netns(path: str) -> bool:
    """Whether ``path`` is a network namespace (an nsfs file of type net)."""
    return _netns_problem(path, allow_own=True) is None


def _netns_problem(path: str, *, allow_own: bool) -> str | None:
    try:
        st = os.stat(path)
        own = os.stat("/proc/self/ns/net")
    except OSError as exc:
        return f"is not a network namespace: {exc.strerror}"
    if st.st_dev != own.st_dev or not stat.S_ISREG(st.st_mode):
        return (
            "is not a network namespace (not a namespace file); expected e.g. "
            "/run/netns/<name> or /proc/<pid>/ns/net"
        )
    if st.st_ino == own.st_ino and not allow_own:
        return "is the agent's own network namespace, not the pod's"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        return f"cannot be opened: {exc.strerror}"
    try:
        nstype = fcntl.ioctl(fd, _NS_GET_NSTYPE)
    except OSError as exc:
        if exc.errno != errno.ENOTTY:
            return f"cannot be inspected: {exc.strerror}"
        nstype = _CLONE_NEWNET  # a kernel without NS_GET_NSTYPE (< 4.11): nsfs is enough
    finally:
        os.close(fd)
    if nstype != _CLONE_NEWNET:
        return "is a namespace, but not a network namespace"
    return None


def _write_sysctl(path: str, value: str) -> None:
    Path("/proc/sys", path).write_text(value + "\n")


# -- node ---------------------------------------------------------------------


@dataclass(frozen=True)
class HostDevices:
    cilium_host_ifindex: int
    cilium_host_mac: str
    cilium_net_ifindex: int


def ensure_host_devices(
    *,
    router_ip: ipaddress.IPv4Address,
    pod_cidrs: Sequence[ipaddress.IPv4Network],
    mtu: int,
) -> HostDevices:
    """Create (or repair) cilium_host/cilium_net and route each pod CIDR to
    cilium_host. Idempotent: an agent restart finds them in place.

    cilium_host is NOARP: the node never resolves a pod's neighbour entry;
    frames leave with cilium_host's own MAC and the BPF program on its
    egress rewrites them for the pod. Nothing is routed per pod.
    """
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        if not ipr.link_lookup(ifname=CILIUM_HOST):
            ipr.link("add", ifname=CILIUM_HOST, kind="veth", peer=CILIUM_NET)
        host = ipr.link_lookup(ifname=CILIUM_HOST)[0]
        net = ipr.link_lookup(ifname=CILIUM_NET)[0]
        ipr.link("set", index=host, mtu=mtu, arp=False, state="up")
        ipr.link("set", index=net, mtu=mtu, state="up")
        have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=host, family=2)}
        if str(router_ip) not in have:
            ipr.addr("add", index=host, address=str(router_ip), prefixlen=32)
        wanted = {str(c) for c in pod_cidrs}
        for route in ipr.get_routes(family=2, oif=host):
            dst = f"{route.get_attr('RTA_DST')}/{route['dst_len']}"
            if route["dst_len"] < 32 and dst not in wanted:
                ipr.route("del", dst=dst, oif=host)  # a pod CIDR this node no longer owns
        for cidr in pod_cidrs:
            ipr.route("replace", dst=str(cidr), oif=host, prefsrc=str(router_ip), scope=253)
        mac = ipr.get_links(host)[0].get_attr("IFLA_ADDRESS")
    # Forwarding to other nodes, and no reverse-path filter: a pod's packets
    # arrive on its lxc device while its CIDR is routed to cilium_host.
    _write_sysctl("net/ipv4/ip_forward", "1")
    _write_sysctl("net/ipv4/conf/all/rp_filter", "0")
    _write_sysctl(f"net/ipv4/conf/{CILIUM_HOST}/rp_filter", "0")
    return HostDevices(cilium_host_ifindex=host, cilium_host_mac=str(mac), cilium_net_ifindex=net)


def link_names() -> dict[int, str]:
    """ifindex -> name of every link in the current namespace."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}


def ifindex_of(name: str) -> int | None:
    with Rtnl() as rtnl:
        return rtnl.link_index(name)


# -- pods -----------------------------------------------------------------------


@dataclass(frozen=True)
class PodLink:
    host_ifname: str
    host_ifindex: int
    host_mac: str
    pod_ifname: str
    pod_mac: str
    mtu: int
    netns_cookie: int  # the pod's network namespace (SO_NETNS_COOKIE)


def create_pod_link(
    *,
    netns: str,
    host_name: str,
    pod_ifname: str,
    ifindex_candidates: Iterable[int],
    mtu: int,
    address: ipaddress.IPv4Interface,
    gateway: ipaddress.IPv4Address,
) -> PodLink:
    """The pod's veth: the node side ``host_name`` here, the pod side
    created directly in ``netns`` with its address and routes (the gateway
    on link, the default route through it). The node side takes the first
    free ifindex of ``ifindex_candidates``. Raises :class:`DeviceError`
    saying which step failed; on failure nothing is left."""
    host_mac, pod_mac = random_mac(), random_mac()
    with _doing(f"open the pod's network namespace {netns}"):
        ns_fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        ifindex = _add_veth(
            host_name=host_name,
            host_mac=host_mac,
            pod_ifname=pod_ifname,
            pod_mac=pod_mac,
            candidates=ifindex_candidates,
            mtu=mtu,
            ns_fd=ns_fd,
            netns=netns,
        )
    finally:
        os.close(ns_fd)
    try:
        # IPv4 only: the node side sends no IPv6 chatter into the pod either.
        with _doing(f"turn IPv6 off on {host_name}"):
            _write_sysctl(f"net/ipv6/conf/{host_name}/disable_ipv6", "1")
        with (
            _doing(f"enter the pod's network namespace {netns}"),
            enter_netns(netns),
            Rtnl() as pod,
        ):
            index = pod.link_index(pod_ifname)
            if index is None:
                raise DeviceError(f"{pod_ifname} did not appear in {netns}")
            # The datapath is IPv4 only: no IPv6 link-local chatter to drop.
            with _doing(f"turn IPv6 off on {pod_ifname} in {netns}"):
                _write_sysctl(f"net/ipv6/conf/{pod_ifname}/disable_ipv6", "1")
            with _doing(f"bring {pod_ifname} up in {netns}"):
                pod.set_up(index)
            with _doing(f"give {pod_ifname} the address {address} in {netns}"):
                pod.add_address(index=index, address=address)
            for dst, via in (
                (ipaddress.IPv4Network(f"{gateway}/32"), None),
                (ipaddress.IPv4Network("0.0.0.0/0"), gateway),
            ):
                with _doing(f"add the route to {dst} in {netns}"):
                    pod.add_route(dst=dst, oif=index, gateway=via)
            cookie = current_netns_cookie()
    except BaseException:
        _delete_link(ifindex)
        raise
    return PodLink(host_name, ifindex, host_mac, pod_ifname, pod_mac, mtu, cookie)


@contextlib.contextmanager
def _doing(what: str) -> Iterator[None]:
    """Turn a kernel refusal during ``what`` into a DeviceError that names it."""
    try:
        yield
    except DeviceError:
        raise
    except NetlinkError as exc:
        hint = ""
        if exc.errno == errno.EEXIST:
            hint = " (it exists already: does the pod have another interface?)"
        raise DeviceError(f"cannot {what}: {exc.strerror}{hint}") from exc
    except (OSError, LoaderError) as exc:
        raise DeviceError(f"cannot {what}: {exc}") from exc


SO_NETNS_COOKIE = 71  # uapi/asm-generic/socket.h, Linux >= 5.14


def current_netns_cookie() -> int:
    """The cookie of this thread's network namespace: the id BPF programs see
    through bpf_get_netns_cookie(), stable for the namespace's life."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


def netns_cookie(netns: str) -> int:
    """The cookie of the network namespace at ``netns`` (a path)."""
    with enter_netns(netns):
        return current_netns_cookie()


def _add_veth(
    *,
    host_name: str,
    host_mac: str,
    pod_ifname: str,
    pod_mac: str,
    candidates: Iterable[int],
    mtu: int,
    ns_fd: int,
    netns: str,
) -> int:
    with Rtnl() as rtnl:
        for ifindex in candidates:
            try:
                rtnl.add_veth(
                    name=host_name,
                    index=ifindex,
                    mac=host_mac,
                    mtu=mtu,
                    peer_name=pod_ifname,
                    peer_mac=pod_mac,
                    peer_netns_fd=ns_fd,
                )
            except NetlinkError as exc:
                if exc.errno not in (errno.EBUSY, errno.EEXIST):
                    raise DeviceError(f"cannot create veth {host_name}: {exc.strerror}") from exc
                # A taken ifindex is EBUSY on older kernels and EEXIST on newer
                # ones (6.18 here), like a taken name: find out which it is.
                if rtnl.link(host_name) is not None:
                    raise DeviceError(
                        f"cannot create veth {host_name}: the node already has a link of "
                        "that name (an earlier veth of this container and interface)"
                    ) from exc
                if exc.errno == errno.EBUSY or rtnl.link_at(ifindex) is not None:
                    continue  # that ifindex is taken: try the next
                raise DeviceError(
                    f"cannot create {pod_ifname} in {netns}: the pod's namespace already "
                    f"has a link named {pod_ifname}"
                ) from exc
            return ifindex
    raise DeviceError("no free ifindex left for a pod veth (bpf/datapath.toml maps.max_ifindex)")


def _delete_link(ifindex: int) -> bool:
    with Rtnl() as rtnl:
        return rtnl.delete_link(ifindex)


def delete_pod_link(*, name: str, ifindex: int) -> bool:
    """Delete the node side of a pod's veth (the pod side goes with it) if
    the link called ``name`` is still that veth at ``ifindex``. After its
    pod is gone, or when another agent has run, an ifindex may belong to an
    unrelated link: nothing but the veth itself is ever deleted. False if
    no such veth is there (already gone, or the name or index now names
    something else)."""
    with Rtnl() as rtnl:
        link = rtnl.link(name)
        if link is None or link.index != ifindex or link.kind != "veth":
            return False
        return rtnl.delete_link(ifindex)


def pod_link_state(netns: str, pod_ifname: str) -> tuple[int, list[str]] | None:
    """(ifindex, IPv4 addresses) of the pod side, None if it is gone."""
    from pyroute2 import IPRoute

    if not is_netns(netns):
        return None
    with contextlib.ExitStack() as stack:
        stack.enter_context(enter_netns(netns))
        ipr = stack.enter_context(IPRoute())
        found = ipr.link_lookup(ifname=pod_ifname)
        if not found:
            return None
        addrs = [
            f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
            for a in ipr.get_addr(index=found[0], family=2)
        ]
        return found[0], addrs
    return None
