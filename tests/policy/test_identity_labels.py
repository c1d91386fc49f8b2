"""Identities come from security-relevant labels only: pod labels, the namespace and
its labels, the netconf's labels; never the pod's name, so equal pods share one."""

from __future__ import annotations

import pytest

from ciliate.control.identity.labels import (
    CniArgsError,
    IdentityLabelsError,
    labels_from_cni,
    pod_from_cni_args,
    security_labels,
)


def test_labels_are_cilium_shaped_and_name_free() -> None:
    labels = security_labels(
        namespace="x",
        pod_labels={"pod": "a", "app.kubernetes.io/name": "web"},
        namespace_labels={"kubernetes.io/metadata.name": "x", "team": "blue"},
        netconf_labels={"tier": "front"},
    )
    assert labels == {
        "k8s:io.kubernetes.pod.namespace": "x",
        "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name": "x",
        "k8s:io.cilium.k8s.namespace.labels.team": "blue",
        "k8s:pod": "a",
        "k8s:app.kubernetes.io/name": "web",
        "k8s:tier": "front",
    }
    assert "k8s:io.kubernetes.pod.name" not in labels


def test_two_pods_with_equal_labels_get_equal_label_sets() -> None:
    def of(_pod_name: str) -> dict[str, str]:
        return security_labels(namespace="x", pod_labels={"app": "web"}, namespace_labels={})

    assert of("web-1") == of("web-2")


def test_a_netconf_label_may_not_contradict_the_pod_object() -> None:
    with pytest.raises(CniArgsError, match="contradicts the Pod object's labels"):
        security_labels(namespace="x", pod_labels={"app": "a"}, netconf_labels={"app": "b"})


def test_a_pod_label_may_not_pose_as_a_namespace_label() -> None:
    with pytest.raises(IdentityLabelsError, match="overwrite the namespace label"):
        security_labels(namespace="x", pod_labels={"io.kubernetes.pod.namespace": "y"})


def test_cni_args_name_the_pod_object_and_labels_from_cni_still_work() -> None:
    args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME=a"
    assert pod_from_cni_args(args) == ("x", "a")
    assert pod_from_cni_args("IgnoreUnknown=1") == (None, None)
    assert labels_from_cni(cni_args=args, netconf_labels={"app": "w"}) == {
        "k8s:io.kubernetes.pod.namespace": "x",
        "k8s:io.kubernetes.pod.name": "a",
        "k8s:app": "w",
    }
