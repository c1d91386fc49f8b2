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

from ciliate.control.objects import ObjectInvalidError, validate
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


# -- Cilium's semantics point by point (docs "Layer 3/4 examples", "Deny policies",
# -- "Entities"; pkg/k8s/apis/cilium.io/utils getEndpointSelector; pkg/policy/api) ----

X_PODS, Y_PODS, Z_PODS = ({f"{ns}/{p}" for p in "abc"} for ns in "xyz")
OUTSIDE = "198.51.100.1"


def ingress_from(world: World, dst: str, address: str, port: int = 80) -> bool:
    return world.ingress_from_identity(
        dst, world.ipcache.lookup(ipaddress.IPv4Address(address)), port
    )


def a_in_x_allows(*rules: dict[str, Any], namespace: str | None = "x") -> World:
    return World([cnp(namespace, {"endpointSelector": SELECT_A, "ingress": list(rules)})])


def test_an_empty_endpoint_selector_is_the_policy_namespace_or_the_whole_cluster() -> None:
    # "fromEndpoints: [{}]": every endpoint of the policy's namespace (CNP), every
    # pod of the cluster (CCNP: Cilium adds `namespace Exists`), never world or nodes.
    namespaced = a_in_x_allows({"fromEndpoints": [{}]})
    assert namespaced.sources_of("x/a") == X_PODS - {"x/a"}
    clusterwide = a_in_x_allows({"fromEndpoints": [{}]}, namespace=None)
    for world in (namespaced, clusterwide):
        assert not world.ingress_from_identity("x/a", WORLD_IDENTITY)
        assert not world.ingress_from_identity("x/a", REMOTE_NODE_IDENTITY)
        assert not ingress_from(world, "x/a", OUTSIDE)
    for target in ("x/a", "y/a", "z/a"):
        assert clusterwide.sources_of(target) == ALL_BUT[target]
    egress = World([cnp("y", {"endpointSelector": {}, "egress": [{"toEndpoints": [{}]}]})])
    assert {d for d in PODS if egress.allowed("y/a", d)} == Y_PODS
    assert not egress.egress_to("y/a", str(HOST_IP)) and not egress.egress_to("y/a", OUTSIDE)


@pytest.mark.parametrize(
    ("selector", "sources"),
    [
        ({"matchLabels": {"k8s:io.kubernetes.pod.namespace": "y"}}, Y_PODS),
        ({"matchLabels": {"io.kubernetes.pod.namespace": "y"}}, Y_PODS),
        ({"matchLabels": {"any:io.kubernetes.pod.namespace": "y", "pod": "c"}}, {"y/c"}),
        (
            {
                "matchExpressions": [
                    {
                        "key": "k8s:io.kubernetes.pod.namespace",
                        "operator": "In",
                        "values": ["y", "z"],
                    }
                ]
            },
            Y_PODS | Z_PODS,
        ),
        ({"matchLabels": {"k8s:io.cilium.k8s.namespace.labels.ns": "z"}}, Z_PODS),
        ({"matchLabels": {"io.cilium.k8s.namespace.labels.ns": "z", "k8s:pod": "b"}}, {"z/b"}),
        # Another source's namespace label does not lift the policy's namespace scope.
        ({"matchLabels": {"container:io.kubernetes.pod.namespace": "y"}}, set()),
    ],
)
def test_namespace_selectors_in_ciliums_label_forms(
    selector: dict[str, Any], sources: set[str]
) -> None:
    assert a_in_x_allows({"fromEndpoints": [selector]}).sources_of("x/a") == sources


@pytest.mark.parametrize(
    ("key", "sources"),
    [("k8s:pod", {"x/b"}), ("any:pod", {"x/b"}), ("pod", {"x/b"}), ("container:pod", set())],
)
def test_label_sources_match_their_own_source_or_any(key: str, sources: set[str]) -> None:
    world = a_in_x_allows({"fromEndpoints": [{"matchLabels": {key: "b"}}]})
    assert world.sources_of("x/a") == sources


