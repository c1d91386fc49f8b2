"""The policy engine: Kubernetes and Cilium policies in, per-endpoint entries out.

``compute(PolicyInput(...))`` resolves every policy against the known pods and their
identities and returns, for each (local) endpoint, whether ingress and egress are
enforced and the :class:`~.model.PolicyEntry` list the datapath needs, with the rule
each entry comes from, plus the CIDR identities for the ipcache.

Kubernetes NetworkPolicy semantics:

* a pod is isolated for a direction only once a policy selecting it lists that
  direction in ``policyTypes`` (defaulted at validation as the API server does);
  the rules of all policies selecting it are ORed;
* an absent or empty ``from``/``to`` means every peer; absent ``ingress``/``egress``
  rules with the type listed means nothing is allowed;
* a peer with ``podSelector`` and ``namespaceSelector`` needs both; ``podSelector``
  alone means the policy's namespace; ``ipBlock`` (with ``except``) covers CIDR
  identities and the pods and nodes inside it (:mod:`.cidr`);
* ports: absent = every port of every protocol; a port without number = every port
  of its protocol; numbers, ``endPort`` ranges and named ports (resolved against the
  destination pod's container ports: the endpoint's own on ingress, each peer
  identity's pods' on egress); TCP, UDP and SCTP (entries carry protocol 132; the
  datapath reads SCTP ports at the same offsets as TCP/UDP);
* traffic from the node itself (identity 1, kubelet probes) is always allowed in.

Cilium (CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy), L3/L4: an endpoint is
enforced for a direction once a rule selecting it has (non-empty) ``ingress`` or
``ingressDeny`` (``egress``/``egressDeny``); a namespaced policy selects endpoints of its
own namespace only; ``fromEndpoints``/``toEndpoints`` selectors get the namespace scope
Cilium's import gives them (:func:`_peer_selector`) and match pods, the reserved
identities (``reserved:host``, ...) and the CIDR identities (which carry
``reserved:world``); a present but empty peer list selects nothing; entities map to
reserved identities (host 1, world 2 and every CIDR identity, remote-node 6, init,
health, unmanaged, kube-apiserver, ingress; cluster = every pod identity + the cluster's
reserved ones; all = any); CIDR peers never select pods or nodes (Cilium's default); a
rule with only ``toPorts`` allows every peer on those ports, an empty rule allows
nothing; port 0 is every port; protocol ``ANY`` with a port covers TCP, UDP and SCTP,
without one every protocol. Deny entries win over allow entries, across policies and
kinds; an allow entry a deny entry fully covers is dropped, since it can never apply
(which also keeps the datapath's longest-prefix lookup from preferring it).

Endpoint selectors match identity labels: a key with a source (``k8s:app``) matches that
source only, a bare key or ``any:`` every source. Because the datapath decides by
identity, pods with equal labels are treated alike: an ``ipBlock`` lets a pod identity in
only if it holds every one of its pods (none outside, none in an ``except``), and a
named egress port allows the number the destination identity's pods give the name,
none if they give it several.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ciliate.control.identity.allocator import RESERVED_IDENTITIES
from ciliate.control.identity.labels import (
    K8S_SOURCE,
    NAMESPACE_LABEL,
    NAMESPACE_LABELS_PREFIX,
    RESERVED_SOURCE,
)
from ciliate.control.policy.cidr import BlockIndex, CidrBlock, CidrIdentities
from ciliate.control.policy.model import (
    ANY_IDENTITY,
    CLUSTER_RESERVED_IDENTITIES,
    HOST_IDENTITY,
    PROTOCOL_NUMBERS,
    WORLD_IDENTITY,
    ContainerPort,
    Direction,
    EndpointPolicy,
    PodEndpoint,
    PolicyEntry,
    PolicyResult,
    RuleRef,
    covers_entry,
)
from ciliate.control.policy.selectors import Selector

__all__ = ["HOST_DEFAULT", "PolicyInput", "compute"]

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
HOST_DEFAULT = RuleRef("default", "traffic from the node itself (kubelet probes) is always allowed")
# The reserved identities a Cilium endpoint selector can match, with their labels
# (world-ipv4/-ipv6 left out: the datapath's world is identity 2).
_RESERVED_LABELS: Mapping[int, Mapping[str, str]] = {
    number: {f"{RESERVED_SOURCE}{name}": ""}
    for number, name in RESERVED_IDENTITIES.items()
    if name not in ("world-ipv4", "world-ipv6")
}
_ENTITY_IDENTITIES: Mapping[str, int] = {
    name: number
    for number, name in RESERVED_IDENTITIES.items()
    if name in ("host", "remote-node", "init", "health", "unmanaged", "kube-apiserver", "ingress")
}
# A CIDR identity carries the world label, as in Cilium: reserved:world selects it.
_CIDR_LABELS: Mapping[str, str] = {f"{RESERVED_SOURCE}world": ""}
Labels = Mapping[str, str]
_ALL_PROTOCOLS = tuple(PROTOCOL_NUMBERS.values())


@dataclass(frozen=True)
class PolicyInput:
    """Everything the engine reads.

    ``pods``: every pod of the cluster with its identity (and IP, ports, when known);
    ``policies``: validated NetworkPolicy, CiliumNetworkPolicy and
    CiliumClusterwideNetworkPolicy objects; ``node_identities``: node addresses with
    their identity (this node's: host, 1; the others': remote-node, 6), for ipBlocks.
    """

    pods: Sequence[PodEndpoint]
    policies: Sequence[Mapping[str, Any]]
    node_identities: Mapping[ipaddress.IPv4Address, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Port:
    protocol: int  # 0: any (Cilium ANY with no port)
    port: int = 0
    end: int = 0
    name: str | None = None


@dataclass(frozen=True)
class _Rule:
    direction: Direction
    deny: bool
    origin: RuleRef
    peers: frozenset[int]
    ports: tuple[_Port, ...]  # empty: every port of every protocol


@dataclass(frozen=True)
class _Policy:
    name: str
    selects: Callable[[PodEndpoint], bool]
    isolates: frozenset[Direction]
    rules: tuple[_Rule, ...]
    # Directions with rules but without default deny (Cilium's enableDefaultDeny:
    # false): the endpoint is enforced so the denies bite, everything else allowed.
    opens: frozenset[Direction] = frozenset()


@dataclass(frozen=True)
class _K8sView:
    """A pod identity as Kubernetes selectors see it."""

    namespace: str | None
    pod_labels: Mapping[str, str]
    namespace_labels: Mapping[str, str]


def _k8s_view(labels: Mapping[str, str]) -> _K8sView:
    namespace = labels.get(NAMESPACE_LABEL)
    pod_labels: dict[str, str] = {}
    namespace_labels: dict[str, str] = {}
    for key, value in labels.items():
        if key.startswith(NAMESPACE_LABELS_PREFIX):
            namespace_labels[key[len(NAMESPACE_LABELS_PREFIX) :]] = value
        elif key.startswith(K8S_SOURCE) and key != NAMESPACE_LABEL:
            pod_labels[key[len(K8S_SOURCE) :]] = value
    if namespace is not None:
        namespace_labels.setdefault(NAMESPACE_NAME_LABEL, namespace)
    return _K8sView(namespace, pod_labels, namespace_labels)


class _Universe:
    """The identities peers can resolve to, and what is known about them."""

    def __init__(self, inp: PolicyInput, cidr_ids: Mapping[ipaddress.IPv4Network, int]) -> None:
        self.pods = list(inp.pods)
        self.node_identities = dict(inp.node_identities)
        self.cidr_ids = dict(cidr_ids)
        self.labels: dict[int, Mapping[str, str]] = {}
        self.pods_of: dict[int, list[PodEndpoint]] = defaultdict(list)
        for pod in self.pods:
            self.labels.setdefault(pod.identity, pod.labels)
            self.pods_of[pod.identity].append(pod)
        self.k8s = {identity: _k8s_view(labels) for identity, labels in self.labels.items()}
        self._views: dict[int, _K8sView] = {}
        self._selectable: Mapping[int, Labels] | None = None
        self.blocks = BlockIndex(
            cidr_ids=self.cidr_ids, pods=self.pods, node_identities=self.node_identities
        )

    def view_of(self, pod: PodEndpoint) -> _K8sView:
        """The pod's labels as Kubernetes selectors see them (computed once per pod)."""
        view = self._views.get(id(pod))
        if view is None:
            view = self._views[id(pod)] = _k8s_view(pod.labels)
        return view

    def pod_identities(self) -> set[int]:
        return set(self.labels)

    def world_identities(self) -> set[int]:
        """World itself and every CIDR identity (each is a part of the world)."""
        return {WORLD_IDENTITY, *self.cidr_ids.values()}

    def selectable(self) -> Mapping[int, Labels]:
        """Every identity but the CIDR ones a Cilium endpoint selector may match, with
        its labels: the pods' and the reserved ones. (CIDR identities all carry the
        same label, so a selector is matched against it once: :meth:`endpoints`.)"""
        if self._selectable is None:
            self._selectable = {**_RESERVED_LABELS, **self.labels}
        return self._selectable

    def endpoints(self, selects: Callable[[Labels], bool]) -> set[int]:
        """The identities a Cilium endpoint selector matches."""
        ids = {i for i, labels in self.selectable().items() if selects(labels)}
        if self.cidr_ids and selects(_CIDR_LABELS):
            ids.update(self.cidr_ids.values())
        return ids

    def named_ports(self, identity: int, name: str, protocol: int) -> set[tuple[int, int]]:
        """(protocol, port) of the container ports called ``name`` on ``identity``'s
        pods; ``protocol`` 0 (Cilium ANY) takes any protocol. A protocol for which the
        pods give the name more than one number gets none: the datapath cannot tell
        the pods apart, and opening every number would open each pod a port it does
        not name so (Cilium's GetNamedPorts skips such an identity too)."""
        numbers: dict[int, set[int]] = defaultdict(set)
        for pod in self.pods_of.get(identity, ()):
            for port in pod.ports:
                if port.name == name and protocol in (0, port.protocol):
                    numbers[port.protocol].add(port.port)
        return {(proto, min(ports)) for proto, ports in numbers.items() if len(ports) == 1}

    def block(self, block: CidrBlock, *, match_pods: bool) -> set[int]:
        return self.blocks.expand(block, match_pods=match_pods)


