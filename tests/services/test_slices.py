"""The EndpointSlice controller, with Kubernetes' semantics: a Service's selector
picks the pods of its namespace, their published endpoint addresses (or
status.podIP), named target ports resolved per pod, ready/serving/terminating as
the upstream controller sets them, and a reconcile that writes only the
difference and leaves the user's slices alone."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ciliate.control.objects import KINDS, ObjectStore, validate
from ciliate.control.services.slices import (
    MANAGED_BY,
    MANAGED_BY_LABEL,
    PodAddress,
    desired_slices,
    pod_address_from_published,
    reconcile,
)
from ciliate.control.store import SqliteStore

from ..cluster import etcd_fixtures

require_etcd = etcd_fixtures.require_etcd
etcd_server = etcd_fixtures.etcd_server
store_factory = etcd_fixtures.store_factory

SLICE = KINDS["EndpointSlice"]


def pod(
    name: str,
    *,
    labels: dict[str, str] | None = None,
    namespace: str = "default",
    ip: str | None = None,
    ports: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {"app": "web"}},
        "spec": {"containers": [{"name": "c", "ports": ports or []}]},
    }
    if ip:
        obj["status"] = {"podIP": ip}
    for key, value in extra.items():
        if key in ("deletionTimestamp", "uid"):
            obj["metadata"][key] = value
        elif key in ("nodeName", "hostname", "subdomain"):
            obj["spec"][key] = value
        else:
            obj.setdefault("status", {})[key] = value
    return validate(obj)


def service(
    ports: list[dict[str, Any]], *, selector: dict[str, str] | None = None, **spec: Any
) -> dict[str, Any]:
    obj = validate(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "default", "labels": {"tier": "front"}},
            "spec": {"ports": ports, **({"selector": selector} if selector else {}), **spec},
        }
    )
    obj["metadata"]["uid"] = "svc-uid"
    return obj


WEB = {"app": "web"}
HTTP_NAMED = [{"name": "http", "port": 80, "targetPort": "http"}]
HTTP_PORT = {"name": "http", "containerPort": 8080}


def only(slices: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(slices) == 1, slices
    return slices[0]


def addresses_of(slice_: dict[str, Any]) -> list[str]:
    return [e["addresses"][0] for e in slice_["endpoints"]]


def test_a_selector_picks_the_pods_of_its_namespace_with_all_its_labels() -> None:
    pods = [
        pod("a", ip="10.0.0.1"),
        pod("b", ip="10.0.0.2", labels={"app": "web", "extra": "yes"}),
        pod("c", ip="10.0.0.3", labels={"app": "db"}),
        pod("d", ip="10.0.0.4", namespace="other"),
    ]
    slices = desired_slices(
        services=[service([{"port": 80}], selector=WEB)], pods=pods, addresses={}
    )
    got = only(slices)
    assert addresses_of(got) == ["10.0.0.1", "10.0.0.2"]
    assert got["ports"] == [{"name": "", "protocol": "TCP", "port": 80}]
    labels = got["metadata"]["labels"]
    assert labels["kubernetes.io/service-name"] == "web"
    assert labels[MANAGED_BY_LABEL] == MANAGED_BY
    assert labels["tier"] == "front"  # the Service's labels are copied, as upstream does
    assert got["metadata"]["ownerReferences"][0]["uid"] == "svc-uid"
    assert got["endpoints"][0]["targetRef"] == {
        "kind": "Pod",
        "namespace": "default",
        "name": "a",
        "uid": "",
    }
    assert validate(got) == got  # valid, and in the form the store keeps


def test_the_published_endpoint_wins_over_status_pod_ip_and_gives_the_node() -> None:
    pods = [pod("a", ip="10.0.0.1", nodeName="spec-node"), pod("b")]
    published = {
        "default/a": PodAddress(ipaddress.IPv4Address("10.79.0.5"), node="node-1"),
        "default/b": PodAddress(ipaddress.IPv4Address("10.79.1.7"), node="node-2"),
    }
    got = only(
        desired_slices(
            services=[service([{"port": 80}], selector=WEB)], pods=pods, addresses=published
        )
    )
    assert [(e["addresses"][0], e["nodeName"]) for e in got["endpoints"]] == [
        ("10.79.0.5", "node-1"),
        ("10.79.1.7", "node-2"),
    ]


def test_a_pod_without_an_address_or_finished_is_left_out() -> None:
    pods = [pod("a"), pod("b", ip="10.0.0.2", phase="Succeeded"), pod("c", ip="10.0.0.3")]
    got = only(
        desired_slices(services=[service([{"port": 80}], selector=WEB)], pods=pods, addresses={})
    )
    assert addresses_of(got) == ["10.0.0.3"]


def test_published_endpoint_documents_are_read_as_the_agents_write_them() -> None:
    assert pod_address_from_published("10.79.0.5", {"pod": "x/a", "node": "n1"}) == (
        "x/a",
        PodAddress(ipaddress.IPv4Address("10.79.0.5"), "n1"),
    )
    assert pod_address_from_published("10.79.0.5", {"identity": 300}) is None


def test_named_target_ports_resolve_per_pod_and_group_pods_by_port_mapping() -> None:
    pods = [
        pod("a", ip="10.0.0.1", ports=[HTTP_PORT]),
        pod("b", ip="10.0.0.2", ports=[{"name": "http", "containerPort": 9090}]),
        pod("c", ip="10.0.0.3", ports=[HTTP_PORT]),
        # A pod without the named port serves none of the service's ports.
        pod("d", ip="10.0.0.4", ports=[{"name": "metrics", "containerPort": 9100}]),
        # The name must be of the service port's protocol.
        pod("e", ip="10.0.0.5", ports=[{**HTTP_PORT, "protocol": "UDP"}]),
    ]
    slices = desired_slices(services=[service(HTTP_NAMED, selector=WEB)], pods=pods, addresses={})
    by_port = {tuple(p["port"] for p in s["ports"]): addresses_of(s) for s in slices}
    assert by_port == {
        (8080,): ["10.0.0.1", "10.0.0.3"],
        (9090,): ["10.0.0.2"],
        (): ["10.0.0.4", "10.0.0.5"],
    }
    assert len({s["metadata"]["name"] for s in slices}) == 3
    assert all(validate(s) == s for s in slices)


def test_conditions_follow_readiness_and_termination_as_upstream_sets_them() -> None:
    not_ready = [{"type": "Ready", "status": "False"}]
    pods = [
        pod("ready", ip="10.0.0.1"),
        pod("unready", ip="10.0.0.2", conditions=not_ready),
        pod("leaving", ip="10.0.0.3", deletionTimestamp="2026-11-30T03:00:00Z"),
        pod(
            "leaving-unready",
            ip="10.0.0.4",
            deletionTimestamp="2026-11-30T03:00:00Z",
            conditions=not_ready,
        ),
    ]
    got = only(
        desired_slices(services=[service([{"port": 80}], selector=WEB)], pods=pods, addresses={})
    )
    assert [e["conditions"] for e in got["endpoints"]] == [
        {"ready": True, "serving": True, "terminating": False},
        {"ready": False, "serving": False, "terminating": False},
        {"ready": False, "serving": True, "terminating": True},
        {"ready": False, "serving": False, "terminating": True},
    ]
    published = only(
        desired_slices(
            services=[service([{"port": 80}], selector=WEB, publishNotReadyAddresses=True)],
            pods=pods,
            addresses={},
        )
    )
    assert all(e["conditions"]["ready"] for e in published["endpoints"])
    assert validate(got) == got and validate(published) == published


def test_a_service_selecting_nothing_keeps_one_empty_slice_and_none_without_selector() -> None:
    got = only(
        desired_slices(services=[service([{"port": 80}], selector=WEB)], pods=[], addresses={})
    )
    assert got["endpoints"] == [] and got["ports"] == []
    assert (
        desired_slices(
            services=[service([{"port": 80}])], pods=[pod("a", ip="10.0.0.1")], addresses={}
        )
        == []
    )


def test_slices_hold_at_most_the_maximum_endpoints() -> None:
    pods = [pod(f"p{i}", ip=f"10.0.{i // 250}.{i % 250 + 1}") for i in range(250)]
    slices = desired_slices(
        services=[service([{"port": 80}], selector=WEB)], pods=pods, addresses={}
    )
    assert [len(s["endpoints"]) for s in slices] == [100, 100, 50]
    assert [a for s in slices for a in addresses_of(s)] == sorted(
        (f"10.0.{i // 250}.{i % 250 + 1}" for i in range(250)), key=ipaddress.IPv4Address
    )


# -- reconcile through the store ----------------------------------------------------------


@pytest.fixture
def objects(tmp_path: Path) -> Iterator[ObjectStore]:
    with SqliteStore(tmp_path / "state.db") as store:
        yield ObjectStore(store)


def raw_service(selector: dict[str, str] | None, name: str = "web") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"ports": HTTP_NAMED, **({"selector": selector} if selector else {})},
    }


def raw_pod(name: str, ip: str, **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "web"}, **meta},
        "spec": {"containers": [{"name": "c", "ports": [HTTP_PORT]}]},
        "status": {"podIP": ip},
    }


def stored_addresses(objects: ObjectStore) -> dict[str, list[str]]:
    return {
        s["metadata"]["name"]: addresses_of(s)
        for s in objects.list(SLICE)
        if s["metadata"]["labels"].get("kubernetes.io/service-name") == "web"
    }


def test_reconcile_follows_pods_added_changed_and_removed(objects: ObjectStore) -> None:
    objects.apply([raw_service(WEB), raw_pod("a", "10.0.0.1")])
    first = reconcile(objects, addresses={})
    assert len(first.created) == 1 and not first.updated and not first.deleted
    assert list(stored_addresses(objects).values()) == [["10.0.0.1"]]
    assert not reconcile(objects, addresses={}).changed  # nothing to do: no write
    revision = objects.list(SLICE)[0]["metadata"]["resourceVersion"]

    objects.apply([raw_pod("b", "10.0.0.2")])
    assert reconcile(objects, addresses={}).updated
    assert list(stored_addresses(objects).values()) == [["10.0.0.1", "10.0.0.2"]]
    assert objects.list(SLICE)[0]["metadata"]["resourceVersion"] != revision

    objects.apply([raw_pod("a", "10.0.0.1", deletionTimestamp="2026-11-30T03:00:00Z")])
    reconcile(objects, addresses={})
    conditions = [e["conditions"]["terminating"] for e in objects.list(SLICE)[0]["endpoints"]]
    assert conditions == [True, False]

    objects.delete(objects.refs_of([raw_pod("a", "")]))
    reconcile(objects, addresses={})
    assert list(stored_addresses(objects).values()) == [["10.0.0.2"]]

    # The Service loses its selector: the controller's slices go.
    objects.apply([raw_service(None)])
    assert reconcile(objects, addresses={}).deleted
    assert stored_addresses(objects) == {}


def test_reconcile_leaves_the_users_slices_alone(objects: ObjectStore) -> None:
    user_slice = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "external-1", "labels": {"kubernetes.io/service-name": "ext"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["192.0.2.10"]}],
        "ports": [{"name": "http", "port": 80}],
    }
    objects.apply([raw_service(None, name="ext"), user_slice])
    assert not reconcile(objects, addresses={}).changed
    assert [s["metadata"]["name"] for s in objects.list(SLICE)] == ["external-1"]


def test_reconcile_deletes_the_slices_of_a_deleted_service(objects: ObjectStore) -> None:
    objects.apply([raw_service(WEB), raw_pod("a", "10.0.0.1")])
    reconcile(objects, addresses={})
    objects.delete(objects.refs_of([raw_service(WEB)]))
    assert reconcile(objects, addresses={}).deleted
    assert objects.list(SLICE) == []


def test_reconcile_on_etcd_writes_many_slices_within_its_transaction_limits(
    store_factory: etcd_fixtures.StoreFactory,
) -> None:
    # 30 Services (one pod each) and one of 150 pods: 32 slices, more than one etcd
    # transaction may hold (128 operations), so the writes go in batches.
    objects = ObjectStore(store_factory())
    manifest: list[dict[str, Any]] = []
    for i in range(30):
        manifest.append(raw_service({"app": f"s{i}"}, name=f"s{i}"))
        manifest.append(
            {
                **raw_pod(f"s{i}-pod", f"10.1.0.{i + 1}"),
                "metadata": {"name": f"s{i}-pod", "labels": {"app": f"s{i}"}},
            }
        )
    manifest.append(raw_service(WEB))
    manifest += [raw_pod(f"web-{i}", f"10.2.{i // 200}.{i % 200 + 1}") for i in range(150)]
    for start in range(0, len(manifest), 20):
        objects.apply(manifest[start : start + 20])
    published = {"default/web-0": PodAddress(ipaddress.IPv4Address("10.79.0.5"), "node-a")}
    result = reconcile(objects, addresses=published)
    assert len(result.created) == 32
    web = stored_addresses(objects)
    assert sorted(len(v) for v in web.values()) == [50, 100]
    assert "10.79.0.5" in [a for v in web.values() for a in v]
    assert not reconcile(objects, addresses=published).changed


def test_a_headless_service_labels_its_slices_and_names_pods_of_its_subdomain() -> None:
    pods = [
        pod("a", ip="10.0.0.1", hostname="db-0", subdomain="web"),
        pod("b", ip="10.0.0.2", hostname="db-1", subdomain="other"),
    ]
    got = only(
        desired_slices(
            services=[service([{"port": 80}], selector=WEB, clusterIP="None")],
            pods=pods,
            addresses={},
        )
    )
    assert got["metadata"]["labels"]["service.kubernetes.io/headless"] == ""
    assert [e.get("hostname") for e in got["endpoints"]] == ["db-0", None]
    assert validate(got) == got
    with_ip = service([{"port": 80}], selector=WEB, clusterIP="10.96.0.9")
    labels = only(desired_slices(services=[with_ip], pods=pods, addresses={}))["metadata"]["labels"]
    assert "service.kubernetes.io/headless" not in labels


# -- upstream's cases (pkg/controller/endpointslice, staging k8s.io/endpointslice) ------


def test_reserved_labels_of_the_service_are_not_copied_and_the_owner_is_the_service() -> None:
    svc = service([{"port": 80}], selector=WEB, clusterIP="10.96.0.9")
    svc["metadata"]["labels"] = {
        "tier": "front",
        "kubernetes.io/service-name": "spoofed",
        MANAGED_BY_LABEL: "someone-else",
        "service.kubernetes.io/headless": "",
    }
    got = only(desired_slices(services=[svc], pods=[pod("a", ip="10.0.0.1")], addresses={}))
    assert got["metadata"]["labels"] == {
        "tier": "front",
        "kubernetes.io/service-name": "web",
        MANAGED_BY_LABEL: MANAGED_BY,
    }
    assert got["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "name": "web",
            "uid": "svc-uid",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert got["addressType"] == "IPv4"


def test_an_external_name_service_gets_no_slices_even_with_a_selector() -> None:
    alias = validate(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web"},
            "spec": {"type": "ExternalName", "externalName": "db.example.com", "selector": WEB},
        }
    )
    assert desired_slices(services=[alias], pods=[pod("a", ip="10.0.0.1")], addresses={}) == []


def test_a_named_port_is_found_on_a_sidecar_but_not_on_a_plain_init_container() -> None:
    def with_init(name: str, ip: str, restart: str | None) -> dict[str, Any]:
        obj = pod(name, ip=ip)
        init = {"name": "side", "ports": [{**HTTP_PORT, "protocol": "TCP"}]}
        if restart:
            init["restartPolicy"] = restart
        obj["spec"]["initContainers"] = [init]
        return obj

    pods = [with_init("sidecar", "10.0.0.1", "Always"), with_init("init", "10.0.0.2", None)]
    slices = desired_slices(services=[service(HTTP_NAMED, selector=WEB)], pods=pods, addresses={})
    by_port = {tuple(p["port"] for p in s["ports"]): addresses_of(s) for s in slices}
    assert by_port == {(8080,): ["10.0.0.1"], (): ["10.0.0.2"]}


def test_the_first_ipv4_of_status_pod_ips_is_the_address() -> None:
    obj = pod("a")
    obj["status"] = {"podIPs": [{"ip": "fd00::1"}, {"ip": "10.0.0.7"}]}
    got = only(
        desired_slices(services=[service([{"port": 80}], selector=WEB)], pods=[obj], addresses={})
    )
    assert addresses_of(got) == ["10.0.0.7"]


def test_a_user_slice_of_a_selected_service_is_never_touched(objects: ObjectStore) -> None:
    # A slice the user applies for a Service with a selector is not the controller's
    # (no managed-by label): it is neither rewritten nor deleted, and both serve.
    user_slice = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "web-extra", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["192.0.2.10"]}],
        "ports": [{"name": "http", "port": 80}],
    }
    objects.apply([raw_service(WEB), raw_pod("a", "10.0.0.1"), user_slice])
    reconcile(objects, addresses={})
    objects.apply([raw_service(None)])
    assert reconcile(objects, addresses={}).deleted
    (left,) = objects.list(SLICE)
    assert left["metadata"]["name"] == "web-extra" and addresses_of(left) == ["192.0.2.10"]


def test_a_recreated_service_gets_slices_owned_by_its_new_uid(objects: ObjectStore) -> None:
    objects.apply([raw_service(WEB), raw_pod("a", "10.0.0.1")])
    reconcile(objects, addresses={})
    objects.delete(objects.refs_of([raw_service(WEB)]))
    objects.apply([raw_service(WEB)])
    uid = objects.get(KINDS["Service"], name="web")["metadata"]["uid"]
    reconcile(objects, addresses={})
    (mine,) = objects.list(SLICE)
    assert mine["metadata"]["ownerReferences"][0]["uid"] == uid


@pytest.mark.parametrize(
    ("ready", "terminating", "publish", "expected"),
    [
        # upstream's TestPodToEndpoint table: (ready, serving, terminating)
        (True, False, False, (True, True, False)),
        (True, False, True, (True, True, False)),
        (False, False, False, (False, False, False)),
        (False, False, True, (True, False, False)),
        (True, True, False, (False, True, True)),
        (False, True, False, (False, False, True)),
        (True, True, True, (True, True, True)),
    ],
)
def test_endpoint_conditions_as_upstreams_pod_to_endpoint(
    ready: bool, terminating: bool, publish: bool, expected: tuple[bool, bool, bool]
) -> None:
    extra: dict[str, Any] = {"conditions": [{"type": "Ready", "status": str(ready)}]}
    if terminating:
        extra["deletionTimestamp"] = "2026-11-30T03:00:00Z"
    svc = service([{"port": 80}], selector=WEB, publishNotReadyAddresses=publish)
    got = only(
        desired_slices(services=[svc], pods=[pod("a", ip="10.0.0.1", **extra)], addresses={})
    )
    conditions = got["endpoints"][0]["conditions"]
    assert (conditions["ready"], conditions["serving"], conditions["terminating"]) == expected
