"""Endpoints of one node: the agent's implementation of the CNI endpoint
service, and the reconciliation that makes restarts and crashes safe.

ADD is one transaction: IP, identity, veth (pod side created in the pod's
namespace), map entries, program attachments and the endpoint row. The
store commits last; every earlier step registers its undo on an ExitStack
that is dropped only once the commit has succeeded, so a failure anywhere,
the commit included, rolls back everything before it. A container gets one
interface: ADD of a second CNI_IFNAME is refused. A pod whose labels are
not known (no CNI_ARGS: podman without Kubernetes, plain runtimes) gets the
reserved ``init`` identity, as Cilium gives it.

DEL goes the other way: the store commits first (so a store that refuses
leaves the endpoint whole and DEL can be retried), then the map entries go,
then the veth (deleted by a worker behind DEL's answer: a deletion waits
for an RCU grace period). An ADD of the same container and interface that
arrives before the worker got to it deletes the old veth itself. A veth is
only ever deleted by its name at its recorded ifindex: once a pod is gone
the ifindex may belong to an unrelated link.

Failures leave as typed ``ServiceError``s (see ``ciliate.control.cni.service``):
a store error is "try again" (11), a netlink one a device error (100), a
BPF map or attach one a datapath error (101).

Programs are attached as clsact filters (a tcx link costs an RCU grace
period, ~15 ms, per attach here; a filter ~0.15 ms). Filters belong to the
device: they outlive the agent and vanish with the veth.

A SIGKILL between two steps leaves kernel objects (veth, map entries)
that no committed row names. ``reconcile`` removes them at
start, checks every stored endpoint against the kernel, repairs what is
missing and collects endpoints whose pod is gone: the store is the truth.

hostPorts (the runtime's ``portMappings`` and the Pod object's ports) are
checked at ADD against those the node's other endpoints hold (a clash is
refused before anything is made) and kept in the record, from which the
service loop makes them frontends of this node (``services.hostports``);
they go with the record at DEL.

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
from types import MappingProxyType
from typing import Any, Literal, ParamSpec, Protocol

from ciliate.control.cni import service as svc
from ciliate.control.identity.allocator import (
    Identity,
    IdentityAllocator,
    IdentityError,
    IdentityExhaustedError,
)
from ciliate.control.identity.labels import RESERVED_SOURCE
from ciliate.control.ipam.host import HostIpam, IpamExhaustedError
from ciliate.control.objects import KINDS, ObjectStore
from ciliate.control.services import hostports
from ciliate.control.store import Store, StoreError, Txn
from ciliate.datapath import bandwidth as bandwidth_mod
from ciliate.datapath import devices
from ciliate.datapath.maps import Endpoint, IpcacheEntry
from ciliate.datapath.netlink import NetlinkError
from ciliate.datapath.programs import Datapath
from ciliate.loader import LoaderError, attach_tc, clsact_program_id

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
# The label set of the reserved init identity: the identity of an endpoint
# whose labels are not known (an ADD without CNI_ARGS).
INIT_LABELS: Mapping[str, str] = MappingProxyType({f"{RESERVED_SOURCE}init": ""})
# How long an ADD waits for the worker that is deleting the previous veth of
# the same container and interface (one deletion takes ~16 ms).
REAP_WAIT_S = 10.0

_P = ParamSpec("_P")


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
    labels: dict[str, str] = field(default_factory=dict)  # its identity's (security) labels
    attributes: dict[str, str] = field(default_factory=dict)
    created: float = 0.0
    netns_cookie: int = 0  # 0: not known yet (rows of older agents); found at restore
    # The labels the CNI call brought (namespace, netconf labels): with the Pod
    # and Namespace objects they make ``labels`` (see agent.policy).
    cni_labels: dict[str, str] = field(default_factory=dict)
    # Its hostPorts (HostPort.to_json each), served as frontends of this node.
    host_ports: list[dict[str, Any]] = field(default_factory=list)
    # The CNI network (netconf name) it belongs to; "": made by an agent that
    # did not record it, left to DEL (GC cannot tell whose it is).
    network: str = ""
    # Its egress bandwidth in bits/s (runtimeConfig or its Pod's
    # kubernetes.io/egress-bandwidth); 0: none. Kept by the bandwidth manager.
    egress_rate: int = 0

    @property
    def key(self) -> str:
        return f"{PREFIX}{self.container_id}/{self.ifname}"

    @property
    def owner(self) -> str:
        return f"{self.container_id}/{self.ifname}"

    @property
    def pod(self) -> str | None:
        """``namespace/name`` of its pod, when the runtime said (CNI_ARGS)."""
        namespace = self.attributes.get("K8S_POD_NAMESPACE")
        name = self.attributes.get("K8S_POD_NAME")
        return f"{namespace}/{name}" if namespace and name else None

    @property
    def address(self) -> ipaddress.IPv4Address:
        return ipaddress.IPv4Address(self.ip)

    @property
    def mappings(self) -> builtins.list[hostports.HostPort]:
        return [hostports.HostPort.from_json(doc) for doc in self.host_ports]

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


class PolicySource(Protocol):
    """Labels and policy of a new endpoint (``agent.policy.PolicyController``)."""

    def labels_for(
        self, *, attributes: Mapping[str, str], cni_labels: Mapping[str, str]
    ) -> dict[str, str]:
        """Its security labels, from what the CNI call brought and the stored objects."""
        ...

    def enforce_new(self, endpoint: EndpointRecord) -> None:
        """Write its policy into the datapath before it can send a packet."""
        ...

    def enforce_relabelled(self, previous: EndpointRecord, moved: EndpointRecord) -> None:
        """Before an endpoint's packets carry its new identity: every endpoint's policy
        admits it under both identities (those that admit it at all)."""
        ...


class EndpointListener(Protocol):
    """Told about endpoints after they commit (cluster mode publishes them)."""

    def endpoint_added(self, ip: str, identity: int, pod: str | None) -> None: ...
    def endpoint_removed(self, ip: str) -> None: ...
    def endpoints_synced(self, live: Mapping[str, tuple[int, str | None]]) -> None: ...


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
        policy: PolicySource | None = None,
        objects: ObjectStore | None = None,
        bandwidth: bandwidth_mod.Manager | None = None,
    ) -> None:
        """``objects``: where Pod objects are read (their hostPorts, their
        egress bandwidth); ``bandwidth``: the agent's bandwidth manager, which
        keeps pods' egress bandwidth (None: off, rates only recorded)."""
        self._bandwidth = bandwidth or bandwidth_mod.Manager(
            datapath.throttle, mode=bandwidth_mod.Mode.OFF, device=None
        )
        self._store = store
        self._objects = objects
        self.policy_source = policy
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
        # this worker removes the link behind it. Names queued and not yet
        # deleted are in _reap_pending (host ifname -> ifindex), the one being
        # deleted in _reap_busy, both guarded by _reap_cond.
        self._reap_queue: queue.Queue[str | None] = queue.Queue()
        self._reap_pending: dict[str, int] = {}
        self._reap_busy: set[str] = set()
        self._reap_cond = threading.Condition()
        self._reaper_thread = threading.Thread(target=self._reap, name="veth-reaper", daemon=True)
        self._reaper_thread.start()

    # -- EndpointService ---------------------------------------------------------
    def ready(self) -> None:
        if not self._ready:
            raise svc.NotReadyError("the agent is still restoring its endpoints")

    def add(self, request: svc.AddRequest) -> svc.AddResult:
        with _as_service_errors("ADD"), self._lock:
            existing = self._load(request.container_id, request.ifname)
            if existing is not None:
                if existing.netns != request.netns:
                    raise svc.InvalidNetnsError(
                        f"CNI_NETNS {request.netns!r}: container {request.container_id} already "
                        f"has {request.ifname} in {existing.netns}",
                        details=f"DEL {request.ifname} of the container first",
                    )
                return self._result(existing)
            others = self._store.list(f"{PREFIX}{request.container_id}/")
            if others:
                other = EndpointRecord.from_json(_json(others[0][1]))
                raise svc.SecondInterfaceError(
                    f"CNI_IFNAME {request.ifname}: container {request.container_id} already has "
                    f"{other.ifname} from ciliate, and ciliate gives a container one interface",
                    details=f"DEL {other.ifname} first, or attach {request.ifname} with another "
                    "plugin",
                )
            # CNI_NETNS was checked by the handler (devices.check_pod_netns); a
            # namespace gone since fails to open in create_pod_link.
            mappings = self._host_ports(request)
            egress_rate = self._egress_rate(request)
            return self._result(self._create(request, mappings, egress_rate=egress_rate))

    def delete(self, *, container_id: str, ifname: str) -> None:
        with _as_service_errors("DEL"), self._lock:
            record = self._load(container_id, ifname)
            if record is None:
                return  # already gone: DEL is idempotent
            self._remove(record)

    def check(self, *, container_id: str, ifname: str, netns: str) -> svc.AddResult:
        with _as_service_errors("CHECK"):
            record = self._load(container_id, ifname)
            if record is None:
                raise svc.UnknownContainerError(f"no endpoint for {container_id}/{ifname}")
            problems = self._problems(record, netns=netns)
        if problems:
            raise svc.CheckFailedError(
                f"endpoint {container_id}/{ifname} is damaged: " + "; ".join(problems)
            )
        return self._result(record)

    def gc(self, *, network: str, valid: set[tuple[str, str]]) -> int:
        removed = 0
        with _as_service_errors("GC"), self._lock:
            for record in self.list():
                # Another network's attachments are not in its list: not ours to judge.
                if record.network != network:
                    continue
                if (record.container_id, record.ifname) not in valid:
                    self._remove(record)
                    removed += 1
        return removed

    # -- queries ----------------------------------------------------------------
    def list(self) -> builtins.list[EndpointRecord]:
        return [EndpointRecord.from_json(_json(raw)) for _, raw in self._store.list(PREFIX)]

    def host_ports(self) -> builtins.list[hostports.PodHostPorts]:
        """The hostPorts of this node's endpoints, for the service table."""
        return [
            hostports.PodHostPorts(owner=r.owner, pod=r.pod, ip=r.address, mappings=r.mappings)
            for r in self.list()
            if r.host_ports
        ]

    def get(self, endpoint_id: int) -> EndpointRecord | None:
        return next((r for r in self.list() if r.endpoint_id == endpoint_id), None)

    def _load(
        self, container_id: str, ifname: str, txn: Txn | None = None
    ) -> EndpointRecord | None:
        raw = (txn or self._store).get(f"{PREFIX}{container_id}/{ifname}")
        return None if raw is None else EndpointRecord.from_json(_json(raw))

    # -- ADD -------------------------------------------------------------------------
    def _host_ports(self, request: svc.AddRequest) -> builtins.list[hostports.HostPort]:
        """The pod's hostPorts: the runtime's portMappings and its Pod object's
        ports (kubelet derives the first from the second: each counted once),
        refused when another endpoint of the node holds one of them."""
        try:
            given = [
                hostports.HostPort.parse(
                    host_port=m.host_port,
                    container_port=m.container_port,
                    protocol=m.protocol,
                    host_ip=m.host_ip,
                )
                for m in request.port_mappings
            ]
            mappings = hostports.merged(given, self._pod_host_ports(request.attributes))
        except hostports.HostPortError as exc:
            raise svc.PortMappingError(
                f"portMappings: {exc}; nothing was changed",
                details="map hostPorts over TCP or UDP, on IPv4 host addresses",
            ) from exc
        if not mappings:
            return mappings
        taken = [(_holder(r), r.mappings) for r in self.list() if r.host_ports]
        found = hostports.clash(mappings, taken)
        if found is not None:
            wanted, holder, held = found
            raise svc.HostPortInUseError(
                f"hostPort {wanted.host_port}/{wanted.protocol}"
                f"{f' on {wanted.host_ip}' if wanted.host_ip else ''} is held on this node "
                f"by {holder} ({held}); nothing was changed",
                details="give the pod another hostPort, or remove the pod holding it",
            )
        return mappings

    def _pod_object(self, attributes: Mapping[str, str], *, wanted: str) -> dict[str, Any] | None:
        """The endpoint's Pod object, if there is one (``wanted``: what it is
        read for, in the warning when the store cannot say)."""
        namespace = attributes.get("K8S_POD_NAMESPACE")
        name = attributes.get("K8S_POD_NAME")
        if self._objects is None or not namespace or not name:
            return None
        try:
            return self._objects.get(KINDS["Pod"], name=name, namespace=namespace)
        except LookupError:
            return None  # no Pod object: what the runtime said alone
        except StoreError as exc:
            log.warning("pod %s/%s: %s from the runtime only (%s)", namespace, name, wanted, exc)
            return None

    def _pod_host_ports(self, attributes: Mapping[str, str]) -> builtins.list[hostports.HostPort]:
        pod = self._pod_object(attributes, wanted="hostPorts")
        return [] if pod is None else hostports.from_pod(pod)

    def _egress_rate(self, request: svc.AddRequest) -> int:
        """The pod's egress bandwidth in bits/s (0: none): the runtime's
        (``bandwidth`` capability, which kubelet derives from the annotation),
        else its Pod object's ``kubernetes.io/egress-bandwidth`` (as Cilium
        reads it). Out of kubelet's bounds: refused, nothing made."""
        try:
            if request.egress_rate is not None:
                rate = bandwidth_mod.check_rate(
                    request.egress_rate, what="runtimeConfig.bandwidth.egressRate"
                )
            else:
                pod = self._pod_object(request.attributes, wanted="egress bandwidth")
                annotations = ((pod or {}).get("metadata") or {}).get("annotations") or {}
                text = annotations.get(bandwidth_mod.EGRESS_ANNOTATION)
                if text is None:
                    return 0
                rate = bandwidth_mod.parse_rate(
                    str(text), what=f"annotation {bandwidth_mod.EGRESS_ANNOTATION}"
                )
        except bandwidth_mod.RateError as exc:
            raise svc.BandwidthError(
                f"pod {request.container_id}: {exc}", details="give a rate such as '10M' (bit/s)"
            ) from exc
        if rate and self._bandwidth.mode is bandwidth_mod.Mode.OFF:
            # Cilium's behaviour with its bandwidth manager off: not kept, said.
            log.warning(
                "endpoint %s/%s asks for an egress bandwidth of %d bit/s: not kept, the agent "
                "runs without --bandwidth-manager",
                request.container_id,
                request.ifname,
                rate,
            )
        return rate

    def _create(
        self,
        request: svc.AddRequest,
        mappings: builtins.list[hostports.HostPort],
        *,
        egress_rate: int,
    ) -> EndpointRecord:
        owner = f"{request.container_id}/{request.ifname}"
        mtu = request.mtu or self._mtu
        host_name = devices.host_ifname(request.container_id, request.ifname)
        labels = (
            self.policy_source.labels_for(attributes=request.attributes, cni_labels=request.labels)
            if self.policy_source is not None
            else dict(request.labels)
        )
        self._settle_reap(host_name)
        with contextlib.ExitStack() as undo:
            with self._store.transaction() as txn:
                try:
                    ip = self._ipam.allocate(txn, owner=owner)
                except IpamExhaustedError as exc:
                    raise svc.PoolExhaustedError(str(exc)) from exc
                _crash_point("ipam")
                try:
                    identity = self._identities.acquire(txn, labels or INIT_LABELS)
                except IdentityExhaustedError as exc:
                    raise svc.TryAgainError(f"identity: {exc}") from exc
                except IdentityError as exc:
                    raise svc.ServiceError(f"identity: {exc}") from exc
                if not self._identities_local:
                    undo.callback(
                        _best_effort,
                        f"release identity {identity.id}",
                        self._identities.release,
                        txn,
                        identity.id,
                    )
                _crash_point("identity")
                slot = self._dp.node.endpoint_slot(ip)
                assert slot is not None, f"{ip} outside the pod CIDRs"
                link = devices.create_pod_link(
                    netns=request.netns,
                    host_name=host_name,
                    pod_ifname=request.ifname,
                    ifindex_candidates=self._ifindex_candidates(),
                    mtu=mtu,
                    address=ipaddress.IPv4Interface(f"{ip}/32"),
                    gateway=self._ipam.router_ip,
                )
                undo.callback(self._delete_veth, link.host_ifname, link.host_ifindex)
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
                    labels=labels,
                    attributes=dict(request.attributes),
                    created=time.time(),
                    netns_cookie=link.netns_cookie,
                    cni_labels=dict(request.labels),
                    host_ports=[m.to_json() for m in mappings],
                    network=request.network,
                    egress_rate=egress_rate,
                )
                self._write_policy(record, undo=undo)
                self._write_maps(record, undo=undo)
                _crash_point("maps")
                self._attach(record, replace=False)  # undone with the veth
                _crash_point("attach")
                txn.put(record.key, _dumps(record.to_json()))
                _crash_point("row")
            # The transaction has committed (a failed commit raised above, the
            # IP and a local identity rolled back with it, and the undo stack
            # removed the rest): the endpoint exists, nothing is undone now.
            undo.pop_all()
        log.info(
            "endpoint %s: %s on %s (ifindex %d)", owner, ip, link.host_ifname, link.host_ifindex
        )
        self._notify(
            lambda listener: listener.endpoint_added(record.ip, record.identity, record.pod)
        )
        return record

    # -- labels that changed ---------------------------------------------------------------
    def relabel(self, record: EndpointRecord, labels: Mapping[str, str]) -> EndpointRecord:
        """Move an endpoint to the identity of ``labels`` (its Pod's or Namespace's
        labels changed), keeping its IP, veth and programs: the new identity is taken
        and the row rewritten in one transaction, then the maps follow and the old
        identity is released."""
        with _as_service_errors("relabel"), self._lock:
            current = self._load(record.container_id, record.ifname)
            if current is None:
                return record  # deleted meanwhile
            with contextlib.ExitStack() as undo:
                with self._store.transaction() as txn:
                    identity = self._identities.acquire(txn, labels or INIT_LABELS)
                    if not self._identities_local:
                        undo.callback(
                            _best_effort,
                            f"release identity {identity.id}",
                            self._identities.release,
                            txn,
                            identity.id,
                        )
                    moved = replace(current, identity=identity.id, labels=dict(labels))
                    if self._identities_local:
                        with contextlib.suppress(IdentityError):
                            self._identities.release(txn, current.identity)
                    txn.put(moved.key, _dumps(moved.to_json()))
                undo.pop_all()  # committed
            if self.policy_source is not None and self._dp.has_policy:
                # The peers learn the new identity before the pod's packets carry
                # it (its allowed packets were dropped until the policy loop's
                # pass); if they cannot, that pass writes them just after.
                _best_effort(
                    "give the endpoints' policies the new identity",
                    self.policy_source.enforce_relabelled,
                    current,
                    moved,
                )
            self._write_maps(moved, undo=None)
            if not self._identities_local:
                _best_effort(
                    f"release identity {current.identity}",
                    self._identities.release,
                    None,  # type: ignore[arg-type]
                    current.identity,
                )
        log.info(
            "endpoint %s: identity %d -> %d (labels changed)",
            moved.owner,
            current.identity,
            moved.identity,
        )
        self._notify(lambda listener: listener.endpoint_added(moved.ip, moved.identity, moved.pod))
        return moved

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

    def _write_maps(self, record: EndpointRecord, *, undo: contextlib.ExitStack | None) -> None:
        """The endpoint's entries in ep_netns, ep_ip/ep_dev and the ipcache;
        each write registers its own removal on ``undo`` (when given) as soon
        as it has succeeded."""
        endpoint, prefix = self._endpoint(record), ipaddress.IPv4Network(f"{record.ip}/32")
        self._dp.endpoint_netns.write(record.address, record.netns_cookie)
        if undo is not None:
            undo.callback(
                _best_effort, "clear ep_netns", self._dp.endpoint_netns.clear, record.address
            )
        self._dp.endpoints.upsert(endpoint)
        if undo is not None:
            undo.callback(_best_effort, "clear ep_ip/ep_dev", self._dp.endpoints.delete, endpoint)
        # Always written: the slot may hold a previous pod's rate. The undo
        # first: a class made before the map write failed goes too.
        if undo is not None:
            undo.callback(
                _best_effort, "clear the egress bandwidth", self._bandwidth.unlimit, record.address
            )
        self._bandwidth.limit(record.address, record.egress_rate)
        self._dp.ipcache.upsert(IpcacheEntry(prefix, record.identity, None))
        if undo is not None:
            undo.callback(_best_effort, "clear the ipcache entry", self._dp.ipcache.delete, prefix)
        if self._dp.has_services and record.netns_cookie:
            # The socket LB translates the sockets of this node's pods only.
            self._dp.lb.allow_netns(record.netns_cookie)
            if undo is not None:
                undo.callback(
                    _best_effort, "forget the netns", self._dp.lb.forget_netns, record.netns_cookie
                )

    def _write_policy(self, record: EndpointRecord, *, undo: contextlib.ExitStack) -> None:
        """The endpoint's policy, in force before its first packet (its slot may
        still hold a previous pod's)."""
        if not self._dp.has_policy:
            return
        undo.callback(_best_effort, "clear the policy", self._dp.policy.clear, record.endpoint_id)
        if self.policy_source is not None:
            self.policy_source.enforce_new(record)
        else:
            self._dp.policy.clear(record.endpoint_id)

    def _clear_maps(self, record: EndpointRecord) -> None:
        """Every entry of the endpoint, each removal tried even when another
        fails (what is left, reconcile prunes at the next start)."""
        if self._dp.has_policy:
            _best_effort("clear the policy", self._dp.policy.clear, record.endpoint_id)
        if self._dp.has_services and record.netns_cookie:
            _best_effort("forget the netns", self._dp.lb.forget_netns, record.netns_cookie)
        _best_effort("clear ep_ip/ep_dev", self._dp.endpoints.delete, self._endpoint(record))
        _best_effort("clear ep_netns", self._dp.endpoint_netns.clear, record.address)
        _best_effort("clear the egress bandwidth", self._bandwidth.unlimit, record.address)
        _best_effort(
            "clear the ipcache entry",
            self._dp.ipcache.delete,
            ipaddress.IPv4Network(f"{record.ip}/32"),
        )

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
        # The store first: if it refuses (busy, full, read-only), this raises
        # and the endpoint stays whole, to be deleted by a retried DEL.
        with self._store.transaction() as txn:
            self._ipam.release(txn, owner=record.owner)
            if self._identities_local:
                with contextlib.suppress(IdentityError):
                    self._identities.release(txn, record.identity)
            txn.delete(record.key)
        # Committed: the endpoint is gone. What follows cannot make DEL fail;
        # anything it leaves behind is removed by reconcile at the next start.
        self._clear_maps(record)
        if not self._identities_local:
            _best_effort(
                f"release identity {record.identity}",
                self._identities.release,
                None,  # type: ignore[arg-type]
                record.identity,
            )
        self._notify(lambda listener: listener.endpoint_removed(record.ip))
        with self._reap_cond:
            self._reap_pending[record.host_ifname] = record.host_ifindex
        self._reap_queue.put(record.host_ifname)
        log.info("endpoint %s removed (%s)", record.owner, record.ip)

    def _notify(self, call: Callable[[EndpointListener], None]) -> None:
        if self._listener is None:
            return
        try:
            call(self._listener)
        except Exception:  # the cluster store may be down; reconcile republishes
            log.warning("could not publish an endpoint change", exc_info=True)

    def _reap(self) -> None:
        while (name := self._reap_queue.get()) is not None:
            with self._reap_cond:
                ifindex = self._reap_pending.pop(name, None)
                if ifindex is None:
                    continue  # an ADD of the same attachment deleted it already
                self._reap_busy.add(name)
            try:
                self._delete_veth(name, ifindex)
            finally:
                with self._reap_cond:
                    self._reap_busy.discard(name)
                    self._reap_cond.notify_all()

    def _settle_reap(self, host_name: str) -> None:
        """Before an ADD creates ``host_name``: if a DEL of the same container
        and interface left that veth to the worker, delete it now (or wait
        for the worker that is deleting it), so the names do not clash."""
        with self._reap_cond:
            self._reap_cond.wait_for(lambda: host_name not in self._reap_busy, REAP_WAIT_S)
            ifindex = self._reap_pending.pop(host_name, None)
        if ifindex is not None:
            self._delete_veth(host_name, ifindex)

    @staticmethod
    def _delete_veth(name: str, ifindex: int) -> None:
        try:
            if not devices.delete_pod_link(name=name, ifindex=ifindex):
                log.info("veth %s (ifindex %d) is gone already or no longer ours", name, ifindex)
        except Exception:
            log.exception("could not delete veth %s (ifindex %d)", name, ifindex)

    def close(self) -> None:
        self._reap_queue.put(None)
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
                self._write_maps(record, undo=None)
                if new_programs or self._attached(record):
                    self._attach(record, replace=True)
                counts["restored"] += 1
            live_ifindexes = {r.host_ifindex for r in self.list()}
            for ifindex, name in names.items():
                if (
                    name.startswith(devices.HOST_IFNAME_PREFIX)
                    and ifindex not in live_ifindexes
                    and ifindex >= devices.FIRST_POD_IFINDEX
                    and devices.delete_pod_link(name=name, ifindex=ifindex)
                ):
                    counts["stale_veths"] += 1
            counts["stale_map_entries"] = self._prune_maps()
            live = {r.ip: (r.identity, r.pod) for r in self.list()}
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
        # htb classes of pods deleted while no agent ran (their map entries
        # are rewritten by the next pod of the slot).
        try:
            pruned += self._bandwidth.prune({r.address for r in records if r.egress_rate})
        except bandwidth_mod.QdiscError:
            log.warning("could not prune the uplink's htb classes", exc_info=True)
        return pruned


