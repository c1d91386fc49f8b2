"""Service load balancing maps: the interface the agent calls (``Datapath.lb``).

The control plane owns the service table (frontends, backends with stable
ids, states, affinity, traffic policies); this module writes it into the
maps of ``bpf/include/ciliate/lb.h`` in Cilium's layout (see abi.h):

- ``ciliate_lb_service``: (frontend, scope, slot) -> slot 0: the service
  (active backend count, flags, affinity timeout, service id); slots
  1..count: active backend ids; then the terminating ones, which no new
  flow picks;
- ``ciliate_lb_backend``: backend id -> address, port, state, local flag;
- ``ciliate_lb_revnat``: service id (rev-NAT id) -> frontend;
- ``ciliate_lb_maglev``: service id -> Maglev lookup table (external
  services: the same backend for one flow from any node);
- ``ciliate_lb_affinity``, ``ciliate_lb_sock_revnat``, ``ciliate_lb_nat_fwd_v2``
  and ``ciliate_lb_nat_rev`` are written by the programs (kept backends,
  sockets' frontends, uplink flows); :meth:`LoadBalancer.expire_flows` frees
  the uplink flows that are over, :meth:`LoadBalancer.clear` empties them all.

Updates are ordered so that a program running meanwhile only ever sees a
whole old or a whole new service: backends, rev-NAT and Maglev first, then
the slots, then slot 0 (the count, the switch), then what the old layout
had beyond the new one.
"""

from __future__ import annotations

import array
import contextlib
import enum
import errno
import hashlib
import ipaddress
import os
import socket
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ciliate.datapath import abi, conntrack
from ciliate.datapath.maps import RawMap
from ciliate.loader import (
    IterLink,
    LoaderError,
    MapError,
    Program,
    attach_sock_addr,
    detach_pinned_link,
    update_pinned_link,
)

MAGLEV_SIZE = abi.constant("CILIATE_LB_MAGLEV_SIZE")
SCOPE_EXTERNAL = abi.constant("CILIATE_LB_SCOPE_EXTERNAL")
SCOPE_INTERNAL = abi.constant("CILIATE_LB_SCOPE_INTERNAL")
F_EXTERNAL = abi.constant("CILIATE_LB_F_EXTERNAL")
F_AFFINITY = abi.constant("CILIATE_LB_F_AFFINITY")
F_TWO_SCOPES = abi.constant("CILIATE_LB_F_TWO_SCOPES")
BACKEND_F_LOCAL = abi.constant("CILIATE_LB_BACKEND_F_LOCAL")
FLOW_F_SEEN_REPLY = abi.constant("CILIATE_LB_FLOW_F_SEEN_REPLY")
FLOW_F_CLOSING = abi.constant("CILIATE_LB_FLOW_F_CLOSING")
MAX_SERVICE_ID = 0xFFFF  # __u16 rev_nat_id
MAX_BACKEND_ID = 0xFFFFFFFF  # __u32 backend_id
MAX_SLOTS = 0xFFFF  # __u16 slot


# The socket LB programs (bpf_sock_lb.c), one cgroup hook each.
SOCKET_LB_PROGRAMS = ("sock4_connect", "sock4_sendmsg", "sock4_recvmsg", "sock4_getpeername")


def attach_socket_lb(
    programs: Mapping[str, Program],
    *,
    cgroup: str | os.PathLike[str],
    links_dir: Path,
) -> None:
    """Attach the socket LB programs to a cgroup v2 directory (the root:
    every pod and the node), one pinned link each under ``links_dir``
    (named after the program). A link already pinned there (an agent
    restart) gets the new program swapped in atomically, so connects
    never miss the hook. On failure the links made by this call go again."""
    links_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as undo:
        for name in SOCKET_LB_PROGRAMS:
            pin = links_dir / name
            if pin.exists():
                update_pinned_link(pin, programs[name])
            else:
                attach_sock_addr(programs[name], cgroup, pin)
                undo.callback(detach_pinned_link, pin)
        undo.pop_all()


def detach_socket_lb(links_dir: Path) -> None:
    """Detach the socket LB links pinned under ``links_dir`` (those present)."""
    for name in SOCKET_LB_PROGRAMS:
        pin = links_dir / name
        if pin.exists():
            detach_pinned_link(pin)


