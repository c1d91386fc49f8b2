"""An independent reading of Kubernetes NetworkPolicy (networking.k8s.io/v1), to check
the policy engine against: each function is one sentence of the API reference, applied
to the raw documents (no validation, no defaulting but the API server's own, no code
shared with ``ciliate.control.policy``). Slow and obvious on purpose: it decides one
connection at a time by walking every policy.

The sentences it follows (API reference, NetworkPolicySpec and friends):

* policyTypes: "If this field is not specified, it will default based on the existence
  of ingress or egress rules; policies that contain an egress section are assumed to
  affect egress, and all policies (whether or not they contain an ingress section) are
  assumed to affect ingress." (the API server's defaulting: Egress iff ``len(egress)``).
* ingress: "Traffic is allowed to a pod if there are no NetworkPolicies selecting the
  pod (and cluster policy otherwise allows the traffic), OR if the traffic source is the
  pod's local node, OR if the traffic matches at least one ingress rule across all of
  the NetworkPolicy objects whose podSelector matches the pod. If this field is empty
  then this NetworkPolicy does not allow any traffic."  (egress: the same without the
  local-node clause.)
* from/to: "If this field is empty or missing, this rule matches all sources" -- "Items
  in this list are combined using a logical OR operation."
* ports: "If this field is empty or missing, this rule matches all ports" -- protocol
  "If not specified, this field defaults to TCP" -- port "This can either be a
  numerical or named port on a pod. If this field is not provided, this matches all
  port names and numbers. If present, only traffic on the specified protocol AND port
  will be matched." -- endPort: "the range of ports from port to endPort ... inclusive".
* peer: podSelector "If namespaceSelector is also set, then the NetworkPolicyPeer as a
  whole selects the Pods matching podSelector in the Namespaces selected by
  NamespaceSelector. Otherwise it selects the Pods matching podSelector in the policy's
  own Namespace."; namespaceSelector "if present but empty, it selects all namespaces
  ... Otherwise it selects all Pods in the Namespaces selected by namespaceSelector";
  ipBlock: the address is inside ``cidr`` and inside no ``except``.

Where Kubernetes leaves the choice to the implementation, this module says what
ciliate chose: an ipBlock also matches pod and node addresses inside it (the upstream
e2e cases "should allow egress access to server in CIDR block" and the except cases
need it); a named port on traffic to something that is not a pod matches nothing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Json = Mapping[str, Any]

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


@dataclass(frozen=True)
class Peer:
    """One end of a connection: a pod (namespace, labels, named ports), the pod's own
    node, or any other address (another node, something outside the cluster)."""

    ip: str
    namespace: str | None = None
    name: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    # (port name, number, protocol) of its containers.
    container_ports: tuple[tuple[str, int, str], ...] = ()
    local_node: bool = False
    remote_node: bool = False

    @property
    def is_pod(self) -> bool:
        return self.namespace is not None


@dataclass(frozen=True)
class RuleId:
    """``("x/allow-web", "ingress", 0)``: a rule of a policy."""

    policy: str
    direction: str
    index: int


def selector_matches(selector: Json | None, labels: Mapping[str, str]) -> bool:
    """Standard label selector semantics; an empty selector selects everything."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for requirement in selector.get("matchExpressions") or []:
        key, operator = requirement["key"], requirement["operator"]
        values = requirement.get("values") or []
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


def policy_types(spec: Json) -> list[str]:
    if spec.get("policyTypes"):
        return list(spec["policyTypes"])
    return ["Ingress", "Egress"] if spec.get("egress") else ["Ingress"]


