"""Generated NetworkPolicy cases on the e2e model (x, y, z; a, b, c), in the manner of
cyclonus' generator (github.com/mattfenwick/cyclonus, pkg/generator): a typical policy
perturbed one dimension at a time (target namespace and selector, peers, ports, rule
shapes, policy types), pairs of policies that conflict, cyclonus' own hand-written
cases (its conflict, example and action cases), and a fixed-seed random sample of
policy sets. Each case is a :class:`~tests.policy.model.Stage` (the policies, label
changes); the truth table comes from a reference evaluator, not from here.

The model differs from upstream's in one way, on purpose: two pods name their ports
differently (y/b serves ``serve-80-tcp`` on 81 and ``serve-81-tcp`` on 80; x/c swaps its
UDP names the same way), so a named port resolves to different numbers on different
pods.
"""

from __future__ import annotations

import copy
import itertools
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .k8s_reference import Peer, Reference
from .model import PODS, Case, Json, Probe, Reachability, Stage

# Pods whose named ports are swapped: pod -> protocol whose 80/81 names trade places.
SWAPPED_NAMES = {"y/b": "TCP", "x/c": "UDP"}


@dataclass(frozen=True)
class GeneratedStage(Stage):
    """A stage whose objects have the two pods' port names swapped."""

    def objects(self, pod_ips: Mapping[str, str | None]) -> list[Json]:
        objects = copy.deepcopy(super().objects(pod_ips))
        for obj in objects:
            if obj["kind"] != "Pod":
                continue
            ref = f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"
            protocol = SWAPPED_NAMES.get(ref)
            if protocol is None:
                continue
            for container in obj["spec"]["containers"]:
                for port in container["ports"]:
                    if port["protocol"] == protocol:
                        other = 81 if port["containerPort"] == 80 else 80
                        port["name"] = f"serve-{other}-{protocol.lower()}"
        return objects


class Judge(Protocol):
    def allows(self, src: Peer, dst: Peer, *, protocol: str, port: int) -> bool: ...


@dataclass(frozen=True)
class GeneratedCase:
    name: str
    stage: GeneratedStage

    def expected(
        self, pod_ips: Mapping[str, str], *, judge: Callable[[list[Json]], Judge] = Reference
    ) -> Case:
        """The case with its truth tables (TCP and UDP on 80 and 81, every ordered
        pair) from a reference evaluator (Kubernetes', or ``judge``), for any runner of
        the e2e model."""
        reference = judge(self.stage.objects(pod_ips))
        pods = {
            f"{o['metadata']['namespace']}/{o['metadata']['name']}": Reference.pod(o)
            for o in self.stage.objects(pod_ips)
            if o["kind"] == "Pod"
        }
        probes = []
        for protocol in ("TCP", "UDP"):
            for port in (80, 81):
                reach = Reachability()
                for src in PODS:
                    for dst in PODS:
                        reach.expect(
                            src,
                            dst,
                            reference.allows(pods[src], pods[dst], protocol=protocol, port=port),
                        )
                probes.append(Probe(port, protocol, reach))
        stage = GeneratedStage(
            self.stage.policies,
            probes,
            pod_labels=self.stage.pod_labels,
            namespace_labels=self.stage.namespace_labels,
        )
        return Case(self.name, [stage])


# -- vocabularies --------------------------------------------------------------------


def _labels(**labels: str) -> Json:
    return {"matchLabels": dict(labels)}


def _expr(key: str, operator: str, *values: str) -> Json:
    requirement: dict[str, Any] = {"key": key, "operator": operator}
    if values:
        requirement["values"] = list(values)
    return {"matchExpressions": [requirement]}


TARGETS: dict[str, Json] = {
    "all": {},
    "pod=a": _labels(pod="a"),
    "pod in (a,b)": _expr("pod", "In", "a", "b"),
    "pod notin (b)": _expr("pod", "NotIn", "b"),
    "pod exists": _expr("pod", "Exists"),
    "pod doesnotexist": _expr("pod", "DoesNotExist"),
    "nothing": _labels(pod="nonexistent"),
}

