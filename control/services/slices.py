"""The EndpointSlice controller, with Kubernetes' semantics
(``pkg/controller/endpointslice``).

For every Service with a selector, the Pods of its namespace whose labels hold the
selector become endpoints of slices the controller owns:

* the address of a pod is its endpoint's, as the agents publish it (locally the
  agent's endpoint records, in a cluster ``cluster/endpoints/<ip>`` with ``pod`` and
  ``node``); a Pod object's ``status.podIP`` is the fallback; a pod with neither,
  or in phase ``Succeeded``/``Failed``, is left out;
* conditions as the controller sets them: ``serving`` = the pod is ready (a Pod
  whose ``Ready`` condition is ``False`` is not; one without conditions is, since
  ciliate's pods are running once they have an endpoint), ``terminating`` = the pod
  has ``metadata.deletionTimestamp``, ``ready`` = serving and not terminating, or
  always with ``publishNotReadyAddresses``;
* ports: each service port's ``targetPort``, a name resolved against the pod's
  container ports of that protocol (a pod without that name leaves the port out);
  pods are grouped by their resolved ports, one set of slices per port mapping;
* at most 100 endpoints a slice (``--max-endpoints-per-slice``); slices carry
  ``kubernetes.io/service-name``, ``endpointslice.kubernetes.io/managed-by:
  endpointslice-controller.ciliate.io``, the Service's own labels and an owner
  reference to it.

Slices of a Service without a selector are the user's and never touched. Slice
names are derived from the service and the port mapping (not random, as
Kubernetes' are), so the desired state is a pure function and a reconcile writes
only the difference.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ciliate.control.objects import KINDS, ObjectStore
from ciliate.control.objects.service_validation import SERVICE_NAME_LABEL

__all__ = [
    "MANAGED_BY",
    "MANAGED_BY_LABEL",
    "MAX_ENDPOINTS_PER_SLICE",
    "PodAddress",
    "ReconcileResult",
    "desired_slices",
    "pod_address_from_published",
    "reconcile",
    "resolve_target_port",
    "selects",
]

MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY = "endpointslice-controller.ciliate.io"
HEADLESS_LABEL = "service.kubernetes.io/headless"
MAX_ENDPOINTS_PER_SLICE = 100
_WRITE_BATCH = 20  # objects per apply: an etcd transaction holds at most 128 operations
_SERVER_FIELDS = ("uid", "resourceVersion", "generation", "creationTimestamp")


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
    """The pod's port a service port reaches (``podutil.FindPort``): a number as it
    is, a name looked up in the pod's container ports of the same protocol."""
    target = service_port.get("targetPort", service_port.get("port"))
    if isinstance(target, int):
        return target
    for container in pod.get("spec", {}).get("containers", []):
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
    index = _PodIndex(pods)
    slices = []
    for service in services:
        selector = service["spec"].get("selector") or {}
        if not selector:
            continue  # the user's slices serve it
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
        slices += _service_slices(service, groups, max_endpoints=max_endpoints)
    return slices


class _PodIndex:
    """Pods by namespace and by label, so a selector costs the pods that carry its
    rarest label, not every pod of the namespace (10,000 Services over 30,000 pods
    would otherwise be 300 million label checks)."""

    def __init__(self, pods: Iterable[Mapping[str, Any]]) -> None:
        self._pods: list[Mapping[str, Any]] = []
        self._by_label: dict[tuple[str, str, str], list[int]] = {}
        for position, pod in enumerate(pods):
            self._pods.append(pod)
            meta = pod["metadata"]
            for key, value in (meta.get("labels") or {}).items():
                self._by_label.setdefault((meta["namespace"], key, value), []).append(position)

    def selected(self, namespace: str, selector: Mapping[str, str]) -> list[Mapping[str, Any]]:
        """The pods of ``namespace`` the selector matches, in the order given."""
        candidates = min(
            (self._by_label.get((namespace, k, v), []) for k, v in selector.items()), key=len
        )
        return [
            self._pods[i]
            for i in candidates
            if selects(selector, self._pods[i]["metadata"].get("labels") or {})
        ]


def _address_of(pod: Mapping[str, Any], addresses: Mapping[str, PodAddress]) -> PodAddress | None:
    meta = pod["metadata"]
    found = addresses.get(f"{meta['namespace']}/{meta['name']}")
    if found is not None:
        return found
    text = pod.get("status", {}).get("podIP")
    if not text:
        return None
    ip = ipaddress.ip_address(text)
    return PodAddress(ip) if isinstance(ip, ipaddress.IPv4Address) else None


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

    @property
    def changed(self) -> bool:
        return bool(self.created or self.updated or self.deleted)


def _comparable(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in obj["metadata"].items() if k not in _SERVER_FIELDS}
    return {**obj, "metadata": meta}


def _ref(obj: Mapping[str, Any]) -> str:
    return f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"


def reconcile(
    objects: ObjectStore,
    *,
    addresses: Mapping[str, PodAddress],
    max_endpoints: int = MAX_ENDPOINTS_PER_SLICE,
) -> ReconcileResult:
    """One pass: the slices the controller owns made equal to :func:`desired_slices`
    (created, rewritten where they differ, deleted where no longer wanted: a
    Service gone or without a selector). Slices it does not own are left alone. A
    write racing another writer is put right by the next pass."""
    wanted = desired_slices(
        services=objects.list(KINDS["Service"]),
        pods=objects.list(KINDS["Pod"]),
        addresses=addresses,
        max_endpoints=max_endpoints,
    )
    # The controller writes slices in the form validation keeps them (the tests hold
    # it to that), so the stored ones compare as they are; apply validates anyway.
    wanted_by_ref = {_ref(s): s for s in wanted}
    owned = {
        _ref(s): s
        for s in objects.list(KINDS["EndpointSlice"])
        if (s["metadata"].get("labels") or {}).get(MANAGED_BY_LABEL) == MANAGED_BY
    }
    result = ReconcileResult()
    writes: list[dict[str, Any]] = []
    for ref, desired in sorted(wanted_by_ref.items()):
        current = owned.get(ref)
        if current is None:
            result.created.append(ref)
            writes.append(desired)
        elif _comparable(current) != desired:
            result.updated.append(ref)
            writes.append(desired)
    gone = [owned[ref] for ref in sorted(owned) if ref not in wanted_by_ref]
    result.deleted = [_ref(s) for s in gone]
    for batch in _batches(writes):
        objects.apply(batch)
    for batch in _batches(gone):
        objects.delete(objects.refs_of(batch), ignore_missing=True)
    return result


def _batches(items: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    return [list(items[i : i + _WRITE_BATCH]) for i in range(0, len(items), _WRITE_BATCH)]
