"""Apply of an existing object is an update, as the API server's: immutable fields are
refused, a Service's type change gives back and takes ClusterIPs and NodePorts, a
taken address is refused naming the field, and any failure - a taken port, a full
range, an invalid document later in a List - leaves the store exactly as it was (no
allocation leaked), with a real SQLite store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ciliate.control.objects import (
    KINDS,
    ForbiddenError,
    ObjectInvalidError,
    ObjectNotFoundError,
    ObjectRef,
    ObjectStore,
    RangeFullError,
    configure_service_range,
)
from ciliate.control.store import SqliteStore, Store

from ..cluster import etcd_fixtures

require_etcd = etcd_fixtures.require_etcd
etcd_server = etcd_fixtures.etcd_server
store_factory = etcd_fixtures.store_factory

SERVICE = KINDS["Service"]


@pytest.fixture(params=["sqlite", "etcd"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The node's SQLite store and a real etcd (under a prefix of the test's own): the
    same transactions, the same rollbacks."""
    if request.param == "etcd":
        make = request.getfixturevalue("store_factory")
        yield make()
        return
    with SqliteStore(tmp_path / "state.db") as opened:
        yield opened


@pytest.fixture
def objects(store: Store) -> ObjectStore:
    return ObjectStore(store)


def service(name: str = "web", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"ports": [{"port": 80}], "selector": {"app": name}}
    body.update(spec)
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": body}


def node_port(number: int, **spec: Any) -> dict[str, Any]:
    return {"type": "NodePort", "ports": [{"port": 80, "nodePort": number}], **spec}


def everything(store: Store) -> dict[str, bytes]:
    """Every key and value: what must not change when an apply fails."""
    return dict(store.list(""))


def field_errors(exc: ObjectInvalidError) -> list[str]:
    return [str(e) for e in exc.errors]


def stored_spec(objects: ObjectStore, name: str = "web") -> dict[str, Any]:
    spec: dict[str, Any] = objects.get(SERVICE, name=name)["spec"]
    return spec


# -- immutability --------------------------------------------------------------------


def test_a_cluster_ip_may_not_change_and_the_refusal_changes_nothing(
    objects: ObjectStore, store: Store
) -> None:
    objects.apply([service(clusterIP="10.96.0.10")])
    before = everything(store)
    with pytest.raises(ObjectInvalidError) as info:
        objects.apply([service(clusterIP="10.96.0.11")])
    assert field_errors(info.value) == [
        'spec.clusterIPs[0]: Invalid value: ["10.96.0.11"]: may not change once set'
    ]
    assert everything(store) == before


def test_a_manifest_without_cluster_ip_keeps_the_allocated_one(objects: ObjectStore) -> None:
    objects.apply([service()])
    first = stored_spec(objects)["clusterIP"]
    objects.apply([service(ports=[{"port": 8080}])])
    assert stored_spec(objects)["clusterIP"] == first


def test_a_headless_service_may_not_become_a_cluster_ip_one(objects: ObjectStore) -> None:
    objects.apply([service(clusterIP="None")])
    with pytest.raises(ObjectInvalidError, match=r"spec.clusterIPs\[0\]: .*may not change"):
        objects.apply([service(clusterIP="10.96.0.12")])


# -- taken addresses and ports ------------------------------------------------------------


def test_a_taken_cluster_ip_is_refused_naming_the_field(objects: ObjectStore) -> None:
    objects.apply([service("dns", clusterIP="10.96.0.10")])
    with pytest.raises(ObjectInvalidError) as info:
        objects.apply([service(clusterIP="10.96.0.10")])
    assert field_errors(info.value) == [
        'spec.clusterIPs: Invalid value: ["10.96.0.10"]: failed to allocate IP 10.96.0.10:'
        " provided IP is already allocated"
    ]


def test_a_taken_node_port_is_refused_naming_the_field(objects: ObjectStore) -> None:
    objects.apply([service("first", **node_port(30080))])
    with pytest.raises(ObjectInvalidError) as info:
        objects.apply([service(**node_port(30080))])
    assert field_errors(info.value) == [
        "spec.ports[0].nodePort: Invalid value: 30080: provided port is already allocated"
    ]
    with pytest.raises(ObjectNotFoundError):
        objects.get(SERVICE, name="web")


def test_deleting_a_service_frees_its_cluster_ip_and_node_port(objects: ObjectStore) -> None:
    objects.apply([service("first", clusterIP="10.96.0.20", **node_port(30081))])
    objects.delete([ObjectRef(SERVICE, name="first", namespace="default")])
    objects.apply([service(clusterIP="10.96.0.20", **node_port(30081))])
    assert stored_spec(objects)["clusterIP"] == "10.96.0.20"
    assert stored_spec(objects)["ports"][0]["nodePort"] == 30081


# -- type changes ----------------------------------------------------------------------


def test_node_port_to_cluster_ip_gives_the_node_port_back(objects: ObjectStore) -> None:
    objects.apply([service(**node_port(30082))])
    cluster_ip = stored_spec(objects)["clusterIP"]
    objects.apply([service()])
    assert "nodePort" not in stored_spec(objects)["ports"][0]
    assert stored_spec(objects)["clusterIP"] == cluster_ip  # the address is kept
    objects.apply([service("other", **node_port(30082))])  # and the port is free again


def test_cluster_ip_to_node_port_allocates_a_node_port(objects: ObjectStore) -> None:
    objects.apply([service()])
    objects.apply([service(type="NodePort")])
    assert 30000 <= stored_spec(objects)["ports"][0]["nodePort"] <= 32767
    assert stored_spec(objects)["externalTrafficPolicy"] == "Cluster"


