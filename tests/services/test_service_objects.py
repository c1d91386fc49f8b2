"""Service and EndpointSlice objects as the API server takes them: validation with
field paths, its defaults, and ClusterIP/NodePort allocation inside the apply
transaction (kept on update, freed on delete, never given twice, even by concurrent
applies on etcd)."""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ciliate.control.objects import (
    KINDS,
    ObjectInvalidError,
    ObjectStore,
    RangeFullError,
    configure_service_range,
    parse_service_range,
    validate,
)
from ciliate.control.store import SqliteStore

from ..cluster import etcd_fixtures

require_etcd = etcd_fixtures.require_etcd
etcd_server = etcd_fixtures.etcd_server
store_factory = etcd_fixtures.store_factory

SERVICE = KINDS["Service"]


def service(
    spec: dict[str, Any], *, name: str = "web", namespace: str = "default", **extra: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
        **extra,
    }


def endpoint_slice(**fields: Any) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        **fields,
    }


def field_errors(obj: dict[str, Any]) -> list[str]:
    with pytest.raises(ObjectInvalidError) as info:
        validate(obj)
    return [str(e) for e in info.value.errors]


HTTP = {"port": 80}


# -- validation and defaults ----------------------------------------------------------


def test_a_minimal_service_gets_the_api_servers_defaults() -> None:
    spec = validate(service({"selector": {"app": "web"}, "ports": [{"port": 80}]}))["spec"]
    assert spec == {
        "type": "ClusterIP",
        "clusterIP": "",  # allocated by the apply
        "clusterIPs": [],
        "ipFamilies": ["IPv4"],
        "ipFamilyPolicy": "SingleStack",
        "ports": [{"protocol": "TCP", "port": 80, "targetPort": 80}],
        "selector": {"app": "web"},
        "sessionAffinity": "None",
        "internalTrafficPolicy": "Cluster",
    }


def test_client_ip_affinity_defaults_to_three_hours_and_external_policy_to_cluster() -> None:
    spec = validate(service({"type": "NodePort", "ports": [HTTP], "sessionAffinity": "ClientIP"}))[
        "spec"
    ]
    assert spec["sessionAffinityConfig"] == {"clientIP": {"timeoutSeconds": 10800}}
    assert spec["externalTrafficPolicy"] == "Cluster"
    lb = validate(service({"type": "LoadBalancer", "ports": [HTTP]}))["spec"]
    assert lb["allocateLoadBalancerNodePorts"] is True


