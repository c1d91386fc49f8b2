"""CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy through the real datapath
of one node: deny over allow, entities, ports (port 0, ranges by protocol), an
ingressDeny alone enforcing, the namespace scope of an empty peer selector (CNP vs
CCNP), CIDR rules not selecting pods. (Every feature is also covered, packet-free,
against the engine in tests/policy/test_cilium.py.)"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from ciliate.control.lab import lab
from tests.policy.datapath_runner import POD_SCRIPT, PROBE_TIMEOUT_S

from .conftest import NodeLab
from .test_policy import apply, delete, pod_object


class Pod:
    """A pod serving TCP/UDP 80 and 81 and probing on command (netpol_pod.py)."""

    def __init__(self, state: lab.PodState) -> None:
        self.state = state
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", state.netns, sys.executable, str(POD_SCRIPT), str(state.ip)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def reaches(self, other: Pod, port: int, protocol: str = "TCP") -> bool:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"probe {protocol} {port} {PROBE_TIMEOUT_S} {other.state.ip}\n")
        self.proc.stdin.flush()
        return bool(json.loads(self.proc.stdout.readline())[str(other.state.ip)])

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=5)


@pytest.fixture
def pods(node_lab: NodeLab) -> Iterator[dict[str, Pod]]:
    made = {name: node_lab.pod() for name in ("a", "b", "c")}
    apply(node_lab, *(pod_object(pod, app=name) for name, pod in made.items()))
    for pod in made.values():
        node_lab.add(pod)
    running = {name: Pod(pod) for name, pod in made.items()}
    yield running
    for pod in running.values():
        pod.close()
    for state in made.values():
        node_lab.cni(state, "DEL")
    delete(node_lab, *(pod_object(pod) for pod in made.values()))


def trace(node_lab: NodeLab, src: Pod, dst: Pod, port: int, protocol: int = 6) -> Any:
    with node_lab.api as client:
        return client.post(
            "/v1/policy/trace",
            {
                "src": f"default/{src.state.name}",
                "dst": f"default/{dst.state.name}",
                "protocol": protocol,
                "port": port,
            },
        )


def cnp(name: str, spec: Mapping[str, Any], *, clusterwide: bool = False) -> dict[str, Any]:
    kind = "CiliumClusterwideNetworkPolicy" if clusterwide else "CiliumNetworkPolicy"
    metadata: dict[str, Any] = {"name": name}
    if not clusterwide:
        metadata["namespace"] = "default"
    return {"apiVersion": "cilium.io/v2", "kind": kind, "metadata": metadata, "spec": dict(spec)}


def test_ingress_deny_wins_over_an_allow(node_lab: NodeLab, pods: dict[str, Pod]) -> None:
    a, b, c = pods["a"], pods["b"], pods["c"]
    policy = cnp(
        "b-in",
        {
            "endpointSelector": {"matchLabels": {"app": "b"}},
            "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "a"}}]}],
            "ingressDeny": [
                {
                    "fromEndpoints": [{"matchLabels": {"app": "a"}}],
                    "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}],
                }
            ],
        },
    )
    apply(node_lab, policy)
    try:
        assert not a.reaches(b, 80)  # allowed and denied: denied
        assert a.reaches(b, 81)  # allowed only
        assert a.reaches(b, 80, "UDP")  # the deny names TCP
        assert not c.reaches(b, 81)  # not allowed: isolated by the policy
        assert b.reaches(c, 80)  # b's egress is not isolated
        # The agent's trace (what `ciliate policy trace` prints) names what decided.
        denied = trace(node_lab, a, b, 80)
        assert not denied["allowed"]
        assert "CiliumNetworkPolicy default/b-in spec.ingressDeny[0]" in denied["lines"][1]
        allowed = trace(node_lab, a, b, 81)
        assert allowed["allowed"]
        assert "CiliumNetworkPolicy default/b-in spec.ingress[0]" in allowed["lines"][1]
        by_default = trace(node_lab, c, b, 81)
        assert not by_default["allowed"] and "(default deny)" in by_default["lines"][1]
        assert "not enforced" in trace(node_lab, b, c, 80)["lines"][0]
    finally:
        delete(node_lab, policy)
    assert a.reaches(b, 80) and c.reaches(b, 81)


def test_a_clusterwide_egress_deny_to_the_cluster_entity(
    node_lab: NodeLab, pods: dict[str, Pod]
) -> None:
    a, b, c = pods["a"], pods["b"], pods["c"]
    policy = cnp(
        "a-out",
        {
            "endpointSelector": {"matchLabels": {"app": "a"}},
            "egress": [{"toEntities": ["all"]}],
            "egressDeny": [{"toEntities": ["cluster"], "toPorts": [{"ports": [{"port": "81"}]}]}],
        },
        clusterwide=True,
    )
    apply(node_lab, policy)
    try:
        assert a.reaches(b, 80) and a.reaches(c, 80, "UDP")
        assert not a.reaches(b, 81) and not a.reaches(c, 81, "UDP")  # any protocol on 81
        assert b.reaches(a, 81)  # a's ingress is not isolated; replies pass
    finally:
        delete(node_lab, policy)


def test_from_entities_host_lets_only_the_node_in(node_lab: NodeLab, pods: dict[str, Pod]) -> None:
    a, b = pods["a"], pods["b"]
    policy = cnp(
        "b-host-only",
        {
            "endpointSelector": {"matchLabels": {"app": "b"}},
            "ingress": [{"fromEntities": ["host"]}],
        },
    )
    apply(node_lab, policy)
    try:
        assert not a.reaches(b, 80)
        assert lab.ping(node_lab.node.netns, str(b.state.ip))
    finally:
        delete(node_lab, policy)


@pytest.fixture
def outsider(node_lab: NodeLab, pods: dict[str, Pod]) -> Iterator[Pod]:
    """A pod labelled like ``a`` but in namespace ``other``."""
    state = lab.add_pod_netns(
        node_lab.state, node_lab.node, f"o{secrets.token_hex(2)}", namespace="other"
    )
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": state.name, "namespace": "other", "labels": {"app": "a"}},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]},
    }
    apply(node_lab, namespace, pod)
    node_lab.add(state)
    running = Pod(state)
    yield running
    running.close()
    node_lab.cni(state, "DEL")
    delete(node_lab, pod, namespace)


def test_an_empty_peer_selector_is_the_namespace_of_a_cnp_and_the_cluster_of_a_ccnp(
    node_lab: NodeLab, pods: dict[str, Pod], outsider: Pod
) -> None:
    a, b = pods["a"], pods["b"]
    spec = {"endpointSelector": {"matchLabels": {"app": "b"}}, "ingress": [{"fromEndpoints": [{}]}]}
    namespaced = cnp("b-in", spec)
    apply(node_lab, namespaced)
    try:
        assert a.reaches(b, 80) and a.reaches(b, 81, "UDP")
        assert not outsider.reaches(b, 80)  # same labels as a, another namespace
    finally:
        delete(node_lab, namespaced)
    clusterwide = cnp("b-in", spec, clusterwide=True)
    apply(node_lab, clusterwide)
    try:
        assert a.reaches(b, 80) and outsider.reaches(b, 80)
        assert lab.ping(node_lab.node.netns, str(b.state.ip))  # the node, always
    finally:
        delete(node_lab, clusterwide)


def test_port_zero_any_port_and_an_ingress_deny_alone_enforcing(
    node_lab: NodeLab, pods: dict[str, Pod]
) -> None:
    a, b, c = pods["a"], pods["b"], pods["c"]
    ports = cnp(
        "b-ports",
        {
            "endpointSelector": {"matchLabels": {"app": "b"}},
            "ingress": [
                {
                    "fromEndpoints": [{"matchLabels": {"app": "a"}}],
                    "toPorts": [
                        {
                            "ports": [
                                {"port": "0", "protocol": "TCP"},
                                {"port": "81", "protocol": "UDP"},
                            ]
                        }
                    ],
                }
            ],
        },
    )
    deny_only = cnp(
        "c-deny",
        {
            "endpointSelector": {"matchLabels": {"app": "c"}},
            "ingressDeny": [
                {
                    "fromEndpoints": [{"matchLabels": {"app": "a"}}],
                    "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}],
                }
            ],
        },
    )
    apply(node_lab, ports, deny_only)
    try:
        assert a.reaches(b, 80) and a.reaches(b, 81) and a.reaches(b, 81, "UDP")
        assert not a.reaches(b, 80, "UDP") and not c.reaches(b, 80)
        # An ingressDeny alone puts c in default deny: nothing is allowed in.
        assert not a.reaches(c, 80) and not a.reaches(c, 81) and not b.reaches(c, 81, "UDP")
        assert "spec.ingressDeny[0]" in trace(node_lab, a, c, 80)["lines"][1]
        assert (
            "isolated for ingress by CiliumNetworkPolicy default/c-deny spec"
            in (trace(node_lab, a, c, 81)["lines"][1])
        )
        assert lab.ping(node_lab.node.netns, str(c.state.ip))
    finally:
        delete(node_lab, ports, deny_only)
    assert a.reaches(c, 80) and a.reaches(b, 80, "UDP")


def test_cidr_rules_do_not_reach_pods_endpoint_rules_do(
    node_lab: NodeLab, pods: dict[str, Pod]
) -> None:
    a, b, c = pods["a"], pods["b"], pods["c"]
    rules: list[dict[str, Any]] = [{"toCIDR": ["0.0.0.0/0"]}, {"toEntities": ["world"]}]
    spec = {"endpointSelector": {"matchLabels": {"app": "a"}}, "egress": rules}
    cidr_only = cnp("a-out", spec)
    apply(node_lab, cidr_only)
    try:
        assert not a.reaches(b, 80) and not a.reaches(c, 81, "UDP")
        with_c = cnp(
            "a-out", {**spec, "egress": [*rules, {"toEndpoints": [{"matchLabels": {"app": "c"}}]}]}
        )
        apply(node_lab, with_c)
        assert a.reaches(c, 80) and a.reaches(c, 81, "UDP") and not a.reaches(b, 80)
    finally:
        delete(node_lab, cidr_only)


def test_a_deny_without_default_deny_blocks_only_what_it_names(
    node_lab: NodeLab, pods: dict[str, Pod]
) -> None:
    """enableDefaultDeny ingress false (Cilium 1.15): b stays open to everyone but
    a's TCP 80, which the deny names; the datapath gets the deny beside an allow-all."""
    a, b, c = pods["a"], pods["b"], pods["c"]
    policy = cnp(
        "b-block-a",
        {
            "endpointSelector": {"matchLabels": {"app": "b"}},
            "enableDefaultDeny": {"ingress": False},
            "ingressDeny": [
                {
                    "fromEndpoints": [{"matchLabels": {"app": "a"}}],
                    "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}],
                }
            ],
        },
    )
    apply(node_lab, policy)
    try:
        assert not a.reaches(b, 80)
        assert a.reaches(b, 81) and a.reaches(b, 80, "UDP")
        assert c.reaches(b, 80) and c.reaches(b, 81, "UDP")
        allowed = trace(node_lab, c, b, 80)
        assert allowed["allowed"] and "enableDefaultDeny.ingress: false" in allowed["lines"][1]
    finally:
        delete(node_lab, policy)
    assert a.reaches(b, 80)
