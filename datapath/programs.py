"""The datapath of one node: every program loaded once, all sharing one set
of maps.

``bpf_lxc.o`` is loaded first and creates the maps; ``bpf_host.o`` and
``bpf_uplink.o`` reuse them by fd, so an endpoint written once is seen by
every program. Per-node values go into each object's .rodata before load.
Adding a pod loads nothing: it writes map entries and attaches programs
that are already in the kernel.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from ciliate.datapath import maps as dpmaps
from ciliate.datapath import objects
from ciliate.loader import BpfObject, LoaderError, Map, Program

# Entry points and the object each lives in.
PROGRAMS = {
    "from_container": "lxc",
    "to_container": "lxc",
    "from_host": "host",
    "from_netdev": "uplink",
    "sock_ops": "sock",
    "sock_msg": "sock",
}


@dataclass(frozen=True)
class NodeConfig:
    """Per-node values written into .rodata at load."""

    router_ip: ipaddress.IPv4Address
    node_ip: ipaddress.IPv4Address
    pod_cidrs: Sequence[ipaddress.IPv4Network] = ()

    def slot_bases(self) -> list[int]:
        """First endpoint slot of each pod CIDR: the CIDRs laid end to end."""
        bases, next_slot = [], 0
        for cidr in self.pod_cidrs:
            bases.append(next_slot)
            next_slot += cidr.num_addresses
        return bases

    def endpoint_slot(self, addr: ipaddress.IPv4Address) -> int | None:
        """The index of a pod IP in ciliate_ep_ip (as endpoint_slot() in C)."""
        for cidr, base in zip(self.pod_cidrs, self.slot_bases(), strict=True):
            if addr in cidr:
                return base + int(addr) - int(cidr.network_address)
        return None

    def rodata(self, *, max_pod_cidrs: int, endpoint_slots: int) -> dict[str, bytes]:
        if len(self.pod_cidrs) > max_pod_cidrs:
            raise ValueError(
                f"{len(self.pod_cidrs)} pod CIDRs given, the datapath was built for at most "
                f"{max_pod_cidrs} (bpf/datapath.toml node.max_pod_cidrs)"
            )
        total = sum(c.num_addresses for c in self.pod_cidrs)
        if total > endpoint_slots:
            raise ValueError(
                f"pod CIDRs {', '.join(map(str, self.pod_cidrs))} hold {total} addresses; the "
                f"datapath was built for {endpoint_slots} (bpf/datapath.toml maps.endpoint_slots)"
            )
        unused = max_pod_cidrs - len(self.pod_cidrs)

        def u32s(values: list[int]) -> bytes:
            return b"".join(v.to_bytes(4, "little") for v in [*values, *[0] * unused])

        return {
            "router_ip": self.router_ip.packed,
            "node_ip": self.node_ip.packed,
            "pod_cidr_first": u32s([int(c.network_address) for c in self.pod_cidrs]),
            "pod_cidr_size": u32s([c.num_addresses for c in self.pod_cidrs]),
            "pod_cidr_slot": u32s(self.slot_bases()),
        }


class Datapath:
    """Loaded programs and typed maps of one node (a context manager)."""

    def __init__(self, objs: Mapping[str, BpfObject], node: NodeConfig) -> None:
        self._objects = dict(objs)
        self.node = node
        lxc = self._objects["lxc"]
        self.maps: dict[str, Map] = {name: lxc.map(name) for name in dpmaps.ALL}
        self.programs: dict[str, Program] = {
            name: self._objects[kind].program(name) for name, kind in PROGRAMS.items()
        }
        self.endpoints = dpmaps.EndpointMaps(
            self.maps[dpmaps.ENDPOINTS_BY_IP],
            self.maps[dpmaps.ENDPOINTS_BY_DEV],
            slot_of=node.endpoint_slot,
        )
        self.ipcache = dpmaps.Ipcache(self.maps[dpmaps.IPCACHE])
        self.metrics = dpmaps.Metrics(self.maps[dpmaps.METRICS])
        self.config = dpmaps.RuntimeConfig(self.maps[dpmaps.CONFIG])
        self.sockets = dpmaps.SocketMap(self.maps[dpmaps.SOCKHASH])
        self.endpoint_netns = dpmaps.EndpointNetns(
            self.maps[dpmaps.ENDPOINT_NETNS], slot_of=node.endpoint_slot
        )

    @classmethod
    def load(
        cls,
        config: NodeConfig,
        *,
        object_dir: Path | None = None,
        existing_maps: Mapping[str, Map] | None = None,
    ) -> Datapath:
        """Load every object; ``existing_maps`` (e.g. re-opened pins) are
        reused instead of creating new maps, so forwarding state survives."""
        directory = object_dir or objects.object_dir()
        shared: dict[str, Map] = dict(existing_maps or {})
        loaded: dict[str, BpfObject] = {}
        with contextlib.ExitStack() as undo:
            for kind in ("lxc", "host", "uplink", "sock"):
                obj = BpfObject.open(directory / objects.OBJECTS[kind])
                undo.callback(obj.close)
                max_cidrs = obj.btf.datasec_vars(".rodata")["pod_cidr_first"][1] // 4
                slots = obj.map(dpmaps.ENDPOINTS_BY_IP).max_entries
                obj.set_rodata(config.rodata(max_pod_cidrs=max_cidrs, endpoint_slots=slots))
                for name, existing in shared.items():
                    if name in obj.maps:
                        obj.reuse_map(name, existing)
                obj.load()
                loaded[kind] = obj
                if not shared:
                    shared = {name: obj.map(name) for name in dpmaps.ALL}
            undo.pop_all()
        return cls(loaded, config)

    def program(self, name: str) -> Program:
        try:
            return self.programs[name]
        except KeyError:
            raise LoaderError(f"no program {name!r}; have {sorted(self.programs)}") from None

    def reset_maps(self) -> None:
        """Empty endpoints, ipcache and metrics; switch tracing off."""
        self.endpoints.clear()
        self.ipcache.clear()
        self.metrics.clear()
        self.config.set_trace(False)

    def close(self) -> None:
        for obj in reversed(list(self._objects.values())):
            obj.close()
        self._objects.clear()

    def __enter__(self) -> Datapath:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
