"""The EndpointSlice controller, with Kubernetes' semantics
(``pkg/controller/endpointslice`` and ``k8s.io/endpointslice``).

For every Service with a selector (and not of type ``ExternalName``, which upstream
leaves alone), the Pods of its namespace whose labels hold the selector become
endpoints of slices the controller owns:

* the address of a pod is its endpoint's, as the agents publish it (locally the
  agent's endpoint records, in a cluster ``cluster/endpoints/<ip>`` with ``pod`` and
  ``node``); a Pod object's first IPv4 ``status.podIPs`` (or ``podIP``) is the
  fallback; a pod with none, or in phase ``Succeeded``/``Failed``, is left out;
* conditions as the controller sets them: ``serving`` = the pod is ready (a Pod
  whose ``Ready`` condition is ``False`` is not; one without conditions is, since
  ciliate's pods are running once they have an endpoint), ``terminating`` = the pod
  has ``metadata.deletionTimestamp``, ``ready`` = serving and not terminating, or
  always with ``publishNotReadyAddresses``; ``targetRef`` names the pod,
  ``nodeName`` its node, ``hostname`` is set for a pod of the Service's subdomain;
* ports: each service port's ``targetPort``, a name resolved against the container
  ports of that protocol of the pod's containers, then its sidecars (``FindPort``;
  a pod without that name leaves the port out); pods are grouped by their resolved
  ports, one set of slices per port mapping;
* at most 100 endpoints a slice (``--max-endpoints-per-slice``), ``addressType:
  IPv4``; slices carry ``kubernetes.io/service-name``,
  ``endpointslice.kubernetes.io/managed-by: endpointslice-controller.ciliate.io``,
  the Service's own labels (but the reserved ones), the headless label for a
  Service without a ClusterIP, and a controller owner reference to it.

Slices of a Service without a selector, and slices without the managed-by label,
are the user's and never touched; the controller's own go when their Service goes,
loses its selector or becomes ``ExternalName``. Slice names are derived from the
service and the port mapping (not random, as Kubernetes' are), so the desired state
is a pure function and a reconcile writes only the difference.

:class:`SliceController` keeps the last pass's state and recomputes only the
Services a change touches (see its docstring); :func:`reconcile` is one full pass.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ciliate.control.objects import KINDS, ObjectStore, object_key, parse_key
from ciliate.control.objects.service_validation import SERVICE_NAME_LABEL
from ciliate.control.services.changes import Changes

__all__ = [
    "MANAGED_BY",
    "MANAGED_BY_LABEL",
    "MAX_ENDPOINTS_PER_SLICE",
    "PodAddress",
    "ReconcileResult",
    "SliceController",
    "desired_slices",
    "pod_address_from_published",
    "reconcile",
    "resolve_target_port",
    "selects",
    "without_server_fields",
]

MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY = "endpointslice-controller.ciliate.io"
HEADLESS_LABEL = "service.kubernetes.io/headless"
MAX_ENDPOINTS_PER_SLICE = 100
_WRITE_BATCH = 20  # objects per apply: an etcd transaction holds at most 128 operations
_SERVER_FIELDS = ("uid", "resourceVersion", "generation", "creationTimestamp")
_T = TypeVar("_T")


@dataclass(frozen=True)
class PodAddress:
    """Where a pod is: its endpoint's address and the node that runs it."""

    ip: ipaddress.IPv4Address
    node: str | None = None


def pod_address_from_published(ip: str, doc: Mapping[str, Any]) -> tuple[str, PodAddress] | None:
    """``(namespace/name, address)`` of an endpoint another agent published under
    ``cluster/endpoints/<ip>`` (``{"pod", "node", ...}``); None without a pod."""
    pod = doc.get("pod")
    if not isinstance(pod, str) or "/" not in pod:
        return None
    node = doc.get("node")
    return pod, PodAddress(ipaddress.IPv4Address(ip), node if isinstance(node, str) else None)


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """A Service selector (equality only) matches the labels."""
    return all(labels.get(key) == value for key, value in selector.items())


def resolve_target_port(service_port: Mapping[str, Any], pod: Mapping[str, Any]) -> int | None:
    """The pod's port a service port reaches (``FindPort``): a number as it is, a
    name looked up in the container ports of the same protocol of the pod's
    containers, then of its sidecars (init containers with ``restartPolicy:
    Always``)."""
    target = service_port.get("targetPort", service_port.get("port"))
    if isinstance(target, int):
        return target
    spec = pod.get("spec", {})
    containers = list(spec.get("containers") or []) + [
        c for c in spec.get("initContainers") or [] if c.get("restartPolicy") == "Always"
    ]
    for container in containers:
        for port in container.get("ports", []):
            if port.get("name") == target and port.get("protocol", "TCP") == service_port.get(
                "protocol", "TCP"
            ):
                number = port.get("containerPort")
                return number if isinstance(number, int) else None
    return None


