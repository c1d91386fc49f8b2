"""Generated NetworkPolicy cases (tests/policy/generated_cases.py, cyclonus-style) on
the e2e model: for every case, every ordered pod pair, TCP, UDP and SCTP on 80 and 81, plus
ingress from and egress to addresses that are not pods (this node, another node,
addresses outside the cluster and inside the pod CIDR but unused), the policy engine
and the datapath's decision (the evaluator) must agree with an independent reading of
the Kubernetes API reference (tests/policy/k8s_reference.py). And ``policy trace``
must name a rule that does allow the connection, or, for a default deny, exactly the
policies that isolate the pod."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from ciliate.control.policy.engine import compute
from ciliate.control.policy.evaluate import Ipcache, Verdict, decide, trace
from ciliate.control.policy.inputs import input_from_objects
from ciliate.control.policy.model import (
    HOST_IDENTITY,
    PROTOCOL_NUMBERS,
    REMOTE_NODE_IDENTITY,
    EndpointPolicy,
)

from .engine_runner import by_kind, observe_with_engine
from .generated_cases import (
    HOST_IP,
    OTHER_NODE_IP,
    OUTSIDE_IPS,
    GeneratedCase,
    datapath_sample,
    generated_cases,
)
from .k8s_reference import Peer, Reference, RuleId
from .model import PODS, check_case, default_pod_ips

IPS = default_pod_ips()
CASES = generated_cases()
# SCTP too: no pod serves it, but the policies name it and the decision is defined.
PROBES = [(protocol, port) for protocol in ("TCP", "UDP", "SCTP") for port in (80, 81)]
NODES = {ipaddress.IPv4Address(HOST_IP): HOST_IDENTITY}
NODES[ipaddress.IPv4Address(OTHER_NODE_IP)] = REMOTE_NODE_IDENTITY


def _rule_id(origin: Any) -> RuleId | None:
    """An engine origin (``NetworkPolicy x/p`` + ``spec.ingress[0]``) in the
    reference's terms; None for a built-in default."""
    if origin.policy == "default":
        return None
    kind, _, policy = origin.policy.partition(" ")
    assert kind == "NetworkPolicy", origin
    section, _, index = origin.path.removeprefix("spec.").partition("[")
    return RuleId(policy, section, int(index.rstrip("]")))


def _names(policies: Sequence[Mapping[str, Any]]) -> set[str]:
    return {f"NetworkPolicy {p['metadata']['namespace']}/{p['metadata']['name']}" for p in policies}