POD_SELECTORS: dict[str, Json | None] = {
    "nil": None,
    "{}": {},
    "pod=a": _labels(pod="a"),
    "pod in (b,c)": _expr("pod", "In", "b", "c"),
    "pod notin (a)": _expr("pod", "NotIn", "a"),
    "pod doesnotexist": _expr("pod", "DoesNotExist"),
}
NAMESPACE_SELECTORS: dict[str, Json | None] = {
    "nil": None,
    "{}": {},
    "ns=x": _labels(ns="x"),
    "ns in (y,z)": _expr("ns", "In", "y", "z"),
    "name=z": _labels(**{"kubernetes.io/metadata.name": "z"}),
    "ns notin (x)": _expr("ns", "NotIn", "x"),
    "never": _labels(**{"this-will-never-happen": "qrs123"}),
}
IP_BLOCKS: dict[str, Json] = {
    "y's /24": {"cidr": "10.244.1.0/24"},
    "y's /24 but y/b": {"cidr": "10.244.1.0/24", "except": ["10.244.1.11/32"]},
    "10.244/16 but y": {"cidr": "10.244.0.0/16", "except": ["10.244.1.0/24"]},
    "everything": {"cidr": "0.0.0.0/0"},
    "everything but pods": {"cidr": "0.0.0.0/0", "except": ["10.244.0.0/16"]},
    "z/c alone": {"cidr": "10.244.2.12/32"},
    "outside only": {"cidr": "192.0.2.0/24"},
    "nothing (0.0.0.0/31)": {"cidr": "0.0.0.0/31"},
    "x's .8/30 but .10/31": {"cidr": "10.244.0.8/30", "except": ["10.244.0.10/31"]},
    "the nodes": {"cidr": "192.168.100.0/24"},
    "unaligned 10.244.2.11/30": {"cidr": "10.244.2.11/30"},
    # Cyclonus' peers cases: a pod's address with a /24 and a /28 (host bits set).
    "y/b's address /24": {"cidr": "10.244.1.11/24"},
    "y/b's address /24 but its /28": {"cidr": "10.244.1.11/24", "except": ["10.244.1.11/28"]},
}


def _peers() -> dict[str, Json]:
    peers: dict[str, Json] = {}
    for (ns_name, ns_sel), (pod_name, pod_sel) in itertools.product(
        NAMESPACE_SELECTORS.items(), POD_SELECTORS.items()
    ):
        if ns_sel is None and pod_sel is None:
            continue  # the case where ipBlock must be set
        peer: dict[str, Any] = {}
        if ns_sel is not None:
            peer["namespaceSelector"] = ns_sel
        if pod_sel is not None:
            peer["podSelector"] = pod_sel
        peers[f"ns {ns_name} pod {pod_name}"] = peer
    for name, block in IP_BLOCKS.items():
        peers[f"ipBlock {name}"] = {"ipBlock": block}
    return peers


PEERS = _peers()

PORTS: dict[str, Json] = {
    "empty port (TCP, any)": {},
    "UDP any": {"protocol": "UDP"},
    "SCTP any": {"protocol": "SCTP"},
    "80 implicit TCP": {"port": 80},
    "UDP 80": {"protocol": "UDP", "port": 80},
    "TCP 81": {"protocol": "TCP", "port": 81},
    "serve-81-tcp implicit TCP": {"port": "serve-81-tcp"},
    "serve-80-tcp TCP": {"protocol": "TCP", "port": "serve-80-tcp"},
    "serve-81-udp UDP": {"protocol": "UDP", "port": "serve-81-udp"},
    "serve-81-udp with TCP": {"port": "serve-81-udp"},
    "serve-79-tcp (no such port)": {"port": "serve-79-tcp"},
    "80-81": {"port": 80, "endPort": 81},
    "UDP 79-80": {"protocol": "UDP", "port": 79, "endPort": 80},
    "81-81": {"port": 81, "endPort": 81},
    "SCTP 81": {"protocol": "SCTP", "port": 81},
    "1-65535": {"port": 1, "endPort": 65535},
}


