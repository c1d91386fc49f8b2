"""The datapath maps: which exist (the ``[maps]`` tables of
``bpf/datapath.toml``, the same tables maps.h is rendered from) and typed
access to endpoints, ipcache, metrics, config and sockets.

Each class wraps the raw byte-level ``ciliate.loader.Map`` (or several) and
speaks in addresses, MACs and dataclasses; the byte layouts come from
abi.h through ``ciliate.datapath.abi``.
"""

from __future__ import annotations

import functools
import importlib.resources
import ipaddress
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ciliate.datapath import abi, objects, render
from ciliate.datapath.render import MapSpec, Shape
from ciliate.datapath.tables import Direction


def shape_path() -> Path:
    """bpf/datapath.toml from the checkout when running from one, else the
    copy installed beside the objects it built."""
    root = objects.source_root()
    if root is not None:
        return root / "bpf" / "datapath.toml"
    return Path(str(importlib.resources.files("ciliate.datapath") / "datapath.toml"))


@functools.cache
def shape() -> Shape:
    return render.load_shape(shape_path())


def spec(name: str) -> MapSpec:
    for candidate in shape().all_maps:
        if candidate.name == name:
            return candidate
    raise KeyError(f"no map {name!r} in {shape_path()}")


def type_size(type_name: str) -> int:
    """Bytes of a key or value type named in the table."""
    scalar = render.SCALAR_TYPES.get(type_name)
    return scalar if scalar is not None else abi.sizeof(type_name)


def max_entries(map_spec: MapSpec) -> int:
    """max_entries as compiled: a number, or a product of abi.h #defines."""
    if isinstance(map_spec.max_entries, int):
        return map_spec.max_entries
    return math.prod(abi.constant(name.strip()) for name in map_spec.max_entries.split("*"))


# Names of the maps Python code reaches by name (a test checks each is in
# the table).
IPCACHE = "ciliate_ipcache"
ENDPOINTS_BY_IP = "ciliate_ep_ip"
ENDPOINTS_BY_DEV = "ciliate_ep_dev"
METRICS = "ciliate_metrics"
EVENTS = "ciliate_events"
CONFIG = "ciliate_config"
ENDPOINT_NETNS = "ciliate_ep_netns"
SOCKHASH = "ciliate_sockhash"
SOCK_STATE = "ciliate_sock_state"
POLICY = "ciliate_policy"
POLICY_STATE = "ciliate_policy_state"
CONNTRACK = "ciliate_ct_v2"
LB_SERVICE = "ciliate_lb_service"
LB_BACKEND = "ciliate_lb_backend"
LB_REVNAT = "ciliate_lb_revnat"
LB_AFFINITY = "ciliate_lb_affinity"
LB_SOCK_REVNAT = "ciliate_lb_sock_revnat"
LB_MAGLEV = "ciliate_lb_maglev"
LB_NAT_FWD = "ciliate_lb_nat_fwd_v2"
LB_NAT_REV = "ciliate_lb_nat_rev"
LB_NETNS = "ciliate_lb_netns"
LB_SOCK_DESTROY = "ciliate_lb_sock_destroy"
# Every map the built datapath has (those of enabled features): what the
# agent pins.
ALL = tuple(m.name for m in shape().maps)

# ipcache flags (abi.h CILIATE_IPCACHE_F_*).
IPCACHE_F_LOCAL = abi.constant("CILIATE_IPCACHE_F_LOCAL")


class RawMap(Protocol):
    """What this module needs of a map (ciliate.loader.Map provides it)."""

    name: str
    max_entries: int

    def lookup(self, key: bytes) -> bytes | list[bytes] | None: ...
    def update(self, key: bytes, value: bytes, flags: int = 0) -> None: ...
    def update_batch(self, keys: Sequence[bytes], values: Sequence[bytes]) -> int: ...
    def delete(self, key: bytes) -> bool: ...
    def items(self) -> Iterator[tuple[bytes, bytes | list[bytes]]]: ...
    def keys(self) -> Iterator[bytes]: ...
    def lookup_batch_raw(self) -> Iterator[tuple[bytes, bytes, int]]: ...
    def clear(self) -> None: ...


_NONZERO = re.compile(rb"[^\x00]")


def mac_bytes(mac: str) -> bytes:
    data = bytes.fromhex(mac.replace(":", "").replace("-", ""))
    if len(data) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return data