def _pod_ready(pod: Mapping[str, Any]) -> bool:
    for condition in pod.get("status", {}).get("conditions", []) or []:
        if isinstance(condition, dict) and condition.get("type") == "Ready":
            return condition.get("status") == "True"
    return True


def _owner_reference(service: Mapping[str, Any]) -> dict[str, Any]:
    meta = service["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "name": meta["name"],
        "uid": meta.get("uid", ""),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _slice_labels(service: Mapping[str, Any]) -> dict[str, str]:
    meta = service["metadata"]
    labels = {
        k: v
        for k, v in (meta.get("labels") or {}).items()
        if k not in (SERVICE_NAME_LABEL, MANAGED_BY_LABEL, HEADLESS_LABEL)
    }
    labels[SERVICE_NAME_LABEL] = meta["name"]
    labels[MANAGED_BY_LABEL] = MANAGED_BY
    if service["spec"].get("clusterIP") in ("None", ""):
        labels[HEADLESS_LABEL] = ""
    return labels


def _endpoint(
    service: Mapping[str, Any], pod: Mapping[str, Any], address: PodAddress
) -> dict[str, Any]:
    meta = pod["metadata"]
    serving = _pod_ready(pod)
    terminating = meta.get("deletionTimestamp") is not None
    publish = bool(service["spec"].get("publishNotReadyAddresses"))
    endpoint: dict[str, Any] = {
        "addresses": [str(address.ip)],
        "conditions": {
            # "ready" is never true for a terminating pod, unless the Service
            # publishes not-ready addresses (Kubernetes keeps it so for old clients).
            "ready": publish or (serving and not terminating),
            "serving": serving,
            "terminating": terminating,
        },
        "targetRef": {
            "kind": "Pod",
            "namespace": meta["namespace"],
            "name": meta["name"],
            "uid": meta.get("uid", ""),
        },
    }
    spec = pod.get("spec", {})
    node = address.node or spec.get("nodeName")
    if node:
        endpoint["nodeName"] = node
    # ShouldSetHostname: a pod naming this Service as its subdomain gets a DNS name.
    if spec.get("hostname") and spec.get("subdomain") == service["metadata"]["name"]:
        endpoint["hostname"] = spec["hostname"]
    return endpoint


def _port_mapping(service: Mapping[str, Any], pod: Mapping[str, Any]) -> list[dict[str, Any]]:
    ports = []
    for port in service["spec"].get("ports", []):
        number = resolve_target_port(port, pod)
        if number is None:
            continue  # a named port this pod does not have: not served by this pod
        out: dict[str, Any] = {
            "name": port.get("name", ""),
            "protocol": port.get("protocol", "TCP"),
            "port": number,
        }
        if "appProtocol" in port:
            out["appProtocol"] = port["appProtocol"]
        ports.append(out)
    return ports


def _in_endpoints(pod: Mapping[str, Any]) -> bool:
    """``ShouldPodBeInEndpoints``: pods that finished are never backends."""
    return pod.get("status", {}).get("phase") not in ("Succeeded", "Failed")


def desired_slices(
    *,
    services: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]],
    addresses: Mapping[str, PodAddress],
    max_endpoints: int = MAX_ENDPOINTS_PER_SLICE,
) -> list[dict[str, Any]]:
    """The EndpointSlices the controller wants, for every Service with a selector.

    ``addresses``: the published endpoint of each pod, by ``namespace/name``; a pod
    missing there falls back to its ``status.podIP``."""
    index = _PodIndex()
    for pod in pods:
        index.add(pod)
    slices = []
    for service in services:
        slices += _desired_for(service, index, addresses, max_endpoints=max_endpoints)
    return slices


def _served(service: Mapping[str, Any]) -> bool:
    """Whether the controller makes slices for the Service: one with a selector,
    except an ExternalName one (upstream leaves those alone, issue 105986)."""
    spec = service.get("spec") or {}
    return bool(spec.get("selector")) and spec.get("type") != "ExternalName"