class L4Protocol(enum.IntEnum):
    TCP = socket.IPPROTO_TCP
    UDP = socket.IPPROTO_UDP


class BackendState(enum.IntEnum):
    ACTIVE = abi.constant("CILIATE_LB_BACKEND_ACTIVE")
    # Keeps its flows and takes no new one, unless no backend is active.
    TERMINATING = abi.constant("CILIATE_LB_BACKEND_TERMINATING")


def _check_port(port: int, what: str) -> None:
    if not 0 < port <= 0xFFFF:
        raise ValueError(f"{what} port {port} is outside 1..65535")


@dataclass(frozen=True, order=True)
class Frontend:
    """A service address: ClusterIP, node IP (NodePort), LoadBalancer or external IP."""

    address: ipaddress.IPv4Address
    port: int
    protocol: L4Protocol = L4Protocol.TCP

    def __post_init__(self) -> None:
        _check_port(self.port, f"frontend {self.address}")

    def __str__(self) -> str:
        return f"{self.address}:{self.port}/{self.protocol.name}"


@dataclass(frozen=True)
class Backend:
    """A backend with the id the control plane keeps stable for it."""

    id: int
    address: ipaddress.IPv4Address
    port: int
    state: BackendState = BackendState.ACTIVE
    local: bool = False  # a pod of this node

    def __post_init__(self) -> None:
        if not 0 < self.id <= MAX_BACKEND_ID:
            raise ValueError(f"backend id {self.id} is outside 1..{MAX_BACKEND_ID}")
        _check_port(self.port, f"backend {self.id} ({self.address})")

    def __str__(self) -> str:
        return f"{self.address}:{self.port}"


@dataclass(frozen=True)
class Service:
    """One frontend as written in the maps."""

    frontend: Frontend
    service_id: int  # the rev-NAT id
    backends: tuple[Backend, ...]  # active ones first (slot order), then terminating
    affinity_timeout: int = 0  # seconds of ClientIP affinity; 0 = none
    external: bool = False  # NodePort/LoadBalancer/external IP: balanced on the uplink too
    # In-cluster clients' backends when they differ (a traffic policy of
    # Local on one side only); None = the same as ``backends``.
    internal_backends: tuple[Backend, ...] | None = None
    active: int = field(default=0, compare=False)  # how many of ``backends`` are active


@dataclass(frozen=True)
class Flow:
    """A flow from outside the uplink translated to a backend (ciliate_lb_nat_fwd_v2)."""

    client: ipaddress.IPv4Address
    client_port: int
    frontend: Frontend
    backend_id: int
    snat_port: int | None  # the node's source port toward a remote backend; None: local
    answered: bool = False  # the backend replied
    closing: bool = False  # TCP: FIN both ways or RST; lives CILIATE_CT_LIFETIME_CLOSE more
    expires: int = field(default=0, compare=False)  # jiffies (ciliate.datapath.conntrack.now())


def new_flow_backends(backends: Iterable[Backend]) -> tuple[Backend, ...]:
    """The backends that take new flows: the active ones, or when there is none
    the terminating ones (the control plane leaves out those not serving), as
    kube-proxy (KEP-1669) and Cilium fall back, so the last pods of a rollout
    still serve rather than the service refusing."""
    items = tuple(backends)
    active = tuple(b for b in items if b.state == BackendState.ACTIVE)
    return active or tuple(b for b in items if b.state == BackendState.TERMINATING)


