"""CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy, L3/L4, on the e2e model's
pods: endpoint selectors (namespace-bound, the k8s: source, namespace labels), CIDRs
and CIDR sets with except, entities, toPorts (protocol, ANY, endPort, named), and deny
rules winning over allow rules. Each test decides packets with the reference
evaluator, the decision the datapath makes."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from ciliate.control.policy.engine import PolicyInput, compute
from ciliate.control.policy.evaluate import Ipcache, decide, trace
from ciliate.control.policy.inputs import input_from_objects
from ciliate.control.policy.model import (
    HOST_IDENTITY,
    REMOTE_NODE_IDENTITY,
    WORLD_IDENTITY,
    PolicyEntry,
    PolicyResult,
)

from .engine_runner import by_kind
from .model import PODS, Stage, default_pod_ips

IPS = default_pod_ips()
TCP, UDP, SCTP = 6, 17, 132
HOST_IP = ipaddress.IPv4Address("192.168.100.2")
OTHER_NODE_IP = ipaddress.IPv4Address("192.168.100.3")


def cnp(namespace: str | None, *rules: Mapping[str, Any], name: str = "p") -> dict[str, Any]:
    kind = "CiliumNetworkPolicy" if namespace else "CiliumClusterwideNetworkPolicy"
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    body: dict[str, Any] = {"spec": rules[0]} if len(rules) == 1 else {"specs": list(rules)}
    return {"apiVersion": "cilium.io/v2", "kind": kind, "metadata": metadata, **body}


class World:
    """The model's pods with some policies in force, and the evaluator over them."""

    def __init__(self, policies: Sequence[dict[str, Any]]) -> None:
        self.input: PolicyInput = input_from_objects(
            by_kind(Stage(policies, []).objects(IPS)),
            node_identities={HOST_IP: HOST_IDENTITY, OTHER_NODE_IP: REMOTE_NODE_IDENTITY},
        )
        self.result: PolicyResult = compute(self.input)
        self.ipcache = Ipcache.build(
            pods=self.input.pods, result=self.result, node_identities=self.input.node_identities
        )
        self.pods = {pod.ref: pod for pod in self.input.pods}

    def allowed(self, src: str, dst: str, port: int = 80, protocol: int = TCP) -> bool:
        return trace(
            self.result,
            src=self.pods[src],
            dst=self.pods[dst],
            protocol=protocol,
            port=port,
            ipcache=self.ipcache,
        ).allowed

    def sources_of(self, dst: str, port: int = 80, protocol: int = TCP) -> set[str]:
        return {src for src in PODS if src != dst and self.allowed(src, dst, port, protocol)}

    def egress_to(self, src: str, address: str, port: int = 80, protocol: int = TCP) -> bool:
        peer = self.ipcache.lookup(ipaddress.IPv4Address(address))
        return decide(
            self.result.endpoints.get(src),
            endpoint=src,
            direction="egress",
            peer_identity=peer,
            protocol=protocol,
            port=port,
        ).allowed

    def ingress_from_identity(self, dst: str, identity: int, port: int = 80) -> bool:
        return decide(
            self.result.endpoints.get(dst),
            endpoint=dst,
            direction="ingress",
            peer_identity=identity,
            protocol=TCP,
            port=port,
        ).allowed


ALL_BUT = {p: set(PODS) - {p} for p in PODS}
SELECT_A = {"matchLabels": {"pod": "a"}}


def test_from_endpoints_stay_in_the_policy_namespace() -> None:
    world = World(
        [
            cnp(
                "x",
                {
                    "endpointSelector": SELECT_A,
                    "ingress": [{"fromEndpoints": [{"matchLabels": {"pod": "b"}}]}],
                },
            )
        ]
    )
    assert world.sources_of("x/a") == {"x/b"}
    assert world.sources_of("y/a") == ALL_BUT["y/a"]  # other namespaces untouched


def test_a_namespace_label_in_the_selector_reaches_other_namespaces() -> None:
    selector = {"matchLabels": {"k8s:io.kubernetes.pod.namespace": "y", "k8s:pod": "b"}}
    world = World(
        [cnp("x", {"endpointSelector": SELECT_A, "ingress": [{"fromEndpoints": [selector]}]})]
    )
    assert world.sources_of("x/a") == {"y/b"}