class Reference:
    """The cluster as documents: Namespaces, Pods and NetworkPolicies."""

    def __init__(self, documents: Sequence[Json]) -> None:
        self.namespace_labels: dict[str, dict[str, str]] = {}
        self.policies: list[Json] = []
        for doc in documents:
            if doc["kind"] == "Namespace":
                name = doc["metadata"]["name"]
                labels = dict(doc["metadata"].get("labels") or {})
                labels[NAMESPACE_NAME_LABEL] = name  # set by the API server, always
                self.namespace_labels[name] = labels
            elif doc["kind"] == "NetworkPolicy":
                self.policies.append(doc)

    @staticmethod
    def pod(doc: Json) -> Peer:
        """A Pod document as a peer (its address from ``status.podIP``)."""
        meta = doc["metadata"]
        ports = tuple(
            (port["name"], port["containerPort"], port.get("protocol", "TCP"))
            for container in doc["spec"]["containers"]
            for port in container.get("ports", [])
            if port.get("name")
        )
        return Peer(
            ip=doc["status"]["podIP"],
            namespace=meta["namespace"],
            name=meta["name"],
            labels=dict(meta.get("labels") or {}),
            container_ports=ports,
        )

    # -- who is isolated, by what --------------------------------------------------

    def selecting(self, pod: Peer, direction: str) -> list[Json]:
        """The policies that select ``pod`` and affect ``direction``."""
        kind = "Ingress" if direction == "ingress" else "Egress"
        return [
            p
            for p in self.policies
            if p["metadata"]["namespace"] == pod.namespace
            and selector_matches(p["spec"].get("podSelector"), pod.labels)
            and kind in policy_types(p["spec"])
        ]

    # -- one rule -----------------------------------------------------------------

    def peer_matches(self, peer_spec: Json, *, policy_namespace: str, other: Peer) -> bool:
        if "ipBlock" in peer_spec:
            block = peer_spec["ipBlock"]
            address = ipaddress.ip_address(other.ip)
            if address not in ipaddress.ip_network(block["cidr"], strict=False):
                return False
            return not any(
                address in ipaddress.ip_network(e, strict=False) for e in block.get("except", [])
            )
        if not other.is_pod:
            return False  # pod and namespace selectors select pods only
        assert other.namespace is not None
        if "namespaceSelector" in peer_spec and peer_spec["namespaceSelector"] is not None:
            ns_labels = self.namespace_labels.get(
                other.namespace, {NAMESPACE_NAME_LABEL: other.namespace}
            )
            if not selector_matches(peer_spec["namespaceSelector"], ns_labels):
                return False
        elif other.namespace != policy_namespace:
            return False
        return selector_matches(peer_spec.get("podSelector"), other.labels)

    @staticmethod
    def port_matches(port_spec: Json, *, destination: Peer, protocol: str, port: int) -> bool:
        if port_spec.get("protocol", "TCP") != protocol:
            return False
        wanted = port_spec.get("port")
        if wanted is None:
            return True
        if isinstance(wanted, str):
            # A named port on the destination pod: the name of the container port the
            # traffic goes to (this protocol, this number).
            return any(
                name == wanted and number == port and proto == protocol
                for name, number, proto in destination.container_ports
            )
        return bool(wanted <= port <= port_spec.get("endPort", wanted))

    def rule_allows(
        self,
        rule: Json,
        *,
        direction: str,
        policy_namespace: str,
        other: Peer,
        destination: Peer,
        protocol: str,
        port: int,
    ) -> bool:
        peers = rule.get("from" if direction == "ingress" else "to") or []
        if peers and not any(
            self.peer_matches(p, policy_namespace=policy_namespace, other=other) for p in peers
        ):
            return False
        ports = rule.get("ports") or []
        return not ports or any(
            self.port_matches(p, destination=destination, protocol=protocol, port=port)
            for p in ports
        )

    # -- a direction, a connection ------------------------------------------------

    def allowing_rules(
        self, pod: Peer, *, direction: str, other: Peer, protocol: str, port: int
    ) -> list[RuleId]:
        """The rules of the policies selecting ``pod`` that allow this traffic."""
        destination = pod if direction == "ingress" else other
        found = []
        for policy in self.selecting(pod, direction):
            meta = policy["metadata"]
            for index, rule in enumerate(policy["spec"].get(direction) or []):
                if self.rule_allows(
                    rule,
                    direction=direction,
                    policy_namespace=meta["namespace"],
                    other=other,
                    destination=destination,
                    protocol=protocol,
                    port=port,
                ):
                    found.append(RuleId(f"{meta['namespace']}/{meta['name']}", direction, index))
        return found

    def direction_allows(
        self, pod: Peer, *, direction: str, other: Peer, protocol: str, port: int
    ) -> bool:
        if not self.selecting(pod, direction):
            return True
        if direction == "ingress" and other.local_node:
            return True
        return bool(
            self.allowing_rules(pod, direction=direction, other=other, protocol=protocol, port=port)
        )

    def decide(
        self, pod: Peer, *, direction: str, other: Peer, protocol: str, port: int
    ) -> tuple[bool, set[str], set[str], set[str]]:
        """(allowed, the deny rules that match: none in Kubernetes, the allow rules
        that match, the policies isolating the direction), named as ``policy trace``
        names them (``NetworkPolicy x/p spec.ingress[0]``, ``NetworkPolicy x/p``)."""
        allowed = self.direction_allows(
            pod, direction=direction, other=other, protocol=protocol, port=port
        )
        allowing = {
            f"NetworkPolicy {r.policy} spec.{r.direction}[{r.index}]"
            for r in self.allowing_rules(
                pod, direction=direction, other=other, protocol=protocol, port=port
            )
        }
        isolating = {
            f"NetworkPolicy {p['metadata']['namespace']}/{p['metadata']['name']}"
            for p in self.selecting(pod, direction)
        }
        return allowed, set(), allowing, isolating

    def allows(self, src: Peer, dst: Peer, *, protocol: str, port: int) -> bool:
        """A connection from ``src`` to ``dst``: the source's egress (if a pod) and the
        destination's ingress (if a pod) must both allow it."""
        if src.is_pod and not self.direction_allows(
            src, direction="egress", other=dst, protocol=protocol, port=port
        ):
            return False
        return not dst.is_pod or self.direction_allows(
            dst, direction="ingress", other=src, protocol=protocol, port=port
        )
