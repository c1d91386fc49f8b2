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

from ciliate.datapath import bandwidth, objects
from ciliate.datapath import maps as dpmaps
from ciliate.datapath.conntrack import Conntrack
from ciliate.datapath.lb import LoadBalancer
from ciliate.datapath.policy import Policy
from ciliate.datapath.render import MapSpec
from ciliate.loader import BpfObject, LoaderError, Map, MapError, Program

# Entry points and the object each lives in.
PROGRAMS = {
    "from_container": "lxc",
    "to_container": "lxc",
    "from_host": "host",
    "from_netdev": "uplink",
    "to_netdev": "uplink",
    "sock_ops": "sock",
    "sock_msg": "sock",
}
# Socket-level service load balancing (bpf_sock_lb.c), with [features] services.
SERVICE_PROGRAMS = {
    "sock4_connect": "sock_lb",
    "sock4_sendmsg": "sock_lb",
    "sock4_recvmsg": "sock_lb",
    "sock4_getpeername": "sock_lb",
    # iter/udp, run by LoadBalancer.destroy_sockets_to (not attached to a hook)
    "sock4_destroy_udp": "sock_lb",
}


def _programs() -> dict[str, str]:
    """Entry points of the built datapath and the object each lives in."""
    if dpmaps.shape().enabled("services"):
        return {**PROGRAMS, **SERVICE_PROGRAMS}
    return dict(PROGRAMS)


@dataclass(frozen=True)
class NodeConfig:
    """Per-node values written into .rodata at load."""

    router_ip: ipaddress.IPv4Address
    node_ip: ipaddress.IPv4Address
    pod_cidrs: Sequence[ipaddress.IPv4Network] = ()
    # ciliate's service LB is off (a kube-proxy may NAT in the stack): the
    # programs hand replies of NATed connections to the stack (stack_nat.h).
    stack_nat_replies: bool = False

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
            "stack_nat_replies": bytes([self.stack_nat_replies]),
            "pod_cidr_first": u32s([int(c.network_address) for c in self.pod_cidrs]),
            "pod_cidr_size": u32s([c.num_addresses for c in self.pod_cidrs]),
            "pod_cidr_slot": u32s(self.slot_bases()),
        }


@dataclass(frozen=True)
class PinnedLoad:
    """What :meth:`Datapath.load_pinned` did."""

    datapath: Datapath
    reused: list[str]  # maps re-opened from their pins
    created: list[str]  # maps created and pinned now


def _check_pinned_layout(pinned: Map, spec: MapSpec, pin: Path) -> None:
    want_key = dpmaps.type_size(spec.key) if spec.key else 0
    want_value = dpmaps.type_size(spec.value) if spec.value else 0
    if (pinned.key_size, pinned.value_size) != (want_key, want_value) or (
        spec.type != "SK_STORAGE" and pinned.max_entries != dpmaps.max_entries(spec)
    ):
        raise MapError(
            f"pinned map {pin} has key/value/entries {pinned.key_size}/{pinned.value_size}/"
            f"{pinned.max_entries}, the datapath expects {want_key}/{want_value}/"
            f"{dpmaps.max_entries(spec)}: a layout change needs a new map name "
            f"({spec.name}_v2) in bpf/datapath.toml, or remove the stale pin"
        )


