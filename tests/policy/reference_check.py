"""Checks the policy engine and the datapath's decision (the evaluator) against a
reference evaluator on one state of the e2e model: every ordered pod pair, and every
pod against addresses that are not pods (this node, another node, addresses outside
the cluster and unused ones inside the pod CIDR), both ways; and checks that each
verdict ``policy trace`` prints names a rule the reference says decides it."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from ciliate.control.policy.engine import compute
from ciliate.control.policy.evaluate import Ipcache, Verdict, decide, trace
from ciliate.control.policy.inputs import input_from_objects
from ciliate.control.policy.model import (
    HOST_IDENTITY,
    PROTOCOL_NUMBERS,
    REMOTE_NODE_IDENTITY,
    Direction,
)

from .engine_runner import by_kind
from .k8s_reference import Peer, Reference

HOST_IP = "192.168.100.2"  # this node: ingress from it is always allowed
OTHER_NODE_IP = "192.168.100.3"
OUTSIDE_IPS = ("192.0.2.10", "10.244.0.200", "10.244.1.7", "198.51.100.20")
NODES = {
    ipaddress.IPv4Address(HOST_IP): HOST_IDENTITY,
    ipaddress.IPv4Address(OTHER_NODE_IP): REMOTE_NODE_IDENTITY,
}
NON_PODS = (
    Peer(ip=HOST_IP, name="this node", local_node=True),
    Peer(ip=OTHER_NODE_IP, name="another node", remote_node=True),
    *(Peer(ip=ip) for ip in OUTSIDE_IPS),
)


class Decider(Protocol):
    def decide(
        self, pod: Peer, *, direction: str, other: Peer, protocol: str, port: int
    ) -> tuple[bool, set[str], set[str], set[str]]: ...

    def allows(self, src: Peer, dst: Peer, *, protocol: str, port: int) -> bool: ...


class Checker:
    """One state: the engine's world and the reference's, and their disagreements."""

    def __init__(self, objects: Sequence[Mapping[str, Any]], reference: Decider) -> None:
        self.reference = reference
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

    def check_verdict(
        self, verdict: Verdict, *, pod: str, other: Peer, protocol: str, port: int
    ) -> None:
        """A deny or an allow must name rules the reference says deny or allow this
        traffic; a default deny exactly the rules or policies that enforce it."""
        where = f"{protocol}/{port} {verdict.direction} at {pod} with {other.name or other.ip}"
        _, denying, allowing, enforcing = self.reference.decide(
            self.ref_pods[pod],
            direction=verdict.direction,
            other=other,
            protocol=protocol,
            port=port,
        )
        policy = self.result.endpoints.get(pod)
        if verdict.entry is not None and policy is not None:
            wanted = denying if verdict.entry.deny else allowing
            for origin in policy.origins[verdict.entry]:
                if origin.policy == "default":
                    if not other.local_node or verdict.entry.deny:
                        self.problems.append(f"{where}: trace names {origin}")
                elif str(origin) not in wanted:
                    self.problems.append(
                        f"{where}: trace names {origin}; the reference's: {sorted(wanted)}"
                    )
        elif verdict.entry is None and not verdict.allowed:
            named = set(policy.isolated_by.get(verdict.direction, ())) if policy else set()
            if named != enforcing or not all(n in verdict.because for n in enforcing):
                self.problems.append(
                    f"{where}: trace says isolated by {sorted(named)}, the reference by "
                    f"{sorted(enforcing)}"
                )

    def pairs(self, protocol: str, port: int) -> None:
        number = PROTOCOL_NUMBERS[protocol]
        for src in self.ref_pods:
            for dst in self.ref_pods:
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
                        verdict, pod=pod, other=self.ref_pods[other], protocol=protocol, port=port
                    )

    def outside(self, protocol: str, port: int) -> None:
        """Every pod against the addresses that are not pods, both ways."""
        number = PROTOCOL_NUMBERS[protocol]
        for ref, pod in self.ref_pods.items():
            for peer in NON_PODS:
                identity = self.ipcache.lookup(ipaddress.IPv4Address(peer.ip))
                directions: list[tuple[Direction, bool]] = [
                    ("ingress", self.reference.allows(peer, pod, protocol=protocol, port=port)),
                    ("egress", self.reference.allows(pod, peer, protocol=protocol, port=port)),
                ]
                for direction, want in directions:
                    verdict = decide(
                        self.result.endpoints.get(ref),
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

    def run(self, probes: Sequence[tuple[str, int]]) -> list[str]:
        for protocol, port in probes:
            self.pairs(protocol, port)
            self.outside(protocol, port)
        return self.problems


class Combined:
    """Kubernetes and Cilium policies on the same endpoints, as Cilium combines them:
    a direction is enforced if either kind enforces it; a Cilium deny wins; else the
    node is let in, and otherwise any allow of either kind allows."""

    def __init__(self, kubernetes: Decider, cilium: Decider) -> None:
        self.parts = (kubernetes, cilium)

    def decide(
        self, pod: Peer, *, direction: str, other: Peer, protocol: str, port: int
    ) -> tuple[bool, set[str], set[str], set[str]]:
        denying: set[str] = set()
        allowing: set[str] = set()
        enforcing: set[str] = set()
        for part in self.parts:
            _, deny, allow, enforce = part.decide(
                pod, direction=direction, other=other, protocol=protocol, port=port
            )
            denying |= deny
            allowing |= allow
            enforcing |= enforce
        if not enforcing:
            return True, denying, allowing, enforcing
        if denying:
            return False, denying, allowing, enforcing
        if direction == "ingress" and other.local_node:
            return True, denying, allowing, enforcing
        return bool(allowing), denying, allowing, enforcing

    def allows(self, src: Peer, dst: Peer, *, protocol: str, port: int) -> bool:
        if (
            src.is_pod
            and not self.decide(src, direction="egress", other=dst, protocol=protocol, port=port)[0]
        ):
            return False
        return (
            not dst.is_pod
            or self.decide(dst, direction="ingress", other=src, protocol=protocol, port=port)[0]
        )