def test_to_external_name_gives_the_cluster_ip_back_and_from_it_allocates_anew(
    objects: ObjectStore,
) -> None:
    objects.apply([service(clusterIP="10.96.0.30", **node_port(30083))])
    objects.apply([service(type="ExternalName", externalName="db.example.com", ports=[])])
    spec = stored_spec(objects)
    assert spec["clusterIP"] == "" and spec["clusterIPs"] == []
    # Both are free: another Service may ask for them.
    objects.apply([service("other", clusterIP="10.96.0.30", **node_port(30083))])
    # Back to ClusterIP (a change from ExternalName may bring any address): a new one.
    objects.apply([service(clusterIP="10.96.0.31")])
    assert stored_spec(objects)["clusterIP"] == "10.96.0.31"


def test_a_failed_type_change_rolls_back_every_allocation(
    objects: ObjectStore, store: Store
) -> None:
    objects.apply([service("holder", **node_port(30084))])
    objects.apply([service()])
    before = everything(store)
    # Two ports: the first would get a new NodePort, the second asks for a taken one.
    change = service(
        type="NodePort",
        ports=[{"name": "a", "port": 80}, {"name": "b", "port": 81, "nodePort": 30084}],
    )
    with pytest.raises(ObjectInvalidError) as info:
        objects.apply([change])
    assert field_errors(info.value) == [
        "spec.ports[1].nodePort: Invalid value: 30084: provided port is already allocated"
    ]
    assert everything(store) == before
    assert stored_spec(objects)["type"] == "ClusterIP"


# -- Lists that fail half way --------------------------------------------------------------


def test_a_list_failing_on_its_last_item_stores_and_allocates_nothing(
    objects: ObjectStore, store: Store
) -> None:
    before = everything(store)
    first = service("a", clusterIP="10.96.0.40", **node_port(30090))
    second = service("b", clusterIP="10.96.0.41")
    clash = service("c", **node_port(30090))  # the port the first one took in this apply
    with pytest.raises(ObjectInvalidError, match=r"spec.ports\[0\].nodePort: .*already allocated"):
        objects.apply([first, second, clash])
    assert everything(store) == before
    # Nothing leaked: the same addresses and port are there for the asking.
    objects.apply([first, second])
    assert stored_spec(objects, "a")["ports"][0]["nodePort"] == 30090


def test_a_list_that_runs_the_range_out_rolls_back_what_it_took(store: Store) -> None:
    configure_service_range(store, "10.100.0.0/29")  # 6 usable addresses, the first reserved
    objects = ObjectStore(store)
    objects.apply([service(f"s{i}") for i in range(4)])
    before = everything(store)
    with pytest.raises(RangeFullError, match="range is full"):
        objects.apply([service("s4"), service("s5")])
    assert everything(store) == before
    objects.apply([service("s4")])  # the address the failed List took is free again
    with pytest.raises(RangeFullError):
        objects.apply([service("s5")])


def test_an_invalid_document_anywhere_in_a_list_stores_nothing(
    objects: ObjectStore, store: Store
) -> None:
    before = everything(store)
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}}
    bad = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "p", "namespace": "x"},
        "spec": {"policyTypes": ["Sideways"]},
    }
    with pytest.raises(ObjectInvalidError, match=r"spec.policyTypes\[0\]"):
        objects.apply([namespace, service(**node_port(30091)), bad])
    assert everything(store) == before


# -- deletion ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["default", "kube-system", "kube-public"])
def test_the_immortal_namespaces_may_not_be_deleted(
    objects: ObjectStore, store: Store, name: str
) -> None:
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    objects.apply([namespace, {**service(), "metadata": {"name": "web", "namespace": name}}])
    before = everything(store)
    with pytest.raises(
        ForbiddenError, match=f'namespaces "{name}" is forbidden: this namespace may not be deleted'
    ):
        objects.delete([ObjectRef(KINDS["Namespace"], name=name)])
    assert everything(store) == before


def test_a_health_check_node_port_may_not_change_while_it_is_needed(
    objects: ObjectStore, store: Store
) -> None:
    local = {"type": "LoadBalancer", "externalTrafficPolicy": "Local"}
    objects.apply([service(**local, healthCheckNodePort=31500)])
    before = everything(store)
    with pytest.raises(ObjectInvalidError) as info:
        objects.apply([service(**local, healthCheckNodePort=31501)])
    assert field_errors(info.value) == ["spec.healthCheckNodePort: Forbidden: field is immutable"]
    assert everything(store) == before
    objects.apply([service(**local)])  # not given: kept
    assert stored_spec(objects)["healthCheckNodePort"] == 31500
    objects.apply([service(type="LoadBalancer")])  # no longer needed: given back
    assert "healthCheckNodePort" not in stored_spec(objects)
    objects.apply([service("other", **local, healthCheckNodePort=31500)])


def test_a_namespace_is_active_with_the_kubernetes_finalizer_and_keeps_them(
    objects: ObjectStore,
) -> None:
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "fin"}}
    objects.apply([namespace])
    stored = objects.get(KINDS["Namespace"], name="fin")
    assert stored["spec"] == {"finalizers": ["kubernetes"]}
    assert stored["status"] == {"phase": "Active"}
    # An apply changes metadata only: finalizers have their own subresource upstream.
    relabelled = {**namespace, "metadata": {"name": "fin", "labels": {"team": "a"}}}
    objects.apply([{**relabelled, "spec": {"finalizers": ["example.com/x"]}}])
    stored = objects.get(KINDS["Namespace"], name="fin")
    assert stored["spec"] == {"finalizers": ["kubernetes"]}
    assert stored["metadata"]["labels"]["team"] == "a"