class Datapath:
    """Loaded programs and typed maps of one node (a context manager)."""

    def __init__(self, objs: Mapping[str, BpfObject], node: NodeConfig) -> None:
        self._objects = dict(objs)
        self.node = node
        lxc = self._objects["lxc"]
        self.maps: dict[str, Map] = {name: lxc.map(name) for name in dpmaps.ALL}
        self.programs: dict[str, Program] = {
            name: self._objects[kind].program(name) for name, kind in _programs().items()
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
        self.throttle = bandwidth.Throttle(
            self.maps[bandwidth.THROTTLE], slot_of=node.endpoint_slot
        )
        self._policy: Policy | None = None
        self._conntrack: Conntrack | None = None
        self._lb: LoadBalancer | None = None
        if dpmaps.shape().enabled("services"):
            self._lb = LoadBalancer(
                services=self.maps[dpmaps.LB_SERVICE],
                backends=self.maps[dpmaps.LB_BACKEND],
                revnat=self.maps[dpmaps.LB_REVNAT],
                affinity=self.maps[dpmaps.LB_AFFINITY],
                sock_revnat=self.maps[dpmaps.LB_SOCK_REVNAT],
                maglev=self.maps[dpmaps.LB_MAGLEV],
                nat_fwd=self.maps[dpmaps.LB_NAT_FWD],
                nat_rev=self.maps[dpmaps.LB_NAT_REV],
                netns=self.maps[dpmaps.LB_NETNS],
                sock_destroy=self.maps[dpmaps.LB_SOCK_DESTROY],
                sock_destroy_program=self.programs["sock4_destroy_udp"],
            )
        if dpmaps.shape().enabled("policy"):
            self._policy = Policy(self.maps[dpmaps.POLICY], self.maps[dpmaps.POLICY_STATE])
            self._conntrack = Conntrack(self.maps[dpmaps.CONNTRACK])

    @property
    def has_policy(self) -> bool:
        """Whether the datapath was built with [features] policy."""
        return self._policy is not None

    @property
    def policy(self) -> Policy:
        """Per-endpoint policy (ciliate_policy, ciliate_policy_state)."""
        if self._policy is None:
            raise LoaderError("the datapath was built without [features] policy")
        return self._policy

    @property
    def has_services(self) -> bool:
        """Whether the datapath was built with [features] services."""
        return self._lb is not None

    @property
    def lb(self) -> LoadBalancer:
        """Service load balancing (ciliate_lb_*): what the agent writes services into."""
        if self._lb is None:
            raise LoaderError("the datapath was built without [features] services")
        return self._lb

    @property
    def conntrack(self) -> Conntrack:
        """The connection tracker of the policy stage (ciliate_ct)."""
        if self._conntrack is None:
            raise LoaderError("the datapath was built without [features] policy")
        return self._conntrack

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
            for kind in sorted(set(_programs().values()), key=objects.LOAD_ORDER.index):
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

    @classmethod
    def load_pinned(cls, config: NodeConfig, maps_dir: Path) -> PinnedLoad:
        """Load every object on the maps pinned under ``maps_dir`` (the
        agent's restart): each map of the table whose pin exists is
        re-opened and reused, so forwarding state survives; a map without a
        pin (the first start, or a map or feature newer than the agent that
        pinned the others) is created and pinned. A pin whose layout differs
        from the table is refused: a changed layout needs a new map name
        (ciliate_<thing>_v2). On failure the new pins are removed again."""
        pins = {name: maps_dir / name for name in dpmaps.ALL}
        existing: dict[str, Map] = {}
        with contextlib.ExitStack() as opened:
            for name, pin in pins.items():
                if not pin.exists():
                    continue
                existing[name] = opened.enter_context(Map.open_pinned(pin))
                _check_pinned_layout(existing[name], dpmaps.spec(name), pin)
            # The objects dup the fds they reuse; ours close with this block.
            datapath = cls.load(config, existing_maps=existing)
        created = [name for name in pins if name not in existing]
        with contextlib.ExitStack() as undo:
            undo.callback(datapath.close)
            maps_dir.mkdir(parents=True, exist_ok=True)
            for name in created:
                datapath.maps[name].pin(pins[name])
                undo.callback(pins[name].unlink, missing_ok=True)
            undo.pop_all()
        return PinnedLoad(datapath=datapath, reused=sorted(existing), created=created)

    def program(self, name: str) -> Program:
        try:
            return self.programs[name]
        except KeyError:
            raise LoaderError(f"no program {name!r}; have {sorted(self.programs)}") from None

    def reset_maps(self) -> None:
        """Empty endpoints, ipcache, metrics, policy, conntrack and services;
        switch tracing off."""
        self.endpoints.clear()
        self.ipcache.clear()
        self.metrics.clear()
        self.config.set_trace(False)
        if self._policy is not None and self._conntrack is not None:
            self._policy.clear_all()
            self._conntrack.flush()
        if self._lb is not None:
            self._lb.clear()

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