def test_reserved_labels_select_reserved_identities_and_world_covers_cidrs() -> None:
    def egress(*selectors: dict[str, Any]) -> World:
        return World(
            [
                cnp(
                    "x",
                    {"endpointSelector": SELECT_A, "egress": [{"toEndpoints": list(selectors)}]},
                ),
                # Makes 203.0.113.0/24 a CIDR identity, which reserved:world covers.
                cnp(
                    "z",
                    {"endpointSelector": {}, "egress": [{"toCIDR": ["203.0.113.0/24"]}]},
                    name="c",
                ),
            ]
        )

    host = egress({"matchLabels": {"reserved:host": ""}})
    assert host.egress_to("x/a", str(HOST_IP))
    assert not host.egress_to("x/a", str(OTHER_NODE_IP)) and not host.allowed("x/a", "x/b")
    world = egress({"matchLabels": {"reserved:world": ""}})
    assert world.egress_to("x/a", OUTSIDE) and world.egress_to("x/a", "203.0.113.9")
    assert not world.egress_to("x/a", str(HOST_IP)) and not world.allowed("x/a", "y/b")
    remote = egress({"matchExpressions": [{"key": "reserved:remote-node", "operator": "Exists"}]})
    assert remote.egress_to("x/a", str(OTHER_NODE_IP)) and not remote.egress_to("x/a", OUTSIDE)


@pytest.mark.parametrize(
    ("expression", "subjects", "sources"),
    [
        ({"key": "pod", "operator": "In", "values": ["a", "b"]}, {"x/a", "x/b"}, {"x/a", "x/b"}),
        ({"key": "pod", "operator": "NotIn", "values": ["a"]}, {"x/b", "x/c"}, {"x/b", "x/c"}),
        ({"key": "k8s:pod", "operator": "Exists"}, X_PODS, X_PODS),
        ({"key": "pod", "operator": "DoesNotExist"}, set(), set()),
    ],
)
def test_match_expressions_select_subjects_and_peers(
    expression: dict[str, Any], subjects: set[str], sources: set[str]
) -> None:
    selector = {"matchExpressions": [expression]}
    world = World(
        [cnp("x", {"endpointSelector": selector, "ingress": [{"fromEndpoints": [selector]}]})]
    )
    enforced = {ref for ref, p in world.result.endpoints.items() if p.ingress_enforced}
    assert enforced == subjects
    for target in subjects:
        assert world.sources_of(target) == sources - {target}
    # A peer selector matching nothing in the namespace matches no reserved identity.
    if not sources and subjects:
        assert not world.ingress_from_identity(next(iter(subjects)), WORLD_IDENTITY)


def test_a_namespace_key_in_a_clusterwide_selector_drops_the_pods_only_scope() -> None:
    # Cilium adds `namespace Exists` only when the selector names no namespace: a
    # NotIn on the namespace label also matches identities without one (world, nodes).
    selector = {
        "matchExpressions": [
            {"key": "k8s:io.kubernetes.pod.namespace", "operator": "NotIn", "values": ["x"]}
        ]
    }
    world = a_in_x_allows({"fromEndpoints": [selector]}, namespace=None)
    assert world.sources_of("x/a") == Y_PODS | Z_PODS
    assert world.ingress_from_identity("x/a", WORLD_IDENTITY)
    assert world.ingress_from_identity("x/a", REMOTE_NODE_IDENTITY)


def test_a_namespaced_policy_never_selects_endpoints_of_another_namespace() -> None:
    # Cilium replaces a namespace match in a CNP's endpointSelector with its own.
    subject = {"matchLabels": {"k8s:io.kubernetes.pod.namespace": "y", "pod": "a"}}
    world = World([cnp("x", {"endpointSelector": subject, "ingress": [{}]})])
    enforced = {ref for ref, p in world.result.endpoints.items() if p.ingress_enforced}
    assert enforced == {"x/a"}


def test_a_policy_selecting_nothing_changes_nothing() -> None:
    world = World(
        [
            cnp("x", {"endpointSelector": {"matchLabels": {"pod": "nobody"}}, "ingress": [{}]}),
            cnp(None, {"endpointSelector": {"matchLabels": {"k8s:pod": "nobody"}}, "egress": [{}]}),
        ]
    )
    assert not any(p.ingress_enforced or p.egress_enforced for p in world.result.endpoints.values())
    assert all(world.sources_of(p) == ALL_BUT[p] for p in PODS)


