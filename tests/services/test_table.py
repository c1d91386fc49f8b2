"""The service table: each Service type's frontends, backends from the slices in
their states (terminating ones take no new flow unless nothing else can), traffic
policies restricting to the node's backends, affinity, refusal when nothing can
serve, and numeric ids that stay stable across recomputation and restarts."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from ciliate.control.objects import validate
from ciliate.control.services.ids import IdsExhaustedError, LbIds, assign_ids
from ciliate.control.services.table import (
    BackendState,
    Frontend,
    FrontendKey,
    FrontendKind,
    service_table,
)
from ciliate.control.store import SqliteStore

IP = ipaddress.IPv4Address
NODE_IPS = [IP("192.168.10.1"), IP("172.31.0.1")]


def service(spec: dict[str, Any], *, name: str = "web", **extra: Any) -> dict[str, Any]:
    obj = validate(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name},
            "spec": {"clusterIP": "10.96.0.20", "selector": {"app": "web"}, **spec},
            **extra,
        }
    )
    return obj


def endpoint(ip: str, node: str, **conditions: bool) -> dict[str, Any]:
    return {
        "addresses": [ip],
        "nodeName": node,
        "zone": "z1",
        "conditions": conditions,
        "targetRef": {"kind": "Pod", "namespace": "default", "name": f"pod-{ip}"},
    }


def endpoint_slice(
    endpoints: list[dict[str, Any]],
    ports: list[dict[str, Any]],
    *,
    service_name: str = "web",
    name: str = "web-1",
) -> dict[str, Any]:
    return validate(
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": ports,
        }
    )


HTTP = [{"name": "http", "port": 80, "targetPort": 8080}]
HTTP_SLICE_PORTS = [{"name": "http", "port": 8080}]
TWO_NODES = [endpoint("10.79.0.5", "node-a"), endpoint("10.79.1.5", "node-b")]


def table(
    services: list[dict[str, Any]], slices: list[dict[str, Any]], node: str = "node-a"
) -> list[Frontend]:
    return service_table(services=services, slices=slices, node_name=node, node_ips=NODE_IPS)


def by_kind(frontends: list[Frontend]) -> dict[FrontendKind, list[str]]:
    out: dict[FrontendKind, list[str]] = {}
    for f in frontends:
        out.setdefault(f.kind, []).append(str(f.key))
    return out


def backends(frontend: Frontend) -> list[str]:
    return [str(b.key) for b in frontend.backends]


def test_a_cluster_ip_service_has_one_frontend_per_port_with_its_slice_backends() -> None:
    ports = [
        {"name": "http", "port": 80, "targetPort": 8080},
        {"name": "dns", "port": 53, "protocol": "UDP"},
    ]
    slice_ports = [{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}]
    got = table([service({"ports": ports})], [endpoint_slice(TWO_NODES, slice_ports)])
    assert [(str(f.key), f.kind, f.port_name) for f in got] == [
        ("10.96.0.20:53/UDP", FrontendKind.CLUSTER_IP, "dns"),
        ("10.96.0.20:80/TCP", FrontendKind.CLUSTER_IP, "http"),
    ]
    assert backends(got[1]) == ["10.79.0.5:8080/TCP", "10.79.1.5:8080/TCP"]
    assert backends(got[0]) == ["10.79.0.5:5353/UDP", "10.79.1.5:5353/UDP"]
    first = got[1].backends[0]
    assert (first.state, first.node, first.zone, first.pod) == (
        BackendState.ACTIVE,
        "node-a",
        "z1",
        "default/pod-10.79.0.5",
    )
    assert got[1].affinity_timeout == 0 and not got[1].local_only and not got[1].refuses


def test_node_port_external_ip_and_load_balancer_frontends() -> None:
    svc = service(
        {
            "type": "LoadBalancer",
            "ports": [{**HTTP[0], "nodePort": 30080}],
            "externalIPs": ["203.0.113.7"],
        },
        status={"loadBalancer": {"ingress": [{"ip": "198.51.100.9"}]}},
    )
    got = table([svc], [endpoint_slice(TWO_NODES, HTTP_SLICE_PORTS)])
    assert by_kind(got) == {
        FrontendKind.CLUSTER_IP: ["10.96.0.20:80/TCP"],
        FrontendKind.NODE_PORT: ["172.31.0.1:30080/TCP", "192.168.10.1:30080/TCP"],
        FrontendKind.EXTERNAL_IP: ["203.0.113.7:80/TCP"],
        FrontendKind.LOAD_BALANCER: ["198.51.100.9:80/TCP"],
    }
    assert all(len(f.backends) == 2 for f in got)


def test_a_headless_service_has_no_frontend_and_a_cluster_ip_one_has_no_node_port() -> None:
    headless = service({"clusterIP": "None", "ports": HTTP})
    assert table([headless], [endpoint_slice(TWO_NODES, HTTP_SLICE_PORTS)]) == []
    assert by_kind(table([service({"ports": HTTP})], [])) == {
        FrontendKind.CLUSTER_IP: ["10.96.0.20:80/TCP"]
    }


def test_external_traffic_policy_local_keeps_the_nodes_backends_on_outside_frontends() -> None:
    svc = service(
        {
            "type": "NodePort",
            "ports": [{**HTTP[0], "nodePort": 30080}],
            "externalTrafficPolicy": "Local",
        }
    )
    got = {f.kind: f for f in table([svc], [endpoint_slice(TWO_NODES, HTTP_SLICE_PORTS)])}
    assert backends(got[FrontendKind.NODE_PORT]) == ["10.79.0.5:8080/TCP"]
    assert got[FrontendKind.NODE_PORT].local_only
    assert len(got[FrontendKind.CLUSTER_IP].backends) == 2  # in-cluster traffic is not limited
    # A node without a local backend refuses NodePort traffic rather than forwarding it.
    on_c = {
        f.kind: f for f in table([svc], [endpoint_slice(TWO_NODES, HTTP_SLICE_PORTS)], "node-c")
    }
    assert on_c[FrontendKind.NODE_PORT].refuses
    assert not on_c[FrontendKind.CLUSTER_IP].refuses


def test_internal_traffic_policy_local_keeps_the_nodes_backends_on_the_cluster_ip() -> None:
    svc = service({"ports": HTTP, "internalTrafficPolicy": "Local"})
    (only,) = table([svc], [endpoint_slice(TWO_NODES, HTTP_SLICE_PORTS)], "node-b")
    assert backends(only) == ["10.79.1.5:8080/TCP"] and only.local_only


def test_client_ip_affinity_carries_its_timeout() -> None:
    svc = service(
        {
            "ports": HTTP,
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
        }
    )
    (only,) = table([svc], [])
    assert only.affinity_timeout == 60
    (default,) = table([service({"ports": HTTP, "sessionAffinity": "ClientIP"})], [])
    assert default.affinity_timeout == 10800


def test_terminating_backends_keep_flows_but_take_new_ones_only_when_nothing_else_can() -> None:
    leaving = endpoint("10.79.0.6", "node-a", ready=False, serving=True, terminating=True)
    unready = endpoint("10.79.0.7", "node-a", ready=False, serving=False, terminating=False)
    (mixed,) = table(
        [service({"ports": HTTP})],
        [endpoint_slice([TWO_NODES[0], leaving, unready], HTTP_SLICE_PORTS)],
    )
    assert [(str(b.key), b.state) for b in mixed.backends] == [
        ("10.79.0.5:8080/TCP", BackendState.ACTIVE),
        ("10.79.0.6:8080/TCP", BackendState.TERMINATING),
    ]
    assert [str(b.key) for b in mixed.new_flow_backends] == ["10.79.0.5:8080/TCP"]
    (all_leaving,) = table(
        [service({"ports": HTTP})], [endpoint_slice([leaving], HTTP_SLICE_PORTS)]
    )
    assert [str(b.key) for b in all_leaving.new_flow_backends] == ["10.79.0.6:8080/TCP"]
    (nothing,) = table([service({"ports": HTTP})], [endpoint_slice([unready], HTTP_SLICE_PORTS)])
    assert nothing.backends == () and nothing.refuses


def test_slices_are_matched_by_service_port_name_protocol_and_service_label() -> None:
    other_service = endpoint_slice(
        [endpoint("10.79.9.9", "node-a")], HTTP_SLICE_PORTS, service_name="db", name="db-1"
    )
    wrong_name = endpoint_slice(
        [endpoint("10.79.9.8", "node-a")], [{"name": "metrics", "port": 9100}], name="web-2"
    )
    wrong_protocol = endpoint_slice(
        [endpoint("10.79.9.7", "node-a")],
        [{"name": "http", "port": 8080, "protocol": "UDP"}],
        name="web-3",
    )
    # The same address in two slices (a rewrite in progress) counts once, at its best.
    duplicate = endpoint_slice(
        [endpoint("10.79.0.5", "node-a", ready=False, serving=True, terminating=True)],
        HTTP_SLICE_PORTS,
        name="web-4",
    )
    slices = [
        other_service,
        wrong_name,
        wrong_protocol,
        duplicate,
        endpoint_slice(TWO_NODES, HTTP_SLICE_PORTS),
    ]
    (only,) = table([service({"ports": HTTP})], slices)
    assert [(str(b.key), b.state) for b in only.backends] == [
        ("10.79.0.5:8080/TCP", BackendState.ACTIVE),
        ("10.79.1.5:8080/TCP", BackendState.ACTIVE),
    ]


# -- ids ----------------------------------------------------------------------------


def test_ids_are_kept_handed_out_after_the_last_and_wrap() -> None:
    ids, last = assign_ids(["a", "b"], current={}, last=0, maximum=5)
    assert ids == {"a": 1, "b": 2} and last == 2
    ids, last = assign_ids(["b", "c"], current=ids, last=last, maximum=5)
    assert ids == {"b": 2, "c": 3}  # "a"'s 1 is not handed out again at once
    ids, last = assign_ids(["b", "c", "d", "e", "f"], current=ids, last=last, maximum=5)
    assert ids == {"b": 2, "c": 3, "d": 4, "e": 5, "f": 1}
    with pytest.raises(IdsExhaustedError):
        assign_ids(["b", "c", "d", "e", "f", "g"], current=ids, last=last, maximum=5)


def test_lb_ids_stay_stable_across_recomputation_and_restart(tmp_path: Path) -> None:
    services = [
        service({"ports": HTTP}),
        service({"ports": HTTP, "clusterIP": "10.96.0.21"}, name="api"),
    ]
    slices = [endpoint_slice(TWO_NODES, HTTP_SLICE_PORTS)]
    with SqliteStore(tmp_path / "state.db") as store:
        first = LbIds(store).sync(table(services, slices))
        assert sorted(first.frontend.values()) == [1, 2]
        assert sorted(first.backend.values()) == [1, 2]
        again = LbIds(store).sync(table(services, slices))
        assert again.frontend == first.frontend and again.backend == first.backend
        # One service gone and a backend added: the others keep their ids.
        more = [endpoint_slice([*TWO_NODES, endpoint("10.79.2.5", "node-c")], HTTP_SLICE_PORTS)]
        changed = LbIds(store).sync(table(services[:1], more))
        web = FrontendKey(IP("10.96.0.20"), 80, "TCP")
        assert changed.frontend == {web: first.frontend[web]}
        assert changed.released_frontends == [
            first.frontend[FrontendKey(IP("10.96.0.21"), 80, "TCP")]
        ]
        assert {k: v for k, v in changed.backend.items() if k in first.backend} == first.backend
    # A new agent on the same store (a restart) reads the same ids.
    with SqliteStore(tmp_path / "state.db") as store:
        restarted = LbIds(store).sync(table(services[:1], more))
    assert restarted.frontend == changed.frontend and restarted.backend == changed.backend


def test_a_lone_node_runs_controller_table_and_ids_from_its_store(tmp_path: Path) -> None:
    from ciliate.control.objects import ObjectStore
    from ciliate.control.services import node
    from ciliate.control.services.slices import reconcile

    manifest = [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "web-0", "labels": {"app": "web"}},
            "spec": {
                "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]},
        },
    ]
    with SqliteStore(tmp_path / "state.db") as store:
        objects = ObjectStore(store)
        objects.apply(manifest)
        addresses = node.local_addresses(
            [("default/web-0", "10.79.0.5"), (None, "10.79.0.6")], node_name="node-a"
        )
        reconcile(objects, addresses=addresses)
        answer = node.compute(
            objects, LbIds(store), node_name="node-a", node_ips=NODE_IPS
        ).to_json()
    (frontend,) = answer["frontends"]
    assert frontend["id"] == 1 and frontend["type"] == "ClusterIP"
    assert [(b["id"], b["address"], b["state"], b["node"]) for b in frontend["backends"]] == [
        (1, "10.79.0.5:8080/TCP", "active", "node-a")
    ]


# -- kube-proxy's and Cilium's reading of slices and policies ---------------------------


def test_external_traffic_policy_local_still_gives_in_cluster_clients_every_backend() -> None:
    # kube-proxy: pod traffic to a Local Service's NodePort or external address is
    # "subject to neither form of traffic policy"; Cilium keeps it in a second scope.
    svc = service(
        {
            "type": "NodePort",
            "ports": [{**HTTP[0], "nodePort": 30080}],
            "externalIPs": ["203.0.113.7"],
            "externalTrafficPolicy": "Local",
            "internalTrafficPolicy": "Local",
        }
    )
    got = table([svc], [endpoint_slice(TWO_NODES, HTTP_SLICE_PORTS)])
    outside = [f for f in got if f.kind is not FrontendKind.CLUSTER_IP]
    assert len(outside) == 3
    for frontend in outside:
        assert backends(frontend) == ["10.79.0.5:8080/TCP"]
        assert frontend.internal_backends is not None
        assert [str(b.key) for b in frontend.internal_backends] == [
            "10.79.0.5:8080/TCP",
            "10.79.1.5:8080/TCP",
        ]
    (cluster_ip,) = [f for f in got if f.kind is FrontendKind.CLUSTER_IP]
    assert backends(cluster_ip) == ["10.79.0.5:8080/TCP"] and cluster_ip.internal_backends is None
    # Every backend local: one scope is enough.
    only_local = table([svc], [endpoint_slice(TWO_NODES[:1], HTTP_SLICE_PORTS)])
    assert all(f.internal_backends is None for f in only_local)


def test_internal_traffic_policy_local_without_a_local_backend_refuses() -> None:
    svc = service({"ports": HTTP, "internalTrafficPolicy": "Local"})
    (only,) = table([svc], [endpoint_slice(TWO_NODES, HTTP_SLICE_PORTS)], "node-c")
    assert only.backends == () and only.refuses and only.local_only


def test_a_local_policy_falls_back_to_local_terminating_backends_not_remote_ready_ones() -> None:
    # KEP-1669 applies within the node's own backends under a Local policy.
    leaving_here = endpoint("10.79.0.6", "node-a", ready=False, serving=True, terminating=True)
    svc = service({"ports": HTTP, "internalTrafficPolicy": "Local"})
    (only,) = table([svc], [endpoint_slice([leaving_here, TWO_NODES[1]], HTTP_SLICE_PORTS)])
    assert backends(only) == ["10.79.0.6:8080/TCP"]
    assert [str(b.key) for b in only.new_flow_backends] == ["10.79.0.6:8080/TCP"]
    assert not only.refuses


def test_an_external_name_service_is_ignored() -> None:
    alias = validate(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "alias"},
            "spec": {
                "type": "ExternalName",
                "externalName": "db.example.com",
                "ports": HTTP,
                "externalIPs": ["203.0.113.8"],
            },
        }
    )
    slices = [endpoint_slice(TWO_NODES, HTTP_SLICE_PORTS, service_name="alias", name="alias-1")]
    assert table([alias], slices) == []


def test_only_the_first_address_of_an_endpoint_is_read() -> None:
    # The API says the other addresses are fungible; kube-proxy and Cilium use the first.
    two_addresses = {**endpoint("10.79.0.5", "node-a"), "addresses": ["10.79.0.5", "10.79.0.9"]}
    (only,) = table([service({"ports": HTTP})], [endpoint_slice([two_addresses], HTTP_SLICE_PORTS)])
    assert backends(only) == ["10.79.0.5:8080/TCP"]


def test_backends_of_all_slices_of_a_service_are_merged_and_deduplicated() -> None:
    first = endpoint_slice(TWO_NODES, HTTP_SLICE_PORTS, name="web-a")
    second = endpoint_slice(
        [TWO_NODES[1], endpoint("10.79.2.5", "node-c")], HTTP_SLICE_PORTS, name="web-b"
    )
    (only,) = table([service({"ports": HTTP})], [first, second])
    assert backends(only) == ["10.79.0.5:8080/TCP", "10.79.1.5:8080/TCP", "10.79.2.5:8080/TCP"]


def test_an_endpoint_ready_in_one_slice_and_terminating_in_another_counts_as_ready() -> None:
    leaving = endpoint("10.79.0.5", "node-a", ready=False, serving=True, terminating=True)
    for order in ([leaving], [TWO_NODES[0]]), ([TWO_NODES[0]], [leaving]):
        slices = [
            endpoint_slice(order[0], HTTP_SLICE_PORTS, name="web-a"),
            endpoint_slice(order[1], HTTP_SLICE_PORTS, name="web-b"),
        ]
        (only,) = table([service({"ports": HTTP})], slices)
        assert [b.state for b in only.backends] == [BackendState.ACTIVE]


def test_a_load_balancer_address_in_proxy_ip_mode_is_not_served_by_the_node() -> None:
    svc = service(
        {"type": "LoadBalancer", "ports": [{**HTTP[0], "nodePort": 30080}]},
        status={
            "loadBalancer": {
                "ingress": [
                    {"ip": "198.51.100.9", "ipMode": "VIP"},
                    {"ip": "198.51.100.10", "ipMode": "Proxy"},
                    {"hostname": "lb.example.com"},
                ]
            }
        },
    )
    got = by_kind(table([svc], [endpoint_slice(TWO_NODES, HTTP_SLICE_PORTS)]))
    assert got[FrontendKind.LOAD_BALANCER] == ["198.51.100.9:80/TCP"]


@pytest.mark.parametrize(
    ("conditions", "state"),
    [
        ({}, BackendState.ACTIVE),  # ready left out: true
        ({"ready": True, "terminating": True}, BackendState.ACTIVE),
        ({"ready": False, "terminating": True}, BackendState.TERMINATING),  # serving: true
        ({"ready": False, "serving": True, "terminating": True}, BackendState.TERMINATING),
        ({"ready": False, "serving": False, "terminating": True}, None),
        ({"ready": False, "serving": True}, None),  # not terminating: not a fallback
        ({"ready": False}, None),
    ],
)
def test_endpoint_conditions_left_out_read_as_kube_proxy_reads_them(
    conditions: dict[str, bool], state: BackendState | None
) -> None:
    ep = {**endpoint("10.79.0.5", "node-a"), "conditions": conditions}
    (only,) = table([service({"ports": HTTP})], [endpoint_slice([ep], HTTP_SLICE_PORTS)])
    assert [b.state for b in only.backends] == ([state] if state else [])