def test_a_headless_service_may_have_no_ports() -> None:
    assert validate(service({"clusterIP": "None"}))["spec"]["clusterIP"] == "None"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({}, "spec.ports: Required value"),
        ({"ports": [{"port": 0}]}, "spec.ports[0].port: Invalid value: 0: must be between 1"),
        ({"ports": [{"port": 65536}]}, "spec.ports[0].port: Invalid value: 65536"),
        # A missing port is the API's 0, an Invalid value (IsValidPortNum), as upstream.
        ({"ports": [{"name": "a"}]}, "spec.ports[0].port: Invalid value: 0"),
        (
            {"ports": [{"name": "a", "port": 80}, {"port": 81}]},
            "spec.ports[1].name: Required value: names are required when a service has",
        ),
        (
            {"ports": [{"name": "a", "port": 80}, {"name": "a", "port": 81}]},
            'spec.ports[1].name: Duplicate value: "a"',
        ),
        (
            {"ports": [{"name": "a", "port": 80}, {"name": "b", "port": 80}]},
            'spec.ports[1]: Duplicate value: {"port": 80, "protocol": "TCP"}',
        ),
        (
            {"ports": [{"port": 80, "protocol": "ICMP"}]},
            'spec.ports[0].protocol: Unsupported value: "ICMP"',
        ),
        (
            {"ports": [{"port": 80, "targetPort": "8080"}]},
            'spec.ports[0].targetPort: Invalid value: "8080": must contain at least one letter',
        ),
        ({"ports": [{"port": 80, "targetPort": 70000}]}, "spec.ports[0].targetPort: Invalid"),
        (
            {"ports": [{"port": 80, "nodePort": 30080}]},
            "spec.ports[0].nodePort: Forbidden: may not be used when `type` is 'ClusterIP'",
        ),
        (
            {"type": "NodePort", "ports": [{"port": 80, "nodePort": 8080}]},
            "spec.ports[0].nodePort: Invalid value: 8080: provided port is not in the valid"
            " range. The range of valid ports is 30000-32767",
        ),
        (
            {
                "type": "NodePort",
                "ports": [
                    {"name": "a", "port": 80, "nodePort": 30080},
                    {"name": "b", "port": 81, "nodePort": 30080},
                ],
            },
            "spec.ports[1].nodePort: Duplicate value: 30080",
        ),
        (
            {"type": "ExternalName", "ports": [HTTP]},
            "spec.externalName: Required value",
        ),
        ({"type": "Magic", "ports": [HTTP]}, 'spec.type: Unsupported value: "Magic"'),
        (
            {"clusterIP": "10.96.0.300", "ports": [HTTP]},
            'spec.clusterIPs[0]: Invalid value: "10.96.0.300": must be a valid IP address',
        ),
        (
            {"clusterIP": "fd00::1", "ports": [HTTP]},
            'spec.clusterIPs[0]: Invalid value: "fd00::1": IPv6 is not configured on this cluster',
        ),
        (
            {"clusterIP": "10.96.0.5", "clusterIPs": ["10.96.0.6"], "ports": [HTTP]},
            'spec.clusterIPs: Invalid value: ["10.96.0.6"]: first value must match `clusterIP`',
        ),
        (
            {"type": "NodePort", "clusterIP": "None", "ports": [HTTP]},
            "spec.clusterIPs[0]: Invalid value: \"None\": may not be set to 'None' for NodePort",
        ),
        (
            {"ports": [HTTP], "sessionAffinity": "Cookie"},
            'spec.sessionAffinity: Unsupported value: "Cookie"',
        ),
        (
            {
                "ports": [HTTP],
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86401}},
            },
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds: Invalid value: 86401: must be"
            " greater than 0 and less than 86400",
        ),
        (
            {"ports": [HTTP], "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 5}}},
            "spec.sessionAffinityConfig: Forbidden: must not be set when session affinity is None",
        ),
        (
            {"ports": [HTTP], "externalTrafficPolicy": "Local"},
            'spec.externalTrafficPolicy: Invalid value: "Local": may only be set for'
            " externally-accessible services",
        ),
        (
            {"type": "NodePort", "ports": [HTTP], "externalTrafficPolicy": "Nearby"},
            'spec.externalTrafficPolicy: Unsupported value: "Nearby"',
        ),
        (
            {"ports": [HTTP], "internalTrafficPolicy": "Zone"},
            'spec.internalTrafficPolicy: Unsupported value: "Zone"',
        ),
        (
            {"ports": [HTTP], "externalIPs": ["127.0.0.1"]},
            'spec.externalIPs[0]: Invalid value: "127.0.0.1": may not be in the loopback range',
        ),
        (
            {"ports": [HTTP], "externalIPs": ["0.0.0.0"]},
            'spec.externalIPs[0]: Invalid value: "0.0.0.0": may not be unspecified',
        ),
        (
            {"ports": [HTTP], "allocateLoadBalancerNodePorts": False},
            "spec.allocateLoadBalancerNodePorts: Forbidden: may only be used when `type` is"
            " 'LoadBalancer'",
        ),
        (
            {"type": "LoadBalancer", "ports": [HTTP], "loadBalancerSourceRanges": ["1.0.0.0/8"]},
            "spec.loadBalancerSourceRanges: Forbidden",
        ),
        ({"ports": [HTTP], "selektor": {}}, 'spec.selektor: Forbidden: unknown field "selektor"'),
        (
            {"ports": [HTTP], "selector": {"app": "a b"}},
            'spec.selector: Invalid value: "a b"',
        ),
        (
            {"ports": [HTTP], "ipFamilies": ["IPv6"]},
            'spec.ipFamilies[0]: Invalid value: "IPv6": not configured on this cluster',
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_a_bad_service_field_is_named_with_its_path(spec: dict[str, Any], expected: str) -> None:
    errors = field_errors(service(spec))
    assert any(e.startswith(expected) for e in errors), errors


def test_a_load_balancer_status_ingress_ip_is_checked() -> None:
    bad = service(
        {"type": "LoadBalancer", "ports": [HTTP]},
        status={"loadBalancer": {"ingress": [{"ip": "nope"}]}},
    )
    assert field_errors(bad) == [
        'status.loadBalancer.ingress[0].ip: Invalid value: "nope": must be a valid IP address,'
        " (e.g. 10.9.8.7 or 2001:db8::ffff)"
    ]
    good = service(
        {"type": "LoadBalancer", "ports": [HTTP]},
        status={"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}},
    )
    assert validate(good)["status"] == {
        "loadBalancer": {"ingress": [{"ip": "192.0.2.10", "ipMode": "VIP"}]}  # v1 default
    }


def test_an_endpoint_slice_is_defaulted_and_kept() -> None:
    slice_ = validate(
        endpoint_slice(
            endpoints=[
                {
                    "addresses": ["10.0.0.5"],
                    "conditions": {"ready": True},
                    "nodeName": "node-a",
                    "targetRef": {"kind": "Pod", "name": "web-0", "namespace": "default"},
                }
            ],
            ports=[{"name": "http", "port": 8080}],
        )
    )
    assert slice_["metadata"]["namespace"] == "default"
    assert slice_["ports"] == [{"name": "http", "protocol": "TCP", "port": 8080}]
    assert slice_["endpoints"][0]["conditions"] == {"ready": True}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"addressType": None}, "addressType: Required value"),
        ({"addressType": "FQDN"}, 'addressType: Invalid value: "FQDN": ciliate serves IPv4 only'),
        ({"addressType": "IPX"}, 'addressType: Unsupported value: "IPX"'),
        ({"endpoints": [{"addresses": []}]}, "endpoints[0].addresses: Required value"),
        (
            {"endpoints": [{"addresses": ["10.0.0.1", "10.0.0.x"]}]},
            'endpoints[0].addresses[1]: Invalid value: "10.0.0.x"',
        ),
        (
            {"endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": "yes"}}]},
            'endpoints[0].conditions.ready: Invalid value: "yes": must be true, false or null',
        ),
        (
            {"endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"healthy": True}}]},
            'endpoints[0].conditions.healthy: Forbidden: unknown field "healthy"',
        ),
        (
            {"endpoints": [{"addresses": ["10.0.0.1"], "nodeName": "Node_A"}]},
            'endpoints[0].nodeName: Invalid value: "Node_A"',
        ),
        ({"ports": [{"port": 0}]}, "ports[0].port: Invalid value: 0: must be between 1"),
        (
            {"ports": [{"name": "a", "port": 80}, {"name": "a", "port": 81}]},
            'ports[1].name: Duplicate value: "a"',
        ),
        ({"ports": [{"name": "A", "port": 80}]}, 'ports[0].name: Invalid value: "A"'),
        (
            {"endpoints": [{"addresses": ["10.0.0.1"]}] * 1001},
            "endpoints: Too many: 1001: must have at most 1000 items",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_a_bad_endpoint_slice_field_is_named_with_its_path(
    fields: dict[str, Any], expected: str
) -> None:
    obj = endpoint_slice(**fields)
    if obj["addressType"] is None:
        del obj["addressType"]
    errors = field_errors(obj)
    assert any(e.startswith(expected) for e in errors), errors


# -- allocation -----------------------------------------------------------------------


@pytest.fixture
def objects(tmp_path: Path) -> Iterator[ObjectStore]:
    with SqliteStore(tmp_path / "state.db") as store:
        configure_service_range(store, "10.96.0.0/24")
        yield ObjectStore(store)


def cluster_ip(objects: ObjectStore, name: str, namespace: str = "default") -> str:
    return str(objects.get(SERVICE, name=name, namespace=namespace)["spec"]["clusterIP"])


def test_an_empty_cluster_ip_is_allocated_from_the_upper_band_and_kept_on_reapply(
    objects: ObjectStore,
) -> None:
    objects.apply([service({"ports": [HTTP]})])
    first = cluster_ip(objects, "web")
    address = ipaddress.IPv4Address(first)
    # A /24 holds 254 service addresses; the lowest 16 are kept for fixed addresses.
    assert ipaddress.IPv4Address("10.96.0.17") <= address <= ipaddress.IPv4Address("10.96.0.254")
    assert [r.action for r in objects.apply([service({"ports": [HTTP]})])] == ["unchanged"]
    objects.apply([service({"ports": [{"port": 8080}]})])
    assert cluster_ip(objects, "web") == first  # an update keeps it


def test_a_cluster_ip_may_not_change_once_set(objects: ObjectStore) -> None:
    objects.apply([service({"ports": [HTTP], "clusterIP": "10.96.0.10"})])
    with pytest.raises(ObjectInvalidError, match=r"clusterIPs\[0\]: .*may not change once set"):
        objects.apply([service({"ports": [HTTP], "clusterIP": "10.96.0.11"})])


def test_a_requested_cluster_ip_must_be_free_and_inside_the_range(objects: ObjectStore) -> None:
    objects.apply([service({"ports": [HTTP], "clusterIP": "10.96.0.10"}, name="dns")])
    with pytest.raises(ObjectInvalidError, match="provided IP is already allocated"):
        objects.apply([service({"ports": [HTTP], "clusterIP": "10.96.0.10"})])
    with pytest.raises(
        ObjectInvalidError,
        match=r"the provided IP \(10.97.0.10\) is not in the valid range. The range of valid"
        r" IPs is 10.96.0.0/24",
    ):
        objects.apply([service({"ports": [HTTP], "clusterIP": "10.97.0.10"})])
    for reserved in ("10.96.0.0", "10.96.0.255"):  # network and broadcast addresses
        with pytest.raises(ObjectInvalidError, match="not in the valid range"):
            objects.apply([service({"ports": [HTTP], "clusterIP": reserved})])


def test_the_first_address_is_kept_for_the_api_servers_service(objects: ObjectStore) -> None:
    with pytest.raises(ObjectInvalidError, match="first address is the API server's"):
        objects.apply([service({"ports": [HTTP], "clusterIP": "10.96.0.1"})])
    objects.apply(
        [service({"ports": [{"port": 443}], "clusterIP": "10.96.0.1"}, name="kubernetes")]
    )
    assert cluster_ip(objects, "kubernetes") == "10.96.0.1"


def test_a_full_range_is_a_clear_error_and_a_delete_frees_an_address(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "state.db") as store:
        configure_service_range(store, "10.96.0.0/29")  # .1 (API server) and .2-.6
        objects = ObjectStore(store)
        objects.apply([service({"ports": [HTTP]}, name=f"s{i}") for i in range(5)])
        taken = {cluster_ip(objects, f"s{i}") for i in range(5)}
        assert taken == {f"10.96.0.{i}" for i in range(2, 7)}
        with pytest.raises(RangeFullError, match=r"range is full \(10.96.0.0/29 .*widen"):
            objects.apply([service({"ports": [HTTP]}, name="one-more")])
        # The failed apply wrote nothing.
        assert [s["metadata"]["name"] for s in objects.list(SERVICE)] == [f"s{i}" for i in range(5)]
        freed = cluster_ip(objects, "s3")
        objects.delete(objects.refs_of([service({}, name="s3")]))
        objects.apply([service({"ports": [HTTP]}, name="one-more")])
        assert cluster_ip(objects, "one-more") == freed


def test_deleting_a_namespace_frees_its_services_addresses(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "state.db") as store:
        configure_service_range(store, "10.96.0.0/30")  # one dynamic address: .2
        objects = ObjectStore(store)
        namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}}
        objects.apply([namespace, service({"ports": [HTTP]}, namespace="x")])
        assert cluster_ip(objects, "web", "x") == "10.96.0.2"
        objects.delete(objects.refs_of([namespace]))
        objects.apply([service({"ports": [HTTP]})])
        assert cluster_ip(objects, "web") == "10.96.0.2"