def _holder(record: EndpointRecord) -> str:
    """The pod of an endpoint as a message names it."""
    if record.pod is not None:
        return f"pod {record.pod}"
    name = record.attributes.get("K8S_POD_NAME")
    container = f"container {record.container_id[:12]}"
    return f"pod {name} ({container})" if name else container


@contextlib.contextmanager
def _as_service_errors(operation: str) -> Iterator[None]:
    """Failures of the parts below (store, netlink, BPF maps and programs)
    as the typed errors the CNI handler reports, each with what to do."""
    try:
        yield
    except svc.ServiceError:
        raise
    except StoreError as exc:
        raise svc.StoreFailedError(
            f"{operation}: a store refused the change or could not be reached: {exc}",
            details="nothing was changed; retry later; if it persists, check the agent's "
            "state directory (full? read-only?), the cluster's etcd, and the agent's log",
        ) from exc
    except (devices.DeviceError, NetlinkError) as exc:
        raise svc.DeviceFailedError(
            f"{operation}: {exc}",
            details="what the call had done was rolled back; fix what the message names and retry",
        ) from exc
    except bandwidth_mod.QdiscError as exc:
        raise svc.DatapathFailedError(
            f"{operation}: the pod's egress bandwidth could not be set up: {exc}",
            details="what the call had done was rolled back; the uplink's qdisc is made when "
            "the agent starts: if it was removed since, restart the agent",
        ) from exc
    except LoaderError as exc:
        raise svc.DatapathFailedError(
            f"{operation}: a BPF map or program operation failed: {exc}",
            details="what the call had done was rolled back; the agent's log has the details, "
            "and restarting the agent reloads the datapath",
        ) from exc


def _best_effort(
    what: str, call: Callable[_P, object], *args: _P.args, **kwargs: _P.kwargs
) -> None:
    """One step of a rollback or clean-up: a failure is logged, and the steps
    after it still run (the error that caused the rollback is what the
    caller sees)."""
    try:
        call(*args, **kwargs)
    except Exception:
        log.exception("could not %s (reconcile removes what is left at the next start)", what)


def _json(raw: bytes) -> dict[str, Any]:
    import json

    doc = json.loads(raw)
    assert isinstance(doc, dict)
    return doc


def _dumps(doc: Mapping[str, Any]) -> bytes:
    import json

    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
