"""Objects are validated and defaulted as the API server does it: each bad field is
named by its path, and the defaults Kubernetes applies are applied."""

from __future__ import annotations

from typing import Any

import pytest

from ciliate.control.objects import (
    DocumentError,
    ObjectInvalidError,
    UnknownKindError,
    load_documents,
    resolve_kind,
    validate,
)


def netpol(spec: dict[str, Any], name: str = "p") -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "x"},
        "spec": spec,
    }


def cnp(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "c", "namespace": "x"},
        "spec": spec,
    }


def field_errors(document: dict[str, Any]) -> list[str]:
    with pytest.raises(ObjectInvalidError) as info:
        validate(document)
    return [str(e) for e in info.value.errors]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            {"ingress": [{"ports": [{"port": 80}, {"port": 70000}]}]},
            (
                "spec.ingress[0].ports[1].port: Invalid value: 70000: must be between 1 and 65535,"
                " inclusive"
            ),
        ),
        (
            {"ingress": [{"ports": [{"port": "80"}]}]},
            (
                'spec.ingress[0].ports[0].port: Invalid value: "80": must contain at least one'
                " letter (a-z)"
            ),
        ),
        (
            {"egress": [{"ports": [{"port": 90, "endPort": 80}]}]},
            (
                # upstream shows the port's value here (ValidateNetworkPolicyPort's quirk)
                "spec.egress[0].ports[0].endPort: Invalid value: 90: must be greater than or equal"
                " to `port`"
            ),
        ),
        (
            {"egress": [{"ports": [{"port": "http", "endPort": 90}]}]},
            (
                "spec.egress[0].ports[0].endPort: Invalid value: 90: may not be specified when"
                " `port` is non-numeric"
            ),
        ),
        (
            {"ingress": [{"ports": [{"protocol": "ICMP", "port": 80}]}]},
            (
                'spec.ingress[0].ports[0].protocol: Unsupported value: "ICMP": supported values:'
                ' "TCP", "UDP", "SCTP"'
            ),
        ),
        (
            {"ingress": [{"from": [{}]}]},
            "spec.ingress[0].from[0]: Required value: must specify a peer",
        ),
        (
            {"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]},
            "spec.ingress[0].from[0]: Forbidden: may not specify both ipBlock and another peer",
        ),
        (
            {"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}]}]},
            (
                'spec.egress[0].to[0].ipBlock.except[0]: Invalid value: "11.0.0.0/16": must be a'
                " strict subset of `cidr`"
            ),
        ),
        (
            {"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.300/8"}}]}]},
            (
                'spec.egress[0].to[0].ipBlock.cidr: Invalid value: "10.0.0.300/8": must be a valid'
                " CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)"
            ),
        ),
        (
            {"podSelector": {"matchExpressions": [{"key": "pod", "operator": "In"}]}},
            (
                "spec.podSelector.matchExpressions[0].values: Required value: must be specified"
                " when `operator` is 'In' or 'NotIn'"
            ),
        ),
        (
            {
                "podSelector": {
                    "matchExpressions": [{"key": "pod", "operator": "Maybe", "values": ["a"]}]
                }
            },
            (
                'spec.podSelector.matchExpressions[0].operator: Invalid value: "Maybe":'
                " not a valid selector operator"
            ),
        ),
        (
            {"policyTypes": ["Ingress", "Sideways"]},
            (
                'spec.policyTypes[1]: Unsupported value: "Sideways": supported values: "Ingress",'
                ' "Egress"'
            ),
        ),
        (
            {"podSelecter": {}},
            'spec.podSelecter: Forbidden: unknown field "podSelecter"',
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_a_bad_network_policy_field_is_named_with_its_path(
    spec: dict[str, Any], expected: str
) -> None:
    assert expected in field_errors(netpol(spec))


def test_every_bad_field_is_reported_at_once() -> None:
    errors = field_errors(netpol({"ingress": [{"ports": [{"port": 0}, {"port": 70000}]}]}))
    assert [e.split(":")[0] for e in errors] == [
        "spec.ingress[0].ports[0].port",
        "spec.ingress[0].ports[1].port",
    ]


def test_the_message_names_kind_object_and_field_like_the_api_server() -> None:
    with pytest.raises(ObjectInvalidError) as info:
        validate(netpol({"ingress": [{"ports": [{"port": 80}, {"port": 70000}]}]}, name="web"))
    assert str(info.value).startswith(
        'NetworkPolicy.networking.k8s.io "web" is invalid: spec.ingress[0].ports[1].port:'
    )


def test_policy_types_default_as_the_api_server_defaults_them() -> None:
    assert validate(netpol({}))["spec"]["policyTypes"] == ["Ingress"]
    assert validate(netpol({"egress": [{}]}))["spec"]["policyTypes"] == ["Ingress", "Egress"]
    explicit = validate(netpol({"policyTypes": ["Egress"], "ingress": [{}]}))
    assert explicit["spec"]["policyTypes"] == ["Egress"]


def test_port_protocol_defaults_to_tcp_and_ipblock_keeps_host_bits_out() -> None:
    spec = validate(
        netpol({"egress": [{"ports": [{"port": 53}], "to": [{"ipBlock": {"cidr": "10.1.2.3/8"}}]}]})
    )["spec"]
    assert spec["egress"][0]["ports"] == [{"protocol": "TCP", "port": 53}]
    assert spec["egress"][0]["to"][0]["ipBlock"] == {"cidr": "10.0.0.0/8"}


def test_a_namespace_always_carries_its_metadata_name_label() -> None:
    ns = validate(
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "x", "labels": {"kubernetes.io/metadata.name": "lie"}},
        }
    )
    assert ns["metadata"]["labels"] == {"kubernetes.io/metadata.name": "x"}