def test_namespace_labels_select_in_ciliums_form() -> None:
    selector = {"matchLabels": {"io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name": "z"}}
    world = World(
        [cnp("x", {"endpointSelector": SELECT_A, "ingress": [{"fromEndpoints": [selector]}]})]
    )
    assert world.sources_of("x/a") == {"z/a", "z/b", "z/c"}


def test_to_endpoints_limit_egress_and_an_empty_rule_denies_everything() -> None:
    world = World(
        [
            cnp(
                "x",
                {
                    "endpointSelector": SELECT_A,
                    "egress": [{"toEndpoints": [{"matchLabels": {"pod": "c"}}]}],
                },
            ),
            cnp("y", {"endpointSelector": {}, "ingress": [{}]}, name="deny"),
        ]
    )
    assert {d for d in PODS if d != "x/a" and world.allowed("x/a", d)} == {"x/c"}
    assert world.sources_of("y/b") == set()


def test_a_clusterwide_policy_selects_across_namespaces() -> None:
    world = World(
        [
            cnp(
                None,
                {
                    "endpointSelector": SELECT_A,
                    "ingress": [{"fromEndpoints": [{"matchLabels": {"pod": "c"}}]}],
                },
            )
        ]
    )
    for target in ("x/a", "y/a", "z/a"):
        assert world.sources_of(target) == {"x/c", "y/c", "z/c"}


def test_cidr_rules_match_world_addresses_not_pods() -> None:
    world = World(
        [cnp("x", {"endpointSelector": SELECT_A, "egress": [{"toCIDR": ["192.0.2.0/24"]}]})]
    )
    assert world.egress_to("x/a", "192.0.2.7")
    assert not world.egress_to("x/a", "198.51.100.1")
    # A CIDR rule covering the pod network does not select pods (Cilium's semantics).
    wide = World([cnp("x", {"endpointSelector": SELECT_A, "egress": [{"toCIDR": ["10.0.0.0/8"]}]})])
    assert not wide.allowed("x/a", "y/a")
    assert wide.egress_to("x/a", "10.1.2.3")


def test_cidr_sets_honour_except() -> None:
    rule = {"toCIDRSet": [{"cidr": "192.0.2.0/24", "except": ["192.0.2.128/25"]}]}
    world = World([cnp("x", {"endpointSelector": SELECT_A, "egress": [rule]})])
    assert world.egress_to("x/a", "192.0.2.7")
    assert not world.egress_to("x/a", "192.0.2.200")
    assert set(world.result.cidr_identities) == {
        ipaddress.IPv4Network("192.0.2.0/24"),
        ipaddress.IPv4Network("192.0.2.128/25"),
    }
    assert all(i >= 1 << 24 for i in world.result.cidr_identities.values())


@pytest.mark.parametrize(
    ("entity", "reaches"),
    [
        ("host", {"host"}),
        ("remote-node", {"remote-node"}),
        ("world", {"world", "cidr"}),
        ("cluster", {"pods", "host", "remote-node"}),
        ("all", {"pods", "host", "remote-node", "world", "cidr"}),
    ],
)
def test_entities_map_to_reserved_identities(entity: str, reaches: set[str]) -> None:
    world = World(
        [
            cnp("x", {"endpointSelector": SELECT_A, "egress": [{"toEntities": [entity]}]}),
            # Makes 203.0.113.0/24 a CIDR identity, which world covers too.
            cnp(
                "z", {"endpointSelector": {}, "egress": [{"toCIDR": ["203.0.113.0/24"]}]}, name="c"
            ),
        ]
    )
    got = set()
    if world.allowed("x/a", "y/b"):
        got.add("pods")
    if world.egress_to("x/a", str(HOST_IP)):
        got.add("host")
    if world.egress_to("x/a", str(OTHER_NODE_IP)):
        got.add("remote-node")
    if world.egress_to("x/a", "198.51.100.1"):
        got.add("world")
    if world.egress_to("x/a", "203.0.113.9"):
        got.add("cidr")
    assert got == reaches


def test_from_entities_host_and_world_on_ingress() -> None:
    world = World(
        [cnp("x", {"endpointSelector": SELECT_A, "ingress": [{"fromEntities": ["world"]}]})]
    )
    assert world.ingress_from_identity("x/a", WORLD_IDENTITY)
    assert not world.ingress_from_identity("x/a", REMOTE_NODE_IDENTITY)
    assert world.sources_of("x/a") == set()
    assert world.ingress_from_identity("x/a", HOST_IDENTITY)  # the node is always let in


