"""The Kubernetes e2e NetworkPolicy model and its upstream cases, reusable by any
runner (the policy engine here; the real datapath in the node and lab tests).

Ported from kubernetes ``test/e2e/network/netpol`` (``network_policy.go``, ``model.go``,
``reachability.go``): namespaces x, y, z; pods a, b, c in each, labelled ``pod=<name>``,
serving TCP and UDP on ports 80 and 81 with container ports named
``serve-<port>-<protocol>``; every ordered pair probed (9x9 per port and protocol);
loopback (a pod to itself) ignored, as upstream ignores it.

A :class:`Case` is the upstream test: its name, and stages, each a full desired state
(the policies in force, label changes) and the probes to check in it with the
expected truth table. ``upstream_cases(pod_ips)`` builds them for concrete pod IPs
(the ipBlock cases need them).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

NAMESPACES = ("x", "y", "z")
POD_NAMES = ("a", "b", "c")
PORTS = (80, 81)
PROTOCOLS = ("TCP", "UDP")
NAMESPACE_LABEL_KEY = "kubernetes.io/metadata.name"
PODS = tuple(f"{ns}/{pod}" for ns in NAMESPACES for pod in POD_NAMES)

Json = dict[str, Any]


def default_pod_ips(extra_pods: Iterable[str] = ()) -> dict[str, str]:
    """Pod addresses for runs without a network (one /24 per namespace); pods a case
    adds (``extra_pods``) get addresses of their own, outside those /24s, in order."""
    ips = {
        f"{ns}/{pod}": f"10.244.{i}.{10 + j}"
        for i, ns in enumerate(NAMESPACES)
        for j, pod in enumerate(POD_NAMES)
    }
    for number, ref in enumerate(r for r in extra_pods if r not in ips):
        ips[ref] = f"10.244.{100 + number}.10"
    return ips


# -- objects ---------------------------------------------------------------------------


def namespace_object(name: str, extra_labels: Mapping[str, str] | None = None) -> Json:
    """Upstream labels its namespaces ``ns: <name>``; a stage's labels are added."""
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": {"ns": name, **(extra_labels or {})}},
    }


def pod_object(ref: str, *, ip: str | None, labels: Mapping[str, str] | None = None) -> Json:
    namespace, name = ref.split("/")
    containers = [
        {
            "name": f"cont-{port}-{protocol.lower()}",
            "ports": [
                {
                    "containerPort": port,
                    "name": f"serve-{port}-{protocol.lower()}",
                    "protocol": protocol,
                }
            ],
        }
        for port in PORTS
        for protocol in PROTOCOLS
    ]
    pod: Json = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            # None: the model's own label; {} is a pod whose labels were all removed.
            "labels": dict(labels) if labels is not None else {"pod": name},
        },
        "spec": {"containers": containers},
    }
    if ip is not None:
        pod["status"] = {"podIP": ip}
    return pod


# Upstream's Gen* helpers: SetSpecIngressRules / SetSpecEgressRules add the policy type.
def netpol(
    name: str,
    namespace: str,
    pod_selector: Json,
    *,
    ingress: list[Json] | None = None,
    egress: list[Json] | None = None,
    policy_types: list[str] | None = None,
) -> Json:
    spec: Json = {"podSelector": pod_selector}
    types = []
    if ingress is not None:
        spec["ingress"] = ingress
        types.append("Ingress")
    if egress is not None:
        spec["egress"] = egress
        types.append("Egress")
    spec["policyTypes"] = policy_types if policy_types is not None else types
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def match_labels(**labels: str) -> Json:
    return {"matchLabels": dict(labels)}


def ns_labels(namespace: str) -> Json:
    return {"matchLabels": {NAMESPACE_LABEL_KEY: namespace}}


def expr(key: str, operator: str, *values: str) -> Json:
    return {"matchExpressions": [{"key": key, "operator": operator, "values": list(values)}]}


# -- truth tables -------------------------------------------------------------------------


