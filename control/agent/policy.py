"""The agent's policy loop: each local endpoint's identity and policy kept in step
with the cluster objects (Namespaces, Pods, NetworkPolicies, Cilium policies).

Where things come from:

* the objects: the agent's own store on one node (``ciliate apply --socket``), etcd
  in a cluster (``ciliate apply --etcd-endpoint``), through
  :class:`~ciliate.control.objects.ObjectStore`;
* the endpoints: this node's records, and in a cluster every other node's
  published endpoints (address, identity, pod) with their identity's labels.

One pass (:meth:`PolicyController.sync`):

1. every local endpoint's security labels are worked out again from its ``Pod``
   object (tied by ``K8S_POD_NAMESPACE``/``K8S_POD_NAME`` from CNI_ARGS), its
   ``Namespace`` and the netconf's labels (:meth:`labels_for`, which ADD uses too);
   an endpoint whose labels changed moves to the identity of its new labels, keeping
   its IP;
2. the engine (:func:`ciliate.control.policy.engine.compute`) resolves every policy
   into each local endpoint's entries; each endpoint whose policy changed gets it in
   the datapath in one switch (``Datapath.policy.replace``: the programs see the old
   policy or the new one, and established connections are judged again on their next
   packet); the CIDR identities the policies need go into the ipcache;
3. sockets that socket forwarding mapped and that the new policy denies are evicted
   from the sockhash, so their next bytes take the packet path, where policy drops
   them.

A pass runs when the store's revision moves (checked every ``poll_interval``) and
every ``resync_interval`` regardless, so policy follows a change within a second.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from ciliate.control.cluster import keys
from ciliate.control.cluster.member import IpcacheWriter
from ciliate.control.cni.service import ServiceError
from ciliate.control.identity.allocator import Identity, IdentityError
from ciliate.control.identity.labels import (
    NAMESPACE_LABEL,
    POD_NAME_LABEL,
    IdentityLabelsError,
    security_labels,
)
from ciliate.control.objects import KINDS, ObjectStore
from ciliate.control.policy import engine, inputs
from ciliate.control.policy.cidr import CidrIdentities
from ciliate.control.policy.evaluate import Ipcache, Trace, decide, trace
from ciliate.control.policy.inputs import POLICY_KINDS, pod_ports
from ciliate.control.policy.model import (
    HOST_IDENTITY,
    REMOTE_NODE_IDENTITY,
    ContainerPort,
    EndpointPolicy,
    PodEndpoint,
    PolicyResult,
)
from ciliate.control.revision_loop import PassIncomplete, RevisionLoop
from ciliate.control.store import Reader, StoreError
from ciliate.datapath.maps import IpcacheEntry, PodSocket
from ciliate.datapath.pod_connections import OpenConnection, open_connections
from ciliate.datapath.policy import PolicyEntry
from ciliate.datapath.programs import Datapath
from ciliate.loader import LoaderError, MapError

log = logging.getLogger(__name__)
# What the policy engine reads: not Services nor EndpointSlices, which would make
# every pass decode thousands of objects it never looks at.
_POLICY_INPUT_KINDS = ("Namespace", "Pod", *POLICY_KINDS)

POD_NAMESPACE_ATTRIBUTE = "K8S_POD_NAMESPACE"
POD_NAME_ATTRIBUTE = "K8S_POD_NAME"
TCP = 6
# Seconds an ADD may take between writing its policy and committing its endpoint.
_ADD_GRACE = 60.0
# Identities a trace gives pods not running yet: above every allocated one, below
# the CIDR identities (1 << 24).
UNALLOCATED_IDENTITY = 1 << 20
# Below are the reserved identities, which every policy computation knows.
FIRST_ALLOCATED_IDENTITY = 256


# Threads reading pods' socket tables side by side (the kernel walks run in parallel).
_READ_AHEAD_THREADS = 4


def _connections_or_error(netns: str) -> list[OpenConnection] | Exception:
    try:
        return open_connections(netns)
    except (OSError, LoaderError) as exc:
        return exc


class LocalEndpoint(Protocol):
    """What the loop reads of an endpoint record."""

    @property
    def ip(self) -> str: ...
    @property
    def identity(self) -> int: ...
    @property
    def endpoint_id(self) -> int: ...
    @property
    def labels(self) -> Mapping[str, str]: ...
    @property
    def cni_labels(self) -> Mapping[str, str]: ...
    @property
    def attributes(self) -> Mapping[str, str]: ...
    @property
    def container_id(self) -> str: ...
    @property
    def pod(self) -> str | None: ...
    @property
    def netns(self) -> str: ...


class IdentityLookup(Protocol):
    def get(self, identity_id: int) -> Identity | None: ...


class Endpoints(Protocol):
    """The node's endpoints (``EndpointManager``)."""

    def list(self) -> Sequence[LocalEndpoint]: ...
    def relabel(self, endpoint: Any, labels: Mapping[str, str]) -> LocalEndpoint: ...


@dataclass(frozen=True)
class RemoteEndpoint:
    """An endpoint another node published: its address, identity and pod."""

    ip: ipaddress.IPv4Address
    identity: int
    namespace: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class Cluster:
    """What a cluster adds to one node's view (None on a lone node)."""

    remote_endpoints: Callable[[], Iterable[RemoteEndpoint]]
    identity_labels: Callable[[int], Mapping[str, str] | None]
    node_ips: Callable[[], Iterable[ipaddress.IPv4Address]]  # every other node's address


