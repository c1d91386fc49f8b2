"""Generated CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy cases on the e2e
model, in the manner of generated_cases.py: typical allow and deny sections perturbed
one dimension at a time (subjects, L3 peers of every kind, ports), section shapes, and a
fixed-seed random sample of policy sets mixing kinds, directions, deny and allow, and
multi-rule ``specs``. The truth comes from tests/policy/cilium_reference.py."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from . import generated_cases
from .generated_cases import GeneratedCase, GeneratedStage
from .model import Json


def _labels(**labels: str) -> Json:
    return {"matchLabels": dict(labels)}


def _expr(key: str, operator: str, *values: str) -> Json:
    requirement: dict[str, Any] = {"key": key, "operator": operator}
    if values:
        requirement["values"] = list(values)
    return {"matchExpressions": [requirement]}


NS = "k8s:io.kubernetes.pod.namespace"

SUBJECTS: dict[str, Json] = {
    "all": {},
    "pod=a": _labels(pod="a"),
    "k8s:pod=b": _labels(**{"k8s:pod": "b"}),
    "pod in (a,b)": _expr("pod", "In", "a", "b"),
    "pod notin (c)": _expr("pod", "NotIn", "c"),
    "nobody": _labels(pod="nobody"),
    "namespace y named": _labels(**{NS: "y", "pod": "a"}),
}

# L3 parts, each as the keys of an ingress section (egress ones are renamed).
L3: dict[str, Json | None] = {
    "no L3": None,
    "endpoints {}": {"fromEndpoints": [{}]},
    "endpoints pod=b": {"fromEndpoints": [_labels(pod="b")]},
    "endpoints ns y": {"fromEndpoints": [_labels(**{NS: "y"})]},
    "endpoints any-ns z pod c": {
        "fromEndpoints": [_labels(**{"io.kubernetes.pod.namespace": "z", "pod": "c"})]
    },
    "endpoints ns-labels ns=y": {
        "fromEndpoints": [_labels(**{"k8s:io.cilium.k8s.namespace.labels.ns": "y"})]
    },
    "endpoints pod notin (a)": {"fromEndpoints": [_expr("pod", "NotIn", "a")]},
    "endpoints ns notin (x)": {"fromEndpoints": [_expr(NS, "NotIn", "x")]},
    "endpoints ns doesnotexist": {"fromEndpoints": [_expr(NS, "DoesNotExist")]},
    "endpoints reserved:host": {"fromEndpoints": [_labels(**{"reserved:host": ""})]},
    "endpoints reserved:world": {"fromEndpoints": [_labels(**{"reserved:world": ""})]},
    "endpoints container:pod=a": {"fromEndpoints": [_labels(**{"container:pod": "a"})]},
    "endpoints []": {"fromEndpoints": []},
    "entities all": {"fromEntities": ["all"]},
    "entities world": {"fromEntities": ["world"]},
    "entities host": {"fromEntities": ["host"]},
    "entities remote-node": {"fromEntities": ["remote-node"]},
    "entities cluster": {"fromEntities": ["cluster"]},
    "entities []": {"fromEntities": []},
    "cidr 192.0.2.0/24": {"fromCIDR": ["192.0.2.0/24"]},
    "cidr the pods' 10.244.0.0/16": {"fromCIDR": ["10.244.0.0/16"]},
    "cidr the nodes'": {"fromCIDR": ["192.168.100.0/24"]},
    "cidrset 0/0 but 192.0.2.0/24": {
        "fromCIDRSet": [{"cidr": "0.0.0.0/0", "except": ["192.0.2.0/24"]}]
    },
    "cidrset y's /24 but .0/29": {
        "fromCIDRSet": [{"cidr": "10.244.1.0/24", "except": ["10.244.1.0/29"]}]
    },
    "cidr 198.51.100.0/24 + 192.0.2.0/25": {"fromCIDR": ["198.51.100.0/24", "192.0.2.0/25"]},
}


def _port(port: str, protocol: str = "ANY", end: int | None = None) -> Json:
    spec: dict[str, Any] = {"port": port, "protocol": protocol}
    if end is not None:
        spec["endPort"] = end
    return spec


PORTS: dict[str, list[Json] | None] = {
    "any port": None,
    "TCP 80": [{"ports": [_port("80", "TCP")]}],
    "TCP 0": [{"ports": [_port("0", "TCP")]}],
    "ANY 81": [{"ports": [_port("81")]}],
    "ANY 0": [{"ports": [_port("0")]}],
    "UDP 80-81": [{"ports": [_port("80", "UDP", 81)]}],
    "ANY 79-80": [{"ports": [_port("79", "ANY", 80)]}],
    "SCTP 81": [{"ports": [_port("81", "SCTP")]}],
    "serve-81-tcp TCP": [{"ports": [_port("serve-81-tcp", "TCP")]}],
    "serve-80-udp ANY": [{"ports": [_port("serve-80-udp")]}],
    "serve-81-udp TCP (no such pair)": [{"ports": [_port("serve-81-udp", "TCP")]}],
    "TCP 80 + UDP 81": [{"ports": [_port("80", "TCP"), _port("81", "UDP")]}],
    "two rules: TCP 81 | UDP 80": [
        {"ports": [_port("81", "TCP")]},
        {"ports": [_port("80", "UDP")]},
    ],
}


def section(direction: str, l3: Json | None, ports: list[Json] | None) -> Json:
    body: dict[str, Any] = {}
    for key, value in (l3 or {}).items():
        body[key if direction == "ingress" else key.replace("from", "to", 1)] = value
    if ports is not None:
        body["toPorts"] = ports
    return body


def policy(name: str, namespace: str | None, *rules: Json) -> Json:
    kind = "CiliumNetworkPolicy" if namespace else "CiliumClusterwideNetworkPolicy"
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    body: dict[str, Any] = {"spec": rules[0]} if len(rules) == 1 else {"specs": list(rules)}
    return {"apiVersion": "cilium.io/v2", "kind": kind, "metadata": metadata, **body}


def _one(name: str, *policies: Json) -> GeneratedCase:
    return GeneratedCase(name, GeneratedStage(list(policies), []))


ALLOW_ALL = {"fromEntities": ["all"]}


def _perturbed(
    *,
    direction: str,
    deny: bool,
    namespace: str | None,
    subject: Json,
    l3: Json | None,
    ports: list[Json] | None,
    tag: str,
) -> GeneratedCase:
    key = f"{direction}Deny" if deny else direction
    rule: dict[str, Any] = {"endpointSelector": subject, key: [section(direction, l3, ports)]}
    if deny:  # the deny shows against an allow of everything
        rule[direction] = [section(direction, ALLOW_ALL, None)]
    kind = "cnp" if namespace else "ccnp"
    return _one(f"{kind} {key}: {tag}", policy("p", namespace, rule))


def perturbations() -> Iterator[GeneratedCase]:
    """A typical allow (and deny over an allow-all) section of a CNP in x and of a
    CCNP, one dimension changed at a time."""
    typical = {
        "subject": SUBJECTS["pod in (a,b)"],
        "l3": L3["endpoints ns y"],
        "ports": PORTS["TCP 80"],
    }
    for direction in ("ingress", "egress"):
        for deny in (False, True):
            for namespace in ("x", None):
                kw: dict[str, Any] = {"direction": direction, "deny": deny, "namespace": namespace}
                for name, subject in SUBJECTS.items():
                    yield _perturbed(**kw, **{**typical, "subject": subject}, tag=f"subject {name}")
                for name, l3 in L3.items():
                    yield _perturbed(**kw, **{**typical, "l3": l3}, tag=f"peer {name}")
                for name, ports in PORTS.items():
                    yield _perturbed(**kw, **{**typical, "ports": ports}, tag=f"ports {name}")


def shapes() -> Iterator[GeneratedCase]:
    a = SUBJECTS["pod=a"]
    for direction in ("ingress", "egress"):
        for tag, sections in (("[]", []), ("[{}]", [{}])):
            yield _one(
                f"shape: {direction} {tag}",
                policy("p", "x", {"endpointSelector": a, direction: sections}),
            )
        yield _one(
            f"shape: {direction}Deny alone",
            policy(
                "p",
                "x",
                {
                    "endpointSelector": a,
                    f"{direction}Deny": [section(direction, L3["endpoints pod=b"], None)],
                },
            ),
        )
        yield _one(
            f"shape: ports only, {direction}",
            policy(
                "p",
                "y",
                {"endpointSelector": {}, direction: [section(direction, None, PORTS["ANY 81"])]},
            ),
        )
    yield _one(
        "shape: specs, one rule per direction",
        policy(
            "p",
            "z",
            {"endpointSelector": a, "ingress": [section("ingress", L3["endpoints {}"], None)]},
            {
                "endpointSelector": _labels(pod="b"),
                "egress": [section("egress", L3["entities world"], None)],
            },
        ),
    )
    yield _one(
        "shape: deny across policies and kinds",
        policy(
            "allow",
            None,
            {"endpointSelector": {}, "ingress": [section("ingress", ALLOW_ALL, None)]},
        ),
        policy(
            "deny",
            "y",
            {
                "endpointSelector": {},
                "ingressDeny": [section("ingress", L3["endpoints ns notin (x)"], PORTS["TCP 80"])],
            },
        ),
    )


def random_sets(count: int, *, seed: int = 26) -> Iterator[GeneratedCase]:
    rng = random.Random(seed)
    l3_items = list(L3.values())
    port_items = list(PORTS.values())
    subjects = list(SUBJECTS.values())

    def random_section(direction: str) -> Json:
        # One L3 kind per section: Cilium refuses combining fromEndpoints, fromCIDR,
        # fromCIDRSet, fromEntities ("is not supported yet"); two of one kind merge.
        l3: dict[str, Any] = {}
        for part in rng.sample(l3_items, rng.choice([1, 1, 2])):
            for key, value in (part or {}).items():
                if not l3 or key in l3:
                    l3[key] = list(l3.get(key, [])) + list(value)
        return section(direction, l3 or None, rng.choice(port_items))

    def random_rule() -> Json:
        rule: dict[str, Any] = {"endpointSelector": rng.choice(subjects)}
        for key in rng.sample(
            ["ingress", "ingressDeny", "egress", "egressDeny"], rng.choice([1, 1, 2])
        ):
            direction = key.removesuffix("Deny")
            rule[key] = [random_section(direction) for _ in range(rng.choice([1, 1, 2]))]
        return rule

    for number in range(count):
        policies = []
        for index in range(rng.choice([1, 1, 2, 3])):
            namespace = rng.choice(["x", "y", "z", None])
            rules = [random_rule() for _ in range(rng.choice([1, 1, 1, 2]))]
            policies.append(policy(f"r{index}", namespace, *rules))
        yield _one(f"random {number} ({len(policies)} policies)", *policies)


def generated_cilium_cases(random_count: int = 300) -> list[GeneratedCase]:
    return [*perturbations(), *shapes(), *random_sets(random_count)]


# Cilium cases also run through the real datapath (tests/node/test_netpol_e2e.py); a
# Cilium CIDR rule never selects a pod, so every case's pod-to-pod table holds for any
# pod addresses.
DATAPATH_SAMPLE = (
    "cnp ingressDeny: ports UDP 80-81",
    "ccnp egressDeny: ports ANY 79-80",
    "ccnp ingress: peer endpoints ns notin (x)",
    "cnp ingress: peer endpoints {}",
    "ccnp ingress: peer endpoints {}",
    "cnp egress: peer entities cluster",
    "cnp egress: peer entities world",
    "ccnp egress: ports serve-81-tcp TCP",
    "cnp ingress: ports TCP 0",
    "cnp ingress: peer endpoints []",
    "shape: ingressDeny alone",
    "shape: deny across policies and kinds",
)


def datapath_sample() -> list[GeneratedCase]:
    by_name = {case.name: case for case in generated_cilium_cases(random_count=0)}
    return [by_name[name] for name in DATAPATH_SAMPLE]


def mixed_sets(count: int) -> Iterator[GeneratedCase]:
    """Random NetworkPolicy sets and random Cilium policy sets in force together."""
    kubernetes = generated_cases.random_sets(count, seed=81)
    cilium = random_sets(count, seed=62)
    for number, (k8s, cnp) in enumerate(zip(kubernetes, cilium, strict=True)):
        policies = [*k8s.stage.policies, *cnp.stage.policies]
        yield _one(f"mixed {number} ({len(policies)} policies)", *policies)