def maglev_table(backends: Sequence[Backend], size: int = MAGLEV_SIZE) -> list[int]:
    """Maglev's lookup table (Eisenbud et al., NSDI 2016, section 3.4) of
    the backends taking new flows (:func:`new_flow_backends`): ``size`` (a
    prime) backend ids, each backend in about ``size / n`` entries, and few
    entries moved when one backend comes or goes. Each backend's
    permutation comes from its address and port only, and the backends are
    taken in address order, so every node computes the same table for the
    same backends (whatever their ids)."""
    active = sorted(new_flow_backends(backends), key=lambda b: (int(b.address), b.port))
    if not active:
        return []
    offsets, skips = [], []
    for b in active:
        digest = hashlib.blake2b(f"{b.address}:{b.port}".encode(), digest_size=16).digest()
        offsets.append(int.from_bytes(digest[:8], "little") % size)
        skips.append(int.from_bytes(digest[8:], "little") % (size - 1) + 1)
    table = [0] * size
    taken = [False] * size
    nexts = [0] * len(active)
    filled = 0
    while True:
        for i, b in enumerate(active):
            # Walk backend i's permutation to its next free entry.
            entry = (offsets[i] + nexts[i] * skips[i]) % size
            while taken[entry]:
                nexts[i] += 1
                entry = (offsets[i] + nexts[i] * skips[i]) % size
            table[entry], taken[entry] = b.id, True
            nexts[i] += 1
            filled += 1
            if filled == size:
                return table


def _ip(addr: ipaddress.IPv4Address) -> int:
    # Network byte order in memory: the u32 whose little-endian bytes are the address.
    return int.from_bytes(addr.packed, "little")