def netpol(
    name: str,
    namespace: str,
    target: Json,
    *,
    ingress: list[Json] | None = None,
    egress: list[Json] | None = None,
    policy_types: list[str] | None = None,
) -> Json:
    """A NetworkPolicy; ``policy_types`` None leaves the field out (the API server's
    defaulting then applies)."""
    spec: dict[str, Any] = {"podSelector": target}
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    if policy_types is not None:
        spec["policyTypes"] = policy_types
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def _rule(direction: str, *, peers: list[Json] | None, ports: list[Json] | None) -> Json:
    rule: dict[str, Any] = {}
    if peers is not None:
        rule["from" if direction == "ingress" else "to"] = peers
    if ports is not None:
        rule["ports"] = ports
    return rule


# The typical policies (cyclonus' base policy): x/pod in (a,b) lets pods b, c of y, z
# in on TCP 80; z/c may reach pods a, b of x, y on serve-81-tcp.
TYPICAL_INGRESS_PEER = {
    "podSelector": _expr("pod", "In", "b", "c"),
    "namespaceSelector": _expr("ns", "In", "y", "z"),
}
TYPICAL_EGRESS_PEER = {
    "podSelector": _expr("pod", "In", "a", "b"),
    "namespaceSelector": _expr("ns", "In", "x", "y"),
}


def _typical(
    direction: str,
    *,
    namespace: str | None = None,
    target: Json | None = None,
    peers: list[Json] | None = None,
    ports: list[Json] | None = None,
    name: str = "base",
) -> Json:
    if direction == "ingress":
        rule = _rule(
            "ingress",
            peers=[TYPICAL_INGRESS_PEER] if peers is None else peers,
            ports=[{"port": 80}] if ports is None else ports,
        )
        return netpol(
            f"{name}-in",
            namespace or "x",
            _expr("pod", "In", "a", "b") if target is None else target,
            ingress=[rule],
            policy_types=["Ingress"],
        )
    rule = _rule(
        "egress",
        peers=[TYPICAL_EGRESS_PEER] if peers is None else peers,
        ports=[{"port": "serve-81-tcp"}] if ports is None else ports,
    )
    return netpol(
        f"{name}-out",
        namespace or "z",
        _labels(pod="c") if target is None else target,
        egress=[rule],
        policy_types=["Egress"],
    )


def _one(name: str, *policies: Json, **stage: Any) -> GeneratedCase:
    return GeneratedCase(name, GeneratedStage(list(policies), [], **stage))


# -- families ----------------------------------------------------------------------------


def perturbations() -> Iterator[GeneratedCase]:
    """The typical ingress and egress policies, one dimension changed at a time."""
    for direction in ("ingress", "egress"):
        for namespace in ("x", "y", "z"):
            yield _one(
                f"{direction}: namespace {namespace}", _typical(direction, namespace=namespace)
            )
        for name, target in TARGETS.items():
            yield _one(f"{direction}: target {name}", _typical(direction, target=target))
        for name, peer in PEERS.items():
            yield _one(f"{direction}: peer {name}", _typical(direction, peers=[peer]))
        for name, port in PORTS.items():
            yield _one(f"{direction}: port {name}", _typical(direction, ports=[port]))
        yield _one(f"{direction}: peers []", _typical(direction, peers=[]))
        yield _one(f"{direction}: ports []", _typical(direction, ports=[]))
        yield _one(f"{direction}: peers [] ports []", _typical(direction, peers=[], ports=[]))
        for (n1, p1), (n2, p2) in itertools.combinations(list(PORTS.items())[:8], 2):
            yield _one(f"{direction}: ports {n1} + {n2}", _typical(direction, ports=[p1, p2]))
        peer_names = ["ns nil pod pod=a", "ns ns=x pod {}", "ipBlock y's /24 but y/b"]
        for n1, n2 in itertools.combinations(peer_names, 2):
            yield _one(
                f"{direction}: peers {n1} + {n2}",
                _typical(direction, peers=[PEERS[n1], PEERS[n2]]),
            )


