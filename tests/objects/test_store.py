"""apply/get/list/delete keep objects in a store as the API server keeps them:
all-or-nothing applies, resourceVersion and generation, namespaces that must exist,
cascading namespace deletion."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ciliate.control.objects import (
    KINDS,
    NamespaceNotFoundError,
    ObjectInvalidError,
    ObjectNotFoundError,
    ObjectStore,
    load_documents,
)
from ciliate.control.store import SqliteStore

MANIFEST = """
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {team: blue}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {pod: a}}
spec:
  containers:
  - name: c
    ports: [{containerPort: 80, name: serve-80-tcp}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: x}
spec: {podSelector: {}}
"""


@pytest.fixture
def objects(tmp_path: Path) -> Iterator[ObjectStore]:
    with SqliteStore(tmp_path / "state.db") as store:
        yield ObjectStore(store)


def test_apply_creates_then_reports_unchanged_then_configured(objects: ObjectStore) -> None:
    documents = load_documents(MANIFEST)
    assert [str(r) for r in objects.apply(documents)] == [
        "namespace/x created",
        "pod/a created",
        "networkpolicy.networking.k8s.io/deny created",
    ]
    assert [r.action for r in objects.apply(documents)] == ["unchanged"] * 3
    documents[2]["spec"]["policyTypes"] = ["Ingress", "Egress"]
    assert [r.action for r in objects.apply(documents)] == ["unchanged", "unchanged", "configured"]


def test_resource_version_orders_writes_and_generation_follows_the_spec(
    objects: ObjectStore,
) -> None:
    documents = load_documents(MANIFEST)
    objects.apply(documents)
    pod = objects.get(KINDS["Pod"], name="a", namespace="x")
    assert pod["metadata"]["generation"] == 1 and pod["metadata"]["uid"]
    documents[1]["metadata"]["labels"] = {"pod": "b"}  # metadata only: same generation
    objects.apply(documents[1:2])
    relabelled = objects.get(KINDS["Pod"], name="a", namespace="x")
    assert int(relabelled["metadata"]["resourceVersion"]) > int(pod["metadata"]["resourceVersion"])
    assert relabelled["metadata"]["generation"] == 1
    assert relabelled["metadata"]["uid"] == pod["metadata"]["uid"]
    documents[1]["spec"]["containers"][0]["ports"][0]["containerPort"] = 8080
    objects.apply(documents[1:2])
    assert objects.get(KINDS["Pod"], name="a", namespace="x")["metadata"]["generation"] == 2


def test_an_invalid_document_writes_nothing(objects: ObjectStore) -> None:
    documents = load_documents(MANIFEST)
    documents[2]["spec"]["ingress"] = [{"ports": [{"port": 0}]}]
    with pytest.raises(ObjectInvalidError, match=r"spec.ingress\[0\].ports\[0\].port"):
        objects.apply(documents)
    assert objects.list(KINDS["Namespace"]) == []


def test_a_namespaced_object_needs_its_namespace(objects: ObjectStore) -> None:
    pod = load_documents(MANIFEST)[1]
    with pytest.raises(NamespaceNotFoundError, match='namespaces "x" not found'):
        objects.apply([pod])
    pod["metadata"]["namespace"] = "default"  # always there, as in Kubernetes
    assert [str(r) for r in objects.apply([pod])] == ["namespace/default created", "pod/a created"][
        1:
    ]
    assert objects.get(KINDS["Namespace"], name="default")["metadata"]["labels"] == {
        "kubernetes.io/metadata.name": "default"
    }


def test_list_filters_by_namespace_and_delete_cascades_from_the_namespace(
    objects: ObjectStore,
) -> None:
    objects.apply(load_documents(MANIFEST))
    other: list[dict[str, Any]] = load_documents(MANIFEST.replace("x", "y"))
    objects.apply(other)
    assert [p["metadata"]["namespace"] for p in objects.list(KINDS["Pod"])] == ["x", "y"]
    assert [p["metadata"]["namespace"] for p in objects.list(KINDS["Pod"], namespace="y")] == ["y"]
    refs = objects.refs_of(load_documents(MANIFEST)[:1])
    assert [str(r) for r in objects.delete(refs)] == ["namespace/x deleted"]
    assert [p["metadata"]["namespace"] for p in objects.list(KINDS["Pod"])] == ["y"]
    assert objects.list(KINDS["NetworkPolicy"], namespace="x") == []


def test_deleting_a_missing_object_is_an_error_unless_ignored(objects: ObjectStore) -> None:
    refs = objects.refs_of(load_documents(MANIFEST)[:1])
    with pytest.raises(ObjectNotFoundError, match='namespace "x" not found'):
        objects.delete(refs)
    assert objects.delete(refs, ignore_missing=True) == []