def _policy_name(obj: Mapping[str, Any]) -> str:
    meta = obj["metadata"]
    where = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{obj['kind']} {where}{meta['name']}"


# -- prefixes ---------------------------------------------------------------------


def _blocks_of(obj: Mapping[str, Any]) -> Iterable[tuple[str, list[str]]]:
    """Every (cidr, excepts) a policy names."""
    if obj["kind"] == "NetworkPolicy":
        spec = obj["spec"]
        for rule in spec.get("ingress", []):
            for peer in rule.get("from", []):
                if "ipBlock" in peer:
                    yield peer["ipBlock"]["cidr"], peer["ipBlock"].get("except", [])
        for rule in spec.get("egress", []):
            for peer in rule.get("to", []):
                if "ipBlock" in peer:
                    yield peer["ipBlock"]["cidr"], peer["ipBlock"].get("except", [])
        return
    for rule in _cilium_rules(obj):
        for key in ("ingress", "ingressDeny", "egress", "egressDeny"):
            for section in rule[1].get(key, []):
                for cidr in section.get("fromCIDR", []) + section.get("toCIDR", []):
                    yield cidr, []
                for block in section.get("fromCIDRSet", []) + section.get("toCIDRSet", []):
                    yield block["cidr"], block.get("except", [])


def _v4(text: str) -> ipaddress.IPv4Network | None:
    network = ipaddress.ip_network(text, strict=False)
    return network if isinstance(network, ipaddress.IPv4Network) else None