@dataclass
class Reachability:
    """Upstream's Reachability: the expected connectivity of every ordered pair."""

    default: bool = True
    # The pods of the table: the model's nine, and those a case adds.
    pods: Sequence[str] = PODS
    expected: dict[tuple[str, str], bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.expected = {(s, d): self.default for s in self.pods for d in self.pods}

    def expect(self, src: str, dst: str, connected: bool) -> Reachability:
        self.expected[(src, dst)] = connected
        return self

    def expect_peer(
        self,
        *,
        src_ns: str | None = None,
        src_pod: str | None = None,
        dst_ns: str | None = None,
        dst_pod: str | None = None,
        connected: bool,
    ) -> Reachability:
        for src, dst in self.expected:
            if _peer_matches(src, src_ns, src_pod) and _peer_matches(dst, dst_ns, dst_pod):
                self.expected[(src, dst)] = connected
        return self

    def expect_all_ingress(self, pod: str, connected: bool) -> Reachability:
        for src in self.pods:
            self.expected[(src, pod)] = connected
        return self

    def expect_all_egress(self, pod: str, connected: bool) -> Reachability:
        for dst in self.pods:
            self.expected[(pod, dst)] = connected
        return self

    def mismatches(self, observed: Mapping[tuple[str, str], bool]) -> list[tuple[str, str]]:
        """Pairs whose observed connectivity differs (loopback ignored, as upstream)."""
        return [
            (src, dst)
            for (src, dst), want in self.expected.items()
            if src != dst and observed[(src, dst)] != want
        ]

    def table(self, observed: Mapping[tuple[str, str], bool] | None = None) -> str:
        """Upstream's table: rows are sources, '.' connected, 'X' not, '*' a mismatch."""
        lines = ["-\t" + "\t".join(self.pods)]
        for src in self.pods:
            cells = []
            for dst in self.pods:
                want = self.expected[(src, dst)]
                cell = "." if want else "X"
                if observed is not None and src != dst and observed[(src, dst)] != want:
                    cell = "*" + ("." if observed[(src, dst)] else "X")
                cells.append(cell)
            lines.append(src + "\t" + "\t".join(cells))
        return "\n".join(lines)


def _peer_matches(pod: str, namespace: str | None, name: str | None) -> bool:
    pod_ns, pod_name = pod.split("/")
    return (namespace is None or namespace == pod_ns) and (name is None or name == pod_name)


# -- cases ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    port: int
    protocol: str  # TCP, UDP, SCTP
    reachability: Reachability


@dataclass(frozen=True)
class Stage:
    """One state of a case: the policies in force, label changes, what to probe.

    ``pod_labels`` replace a pod's labels (``pod=<name>`` by default);
    ``namespace_labels`` are added to a namespace's. ``extra_namespaces`` (name ->
    labels added to ``ns: <name>``) and ``extra_pods`` (``ns/name`` -> labels) exist in
    this stage only: created when it starts, gone in a stage that lacks them (as
    cyclonus' create/delete pod and namespace actions)."""

    policies: Sequence[Json]
    probes: Sequence[Probe]
    pod_labels: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    namespace_labels: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    extra_namespaces: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    extra_pods: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    @property
    def pods(self) -> tuple[str, ...]:
        return PODS + tuple(self.extra_pods)

    def namespace_objects(self) -> list[Json]:
        names = list(NAMESPACES) + list(self.extra_namespaces)
        return [
            namespace_object(
                ns, {**self.extra_namespaces.get(ns, {}), **self.namespace_labels.get(ns, {})}
            )
            for ns in names
        ]

    def objects(self, pod_ips: Mapping[str, str | None]) -> list[Json]:
        """Namespaces, pods and policies of this stage."""
        labels = {**self.extra_pods, **self.pod_labels}
        objects = self.namespace_objects()
        objects += [
            pod_object(ref, ip=pod_ips.get(ref), labels=labels.get(ref)) for ref in self.pods
        ]
        return objects + list(self.policies)


@dataclass(frozen=True)
class Case:
    name: str  # the upstream test's name
    stages: Sequence[Stage]

    @property
    def protocols(self) -> set[str]:
        return {probe.protocol for stage in self.stages for probe in stage.probes}


def R() -> Reachability:  # upstream's NewReachability(allPods, true)
    return Reachability(True)


def _cidr(ip: str, bits: int) -> str:
    return str(ipaddress.ip_network(f"{ip}/{bits}", strict=False))


def upstream_cases(pod_ips: Mapping[str, str]) -> list[Case]:
    """Every case of upstream network_policy.go (TCP, UDP and SCTP contexts)."""
    x, y, z = NAMESPACES
    tcp80, tcp81 = (80, "TCP"), (81, "TCP")

    def probe(port_proto: tuple[int, str], reach: Reachability) -> Probe:
        return Probe(port_proto[0], port_proto[1], reach)

    def one(name: str, policies: list[Json], *probes: Probe, **kw: Any) -> Case:
        return Case(name, [Stage(policies, list(probes), **kw)])

    deny_ingress = netpol("deny-ingress", x, {}, ingress=[])
    cases = [
        one(
            "should support a 'default-deny-ingress' policy",
            [deny_ingress],
            probe(tcp80, R().expect_peer(dst_ns=x, connected=False)),
        ),
        one(
            "should support a 'default-deny-all' policy",
            [netpol("deny-all", x, {}, ingress=[], egress=[])],
            probe(
                tcp80,
                R().expect_peer(dst_ns=x, connected=False).expect_peer(src_ns=x, connected=False),
            ),
        ),
        one(
            "should enforce policy to allow traffic from pods within server namespace based on"
            " PodSelector",
            [
                netpol(
                    "x-a-allows-x-b",
                    x,
                    match_labels(pod="a"),
                    ingress=[{"from": [{"podSelector": match_labels(pod="b")}]}],
                )
            ],
            probe(tcp80, R().expect_all_ingress("x/a", False).expect("x/b", "x/a", True)),
        ),
        one(
            "should enforce policy to allow ingress traffic for a target",
            [
                netpol("deny-all", x, {}, ingress=[]),
                netpol(
                    "allow-all-to-a",
                    x,
                    match_labels(pod="a"),
                    ingress=[{"from": [{"podSelector": {}, "namespaceSelector": {}}]}],
                ),
            ],
            probe(
                tcp80,
                R()
                .expect_all_ingress("x/a", True)
                .expect_all_ingress("x/b", False)
                .expect_all_ingress("x/c", False),
            ),
        ),
        one(
            "should enforce policy to allow ingress traffic from pods in all namespaces",
            [
                netpol(
                    "allow-from-another-ns",
                    x,
                    match_labels(pod="a"),
                    ingress=[{"from": [{"namespaceSelector": {"matchLabels": {}}}]}],
                )
            ],
            probe(tcp80, R()),
        ),
        one(
            "should enforce policy to allow traffic only from a different namespace, based on"
            " NamespaceSelector",
            [
                netpol(
                    "allow-client-a-via-ns-selector",
                    x,
                    match_labels(pod="a"),
                    ingress=[{"from": [{"namespaceSelector": ns_labels(y)}]}],
                )
            ],
            probe(
                tcp80,
                R()
                .expect_peer(src_ns=x, dst_ns=x, dst_pod="a", connected=False)
                .expect_peer(src_ns=z, dst_ns=x, dst_pod="a", connected=False),
            ),
        ),
        one(
            "should enforce policy based on PodSelector with MatchExpressions",
            [
                netpol(
                    "x-a-allows-x-b",
                    x,
                    match_labels(pod="a"),
                    ingress=[{"from": [{"podSelector": expr("pod", "In", "b")}]}],
                )
            ],
            probe(tcp80, R().expect_all_ingress("x/a", False).expect("x/b", "x/a", True)),
        ),
        one(
            "should enforce policy based on NamespaceSelector with MatchExpressions",
            [
                netpol(
                    "allow-ns-y-match-selector",
                    x,
                    match_labels(pod="a"),
                    ingress=[{"from": [{"namespaceSelector": expr(NAMESPACE_LABEL_KEY, "In", y)}]}],
                )
            ],
            probe(
                tcp80,
                R()
                .expect_peer(src_ns=x, dst_ns=x, dst_pod="a", connected=False)
                .expect_peer(src_ns=z, dst_ns=x, dst_pod="a", connected=False),
            ),
        ),
        one(
            "should enforce policy based on PodSelector or NamespaceSelector",
            [
                netpol(
                    "allow-ns-y-match-selector",
                    x,
                    match_labels(pod="a"),
                    ingress=[
                        {
                            "from": [
                                {"namespaceSelector": expr(NAMESPACE_LABEL_KEY, "NotIn", x)},
                                {"podSelector": match_labels(pod="b")},
                            ]
                        }
                    ],
                )
            ],
            probe(tcp80, R().expect("x/a", "x/a", False).expect("x/c", "x/a", False)),
        ),
        one(
            "should enforce policy based on PodSelector and NamespaceSelector",
            [
                netpol(
                    "allow-ns-y-podselector-and-nsselector",
                    x,
                    match_labels(pod="a"),
                    ingress=[
                        {
                            "from": [
                                {
                                    "namespaceSelector": expr(NAMESPACE_LABEL_KEY, "NotIn", x),
                                    "podSelector": match_labels(pod="b"),
                                }
                            ]
                        }
                    ],
                )
            ],
            probe(
                tcp80,
                R()
                .expect_all_ingress("x/a", False)
                .expect("y/b", "x/a", True)
                .expect("z/b", "x/a", True),
            ),
        ),
        one(
            "should enforce policy based on Multiple PodSelectors and NamespaceSelectors",
            [
                netpol(
                    "allow-ns-y-z-pod-b-c",
                    x,
                    match_labels(pod="a"),
                    ingress=[
                        {
                            "from": [
                                {
                                    "namespaceSelector": expr(NAMESPACE_LABEL_KEY, "NotIn", x),
                                    "podSelector": expr("pod", "In", "b", "c"),
                                }
                            ]
                        }
                    ],
                )
            ],
            probe(
                tcp80,
                R()
                .expect_peer(src_ns=x, dst_ns=x, dst_pod="a", connected=False)
                .expect("y/a", "x/a", False)
                .expect("z/a", "x/a", False),
            ),
        ),
        one(
            "should enforce policy based on any PodSelectors",
            [
                netpol(
                    "allow-ns-x-pod-b-c",
                    x,
                    match_labels(pod="a"),
                    ingress=[
                        {
                            "from": [
                                {"podSelector": match_labels(pod="b")},
                                {"podSelector": match_labels(pod="c")},
                            ]
                        }
                    ],
                )
            ],
            probe(
                tcp80,
                R()
                .expect_all_ingress("x/a", False)
                .expect("x/b", "x/a", True)
                .expect("x/c", "x/a", True),
            ),
        ),
        one(
            "should enforce policy to allow traffic only from a pod in a different namespace"
            " based on PodSelector and NamespaceSelector",
            [_allow_ns_y_pod_a(x, y)],
            probe(tcp80, R().expect_all_ingress("x/a", False).expect("y/a", "x/a", True)),
        ),
        one(
            "should enforce policy based on Ports",
            [_allow_port_from_y("allow-client-a-via-ns-selector", x, y, 81, "TCP")],
            probe(tcp81, _only_y_reaches_xa(x, y, z)),
        ),
        Case(
            "should enforce multiple, stacked policies with overlapping podSelectors",
            [
                Stage(
                    [_allow_port_from_y("allow-client-a-via-ns-selector", x, y, 81, "TCP")],
                    [
                        probe(tcp81, _only_y_reaches_xa(x, y, z)),
                        probe(tcp80, R().expect_all_ingress("x/a", False)),
                    ],
                ),
                Stage(
                    [
                        _allow_port_from_y("allow-client-a-via-ns-selector", x, y, 81, "TCP"),
                        _allow_port_from_y("allow-client-a-via-ns-selector-80", x, y, 80, "TCP"),
                    ],
                    [probe(tcp80, _only_y_reaches_xa(x, y, z))],
                ),
            ],
        ),
        one(
            "should support allow-all policy",
            [netpol("allow-all", x, {}, ingress=[{}])],
            probe(tcp80, R()),
            probe(tcp81, R()),
        ),
        one(
            "should allow ingress access on one named port",
            [netpol("allow-all", x, {}, ingress=[{"ports": [{"port": "serve-81-tcp"}]}])],
            probe(tcp81, R()),
            probe(tcp80, R().expect_peer(dst_ns=x, connected=False)),
        ),
        one(
            "should allow ingress access from namespace on one named port",
            [
                netpol(
                    "allow-client-a-via-ns-selector-80",
                    x,
                    match_labels(pod="a"),
                    ingress=[
                        {
                            "from": [{"namespaceSelector": ns_labels(y)}],
                            "ports": [{"port": "serve-80-tcp", "protocol": "TCP"}],
                        }
                    ],
                )
            ],
            probe(
                tcp80,
                R()
                .expect_peer(src_ns=x, dst_ns=x, dst_pod="a", connected=False)
                .expect_peer(src_ns=z, dst_ns=x, dst_pod="a", connected=False),
            ),
            probe(tcp81, R().expect_all_ingress("x/a", False)),
        ),
        one(
            "should allow egress access on one named port",
            [netpol("allow-egress", x, {}, egress=[{"ports": [{"port": "serve-80-tcp"}]}])],
            probe(tcp80, R()),
            probe(tcp81, R().expect_peer(src_ns=x, connected=False)),
        ),
        Case(
            "should enforce updated policy",
            [
                Stage(
                    [netpol("allow-all-mutate-to-deny-all", x, {}, ingress=[{}])],
                    [probe(tcp81, R())],
                ),
                Stage(
                    [netpol("allow-all-mutate-to-deny-all", x, {}, ingress=[])],
                    [probe(tcp81, R().expect_peer(dst_ns=x, connected=False))],
                ),
            ],
        ),
        Case(
            "should allow ingress access from updated namespace",
            [
                Stage(
                    [_allow_ns2_updated(x)], [probe(tcp80, R().expect_all_ingress("x/a", False))]
                ),
                Stage(
                    [_allow_ns2_updated(x)],
                    [
                        probe(
                            tcp80,
                            R()
                            .expect_all_ingress("x/a", False)
                            .expect_peer(src_ns=y, connected=True),
                        )
                    ],
                    namespace_labels={y: {"ns2": "updated"}},
                ),
            ],
        ),
        Case(
            "should allow ingress access from updated pod",
            [
                Stage(
                    [_allow_pod2_updated(x)], [probe(tcp80, R().expect_all_ingress("x/a", False))]
                ),
                Stage(
                    [_allow_pod2_updated(x)],
                    [probe(tcp80, R().expect_all_ingress("x/a", False).expect("x/b", "x/a", True))],
                    pod_labels={"x/b": {"pod": "b", "pod2": "updated"}},
                ),
            ],
        ),
        one(
            "should deny ingress from pods on other namespaces",
            [
                netpol(
                    "deny-empty-policy",
                    x,
                    {},
                    ingress=[{"from": [{"podSelector": {"matchLabels": {}}}]}],
                )
            ],
            probe(
                tcp80,
                R()
                .expect_peer(src_ns=y, dst_ns=x, connected=False)
                .expect_peer(src_ns=z, dst_ns=x, connected=False),
            ),
        ),
        Case(
            "should deny ingress access to updated pod",
            [
                Stage([_deny_isolated(x)], [probe(tcp80, R())]),
                Stage(
                    [_deny_isolated(x)],
                    [probe(tcp80, R().expect_all_ingress("x/a", False))],
                    pod_labels={"x/a": {"pod": "a", "target": "isolated"}},
                ),
            ],
        ),
        one(
            "should deny egress from pods based on PodSelector",
            [netpol("deny-egress-pod-a", x, match_labels(pod="a"), egress=[])],
            probe(tcp80, R().expect_all_egress("x/a", False)),
        ),
        one(
            "should deny egress from all pods in a namespace",
            [netpol("deny-egress-ns-x", x, {}, egress=[])],
            probe(tcp80, R().expect_peer(src_ns=x, connected=False)),
        ),
        one(
            "should work with Ingress, Egress specified together",
            [
                netpol(
                    "allow-client-a-via-pod-selector",
                    x,
                    match_labels(pod="a"),
                    ingress=[{"from": [{"podSelector": match_labels(pod="b")}]}],
                    egress=[{"ports": [{"port": 80}]}],
                    policy_types=["Egress", "Ingress"],
                )
            ],
            probe(tcp80, R().expect_all_ingress("x/a", False).expect("x/b", "x/a", True)),
            probe(
                tcp81,
                R()
                .expect_all_ingress("x/a", False)
                .expect_all_egress("x/a", False)
                .expect("x/b", "x/a", True),
            ),
        ),
        one(
            "should support denying of egress traffic on the client side (even if the server"
            " explicitly allows this traffic)",
            [
                netpol(
                    "allow-to-ns-y-pod-a",
                    x,
                    match_labels(pod="a"),
                    egress=[
                        {
                            "to": [
                                {
                                    "namespaceSelector": ns_labels(y),
                                    "podSelector": match_labels(pod="a"),
                                }
                            ]
                        }
                    ],
                ),
                _allow_from_xa(y, "allow-from-xa-on-ya-match-selector", "a", x),
                _allow_from_xa(y, "allow-from-xa-on-yb-match-selector", "b", x),
            ],
            probe(
                tcp80,
                R()
                .expect_peer(src_ns=x, src_pod="a", connected=False)
                .expect_peer(dst_ns=y, dst_pod="a", connected=False)
                .expect_peer(src_ns=x, src_pod="a", dst_ns=y, dst_pod="a", connected=True)
                .expect_peer(dst_ns=y, dst_pod="b", connected=False),
            ),
        ),
        one(
            "should enforce egress policy allowing traffic to a server in a different namespace"
            " based on PodSelector and NamespaceSelector",
            [
                netpol(
                    "allow-to-ns-y-pod-a",
                    x,
                    match_labels(pod="a"),
                    egress=[
                        {
                            "to": [
                                {
                                    "namespaceSelector": ns_labels(y),
                                    "podSelector": match_labels(pod="a"),
                                }
                            ]
                        }
                    ],
                )
            ],
            probe(tcp80, R().expect_all_egress("x/a", False).expect("x/a", "y/a", True)),
        ),
        one(
            "should enforce ingress policy allowing any port traffic to a server on a specific"
            " protocol",
            [
                netpol(
                    "allow-ingress-by-proto",
                    x,
                    match_labels(pod="a"),
                    ingress=[{"ports": [{"protocol": "TCP"}]}],
                )
            ],
            probe(tcp80, R()),
            probe((80, "UDP"), R().expect_peer(dst_ns=x, dst_pod="a", connected=False)),
        ),
        Case(
            "should enforce multiple ingress policies with ingress allow-all policy taking"
            " precedence",
            [
                Stage(
                    [netpol("allow-ingress-port-80", x, {}, ingress=[{"ports": [{"port": 80}]}])],
                    [probe(tcp81, R().expect_peer(dst_ns=x, connected=False))],
                ),
                Stage(
                    [
                        netpol("allow-ingress-port-80", x, {}, ingress=[{"ports": [{"port": 80}]}]),
                        netpol("allow-ingress", x, {}, ingress=[{}]),
                    ],
                    [probe(tcp81, R())],
                ),
            ],
        ),
        Case(
            "should enforce multiple egress policies with egress allow-all policy taking"
            " precedence",
            [
                Stage(
                    [netpol("allow-egress-port-80", x, {}, egress=[{"ports": [{"port": 80}]}])],
                    [probe(tcp81, R().expect_peer(src_ns=x, connected=False))],
                ),
                Stage(
                    [
                        netpol("allow-egress-port-80", x, {}, egress=[{"ports": [{"port": 80}]}]),
                        netpol("allow-egress", x, {}, egress=[{}]),
                    ],
                    [probe(tcp81, R())],
                ),
            ],
        ),
        Case(
            "should stop enforcing policies after they are deleted",
            [
                Stage(
                    [netpol("deny-all", x, {}, ingress=[], egress=[])],
                    [
                        probe(
                            tcp80,
                            R()
                            .expect_peer(src_ns=x, connected=False)
                            .expect_peer(dst_ns=x, connected=False),
                        )
                    ],
                ),
                Stage([], [probe(tcp80, R())]),
            ],
        ),
        one(
            "should allow egress access to server in CIDR block",
            [
                netpol(
                    "allow-client-a-via-cidr-egress-rule",
                    x,
                    match_labels(pod="a"),
                    egress=[{"to": [{"ipBlock": {"cidr": _cidr(pod_ips["y/b"], 32)}}]}],
                )
            ],
            probe(tcp80, R().expect_all_egress("x/a", False).expect("x/a", "y/b", True)),
        ),
        one(
            "should enforce except clause while egress access to server in CIDR block",
            [_cidr_except_policy(x, pod_ips)],
            probe(tcp80, R().expect("x/a", "x/b", False)),
        ),
        Case(
            "should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed",
            [
                Stage(
                    [_cidr_except_policy(x, pod_ips)],
                    [probe(tcp80, R().expect("x/a", "x/b", False))],
                ),
                Stage(
                    [
                        netpol(
                            "allow-client-a-via-cidr-egress-rule",
                            x,
                            match_labels(pod="a"),
                            egress=[{"to": [{"ipBlock": {"cidr": _cidr(pod_ips["x/b"], 32)}}]}],
                        )
                    ],
                    [probe(tcp80, R().expect_all_egress("x/a", False).expect("x/a", "x/b", True))],
                ),
            ],
        ),
        Case(
            "should enforce policies to check ingress and egress policies can be controlled"
            " independently based on PodSelector",
            [
                Stage(
                    [netpol("allow-egress-for-target", x, match_labels(pod="a"), egress=[{}])],
                    [probe(tcp80, R())],
                ),
                Stage(
                    [
                        netpol("allow-egress-for-target", x, match_labels(pod="a"), egress=[{}]),
                        netpol(
                            "deny-ingress-via-label-selector", x, match_labels(pod="a"), ingress=[]
                        ),
                    ],
                    [probe(tcp80, R().expect_all_ingress("x/a", False))],
                ),
            ],
        ),
        one(
            "should not mistakenly treat 'protocol: SCTP' as 'protocol: TCP', even if the plugin"
            " doesn't support SCTP",
            [
                deny_ingress,
                netpol(
                    "allow-only-sctp-ingress-on-port-81",
                    x,
                    match_labels(pod="a"),
                    ingress=[{"ports": [{"port": 81, "protocol": "SCTP"}]}],
                ),
            ],
            probe(tcp81, R().expect_peer(dst_ns=x, connected=False)),
        ),
        one(
            "should properly isolate pods that are selected by a policy allowing SCTP, even if"
            " the plugin doesn't support SCTP",
            [
                netpol(
                    "allow-only-sctp-ingress-on-port-80",
                    x,
                    match_labels(pod="a"),
                    ingress=[{"ports": [{"port": 80, "protocol": "SCTP"}]}],
                )
            ],
            probe(tcp81, R().expect_all_ingress("x/a", False)),
        ),
        one(
            "should not allow access by TCP when a policy specifies only UDP",
            [
                netpol(
                    "allow-only-udp-ingress-on-port-81",
                    x,
                    match_labels(pod="a"),
                    ingress=[{"ports": [{"port": 81, "protocol": "UDP"}]}],
                )
            ],
            probe(tcp81, R().expect_all_ingress("x/a", False)),
        ),
        one(
            "should enforce policy to allow traffic based on NamespaceSelector with MatchLabels"
            " using default ns label",
            [
                netpol(
                    "allow-client-a-via-ns-selector-for-immutable-ns-label",
                    x,
                    match_labels(pod="a"),
                    ingress=[{"from": [{"namespaceSelector": ns_labels(y)}]}],
                )
            ],
            probe(
                tcp80,
                R()
                .expect_peer(src_ns=x, dst_ns=x, dst_pod="a", connected=False)
                .expect_peer(src_ns=z, dst_ns=x, dst_pod="a", connected=False),
            ),
        ),
        one(
            "should enforce policy based on NamespaceSelector with MatchExpressions using"
            " default ns label",
            [
                netpol(
                    "allow-ns-y-match-selector-for-immutable-ns-label",
                    x,
                    match_labels(pod="a"),
                    egress=[{"to": [{"namespaceSelector": expr(NAMESPACE_LABEL_KEY, "NotIn", y)}]}],
                )
            ],
            probe(tcp80, R().expect_peer(src_ns=x, src_pod="a", dst_ns=y, connected=False)),
        ),
    ]
    for protocol in ("UDP", "SCTP"):
        context = f"using {protocol}: "
        cases += [
            one(
                context + "should support a 'default-deny-ingress' policy",
                [netpol("deny-all", x, {}, ingress=[])],
                probe((80, protocol), R().expect_peer(dst_ns=x, connected=False)),
            ),
            one(
                context + "should enforce policy based on Ports",
                [_allow_port_from_y("allow-ingress-on-port-81-ns-x", x, y, 81, protocol)],
                probe(
                    (81, protocol),
                    R()
                    .expect_peer(src_ns=x, dst_ns=x, dst_pod="a", connected=False)
                    .expect_peer(src_ns=z, dst_ns=x, dst_pod="a", connected=False),
                ),
            ),
            one(
                context + "should enforce policy to allow traffic only from a pod in a different"
                " namespace based on PodSelector and NamespaceSelector",
                [_allow_ns_y_pod_a(x, y)],
                probe(
                    (80, protocol), R().expect_all_ingress("x/a", False).expect("y/a", "x/a", True)
                ),
            ),
        ]
    return cases


def _allow_ns_y_pod_a(x: str, y: str) -> Json:
    return netpol(
        "allow-ns-y-pod-a-via-namespace-pod-selector",
        x,
        match_labels(pod="a"),
        ingress=[
            {"from": [{"namespaceSelector": ns_labels(y), "podSelector": match_labels(pod="a")}]}
        ],
    )


def _allow_port_from_y(name: str, x: str, y: str, port: int, protocol: str) -> Json:
    return netpol(
        name,
        x,
        match_labels(pod="a"),
        ingress=[
            {
                "from": [{"namespaceSelector": ns_labels(y)}],
                "ports": [{"port": port, "protocol": protocol}],
            }
        ],
    )


def _only_y_reaches_xa(x: str, y: str, z: str) -> Reachability:
    return (
        R()
        .expect_peer(src_ns=x, dst_ns=x, dst_pod="a", connected=False)
        .expect_peer(src_ns=y, dst_ns=x, dst_pod="a", connected=True)
        .expect_peer(src_ns=z, dst_ns=x, dst_pod="a", connected=False)
    )


def _allow_ns2_updated(x: str) -> Json:
    return netpol(
        "allow-client-a-via-ns-selector",
        x,
        match_labels(pod="a"),
        ingress=[{"from": [{"namespaceSelector": match_labels(ns2="updated")}]}],
    )


def _allow_pod2_updated(x: str) -> Json:
    return netpol(
        "allow-client-a-via-pod-selector",
        x,
        match_labels(pod="a"),
        ingress=[{"from": [{"podSelector": match_labels(pod="b", pod2="updated")}]}],
    )


def _deny_isolated(x: str) -> Json:
    return netpol("deny-ingress-via-label-selector", x, match_labels(target="isolated"), ingress=[])


def _allow_from_xa(y: str, name: str, target: str, x: str) -> Json:
    return netpol(
        name,
        y,
        match_labels(pod=target),
        ingress=[
            {"from": [{"namespaceSelector": ns_labels(x), "podSelector": match_labels(pod="a")}]}
        ],
    )


def _cidr_except_policy(x: str, pod_ips: Mapping[str, str]) -> Json:
    return netpol(
        "allow-client-a-via-cidr-egress-rule",
        x,
        match_labels(pod="a"),
        egress=[
            {
                "to": [
                    {
                        "ipBlock": {
                            "cidr": _cidr(pod_ips["x/a"], 4),
                            "except": [_cidr(pod_ips["x/b"], 32)],
                        }
                    }
                ]
            }
        ],
    )


Observe = Callable[[Stage, Probe], Mapping[tuple[str, str], bool]]


def check_case(case: Case, observe: Observe) -> list[str]:
    """Run every stage's probes through ``observe`` (which puts the stage in force
    and probes all pairs); the failures, each with upstream's truth table."""
    failures = []
    for number, stage in enumerate(case.stages, start=1):
        for probe in stage.probes:
            observed = observe(stage, probe)
            if probe.reachability.mismatches(observed):
                failures.append(
                    f"stage {number}, {probe.protocol}/{probe.port} (expected, *observed):\n"
                    + probe.reachability.table(observed)
                )
    return failures


def all_protocols(cases: Iterable[Case]) -> set[str]:
    return {p for case in cases for p in case.protocols}