def test_namespaced_objects_default_to_the_default_namespace() -> None:
    pod = validate(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "a"},
            "spec": {"containers": [{"name": "c"}]},
        }
    )
    assert pod["metadata"]["namespace"] == "default"


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({}, "metadata.name: Required value"),
        ({"name": "Web"}, 'metadata.name: Invalid value: "Web"'),
        ({"name": "w", "namespace": "a.b"}, 'metadata.namespace: Invalid value: "a.b"'),
        ({"name": "w", "labels": {"a/b/c": "x"}}, 'metadata.labels: Invalid value: "a/b/c"'),
        ({"name": "w", "labels": {"app": "-x"}}, 'metadata.labels: Invalid value: "-x"'),
    ],
)
def test_bad_metadata_is_named(metadata: dict[str, Any], expected: str) -> None:
    document = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {"containers": [{"name": "c"}]},
    }
    assert any(e.startswith(expected) for e in field_errors(document))


def test_pod_container_ports_are_checked_and_defaulted() -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "a"},
        "spec": {
            "containers": [
                {"name": "c", "ports": [{"containerPort": 80, "name": "http"}]},
                {"name": "d", "ports": [{"containerPort": 0, "name": "Bad_Name"}]},
            ]
        },
    }
    errors = field_errors(pod)
    assert any(
        e.startswith("spec.containers[1].ports[0].containerPort: Required value") for e in errors
    )
    assert any(
        e.startswith('spec.containers[1].ports[0].name: Invalid value: "Bad_Name"') for e in errors
    )
    pod["spec"]["containers"].pop()
    assert validate(pod)["spec"]["containers"][0]["ports"][0]["protocol"] == "TCP"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({}, "spec.endpointSelector: Required value"),
        (
            {
                "endpointSelector": {},
                "ingress": [{"toPorts": [{"ports": [{"port": "80"}], "rules": {"http": [{}]}}]}],
            },
            (
                "spec.ingress[0].toPorts[0].rules: Forbidden: L7 rules (ciliate enforces L3/L4"
                " only) are not supported by ciliate"
            ),
        ),
        (
            {"endpointSelector": {}, "egress": [{"toFQDNs": [{"matchName": "example.com"}]}]},
            (
                "spec.egress[0].toFQDNs: Forbidden: toFQDNs (DNS-based policy) is not supported by"
                " ciliate (L3/L4 only)"
            ),
        ),
        (
            {"endpointSelector": {}, "ingress": [{"fromEntities": ["moon"]}]},
            'spec.ingress[0].fromEntities[0]: Unsupported value: "moon"',
        ),
        (
            {"endpointSelector": {}, "egress": [{"toPorts": [{"ports": [{"port": "99999"}]}]}]},
            'spec.egress[0].toPorts[0].ports[0].port: Invalid value: "99999"',
        ),
        (
            {
                "endpointSelector": {},
                "egressDeny": [{"toCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["12.0.0.0/8"]}]}],
            },
            (
                'spec.egressDeny[0].toCIDRSet[0].except[0]: Invalid value: "12.0.0.0/8": allow'
                " CIDR prefix 10.0.0.0/8 does not contain exclude CIDR prefix 12.0.0.0/8"
            ),
        ),
        (
            {"endpointSelector": {"matchLabels": {"k8s:app": "-x"}}},
            'spec.endpointSelector.matchLabels: Invalid value: "-x"',
        ),
    ],
)
def test_a_bad_cilium_policy_field_is_named(spec: dict[str, Any], expected: str) -> None:
    assert any(e.startswith(expected) for e in field_errors(cnp(spec)))