def _policy_prefixes(inp: PolicyInput) -> set[ipaddress.IPv4Network]:
    """The prefixes that need a CIDR identity: every IPv4 prefix a policy names but /0
    (world itself) and the host prefixes of pods and nodes (their own identities)."""
    hosts = {pod.ip for pod in inp.pods if pod.ip is not None} | set(inp.node_identities)
    prefixes = set()
    for obj in inp.policies:
        for cidr, excepts in _blocks_of(obj):
            for text in (cidr, *excepts):
                network = _v4(text)
                if network is None or network.prefixlen == 0:
                    continue
                if network.prefixlen == 32 and network.network_address in hosts:
                    continue
                prefixes.add(network)
    return prefixes


# -- ports ------------------------------------------------------------------------


def _np_ports(raw: Sequence[Mapping[str, Any]]) -> tuple[_Port, ...]:
    ports = []
    for port in raw:
        protocol = PROTOCOL_NUMBERS[port["protocol"]]
        value = port.get("port")
        if value is None:
            ports.append(_Port(protocol))
        elif isinstance(value, str):
            ports.append(_Port(protocol, name=value))
        else:
            end = port.get("endPort", 0)
            ports.append(_Port(protocol, value, end if end != value else 0))
    return tuple(ports)


def _cilium_ports(raw: Sequence[Mapping[str, Any]]) -> tuple[_Port, ...]:
    ports: list[_Port] = []
    for port_rule in raw:
        for port in port_rule.get("ports", []):
            name = port["protocol"]
            value = port.get("port", "0")
            if not value.isdigit():
                protocol = PROTOCOL_NUMBERS.get(name, 0)
                ports.append(_Port(protocol, name=value))
                continue
            number, end = int(value), port.get("endPort", 0)
            end = end if number and end != number else 0
            if name == "ANY":
                if number == 0:
                    ports.append(_Port(0))
                else:
                    ports.extend(_Port(p, number, end) for p in _ALL_PROTOCOLS)
            else:
                ports.append(_Port(PROTOCOL_NUMBERS[name], number, end))
    return tuple(ports)