def _desired_for(
    service: Mapping[str, Any],
    index: _PodIndex,
    addresses: Mapping[str, PodAddress],
    *,
    max_endpoints: int,
) -> list[dict[str, Any]]:
    if not _served(service):
        return []  # the user's slices serve it
    selector = service["spec"]["selector"]
    namespace = service["metadata"]["namespace"]
    groups: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
    for pod in index.selected(namespace, selector):
        if not _in_endpoints(pod):
            continue
        address = _address_of(pod, addresses)
        if address is None:
            continue
        ports = _port_mapping(service, pod)
        key = json.dumps(ports, sort_keys=True)
        groups.setdefault(key, (ports, []))[1].append(_endpoint(service, pod, address))
    return _service_slices(service, groups, max_endpoints=max_endpoints)


class _PodIndex:
    """Pods by namespace and by label, so a selector costs the pods that carry its
    rarest label, not every pod of the namespace (10,000 Services over 30,000 pods
    would otherwise be 300 million label checks). Kept up to date pod by pod."""

    def __init__(self) -> None:
        self._pods: dict[str, Mapping[str, Any]] = {}  # namespace/name -> pod
        self._by_label: dict[tuple[str, str, str], dict[str, None]] = {}

    def add(self, pod: Mapping[str, Any]) -> None:
        ref = _ref(pod)
        self.remove(ref)
        self._pods[ref] = pod
        meta = pod["metadata"]
        for key, value in (meta.get("labels") or {}).items():
            self._by_label.setdefault((meta["namespace"], key, value), {})[ref] = None

    def remove(self, ref: str) -> Mapping[str, Any] | None:
        pod = self._pods.pop(ref, None)
        if pod is not None:
            meta = pod["metadata"]
            for key, value in (meta.get("labels") or {}).items():
                refs = self._by_label.get((meta["namespace"], key, value), {})
                refs.pop(ref, None)
                if not refs:
                    self._by_label.pop((meta["namespace"], key, value), None)
        return pod

    def get(self, ref: str) -> Mapping[str, Any] | None:
        return self._pods.get(ref)

    def selected(self, namespace: str, selector: Mapping[str, str]) -> list[Mapping[str, Any]]:
        """The pods of ``namespace`` the selector matches, by name."""
        candidates = min(
            (self._by_label.get((namespace, k, v), {}) for k, v in selector.items()), key=len
        )
        return [
            self._pods[ref]
            for ref in sorted(candidates)
            if selects(selector, self._pods[ref]["metadata"].get("labels") or {})
        ]


def _address_of(pod: Mapping[str, Any], addresses: Mapping[str, PodAddress]) -> PodAddress | None:
    """The published endpoint of the pod, else its first IPv4 ``status.podIPs`` (or
    ``podIP``), as upstream reads the pod's status for an IPv4 slice."""
    meta = pod["metadata"]
    found = addresses.get(f"{meta['namespace']}/{meta['name']}")
    if found is not None:
        return found
    status = pod.get("status") or {}
    texts = [p.get("ip") for p in status.get("podIPs") or [] if isinstance(p, dict)]
    for text in [*texts, status.get("podIP")]:
        if not isinstance(text, str):
            continue
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            continue  # podIPs are not validated on apply: a bad one is no address
        if isinstance(ip, ipaddress.IPv4Address):
            return PodAddress(ip)
    return None


def _service_slices(
    service: Mapping[str, Any],
    groups: Mapping[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]],
    *,
    max_endpoints: int,
) -> list[dict[str, Any]]:
    meta = service["metadata"]
    if not groups:
        # A Service that selects nothing still gets one empty slice, as Kubernetes'
        # controller keeps one ("the service exists, no endpoints").
        groups = {"[]": ([], [])}
    out = []
    for key, (ports, endpoints) in sorted(groups.items()):
        digest = hashlib.sha256(key.encode()).hexdigest()[:6]
        endpoints.sort(key=lambda e: ipaddress.IPv4Address(e["addresses"][0]))
        chunks = [
            endpoints[i : i + max_endpoints] for i in range(0, len(endpoints), max_endpoints)
        ] or [[]]
        for index, chunk in enumerate(chunks):
            out.append(
                {
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {
                        "name": f"{meta['name']}-{digest}-{index}",
                        "namespace": meta["namespace"],
                        "labels": _slice_labels(service),
                        "ownerReferences": [_owner_reference(service)],
                    },
                    "addressType": "IPv4",
                    "endpoints": chunk,
                    "ports": ports,
                }
            )
    return out


@dataclass
class ReconcileResult:
    created: list[str] = field(default_factory=list)  # namespace/name
    updated: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    # What was written, as written (no server fields), and what was deleted, by
    # store key: the table can take them in the same pass.
    written: dict[str, dict[str, Any]] = field(default_factory=dict)
    removed: set[str] = field(default_factory=set)
    services_recomputed: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.created or self.updated or self.deleted)