def cluster_view(*, store: Reader, identities: IdentityLookup, node_name: str) -> Cluster:
    """The rest of the cluster as the policy loop reads it from the cluster store:
    the endpoints other nodes published, their identities' labels, the nodes."""

    def remote_endpoints() -> list[RemoteEndpoint]:
        out = []
        for key, raw in store.list(keys.ENDPOINTS):
            doc = json.loads(raw)
            if doc.get("node") == node_name:
                continue
            namespace, _, name = str(doc.get("pod") or "").partition("/")
            out.append(
                RemoteEndpoint(
                    ip=ipaddress.IPv4Address(key.removeprefix(keys.ENDPOINTS)),
                    identity=int(doc["identity"]),
                    namespace=namespace or None,
                    name=name or None,
                )
            )
        return out

    def identity_labels(identity_id: int) -> Mapping[str, str] | None:
        identity = identities.get(identity_id)
        return None if identity is None else identity.labels

    def node_ips() -> list[ipaddress.IPv4Address]:
        return [
            ipaddress.IPv4Address(json.loads(raw)["nodeIP"])
            for key, raw in store.list(keys.NODES)
            if key.removeprefix(keys.NODES) != node_name
        ]

    return Cluster(
        remote_endpoints=remote_endpoints, identity_labels=identity_labels, node_ips=node_ips
    )


class PolicyWriteError(PassIncomplete):
    """Policies (or new identities) of some endpoints could not be written; the
    others were (retried at the next change or resync, not at every poll: a pass
    over a policy too big for its map computes for seconds and would fail alike)."""


def _write_failure(endpoint: LocalEndpoint, policy: EndpointPolicy, exc: MapError) -> str:
    """What failed, and what to raise when the map is full."""
    what = (
        f"endpoint {endpoint.endpoint_id} ({pod_ref(endpoint)}): its policy "
        f"({len(policy.entries)} rules) was not written and it keeps the one it had: {exc}"
    )
    if exc.errno in (errno.ENOSPC, errno.E2BIG):  # a hash map at max_entries
        what += (
            "; the policy map is full: raise max_entries of maps.ciliate_policy in "
            "bpf/datapath.toml and rebuild, or select fewer peers and ports"
        )
    return what


@dataclass
class SyncResult:
    relabelled: list[str] = field(default_factory=list)
    written: list[int] = field(default_factory=list)  # endpoint ids given a new policy
    evicted: list[PodSocket] = field(default_factory=list)
    policy: PolicyResult | None = None


class PolicyFirstIpcache:
    """The node's ipcache as the cluster mirror writes it: a remote pod's identity
    reaches the local policies (:meth:`PolicyController.learn_identity`) before the
    datapath sees the pod's packets under it."""

    def __init__(self, ipcache: IpcacheWriter, policy: PolicyController) -> None:
        self._ipcache = ipcache
        self._policy = policy

    def upsert(self, entry: IpcacheEntry) -> None:
        remote_pod = entry.prefix.prefixlen == 32 and entry.node_ip is not None
        if remote_pod and entry.identity >= FIRST_ALLOCATED_IDENTITY:
            self._policy.learn_identity(entry.identity, ip=entry.prefix.network_address)
        self._ipcache.upsert(entry)
        if remote_pod:
            self._policy.remote_identity_written(entry.prefix.network_address, entry.identity)

    def delete(self, prefix: ipaddress.IPv4Network) -> bool:
        deleted = self._ipcache.delete(prefix)
        if prefix.prefixlen == 32:
            self._policy.remote_identity_written(prefix.network_address, None)
        return deleted

    def list(self) -> list[IpcacheEntry]:
        return self._ipcache.list()


def pod_ref(endpoint: LocalEndpoint) -> str:
    """``namespace/name`` of the endpoint's pod, or ``/<container ID>`` when the
    runtime did not say (no CNI_ARGS)."""
    return endpoint.pod or f"/{endpoint.container_id}"


