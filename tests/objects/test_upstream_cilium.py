"""cilium/cilium pkg/policy/api rule_validation_test.go (and the checks of
rule_validation.go it exercises), ported for the L3/L4 subset ciliate enforces, plus
the CRD schema's required and enumerated fields.

Cilium answers a bad rule with one message and no field path (its agent sanitizes a
policy after the API server stored it); ciliate refuses at apply and names the rule's
field as the API server names a field, with Cilium's words. Rules Cilium accepts but
ciliate does not enforce (L7 rules, TLS, listeners, ICMP, toServices, nodeSelector)
are refused by name (NOT ENFORCED), never stored and ignored.
"""

from __future__ import annotations

from typing import Any

import pytest

from .upstream import error_paths, errors_text

WILDCARD: dict[str, Any] = {}


def cnp(rule: dict[str, Any], *, kind: str = "CiliumNetworkPolicy") -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": "rule"}
    if kind == "CiliumNetworkPolicy":
        metadata["namespace"] = "x"
    return {"apiVersion": "cilium.io/v2", "kind": kind, "metadata": metadata, "spec": rule}


def ingress(**fields: Any) -> dict[str, Any]:
    return {"endpointSelector": WILDCARD, "ingress": [fields]}


def egress(**fields: Any) -> dict[str, Any]:
    return {"endpointSelector": WILDCARD, "egress": [fields]}


def ports(*entries: tuple[str, str]) -> list[dict[str, Any]]:
    return [{"ports": [{"port": p, "protocol": proto} for p, proto in entries]}]


HTTP_GET = {"http": [{"method": "GET", "path": "/"}]}
INVALID_SELECTOR = {
    "matchLabels": {"any.foo": "bar", "k8s.baz": "alice"},
    "matchExpressions": [{"key": "any.foo", "operator": "asdfasdfasdf", "values": ["default"]}],
}