def test_empty_sections_and_lists() -> None:
    # `ingress: []` does not enforce; `ingress: [{}]` enforces and allows nothing; a
    # present but empty peer list selects nothing, even with ports (Cilium's
    # SetAggregatedSelectors: "explicitly check for empty non-nil slices").
    assert a_in_x_allows().sources_of("x/a") == ALL_BUT["x/a"]
    assert a_in_x_allows({}).sources_of("x/a") == set()
    ports = {"toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}
    assert a_in_x_allows({"fromEndpoints": [], **ports}).sources_of("x/a") == set()
    assert a_in_x_allows({"fromEntities": [], **ports}).sources_of("x/a") == set()
    assert a_in_x_allows(ports).sources_of("x/a") == ALL_BUT["x/a"]


def test_an_ingress_deny_alone_puts_the_endpoint_in_default_deny() -> None:
    # enableDefaultDeny's default: "true for each traffic direction that has rules"
    # (Ingress or IngressDeny).
    world = World(
        [
            cnp(
                "x",
                {
                    "endpointSelector": SELECT_A,
                    "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"pod": "b"}}]}],
                },
            )
        ]
    )
    assert world.result.endpoints["x/a"].ingress_enforced
    assert world.sources_of("x/a") == set()
    assert world.ingress_from_identity("x/a", HOST_IDENTITY)


def _raw_world(policies: Sequence[dict[str, Any]]) -> World:
    """A World whose policies skip validation (for what validation refuses today)."""
    world = World([])
    inp = PolicyInput(
        pods=world.input.pods, policies=list(policies), node_identities=world.input.node_identities
    )
    world.input, world.result = inp, compute(inp)
    world.ipcache = Ipcache.build(
        pods=inp.pods, result=world.result, node_identities=inp.node_identities
    )
    return world


@pytest.mark.parametrize(
    ("entity", "identities"),
    [
        ("init", {5}),
        ("health", {4}),
        ("unmanaged", {3}),
        ("kube-apiserver", {7}),
        ("ingress", {8}),
        ("world-ipv4", {WORLD_IDENTITY}),
        ("world-ipv6", set()),
        ("none", set()),
    ],
)
def test_the_other_entities_map_to_their_reserved_identities(
    entity: str, identities: set[int]
) -> None:
    policy = cnp("x", {"endpointSelector": SELECT_A, "egress": [{"toEntities": [entity]}]})
    world = _raw_world([policy])
    entries = world.result.endpoints["x/a"].entries
    assert {e.identity for e in entries if e.direction == "egress"} == identities
    validate(policy)  # the API accepts every entity the engine applies


def test_an_unknown_entity_is_an_error_not_an_empty_set() -> None:
    policy = cnp("x", {"endpointSelector": SELECT_A, "egress": [{"toEntities": ["galaxy"]}]})
    with pytest.raises(ValueError, match="galaxy"):
        _raw_world([policy])


def test_to_ports_port_zero_any_protocol_and_ranges() -> None:
    def ports(*entries: dict[str, Any]) -> World:
        rule = {"fromEndpoints": [{}], "toPorts": [{"ports": list(entries)}]}
        return a_in_x_allows(rule)

    any_tcp = ports({"port": "0", "protocol": "TCP"})
    assert any_tcp.allowed("x/b", "x/a", 80) and any_tcp.allowed("x/b", "x/a", 65000)
    assert not any_tcp.allowed("x/b", "x/a", 80, UDP)
    everything = ports({"port": "0", "protocol": "ANY"})
    assert everything.allowed("x/b", "x/a", 81, UDP) and everything.allowed("x/b", "x/a", 9, SCTP)
    icmp = decide(
        everything.result.endpoints["x/a"],
        endpoint="x/a",
        direction="ingress",
        peer_identity=everything.pods["x/b"].identity,
        protocol=1,
        port=0,
    )
    assert icmp.allowed  # port 0 of protocol ANY is every protocol, ICMP included
    ranged = ports({"port": "80", "endPort": 81})  # protocol defaults to ANY
    for protocol in (TCP, UDP, SCTP):
        assert ranged.allowed("x/b", "x/a", 81, protocol)
        assert not ranged.allowed("x/b", "x/a", 82, protocol)


def test_icmp_rules_are_refused_by_name() -> None:
    policy = cnp(
        "x",
        {"endpointSelector": SELECT_A, "ingress": [{"icmps": [{"fields": [{"type": 8}]}]}]},
    )
    with pytest.raises(ObjectInvalidError, match=r"spec\.ingress\[0\]\.icmps"):
        validate(policy)


def test_deny_wins_across_policies_and_kinds() -> None:
    allow_all = cnp(
        None, {"endpointSelector": {}, "ingress": [{"fromEntities": ["all"]}]}, name="all"
    )
    deny_b_80 = cnp(
        "x",
        {
            "endpointSelector": SELECT_A,
            "ingressDeny": [
                {
                    "fromEndpoints": [{"matchLabels": {"pod": "b"}}],
                    "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}],
                }
            ],
        },
        name="deny",
    )
    np_allow = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "np", "namespace": "x"},
        "spec": {"podSelector": {}, "ingress": [{}]},
    }
    world = World([allow_all, deny_b_80, np_allow])
    assert not world.allowed("x/b", "x/a", 80)
    assert world.allowed("x/b", "x/a", 81) and world.allowed("x/b", "x/a", 80, UDP)
    assert world.allowed("x/c", "x/a", 80)
    outcome = trace(
        world.result,
        src=world.pods["x/b"],
        dst=world.pods["x/a"],
        protocol=TCP,
        port=80,
        ipcache=world.ipcache,
    )
    assert "CiliumNetworkPolicy x/deny spec.ingressDeny[0]" in outcome.lines()[-2]