def _pods_by_ref(snapshot: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """The Pod objects of a snapshot by ``namespace/name``."""
    return {
        f"{pod['metadata']['namespace']}/{pod['metadata']['name']}": pod
        for pod in snapshot.get("Pod", [])
    }


def security_labels_of(
    *,
    attributes: Mapping[str, str],
    cni_labels: Mapping[str, str],
    pods: Mapping[str, Mapping[str, Any]],
    namespaces: Mapping[str, Mapping[str, Any]],
) -> dict[str, str]:
    """The security labels of a pod: its Pod object's labels (from ``pods``, by
    ``namespace/name``), its namespace and that namespace's labels (from
    ``namespaces``; ``kubernetes.io/metadata.name`` at least), and the netconf's
    labels; never its name. Empty when nothing is known: no namespace and no netconf
    labels (a runtime without Kubernetes), and the endpoint takes ``init``."""
    namespace = attributes.get(POD_NAMESPACE_ATTRIBUTE) or cni_labels.get(NAMESPACE_LABEL)
    name = attributes.get(POD_NAME_ATTRIBUTE)
    extra = {k: v for k, v in cni_labels.items() if k not in (POD_NAME_LABEL, NAMESPACE_LABEL)}
    if not namespace:
        return extra
    pod = pods.get(f"{namespace}/{name}") if name else None
    pod_labels: Mapping[str, str] = (pod["metadata"].get("labels") or {}) if pod else {}
    ns = namespaces.get(namespace)
    namespace_labels: Mapping[str, str] = (
        (ns["metadata"].get("labels") or {}) if ns else {"kubernetes.io/metadata.name": namespace}
    )
    try:
        labels = security_labels(
            namespace=namespace, pod_labels=pod_labels, namespace_labels=namespace_labels
        )
    except IdentityLabelsError as exc:
        log.warning("pod %s/%s: %s; its Pod object's labels are ignored", namespace, name, exc)
        labels = security_labels(namespace=namespace, namespace_labels=namespace_labels)
    for key, value in extra.items():
        labels.setdefault(key, value)
    return labels


class PolicyController:
    def __init__(
        self,
        *,
        objects: ObjectStore,
        revision: Callable[[], object],
        endpoints: Endpoints,
        datapath: Datapath,
        host_ips: Iterable[ipaddress.IPv4Address],
        cluster: Cluster | None = None,
        poll_interval: float = 0.1,
        resync_interval: float = 10.0,
    ) -> None:
        self._objects = objects
        self._endpoints = endpoints
        self._dp = datapath
        self._host_ips = frozenset(host_ips)
        self._cluster = cluster
        self._cidr_identities = CidrIdentities()
        self._written: dict[int, EndpointPolicy] = {}  # endpoint id -> what it holds
        self._cidr_prefixes: dict[ipaddress.IPv4Network, int] = {}  # ours in the ipcache
        # The prefixes the ipcache could not take, how full it was then, and why.
        self._cidr_failure: (
            tuple[frozenset[tuple[ipaddress.IPv4Network, int]], int, MapError] | None
        ) = None
        self._last: PolicyResult | None = None
        # Endpoint id -> an endpoint enforce_new wrote whose ADD has not committed.
        self._adding: dict[int, tuple[LocalEndpoint, float]] = {}
        # Endpoint id -> the policy that could not be written, and why.
        self._failed: dict[int, tuple[EndpointPolicy, str]] = {}
        # Endpoint id -> its open connections, read ahead by a pass that enforces a
        # first policy on several endpoints (:meth:`_read_connections_ahead`).
        self._read_ahead: dict[int, list[OpenConnection] | Exception] = {}
        # The identities of every pod (here and elsewhere) the last computation saw.
        self._known_identities: set[int] = set()
        # Remote pod address -> the identity this node's ipcache gives it (written by
        # the cluster mirror through PolicyFirstIpcache).
        self._remote_in_datapath: dict[ipaddress.IPv4Address, int] = {}
        self._lock = threading.Lock()
        # Started, woken, asked for its status and closed by the agent.
        self.loop = RevisionLoop(
            name="policy",
            revision=revision,
            run_pass=self._pass,
            poll_interval=poll_interval,
            resync_interval=resync_interval,
        )

    # -- labels ----------------------------------------------------------------------
    def labels_for(
        self, *, attributes: Mapping[str, str], cni_labels: Mapping[str, str]
    ) -> dict[str, str]:
        """The security labels of a pod being added (see :func:`security_labels_of`),
        from the stored Pod and Namespace objects."""
        namespace = attributes.get(POD_NAMESPACE_ATTRIBUTE) or cni_labels.get(NAMESPACE_LABEL)
        name = attributes.get(POD_NAME_ATTRIBUTE)
        pods: dict[str, Mapping[str, Any]] = {}
        namespaces: dict[str, Mapping[str, Any]] = {}
        try:
            if namespace:
                with contextlib.suppress(LookupError):
                    namespaces[namespace] = self._objects.get(KINDS["Namespace"], name=namespace)
                if name:
                    with contextlib.suppress(LookupError):
                        pods[f"{namespace}/{name}"] = self._objects.get(
                            KINDS["Pod"], name=name, namespace=namespace
                        )
        except StoreError as exc:
            # The cluster store is down: the pod starts with what the CNI call says
            # (its namespace, the netconf's labels) and the loop moves it to its
            # Pod object's identity once the store is back.
            log.warning(
                "pod %s/%s: objects unavailable (%s); labels from CNI only", namespace, name, exc
            )
        return security_labels_of(
            attributes=attributes, cni_labels=cni_labels, pods=pods, namespaces=namespaces
        )

    # -- one pass ----------------------------------------------------------------------
    def sync(self) -> SyncResult:
        """One pass (see the module docstring). Relabelling takes the endpoint
        manager's lock, so it runs before this loop's own lock is taken: an ADD holds
        the manager's lock while it asks :meth:`enforce_new`, which takes this one."""
        result = SyncResult()
        snapshot = self._objects.snapshot(_POLICY_INPUT_KINDS)
        pods = _pods_by_ref(snapshot)
        namespaces = {ns["metadata"]["name"]: ns for ns in snapshot.get("Namespace", [])}
        relabel_failures: list[str] = []
        for endpoint in self._endpoints.list():
            labels = security_labels_of(
                attributes=endpoint.attributes,
                cni_labels=endpoint.cni_labels,
                pods=pods,
                namespaces=namespaces,
            )
            if dict(endpoint.labels) != labels:
                try:
                    moved = self._endpoints.relabel(endpoint, labels)
                except (ServiceError, StoreError, IdentityError) as exc:
                    # One endpoint that cannot move (the node's store full or
                    # refusing) must not keep every other endpoint from the policy
                    # applied meanwhile: it keeps its identity, and its policy is
                    # computed for that, as the datapath knows it.
                    message = (
                        f"endpoint {endpoint.endpoint_id} ({pod_ref(endpoint)}): its labels "
                        f"changed but it keeps identity {endpoint.identity}: {exc}"
                    )
                    log.error("policy: %s", message)
                    relabel_failures.append(message)
                    continue
                result.relabelled.append(pod_ref(moved))
        with self._lock:
            local = self._with_adding(list(self._endpoints.list()))
            computed = self._compute(snapshot, pods, local)
            result.policy = computed
            unplaced, unplaced_why = self._place_cidr_identities(computed.cidr_identities)
            live_ids = {endpoint.endpoint_id for endpoint in local}
            failures = relabel_failures
            for gone in self._written.keys() - live_ids:
                # Its DEL cleared its slot, but a pass that listed it before the DEL
                # may have written it after (seen: the slot kept its policy,
                # enforced, until a pod took its address).
                try:
                    self._dp.policy.clear(gone)
                except MapError as exc:
                    failures.append(f"endpoint {gone} (deleted): its policy is left: {exc}")
                    continue
                del self._written[gone]
            # Endpoints gone since the last pass freed their entries: a policy that
            # did not fit may fit now.
            map_changed = bool(self._failed.keys() - live_ids)
            self._failed = {i: f for i, f in self._failed.items() if i in live_ids}
            deferred: list[tuple[LocalEndpoint, EndpointPolicy]] = []
            self._read_connections_ahead(
                [e for e in local if self._starts_enforcing(e, computed.endpoints[pod_ref(e)])]
            )
            try:
                for endpoint in local:
                    policy = computed.endpoints[pod_ref(endpoint)]
                    if unplaced and any(e.identity in unplaced for e in policy.entries):
                        failures.append(
                            f"endpoint {endpoint.endpoint_id} ({pod_ref(endpoint)}): its policy "
                            f"was not written and it keeps the one it had: {unplaced_why}"
                        )
                        continue
                    failed = self._failed.get(endpoint.endpoint_id)
                    if failed is not None and failed[0] == policy:
                        # Written in vain before: again only if this pass frees entries.
                        deferred.append((endpoint, policy))
                        continue
                    map_changed |= self._write_or_report(
                        endpoint, policy, result=result, failures=failures
                    )
                for endpoint, policy in deferred:
                    if map_changed:
                        map_changed |= self._write_or_report(
                            endpoint, policy, result=result, failures=failures
                        )
                    else:
                        failures.append(self._failed[endpoint.endpoint_id][1])
            finally:
                self._read_ahead.clear()
            if result.written:
                result.evicted = self._evict_denied_sockets(local, computed)
            self._last = computed
        if failures:
            # The loop reports it (``/v1/policy`` last_error) until a pass succeeds.
            raise PolicyWriteError("; ".join(failures))
        return result

    def enforce_new(self, endpoint: LocalEndpoint) -> None:
        """The policy of an endpoint being added, written before it forwards. An
        identity some endpoint here already has gets that endpoint's policy at once
        (policies select by labels); otherwise the policy is computed for it, and
        for a new identity the other endpoints' policies too (they may admit it).
        The next pass corrects what depends on the pod itself (named ports)."""
        with self._lock:
            policy = None
            others = list(self._endpoints.list())
            if self._last is not None:
                # Named policy ports resolve per pod: another endpoint's entries
                # fit only a pod that names its ports the same (else a datagram to
                # the other's "http" port passed and one to its own was dropped
                # until the next pass).
                ports = self._named_ports(endpoint)
                for other in others:
                    if other.identity == endpoint.identity and self._named_ports(other) == ports:
                        policy = self._last.endpoints.get(pod_ref(other))
                        # One added since the last pass has none yet (etcd down: no
                        # pass succeeds); another endpoint of the identity may.
                        if policy is not None:
                            break
            if policy is None:
                try:
                    snapshot = self._objects.snapshot(_POLICY_INPUT_KINDS)
                except StoreError:
                    # The objects are out of reach (etcd down) and no pass ran since
                    # the agent started: the policy an endpoint of this identity
                    # holds in the datapath (pinned across the restart) is the one
                    # this pod would get.
                    policy = self._pinned_policy_of(endpoint.identity)
                    if policy is None:
                        raise
                else:
                    pods = _pods_by_ref(snapshot)
                    # An identity no endpoint here has yet: the endpoints whose
                    # policies select (or deny) it learn it now, before its first
                    # packet, not at the next pass (the first datagram or SYN of an
                    # allowed flow to or from the new pod was dropped).
                    new_identity = all(o.identity != endpoint.identity for o in others)
                    computed = self._compute(
                        snapshot,
                        pods,
                        [*others, endpoint],
                        only=None if new_identity else [endpoint],
                    )
                    unplaced, unplaced_why = self._place_cidr_identities(
                        computed.cidr_identities, add_only=True
                    )
                    policy = computed.endpoints[pod_ref(endpoint)]
                    if unplaced and any(e.identity in unplaced for e in policy.entries):
                        raise PolicyWriteError(
                            f"the pod's policy cannot be written: {unplaced_why}"
                        )
                    if new_identity:
                        for other in others:
                            wanted = computed.endpoints[pod_ref(other)]
                            if unplaced and any(e.identity in unplaced for e in wanted.entries):
                                continue  # it keeps its policy; the pass reports it
                            # Another's policy that does not fit is the pass's to
                            # report (PolicyWriteError); this pod's ADD goes on.
                            with contextlib.suppress(MapError):
                                self._write(other, wanted)
            self._written.pop(endpoint.endpoint_id, None)
            # Its network is being made: no connection of it can exist yet.
            self._write(endpoint, policy, adopt_connections=False)
            self._adding[endpoint.endpoint_id] = (endpoint, time.monotonic())

    def enforce_relabelled(self, previous: LocalEndpoint, moved: LocalEndpoint) -> None:
        """Before a relabelled endpoint's packets carry its new identity (its maps are
        written after this, its store record already names it): every endpoint's
        policy computed with the pod under both identities, so the peers that admit
        it admit it whichever its packets carry (its allowed packets were dropped
        between the switch and the pass that wrote the peers' policies). The pass
        right after takes the old identity out."""
        if previous.identity == moved.identity:
            return
        snapshot = self._objects.snapshot(_POLICY_INPUT_KINDS)
        pods = _pods_by_ref(snapshot)
        with self._lock:
            listed = self._with_adding(list(self._endpoints.list()))
            ref = pod_ref(previous)
            namespace, _, name = ref.partition("/")
            as_before = PodEndpoint(
                namespace=namespace,
                name=f"{name} (before its relabel)",  # a ref no pod has
                identity=previous.identity,
                labels=dict(previous.labels),
                ip=ipaddress.IPv4Address(previous.ip),
                ports=pod_ports(pods[ref]) if ref in pods else (),
            )
            self._write_ahead(listed, self._compute(snapshot, pods, listed, extra=[as_before]))

    def learn_identity(self, identity: int, *, ip: ipaddress.IPv4Address) -> None:
        """Before this node's ipcache gives a pod of another node an identity no
        computation here has seen (a new pod, or one relabelled there): every local
        endpoint's policy computed with it, so its first packets are judged by the
        policies that admit it (they were dropped until this loop's next pass; the
        cluster mirror and this loop follow the same etcd change, each in its own
        time). Its named ports are not known here yet; the next pass has them."""
        if self._cluster is None:
            return
        with self._lock:  # a pass that computed with it has written it once this is free
            if identity in self._known_identities:
                return
        labels = self._cluster.identity_labels(identity)
        if labels is None:
            return  # not in the store (yet): the pass decides
        try:
            snapshot = self._objects.snapshot(_POLICY_INPUT_KINDS)
        except StoreError:
            return
        newcomer = PodEndpoint(
            namespace=labels.get(NAMESPACE_LABEL, ""),
            name=f"{ip} (identity {identity})",
            identity=identity,
            labels=dict(labels),
            ip=ip,
            ports=(),
        )
        pods = _pods_by_ref(snapshot)
        with self._lock:
            if identity in self._known_identities:  # a pass ran meanwhile
                return
            listed = self._with_adding(list(self._endpoints.list()))
            self._write_ahead(listed, self._compute(snapshot, pods, listed, extra=[newcomer]))

    def remote_identity_written(self, ip: ipaddress.IPv4Address, identity: int | None) -> None:
        """The identity the node's ipcache now gives a remote pod's address (None:
        gone). While it differs from what the pod's node published, the policies are
        computed with the pod under both (:meth:`_pod_endpoints`); once it changes, a
        pass takes the one no longer seen out."""
        previous = self._remote_in_datapath.get(ip)
        if identity is None:
            self._remote_in_datapath.pop(ip, None)
        else:
            self._remote_in_datapath[ip] = identity
        if previous is not None and previous != identity:
            self.loop.wake()

    def _write_ahead(self, listed: Sequence[LocalEndpoint], computed: PolicyResult) -> None:
        """The policies of a computation made ahead of a pass (a peer's identity about
        to change); what cannot be written is left to the pass, which reports it."""
        unplaced, _ = self._place_cidr_identities(computed.cidr_identities, add_only=True)
        for endpoint in listed:
            policy = computed.endpoints[pod_ref(endpoint)]
            if unplaced and any(e.identity in unplaced for e in policy.entries):
                continue  # it keeps its policy
            with contextlib.suppress(MapError):
                self._write(endpoint, policy)

    def _with_adding(self, listed: list[LocalEndpoint]) -> list[LocalEndpoint]:
        """The endpoints listed, and those whose ADD has written their policy but not
        committed yet: a pass in between must count them too, or it would take the
        entries the ADD gave its peers for the new identity back out (seen: the
        first datagram of the new pod dropped now and then). An ADD that never
        commits (rolled back) is forgotten after ``_ADD_GRACE`` seconds."""
        ids = {endpoint.endpoint_id for endpoint in listed}
        now = time.monotonic()
        for endpoint_id, (_, since) in list(self._adding.items()):
            if endpoint_id in ids or now - since > _ADD_GRACE:
                del self._adding[endpoint_id]
        return listed + [endpoint for endpoint, _ in self._adding.values()]

    def _named_ports(self, endpoint: LocalEndpoint) -> tuple[ContainerPort, ...] | None:
        """The named ports of the endpoint's Pod object; None when the objects are out
        of reach (etcd down), where every endpoint reads alike."""
        namespace = endpoint.attributes.get(POD_NAMESPACE_ATTRIBUTE)
        name = endpoint.attributes.get(POD_NAME_ATTRIBUTE)
        if not namespace or not name:
            return ()
        try:
            return pod_ports(self._objects.get(KINDS["Pod"], name=name, namespace=namespace))
        except LookupError:
            return ()
        except StoreError:
            return None

    def _pinned_policy_of(self, identity: int) -> EndpointPolicy | None:
        """The policy the datapath holds for another endpoint of ``identity``."""
        for other in self._endpoints.list():
            if other.identity != identity:
                continue
            state = self._dp.policy.state(other.endpoint_id)
            if state.revision == 0:
                continue  # never given a policy
            return EndpointPolicy(
                ingress_enforced=state.ingress_enforced,
                egress_enforced=state.egress_enforced,
                entries=tuple(self._dp.policy.entries(other.endpoint_id)),
            )
        return None

    def _compute(
        self,
        snapshot: Mapping[str, Sequence[Mapping[str, Any]]],
        pods: Mapping[str, Mapping[str, Any]],
        local: Sequence[LocalEndpoint],
        *,
        only: Sequence[LocalEndpoint] | None = None,
        extra: Sequence[PodEndpoint] = (),
    ) -> PolicyResult:
        """The policies of ``only`` (default: every endpoint of ``local``), with the
        pods of ``local``, the cluster's and ``extra`` as peers."""
        peers = [*self._pod_endpoints(local, pods), *extra]
        self._known_identities = {peer.identity for peer in peers}
        inp = engine.PolicyInput(
            pods=peers,
            policies=[obj for kind in POLICY_KINDS for obj in snapshot.get(kind, [])],
            node_identities=self._node_identities(),
        )
        return engine.compute(
            inp,
            local=[pod_ref(e) for e in (local if only is None else only)],
            cidr_identities=self._cidr_identities,
        )

    def _write_or_report(
        self,
        endpoint: LocalEndpoint,
        policy: EndpointPolicy,
        *,
        result: SyncResult,
        failures: list[str],
    ) -> bool:
        """:meth:`_write`, a failure reported instead of raised: one endpoint's
        policy that cannot be written (more entries than the map has room for) must
        not keep every endpoint after it from its own. It keeps the policy it had.
        Returns whether the policy map changed."""
        try:
            written = self._write(endpoint, policy)
        except MapError as exc:
            message = _write_failure(endpoint, policy, exc)
            log.error("policy: %s", message)
            self._failed[endpoint.endpoint_id] = (policy, message)
            failures.append(message)
            return False
        self._failed.pop(endpoint.endpoint_id, None)
        if written:
            result.written.append(endpoint.endpoint_id)
        return written

    def _write(
        self, endpoint: LocalEndpoint, policy: EndpointPolicy, *, adopt_connections: bool = True
    ) -> bool:
        """The endpoint's policy into the datapath, unless it holds it already. When
        the policy is the first enforced on it, its open connections are adopted by
        the tracker first (:meth:`_adopt_connections`)."""
        endpoint_id = endpoint.endpoint_id
        if self._written.get(endpoint_id) == policy:
            return False
        if adopt_connections and self._starts_enforcing(endpoint, policy):
            self._adopt_connections(endpoint)
        self._dp.policy.replace(
            endpoint_id,
            policy.entries,
            ingress_enforced=policy.ingress_enforced,
            egress_enforced=policy.egress_enforced,
        )
        self._written[endpoint_id] = policy
        return True

    def _starts_enforcing(self, endpoint: LocalEndpoint, policy: EndpointPolicy) -> bool:
        """Whether writing ``policy`` is the first enforcement on the endpoint."""
        if self._written.get(endpoint.endpoint_id) == policy:
            return False
        if not (policy.ingress_enforced or policy.egress_enforced):
            return False
        state = self._dp.policy.state(endpoint.endpoint_id)
        return not (state.ingress_enforced or state.egress_enforced)

    def _read_connections_ahead(self, endpoints: Sequence[LocalEndpoint]) -> None:
        """The open connections of the endpoints a pass is about to enforce for the
        first time, read side by side: reading one pod's socket tables walks the
        node-wide TCP hash (~2 ms here), and a first policy over a namespace of 100
        pods took 0.7 s read one by one, under the loop's lock."""
        if len(endpoints) < 2:
            return
        with ThreadPoolExecutor(max_workers=_READ_AHEAD_THREADS) as pool:
            read = pool.map(_connections_or_error, [e.netns for e in endpoints])
            self._read_ahead = dict(zip((e.endpoint_id for e in endpoints), read, strict=True))

    def _adopt_connections(self, endpoint: LocalEndpoint) -> None:
        """The endpoint's open connections into the tracker, each from the end that
        opened it, so their next packets are judged as their opener sent them. The
        tracker only learns connections while policy is enforced on an end; without
        this, a server's answer to a request the pod sent before its ingress was
        isolated would count as a connection into the pod and be dropped (Cilium and
        iptables engines keep such connections: their conntrack saw them open)."""
        read = self._read_ahead.pop(endpoint.endpoint_id, None)
        if read is None:
            read = _connections_or_error(endpoint.netns)
        if isinstance(read, Exception):
            exc = read
            log.warning(
                "policy: the open connections of endpoint %d (%s) cannot be read: %s; "
                "their next packets are judged as new connections",
                endpoint.endpoint_id,
                pod_ref(endpoint),
                exc,
            )
            return
        adopted = self._dp.conntrack.adopt(read)
        if adopted:
            log.info(
                "policy: %d open connection(s) of endpoint %d (%s) tracked",
                adopted,
                endpoint.endpoint_id,
                pod_ref(endpoint),
            )

    def _pod_endpoints(
        self, local: Sequence[LocalEndpoint], pods: Mapping[str, Mapping[str, Any]]
    ) -> list[PodEndpoint]:
        out = []
        for endpoint in local:
            ref = pod_ref(endpoint)
            namespace, _, name = ref.partition("/")
            out.append(
                PodEndpoint(
                    namespace=namespace,
                    name=name,
                    identity=endpoint.identity,
                    labels=dict(endpoint.labels),
                    ip=ipaddress.IPv4Address(endpoint.ip),
                    ports=pod_ports(pods[ref]) if ref in pods else (),
                )
            )
        if self._cluster is None:
            return out
        in_datapath = dict(self._remote_in_datapath)
        for remote in self._cluster.remote_endpoints():
            labels = self._cluster.identity_labels(remote.identity) or {}
            namespace = remote.namespace or labels.get(NAMESPACE_LABEL, "")
            name = remote.name or str(remote.ip)
            ref = f"{namespace}/{name}"
            ports = pod_ports(pods[ref]) if ref in pods else ()
            out.append(
                PodEndpoint(
                    namespace=namespace,
                    name=name,
                    identity=remote.identity,
                    labels=dict(labels),
                    ip=remote.ip,
                    ports=ports,
                )
            )
            seen = in_datapath.get(remote.ip)
            if seen is not None and seen != remote.identity:
                # Relabelled there, and this node's ipcache not switched yet: its
                # packets still carry the old identity, admitted as before meanwhile.
                seen_labels = self._cluster.identity_labels(seen)
                if seen_labels is not None:
                    out.append(
                        PodEndpoint(
                            namespace=namespace,
                            name=f"{name} (identity {seen} in the ipcache)",
                            identity=seen,
                            labels=dict(seen_labels),
                            ip=remote.ip,
                            ports=ports,
                        )
                    )
        return out

    def _node_identities(self) -> dict[ipaddress.IPv4Address, int]:
        nodes = {address: HOST_IDENTITY for address in self._host_ips}
        if self._cluster is not None:
            for address in self._cluster.node_ips():
                nodes.setdefault(address, REMOTE_NODE_IDENTITY)
        return nodes

    def _write_cidr_identities(
        self, wanted: Mapping[ipaddress.IPv4Network, int], *, add_only: bool = False
    ) -> None:
        """Policy CIDRs into the ipcache, never over an entry of the node's own (a pod
        CIDR, a node or pod address keeps its identity); ``add_only`` keeps the ones
        no longer wanted (a pass for one endpoint does not see every policy's)."""
        new = {p: i for p, i in wanted.items() if self._cidr_prefixes.get(p) != i}
        if new:  # the ipcache is read only when there is something to add
            others = {
                entry.prefix
                for entry in self._dp.ipcache.list()
                if entry.prefix not in self._cidr_prefixes
            }
            attempt = frozenset(new.items())
            failed = self._cidr_failure
            if failed is not None and failed[0] == attempt and len(others) >= failed[1]:
                # Written in vain before with no more room now: not again every pass.
                raise failed[2]
            self._cidr_failure = None
            written: dict[ipaddress.IPv4Network, int | None] = {}  # prefix -> its old identity
            try:
                for prefix, identity in new.items():
                    if prefix not in others:
                        self._dp.ipcache.upsert(
                            IpcacheEntry(prefix, identity=identity, node_ip=None)
                        )
                        written[prefix] = self._cidr_prefixes.get(prefix)
                        self._cidr_prefixes[prefix] = identity
            except MapError as exc:
                self._cidr_failure = (attempt, len(others), exc)
                # All or none: a CIDR identity in the ipcache changes how every
                # endpoint sees those senders, also the ones keeping their policy.
                for prefix, previous in written.items():
                    if previous is None:
                        self._dp.ipcache.delete(prefix)
                        del self._cidr_prefixes[prefix]
                    else:
                        self._dp.ipcache.upsert(
                            IpcacheEntry(prefix, identity=previous, node_ip=None)
                        )
                        self._cidr_prefixes[prefix] = previous
                raise
        if add_only:
            return
        for prefix in [p for p in self._cidr_prefixes if p not in wanted]:
            self._dp.ipcache.delete(prefix)
            del self._cidr_prefixes[prefix]

    def _place_cidr_identities(
        self, wanted: Mapping[ipaddress.IPv4Network, int], *, add_only: bool = False
    ) -> tuple[frozenset[int], str | None]:
        """:meth:`_write_cidr_identities`; when the ipcache cannot take them, the CIDR
        identities left out (policies naming them cannot be written) and why."""
        try:
            self._write_cidr_identities(wanted, add_only=add_only)
        except MapError as exc:
            unplaced = frozenset(i for p, i in wanted.items() if self._cidr_prefixes.get(p) != i)
            why = f"{len(unplaced)} policy CIDRs do not fit in the ipcache: {exc}"
            if exc.errno in (errno.ENOSPC, errno.E2BIG):
                why += (
                    "; raise max_entries of maps.ciliate_ipcache in bpf/datapath.toml and "
                    "rebuild, or name fewer CIDRs"
                )
            log.error("policy: %s", why)
            return unplaced, why
        return frozenset(), None

    def _evict_denied_sockets(
        self, local: Sequence[LocalEndpoint], computed: PolicyResult
    ) -> list[PodSocket]:
        """Mapped sockets whose connection policy now denies leave the sockhash: their
        next bytes take the packet path and meet the policy there."""
        by_ip = {ipaddress.IPv4Address(e.ip): e for e in local}
        evicted = []
        adopted: set[int] = set()
        for sock in self._dp.sockets.list():
            # A mapped socket does not say which end opened the connection, so it
            # stays mapped only while policy allows both directions; otherwise it
            # goes back to the packet path, where the tracker knows the opener and
            # decides exactly (an allowed connection keeps working there).
            (a_ip, a_port), (b_ip, b_port) = sock.local, sock.remote
            a, b = by_ip.get(a_ip), by_ip.get(b_ip)
            if a is None or b is None:
                continue
            allowed = self._allowed(a, b, b_port, computed) and self._allowed(
                b, a, a_port, computed
            )
            if not allowed:
                # The packet path must know who opened it: the tracker saw no packet
                # of it since socket forwarding took it (or its entry has expired).
                for end in (a, b):
                    if end.endpoint_id not in adopted:
                        adopted.add(end.endpoint_id)
                        self._adopt_connections(end)
                self._dp.sockets.delete(sock)
                evicted.append(sock)
        if evicted:
            log.info("policy: %d mapped socket(s) evicted", len(evicted))
        return evicted

    @staticmethod
    def _allowed(src: LocalEndpoint, dst: LocalEndpoint, port: int, computed: PolicyResult) -> bool:
        egress = decide(
            computed.endpoints.get(pod_ref(src)),
            endpoint=pod_ref(src),
            direction="egress",
            peer_identity=dst.identity,
            protocol=TCP,
            port=port,
        )
        ingress = decide(
            computed.endpoints.get(pod_ref(dst)),
            endpoint=pod_ref(dst),
            direction="ingress",
            peer_identity=src.identity,
            protocol=TCP,
            port=port,
        )
        return egress.allowed and ingress.allowed

    # -- trace ---------------------------------------------------------------------------
    def trace(self, *, src: str, dst: str, protocol: int, port: int) -> Trace:
        """What the datapath decides for ``src`` -> ``dst`` (``namespace/name``), with
        the real identities and addresses, and which rule or default decides it.
        Raises ``LookupError`` for a pod with no endpoint."""
        snapshot = self._objects.snapshot(_POLICY_INPUT_KINDS)
        pods = _pods_by_ref(snapshot)
        endpoints = self._pod_endpoints(list(self._endpoints.list()), pods)
        by_ref = {endpoint.ref: endpoint for endpoint in endpoints}
        for flag, ref in (("src", src), ("dst", dst)):
            if ref in by_ref:
                continue
            if ref not in pods:
                raise LookupError(f"--{flag}: pod {ref} has no endpoint and no Pod object")
            # A pod not running yet: as it would be, with the identity of its labels.
            endpoints.append(self._pod_to_be(pods[ref], snapshot, endpoints))
            by_ref[ref] = endpoints[-1]
        nodes = self._node_identities()
        inp = engine.PolicyInput(
            pods=endpoints,
            policies=[obj for kind in POLICY_KINDS for obj in snapshot.get(kind, [])],
            node_identities=nodes,
        )
        result = engine.compute(inp, local=[src, dst], cidr_identities=self._cidr_identities)
        ipcache = Ipcache.build(pods=endpoints, result=result, node_identities=nodes)
        return trace(
            result, src=by_ref[src], dst=by_ref[dst], protocol=protocol, port=port, ipcache=ipcache
        )

    @staticmethod
    def _pod_to_be(
        pod: Mapping[str, Any],
        snapshot: Mapping[str, Sequence[Mapping[str, Any]]],
        endpoints: Sequence[PodEndpoint],
    ) -> PodEndpoint:
        """A pod with no endpoint, from its object: the identity of an endpoint with
        the same labels, else one no endpoint has; its address from status.podIP."""
        namespaces = {
            ns["metadata"]["name"]: ns["metadata"].get("labels") or {}
            for ns in snapshot.get("Namespace", [])
        }
        labels = inputs.pod_labels(pod, namespaces)
        same = [e.identity for e in endpoints if dict(e.labels) == labels]
        identity = same[0] if same else UNALLOCATED_IDENTITY + len(endpoints)
        address = pod.get("status", {}).get("podIP")
        return PodEndpoint(
            namespace=pod["metadata"]["namespace"],
            name=pod["metadata"]["name"],
            identity=identity,
            labels=labels,
            ip=ipaddress.IPv4Address(address) if address else None,
            ports=pod_ports(pod),
        )

    # -- the loop ----------------------------------------------------------------------
    @property
    def last(self) -> PolicyResult | None:
        """The policy of the last pass (what ``policy trace`` and ``endpoint get`` show)."""
        return self._last

    def origins(self, endpoint_id: int) -> dict[PolicyEntry, list[str]]:
        """Which policy rule (or default) each entry of the endpoint comes from."""
        policy = self._written.get(endpoint_id)
        if policy is None:
            return {}
        return {entry: [str(ref) for ref in refs] for entry, refs in policy.origins.items()}

    def _pass(self) -> None:
        result = self.sync()
        if result.relabelled or result.written:
            log.info(
                "policy: %d endpoint(s) relabelled, %d given a new policy",
                len(result.relabelled),
                len(result.written),
            )