# -- Kubernetes NetworkPolicy ----------------------------------------------------------


def _np_peers(
    peers: Sequence[Mapping[str, Any]], *, namespace: str, universe: _Universe
) -> frozenset[int]:
    if not peers:
        return frozenset([ANY_IDENTITY])
    ids: set[int] = set()
    for peer in peers:
        if "ipBlock" in peer:
            cidr = _v4(peer["ipBlock"]["cidr"])
            if cidr is None:
                continue  # IPv6: the datapath carries IPv4 only
            excepts = tuple(n for e in peer["ipBlock"].get("except", []) if (n := _v4(e)))
            ids |= universe.block(CidrBlock(cidr, excepts), match_pods=True)
            continue
        pod_sel = Selector.parse(peer.get("podSelector"))
        ns_sel = Selector.parse(peer["namespaceSelector"]) if "namespaceSelector" in peer else None
        for identity, view in universe.k8s.items():
            if view.namespace is None:
                continue
            if ns_sel is None:
                if view.namespace != namespace:
                    continue
            elif not ns_sel.matches(view.namespace_labels):
                continue
            if pod_sel.matches(view.pod_labels):
                ids.add(identity)
    return frozenset(ids)


def _network_policy(obj: Mapping[str, Any], universe: _Universe) -> list[_Policy]:
    name = _policy_name(obj)
    namespace = obj["metadata"]["namespace"]
    spec = obj["spec"]
    selector = Selector.parse(spec.get("podSelector"))
    types = set(spec.get("policyTypes", ["Ingress"]))
    rules: list[_Rule] = []
    isolates: set[Direction] = set()
    if "Ingress" in types:
        isolates.add("ingress")
        for i, rule in enumerate(spec.get("ingress", [])):
            rules.append(
                _Rule(
                    "ingress",
                    False,
                    RuleRef(name, f"spec.ingress[{i}]"),
                    _np_peers(rule.get("from", []), namespace=namespace, universe=universe),
                    _np_ports(rule.get("ports", [])),
                )
            )
    if "Egress" in types:
        isolates.add("egress")
        for i, rule in enumerate(spec.get("egress", [])):
            rules.append(
                _Rule(
                    "egress",
                    False,
                    RuleRef(name, f"spec.egress[{i}]"),
                    _np_peers(rule.get("to", []), namespace=namespace, universe=universe),
                    _np_ports(rule.get("ports", [])),
                )
            )

    def selects(pod: PodEndpoint) -> bool:
        view = universe.view_of(pod)
        return view.namespace == namespace and selector.matches(view.pod_labels)

    return [_Policy(name, selects, frozenset(isolates), tuple(rules))]


# -- Cilium -----------------------------------------------------------------------------