def mac_str(data: bytes) -> str:
    return ":".join(f"{b:02x}" for b in data)


def _u32(value: int) -> bytes:
    return value.to_bytes(4, "little")


def _ip_u32(addr: ipaddress.IPv4Address) -> int:
    # Network byte order in memory: the u32 whose little-endian bytes are the address.
    return int.from_bytes(addr.packed, "little")


def _u32_ip(value: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(value.to_bytes(4, "little"))


@dataclass(frozen=True)
class Endpoint:
    ipv4: ipaddress.IPv4Address
    ifindex: int  # host-side veth
    mac: str  # pod eth0
    node_mac: str  # host-side veth: the pod's gateway MAC
    identity: int = 0
    endpoint_id: int = 0
    flags: int = 0

    def to_bytes(self) -> bytes:
        return abi.pack(
            "ciliate_endpoint",
            ifindex=self.ifindex,
            ipv4=_ip_u32(self.ipv4),
            identity=self.identity,
            endpoint_id=self.endpoint_id,
            flags=self.flags,
            mac=mac_bytes(self.mac),
            node_mac=mac_bytes(self.node_mac),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Endpoint:
        f = abi.unpack("ciliate_endpoint", data)
        return cls(
            ipv4=_u32_ip(f["ipv4"]),
            ifindex=f["ifindex"],
            mac=mac_str(f["mac"]),
            node_mac=mac_str(f["node_mac"]),
            identity=f["identity"],
            endpoint_id=f["endpoint_id"],
            flags=f["flags"],
        )


class EndpointMaps:
    """ciliate_ep_ip and ciliate_ep_dev, kept in step. Both are arrays:
    by endpoint slot (the pod IP's place in the node's pod CIDRs) and by
    host-side ifindex; an all-zero value is an empty slot."""

    def __init__(
        self,
        by_ip: RawMap,
        by_dev: RawMap,
        *,
        slot_of: Callable[[ipaddress.IPv4Address], int | None],
    ) -> None:
        self._by_ip = by_ip
        self._by_dev = by_dev
        self._slot_of = slot_of
        self._empty = bytes(abi.sizeof("ciliate_endpoint"))

    def _slot_key(self, addr: ipaddress.IPv4Address) -> bytes:
        slot = self._slot_of(addr)
        if slot is None:
            raise ValueError(f"{addr} is not in this node's pod CIDRs")
        return _u32(slot)

    def _dev_key(self, ifindex: int) -> bytes:
        if not 0 < ifindex < self._by_dev.max_entries:
            raise ValueError(
                f"ifindex {ifindex} is outside 1..{self._by_dev.max_entries - 1}: pod veths "
                "must be created with an ifindex below bpf/datapath.toml maps.max_ifindex"
            )
        return _u32(ifindex)

    def upsert(self, ep: Endpoint) -> None:
        value = ep.to_bytes()
        dev_key, ip_key = self._dev_key(ep.ifindex), self._slot_key(ep.ipv4)
        self._by_dev.update(dev_key, value)
        try:
            self._by_ip.update(ip_key, value)
        except Exception:
            self._by_dev.update(dev_key, self._empty)
            raise

    def delete(self, ep: Endpoint) -> None:
        self.delete_by_ip(ep.ipv4)
        self.delete_by_ifindex(ep.ifindex)

    def delete_by_ip(self, addr: ipaddress.IPv4Address) -> None:
        self._by_ip.update(self._slot_key(addr), self._empty)

    def delete_by_ifindex(self, ifindex: int) -> None:
        self._by_dev.update(self._dev_key(ifindex), self._empty)

    def get(self, addr: ipaddress.IPv4Address) -> Endpoint | None:
        slot = self._slot_of(addr)
        return None if slot is None else self._decode(self._by_ip.lookup(_u32(slot)))

    def get_by_ifindex(self, ifindex: int) -> Endpoint | None:
        if not 0 < ifindex < self._by_dev.max_entries:
            return None
        return self._decode(self._by_dev.lookup(_u32(ifindex)))

    def _decode(self, raw: bytes | list[bytes] | None) -> Endpoint | None:
        if raw is None or _single(raw) == self._empty:
            return None
        return Endpoint.from_bytes(_single(raw))

    def _present(self, raw: RawMap) -> dict[int, Endpoint]:
        # Batch reads of the whole array, scanned in C (a regex over the raw
        # values) so only filled slots become Python objects: the arrays
        # have 64k slots and a handful of pods.
        size = len(self._empty)
        out: dict[int, Endpoint] = {}
        for keys, values, count in raw.lookup_batch_raw():
            if not values.strip(b"\x00"):
                continue  # an all-empty chunk, checked at C speed
            seen = -1
            for match in _NONZERO.finditer(values, 0, count * size):
                index = match.start() // size
                if index == seen:
                    continue
                seen = index
                key = int.from_bytes(keys[index * 4 : index * 4 + 4], "little")
                out[key] = Endpoint.from_bytes(values[index * size : (index + 1) * size])
        return out

    def list(self) -> list[Endpoint]:
        return sorted(self._present(self._by_ip).values(), key=lambda ep: ep.ipv4)

    def list_by_ifindex(self) -> dict[int, Endpoint]:
        return self._present(self._by_dev)

    def clear(self) -> None:
        for raw in (self._by_ip, self._by_dev):
            for index in self._present(raw):
                raw.update(_u32(index), self._empty)


@dataclass(frozen=True)
class IpcacheEntry:
    prefix: ipaddress.IPv4Network
    identity: int
    node_ip: ipaddress.IPv4Address | None  # None: owned by this node
    flags: int = 0


class Ipcache:
    """ciliate_ipcache: prefix -> identity and owner node."""

    def __init__(self, raw: RawMap) -> None:
        self._raw = raw

    @staticmethod
    def _key(prefix: ipaddress.IPv4Network) -> bytes:
        return abi.pack(
            "ciliate_ipcache_key",
            prefixlen=prefix.prefixlen,
            addr=_ip_u32(prefix.network_address),
        )

    def upsert(self, entry: IpcacheEntry) -> None:
        node_ip = 0 if entry.node_ip is None else _ip_u32(entry.node_ip)
        value = abi.pack(
            "ciliate_ipcache_value", identity=entry.identity, node_ip=node_ip, flags=entry.flags
        )
        self._raw.update(self._key(entry.prefix), value)

    def delete(self, prefix: ipaddress.IPv4Network) -> bool:
        return self._raw.delete(self._key(prefix))

    def list(self) -> list[IpcacheEntry]:
        out = []
        for key, value in self._raw.items():
            k = abi.unpack("ciliate_ipcache_key", key)
            v = abi.unpack("ciliate_ipcache_value", _single(value))
            prefix = ipaddress.IPv4Network((_u32_ip(k["addr"]), k["prefixlen"]))
            node_ip = None if v["node_ip"] == 0 else _u32_ip(v["node_ip"])
            out.append(IpcacheEntry(prefix, v["identity"], node_ip, v["flags"]))
        return sorted(out, key=lambda e: (e.prefix.network_address, e.prefix.prefixlen))

    def clear(self) -> None:
        self._raw.clear()


@dataclass(frozen=True)
class MetricsRow:
    reason: int
    direction: Direction
    packets: int
    bytes: int


class Metrics:
    """ciliate_metrics: per-CPU counters at index reason * 2 + direction."""

    def __init__(self, raw: RawMap) -> None:
        self._raw = raw
        self._directions = abi.constant("CILIATE_METRICS_DIRECTIONS")

    def _index(self, reason: int, direction: int) -> bytes:
        return (reason * self._directions + direction).to_bytes(4, "little")

    def get(self, reason: int, direction: int) -> tuple[int, int]:
        """Packets and bytes summed over CPUs."""
        raw = self._raw.lookup(self._index(reason, direction))
        return _sum_percpu(raw)

    def rows(self) -> list[MetricsRow]:
        rows = []
        for key, value in self._raw.items():
            packets, nbytes = _sum_percpu(value)
            if packets:
                index = int.from_bytes(key, "little")
                reason, direction = divmod(index, self._directions)
                rows.append(MetricsRow(reason, Direction(direction), packets, nbytes))
        return rows

    def clear(self) -> None:
        zero = bytes(abi.sizeof("ciliate_metrics_value"))
        for key, _ in list(self._raw.items()):
            self._raw.update(key, zero)


class EndpointNetns:
    """ciliate_ep_netns: the network namespace cookie of each endpoint slot,
    which socket-level forwarding checks a pod socket against."""

    def __init__(
        self, raw: RawMap, *, slot_of: Callable[[ipaddress.IPv4Address], int | None]
    ) -> None:
        self._raw = raw
        self._slot_of = slot_of

    def _key(self, addr: ipaddress.IPv4Address) -> bytes:
        slot = self._slot_of(addr)
        if slot is None:
            raise ValueError(f"{addr} is not in this node's pod CIDRs")
        return slot.to_bytes(4, "little")

    def write(self, addr: ipaddress.IPv4Address, cookie: int) -> None:
        self._raw.update(self._key(addr), cookie.to_bytes(8, "little"))

    def get(self, addr: ipaddress.IPv4Address) -> int:
        raw = self._raw.lookup(self._key(addr))
        return 0 if raw is None else int.from_bytes(_single(raw), "little")

    def clear(self, addr: ipaddress.IPv4Address) -> None:
        self.write(addr, 0)

    def used_slots(self) -> set[int]:
        """Slots holding a cookie (one batch scan of the array)."""
        used: set[int] = set()
        for keys, values, count in self._raw.lookup_batch_raw():
            for i in range(count):
                if any(values[i * 8 : i * 8 + 8]):
                    used.add(int.from_bytes(keys[i * 4 : i * 4 + 4], "little"))
        return used

    def clear_slot(self, slot: int) -> None:
        self._raw.update(slot.to_bytes(4, "little"), bytes(8))


@dataclass(frozen=True)
class PodSocket:
    """A socket in ciliate_sockhash: one end of a TCP connection between local pods."""

    local: tuple[ipaddress.IPv4Address, int]
    remote: tuple[ipaddress.IPv4Address, int]


class SocketMap:
    """ciliate_sockhash: the kernel adds its sockets (sock_ops) and removes
    them when they close; user space lists them and evicts one whose
    connection policy no longer allows (its next bytes take the packet path)."""

    def __init__(self, raw: RawMap) -> None:
        self._raw = raw

    @staticmethod
    def _key(sock: PodSocket) -> bytes:
        return abi.pack(
            "ciliate_sock_key",
            local_ip=_ip_u32(sock.local[0]),
            remote_ip=_ip_u32(sock.remote[0]),
            local_port=sock.local[1],
            remote_port=sock.remote[1],
        )

    def delete(self, sock: PodSocket) -> bool:
        """Evict one socket; False when it was not (or no longer) mapped."""
        return self._raw.delete(self._key(sock))

    def list(self) -> list[PodSocket]:
        sockets = []
        keys = self._raw.keys()  # (a sockhash's values are socket cookies)
        for key in keys:
            f = abi.unpack("ciliate_sock_key", key)
            sockets.append(
                PodSocket(
                    (_u32_ip(f["local_ip"]), f["local_port"]),
                    (_u32_ip(f["remote_ip"]), f["remote_port"]),
                )
            )
        return sorted(sockets, key=lambda s: (s.local, s.remote))


class RuntimeConfig:
    """ciliate_config: knobs the programs read on every packet."""

    def __init__(self, raw: RawMap) -> None:
        self._raw = raw

    def set_trace(self, enabled: bool) -> None:
        flags = abi.constant("CILIATE_CONFIG_F_TRACE") if enabled else 0
        self._raw.update(bytes(4), abi.pack("ciliate_runtime_config", flags=flags))

    def trace_enabled(self) -> bool:
        raw = self._raw.lookup(bytes(4))
        if raw is None:
            return False
        flags = abi.unpack("ciliate_runtime_config", _single(raw))["flags"]
        return bool(flags & abi.constant("CILIATE_CONFIG_F_TRACE"))


def _single(value: bytes | list[bytes]) -> bytes:
    if isinstance(value, list):
        raise TypeError("expected a plain map value, got per-CPU values")
    return value


def _sum_percpu(value: bytes | list[bytes] | None) -> tuple[int, int]:
    if value is None:
        return 0, 0
    values = value if isinstance(value, list) else [value]
    packets = nbytes = 0
    for cpu_value in values:
        v = abi.unpack("ciliate_metrics_value", cpu_value)
        packets += v["packets"]
        nbytes += v["bytes"]
    return packets, nbytes
