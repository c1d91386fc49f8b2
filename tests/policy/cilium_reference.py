"""An independent reading of CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy at
L3/L4, to check the policy engine against (no code shared with
``ciliate.control.policy``): one connection at a time, walking every rule.

What it follows (Cilium's docs "Policy Enforcement Modes", "Layer 3/4 examples",
"Deny policies", "Entities", and the import in pkg/k8s/apis/cilium.io/utils):

* a rule applies to the endpoints its ``endpointSelector`` matches -- in a namespaced
  policy, only those of the policy's namespace; "If any rule selects an Endpoint and
  the rule has an ingress section, the endpoint goes into default deny at ingress"
  (ingress or ingressDeny, non-empty; egress alike);
* a section with no L3 part and ``toPorts`` allows every peer on those ports; an empty
  section ``{}`` allows nothing; a present but empty peer list selects nothing;
* ``fromEndpoints`` selectors: a key with a source matches that source, a bare key
  (``any:``) every source; unless a key has the ``reserved:`` source or is the pod
  namespace label (k8s/any), a namespaced policy adds "namespace = its own" (not when
  the selector names namespace labels), a clusterwide one "namespace exists";
* CIDR peers select addresses that are neither pods nor nodes; ``except`` carves out;
* entities: all, world (anything outside the cluster), host (this node), remote-node,
  cluster (pods and nodes);
* ports: absent = all; port 0 = every port; ``ANY`` = TCP, UDP and SCTP, and with
  port 0 any protocol at all; ``endPort`` a range; a named port is the destination
  pod's container port of that name (and protocol, unless ANY);
* "Deny policies take precedence over allow policies"; the local node is let in
  (Cilium's default allow-localhost) unless a deny names it.

Identities are labels here (``k8s:pod``, ``k8s:io.kubernetes.pod.namespace``,
``k8s:io.cilium.k8s.namespace.labels.<key>``, ``reserved:host``, ...), as Cilium's
endpoints carry them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .k8s_reference import NAMESPACE_NAME_LABEL, Peer

Json = Mapping[str, Any]

POD_NAMESPACE = "io.kubernetes.pod.namespace"
NAMESPACE_LABELS = "io.cilium.k8s.namespace.labels."
ANY_PROTOCOLS = ("TCP", "UDP", "SCTP")


def _split(key: str) -> tuple[str, str]:
    source, colon, name = key.partition(":")
    return (source, name) if colon else ("any", key)


def selector_matches(selector: Json, labels: Mapping[str, str]) -> bool:
    """A Cilium label selector against source-qualified labels."""

    def values(key: str) -> list[str]:
        source, name = _split(key)
        return [
            value
            for label, value in labels.items()
            if _split(label)[1] == name and (source == "any" or _split(label)[0] == source)
        ]

    requirements = [(k, "In", [v]) for k, v in (selector.get("matchLabels") or {}).items()]
    requirements += [
        (e["key"], e["operator"], e.get("values") or [])
        for e in selector.get("matchExpressions") or []
    ]
    for key, operator, wanted in requirements:
        found = values(key)
        if operator == "In" and not any(v in wanted for v in found):
            return False
        if operator == "NotIn" and any(v in wanted for v in found):
            return False
        if operator == "Exists" and not found:
            return False
        if operator == "DoesNotExist" and found:
            return False
    return True


@dataclass(frozen=True)
class Section:
    """One ingress/ingressDeny/egress/egressDeny item of a rule."""

    ref: str  # "CiliumNetworkPolicy x/p spec.ingress[0]"
    rule_ref: str  # "CiliumNetworkPolicy x/p spec"
    namespace: str | None
    direction: str
    deny: bool
    body: Json


class CiliumReference:
    def __init__(self, documents: Sequence[Json]) -> None:
        self.namespace_labels: dict[str, dict[str, str]] = {}
        self.rules: list[tuple[str, str | None, Json]] = []  # (rule ref, namespace, rule)
        self._selecting: dict[tuple[str, str], list[tuple[str, list[Section]]]] = {}
        self._decided: dict[
            tuple[str, str, str, str, int], tuple[bool, set[str], set[str], set[str]]
        ] = {}
        for doc in documents:
            meta = doc["metadata"]
            if doc["kind"] == "Namespace":
                labels = dict(meta.get("labels") or {})
                labels[NAMESPACE_NAME_LABEL] = meta["name"]
                self.namespace_labels[meta["name"]] = labels
            elif doc["kind"] in ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"):
                namespace = meta.get("namespace") if doc["kind"] == "CiliumNetworkPolicy" else None
                where = f"{namespace}/" if namespace else ""
                name = f"{doc['kind']} {where}{meta['name']}"
                if doc.get("spec") is not None:
                    self.rules.append((f"{name} spec", namespace, doc["spec"]))
                for i, rule in enumerate(doc.get("specs") or []):
                    self.rules.append((f"{name} specs[{i}]", namespace, rule))

    # -- labels ---------------------------------------------------------------------

    def labels(self, peer: Peer) -> dict[str, str]:
        if peer.local_node:
            return {"reserved:host": ""}
        if peer.remote_node:
            return {"reserved:remote-node": ""}
        if not peer.is_pod:
            return {"reserved:world": ""}
        assert peer.namespace is not None
        labels = {f"k8s:{k}": v for k, v in peer.labels.items()}
        labels[f"k8s:{POD_NAMESPACE}"] = peer.namespace
        ns_labels = self.namespace_labels.get(
            peer.namespace, {NAMESPACE_NAME_LABEL: peer.namespace}
        )
        labels.update({f"k8s:{NAMESPACE_LABELS}{k}": v for k, v in ns_labels.items()})
        return labels

    # -- rules ----------------------------------------------------------------------

    def selecting(self, pod: Peer, direction: str) -> list[tuple[str, list[Section]]]:
        """(rule ref, its sections of ``direction``) of the rules selecting ``pod``
        that enforce ``direction`` (remembered per pod address: the checks ask often)."""
        key = (pod.ip, direction)
        if key not in self._selecting:
            self._selecting[key] = self._find_selecting(pod, direction)
        return self._selecting[key]

    def _find_selecting(self, pod: Peer, direction: str) -> list[tuple[str, list[Section]]]:
        found = []
        for ref, namespace, rule in self.rules:
            if namespace is not None and pod.namespace != namespace:
                continue
            subject = dict(rule.get("endpointSelector") or {})
            if namespace is not None:
                # Cilium overwrites a namespaced policy's own namespace match.
                match_labels = dict(subject.get("matchLabels") or {})
                match_labels.pop(f"k8s:{POD_NAMESPACE}", None)
                subject["matchLabels"] = match_labels
            if not selector_matches(subject, self.labels(pod)):
                continue
            sections = []
            for key in (direction, f"{direction}Deny"):
                for i, body in enumerate(rule.get(key) or []):
                    sections.append(
                        Section(
                            f"{ref}.{key}[{i}]",
                            ref,
                            namespace,
                            direction,
                            key.endswith("Deny"),
                            body,
                        )
                    )
            if sections:
                found.append((ref, sections))
        return found

    def _endpoint_selector_matches(self, selector: Json, namespace: str | None, peer: Peer) -> bool:
        keys = list((selector.get("matchLabels") or {}).keys())
        keys += [e["key"] for e in selector.get("matchExpressions") or []]
        parts = [_split(k) for k in keys]
        labels = self.labels(peer)
        reserved = any(source == "reserved" for source, _ in parts)
        names_namespace = any(s in ("k8s", "any") and n == POD_NAMESPACE for s, n in parts)
        names_namespace_labels = any(
            s in ("k8s", "any") and n.startswith(NAMESPACE_LABELS) for s, n in parts
        )
        own_namespace = labels.get(f"k8s:{POD_NAMESPACE}")
        if not reserved and not names_namespace:
            if namespace is None and own_namespace is None:
                return False  # a clusterwide selector: "namespace exists"
            if namespace is not None and not names_namespace_labels and own_namespace != namespace:
                return False  # a namespaced one: "namespace = the policy's"
        return selector_matches(selector, labels)

    def _l3_matches(self, section: Section, peer: Peer) -> bool:
        prefix = "from" if section.direction == "ingress" else "to"
        body = section.body
        keys = [f"{prefix}{k}" for k in ("Endpoints", "CIDR", "CIDRSet", "Entities")]
        if not any(k in body for k in keys):
            return bool(body.get("toPorts"))
        for selector in body.get(f"{prefix}Endpoints") or []:
            if self._endpoint_selector_matches(selector, section.namespace, peer):
                return True
        outside = not peer.is_pod and not peer.local_node and not peer.remote_node
        address = ipaddress.ip_address(peer.ip)
        blocks = [(c, []) for c in body.get(f"{prefix}CIDR") or []]
        blocks += [(b["cidr"], b.get("except") or []) for b in body.get(f"{prefix}CIDRSet") or []]
        for cidr, excepts in blocks:
            if (
                outside
                and address in ipaddress.ip_network(cidr, strict=False)
                and not any(address in ipaddress.ip_network(e, strict=False) for e in excepts)
            ):
                return True
        for entity in body.get(f"{prefix}Entities") or []:
            if (
                entity == "all"
                or (entity == "world" and outside)
                or (entity == "host" and peer.local_node)
                or (entity == "remote-node" and peer.remote_node)
                or (entity == "cluster" and not outside)
            ):
                return True
        return False

    @staticmethod
    def _l4_matches(section: Section, destination: Peer, protocol: str, port: int) -> bool:
        port_rules = section.body.get("toPorts") or []
        if not port_rules:
            return True
        for port_rule in port_rules:
            for spec in port_rule.get("ports") or []:
                wanted = spec.get("protocol", "ANY")
                value = str(spec.get("port", "0"))
                if not value.isdigit():
                    if any(
                        name == value.lower()
                        and number == port
                        and proto == protocol
                        and wanted in ("ANY", protocol)
                        for name, number, proto in destination.container_ports
                    ):
                        return True
                    continue
                first = int(value)
                if first == 0:
                    if wanted in ("ANY", protocol):
                        return True
                    continue
                if wanted == "ANY" and protocol not in ANY_PROTOCOLS:
                    continue
                if wanted in ("ANY", protocol) and first <= port <= spec.get("endPort", first):
                    return True
        return False

    # -- decisions ------------------------------------------------------------------

    def decide(
        self, pod: Peer, *, direction: str, other: Peer, protocol: str, port: int
    ) -> tuple[bool, set[str], set[str], set[str]]:
        """(allowed, the deny sections that match, the allow sections that match, the
        rules that enforce the direction)."""
        key = (pod.ip, direction, other.ip, protocol, port)
        if key not in self._decided:
            self._decided[key] = self._decide(
                pod, direction=direction, other=other, protocol=protocol, port=port
            )
        return self._decided[key]

    def _decide(
        self, pod: Peer, *, direction: str, other: Peer, protocol: str, port: int
    ) -> tuple[bool, set[str], set[str], set[str]]:
        selecting = self.selecting(pod, direction)
        if not selecting:
            return True, set(), set(), set()
        destination = pod if direction == "ingress" else other
        denying, allowing = set(), set()
        for _, sections in selecting:
            for s in sections:
                if self._l3_matches(s, other) and self._l4_matches(s, destination, protocol, port):
                    (denying if s.deny else allowing).add(s.ref)
        enforcing = {ref for ref, _ in selecting}
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