class Checker:
    """One case: the engine's world and the reference's, and their disagreements."""

    def __init__(self, case: GeneratedCase) -> None:
        objects = case.stage.objects(IPS)
        self.reference = Reference(objects)
        self.ref_pods = {
            f"{o['metadata']['namespace']}/{o['metadata']['name']}": Reference.pod(o)
            for o in objects
            if o["kind"] == "Pod"
        }
        self.input = input_from_objects(by_kind(objects), node_identities=NODES)
        self.result = compute(self.input)
        self.ipcache = Ipcache.build(
            pods=self.input.pods, result=self.result, node_identities=NODES
        )
        self.pods = {pod.ref: pod for pod in self.input.pods}
        self.problems: list[str] = []

    def _policy(self, ref: str) -> EndpointPolicy | None:
        return self.result.endpoints.get(ref)

    def check_verdict(
        self, verdict: Verdict, *, pod: str, other: Peer, protocol: str, port: int
    ) -> None:
        """The rule a verdict names must be one the reference says allows the traffic;
        a default deny must name exactly the policies isolating the pod."""
        direction = verdict.direction
        policy = self._policy(pod)
        where = f"{protocol}/{port} {direction} at {pod} with {other.name or other.ip}"
        if verdict.entry is not None and not verdict.entry.deny and policy is not None:
            allowing = set(
                self.reference.allowing_rules(
                    self.ref_pods[pod],
                    direction=direction,
                    other=other,
                    protocol=protocol,
                    port=port,
                )
            )
            for origin in policy.origins[verdict.entry]:
                rule = _rule_id(origin)
                if rule is None:
                    if not other.local_node:
                        self.problems.append(f"{where}: trace names {origin} for a non-node peer")
                elif rule not in allowing:
                    self.problems.append(
                        f"{where}: trace names {origin}, which does not allow it "
                        f"(the reference's allowing rules: {sorted(map(str, allowing))})"
                    )
        elif verdict.entry is None and not verdict.allowed:
            isolating = _names(self.reference.selecting(self.ref_pods[pod], direction))
            named = set(policy.isolated_by.get(direction, ())) if policy is not None else set()
            if named != isolating or not all(n in verdict.because for n in isolating):
                self.problems.append(
                    f"{where}: trace says isolated by {sorted(named)}, the reference by "
                    f"{sorted(isolating)}"
                )

    def pairs(self, protocol: str, port: int) -> None:
        number = PROTOCOL_NUMBERS[protocol]
        for src in PODS:
            for dst in PODS:
                if src == dst:
                    continue
                outcome = trace(
                    self.result,
                    src=self.pods[src],
                    dst=self.pods[dst],
                    protocol=number,
                    port=port,
                    ipcache=self.ipcache,
                )
                want = self.reference.allows(
                    self.ref_pods[src], self.ref_pods[dst], protocol=protocol, port=port
                )
                if outcome.allowed != want:
                    self.problems.append(
                        f"{protocol}/{port} {src} -> {dst}: engine "
                        f"{'allows' if outcome.allowed else 'denies'}, the reference "
                        f"{'allows' if want else 'denies'}: " + "; ".join(outcome.lines())
                    )
                for verdict in outcome.verdicts:
                    pod, other = (src, dst) if verdict.direction == "egress" else (dst, src)
                    self.check_verdict(
                        verdict,
                        pod=pod,
                        other=self.ref_pods[other],
                        protocol=protocol,
                        port=port,
                    )

    def outside(self, protocol: str, port: int) -> None:
        """Every pod against the addresses that are not pods, both ways."""
        number = PROTOCOL_NUMBERS[protocol]
        peers = [Peer(ip=HOST_IP, name="this node", local_node=True), Peer(ip=OTHER_NODE_IP)]
        peers += [Peer(ip=ip) for ip in OUTSIDE_IPS]
        for ref in PODS:
            pod = self.ref_pods[ref]
            for peer in peers:
                identity = self.ipcache.lookup(ipaddress.IPv4Address(peer.ip))
                for direction, want in (
                    ("ingress", self.reference.allows(peer, pod, protocol=protocol, port=port)),
                    ("egress", self.reference.allows(pod, peer, protocol=protocol, port=port)),
                ):
                    verdict = decide(
                        self._policy(ref),
                        endpoint=ref,
                        direction=direction,
                        peer_identity=identity,
                        protocol=number,
                        port=port,
                    )
                    if verdict.allowed != want:
                        self.problems.append(
                            f"{protocol}/{port} {direction} at {ref} with {peer.name or peer.ip}"
                            f" (identity {identity}): engine {verdict}, the reference "
                            f"{'allows' if want else 'denies'}"
                        )
                    self.check_verdict(verdict, pod=ref, other=peer, protocol=protocol, port=port)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_generated_case_agrees_with_the_reference(case: GeneratedCase) -> None:
    checker = Checker(case)
    for protocol, port in PROBES:
        checker.pairs(protocol, port)
        checker.outside(protocol, port)
    policies = "\n".join(str(p) for p in case.stage.policies)
    assert not checker.problems, f"{case.name}\n{policies}\n" + "\n".join(checker.problems[:20])


def test_the_generated_set_is_large_and_distinct() -> None:
    assert len(CASES) >= 500
    assert len({c.name for c in CASES}) == len(CASES)


def test_the_reference_sees_a_wrong_answer() -> None:
    # The checker would catch an engine that ignores ports: a policy allowing TCP 80
    # only, checked against a reference told the policy allows every port.
    case = next(c for c in CASES if c.name == "ingress: port TCP 81")
    checker = Checker(case)
    checker.reference.policies[0]["spec"]["ingress"][0].pop("ports")
    checker.pairs("TCP", 80)
    assert checker.problems and all(
        "engine denies, the reference allows" in p for p in checker.problems
    )


@pytest.mark.parametrize("case", datapath_sample(), ids=lambda c: c.name)
def test_the_datapath_samples_truth_tables_hold_through_the_engine(case: GeneratedCase) -> None:
    # The tables tests/node/test_netpol_e2e.py checks the real datapath against.
    assert not check_case(case.expected(IPS), observe_with_engine(IPS))