def rule_shapes() -> Iterator[GeneratedCase]:
    """Deny-all and allow-all in each spelling, and policyTypes against the rules."""
    for direction, kind in (("ingress", "Ingress"), ("egress", "Egress")):
        peers_key = "from" if direction == "ingress" else "to"
        spellings: list[tuple[str, list[Json]]] = [
            ("[]", []),
            ("[{}]", [{}]),
            (f"[{{{peers_key}: []}}]", [{peers_key: []}]),
        ]
        for name, rules in spellings:
            for target_name, target in (("all", {}), ("pod=a", _labels(pod="a"))):
                kw: dict[str, Any] = {direction: rules}
                yield _one(
                    f"{direction} {name}, types [{kind}], target {target_name}",
                    netpol("shape", "x", target, policy_types=[kind], **kw),
                )
                yield _one(
                    f"{direction} {name}, types defaulted, target {target_name}",
                    netpol("shape", "x", target, **kw),
                )
    # The rules of a direction the policy does not list are ignored.
    only_b = [{"from": [{"podSelector": _labels(pod="b")}]}]
    to_b = [{"to": [{"podSelector": _labels(pod="b")}]}]
    yield _one(
        "ingress rules under policyTypes [Egress]",
        netpol("types", "x", {}, ingress=only_b, policy_types=["Egress"]),
    )
    yield _one(
        "egress rules under policyTypes [Ingress]",
        netpol("types", "x", {}, egress=to_b, policy_types=["Ingress"]),
    )
    yield _one("egress rules, types defaulted", netpol("types", "x", {}, egress=to_b))
    yield _one("egress [], types defaulted (ingress only)", netpol("types", "x", {}, egress=[]))
    yield _one(
        "both directions, types [Ingress, Egress], no rules",
        netpol("types", "y", {}, policy_types=["Ingress", "Egress"]),
    )
    yield _one(
        "both directions with rules",
        netpol("types", "y", _labels(pod="b"), ingress=only_b, egress=to_b),
    )
    yield _one("types [Egress] and nothing else", netpol("types", "z", {}, policy_types=["Egress"]))


def _deny_all(direction: str, namespace: str, target: Json, name: str) -> Json:
    kind = "Ingress" if direction == "ingress" else "Egress"
    return netpol(name, namespace, target, policy_types=[kind], **{direction: []})


def _allow(direction: str, namespace: str, target: Json, name: str, rule: Json) -> Json:
    kind = "Ingress" if direction == "ingress" else "Egress"
    return netpol(name, namespace, target, policy_types=[kind], **{direction: [rule]})


def conflicts() -> Iterator[GeneratedCase]:
    """Cyclonus' conflict cases (source x/b, destination y/c) and more of the kind:
    policies are ORed, so a deny-all never takes away what another policy allows."""
    source, dest = ("x", _labels(pod="b")), ("y", _labels(pod="c"))
    all_by_pod: Json = {"namespaceSelector": {}}
    all_by_ip = {"ipBlock": {"cidr": "0.0.0.0/0"}}
    none_by_ip = {"ipBlock": {"cidr": "0.0.0.0/31"}}
    none_by_pod = {"namespaceSelector": _labels(**{"this-will-never-happen": "qrs123"})}

    def peer_rule(direction: str, peer: Json) -> Json:
        return {"from" if direction == "ingress" else "to": [peer]}

    yield _one(
        "conflict: allow all ingress, deny all egress",
        _deny_all("egress", *source, "deny-all-egress"),
        _allow("ingress", *dest, "allow-all-ingress", {}),
    )
    yield _one(
        "conflict: allow all egress, deny all ingress",
        _allow("egress", *source, "allow-all-egress", {}),
        _deny_all("ingress", *dest, "deny-all-ingress"),
    )
    for direction in ("egress", "ingress"):
        target = source if direction == "egress" else dest
        yield _one(
            f"conflict: deny all {direction} + allow all {direction}",
            _deny_all(direction, *target, "deny-all"),
            _allow(direction, *target, "allow-all", {}),
        )
        for name, allow_peer, deny_peer in (
            ("by pod", all_by_pod, None),
            ("by ip", all_by_ip, None),
            ("deny by ip, allow by pod", all_by_pod, none_by_ip),
            ("deny by pod, allow by ip", all_by_ip, none_by_pod),
        ):
            deny = (
                _deny_all(direction, *source, "deny")
                if deny_peer is None
                else _allow(direction, *source, "deny", peer_rule(direction, deny_peer))
            )
            yield _one(
                f"conflict: {direction} {name}",
                deny,
                _allow(direction, *source, "allow", peer_rule(direction, allow_peer)),
            )
        for name, peer in (("ip", none_by_ip), ("pod", none_by_pod)):
            yield _one(
                f"conflict: deny all {direction} by {name}",
                _allow(direction, *source, "deny", peer_rule(direction, peer)),
            )
    # Policies in two namespaces on both ends of the same pairs.
    yield _one(
        "conflict: egress of x allows y only on 80, ingress of y allows x only on 81",
        _allow(
            "egress",
            "x",
            {},
            "x-out",
            {"to": [{"namespaceSelector": _labels(ns="y")}], "ports": [{"port": 80}]},
        ),
        _allow(
            "ingress",
            "y",
            {},
            "y-in",
            {"from": [{"namespaceSelector": _labels(ns="x")}], "ports": [{"port": 81}]},
        ),
    )
    yield _one(
        "conflict: three policies on one pod, each one port",
        *(
            _allow("ingress", "z", _labels(pod="a"), f"p{i}", {"ports": [port]})
            for i, port in enumerate(
                [{"port": 80}, {"protocol": "UDP", "port": 81}, {"port": "serve-81-tcp"}]
            )
        ),
    )


