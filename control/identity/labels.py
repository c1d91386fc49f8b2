"""Labels as identities see them, and the labels a CNI invocation carries.

``security_labels`` is the label set a pod's identity comes from (Cilium's
security-relevant labels); ``labels_from_cni`` is what a CNI call alone carries.

Label keys carry their source as a prefix (``k8s:``, ``reserved:``), as in Cilium.
Nothing here touches the store: the CNI handler parses labels without knowing where
identities are kept.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = [
    "K8S_SOURCE",
    "NAMESPACE_LABEL",
    "NAMESPACE_LABELS_PREFIX",
    "POD_NAME_LABEL",
    "RESERVED_SOURCE",
    "CniArgsError",
    "IdentityError",
    "IdentityLabelsError",
    "Labels",
    "labels_from_cni",
    "pod_from_cni_args",
    "security_labels",
]

Labels = Mapping[str, str]

K8S_SOURCE = "k8s:"
RESERVED_SOURCE = "reserved:"
NAMESPACE_LABEL = "k8s:io.kubernetes.pod.namespace"
# Cilium's form of a namespace's labels among its pods' identity labels.
NAMESPACE_LABELS_PREFIX = "k8s:io.cilium.k8s.namespace.labels."
POD_NAME_LABEL = "k8s:io.kubernetes.pod.name"

# Kubernetes name rules: namespaces are DNS-1123 labels, pod names DNS-1123 subdomains.
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")


class IdentityError(Exception):
    """Base class for every identity error."""


class IdentityLabelsError(IdentityError, ValueError):
    """A label set cannot be given an identity (empty, wrong types, reserved labels)."""


class CniArgsError(IdentityLabelsError):
    """CNI_ARGS or the netconf labels do not parse; the message says where."""


def labels_from_cni(*, cni_args: str, netconf_labels: Mapping[str, str] | None) -> dict[str, str]:
    """The identity labels of a pod from a CNI invocation.

    ``cni_args`` is the ``CNI_ARGS`` environment value (``K=V;K2=V2``); its
    ``K8S_POD_NAMESPACE`` and ``K8S_POD_NAME`` become ``k8s:io.kubernetes.pod.namespace``
    and ``k8s:io.kubernetes.pod.name`` (a namespace needs a pod name; a pod name alone,
    as podman sends it, is fine); every other key
    (``IgnoreUnknown``, ``K8S_POD_UID``, ...) is ignored. ``netconf_labels`` (the
    netconf's ``args.cni.labels``) are added with their keys prefixed ``k8s:`` unless
    they already are. Unlike Cilium, the pod name is part of the label set (so each pod
    gets its own identity), as this project's design asks.
    """
    args = _parse_cni_args(cni_args)
    labels: dict[str, str] = {}
    namespace, name = args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME")
    if namespace is not None and name is None:
        raise CniArgsError("CNI_ARGS has K8S_POD_NAMESPACE but no K8S_POD_NAME; give both")
    if namespace is not None:
        if not _DNS_LABEL.fullmatch(namespace):
            raise CniArgsError(
                f"K8S_POD_NAMESPACE {namespace!r} is not a Kubernetes namespace name"
            )
        labels[NAMESPACE_LABEL] = namespace
    if name is not None:
        if len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
            raise CniArgsError(f"K8S_POD_NAME {name!r} is not a Kubernetes pod name")
        labels[POD_NAME_LABEL] = name
    _add_netconf_labels(labels, netconf_labels, against="CNI_ARGS")
    return labels


def _add_netconf_labels(
    labels: dict[str, str], netconf_labels: Mapping[str, str] | None, *, against: str
) -> None:
    """Add the netconf's ``args.cni.labels`` to ``labels`` with the ``k8s:`` source;
    a contradiction with what is there (from ``against``) is an error."""
    for key, value in (netconf_labels or {}).items():
        if not isinstance(key, str) or not key.strip() or not isinstance(value, str):
            raise CniArgsError(
                f"netconf args.cni.labels must map non-empty strings to strings, "
                f"not {key!r}: {value!r}"
            )
        if key.startswith(RESERVED_SOURCE):
            raise CniArgsError(f"netconf label {key!r} uses the reserved source; it is the agent's")
        canonical = key if key.startswith(K8S_SOURCE) else f"{K8S_SOURCE}{key}"
        if canonical == K8S_SOURCE:
            raise CniArgsError("netconf label 'k8s:' has no name after the source prefix")
        if labels.get(canonical, value) != value:
            raise CniArgsError(
                f"netconf label {key!r}={value!r} contradicts {against} ({labels[canonical]!r})"
            )
        labels[canonical] = value


def security_labels(
    *,
    namespace: str | None,
    pod_labels: Mapping[str, str] | None = None,
    namespace_labels: Mapping[str, str] | None = None,
    netconf_labels: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The security-relevant labels of a pod, the label set its identity is derived from.

    As Cilium derives them: the pod's labels (``k8s:<key>``), its namespace
    (``k8s:io.kubernetes.pod.namespace``) and its namespace's labels
    (``k8s:io.cilium.k8s.namespace.labels.<key>``), plus the netconf's
    ``args.cni.labels``. Never the pod's name or container ID, so pods with equal labels
    share one identity and a pod keeps its identity across restarts. Pure: the same
    inputs always give the same labels.
    """
    labels: dict[str, str] = {}
    if namespace is not None:
        labels[NAMESPACE_LABEL] = namespace
    for key, value in (namespace_labels or {}).items():
        labels[f"{NAMESPACE_LABELS_PREFIX}{key}"] = value
    for key, value in (pod_labels or {}).items():
        canonical = f"{K8S_SOURCE}{key}"
        if canonical in labels and labels[canonical] != value:
            raise IdentityLabelsError(
                f"pod label {key!r} would overwrite the namespace label {canonical!r}"
            )
        labels[canonical] = value
    _add_netconf_labels(labels, netconf_labels, against="the Pod object's labels")
    return labels


def pod_from_cni_args(cni_args: str) -> tuple[str | None, str | None]:
    """``(K8S_POD_NAMESPACE, K8S_POD_NAME)`` from ``CNI_ARGS`` (``None`` when absent):
    what ties an endpoint to its ``Pod`` object."""
    args = _parse_cni_args(cni_args)
    return args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME")


def _parse_cni_args(cni_args: str) -> dict[str, str]:
    """``K=V;K2=V2`` as libcni reads it: exactly one ``=`` per pair; empty pairs (a
    trailing ``;``) are skipped."""
    if not isinstance(cni_args, str):
        raise CniArgsError(f"CNI_ARGS must be a string, not {type(cni_args).__name__}")
    args: dict[str, str] = {}
    for position, pair in enumerate(cni_args.split(";"), start=1):
        if not pair.strip():
            continue
        key, sep, value = pair.partition("=")
        if not sep or "=" in value or not key.strip():
            raise CniArgsError(
                f"CNI_ARGS pair {position} ({pair!r}) is not KEY=VALUE; expected "
                "'K8S_POD_NAMESPACE=ns;K8S_POD_NAME=pod;...'"
            )
        key = key.strip()
        if args.get(key, value) != value:
            raise CniArgsError(f"CNI_ARGS gives {key} twice with different values")
        args[key] = value
    return args