def without_server_fields(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The object as its writer wrote it: without uid, resourceVersion, generation
    and creationTimestamp, which the store adds."""
    meta = {k: v for k, v in obj["metadata"].items() if k not in _SERVER_FIELDS}
    return {**obj, "metadata": meta}


def _ref(obj: Mapping[str, Any]) -> str:
    return f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"


def _managed(slice_: Mapping[str, Any]) -> bool:
    return (slice_["metadata"].get("labels") or {}).get(MANAGED_BY_LABEL) == MANAGED_BY


def _owner(slice_: Mapping[str, Any]) -> str | None:
    """``namespace/name`` of the Service a slice belongs to (its service-name label)."""
    name = (slice_["metadata"].get("labels") or {}).get(SERVICE_NAME_LABEL)
    return f"{slice_['metadata']['namespace']}/{name}" if name else None


def _ref_of_key(key: str) -> str:
    parsed = parse_key(key)
    if parsed is None or parsed.namespace is None:
        raise ValueError(f"{key!r} is not the key of a namespaced object")
    return f"{parsed.namespace}/{parsed.name}"


class SliceController:
    """The controller between passes: the Services, Pods and its own slices as last
    seen, and the slices it wants for each Service. :meth:`sync` takes what changed
    since the last pass (:class:`~.changes.Changes` of Service, Pod and
    EndpointSlice) and the pods' published addresses, recomputes only the Services
    those changes touch (a Service changed or gone; a pod its selector matched before
    or matches now, or whose address moved; one of its own slices changed or deleted
    by someone else) and writes only the slices that differ. A full
    :class:`~.changes.Changes` starts it over: every Service is recomputed and every
    slice it owns compared, as :func:`reconcile` does."""

    def __init__(
        self, objects: ObjectStore, *, max_endpoints: int = MAX_ENDPOINTS_PER_SLICE
    ) -> None:
        self._objects = objects
        self._max = max_endpoints
        self._clear()

    def _clear(self) -> None:
        self._services: dict[str, Mapping[str, Any]] = {}
        self._pods = _PodIndex()
        # (namespace, label, value) of a selector -> the Services selecting with it.
        self._selecting: dict[tuple[str, str, str], set[str]] = {}
        self._owned: dict[str, Mapping[str, Any]] = {}  # its slices as stored, by ref
        self._owned_by_service: dict[str, set[str]] = {}
        self._desired: dict[str, dict[str, dict[str, Any]]] = {}  # service -> ref -> slice
        self._addresses: dict[str, PodAddress] = {}

    # -- indexes ------------------------------------------------------------------------

    def _index_service(self, ref: str, service: Mapping[str, Any] | None) -> None:
        old = self._services.pop(ref, None)
        if old is not None:
            namespace = old["metadata"]["namespace"]
            for key, value in (old["spec"].get("selector") or {}).items():
                users = self._selecting.get((namespace, key, value), set())
                users.discard(ref)
                if not users:
                    self._selecting.pop((namespace, key, value), None)
        if service is not None:
            self._services[ref] = service
            namespace = service["metadata"]["namespace"]
            for key, value in (service["spec"].get("selector") or {}).items():
                self._selecting.setdefault((namespace, key, value), set()).add(ref)

    def _selecting_pod(self, pod: Mapping[str, Any] | None) -> set[str]:
        """The Services whose selector matches ``pod``'s labels."""
        if pod is None:
            return set()
        meta = pod["metadata"]
        labels = meta.get("labels") or {}
        candidates: set[str] = set()
        for key, value in labels.items():
            candidates |= self._selecting.get((meta["namespace"], key, value), set())
        return {
            ref
            for ref in candidates
            if selects(self._services[ref]["spec"].get("selector") or {}, labels)
        }

    def _index_slice(self, ref: str, slice_: Mapping[str, Any] | None) -> str | None:
        """Keep (or forget) one of its own slices; the Service it belonged to."""
        old = self._owned.pop(ref, None)
        owner = _owner(old) if old is not None else None
        if owner is not None:
            refs = self._owned_by_service.get(owner, set())
            refs.discard(ref)
            if not refs:
                self._owned_by_service.pop(owner, None)
        if slice_ is not None and _managed(slice_):
            self._owned[ref] = slice_
            new_owner = _owner(slice_)
            if new_owner is not None:
                self._owned_by_service.setdefault(new_owner, set()).add(ref)
        return owner

    # -- a pass -------------------------------------------------------------------------

    def sync(
        self,
        changes: Changes,
        *,
        addresses: Mapping[str, PodAddress],
        moved: Iterable[str] | None = None,
    ) -> ReconcileResult:
        """One pass. ``addresses``: every pod's published address; ``moved``: the
        pods (``namespace/name``) whose address may differ from the last pass, when
        the caller knows (otherwise every address is compared)."""
        dirty: set[str] = set()
        if changes.full:
            self._clear()
        for key in changes.gone("Service"):
            ref = _ref_of_key(key)
            self._index_service(ref, None)
            dirty.add(ref)
        for service in changes.of("Service").values():
            ref = _ref(service)
            self._index_service(ref, service)
            dirty.add(ref)
        for key in changes.gone("Pod"):
            dirty |= self._selecting_pod(self._pods.remove(_ref_of_key(key)))
        for pod in changes.of("Pod").values():
            dirty |= self._selecting_pod(self._pods.get(_ref(pod)))
            self._pods.add(pod)
            dirty |= self._selecting_pod(pod)
        if moved is None or changes.full:
            moved = self._addresses.keys() ^ addresses.keys() | {
                ref for ref, address in addresses.items() if self._addresses.get(ref) != address
            }
        for ref in moved:
            if self._addresses.get(ref) != addresses.get(ref):
                dirty |= self._selecting_pod(self._pods.get(ref))
        self._addresses = dict(addresses)
        for key in changes.gone("EndpointSlice"):
            ref = _ref_of_key(key)
            owner = self._index_slice(ref, None)
            if owner is not None:
                dirty.add(owner)  # deleted by someone else: put back if still wanted
        for slice_ in changes.of("EndpointSlice").values():
            ref = _ref(slice_)
            before = self._index_slice(ref, slice_)
            owner = _owner(slice_) if _managed(slice_) else None
            for owner_ref in {before, owner} - {None}:
                assert owner_ref is not None
                if without_server_fields(slice_) != self._desired.get(owner_ref, {}).get(ref):
                    dirty.add(owner_ref)  # not as this controller left it
        if changes.full:
            dirty |= set(self._owned_by_service)
        return self._reconcile(dirty)

    def _reconcile(self, services: set[str]) -> ReconcileResult:
        result = ReconcileResult(services_recomputed=len(services))
        writes: list[dict[str, Any]] = []
        gone: list[Mapping[str, Any]] = []
        for service_ref in sorted(services):
            service = self._services.get(service_ref)
            wanted = {
                _ref(s): s
                for s in (
                    _desired_for(service, self._pods, self._addresses, max_endpoints=self._max)
                    if service is not None
                    else []
                )
            }
            if wanted:
                self._desired[service_ref] = wanted
            else:
                self._desired.pop(service_ref, None)
            owned = self._owned_by_service.get(service_ref, set())
            for ref, desired in sorted(wanted.items()):
                current = self._owned.get(ref)
                if current is None:
                    result.created.append(ref)
                    writes.append(desired)
                elif without_server_fields(current) != desired:
                    result.updated.append(ref)
                    writes.append(desired)
            gone += [self._owned[ref] for ref in sorted(owned) if ref not in wanted]
        for batch in _batches(writes):
            self._objects.apply(batch)
            for slice_ in batch:
                self._index_slice(_ref(slice_), slice_)
                result.written[_key(slice_)] = slice_
        for doomed in _batches(gone):
            self._objects.delete(self._objects.refs_of(doomed), ignore_missing=True)
            for old in doomed:
                self._index_slice(_ref(old), None)
                result.deleted.append(_ref(old))
                result.removed.add(_key(old))
        return result


def _key(slice_: Mapping[str, Any]) -> str:
    meta = slice_["metadata"]
    return object_key(KINDS["EndpointSlice"], name=meta["name"], namespace=meta["namespace"])


def reconcile(
    objects: ObjectStore,
    *,
    addresses: Mapping[str, PodAddress],
    max_endpoints: int = MAX_ENDPOINTS_PER_SLICE,
) -> ReconcileResult:
    """One full pass: the slices the controller owns made equal to
    :func:`desired_slices` (created, rewritten where they differ, deleted where no
    longer wanted: a Service gone, without a selector or of type ExternalName).
    Slices it does not own are left alone. A write racing another writer is put
    right by the next pass."""
    changes = Changes(full=True)
    for kind in ("Service", "Pod", "EndpointSlice"):
        changes.changed[kind] = {
            object_key(
                KINDS[kind], name=o["metadata"]["name"], namespace=o["metadata"]["namespace"]
            ): o
            for o in objects.list(KINDS[kind])
        }
    controller = SliceController(objects, max_endpoints=max_endpoints)
    return controller.sync(changes, addresses=addresses)


def _batches(items: Sequence[_T]) -> list[list[_T]]:
    return [list(items[i : i + _WRITE_BATCH]) for i in range(0, len(items), _WRITE_BATCH)]