def _cilium_rules(obj: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    rules = []
    if obj.get("spec") is not None:
        rules.append(("spec", obj["spec"]))
    for i, rule in enumerate(obj.get("specs") or []):
        rules.append((f"specs[{i}]", rule))
    return rules


def _key_parts(key: str) -> tuple[str, str]:
    """``("k8s", "app")`` for ``k8s:app``; a key without a source is ``any``."""
    source, colon, name = key.partition(":")
    return (source, name) if colon else ("any", key)


def _peer_selector(selector: Selector, *, namespace: str | None) -> Callable[[Labels], bool]:
    """A ``fromEndpoints``/``toEndpoints`` selector with the namespace scope Cilium's
    policy import adds (pkg/k8s/apis/cilium.io/utils getEndpointSelector): a selector
    naming a ``reserved:`` label is taken as it is; otherwise, unless it names the
    pod namespace label (``k8s:`` or ``any:`` source), a namespaced policy's selector
    matches only its own namespace -- unless it names namespace labels
    (``io.cilium.k8s.namespace.labels.*``) -- and a clusterwide policy's only
    endpoints that have a namespace (pods, not the reserved identities)."""
    keys = [_key_parts(k) for k in selector.label_keys()]
    if any(source == RESERVED_SOURCE.rstrip(":") for source, _ in keys):
        return selector.matches
    namespace_key = NAMESPACE_LABEL.removeprefix(K8S_SOURCE)
    namespace_labels = NAMESPACE_LABELS_PREFIX.removeprefix(K8S_SOURCE)
    scoped = [(s, n) for s, n in keys if s in ("k8s", "any")]
    if any(name == namespace_key for _, name in scoped):
        return selector.matches
    if namespace is None:
        return lambda labels: NAMESPACE_LABEL in labels and selector.matches(labels)
    if any(name.startswith(namespace_labels) for _, name in scoped):
        return selector.matches
    return lambda labels: labels.get(NAMESPACE_LABEL) == namespace and selector.matches(labels)


def _entity_identities(entity: str, universe: _Universe) -> set[int]:
    """Cilium's entities (pkg/policy/api/entity.go) as identities. The datapath is
    IPv4 only: ``world-ipv4`` is ``world``, ``world-ipv6`` matches nothing."""
    if entity == "all":
        return {ANY_IDENTITY}
    if entity in ("world", "world-ipv4"):
        return universe.world_identities()
    if entity == "cluster":
        return universe.pod_identities() | set(CLUSTER_RESERVED_IDENTITIES)
    if entity in _ENTITY_IDENTITIES:
        return {_ENTITY_IDENTITIES[entity]}
    if entity in ("none", "world-ipv6"):
        return set()
    raise ValueError(f"entity {entity!r} is not one of Cilium's entities")


def _cilium_peers(
    section: Mapping[str, Any],
    *,
    direction: Direction,
    namespace: str | None,
    universe: _Universe,
) -> frozenset[int]:
    prefix = "from" if direction == "ingress" else "to"
    endpoints, cidrs = section.get(f"{prefix}Endpoints"), section.get(f"{prefix}CIDR")
    cidr_sets, entities = section.get(f"{prefix}CIDRSet"), section.get(f"{prefix}Entities")
    if endpoints is None and cidrs is None and cidr_sets is None and entities is None:
        # No L3 part: toPorts alone allows every peer on those ports; {} allows nothing.
        # (A present but empty list selects nothing, as in Cilium.)
        return frozenset([ANY_IDENTITY]) if section.get("toPorts") else frozenset()
    ids: set[int] = set()
    for raw in endpoints or []:
        ids |= universe.endpoints(
            _peer_selector(Selector.parse(raw, cilium=True), namespace=namespace)
        )
    blocks = [CidrBlock(n) for c in cidrs or [] if (n := _v4(c))]
    for raw in cidr_sets or []:
        if (cidr := _v4(raw["cidr"])) is not None:
            blocks.append(CidrBlock(cidr, tuple(n for e in raw.get("except", []) if (n := _v4(e)))))
    for block in blocks:
        ids |= universe.block(block, match_pods=False)
    for entity in entities or []:
        ids |= _entity_identities(entity, universe)
    return frozenset(ids)


def _cilium_policy(obj: Mapping[str, Any], universe: _Universe) -> list[_Policy]:
    name = _policy_name(obj)
    namespace = obj["metadata"].get("namespace") if obj["kind"] == "CiliumNetworkPolicy" else None
    policies = []
    for path, rule in _cilium_rules(obj):
        subject = dict(rule.get("endpointSelector") or {})
        if namespace is not None and NAMESPACE_LABEL in (subject.get("matchLabels") or {}):
            # Cilium replaces a namespaced policy's own namespace match with the
            # policy's namespace (and logs it): the policy never reaches beyond it.
            labels = dict(subject["matchLabels"])
            del labels[NAMESPACE_LABEL]
            subject["matchLabels"] = labels
        selector = Selector.parse(subject, cilium=True)
        # enableDefaultDeny: unset, a direction is default deny once it has rules;
        # true makes it default deny even without; false never.
        default_deny = rule.get("enableDefaultDeny") or {}
        isolates: set[Direction] = {d for d in ("ingress", "egress") if default_deny.get(d)}
        opens: set[Direction] = set()
        rules: list[_Rule] = []
        for key in ("ingress", "ingressDeny", "egress", "egressDeny"):
            direction: Direction = "ingress" if key.startswith("ingress") else "egress"
            sections = rule.get(key, [])
            if sections:
                if default_deny.get(direction, True):
                    isolates.add(direction)
                else:
                    opens.add(direction)
            for i, section in enumerate(sections):
                rules.append(
                    _Rule(
                        direction,
                        key.endswith("Deny"),
                        RuleRef(name, f"{path}.{key}[{i}]"),
                        _cilium_peers(
                            section, direction=direction, namespace=namespace, universe=universe
                        ),
                        _cilium_ports(section.get("toPorts", [])),
                    )
                )

        def selects(pod: PodEndpoint, selector: Selector = selector) -> bool:
            if namespace is not None and pod.labels.get(NAMESPACE_LABEL) != namespace:
                return False
            return selector.matches(pod.labels)

        policies.append(
            _Policy(f"{name} {path}", selects, frozenset(isolates), tuple(rules), frozenset(opens))
        )
    return policies


# -- entries ------------------------------------------------------------------------------


def _entries(rule: _Rule, endpoint: PodEndpoint, universe: _Universe) -> Iterable[PolicyEntry]:
    direction, deny = rule.direction, rule.deny
    if not rule.ports:
        for peer in rule.peers:
            yield PolicyEntry(direction, peer, 0, deny=deny)
        return
    for port in rule.ports:
        if port.name is None:
            for peer in rule.peers:
                yield PolicyEntry(direction, peer, port.protocol, port.port, port.end, deny)
        elif direction == "ingress":
            # The destination is the endpoint itself: its own container ports.
            own = {
                (p.protocol, p.port)
                for p in endpoint.ports
                if p.name == port.name and port.protocol in (0, p.protocol)
            }
            for peer in rule.peers:
                for protocol, number in own:
                    yield PolicyEntry(direction, peer, protocol, number, 0, deny)
        else:
            # The destination is the peer: each peer identity's pods say what the name is.
            for peer in rule.peers:
                targets = universe.pod_identities() if peer == ANY_IDENTITY else {peer}
                for target in targets:
                    for protocol, number in universe.named_ports(target, port.name, port.protocol):
                        yield PolicyEntry(direction, target, protocol, number, 0, deny)


def _prune_shadowed_allows(entries: set[PolicyEntry]) -> set[PolicyEntry]:
    denies = [e for e in entries if e.deny]
    if not denies:
        return entries
    return {e for e in entries if e.deny or not any(covers_entry(d, e) for d in denies)}


def _entry_key(entry: PolicyEntry) -> tuple[str, int, int, int, int, bool]:
    # A plain tuple key: much cheaper than the dataclass's generated ordering.
    return (entry.direction, entry.identity, entry.protocol, entry.port, entry.port_end, entry.deny)


def _depends_on_endpoint(rule: _Rule) -> bool:
    """Whether the rule's entries differ by endpoint (named ingress ports)."""
    return rule.direction == "ingress" and any(p.name is not None for p in rule.ports)


def _endpoint_policy(
    selected: Sequence[_Policy],
    pod: PodEndpoint,
    universe: _Universe,
    rule_entries: dict[int, list[PolicyEntry]],
) -> EndpointPolicy:
    isolated_by: dict[Direction, list[str]] = {"ingress": [], "egress": []}
    opened_by: dict[Direction, list[str]] = {"ingress": [], "egress": []}
    origins: dict[PolicyEntry, list[RuleRef]] = {}
    for policy in selected:
        for direction in sorted(policy.isolates):
            isolated_by[direction].append(policy.name)
        for direction in sorted(policy.opens):
            opened_by[direction].append(policy.name)
        for rule in policy.rules:
            if _depends_on_endpoint(rule):
                entries: Iterable[PolicyEntry] = _entries(rule, pod, universe)
            else:
                cached = rule_entries.get(id(rule))
                if cached is None:
                    cached = rule_entries[id(rule)] = list(_entries(rule, pod, universe))
                entries = cached
            for entry in entries:
                refs = origins.setdefault(entry, [])
                if rule.origin not in refs:
                    refs.append(rule.origin)
    if isolated_by["ingress"]:
        origins.setdefault(PolicyEntry("ingress", HOST_IDENTITY, 0), []).append(HOST_DEFAULT)
    for direction, names in opened_by.items():
        if names and not isolated_by[direction]:
            # Only rules without default deny select the endpoint here: as Cilium
            # does, everything is allowed but what their denies name.
            isolated_by[direction].extend(names)
            for name in names:
                origins.setdefault(PolicyEntry(direction, ANY_IDENTITY, 0), []).append(
                    RuleRef(name, f"enableDefaultDeny.{direction}: false")
                )
    kept = sorted(_prune_shadowed_allows(set(origins)), key=_entry_key)
    return EndpointPolicy(
        ingress_enforced=bool(isolated_by["ingress"]),
        egress_enforced=bool(isolated_by["egress"]),
        entries=tuple(kept),
        origins={e: tuple(origins[e]) for e in kept},
        isolated_by={d: tuple(names) for d, names in isolated_by.items() if names},
    )


def compute(
    inp: PolicyInput,
    *,
    local: Collection[str] | None = None,
    cidr_identities: CidrIdentities | None = None,
) -> PolicyResult:
    """Each endpoint's policy (only ``local`` ones, ``"namespace/name"``, if given) and
    the CIDR identities. Pass the same ``cidr_identities`` to successive calls to keep
    a prefix's identity stable while policies change.

    Endpoints selected by the same policies share one computed result (and so one
    object), unless a named ingress port makes their entries differ by their own
    container ports; each rule's entries are computed once."""
    allocator = cidr_identities if cidr_identities is not None else CidrIdentities()
    cidr_ids = allocator.assign(_policy_prefixes(inp))
    universe = _Universe(inp, cidr_ids)
    policies: list[_Policy] = []
    for obj in inp.policies:
        if obj["kind"] == "NetworkPolicy":
            policies.extend(_network_policy(obj, universe))
        elif obj["kind"] in ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"):
            policies.extend(_cilium_policy(obj, universe))
        else:
            raise ValueError(f"{_policy_name(obj)} is not a policy kind")
    wanted = None if local is None else set(local)
    endpoints: dict[str, EndpointPolicy] = {}
    rule_entries: dict[int, list[PolicyEntry]] = {}
    shared: dict[tuple[tuple[int, ...], tuple[ContainerPort, ...] | None], EndpointPolicy] = {}
    per_endpoint = [any(_depends_on_endpoint(r) for r in p.rules) for p in policies]
    for pod in inp.pods:
        if wanted is not None and pod.ref not in wanted:
            continue
        chosen = tuple(i for i, policy in enumerate(policies) if policy.selects(pod))
        selected = [policies[i] for i in chosen]
        own_ports = any(per_endpoint[i] for i in chosen)
        signature = (chosen, pod.ports if own_ports else None)
        if signature not in shared:
            shared[signature] = _endpoint_policy(selected, pod, universe, rule_entries)
        endpoints[pod.ref] = shared[signature]
    return PolicyResult(endpoints=endpoints, cidr_identities=cidr_ids)