def test_to_ports_protocol_any_and_end_port() -> None:
    def ports(*entries: dict[str, Any]) -> World:
        rule = {"fromEndpoints": [{}], "toPorts": [{"ports": list(entries)}]}
        return World([cnp("x", {"endpointSelector": SELECT_A, "ingress": [rule]})])

    tcp80 = ports({"port": "80", "protocol": "TCP"})
    assert tcp80.allowed("x/b", "x/a", 80, TCP)
    assert not tcp80.allowed("x/b", "x/a", 80, UDP)
    assert not tcp80.allowed("x/b", "x/a", 81, TCP)
    any80 = ports({"port": "80"})
    assert any80.allowed("x/b", "x/a", 80, UDP) and any80.allowed("x/b", "x/a", 80, SCTP)
    ranged = ports({"port": "80", "endPort": 81, "protocol": "UDP"})
    assert ranged.allowed("x/b", "x/a", 81, UDP) and not ranged.allowed("x/b", "x/a", 82, UDP)
    named = ports({"port": "serve-81-udp"})
    assert named.allowed("x/b", "x/a", 81, UDP) and not named.allowed("x/b", "x/a", 81, TCP)


def test_ports_without_peers_allow_every_peer_on_those_ports() -> None:
    rule = {"toPorts": [{"ports": [{"port": "81", "protocol": "TCP"}]}]}
    world = World([cnp("x", {"endpointSelector": SELECT_A, "ingress": [rule]})])
    assert world.sources_of("x/a", 81) == ALL_BUT["x/a"]
    assert world.sources_of("x/a", 80) == set()


def test_ingress_deny_wins_over_allow() -> None:
    world = World(
        [
            cnp(
                "x",
                {
                    "endpointSelector": SELECT_A,
                    "ingress": [{"fromEntities": ["cluster"]}],
                    "ingressDeny": [
                        {
                            "fromEndpoints": [
                                {"matchLabels": {"k8s:io.kubernetes.pod.namespace": "y"}}
                            ]
                        }
                    ],
                },
            )
        ]
    )
    assert world.sources_of("x/a") == ALL_BUT["x/a"] - {"y/a", "y/b", "y/c"}
    verdict = trace(
        world.result,
        src=world.pods["y/a"],
        dst=world.pods["x/a"],
        protocol=TCP,
        port=80,
        ipcache=world.ipcache,
    )
    assert "CiliumNetworkPolicy x/p spec.ingressDeny[0]" in verdict.lines()[-2]


def test_egress_deny_on_a_port_wins_over_a_kubernetes_allow() -> None:
    allow = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "allow-all", "namespace": "x"},
        "spec": {"podSelector": {}, "egress": [{}], "policyTypes": ["Egress"]},
    }
    deny = cnp(
        "x",
        {
            "endpointSelector": {},
            "egressDeny": [{"toPorts": [{"ports": [{"port": "81", "protocol": "TCP"}]}]}],
        },
    )
    world = World([allow, deny])
    assert world.allowed("x/a", "y/a", 80) and not world.allowed("x/a", "y/a", 81)
    assert world.allowed("x/a", "y/a", 81, UDP)
    # The allow-all entry stays (it still allows port 80); allows a deny fully covers go.
    entries = world.result.endpoints["x/a"].entries
    assert PolicyEntry("egress", 0, TCP, 81, 0, deny=True) in entries


def test_an_allow_fully_covered_by_a_deny_is_dropped() -> None:
    world = World(
        [
            cnp(
                "x",
                {
                    "endpointSelector": SELECT_A,
                    "ingress": [
                        {
                            "fromEndpoints": [{"matchLabels": {"pod": "b"}}],
                            "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}],
                        }
                    ],
                    "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"pod": "b"}}]}],
                },
            )
        ]
    )
    b = world.pods["x/b"].identity
    entries = world.result.endpoints["x/a"].entries
    assert PolicyEntry("ingress", b, 0, deny=True) in entries
    assert PolicyEntry("ingress", b, TCP, 80) not in entries
    assert not world.allowed("x/b", "x/a")
