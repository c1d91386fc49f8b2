"""The agent's membership in a cluster: the shared store (etcd), the node
object, pod CIDRs from the operator, cluster-wide identities, the other
nodes and their endpoints mirrored into this node's ipcache, and the BGP
announcement of this node's pod CIDRs.

The cluster keys are listed in :mod:`ciliate.control.cluster.keys`; identities
are ClusterIdentities' (control/identity/cluster.py).

Restart and loss
----------------
``close()`` is an agent stopping, not the node leaving: the node stays
registered, its liveness key expires with its lease (``lease_ttl``) unless the
next agent renews it first, and its BGP speaker stops as a *restarting* speaker
(graceful restart: the ToR keeps the node's routes for the restart time, see
:mod:`ciliate.control.cluster.bgp`), while the pinned datapath keeps forwarding.
The next agent announces the same pod CIDRs in its first UPDATE.

An agent that starts while etcd is unreachable (restarted during an etcd
outage) still serves: it registers in the background once etcd answers, takes
the pod CIDRs it was given last from its state directory (``pod-cidrs.json``,
written whenever the operator's answer is read), and leaves the pinned ipcache
as the last agent wrote it until the watches can read the cluster again.

The node leaves when its ``cluster/nodes/<name>`` key is deleted: by ``ciliate
node delete``, or by the operator once the node's liveness has been gone for its
grace period (node loss). An agent that sees its own node deleted withdraws its
routes at once: the operator frees its pod CIDRs, which may go to another node.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ciliate.control.cluster.bgp import DEFAULT_RESTART_TIME, BgpSpeaker, Peer
from ciliate.control.cluster.keys import ALIVE, BGP, ENDPOINTS, IPAM, NODES, remove_node
from ciliate.control.identity.cluster import ClusterIdentities
from ciliate.control.store import StoreClosedError, StoreError, StoreUnavailableError, Txn
from ciliate.datapath.maps import IpcacheEntry

log = logging.getLogger(__name__)

# How long the node's liveness key outlives its agent: an agent restart within it
# is not seen by the operator at all.
DEFAULT_LEASE_TTL = 10
REMOTE_NODE_IDENTITY = 6  # reserved:remote-node
# Seconds between attempts to publish endpoint changes the store refused.
DEFAULT_REPUBLISH_INTERVAL = 1.0
# The pod CIDRs last read from the operator, in the agent's state directory.
POD_CIDRS_CACHE = "pod-cidrs.json"


class ClusterError(RuntimeError):
    pass


class ClusterStore(Protocol):
    """What cluster mode needs of the shared store (EtcdStore provides it)."""

    def get(self, key: str) -> bytes | None: ...
    def list(self, prefix: str) -> Sequence[tuple[str, bytes]]: ...
    def run_transaction(self, fn: Callable[[Txn], Any], *, retries: int = ...) -> Any: ...
    def watch_prefix(self, prefix: str, *, start_revision: int | None = None) -> Any: ...
    def lease(self, ttl: int) -> Any: ...
    def put_with_lease(self, key: str, value: bytes, lease: Any) -> None: ...
    def revision(self) -> int: ...
    def close(self) -> None: ...


class IpcacheWriter(Protocol):
    """Where the mirror writes the rest of the cluster: the node's
    ``datapath.maps.Ipcache``, or an in-memory one (``ciliate bench cluster``)."""

    def upsert(self, entry: IpcacheEntry) -> None: ...
    def delete(self, prefix: ipaddress.IPv4Network) -> bool: ...
    def list(self) -> list[IpcacheEntry]: ...


def _dumps(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class BgpConfig:
    local_as: int
    peers: Sequence[tuple[ipaddress.IPv4Address, int]]
    # Seconds the ToR keeps our routes while the agent restarts (RFC 4724; 0: off).
    graceful_restart: int = DEFAULT_RESTART_TIME
    hold_time: int = 3


class ClusterMember:
    """Registers the node, waits for its pod CIDRs, keeps it alive, mirrors
    the rest of the cluster into the ipcache and announces over BGP."""

    def __init__(
        self,
        *,
        store: ClusterStore,
        node_name: str,
        node_ip: ipaddress.IPv4Address,
        workdir: Path,
        bgp: BgpConfig | None = None,
        lease_ttl: int = DEFAULT_LEASE_TTL,
        republish_interval: float = DEFAULT_REPUBLISH_INTERVAL,
    ) -> None:
        if lease_ttl < 2:
            raise ValueError("the node's lease TTL is at least 2 s")
        self.store = store
        self.node_name = node_name
        self.node_ip = node_ip
        self._workdir = workdir
        self._bgp_config = bgp
        self._speaker: BgpSpeaker | None = None
        self._lease_ttl = lease_ttl
        self._registered = False
        self._left = False  # our node object was deleted: the node left the cluster
        self._resync_lock = threading.Lock()
        self._ipcache: IpcacheWriter | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._remote_cidrs: dict[str, list[ipaddress.IPv4Network]] = {}
        self._remote_endpoints: dict[ipaddress.IPv4Network, IpcacheEntry] = {}
        # Until the published endpoints have been read once, a resync must not
        # delete the remote entries the pinned ipcache has (it cannot tell them
        # from stale ones).
        self._endpoints_read = False
        self._lease: Any = None
        self.identities = ClusterIdentities(store, node=node_name)
        # This node's endpoints as published (see endpoint_added).
        self._local: dict[str, bytes] = {}
        self._local_lock = threading.Lock()
        self._endpoints_dirty = threading.Event()
        self._publisher: threading.Thread | None = None
        self._republish_interval = republish_interval

    # -- registration -------------------------------------------------------------
    def register(self) -> None:
        """Write the node's object and its liveness key. With etcd unreachable (an
        agent restarted during an outage) the agent goes on, and a thread registers
        once etcd answers."""
        try:
            self._register()
        except StoreUnavailableError as exc:
            log.warning("node %s not registered yet: %s; retrying", self.node_name, exc)
            thread = threading.Thread(target=self._register_later, name="register", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _register_later(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self._register()
                return
            except StoreError as exc:
                log.info("node %s not registered yet: %s", self.node_name, exc)

    def _register(self) -> None:
        key, doc = (
            f"{NODES}{self.node_name}",
            _dumps({"name": self.node_name, "nodeIP": str(self.node_ip)}),
        )

        def put(t: Txn) -> None:
            # Unchanged (an agent restart): no write, so no other agent is woken.
            if t.get(key) != doc:
                t.put(key, doc)

        self.store.run_transaction(put)
        self._lease = self.store.lease(self._lease_ttl)
        self.store.put_with_lease(
            f"{ALIVE}{self.node_name}", _dumps({"since": time.time()}), self._lease
        )
        self._registered = True
        self._left = False
        log.info("registered node %s (%s)", self.node_name, self.node_ip)

    def wait_for_pod_cidrs(self, timeout: float = 60) -> list[ipaddress.IPv4Network]:
        """The pod CIDRs the operator gave this node (IPv4 ones); with etcd
        unreachable, the ones it gave last (kept in the state directory)."""
        deadline = time.monotonic() + timeout
        last_error = None
        while time.monotonic() < deadline:
            try:
                raw = self.store.get(f"{IPAM}{self.node_name}")
            except StoreUnavailableError as exc:
                cached = self._cached_pod_cidrs()
                if cached:
                    log.warning("pod CIDRs from the last answer (%s): %s", exc, cached)
                    return cached
                last_error = str(exc)
                time.sleep(0.5)
                continue
            if raw is not None:
                doc = json.loads(raw)
                cidrs = [ipaddress.ip_network(c) for c in doc.get("podCIDRs", [])]
                v4 = [c for c in cidrs if isinstance(c, ipaddress.IPv4Network)]
                if v4:
                    self._cache_pod_cidrs(v4)
                    return v4
                last_error = (doc.get("status") or {}).get("error")
            time.sleep(0.1)
        raise ClusterError(
            f"the operator gave node {self.node_name} no pod CIDR within {timeout:.0f} s"
            + (f": {last_error}" if last_error else ": is ciliate-operator running?")
        )

    def _cached_pod_cidrs(self) -> list[ipaddress.IPv4Network]:
        try:
            doc = json.loads((self._workdir / POD_CIDRS_CACHE).read_text())
            return [ipaddress.IPv4Network(c) for c in doc["podCIDRs"]]
        except (OSError, ValueError, KeyError, TypeError):
            return []

    def _cache_pod_cidrs(self, cidrs: Sequence[ipaddress.IPv4Network]) -> None:
        path = self._workdir / POD_CIDRS_CACHE
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"podCIDRs": [str(c) for c in cidrs]}))
            tmp.replace(path)
        except OSError as exc:  # a restart during an etcd outage will not find them
            log.warning("could not keep the pod CIDRs in %s: %s", path, exc)

    # -- endpoints: published for the other nodes ------------------------------------
    # The member keeps what it must publish (this node's endpoints, address -> doc):
    # a change the store refuses (etcd down) is not lost, the publisher thread
    # writes the whole set again until the store takes it, then stops.
    def _endpoint_doc(self, identity: int, pod: str | None) -> bytes:
        doc: dict[str, Any] = {
            "identity": identity,
            "nodeIP": str(self.node_ip),
            "node": self.node_name,
        }
        if pod is not None:
            doc["pod"] = pod  # namespace/name: other nodes' policy reads its named ports
        return _dumps(doc)

    def endpoint_added(self, ip: str, identity: int, pod: str | None) -> None:
        doc = self._endpoint_doc(identity, pod)
        with self._local_lock:
            self._local[ip] = doc
        self._publish(lambda t: t.put(f"{ENDPOINTS}{ip}", doc), what=f"endpoint {ip}")

    def endpoint_removed(self, ip: str) -> None:
        with self._local_lock:
            self._local.pop(ip, None)
        self._publish(lambda t: t.delete(f"{ENDPOINTS}{ip}"), what=f"removal of endpoint {ip}")

    def endpoints_synced(self, live: Mapping[str, tuple[int, str | None]]) -> None:
        """After a restart: publish what lives here (address -> identity and pod),
        unpublish what does not."""
        with self._local_lock:
            self._local = {
                ip: self._endpoint_doc(identity, pod) for ip, (identity, pod) in live.items()
            }
        self._publish(self._sync_endpoints, what="this node's endpoints")

    def endpoints_pending(self) -> bool:
        """Whether some endpoint change still waits for the store."""
        return self._endpoints_dirty.is_set()

    def _publish(self, change: Callable[[Txn], Any], *, what: str) -> None:
        """``change`` now, or, the store refusing, the full set by the publisher
        thread later (an ADD or DEL never fails for the cluster store)."""
        if not self._endpoints_dirty.is_set():
            try:
                self.store.run_transaction(change)
                return
            except StoreError as exc:
                log.warning("%s not published (%s); retrying in the background", what, exc)
        self._endpoints_dirty.set()
        self._start_publisher()

    def _sync_endpoints(self, t: Txn) -> None:
        with self._local_lock:
            local = dict(self._local)
        for key, raw in t.list(ENDPOINTS):
            ip = key.removeprefix(ENDPOINTS)
            if json.loads(raw).get("node") == self.node_name and ip not in local:
                t.delete(key)
        for ip, doc in local.items():
            if t.get(f"{ENDPOINTS}{ip}") != doc:
                t.put(f"{ENDPOINTS}{ip}", doc)

    def _start_publisher(self) -> None:
        with self._local_lock:
            if self._publisher is not None or self._stop.is_set():
                return
            self._publisher = threading.Thread(
                target=self._republish, name="endpoint publisher", daemon=True
            )
        self._publisher.start()

    def _republish(self) -> None:
        while not self._stop.is_set():
            self._endpoints_dirty.wait(timeout=1.0)
            if not self._endpoints_dirty.is_set():
                continue
            try:
                # Cleared first: a change refused while this runs sets it again.
                self._endpoints_dirty.clear()
                self.store.run_transaction(self._sync_endpoints)
                log.info("this node's endpoints are published again")
            except StoreClosedError:
                return
            except StoreError as exc:
                self._endpoints_dirty.set()
                log.info("endpoints not republished yet: %s", exc)
                self._stop.wait(self._republish_interval)

    # -- the rest of the cluster, into the ipcache -----------------------------------
    # Nodes and pod CIDRs change rarely: a change re-reads both prefixes (one resync
    # for a burst). Endpoints change with every pod: each watch event is applied as
    # it comes (no re-read), so a new pod costs every agent O(1), not a read of the
    # whole cluster. ``_remote_endpoints`` (guarded by ``_resync_lock``) is what the
    # endpoint watch knows; a node resync writes it back beside the node entries.
    def start_mirroring(self, ipcache: IpcacheWriter) -> None:
        self._ipcache = ipcache
        # The endpoints first: a node resync deletes remote entries it does not know,
        # and the pinned ipcache of a restarted agent still has them.
        try:
            self._load_endpoints(self.store.list(ENDPOINTS))
            self._resync()
        except StoreUnavailableError as exc:
            # The pinned ipcache keeps forwarding; the watches read when etcd is back.
            log.warning("cluster not mirrored yet: %s", exc)
        watches = ((IPAM, self._watch), (NODES, self._watch), (ENDPOINTS, self._watch_endpoints))
        for prefix, target in watches:
            thread = threading.Thread(
                target=target, args=(prefix,), name=f"watch {prefix}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _watch(self, prefix: str) -> None:
        while not self._stop.is_set():
            try:
                with contextlib.closing(self.store.watch_prefix(prefix)) as watch:
                    self._resync()  # anything missed before the watch started
                    while not self._stop.is_set():
                        event = watch.get(timeout=1.0)
                        if event is not None:
                            # A burst (nodes registering) costs one resync, not one
                            # per event.
                            while watch.get(timeout=0) is not None:
                                pass
                            self._resync()
            except Exception:
                log.warning("watch on %s failed; retrying", prefix, exc_info=True)
                self._stop.wait(1.0)

    def _watch_endpoints(self, prefix: str) -> None:
        while not self._stop.is_set():
            try:
                with contextlib.closing(self.store.watch_prefix(prefix)) as watch:
                    # Read after the watch started: what changed in between is both in
                    # the read and in the events, applied again in order (idempotent).
                    self._load_endpoints(self.store.list(prefix))
                    self._resync()  # the node resyncs skipped until the first read
                    while not self._stop.is_set():
                        event = watch.get(timeout=1.0)
                        if event is not None:
                            self._apply_endpoint_event(event)
            except Exception:
                log.warning("watch on %s failed; retrying", prefix, exc_info=True)
                self._stop.wait(1.0)

    def _remote_endpoint(self, key: str, raw: bytes | None) -> IpcacheEntry | None:
        """The ipcache entry of a published endpoint; ``None`` for this node's own
        (the endpoint manager writes those) or a deleted key."""
        if raw is None:
            return None
        doc = json.loads(raw)
        if doc.get("node") == self.node_name:
            return None
        prefix = ipaddress.IPv4Network(f"{key.removeprefix(ENDPOINTS)}/32")
        return IpcacheEntry(prefix, int(doc["identity"]), ipaddress.IPv4Address(doc["nodeIP"]))

    def _load_endpoints(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Every published endpoint (a full read, or a watch's RESYNC): replaces what
        the mirror knew."""
        known: dict[ipaddress.IPv4Network, IpcacheEntry] = {}
        for key, raw in items:
            entry = self._remote_endpoint(key, raw)
            if entry is not None:
                known[entry.prefix] = entry
        with self._resync_lock:
            old, self._remote_endpoints = self._remote_endpoints, known
            self._endpoints_read = True
            if self._ipcache is None:
                return
            for prefix, entry in known.items():
                if old.get(prefix) != entry:
                    self._ipcache.upsert(entry)
            for prefix in old.keys() - known.keys():
                self._ipcache.delete(prefix)

    def _apply_endpoint_event(self, event: Any) -> None:
        if event.type == "RESYNC":
            self._load_endpoints(event.items)
            return
        address = event.key.removeprefix(ENDPOINTS)
        try:
            prefix = ipaddress.IPv4Network(f"{address}/32")
            entry = self._remote_endpoint(event.key, event.value if event.type == "PUT" else None)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("published endpoint %s ignored: %s", event.key, exc)
            return
        with self._resync_lock:
            if self._ipcache is None:
                return
            if entry is not None:
                if self._remote_endpoints.get(prefix) != entry:
                    self._remote_endpoints[prefix] = entry
                    self._ipcache.upsert(entry)
            elif self._remote_endpoints.pop(prefix, None) is not None:
                # Only what the mirror wrote: the address may be this node's own now.
                self._ipcache.delete(prefix)

    def _resync(self) -> None:
        """Rebuild the nodes' part of the ipcache from the store, with the endpoints
        the endpoint watch knows. One at a time: two watches call it."""
        if self._ipcache is None:
            return
        with self._resync_lock:
            if not self._endpoints_read:
                return  # the endpoint watch resyncs once it has read them
            self._resync_locked(self._ipcache)

    def _resync_locked(self, ipcache: IpcacheWriter) -> None:
        nodes = {k.removeprefix(NODES): json.loads(v) for k, v in self.store.list(NODES)}
        if self._registered and self.node_name not in nodes and not self._left:
            self._leave()
        wanted: dict[ipaddress.IPv4Network, IpcacheEntry] = {}
        for key, raw in self.store.list(IPAM):
            name = key.removeprefix(IPAM)
            if name == self.node_name or name not in nodes:
                continue
            node_ip = ipaddress.IPv4Address(nodes[name]["nodeIP"])
            for cidr in json.loads(raw).get("podCIDRs", []):
                net = ipaddress.ip_network(cidr)
                if isinstance(net, ipaddress.IPv4Network):
                    wanted[net] = IpcacheEntry(net, 0, node_ip)
            wanted[ipaddress.IPv4Network(f"{node_ip}/32")] = IpcacheEntry(
                ipaddress.IPv4Network(f"{node_ip}/32"), REMOTE_NODE_IDENTITY, node_ip
            )
        wanted.update(self._remote_endpoints)
        current = {e.prefix: e for e in ipcache.list() if e.node_ip is not None}
        for prefix, entry in wanted.items():
            if current.get(prefix) != entry:
                ipcache.upsert(entry)
        for prefix in current.keys() - wanted.keys():
            ipcache.delete(prefix)

    def _leave(self) -> None:
        """Our node object is gone (deleted, or the operator declared the node
        lost): its pod CIDRs are free for others, so stop announcing them."""
        self._left = True
        log.error(
            "node %s was removed from the cluster; withdrawing its pod CIDRs "
            "(restart the agent to register again)",
            self.node_name,
        )
        if self._speaker is not None:
            try:
                self._speaker.set_prefixes([])
            except Exception:
                log.warning("withdrawing the pod CIDRs failed", exc_info=True)

    # -- BGP --------------------------------------------------------------------------
    def start_bgp(self, pod_cidrs: Sequence[ipaddress.IPv4Network]) -> None:
        config = self._bgp_config
        if config is None or not config.peers:
            return
        self._speaker = BgpSpeaker(
            router_id=self.node_ip,
            local_as=config.local_as,
            peers=[Peer(address=a, asn=asn) for a, asn in config.peers],
            next_hop=self.node_ip,
            workdir=self._workdir / "bgp",
            hold_time=config.hold_time,
            graceful_restart=config.graceful_restart,
        )
        # In exabgp's configuration, not through its API: the routes go out before
        # the End-of-RIB, so a ToR holding our routes from before a restart never
        # flushes them in between.
        self._speaker.start([] if self._left else pod_cidrs)
        thread = threading.Thread(target=self._publish_bgp, name="bgp state", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _publish_bgp(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                self._put_bgp_state(_dumps(self.bgp_sessions()))
            if self._stop.wait(2.0):
                return

    def _put_bgp_state(self, doc: bytes) -> None:
        def put(t: Txn) -> None:
            t.put(f"{BGP}{self.node_name}", doc)

        self.store.run_transaction(put)

    def bgp_sessions(self) -> dict[str, str]:
        if self._speaker is None:
            return {}
        return {str(peer.address): str(state) for peer, state in self._speaker.sessions().items()}

    # -- shutdown ------------------------------------------------------------------------
    def close(self) -> None:
        """Stop watching and speaking. The node stays registered and its routes
        stay at the ToR for the graceful-restart time: an agent restart is not a
        node leaving (``ciliate node delete`` is)."""
        self._stop.set()
        if self._speaker is not None:
            if not self._left and self._registered:
                # A deletion the watches have not seen yet (`ciliate lab stop-node`
                # deletes, then stops the agent): the node leaves, not restarts.
                with contextlib.suppress(Exception):
                    self._left = self.store.get(f"{NODES}{self.node_name}") is None
            self._speaker.close(keep_routes=not self._left)
        for thread in [*self._threads, *filter(None, [self._publisher])]:
            thread.join(timeout=3)
        if self._lease is not None:
            with contextlib.suppress(Exception):
                self._lease.close()
        self.store.close()


def list_nodes(store: ClusterStore) -> list[dict[str, Any]]:
    """Nodes with their pod CIDRs, liveness and BGP sessions (``ciliate node list``)."""
    ipam = {k.removeprefix(IPAM): json.loads(v) for k, v in store.list(IPAM)}
    alive = {k.removeprefix(ALIVE) for k, _ in store.list(ALIVE)}
    bgp = {k.removeprefix(BGP): json.loads(v) for k, v in store.list(BGP)}
    out = []
    for key, raw in store.list(NODES):
        name = key.removeprefix(NODES)
        doc = json.loads(raw)
        node_ipam = ipam.get(name, {})
        out.append(
            {
                "name": name,
                "nodeIP": doc.get("nodeIP"),
                "podCIDRs": node_ipam.get("podCIDRs", []),
                "ipamError": (node_ipam.get("status") or {}).get("error"),
                "alive": name in alive,
                "bgp": bgp.get(name, {}),
            }
        )
    return out


def delete_node(store: ClusterStore, name: str) -> None:
    """The node leaves the cluster: the operator frees its pod CIDRs, and its
    agent, if it still runs, withdraws its routes."""
    store.run_transaction(lambda t: remove_node(t, name))