CASES: dict[str, tuple[dict[str, Any], list[str]]] = {
    # TestL7RulesWithNonTCPProtocols
    "valid SCTP rule": (egress(toEndpoints=[WILDCARD], toPorts=ports(("4000", "SCTP"))), []),
    "L7 HTTP rule on TCP (NOT ENFORCED)": (
        ingress(
            fromEndpoints=[WILDCARD],
            toPorts=[{"ports": [{"port": "80", "protocol": "TCP"}], "rules": HTTP_GET}],
        ),
        ["spec.ingress[0].toPorts[0].rules"],
    ),
    "serverNames for SNI (NOT ENFORCED)": (
        egress(
            toEndpoints=[WILDCARD],
            toPorts=[
                {"ports": [{"port": "443", "protocol": "TCP"}], "serverNames": ["foo.bar.com"]}
            ],
        ),
        ["spec.egress[0].toPorts[0].serverNames"],
    ),
    "listener on egress (NOT ENFORCED)": (
        egress(
            toEndpoints=[WILDCARD],
            toPorts=[
                {
                    "ports": [{"port": "443", "protocol": "TCP"}],
                    "listener": {"envoyConfig": {"name": "test-config"}, "name": "l"},
                }
            ],
        ),
        ["spec.egress[0].toPorts[0].listener"],
    ),
    # TestCIDRsanitize
    "CIDR 0.0.0.0/0": (egress(toCIDRSet=[{"cidr": "0.0.0.0/0"}]), []),
    "CIDR 10.0.0.0/24": (egress(toCIDRSet=[{"cidr": "10.0.0.0/24"}]), []),
    "CIDR 192.0.2.3/32": (egress(toCIDRSet=[{"cidr": "192.0.2.3/32"}]), []),
    "CIDR ::/0": (egress(toCIDRSet=[{"cidr": "::/0"}]), []),
    "CIDR ff02::/64": (egress(toCIDRSet=[{"cidr": "ff02::/64"}]), []),
    "CIDR 2001:0db8:85a3:0000:0000:8a2e:0370:7334/128": (
        egress(toCIDRSet=[{"cidr": "2001:0db8:85a3:0000:0000:8a2e:0370:7334/128"}]),
        [],
    ),
    "non-contiguous mask": (
        egress(toCIDRSet=[{"cidr": "10.0.0.0/254.0.0.255"}]),
        ["spec.egress[0].toCIDRSet[0].cidr"],
    ),
    "a netmask instead of a length (ParsePrefix refuses it)": (
        egress(toCIDRSet=[{"cidr": "10.0.0.0/255.0.0.0"}]),
        ["spec.egress[0].toCIDRSet[0].cidr"],
    ),
    # CIDR.Validate: an address or a prefix; CIDRRule: cidr contains each except
    "toCIDR takes a bare address": (egress(toCIDR=["192.0.2.3"]), []),
    "toCIDR empty: IP must be specified": (egress(toCIDR=[""]), ["spec.egress[0].toCIDR[0]"]),
    "except inside cidr": (
        egress(toCIDRSet=[{"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}]),
        [],
    ),
    "except equal to cidr (contained, as Cilium checks)": (
        egress(toCIDRSet=[{"cidr": "10.0.0.0/8", "except": ["10.0.0.0/8"]}]),
        [],
    ),
    "except outside cidr": (
        egress(toCIDRSet=[{"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}]),
        ["spec.egress[0].toCIDRSet[0].except[0]"],
    ),
    "except of another family": (
        egress(toCIDRSet=[{"cidr": "10.0.0.0/8", "except": ["fd00::/64"]}]),
        ["spec.egress[0].toCIDRSet[0].except[0]"],
    ),
    # TestToServicesSanitize
    "toServices (NOT ENFORCED)": (
        egress(
            toServices=[{"k8sServiceSelector": {"selector": {"matchLabels": {"app": "t"}}}}],
            toPorts=ports(("80", "TCP")),
        ),
        ["spec.egress[0].toServices"],
    ),
    # TestInvalidEndpointSelectors
    "invalid endpointSelector operator": (
        {"endpointSelector": INVALID_SELECTOR},
        ["spec.endpointSelector.matchExpressions[0].operator"],
    ),
    "invalid fromEndpoints operator": (
        ingress(fromEndpoints=[INVALID_SELECTOR]),
        ["spec.ingress[0].fromEndpoints[0].matchExpressions[0].operator"],
    ),
    "invalid toEndpoints operator": (
        egress(toEndpoints=[INVALID_SELECTOR]),
        ["spec.egress[0].toEndpoints[0].matchExpressions[0].operator"],
    ),
    "fromRequires (NOT ENFORCED)": (
        ingress(fromRequires=[INVALID_SELECTOR]),
        ["spec.ingress[0].fromRequires"],
    ),
    # TestNodeSelector
    "rule must have one of EndpointSelector or NodeSelector": ({}, ["spec.endpointSelector"]),
    "nodeSelector (NOT ENFORCED: host policies)": (
        {"nodeSelector": WILDCARD},
        ["spec.nodeSelector"],
    ),
    # TestTooManyPortsRule
    "too many ports": (
        ingress(
            fromEndpoints=[WILDCARD],
            toPorts=ports(*[(str(p), "TCP") for p in range(80, 80 + 41)]),
        ),
        ["spec.ingress[0].toPorts[0].ports"],
    ),
    "forty ports are fine": (
        ingress(
            fromEndpoints=[WILDCARD],
            toPorts=ports(*[(str(p), "TCP") for p in range(80, 80 + 40)]),
        ),
        [],
    ),
    # TestTooManyICMPFields / TestWrongICMPFieldFamily / TestICMPRuleWithOtherRuleFailed
    "ICMP rules (NOT ENFORCED)": (
        ingress(fromEndpoints=[WILDCARD], icmps=[{"fields": [{"type": 8}]}]),
        ["spec.ingress[0].icmps"],
    ),
    # TestL7RuleDirectionalitySupport
    "DNS rules on ingress (NOT ENFORCED)": (
        ingress(
            toPorts=[
                {
                    "ports": [{"port": "53", "protocol": "UDP"}],
                    "rules": {"dns": [{"matchName": "x"}]},
                }
            ]
        ),
        ["spec.ingress[0].toPorts[0].rules"],
    ),
    # TestSanitizeDefaultDeny: empty rules are valid in each direction
    "no rules at all": ({"endpointSelector": WILDCARD}, []),
    "one empty ingress rule": ({"endpointSelector": WILDCARD, "ingress": [{}]}, []),
    "one empty ingressDeny rule": ({"endpointSelector": WILDCARD, "ingressDeny": [{}]}, []),
    "empty egress and egressDeny rules": (
        {"endpointSelector": WILDCARD, "egress": [{}], "egressDeny": [{}]},
        [],
    ),
    "empty egress and ingress rules": (
        {"endpointSelector": WILDCARD, "egress": [{}], "ingress": [{}]},
        [],
    ),
    # IngressCommonRule/EgressCommonRule.Validate: one kind of L3 peer per rule
    "combining fromEndpoints and fromCIDR": (
        ingress(fromEndpoints=[WILDCARD], fromCIDR=["10.0.0.0/8"]),
        ["spec.ingress[0]"],
    ),
    "combining fromCIDRSet and fromEntities": (
        ingress(fromCIDRSet=[{"cidr": "10.0.0.0/8"}], fromEntities=["world"]),
        ["spec.ingress[0]"],
    ),
    "combining toEndpoints and toEntities (deny)": (
        {
            "endpointSelector": WILDCARD,
            "egressDeny": [{"toEndpoints": [{}], "toEntities": ["all"]}],
        },
        ["spec.egressDeny[0]"],
    ),
    "several peers of one kind": (ingress(fromCIDR=["10.0.0.0/8", "192.168.0.0/16"]), []),
    "an empty list does not count as a peer kind": (
        ingress(fromEndpoints=[WILDCARD], fromCIDR=[]),
        [],
    ),
    # PortProtocol.Validate and the CRD schema
    "port is required": (
        ingress(toPorts=[{"ports": [{"protocol": "TCP"}]}]),
        ["spec.ingress[0].toPorts[0].ports[0].port"],
    ),
    "port 0 means every port": (ingress(toPorts=ports(("0", "TCP"))), []),
    "port above 65535": (
        ingress(toPorts=ports(("65536", "TCP"))),
        ["spec.ingress[0].toPorts[0].ports[0].port"],
    ),
    "named port": (ingress(toPorts=ports(("http-alt", "TCP"))), []),
    "protocol outside the CRD's enum (case-sensitive)": (
        ingress(toPorts=ports(("80", "tcp"))),
        ["spec.ingress[0].toPorts[0].ports[0].protocol"],
    ),
    "every entity Cilium knows": (
        ingress(fromEntities=["kube-apiserver", "health", "init", "unmanaged", "ingress", "none"]),
        [],
    ),
    "an entity Cilium does not know": (
        ingress(fromEntities=["kube-apiserver", "moon"]),
        ["spec.ingress[0].fromEntities[1]"],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_cilium_rule_validation(name: str) -> None:
    rule, paths = CASES[name]
    assert error_paths(cnp(rule)) == sorted(paths)
    # The clusterwide kind takes the same rules.
    assert error_paths(cnp(rule, kind="CiliumClusterwideNetworkPolicy")) == sorted(paths)


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (
            ingress(fromEndpoints=[WILDCARD], fromCIDR=["10.0.0.0/8"]),
            "spec.ingress[0]: Forbidden: combining fromEndpoints and fromCIDR is not supported yet",
        ),
        (
            egress(toCIDRSet=[{"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}]),
            'spec.egress[0].toCIDRSet[0].except[0]: Invalid value: "11.0.0.0/16": allow CIDR'
            " prefix 10.0.0.0/8 does not contain exclude CIDR prefix 11.0.0.0/16",
        ),
        (
            ingress(toPorts=ports(*[(str(p), "TCP") for p in range(80, 121)])),
            "spec.ingress[0].toPorts[0].ports: Invalid value: 41: too many ports, the max is 40",
        ),
        (
            {"endpointSelector": INVALID_SELECTOR},
            'spec.endpointSelector.matchExpressions[0].operator: Invalid value: "asdfasdfasdf":'
            " not a valid selector operator",
        ),
    ],
)
def test_the_messages_are_ciliums(rule: dict[str, Any], expected: str) -> None:
    texts = errors_text(cnp(rule))
    assert any(e.startswith(expected) for e in texts), texts


def test_a_policy_without_spec_or_specs_is_refused() -> None:
    document = cnp({})
    del document["spec"]
    assert errors_text(document) == [
        "spec: Required value: a Cilium policy needs `spec` or `specs`"
    ]