def test_from_cidr_set_with_except_on_ingress() -> None:
    rule = {"fromCIDRSet": [{"cidr": "198.51.100.0/24", "except": ["198.51.100.0/28"]}]}
    world = a_in_x_allows(rule)
    assert ingress_from(world, "x/a", "198.51.100.77")
    assert not ingress_from(world, "x/a", "198.51.100.7")
    assert not ingress_from(world, "x/a", "192.0.2.1")
    assert world.sources_of("x/a") == set()


def test_cidr_rules_select_neither_pods_nor_nodes() -> None:
    # Cilium: "CIDR rules do not apply to traffic where both sides of the connection
    # are either managed by Cilium or use an IP belonging to a node in the cluster".
    world = World(
        [
            cnp(
                "x",
                {
                    "endpointSelector": SELECT_A,
                    "egress": [
                        {"toCIDR": ["0.0.0.0/0"]},
                        {"toCIDRSet": [{"cidr": "192.168.100.0/24"}]},
                    ],
                },
            )
        ]
    )
    assert world.egress_to("x/a", "192.168.100.77") and world.egress_to("x/a", OUTSIDE)
    assert not world.egress_to("x/a", str(HOST_IP))
    assert not world.egress_to("x/a", str(OTHER_NODE_IP))
    assert not any(world.allowed("x/a", dst) for dst in ALL_BUT["x/a"])


# -- policy trace names the deciding rule ----------------------------------------------


def trace_lines(world: World, src: str, dst: str, port: int = 80, protocol: int = TCP) -> list[str]:
    return trace(
        world.result,
        src=world.pods[src],
        dst=world.pods[dst],
        protocol=protocol,
        port=port,
        ipcache=world.ipcache,
    ).lines()


def test_trace_names_the_rule_of_each_kind_of_decision() -> None:
    world = World(
        [
            cnp(
                "x",
                {
                    "endpointSelector": SELECT_A,
                    "ingress": [{"fromEndpoints": [{"matchLabels": {"pod": "b"}}]}],
                },
                {
                    "endpointSelector": {"matchLabels": {"pod": "b"}},
                    "egress": [
                        {"toEntities": ["world"]},
                        {"toEndpoints": [{}], "toPorts": [{"ports": [{"port": "81"}]}]},
                    ],
                    "egressDeny": [{"toEndpoints": [{"matchLabels": {"pod": "c"}}]}],
                },
            ),
            cnp(
                None,
                {"endpointSelector": {"matchLabels": {"pod": "c"}}, "ingress": [{}]},
                name="lock",
            ),
        ]
    )
    # An allow: the rule and the entry.
    assert world.allowed("x/b", "x/a", 81)
    lines = trace_lines(world, "x/b", "x/a", 81)
    assert "egress at x/b: allowed: CiliumNetworkPolicy x/p specs[1].egress[1]" in lines[0]
    assert "ingress at x/a: allowed: CiliumNetworkPolicy x/p specs[0].ingress[0]" in lines[1]
    # Egress on a port no rule names: default deny, naming the isolating rule set.
    lines = trace_lines(world, "x/b", "x/a", 80)
    assert "isolated for egress by CiliumNetworkPolicy x/p specs[1]" in lines[0]
    assert lines[-1] == "verdict: DENIED" and len(lines) == 2
    # A deny rule names itself, over the allow of the same peer.
    lines = trace_lines(world, "x/b", "x/c", 81)
    assert "denied: CiliumNetworkPolicy x/p specs[1].egressDeny[0]" in lines[0]
    # An empty rule (`ingress: [{}]`) of a clusterwide policy: isolated, nothing allowed.
    lines = trace_lines(world, "y/a", "z/c")
    assert "not enforced" in lines[0]
    assert "isolated for ingress by CiliumClusterwideNetworkPolicy lock spec" in lines[1]
    # The node's standing allow is named as the default it is.
    host = decide(
        world.result.endpoints["x/a"],
        endpoint="x/a",
        direction="ingress",
        peer_identity=HOST_IDENTITY,
        protocol=TCP,
        port=80,
    )
    assert host.allowed and "traffic from the node itself" in host.because


