"""Endpoints of one node: the agent's implementation of the CNI endpoint
service, and the reconciliation that makes restarts and crashes safe.

ADD is one transaction: IP, identity, veth (pod side created in the pod's
namespace), map entries, program attachments (tcx links, pinned) and the
endpoint row. The store commits last; every earlier step registers its undo
on an ExitStack, so a failure anywhere rolls back everything before it.

Programs are attached as clsact filters (a tcx link costs an RCU grace
period, ~15 ms, per attach here; a filter ~0.15 ms). Filters belong to the
device: they outlive the agent and vanish with the veth.

A SIGKILL between two steps leaves kernel objects (veth, map entries)
that no committed row names. ``reconcile`` removes them at
start, checks every stored endpoint against the kernel, repairs what is
missing and collects endpoints whose pod is gone: the store is the truth.

Store keys: ``endpoints/<container_id>/<ifname>`` -> the endpoint record.
"""

from __future__ import annotations

import builtins
import contextlib
import ipaddress
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, Protocol

from ciliate.control.cni import service as svc
from ciliate.control.identity.allocator import Identity, IdentityAllocator, IdentityError
from ciliate.control.ipam.host import HostIpam, IpamExhaustedError
from ciliate.control.store import Store, Txn
from ciliate.datapath import devices
from ciliate.datapath.maps import Endpoint, IpcacheEntry
from ciliate.datapath.programs import Datapath
from ciliate.loader import attach_tc, clsact_program_id

log = logging.getLogger(__name__)

# Fault injection for the crash-safety tests: CILIATE_CRASH_AT=<step> makes
# the agent SIGKILL itself when an ADD reaches that step.
CRASH_STEPS = ("ipam", "identity", "veth", "maps", "attach", "row")
_CRASH_AT = os.environ.get("CILIATE_CRASH_AT", "")


def _crash_point(step: str) -> None:
    if step == _CRASH_AT:
        log.warning("CILIATE_CRASH_AT=%s: killing myself", step)
        os.kill(os.getpid(), 9)


PREFIX = "endpoints/"
HOOKS: tuple[tuple[Literal["ingress", "egress"], str], ...] = (
    ("ingress", "from_container"),
    ("egress", "to_container"),
)
# Every pod veth carries exactly one filter per hook, at a fixed place, so a
# restart can replace its program in place.
FILTER_HANDLE = 1
FILTER_PRIORITY = 1


@dataclass(frozen=True)
class EndpointRecord:
    container_id: str
    ifname: str
    netns: str
    ip: str
    host_ifname: str
    host_ifindex: int
    host_mac: str
    pod_mac: str
    mtu: int
    identity: int
    endpoint_id: int
    labels: dict[str, str] = field(default_factory=dict)
    attributes: dict[str, str] = field(default_factory=dict)
    created: float = 0.0
    netns_cookie: int = 0  # 0: not known yet (rows of older agents); found at restore

    @property
    def key(self) -> str:
        return f"{PREFIX}{self.container_id}/{self.ifname}"

    @property
    def owner(self) -> str:
        return f"{self.container_id}/{self.ifname}"

    @property
    def address(self) -> ipaddress.IPv4Address:
        return ipaddress.IPv4Address(self.ip)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> EndpointRecord:
        return cls(**{k: v for k, v in doc.items() if k in cls.__dataclass_fields__})


class Identities(Protocol):
    """Where identities come from: the node's own store (``transactional``:
    acquire and release take part in the endpoint's transaction) or the
    cluster's (its own transactions; undone explicitly on failure)."""

    def acquire(self, txn: Txn, labels: Mapping[str, str]) -> Identity: ...
    def release(self, txn: Txn, identity_id: int) -> bool: ...


class EndpointListener(Protocol):
    """Told about endpoints after they commit (cluster mode publishes them)."""

    def endpoint_added(self, ip: str, identity: int) -> None: ...
    def endpoint_removed(self, ip: str) -> None: ...
    def endpoints_synced(self, live: Mapping[str, int]) -> None: ...