def _from_ip(value: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(value.to_bytes(4, "little"))


def _single(value: bytes | list[bytes]) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError("the lb maps are not per-CPU")
    return value


class LoadBalancer:
    """The service maps of one node; ``upsert_service``/``delete_service``
    are what the agent calls when the service table changes. Which backend
    ids are in use is rebuilt from the maps at start, so an agent restart
    on pinned maps carries on."""

    def __init__(
        self,
        *,
        services: RawMap,
        backends: RawMap,
        revnat: RawMap,
        affinity: RawMap,
        sock_revnat: RawMap,
        maglev: RawMap,
        nat_fwd: RawMap,
        nat_rev: RawMap,
        netns: RawMap,
        sock_destroy: RawMap | None = None,
        sock_destroy_program: Program | None = None,
    ) -> None:
        self._services = services
        self._backends = backends
        self._revnat = revnat
        self._affinity = affinity
        self._sock_revnat = sock_revnat
        self._maglev = maglev
        self._nat_fwd = nat_fwd
        self._nat_rev = nat_rev
        self._netns = netns
        # Connected UDP sockets to removed backends (kernel >= 6.5): the
        # backends of one pass, and the iter/udp program that destroys them.
        self._sock_destroy = sock_destroy
        self._sock_destroy_program = sock_destroy_program
        self._table: dict[Frontend, Service] = {}
        # Indexes, so a write costs the same with 10 or 10,000 services:
        # service id -> frontend; backend id -> the backend and its users.
        self._ids: dict[int, Frontend] = {}
        self._backend_of: dict[int, Backend] = {}
        self._users: dict[int, set[Frontend]] = {}
        for service in self._read():
            self._index(service)

    def _index(self, service: Service) -> None:
        self._table[service.frontend] = service
        self._ids[service.service_id] = service.frontend
        for b in self._all_backends(service):
            self._backend_of[b.id] = b
            self._users.setdefault(b.id, set()).add(service.frontend)

    def _unindex(self, service: Service) -> None:
        del self._table[service.frontend]
        if self._ids.get(service.service_id) == service.frontend:
            del self._ids[service.service_id]
        for backend_id in self._backend_ids(service):
            users = self._users.get(backend_id, set())
            users.discard(service.frontend)
            if not users:
                self._users.pop(backend_id, None)
                self._backend_of.pop(backend_id, None)

    # ---- keys and values

    @staticmethod
    def _service_key(frontend: Frontend, *, slot: int, scope: int) -> bytes:
        return abi.pack(
            "ciliate_lb_service_key",
            addr=_ip(frontend.address),
            dport=socket.htons(frontend.port),
            slot=slot,
            protocol=int(frontend.protocol),
            scope=scope,
        )

    @staticmethod
    def _u32(value: int) -> bytes:
        return value.to_bytes(4, sys.byteorder)

    # ---- writes

    def upsert_service(
        self,
        frontend: Frontend,
        backends: Sequence[Backend],
        *,
        service_id: int,
        affinity_timeout: int = 0,
        external: bool = False,
        internal_backends: Sequence[Backend] | None = None,
    ) -> Service:
        """Create or replace the service at ``frontend``. ``service_id``
        (1..65535) is its rev-NAT id, kept by the control plane, one per
        frontend; ``backends`` in any order (terminating ones take no new
        flow); ``affinity_timeout`` > 0 is ClientIP affinity for that many
        seconds; ``external`` balances it on the uplink too (Maglev);
        ``internal_backends`` gives in-cluster clients other backends (a
        traffic policy of Local on one side only). On failure the old
        service (or nothing) is put back."""
        service = self._validate(
            frontend,
            backends,
            service_id=service_id,
            affinity_timeout=affinity_timeout,
            external=external,
            internal_backends=internal_backends,
        )
        old = self._table.get(frontend)
        try:
            self._write(service, old)
        except MapError as exc:
            self._undo(service, old)
            if exc.errno == errno.E2BIG:  # a hash map at max_entries
                raise MapError(
                    f"{frontend}: {exc}: the map is full; raise its max_entries in "
                    "bpf/datapath.toml (maps.ciliate_lb_*) and rebuild",
                    errno=exc.errno,
                    op=exc.op,
                ) from exc
            raise
        except Exception:
            self._undo(service, old)
            raise
        if old is not None:
            self._unindex(old)
            left = self._backend_ids(old)
            if old.service_id == service.service_id:
                left -= self._backend_ids(service)
            self._forget_affinity(old.service_id, left)
            if old.external:
                self._forget_udp_flows(old.frontend, left)
        self._index(service)
        self._drop_unused_backends(self._backend_ids(old))
        return service

    def delete_service(self, frontend: Frontend) -> bool:
        """Remove the service at ``frontend``; False if there was none.
        Sockets already connected to a backend keep it."""
        old = self._table.get(frontend)
        if old is None:
            return False
        self._unindex(old)
        self._remove(old, keep=None)
        self._forget_affinity(old.service_id, self._backend_ids(old))
        self._drop_unused_backends(self._backend_ids(old))
        return True

    def _forget_affinity(self, service_id: int, backend_ids: set[int]) -> None:
        """Clients kept (ClientIP affinity, a UDP socket's sends) on a backend that
        has left the service pick again. The programs check only that the kept
        backend exists and is active: one still backing another service would
        keep the client for the whole timeout, and a rev-NAT or backend id given
        again later would send it to a backend of another service."""
        if not backend_ids:
            return
        # Read in raw chunks and matched as bytes: the map holds up to 16,384
        # clients, one Python object each would cost ~0.1 s a backend change.
        key_size = abi.sizeof("ciliate_lb_affinity_key")
        value_size = abi.sizeof("ciliate_lb_affinity_value")
        at = abi.offsetof("ciliate_lb_affinity_key", "rev_nat_id")
        id_at = abi.offsetof("ciliate_lb_affinity_value", "backend_id")
        service = (service_id & 0xFFFF).to_bytes(2, sys.byteorder)  # the key's width
        left = {backend_id.to_bytes(4, sys.byteorder) for backend_id in backend_ids}
        doomed = []
        for keys, values, count in self._affinity.lookup_batch_raw():
            for i in range(count):
                key = keys[i * key_size : (i + 1) * key_size]
                if key[at : at + 2] != service:
                    continue
                kept = values[i * value_size + id_at : i * value_size + id_at + 4]
                if kept in left:
                    doomed.append(key)
        for key in doomed:
            self._affinity.delete(key)

    def _validate(
        self,
        frontend: Frontend,
        backends: Sequence[Backend],
        *,
        service_id: int,
        affinity_timeout: int,
        external: bool,
        internal_backends: Sequence[Backend] | None,
    ) -> Service:
        if not 0 < service_id <= MAX_SERVICE_ID:
            raise ValueError(f"{frontend}: service id {service_id} is outside 1..{MAX_SERVICE_ID}")
        holder = self._ids.get(service_id)
        if holder is not None and holder != frontend:
            raise ValueError(
                f"{frontend}: service id {service_id} is already the id of {holder}; "
                "each frontend needs its own"
            )
        if not 0 <= affinity_timeout <= 0xFFFFFFFF:
            raise ValueError(f"{frontend}: affinity timeout {affinity_timeout} s is out of range")
        groups = [tuple(backends)]
        if internal_backends is not None:
            groups.append(tuple(internal_backends))
        known: dict[int, Backend] = {}
        for group in groups:
            if len(group) >= MAX_SLOTS:
                raise ValueError(f"{frontend}: {len(group)} backends, at most {MAX_SLOTS - 1}")
            seen: set[int] = set()
            for b in group:
                if b.id in seen:
                    raise ValueError(f"{frontend}: backend id {b.id} is listed twice")
                seen.add(b.id)
                prior = known.get(b.id)
                if prior is None and self._users.get(b.id, set()) - {frontend}:
                    prior = self._backend_of[b.id]  # another service's
                if prior is not None and (prior.address, prior.port) != (b.address, b.port):
                    raise ValueError(
                        f"{frontend}: backend id {b.id} is {b} here but {prior} in another "
                        "service; a backend id names one address and port"
                    )
                known[b.id] = b

        def ordered(group: Iterable[Backend]) -> tuple[Backend, ...]:
            items = list(group)
            return tuple(b for b in items if b.state == BackendState.ACTIVE) + tuple(
                b for b in items if b.state != BackendState.ACTIVE
            )

        ext = ordered(backends)
        return Service(
            frontend=frontend,
            service_id=service_id,
            backends=ext,
            affinity_timeout=affinity_timeout,
            external=external,
            internal_backends=None if internal_backends is None else ordered(internal_backends),
            active=sum(b.state == BackendState.ACTIVE for b in ext),
        )

    @staticmethod
    def _all_backends(service: Service) -> tuple[Backend, ...]:
        return service.backends + (service.internal_backends or ())

    def _backend_ids(self, service: Service | None) -> set[int]:
        return set() if service is None else {b.id for b in self._all_backends(service)}

    def _flags(self, service: Service) -> int:
        flags = F_EXTERNAL if service.external else 0
        if service.affinity_timeout:
            flags |= F_AFFINITY
        if service.internal_backends is not None:
            flags |= F_TWO_SCOPES
        return flags

    def _write_scope(self, service: Service, group: tuple[Backend, ...], *, scope: int) -> None:
        for slot, b in enumerate(group, start=1):
            self._services.update(
                self._service_key(service.frontend, slot=slot, scope=scope),
                abi.pack(
                    "ciliate_lb_service_value", backend_id=b.id, rev_nat_id=service.service_id
                ),
            )
        # Slots 1..count take new flows: the active ones (first in slot order),
        # or with none the terminating ones, which then fill those slots.
        count = len(new_flow_backends(group))
        self._services.update(
            self._service_key(service.frontend, slot=0, scope=scope),
            abi.pack(
                "ciliate_lb_service_value",
                count=count,
                terminating=len(group) - count,
                rev_nat_id=service.service_id,
                affinity_timeout=service.affinity_timeout,
                flags=self._flags(service),
            ),
        )

    def _write(self, service: Service, old: Service | None) -> None:
        for b in self._all_backends(service):
            self._backends.update(
                self._u32(b.id),
                abi.pack(
                    "ciliate_lb_backend",
                    addr=_ip(b.address),
                    port=socket.htons(b.port),
                    state=int(b.state),
                    flags=BACKEND_F_LOCAL if b.local else 0,
                ),
            )
        self._revnat.update(
            self._u32(service.service_id),
            abi.pack(
                "ciliate_lb_revnat",
                addr=_ip(service.frontend.address),
                port=socket.htons(service.frontend.port),
            ),
        )
        table = maglev_table(service.backends) if service.external else []
        if table:
            self._maglev.update(self._u32(service.service_id), array.array("I", table).tobytes())
        # The internal scope first: the external slot 0 that points at it
        # (CILIATE_LB_F_TWO_SCOPES) comes after.
        if service.internal_backends is not None:
            self._write_scope(service, service.internal_backends, scope=SCOPE_INTERNAL)
        self._write_scope(service, service.backends, scope=SCOPE_EXTERNAL)
        if old is not None:
            self._remove(old, keep=service)
        if not table:
            self._maglev.delete(self._u32(service.service_id))

    def _remove(self, old: Service, *, keep: Service | None) -> None:
        """Delete the entries of ``old`` that ``keep`` (its replacement, if
        any) does not have: slot 0 first, so no lookup meets a count whose
        slots are gone."""
        scopes = [(SCOPE_EXTERNAL, old.backends)]
        if old.internal_backends is not None:
            scopes.insert(0, (SCOPE_INTERNAL, old.internal_backends))
        for scope, group in scopes:
            if keep is None or keep.frontend != old.frontend:
                kept = -1
            elif scope == SCOPE_EXTERNAL:
                kept = len(keep.backends)
            else:
                kept = -1 if keep.internal_backends is None else len(keep.internal_backends)
            for slot in range(0, len(group) + 1):
                if slot > kept:
                    self._services.delete(self._service_key(old.frontend, slot=slot, scope=scope))
        if keep is None or keep.service_id != old.service_id:
            self._revnat.delete(self._u32(old.service_id))
            self._maglev.delete(self._u32(old.service_id))

    def _undo(self, failed: Service, old: Service | None) -> None:
        """Put back the state before a failed ``_write`` of ``failed``."""
        try:
            self._remove(failed, keep=old)
            if old is not None:
                self._write(old, None)
        finally:
            self._drop_unused_backends(self._backend_ids(failed))

    def _drop_unused_backends(self, candidates: set[int]) -> None:
        for backend_id in candidates:
            if backend_id not in self._users:
                self._backends.delete(self._u32(backend_id))

    def clear(self) -> None:
        """Remove every service, backend, affinity, socket and NAT entry."""
        for raw in (
            self._services,
            self._backends,
            self._revnat,
            self._affinity,
            self._sock_revnat,
            self._maglev,
            self._nat_fwd,
            self._nat_rev,
            self._netns,
        ):
            raw.clear()
        self._table.clear()
        self._ids.clear()
        self._backend_of.clear()
        self._users.clear()

    # ---- whose sockets

    def restrict_sockets(self, netns_cookies: Iterable[int]) -> None:
        """Translate only the sockets of these network namespaces (the
        node's and its pods'; add each new pod's with :meth:`allow_netns`).
        Needed where several nodes share one cgroup tree (the lab): every
        node's socket programs see every socket. The namespaces are written
        before the switch, so no socket of ours is missed meanwhile."""
        for cookie in netns_cookies:
            self.allow_netns(cookie)
        self._netns.update(self._u64(0), self._u32(1))

    def allow_netns(self, cookie: int) -> None:
        if not 0 < cookie < 1 << 64:
            raise ValueError(f"netns cookie {cookie} is not a cookie (1..2^64-1)")
        self._netns.update(self._u64(cookie), self._u32(1))

    def forget_netns(self, cookie: int) -> None:
        self._netns.delete(self._u64(cookie))

    def unrestrict_sockets(self) -> None:
        """Translate every socket again (the switch off; cookies kept)."""
        self._netns.delete(self._u64(0))

    # ---- sockets left connected to removed backends

    @property
    def destroys_sockets(self) -> bool:
        """Whether :meth:`destroy_sockets_to` can run (its map and program given)."""
        return self._sock_destroy is not None and self._sock_destroy_program is not None

    def destroy_sockets_to(
        self,
        backends: Iterable[Backend],
        *,
        netns: Iterable[str | os.PathLike[str] | None],
    ) -> int:
        """Destroy the connected UDP sockets the socket LB sent to one of
        ``backends`` (removed: no longer a backend of any frontend), in each
        network namespace of ``netns`` (paths; None: the caller's own), as
        Cilium does: the application's next send or receive fails with
        ECONNABORTED and it connects again, rather than sending into nothing
        (kube-proxy clears the conntrack entries of a removed UDP endpoint
        for the same reason). A socket walk sees only the sockets of the
        namespace it runs in, hence one per pod and one for the node. A
        namespace gone meanwhile (its pod deleted) is skipped. The backends
        are in ciliate_lb_sock_destroy only during the walks. Returns the
        namespaces walked."""
        if self._sock_destroy is None or self._sock_destroy_program is None:
            raise LoaderError("this load balancer was given no socket-destroy map and program")
        keys = {self._backend_key(b.address, b.port) for b in backends}
        if not keys:
            return 0
        walked = 0
        try:
            for key in keys:
                self._sock_destroy.update(key, self._u32(1))
            with IterLink(self._sock_destroy_program) as link:
                for path in netns:
                    try:
                        link.run(netns=path)
                    except LoaderError as exc:
                        if exc.errno in (errno.ENOENT, errno.EINVAL) and path is not None:
                            continue  # the namespace went with its pod: no socket left
                        raise
                    walked += 1
        finally:
            for key in keys:
                with contextlib.suppress(MapError):
                    self._sock_destroy.delete(key)
        return walked

    @staticmethod
    def _backend_key(address: ipaddress.IPv4Address, port: int) -> bytes:
        # As sock4_destroy_udp builds it: port << 32 | address, both network order.
        return (socket.htons(port) << 32 | _ip(address)).to_bytes(8, sys.byteorder)

    @staticmethod
    def _u64(value: int) -> bytes:
        return value.to_bytes(8, sys.byteorder)

    # ---- reads

    def backend_in_use(self, backend_id: int) -> bool:
        """Whether some frontend written in the maps still has this backend."""
        return backend_id in self._backend_of

    def get(self, frontend: Frontend) -> Service | None:
        return self._table.get(frontend)

    def maglev(self, service_id: int) -> list[int]:
        """The Maglev table of an external service as written ([] if none)."""
        raw = self._maglev.lookup(self._u32(service_id))
        if raw is None:
            return []
        return list(array.array("I", _single(raw)))

    def flows(self) -> list[Flow]:
        """The uplink flows the programs translated, as they keep them (the
        dead among them too, until :meth:`expire_flows` or a new packet of
        their tuple frees them)."""
        out = []
        for key, value in self._nat_fwd.items():
            k = abi.unpack("ciliate_lb_tuple", key)
            v = abi.unpack("ciliate_lb_flow", _single(value))
            out.append(
                Flow(
                    client=_from_ip(k["saddr"]),
                    client_port=socket.ntohs(k["sport"]),
                    frontend=Frontend(
                        address=_from_ip(k["daddr"]),
                        port=socket.ntohs(k["dport"]),
                        protocol=L4Protocol(k["protocol"]),
                    ),
                    backend_id=v["backend_id"],
                    snat_port=socket.ntohs(v["nat_port"]) or None,
                    answered=bool(v["flags"] & FLOW_F_SEEN_REPLY),
                    closing=bool(v["flags"] & FLOW_F_CLOSING),
                    expires=v["expires"],
                )
            )
        return sorted(out, key=lambda f: (f.frontend, int(f.client), f.client_port))

    def expire_flows(self, *, now: int | None = None) -> int:
        """Free the uplink flows past their deadline (``now``: jiffies, by
        default the kernel's) with their reply entries, when those are still
        theirs (a SNAT port may serve a newer flow by then). The programs take
        such flows back too when their tuple or SNAT port comes again; this
        keeps the LRU tables for live flows. Returns how many flows were freed."""
        deadline = conntrack.now() if now is None else now
        return self._free_flows(lambda _tuple, flow: bool(flow["expires"] < deadline))

    def _forget_udp_flows(self, frontend: Frontend, backend_ids: set[int]) -> None:
        """Uplink flows of a non-TCP frontend to backends that have left it pick
        again at their next packet, as kube-proxy clears the conntrack entries of
        a removed UDP endpoint: a backend still backing another service stays in
        the maps, active, and the flow would keep it for as long as packets come.
        TCP flows keep theirs (kube-proxy leaves TCP entries: an open connection
        goes on while the pod runs)."""
        if not backend_ids or frontend.protocol == L4Protocol.TCP:
            return
        target = (_ip(frontend.address), socket.htons(frontend.port), int(frontend.protocol))
        self._free_flows(
            lambda t, flow: (
                (t["daddr"], t["dport"], t["protocol"]) == target
                and flow["backend_id"] in backend_ids
            )
        )

    def _free_flows(self, doomed: Callable[[dict[str, Any], dict[str, Any]], bool]) -> int:
        """Free the uplink flows ``doomed(tuple, flow)`` picks, with their reply
        entries when those are still theirs; returns how many were freed."""
        dead: dict[tuple[int, int, int, int, int], int] = {}  # tuple -> SNAT port (0: none)
        for key, value in self._nat_fwd.items():
            flow = abi.unpack("ciliate_lb_flow", _single(value))
            k = abi.unpack("ciliate_lb_tuple", key)
            if doomed(k, flow):
                orig = (k["saddr"], k["daddr"], k["sport"], k["dport"], k["protocol"])
                dead[orig] = flow["nat_port"]
        if not dead:
            return 0
        for key, value in list(self._nat_rev.items()):
            reply = abi.unpack("ciliate_lb_tuple", key)
            rev = abi.unpack("ciliate_lb_nat_rev", _single(value))
            orig = (rev["daddr"], rev["saddr"], rev["dport"], rev["sport"], reply["protocol"])
            nat_port = dead.get(orig)
            if nat_port is None:
                continue
            # The reply entry is the dead flow's own: to its SNAT port, or
            # (a local backend) to the client itself.
            if (nat_port and reply["dport"] == nat_port) or (
                not nat_port and (reply["daddr"], reply["dport"]) == (orig[0], orig[2])
            ):
                self._nat_rev.delete(key)
        freed = 0
        for orig in dead:
            key = abi.pack(
                "ciliate_lb_tuple",
                saddr=orig[0],
                daddr=orig[1],
                sport=orig[2],
                dport=orig[3],
                protocol=orig[4],
            )
            # A packet may have started a new flow of the tuple meanwhile.
            raw = self._nat_fwd.lookup(key)
            if raw is not None and doomed(
                abi.unpack("ciliate_lb_tuple", key), abi.unpack("ciliate_lb_flow", _single(raw))
            ):
                freed += self._nat_fwd.delete(key)
        return freed

    def _read(self) -> list[Service]:
        """Rebuild the services from the maps (an agent restart on pins)."""
        backends: dict[int, Backend] = {}
        for key, value in self._backends.items():
            f = abi.unpack("ciliate_lb_backend", _single(value))
            backend_id = int.from_bytes(key, sys.byteorder)
            backends[backend_id] = Backend(
                id=backend_id,
                address=_from_ip(f["addr"]),
                port=socket.ntohs(f["port"]),
                state=BackendState(f["state"]),
                local=bool(f["flags"] & BACKEND_F_LOCAL),
            )
        heads: dict[tuple[Frontend, int], dict[str, int]] = {}
        slots: dict[tuple[Frontend, int], dict[int, int]] = {}
        for key, value in self._services.items():
            k = abi.unpack("ciliate_lb_service_key", key)
            v = abi.unpack("ciliate_lb_service_value", _single(value))
            frontend = Frontend(
                address=_from_ip(k["addr"]),
                port=socket.ntohs(k["dport"]),
                protocol=L4Protocol(k["protocol"]),
            )
            if k["slot"] == 0:
                heads[frontend, k["scope"]] = v
            else:
                slots.setdefault((frontend, k["scope"]), {})[k["slot"]] = v["backend_id"]

        def group(frontend: Frontend, scope: int) -> tuple[Backend, ...]:
            by_slot = slots.get((frontend, scope), {})
            return tuple(
                backends[by_slot[slot]] for slot in sorted(by_slot) if by_slot[slot] in backends
            )

        out = []
        for (frontend, scope), head in heads.items():
            if scope != SCOPE_EXTERNAL:
                continue
            ext = group(frontend, SCOPE_EXTERNAL)
            two = bool(head["flags"] & F_TWO_SCOPES)
            out.append(
                Service(
                    frontend=frontend,
                    service_id=head["rev_nat_id"],
                    backends=ext,
                    affinity_timeout=head["affinity_timeout"],
                    external=bool(head["flags"] & F_EXTERNAL),
                    internal_backends=group(frontend, SCOPE_INTERNAL) if two else None,
                    active=sum(b.state == BackendState.ACTIVE for b in ext),
                )
            )
        return out

    # Last: a method named list shadows the builtin in the annotations after it.
    def list(self) -> list[Service]:
        """The services as the maps hold them, by frontend."""
        return sorted(self._table.values(), key=lambda s: s.frontend)
