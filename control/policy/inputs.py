"""The engine's input from stored objects: Pods (labels, container ports,
``status.podIP``), Namespaces (labels) and the policy objects.

Identities come from the caller (the agent's allocator, by the pods' security
labels); without one, each distinct label set gets a stand-in number from 256 up in
label order, which is all a trace needs (numbers only have to be consistent)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ciliate.control.identity.labels import security_labels
from ciliate.control.policy.engine import PolicyInput
from ciliate.control.policy.model import PROTOCOL_NUMBERS, ContainerPort, PodEndpoint

__all__ = ["POLICY_KINDS", "input_from_objects", "pod_labels", "pod_ports"]

POLICY_KINDS = ("NetworkPolicy", "CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy")
FIRST_STAND_IN_IDENTITY = 256

IdentityOf = Callable[[Mapping[str, str]], int]


def pod_labels(
    pod: Mapping[str, Any], namespaces: Mapping[str, Mapping[str, str]]
) -> dict[str, str]:
    """A Pod object's security labels (its namespace's labels from ``namespaces``)."""
    meta = pod["metadata"]
    namespace = meta["namespace"]
    ns_labels = namespaces.get(namespace, {"kubernetes.io/metadata.name": namespace})
    return security_labels(
        namespace=namespace, pod_labels=meta.get("labels") or {}, namespace_labels=ns_labels
    )


def pod_ports(pod: Mapping[str, Any]) -> tuple[ContainerPort, ...]:
    """A Pod object's named container ports (what named policy ports resolve to)."""
    return tuple(
        ContainerPort(port["name"], port["containerPort"], PROTOCOL_NUMBERS[port["protocol"]])
        for container in pod.get("spec", {}).get("containers", [])
        for port in container.get("ports", [])
        if port.get("name")
    )


def input_from_objects(
    objects: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    identity_of: IdentityOf | None = None,
    pod_ips: Mapping[str, ipaddress.IPv4Address] | None = None,
    node_identities: Mapping[ipaddress.IPv4Address, int] | None = None,
) -> PolicyInput:
    """``objects`` by kind name (``ObjectStore.snapshot()``); ``pod_ips`` by
    ``namespace/name`` win over ``status.podIP``."""
    namespaces = {
        ns["metadata"]["name"]: ns["metadata"].get("labels") or {}
        for ns in objects.get("Namespace", [])
    }
    labelled = [(pod, pod_labels(pod, namespaces)) for pod in objects.get("Pod", [])]
    if identity_of is None:
        identity_of = _stand_in_identities([labels for _, labels in labelled])
    pods = []
    for pod, labels in labelled:
        meta = pod["metadata"]
        ref = f"{meta['namespace']}/{meta['name']}"
        ip = (pod_ips or {}).get(ref)
        if ip is None and (status_ip := pod.get("status", {}).get("podIP")):
            address = ipaddress.ip_address(status_ip)
            ip = address if isinstance(address, ipaddress.IPv4Address) else None
        pods.append(
            PodEndpoint(
                namespace=meta["namespace"],
                name=meta["name"],
                identity=identity_of(labels),
                labels=labels,
                ip=ip,
                ports=pod_ports(pod),
            )
        )
    policies = [obj for kind in POLICY_KINDS for obj in objects.get(kind, [])]
    return PolicyInput(pods=pods, policies=policies, node_identities=dict(node_identities or {}))


def _stand_in_identities(label_sets: Sequence[Mapping[str, str]]) -> IdentityOf:
    ordered = sorted({tuple(sorted(labels.items())) for labels in label_sets})
    numbers = {key: FIRST_STAND_IN_IDENTITY + i for i, key in enumerate(ordered)}
    return lambda labels: numbers[tuple(sorted(labels.items()))]