def hand_written() -> Iterator[GeneratedCase]:
    """Cyclonus' example and action cases, as single states."""
    named_81 = netpol(
        "allow-all",
        "x",
        {},
        ingress=[{"ports": [{"port": "serve-81-tcp"}]}],
        policy_types=["Ingress"],
    )
    yield _one("example: should allow ingress access on one named port", named_81)
    per_pod = [
        netpol(
            "named-x",
            "x",
            {},
            ingress=[
                {"ports": [{"protocol": "UDP", "port": "serve-81-udp"}, {"port": "serve-80-tcp"}]}
            ],
        ),
        netpol("named-y", "y", {}, ingress=[{"ports": [{"port": "serve-81-tcp"}]}]),
    ]
    yield _one("ciliate: named ports resolve on each destination pod", *per_pod)
    base = _typical("ingress")
    base_udp = _typical("ingress", ports=[{"protocol": "UDP", "port": "serve-81-udp"}])
    yield _one("action: create policy", base)
    yield _one("action: update policy to a named UDP port", base_udp)
    new_ns = _typical("ingress", peers=[{"namespaceSelector": _labels(**{"new-ns": "qrs"})}])
    yield _one("action: namespace selector, before the label", new_ns)
    yield _one(
        "action: namespace selector, label set on y",
        new_ns,
        namespace_labels={"y": {"new-ns": "qrs"}},
    )
    new_pod = _typical(
        "ingress",
        peers=[
            {
                "podSelector": _labels(**{"new-label": "abc"}),
                "namespaceSelector": _expr("ns", "In", "y", "z"),
            }
        ],
    )
    yield _one("action: pod selector, before the label", new_pod)
    yield _one(
        "action: pod selector, label set on y/b",
        new_pod,
        pod_labels={"y/b": {"pod": "b", "new-label": "abc"}},
    )
    yield _one(
        "action: target loses its label",
        _typical("egress"),
        pod_labels={"z/c": {"pod": "changed"}},
    )
    yield _one(
        "action: a namespace's labels replaced",
        _typical("ingress"),
        namespace_labels={"z": {"ns": "other"}},
    )