def test_node_ports_are_allocated_kept_freed_and_never_shared(objects: ObjectStore) -> None:
    two_ports = [{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]
    objects.apply([service({"type": "NodePort", "ports": two_ports})])
    ports = objects.get(SERVICE, name="web")["spec"]["ports"]
    numbers = [p["nodePort"] for p in ports]
    assert all(30000 <= n <= 32767 for n in numbers) and len(set(numbers)) == 2
    # Re-applying the manifest (nodePort left out) keeps them; dropping a port frees it.
    objects.apply([service({"type": "NodePort", "ports": two_ports[:1]})])
    assert [p["nodePort"] for p in objects.get(SERVICE, name="web")["spec"]["ports"]] == [
        numbers[0]
    ]
    with pytest.raises(ObjectInvalidError, match=r"spec.ports\[0\].nodePort: .*already allocated"):
        objects.apply(
            [
                service(
                    {"type": "NodePort", "ports": [{"port": 80, "nodePort": numbers[0]}]}, name="b"
                )
            ]
        )
    objects.apply(
        [service({"type": "NodePort", "ports": [{"port": 80, "nodePort": numbers[1]}]}, name="b")]
    )
    # Back to ClusterIP: its NodePort is freed and another service may ask for it.
    objects.apply([service({"ports": [HTTP]})])
    objects.apply(
        [service({"type": "NodePort", "ports": [{"port": 80, "nodePort": numbers[0]}]}, name="c")]
    )


def test_a_load_balancer_without_node_ports_gets_none(objects: ObjectStore) -> None:
    objects.apply(
        [service({"type": "LoadBalancer", "ports": [HTTP], "allocateLoadBalancerNodePorts": False})]
    )
    assert "nodePort" not in objects.get(SERVICE, name="web")["spec"]["ports"][0]


def test_the_service_range_is_checked_as_the_api_server_does() -> None:
    assert str(parse_service_range("10.96.0.0/12")) == "10.96.0.0/12"
    with pytest.raises(ValueError, match="too large; the mask must be >= /12"):
        parse_service_range("10.0.0.0/8")
    with pytest.raises(ValueError, match="IPv4 only"):
        parse_service_range("fd00::/112")
    with pytest.raises(ValueError, match="not a network address"):
        parse_service_range("10.96.0.1/24")


def test_concurrent_applies_on_etcd_never_share_an_address_or_a_node_port(
    store_factory: etcd_fixtures.StoreFactory,
) -> None:
    # A /27: 29 dynamic addresses, 24 services from 4 writers at once, so two writers
    # picking one address is likely; the transaction must make one of them retry.
    configure_service_range(store_factory(), "10.96.0.0/27")
    errors: list[BaseException] = []

    def writer(index: int) -> None:
        objects = ObjectStore(store_factory())
        try:
            for j in range(6):
                objects.apply(
                    [service({"type": "NodePort", "ports": [HTTP]}, name=f"w{index}-{j}")]
                )
        except BaseException as exc:  # reported below, with the others'
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    services = ObjectStore(store_factory()).list(SERVICE)
    addresses = [s["spec"]["clusterIP"] for s in services]
    assert len(services) == 24
    assert len(set(addresses)) == 24
    node_ports = {s["spec"]["ports"][0]["nodePort"] for s in services}
    assert len(node_ports) == 24
    # Every one is still free-able: deleting them all empties the bitmap, so all 29
    # dynamic addresses can be taken again.
    objects = ObjectStore(store_factory())
    objects.delete(objects.refs_of(services))
    objects.apply([service({"ports": [HTTP]}, name=f"n{i}") for i in range(29)])
    with pytest.raises(RangeFullError):
        objects.apply([service({"ports": [HTTP]}, name="n29")])


def test_a_local_load_balancer_gets_a_health_check_node_port_freed_with_the_policy(
    objects: ObjectStore,
) -> None:
    local = {"type": "LoadBalancer", "ports": [HTTP], "externalTrafficPolicy": "Local"}
    objects.apply([service(local)])
    spec = objects.get(SERVICE, name="web")["spec"]
    health = spec["healthCheckNodePort"]
    assert 30000 <= health <= 32767 and health != spec["ports"][0]["nodePort"]
    objects.apply([service(local)])  # re-applied without it: kept
    assert objects.get(SERVICE, name="web")["spec"]["healthCheckNodePort"] == health
    objects.apply([service({**local, "externalTrafficPolicy": "Cluster"})])
    assert "healthCheckNodePort" not in objects.get(SERVICE, name="web")["spec"]
    # Freed: another Service may ask for that port.
    objects.apply(
        [service({"type": "NodePort", "ports": [{"port": 80, "nodePort": health}]}, name="b")]
    )
    with pytest.raises(ObjectInvalidError, match=r"spec.healthCheckNodePort: .*already allocated"):
        objects.apply([service({**local, "healthCheckNodePort": health}, name="c")])


@pytest.mark.parametrize(
    ("size", "step", "top", "band"),
    [
        (256, 16, 256, 16),  # a /24: .1-.16 kept for fixed addresses
        (4096, 16, 256, 256),  # a /20
        (1 << 20, 16, 256, 256),  # a /12, the default
        (16, 16, 256, 0),  # a /28: too small to split
        (2768, 32, 128, 86),  # NodePorts 30000-32767: 30000-30085 kept for fixed ports
    ],
)
def test_the_static_band_is_sized_as_kubernetes_sizes_it(
    size: int, step: int, top: int, band: int
) -> None:
    from ciliate.control.objects.allocation import _band_offset

    assert _band_offset(size, step=step, top=top) == band


def test_a_reapplied_manifest_without_status_keeps_the_load_balancer_status(
    objects: ObjectStore,
) -> None:
    spec = {"type": "LoadBalancer", "ports": [HTTP]}
    ingress = {"loadBalancer": {"ingress": [{"ip": "198.51.100.9"}]}}
    objects.apply([service(spec, status=ingress)])
    assert [r.action for r in objects.apply([service(spec)])] == ["unchanged"]
    shown = {"loadBalancer": {"ingress": [{"ip": "198.51.100.9", "ipMode": "VIP"}]}}
    assert objects.get(SERVICE, name="web")["status"] == shown
    moved = {"loadBalancer": {"ingress": [{"ip": "198.51.100.10"}]}}
    objects.apply([service(spec, status=moved)])
    assert objects.get(SERVICE, name="web")["status"]["loadBalancer"]["ingress"][0]["ip"] == (
        "198.51.100.10"
    )


def test_a_snapshot_may_read_only_the_kinds_a_reader_needs(objects: ObjectStore) -> None:
    objects.apply([service({"ports": [HTTP]})])
    assert set(objects.snapshot()) == set(KINDS)
    assert objects.snapshot(["Pod", "Namespace"]) == {
        "Pod": [],
        "Namespace": objects.list(KINDS["Namespace"]),
    }