def test_cilium_ports_default_to_any_protocol_and_bare_ips_are_host_prefixes() -> None:
    spec = validate(
        cnp(
            {
                "endpointSelector": {},
                "egress": [{"toCIDR": ["10.1.2.3"], "toPorts": [{"ports": [{"port": 53}]}]}],
            }
        )
    )["spec"]
    assert spec["egress"][0]["toCIDR"] == ["10.1.2.3/32"]
    assert spec["egress"][0]["toPorts"] == [{"ports": [{"protocol": "ANY", "port": "53"}]}]


def test_unknown_kinds_and_wrong_api_versions_are_refused() -> None:
    with pytest.raises(UnknownKindError, match='no matches for kind "Deployment"'):
        validate({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}})
    with pytest.raises(UnknownKindError, match=r"use apiVersion networking\.k8s\.io/v1"):
        validate({"apiVersion": "v1", "kind": "NetworkPolicy", "metadata": {"name": "d"}})
    with pytest.raises(UnknownKindError, match='resource type "deployments"'):
        resolve_kind("deployments")
    assert resolve_kind("netpol").name == "NetworkPolicy"
    assert resolve_kind("ccnp").name == "CiliumClusterwideNetworkPolicy"


def test_documents_come_from_yaml_streams_json_and_lists() -> None:
    yaml_text = (
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\n---\n"
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: y}\n"
    )
    assert [d["metadata"]["name"] for d in load_documents(yaml_text)] == ["x", "y"]
    json_list = (
        '{"apiVersion": "v1", "kind": "List", "items": '
        '[{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "z"}}]}'
    )
    assert [d["metadata"]["name"] for d in load_documents(json_list)] == ["z"]
    with pytest.raises(DocumentError, match="document 1: Object 'kind' is missing"):
        load_documents("apiVersion: v1\nmetadata: {name: x}\n", source="f.yaml")
    with pytest.raises(DocumentError, match=r"f\.yaml: not valid YAML"):
        load_documents("a: [1,\n", source="f.yaml")


def test_a_missing_spec_is_the_empty_spec_as_upstream_reads_it() -> None:
    # The specs are structs, not pointers: absent means empty, judged for what it lacks.
    policy = validate(
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "p"}}
    )
    assert policy["spec"]["podSelector"] == {} and policy["spec"]["policyTypes"] == ["Ingress"]
    assert field_errors({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}}) == [
        "spec.ports: Required value"
    ]
    assert field_errors({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}}) == [
        "spec.containers: Required value"
    ]


def test_a_duplicate_prints_as_field_duplicate_does() -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c"}, {"name": "c"}]},
    }
    assert field_errors(pod) == ['spec.containers[1].name: Duplicate value: "c"']


def test_several_errors_read_as_the_api_servers_aggregate() -> None:
    with pytest.raises(ObjectInvalidError) as info:
        validate(netpol({"ingress": [{"ports": [{"port": 0}, {"port": 70000}]}]}, name="web"))
    assert str(info.value) == (
        'NetworkPolicy.networking.k8s.io "web" is invalid: [spec.ingress[0].ports[0].port:'
        " Invalid value: 0: must be between 1 and 65535, inclusive, spec.ingress[0].ports[1].port:"
        " Invalid value: 70000: must be between 1 and 65535, inclusive]"
    )