class EndpointManager:
    """Implements ``ciliate.control.cni.service.EndpointService``."""

    def __init__(
        self,
        *,
        store: Store,
        ipam: HostIpam,
        identities: Identities | IdentityAllocator,
        datapath: Datapath,
        mtu: int,
        listener: EndpointListener | None = None,
    ) -> None:
        self._store = store
        self._ipam = ipam
        self._identities = identities
        self._identities_local = getattr(identities, "transactional", True)
        self._listener = listener
        self._dp = datapath
        self._mtu = mtu
        self._lock = threading.RLock()
        self._max_ifindex = datapath.maps["ciliate_ep_dev"].max_entries
        self._next_ifindex = devices.FIRST_POD_IFINDEX
        self._ready = False
        # Deleting a veth waits for an RCU grace period (~16 ms here): DEL
        # answers once the endpoint is gone from the store and the maps, and
        # this worker removes the link behind it.
        self._reaper: queue.Queue[int | None] = queue.Queue()
        self._reaper_thread = threading.Thread(target=self._reap, name="veth-reaper", daemon=True)
        self._reaper_thread.start()

    # -- EndpointService ---------------------------------------------------------
    def ready(self) -> None:
        if not self._ready:
            raise svc.NotReadyError("the agent is still restoring its endpoints")

    def add(self, request: svc.AddRequest) -> svc.AddResult:
        with self._lock:
            existing = self._load(request.container_id, request.ifname)
            if existing is not None:
                if existing.netns != request.netns:
                    raise svc.ServiceError(
                        f"container {request.container_id} already has {request.ifname} in "
                        f"{existing.netns}, not {request.netns}: DEL it first"
                    )
                return self._result(existing)
            if not devices.is_netns(request.netns):
                raise svc.InvalidNetnsError(f"CNI_NETNS {request.netns} is not a network namespace")
            return self._result(self._create(request))

    def delete(self, *, container_id: str, ifname: str) -> None:
        with self._lock:
            record = self._load(container_id, ifname)
            if record is None:
                return  # already gone: DEL is idempotent
            self._remove(record)

    def check(self, *, container_id: str, ifname: str, netns: str) -> svc.AddResult:
        record = self._load(container_id, ifname)
        if record is None:
            raise svc.UnknownContainerError(f"no endpoint for {container_id}/{ifname}")
        problems = self._problems(record, netns=netns)
        if problems:
            raise svc.CheckFailedError(
                f"endpoint {container_id}/{ifname} is damaged: " + "; ".join(problems)
            )
        return self._result(record)

    def gc(self, *, valid: set[tuple[str, str]]) -> int:
        removed = 0
        with self._lock:
            for record in self.list():
                if (record.container_id, record.ifname) not in valid:
                    self._remove(record)
                    removed += 1
        return removed

    # -- queries ----------------------------------------------------------------
    def list(self) -> builtins.list[EndpointRecord]:
        return [EndpointRecord.from_json(_json(raw)) for _, raw in self._store.list(PREFIX)]

    def get(self, endpoint_id: int) -> EndpointRecord | None:
        return next((r for r in self.list() if r.endpoint_id == endpoint_id), None)

    def _load(
        self, container_id: str, ifname: str, txn: Txn | None = None
    ) -> EndpointRecord | None:
        raw = (txn or self._store).get(f"{PREFIX}{container_id}/{ifname}")
        return None if raw is None else EndpointRecord.from_json(_json(raw))

    # -- ADD -------------------------------------------------------------------------
    def _create(self, request: svc.AddRequest) -> EndpointRecord:
        owner = f"{request.container_id}/{request.ifname}"
        mtu = request.mtu or self._mtu
        with contextlib.ExitStack() as undo, self._store.transaction() as txn:
            try:
                ip = self._ipam.allocate(txn, owner=owner)
            except IpamExhaustedError as exc:
                raise svc.PoolExhaustedError(str(exc)) from exc
            _crash_point("ipam")
            try:
                identity = self._identities.acquire(txn, request.labels)
            except IdentityError as exc:
                raise svc.ServiceError(f"identity: {exc}") from exc
            if not self._identities_local:
                undo.callback(self._identities.release, txn, identity.id)
            _crash_point("identity")
            slot = self._dp.node.endpoint_slot(ip)
            assert slot is not None, f"{ip} outside the pod CIDRs"
            link = devices.create_pod_link(
                netns=request.netns,
                host_name=devices.host_ifname(request.container_id, request.ifname),
                pod_ifname=request.ifname,
                ifindex_candidates=self._ifindex_candidates(),
                mtu=mtu,
                address=ipaddress.IPv4Interface(f"{ip}/32"),
                gateway=self._ipam.router_ip,
            )
            undo.callback(devices.delete_link, link.host_ifindex)
            _crash_point("veth")
            record = EndpointRecord(
                container_id=request.container_id,
                ifname=request.ifname,
                netns=request.netns,
                ip=str(ip),
                host_ifname=link.host_ifname,
                host_ifindex=link.host_ifindex,
                host_mac=link.host_mac,
                pod_mac=link.pod_mac,
                mtu=mtu,
                identity=identity.id,
                endpoint_id=slot,
                labels=dict(request.labels),
                attributes=dict(request.attributes),
                created=time.time(),
                netns_cookie=link.netns_cookie,
            )
            self._write_maps(record)
            undo.callback(self._clear_maps, record)
            _crash_point("maps")
            self._attach(record, replace=False)  # undone with the veth
            _crash_point("attach")
            txn.put(record.key, _dumps(record.to_json()))
            _crash_point("row")
            undo.pop_all()  # the transaction commits as the with-block closes
        log.info(
            "endpoint %s: %s on %s (ifindex %d)", owner, ip, link.host_ifname, link.host_ifindex
        )
        self._notify(lambda listener: listener.endpoint_added(record.ip, record.identity))
        return record

    def _ifindex_candidates(self) -> Iterator[int]:
        first, last = devices.FIRST_POD_IFINDEX, self._max_ifindex - 1
        start = self._next_ifindex if first <= self._next_ifindex <= last else first
        for index in itertools.chain(range(start, last + 1), range(first, start)):
            self._next_ifindex = index + 1
            yield index

    def _endpoint(self, record: EndpointRecord) -> Endpoint:
        return Endpoint(
            ipv4=record.address,
            ifindex=record.host_ifindex,
            mac=record.pod_mac,
            node_mac=record.host_mac,
            identity=record.identity,
            endpoint_id=record.endpoint_id,
        )

    def _write_maps(self, record: EndpointRecord) -> None:
        self._dp.endpoint_netns.write(record.address, record.netns_cookie)
        self._dp.endpoints.upsert(self._endpoint(record))
        self._dp.ipcache.upsert(
            IpcacheEntry(ipaddress.IPv4Network(f"{record.ip}/32"), record.identity, None)
        )

    def _clear_maps(self, record: EndpointRecord) -> None:
        self._dp.endpoints.delete(self._endpoint(record))
        self._dp.endpoint_netns.clear(record.address)
        self._dp.ipcache.delete(ipaddress.IPv4Network(f"{record.ip}/32"))

    def _attach(self, record: EndpointRecord, *, replace: bool) -> None:
        """from_container on the veth's ingress, to_container on its egress;
        ``replace`` swaps the programs of existing filters atomically."""
        for direction, program in HOOKS:
            attach_tc(
                self._dp.program(program),
                ifindex=record.host_ifindex,
                direction=direction,
                mode="clsact",
                handle=FILTER_HANDLE,
                priority=FILTER_PRIORITY,
                replace=replace,
            ).close()  # the filter stays with the device

    def _attached(self, record: EndpointRecord) -> builtins.list[str]:
        """Hooks whose filter is missing or runs another program."""
        wrong: builtins.list[str] = []
        for direction, program in HOOKS:
            prog_id = clsact_program_id(
                record.host_ifindex,
                direction=direction,
                handle=FILTER_HANDLE,
                priority=FILTER_PRIORITY,
            )
            if prog_id != self._dp.program(program).id:
                wrong.append(direction)
        return wrong

    def _result(self, record: EndpointRecord) -> svc.AddResult:
        router = self._ipam.router_ip
        return svc.AddResult(
            ip=ipaddress.IPv4Interface(f"{record.ip}/32"),
            gateway=router,
            routes=(
                (ipaddress.IPv4Network(f"{router}/32"), None),
                (ipaddress.IPv4Network("0.0.0.0/0"), router),
            ),
            pod_ifname=record.ifname,
            pod_mac=record.pod_mac,
            host_ifname=record.host_ifname,
            host_mac=record.host_mac,
            netns=record.netns,
            mtu=record.mtu,
        )

    # -- DEL ----------------------------------------------------------------------------
    def _remove(self, record: EndpointRecord) -> None:
        with self._store.transaction() as txn:
            self._ipam.release(txn, owner=record.owner)
            if self._identities_local:
                with contextlib.suppress(IdentityError):
                    self._identities.release(txn, record.identity)
            txn.delete(record.key)
            self._clear_maps(record)
        if not self._identities_local:
            with contextlib.suppress(IdentityError):
                self._identities.release(None, record.identity)  # type: ignore[arg-type]
        self._notify(lambda listener: listener.endpoint_removed(record.ip))
        self._reaper.put(record.host_ifindex)
        log.info("endpoint %s removed (%s)", record.owner, record.ip)

    def _notify(self, call: Callable[[EndpointListener], None]) -> None:
        if self._listener is None:
            return
        try:
            call(self._listener)
        except Exception:  # the cluster store may be down; reconcile republishes
            log.warning("could not publish an endpoint change", exc_info=True)

    def _reap(self) -> None:
        while (ifindex := self._reaper.get()) is not None:
            try:
                devices.delete_link(ifindex)
            except Exception:
                log.exception("could not delete veth %d", ifindex)
            finally:
                self._reaper.task_done()

    def wait_reaped(self) -> None:
        """Block until every queued veth deletion has run (tests, shutdown)."""
        self._reaper.join()

    def close(self) -> None:
        self._reaper.put(None)
        self._reaper_thread.join(timeout=5)

    # -- CHECK, restore, GC -------------------------------------------------------------
    def _problems(self, record: EndpointRecord, *, netns: str | None) -> builtins.list[str]:
        problems = []
        if netns is not None and netns != record.netns:
            problems.append(f"netns is {record.netns}, not {netns}")
        names = devices.link_names()
        if names.get(record.host_ifindex) != record.host_ifname:
            problems.append(f"veth {record.host_ifname} (ifindex {record.host_ifindex}) is gone")
        pod = devices.pod_link_state(record.netns, record.ifname)
        if pod is None:
            problems.append(f"{record.ifname} is gone from {record.netns}")
        elif f"{record.ip}/32" not in pod[1]:
            problems.append(f"{record.ifname} lacks {record.ip}/32 (has {', '.join(pod[1])})")
        if self._dp.endpoints.get_by_ifindex(record.host_ifindex) != self._endpoint(record):
            problems.append("endpoint map entry missing or different")
        problems.extend(f"{direction} program not attached" for direction in self._attached(record))
        return problems

    def reconcile(self, *, new_programs: bool) -> dict[str, int]:
        """Make the kernel match the store (see the module docstring).
        ``new_programs``: the datapath was loaded afresh, so every pinned
        link is switched to the new program instances."""
        counts = {"restored": 0, "collected": 0, "stale_veths": 0, "stale_map_entries": 0}
        with self._lock:
            records = self.list()
            names = devices.link_names()
            for record in records:
                gone = names.get(record.host_ifindex) != record.host_ifname or not devices.is_netns(
                    record.netns
                )
                if gone:
                    self._remove(record)
                    counts["collected"] += 1
                    continue
                if not record.netns_cookie:
                    record = replace(record, netns_cookie=devices.netns_cookie(record.netns))
                    with self._store.transaction() as txn:
                        txn.put(record.key, _dumps(record.to_json()))
                self._write_maps(record)
                if new_programs or self._attached(record):
                    self._attach(record, replace=True)
                counts["restored"] += 1
            live_ifindexes = {r.host_ifindex for r in self.list()}
            for ifindex, name in names.items():
                if (
                    name.startswith(devices.HOST_IFNAME_PREFIX)
                    and ifindex not in live_ifindexes
                    and ifindex >= devices.FIRST_POD_IFINDEX
                ):
                    devices.delete_link(ifindex)
                    counts["stale_veths"] += 1
            counts["stale_map_entries"] = self._prune_maps()
            live = {r.ip: r.identity for r in self.list()}
            self._notify(lambda listener: listener.endpoints_synced(live))
            self._next_ifindex = max(live_ifindexes, default=devices.FIRST_POD_IFINDEX - 1) + 1
            self._ready = True
        return counts

    def _prune_maps(self) -> int:
        records = self.list()
        want_dev = {r.host_ifindex for r in records}
        want_ip = {r.address for r in records}
        pruned = 0
        for ifindex in self._dp.endpoints.list_by_ifindex():
            if ifindex not in want_dev:
                self._dp.endpoints.delete_by_ifindex(ifindex)
                pruned += 1
        for ep in self._dp.endpoints.list():
            if ep.ipv4 not in want_ip:
                self._dp.endpoints.delete_by_ip(ep.ipv4)
                pruned += 1
        want_slots = {self._dp.node.endpoint_slot(address) for address in want_ip}
        for slot in self._dp.endpoint_netns.used_slots() - want_slots:
            self._dp.endpoint_netns.clear_slot(slot)
            pruned += 1
        for entry in self._dp.ipcache.list():
            address = entry.prefix.network_address
            if (
                entry.prefix.prefixlen == 32
                and entry.node_ip is None
                and self._dp.node.endpoint_slot(address) is not None
                and address != self._ipam.router_ip
                and address not in want_ip
            ):
                self._dp.ipcache.delete(entry.prefix)
                pruned += 1
        return pruned


def _json(raw: bytes) -> dict[str, Any]:
    import json

    doc = json.loads(raw)
    assert isinstance(doc, dict)
    return doc


def _dumps(doc: Mapping[str, Any]) -> bytes:
    import json

    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