def random_sets(count: int, *, seed: int = 8) -> Iterator[GeneratedCase]:
    """``count`` sets of one to three policies built from the vocabularies at random
    (a fixed seed, so the set is the same on every run)."""
    rng = random.Random(seed)
    peer_items = list(PEERS.items())
    port_items = list(PORTS.items())
    target_items = list(TARGETS.items())

    def rule(direction: str) -> Json:
        peers = rng.sample(peer_items, rng.choice([0, 1, 1, 2]))
        ports = rng.sample(port_items, rng.choice([0, 1, 1, 2]))
        return _rule(
            direction,
            peers=[p for _, p in peers] if peers else rng.choice([None, []]),
            ports=[p for _, p in ports] if ports else rng.choice([None, []]),
        )

    for number in range(count):
        policies = []
        for index in range(rng.choice([1, 1, 2, 3])):
            namespace = rng.choice(["x", "y", "z"])
            _, target = rng.choice(target_items)
            kw: dict[str, Any] = {}
            for direction in ("ingress", "egress"):
                shape = rng.choice(["absent", "absent", "[]", "rules"])
                if shape == "[]":
                    kw[direction] = []
                elif shape == "rules":
                    kw[direction] = [rule(direction) for _ in range(rng.choice([1, 1, 2]))]
            types_choice = rng.choice(["default", "default", "explicit", "ingress", "egress"])
            types: list[str] | None
            if types_choice == "default":
                types = None
            elif types_choice == "explicit":
                types = [k.capitalize() for k in ("ingress", "egress") if k in kw] or ["Ingress"]
            else:
                types = [types_choice.capitalize()]
            policies.append(netpol(f"r{index}", namespace, target, policy_types=types, **kw))
        # The name stays short (a test id); the failure message prints the policies.
        yield _one(f"random {number} ({len(policies)} policies)", *policies)


def generated_cases(random_count: int = 300) -> list[GeneratedCase]:
    return [
        *perturbations(),
        *rule_shapes(),
        *conflicts(),
        *hand_written(),
        *random_sets(random_count),
    ]


# Generated cases also run through the real datapath (tests/node/test_netpol_e2e.py):
# none with an ipBlock (their addresses are the engine runs' fixed pod IPs), each a
# different feature: named ports on pods that name them differently, ranges, rule
# shapes and defaulted types, conflicts, label changes, selector operators.
DATAPATH_SAMPLE = (
    "ciliate: named ports resolve on each destination pod",
    "egress: namespace z",
    "ingress: port 80-81",
    "ingress: port UDP 79-80",
    "ingress [], types defaulted, target all",
    "egress [{}], types [Egress], target pod=a",
    "egress rules, types defaulted",
    "conflict: deny all ingress + allow all ingress",
    "conflict: egress of x allows y only on 80, ingress of y allows x only on 81",
    "conflict: three policies on one pod, each one port",
    "action: pod selector, label set on y/b",
    "ingress: peer ns ns notin (x) pod pod notin (a)",
)


def datapath_sample() -> list[GeneratedCase]:
    by_name = {case.name: case for case in generated_cases(random_count=0)}
    return [by_name[name] for name in DATAPATH_SAMPLE]


# Label changes a random walk picks from (pod labels replaced, namespace labels added).
_WALK_POD_LABELS: tuple[dict[str, str], ...] = (
    {"pod": "b"},
    {"pod": "a", "new-label": "abc"},
    {"other": "q"},
    {},
)
_WALK_NAMESPACE_LABELS: tuple[dict[str, str], ...] = ({"ns": "other"}, {"new-ns": "qrs"})


def random_walk(count: int, *, seed: int = 11) -> list[GeneratedCase]:
    """``count`` states to put in force one after the other (each from whatever the
    previous left): random policy sets and label changes, none giving two pods of a
    namespace equal labels (pods sharing an identity are where ciliate parts from
    Kubernetes on purpose: tests/policy/upstream_variants.py)."""
    rng = random.Random(seed)
    policy_sets = list(random_sets(count * 3, seed=seed))
    walk: list[GeneratedCase] = []
    for case in policy_sets:
        pod_labels = {
            ref: dict(rng.choice(_WALK_POD_LABELS))
            for ref in rng.sample(PODS, rng.choice([0, 1, 2]))
        }
        namespace_labels = {
            ns: dict(rng.choice(_WALK_NAMESPACE_LABELS))
            for ns in rng.sample(["x", "y", "z"], rng.choice([0, 0, 1]))
        }
        labels = {ref: pod_labels.get(ref, {"pod": ref.split("/")[1]}) for ref in PODS}
        keys = {(ref.split("/")[0], tuple(sorted(labels[ref].items()))) for ref in PODS}
        if len(keys) < len(PODS):
            continue  # two pods of a namespace with equal labels
        stage = GeneratedStage(
            case.stage.policies, [], pod_labels=pod_labels, namespace_labels=namespace_labels
        )
        walk.append(GeneratedCase(f"walk {len(walk)}: {len(case.stage.policies)} policies", stage))
        if len(walk) == count:
            break
    return walk