# -- enableDefaultDeny (Cilium 1.15) -------------------------------------------------------


def test_default_deny_off_lets_everything_in_but_what_its_deny_names() -> None:
    policy = validate(
        cnp(
            "x",
            {
                "endpointSelector": SELECT_A,
                "enableDefaultDeny": {"ingress": False},
                "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"pod": "b"}}]}],
            },
        )
    )
    world = World([policy])
    assert world.sources_of("x/a") == ALL_BUT["x/a"] - {"x/b"}
    endpoint = world.result.endpoints["x/a"]
    assert endpoint.ingress_enforced and not endpoint.egress_enforced
    why = trace(
        world.result,
        src=world.pods["x/c"],
        dst=world.pods["x/a"],
        protocol=TCP,
        port=80,
        ipcache=world.ipcache,
    )
    assert why.allowed and "enableDefaultDeny.ingress: false" in str(why)


def test_default_deny_off_with_only_allows_isolates_nothing() -> None:
    policy = validate(
        cnp(
            "x",
            {
                "endpointSelector": SELECT_A,
                "enableDefaultDeny": {"ingress": False, "egress": False},
                "ingress": [{"fromEndpoints": [{"matchLabels": {"pod": "b"}}]}],
                "egress": [{"toEndpoints": [{"matchLabels": {"pod": "b"}}]}],
            },
        )
    )
    world = World([policy])
    assert world.sources_of("x/a") == ALL_BUT["x/a"]
    assert world.allowed("x/a", "y/c")


def test_another_policy_with_default_deny_isolates_and_the_allows_add_up() -> None:
    broad = validate(
        cnp(
            "x",
            {
                "endpointSelector": SELECT_A,
                "enableDefaultDeny": {"ingress": False},
                "ingress": [{"fromEndpoints": [{"matchLabels": {"pod": "b"}}]}],
            },
            name="broad",
        )
    )
    strict = validate(
        cnp(
            "x",
            {
                "endpointSelector": SELECT_A,
                "ingress": [{"fromEndpoints": [{"matchLabels": {"pod": "c"}}]}],
            },
            name="strict",
        )
    )
    assert World([broad, strict]).sources_of("x/a") == {"x/b", "x/c"}


def test_default_deny_on_isolates_a_direction_without_rules() -> None:
    policy = validate(
        cnp(
            "x",
            {
                "endpointSelector": SELECT_A,
                "enableDefaultDeny": {"egress": True},
                "ingress": [{"fromEndpoints": [{"matchLabels": {"pod": "b"}}]}],
            },
        )
    )
    world = World([policy])
    assert world.result.endpoints["x/a"].egress_enforced
    assert not world.allowed("x/a", "x/b")
    assert world.sources_of("x/a") == {"x/b"}


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ({"ingress": "false"}, "spec.enableDefaultDeny.ingress"),
        ({"sideways": True}, "spec.enableDefaultDeny.sideways"),
        (True, "spec.enableDefaultDeny"),
    ],
)
def test_default_deny_must_be_booleans_per_direction(value: object, path: str) -> None:
    policy = cnp("x", {"endpointSelector": SELECT_A, "enableDefaultDeny": value})
    with pytest.raises(ObjectInvalidError) as refused:
        validate(policy)
    assert f"{path}:" in str(refused.value)
