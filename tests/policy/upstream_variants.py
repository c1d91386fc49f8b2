"""More cases on the e2e model than the current upstream file holds: the same It()
cases as earlier versions of kubernetes ``test/e2e/network/netpol`` wrote them, the
runtime changes cyclonus' action cases make, and every probe filled in.

* ``historical_cases``: the 1.20-era ``network_policy.go`` and ``policies.go``, and
  cyclonus' port of them (``pkg/generator/upstreame2e*.go``), wrote some cases
  differently from today's file: an egress policy also allowed DNS (a second rule,
  or a second port, ``UDP 53``; the probes went through Service names), ports were
  named (``serve-80-tcp``) or left without a protocol, namespaces were selected by
  their ``ns`` label, policyTypes were left for the API server to default, and 20
  unrelated policies sat in namespace ``default``. Same It() name, the variant in
  brackets, upstream's truth tables.
* The prototype of the suite and cyclonus also undid each runtime change (a label
  removed again, a policy updated back): those are the ``... and back`` cases.
* ``action_cases``: cyclonus' actions (``pkg/generator/actioncases.go``): create and
  delete a policy, update it, create a namespace with pods and delete it, create and
  delete a pod, set labels and take them away again; plus a pod created in a
  namespace a policy already selects. Their tables come from the reference reading
  of the API (``k8s_reference.py``); cyclonus computes its own the same way.
* ``with_every_probe``: a case's stages probed on TCP and UDP, 80 and 81, the probes
  upstream does not make filled in from the reference reading (whose tables are
  checked against every upstream table in tests/policy/test_e2e_netpol.py).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from . import generated_cases
from .k8s_reference import Reference
from .model import (
    NAMESPACE_LABEL_KEY,
    PORTS,
    Case,
    Json,
    Probe,
    Reachability,
    Stage,
    default_pod_ips,
    expr,
    match_labels,
    netpol,
)

TCP80, TCP81, UDP80, UDP81 = (80, "TCP"), (81, "TCP"), (80, "UDP"), (81, "UDP")
# What the 1.20-era helpers (GetAllowEgressByPort, GetAllowEgressByCIDR, ...) added to
# every egress policy so that the probes could resolve Service names.
DNS_PORT: Json = {"protocol": "UDP", "port": 53}
DNS_RULE: Json = {"ports": [DNS_PORT]}
SERVE_80_TCP: Json = {"port": "serve-80-tcp"}


def R(pods: Sequence[str] | None = None) -> Reachability:
    return Reachability(True) if pods is None else Reachability(True, pods=pods)


def _probe(port_proto: tuple[int, str], reach: Reachability) -> Probe:
    return Probe(port_proto[0], port_proto[1], reach)


def _one(name: str, policies: list[Json], *probes: Probe, **stage: Any) -> Case:
    return Case(name, [Stage(policies, list(probes), **stage)])


def _ns(name: str) -> Json:
    """The 1.20-era namespace selector: the ``ns`` label the suite sets itself."""
    return match_labels(ns=name)


def _cidr(ip: str, bits: int) -> str:
    return str(ipaddress.ip_network(f"{ip}/{bits}", strict=False))


def _only_y_reaches_xa() -> Reachability:
    return (
        R()
        .expect_peer(src_ns="x", dst_ns="x", dst_pod="a", connected=False)
        .expect_peer(src_ns="z", dst_ns="x", dst_pod="a", connected=False)
    )


def _background_policies() -> list[Json]:
    """GetRandomIngressPolicies(21)[:20], created once in namespace ``default``: they
    select pods labelled ``unique: N``, which no pod is."""
    return [
        netpol(f"allow-all-{i}", "default", match_labels(unique=str(i)), ingress=[{}])
        for i in range(20)
    ]


def historical_cases(pod_ips: Mapping[str, str]) -> list[Case]:
    """The It() cases as the 1.20-era suite (and cyclonus' port of it) wrote them,
    where the policies differ from today's; upstream's truth tables."""
    x, y = "x", "y"
    dns_1_20 = " [k8s 1.20: egress also allows UDP 53]"
    ns_1_20 = " [k8s 1.20: namespaces by their 'ns' label]"

    def egress_by_port(name: str, port: Json) -> Json:  # GetAllowEgressByPort
        return netpol(name, x, {}, egress=[{"ports": [port, DNS_PORT]}])

    def egress_by_cidr(cidr: str, *, except_: list[str] | None = None) -> Json:
        block: dict[str, Any] = {"cidr": cidr}
        if except_ is not None:
            block["except"] = except_
        return netpol(
            "allow-client-a-via-cidr-egress-rule",
            x,
            match_labels(pod="a"),
            egress=[{"to": [{"ipBlock": block}]}, DNS_RULE],
        )

    def by_ns_and_port(name: str, port: Json) -> Json:  # GetAllowIngressByNamespaceAndPort
        return netpol(
            name,
            x,
            match_labels(pod="a"),
            ingress=[{"from": [{"namespaceSelector": _ns(y)}], "ports": [port]}],
        )

    except_policy = egress_by_cidr(_cidr(pod_ips["x/a"], 4), except_=[_cidr(pod_ips["x/b"], 32)])
    only_xb_denied = R().expect("x/a", "x/b", False)
    x_isolated = R().expect_peer(src_ns=x, connected=False).expect_peer(dst_ns=x, connected=False)

    cases = [
        _one(
            "should support a 'default-deny-all' policy" + dns_1_20,
            [
                netpol(
                    "deny-all-tcp-allow-dns",
                    x,
                    {},
                    ingress=[],
                    egress=[DNS_RULE],
                    policy_types=["Ingress", "Egress"],
                )
            ],
            _probe(TCP80, x_isolated),
        ),
        Case(
            "should support a 'default-deny-ingress' policy"
            " [k8s 1.20: 20 unrelated policies in namespace default]",
            [
                Stage(
                    [netpol("deny-ingress", x, {}, ingress=[]), *_background_policies()],
                    [_probe(TCP80, R().expect_peer(dst_ns=x, connected=False))],
                    extra_namespaces={"default": {}},
                )
            ],
        ),
        _one(
            "should allow egress access on one named port" + dns_1_20,
            [egress_by_port("allow-egress", SERVE_80_TCP)],
            _probe(TCP80, R()),
            _probe(TCP81, R().expect_peer(src_ns=x, connected=False)),
        ),
        _one(
            "should work with Ingress, Egress specified together"
            " [k8s 1.20: egress on serve-80-tcp and UDP 53, policyTypes defaulted]",
            [
                # GetAllowIngressByPod plus an egress rule: no policyTypes, so the API
                # server's defaulting makes it [Ingress, Egress].
                generated_cases.netpol(
                    "allow-client-a-via-pod-selector",
                    x,
                    match_labels(pod="a"),
                    ingress=[{"from": [{"podSelector": match_labels(pod="b")}]}],
                    egress=[{"ports": [SERVE_80_TCP, DNS_PORT]}],
                )
            ],
            _probe(TCP80, R().expect_all_ingress("x/a", False).expect("x/b", "x/a", True)),
            _probe(
                TCP81,
                R()
                .expect_all_ingress("x/a", False)
                .expect_all_egress("x/a", False)
                .expect("x/b", "x/a", True),
            ),
        ),
        _one(
            "should enforce egress policy allowing traffic to a server in a different"
            " namespace based on PodSelector and NamespaceSelector" + dns_1_20,
            [
                netpol(
                    "allow-to-ns-y-pod-a",
                    x,
                    match_labels(pod="a"),
                    egress=[
                        {
                            "to": [
                                {"namespaceSelector": _ns(y), "podSelector": match_labels(pod="a")}
                            ]
                        },
                        DNS_RULE,
                    ],
                )
            ],
            _probe(TCP80, R().expect_all_egress("x/a", False).expect("x/a", "y/a", True)),
        ),
        _one(
            "should support denying of egress traffic on the client side (even if the server"
            " explicitly allows this traffic) [cyclonus: UDP 53 and 'ns' labels]",
            [
                netpol(
                    "allow-to-ns-y-pod-a",
                    x,
                    match_labels(pod="a"),
                    egress=[
                        {
                            "to": [
                                {"namespaceSelector": _ns(y), "podSelector": match_labels(pod="a")}
                            ]
                        },
                        DNS_RULE,
                    ],
                ),
                *(
                    netpol(
                        f"allow-from-xa-on-y{target}-match-selector",
                        y,
                        match_labels(pod=target),
                        ingress=[
                            {
                                "from": [
                                    {
                                        "namespaceSelector": _ns(x),
                                        "podSelector": match_labels(pod="a"),
                                    }
                                ]
                            }
                        ],
                    )
                    for target in ("a", "b")
                ),
            ],
            _probe(
                TCP80,
                R()
                .expect_peer(src_ns=x, src_pod="a", connected=False)
                .expect_peer(dst_ns=y, dst_pod="a", connected=False)
                .expect_peer(src_ns=x, src_pod="a", dst_ns=y, dst_pod="a", connected=True)
                .expect_peer(dst_ns=y, dst_pod="b", connected=False),
            ),
        ),
        Case(
            "should enforce multiple ingress policies with ingress allow-all policy taking"
            " precedence [k8s 1.20: port 80 named serve-80-tcp]",
            [
                Stage(
                    [netpol("allow-ingress-port-80", x, {}, ingress=[{"ports": [SERVE_80_TCP]}])],
                    [_probe(TCP81, R().expect_peer(dst_ns=x, connected=False))],
                ),
                Stage(
                    [
                        netpol("allow-ingress-port-80", x, {}, ingress=[{"ports": [SERVE_80_TCP]}]),
                        netpol("allow-ingress", x, {}, ingress=[{}]),
                    ],
                    [_probe(TCP81, R())],
                ),
            ],
        ),
        Case(
            "should enforce multiple egress policies with egress allow-all policy taking"
            " precedence [k8s 1.20: serve-80-tcp and UDP 53]",
            [
                Stage(
                    [egress_by_port("allow-egress-port-80", SERVE_80_TCP)],
                    [_probe(TCP81, R().expect_peer(src_ns=x, connected=False))],
                ),
                Stage(
                    [
                        egress_by_port("allow-egress-port-80", SERVE_80_TCP),
                        netpol("allow-egress", x, {}, egress=[{}]),
                    ],
                    [_probe(TCP81, R())],
                ),
            ],
        ),
        _one(
            "should allow egress access to server in CIDR block" + dns_1_20,
            [egress_by_cidr(_cidr(pod_ips["y/b"], 32))],
            _probe(TCP80, R().expect_all_egress("x/a", False).expect("x/a", "y/b", True)),
        ),
        _one(
            "should enforce except clause while egress access to server in CIDR block" + dns_1_20,
            [except_policy],
            _probe(TCP80, only_xb_denied),
        ),
        Case(
            "should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed"
            + dns_1_20,
            [
                Stage([except_policy], [_probe(TCP80, R().expect("x/a", "x/b", False))]),
                Stage(
                    [egress_by_cidr(_cidr(pod_ips["x/b"], 32))],
                    [_probe(TCP80, R().expect_all_egress("x/a", False).expect("x/a", "x/b", True))],
                ),
            ],
        ),
        _one(
            "should not allow access by TCP when a policy specifies only SCTP [k8s 1.20]",
            [
                netpol(
                    "allow-only-sctp-ingress-on-port-81",
                    x,
                    match_labels(pod="a"),
                    ingress=[{"ports": [{"port": 81, "protocol": "SCTP"}]}],
                )
            ],
            _probe(TCP81, R().expect_all_ingress("x/a", False)),
        ),
        # The namespace selectors of the 1.20 suite, on the label it set itself.
        _one(
            "should enforce policy to allow traffic only from a different namespace, based on"
            " NamespaceSelector" + ns_1_20,
            [
                netpol(
                    "allow-client-a-via-ns-selector",
                    x,
                    match_labels(pod="a"),
                    ingress=[{"from": [{"namespaceSelector": _ns(y)}]}],
                )
            ],
            _probe(TCP80, _only_y_reaches_xa()),
        ),
        _one(
            "should enforce policy based on NamespaceSelector with MatchExpressions" + ns_1_20,
            [
                netpol(
                    "allow-ns-y-match-selector",
                    x,
                    match_labels(pod="a"),
                    ingress=[{"from": [{"namespaceSelector": expr("ns", "In", y)}]}],
                )
            ],
            _probe(TCP80, _only_y_reaches_xa()),
        ),
        _one(
            "should enforce policy based on PodSelector or NamespaceSelector" + ns_1_20,
            [
                netpol(
                    "allow-ns-y-match-selector",
                    x,
                    match_labels(pod="a"),
                    ingress=[
                        {
                            "from": [
                                {"namespaceSelector": expr("ns", "NotIn", x)},
                                {"podSelector": match_labels(pod="b")},
                            ]
                        }
                    ],
                )
            ],
            _probe(TCP80, R().expect("x/a", "x/a", False).expect("x/c", "x/a", False)),
        ),
        _one(
            "should enforce policy based on PodSelector and NamespaceSelector" + ns_1_20,
            [
                netpol(
                    "allow-ns-y-podselector-and-nsselector",
                    x,
                    match_labels(pod="a"),
                    ingress=[
                        {
                            "from": [
                                {
                                    "namespaceSelector": expr("ns", "NotIn", x),
                                    "podSelector": match_labels(pod="b"),
                                }
                            ]
                        }
                    ],
                )
            ],
            _probe(
                TCP80,
                R()
                .expect_all_ingress("x/a", False)
                .expect("y/b", "x/a", True)
                .expect("z/b", "x/a", True),
            ),
        ),
        _one(
            "should enforce policy based on Multiple PodSelectors and NamespaceSelectors" + ns_1_20,
            [
                netpol(
                    "allow-ns-y-z-pod-b-c",
                    x,
                    match_labels(pod="a"),
                    ingress=[
                        {
                            "from": [
                                {
                                    "namespaceSelector": expr("ns", "NotIn", x),
                                    "podSelector": expr("pod", "In", "b", "c"),
                                }
                            ]
                        }
                    ],
                )
            ],
            _probe(
                TCP80,
                R()
                .expect_peer(src_ns=x, dst_ns=x, dst_pod="a", connected=False)
                .expect("y/a", "x/a", False)
                .expect("z/a", "x/a", False),
            ),
        ),
        _one(
            "should enforce policy to allow traffic only from a pod in a different namespace"
            " based on PodSelector and NamespaceSelector" + ns_1_20,
            [
                netpol(
                    "allow-ns-y-pod-a-via-namespace-pod-selector",
                    x,
                    match_labels(pod="a"),
                    ingress=[
                        {
                            "from": [
                                {"namespaceSelector": _ns(y), "podSelector": match_labels(pod="a")}
                            ]
                        }
                    ],
                )
            ],
            _probe(TCP80, R().expect_all_ingress("x/a", False).expect("y/a", "x/a", True)),
        ),
        _one(
            "should enforce policy based on Ports [k8s 1.20: no protocol (TCP by default),"
            " 'ns' label]",
            [by_ns_and_port("allow-client-a-via-ns-selector", {"port": 81})],
            _probe(TCP81, _only_y_reaches_xa()),
            # Ours: the defaulted protocol is TCP, so UDP 81 is not opened.
            _probe(UDP81, R().expect_all_ingress("x/a", False)),
        ),
        Case(
            "should enforce multiple, stacked policies with overlapping podSelectors"
            " [k8s 1.20: no protocol, 'ns' label]",
            [
                Stage(
                    [by_ns_and_port("allow-client-a-via-ns-selector", {"port": 81})],
                    [
                        _probe(TCP81, _only_y_reaches_xa()),
                        _probe(TCP80, R().expect_all_ingress("x/a", False)),
                    ],
                ),
                Stage(
                    [
                        by_ns_and_port("allow-client-a-via-ns-selector", {"port": 81}),
                        by_ns_and_port("allow-client-a-via-ns-selector-80", {"port": 80}),
                    ],
                    [_probe(TCP80, _only_y_reaches_xa())],
                ),
            ],
        ),
        _one(
            "should allow ingress access from namespace on one named port"
            " [k8s 1.20: no protocol, 'ns' label]",
            [by_ns_and_port("allow-client-a-via-ns-selector-80", SERVE_80_TCP)],
            _probe(TCP80, _only_y_reaches_xa()),
            _probe(TCP81, R().expect_all_ingress("x/a", False)),
        ),
    ]
    return cases + _and_back_cases() + _legacy_cases(pod_ips)


def _legacy_cases(pod_ips: Mapping[str, str]) -> list[Case]:
    """The legacy suite (``network_legacy.go``, a server pod and client pods created
    per check, until k8s 1.24) under the same It() names, where its policies or its
    runtime changes differ, on the model: x/a plays the server, the other pods the
    clients."""
    x = "x"
    legacy = " [legacy suite: "
    closed = R().expect_all_ingress("x/a", False)

    def from_pod(name: str, selector: Json, port: int | None = None) -> Json:
        rule: dict[str, Any] = {"from": [{"podSelector": selector}]}
        if port is not None:
            rule["ports"] = [{"port": port}]
        return netpol(name, x, match_labels(pod="a"), ingress=[rule])

    deny_all = netpol("deny-all", x, {}, ingress=[])
    by_y = {"namespaceSelector": _ns("y")}
    isolated_selector = {
        "matchLabels": {"pod": "a"},
        "matchExpressions": [{"key": "isolated", "operator": "Exists"}],
    }
    y_only_on_80 = (
        R()
        .expect_peer(src_ns=x, dst_ns=x, connected=False)
        .expect_peer(src_ns="z", dst_ns=x, connected=False)
        .expect_peer(src_ns=x, dst_ns="z", connected=False)
    )
    x_closed = R().expect_peer(src_ns=x, connected=False).expect_peer(dst_ns=x, connected=False)
    # Which pods share the server's /24 depends on the addresses (all of them, on one
    # node): x/b reaches those, x/a excepted.
    subnet = ipaddress.ip_network(_cidr(pod_ips["x/a"], 24))
    server_subnet_but_server = R()
    for dst, ip in pod_ips.items():
        if dst in server_subnet_but_server.pods:
            inside = ipaddress.ip_address(ip) in subnet and dst != "x/a"
            server_subnet_but_server.expect("x/b", dst, inside)
    return [
        Case(
            "should enforce updated policy" + legacy + "from pod b on 80, updated to pod c on 81]",
            [
                Stage(
                    [from_pod("allow-ingress", match_labels(pod="b"), 80)],
                    [
                        _probe(
                            TCP80, R().expect_all_ingress("x/a", False).expect("x/b", "x/a", True)
                        ),
                        _probe(TCP81, closed),
                    ],
                ),
                Stage(
                    [from_pod("allow-ingress", match_labels(pod="c"), 81)],
                    [
                        _probe(TCP80, closed),
                        _probe(
                            TCP81, R().expect_all_ingress("x/a", False).expect("x/c", "x/a", True)
                        ),
                    ],
                ),
            ],
        ),
        Case(
            "should allow ingress access from updated pod"
            + legacy
            + "peers without a 'pod' label, then x/b's labels all removed]",
            [
                Stage(
                    [from_pod("allow-pod-b-via-pod-selector", expr("pod", "DoesNotExist"))],
                    [_probe(TCP80, closed)],
                ),
                Stage(
                    [from_pod("allow-pod-b-via-pod-selector", expr("pod", "DoesNotExist"))],
                    [
                        _probe(
                            TCP80, R().expect_all_ingress("x/a", False).expect("x/b", "x/a", True)
                        )
                    ],
                    pod_labels={"x/b": {}},
                ),
            ],
        ),
        Case(
            "should deny ingress access to updated pod"
            + legacy
            + "pod=a and 'isolated' Exists, the label added with an empty value]",
            [
                Stage(
                    [
                        netpol(
                            "deny-ingress-via-isolated-label-selector",
                            x,
                            isolated_selector,
                            ingress=[],
                        )
                    ],
                    [_probe(TCP80, R())],
                ),
                Stage(
                    [
                        netpol(
                            "deny-ingress-via-isolated-label-selector",
                            x,
                            isolated_selector,
                            ingress=[],
                        )
                    ],
                    [_probe(TCP80, closed)],
                    pod_labels={"x/a": {"pod": "a", "isolated": ""}},
                ),
            ],
        ),
        Case(
            "should allow ingress access from updated namespace"
            + legacy
            + "the value of a namespace label changed]",
            [
                Stage(
                    [
                        netpol(
                            "allow-ns-b-via-namespace-selector",
                            x,
                            match_labels(pod="a"),
                            ingress=[{"from": [{"namespaceSelector": _ns("y-updated")}]}],
                        )
                    ],
                    [_probe(TCP80, closed)],
                ),
                Stage(
                    [
                        netpol(
                            "allow-ns-b-via-namespace-selector",
                            x,
                            match_labels(pod="a"),
                            ingress=[{"from": [{"namespaceSelector": _ns("y-updated")}]}],
                        )
                    ],
                    [
                        _probe(
                            TCP80,
                            R()
                            .expect_all_ingress("x/a", False)
                            .expect_peer(src_ns="y", dst_ns=x, dst_pod="a", connected=True),
                        )
                    ],
                    namespace_labels={"y": {"ns": "y-updated"}},
                ),
            ],
        ),
        _one(
            "should work with Ingress, Egress specified together"
            + legacy
            + "in from and out to namespace y, on 80 only]",
            [
                netpol(
                    "ingress-egress-rule",
                    x,
                    {},
                    ingress=[{"from": [by_y], "ports": [{"port": 80}]}],
                    egress=[{"to": [by_y], "ports": [{"port": 80}]}],
                )
            ],
            _probe(TCP80, y_only_on_80),
            _probe(TCP81, x_closed),
        ),
        Case(
            "should stop enforcing policies after they are deleted"
            + legacy
            + "a deny and an allow, deleted one at a time]",
            [
                Stage([deny_all], [_probe(TCP80, R().expect_peer(dst_ns=x, connected=False))]),
                Stage(
                    [deny_all, from_pod("allow-from-client-a-pod-selector", match_labels(pod="b"))],
                    [
                        _probe(
                            TCP80,
                            R().expect_peer(dst_ns=x, connected=False).expect("x/b", "x/a", True),
                        )
                    ],
                ),
                Stage([deny_all], [_probe(TCP80, R().expect_peer(dst_ns=x, connected=False))]),
                Stage([], [_probe(TCP80, R())]),
            ],
        ),
        _one(
            "should enforce except clause while egress access to server in CIDR block"
            + legacy
            + "the server's /24 but the server]",
            [
                netpol(
                    "deny-client-a-via-except-cidr-egress-rule",
                    x,
                    match_labels(pod="b"),
                    egress=[
                        {
                            "to": [
                                {
                                    "ipBlock": {
                                        "cidr": _cidr(pod_ips["x/a"], 24),
                                        "except": [_cidr(pod_ips["x/a"], 32)],
                                    }
                                }
                            ]
                        }
                    ],
                )
            ],
            _probe(TCP80, server_subnet_but_server),
        ),
    ]


def _and_back_cases() -> list[Case]:
    """The runtime changes undone again (the suite's prototype did, cyclonus does)."""
    x = "x"
    pod2 = netpol(
        "allow-client-a-via-pod-selector",
        x,
        match_labels(pod="a"),
        ingress=[{"from": [{"podSelector": match_labels(pod="b", pod2="updated")}]}],
    )
    ns2 = netpol(
        "allow-client-a-via-ns-selector",
        x,
        match_labels(pod="a"),
        ingress=[{"from": [{"namespaceSelector": match_labels(ns2="updated")}]}],
    )
    isolated = netpol(
        "deny-ingress-via-label-selector", x, match_labels(target="isolated"), ingress=[]
    )
    closed = R().expect_all_ingress("x/a", False)
    mutating = "allow-all-mutate-to-deny-all"
    return [
        Case(
            "should allow ingress access from updated pod [and back: the label removed]",
            [
                Stage([pod2], [_probe(TCP80, closed)]),
                Stage(
                    [pod2],
                    [
                        _probe(
                            TCP80, R().expect_all_ingress("x/a", False).expect("x/b", "x/a", True)
                        )
                    ],
                    pod_labels={"x/b": {"pod": "b", "pod2": "updated"}},
                ),
                Stage([pod2], [_probe(TCP80, R().expect_all_ingress("x/a", False))]),
            ],
        ),
        Case(
            "should allow ingress access from updated namespace [and back: the label removed]",
            [
                Stage([ns2], [_probe(TCP80, closed)]),
                Stage(
                    [ns2],
                    [
                        _probe(
                            TCP80,
                            R()
                            .expect_all_ingress("x/a", False)
                            .expect_peer(src_ns="y", connected=True),
                        )
                    ],
                    namespace_labels={"y": {"ns2": "updated"}},
                ),
                Stage([ns2], [_probe(TCP80, R().expect_all_ingress("x/a", False))]),
            ],
        ),
        Case(
            "should deny ingress access to updated pod [and back: the label removed]",
            [
                Stage([isolated], [_probe(TCP80, R())]),
                Stage(
                    [isolated],
                    [_probe(TCP80, R().expect_all_ingress("x/a", False))],
                    pod_labels={"x/a": {"pod": "a", "target": "isolated"}},
                ),
                Stage([isolated], [_probe(TCP80, R())]),
            ],
        ),
        Case(
            "should enforce updated policy [and back: deny-all updated to allow-all]",
            [
                Stage([netpol(mutating, x, {}, ingress=[{}])], [_probe(TCP81, R())]),
                Stage(
                    [netpol(mutating, x, {}, ingress=[])],
                    [_probe(TCP81, R().expect_peer(dst_ns=x, connected=False))],
                ),
                Stage([netpol(mutating, x, {}, ingress=[{}])], [_probe(TCP81, R())]),
            ],
        ),
    ]


def _referenced(name: str, stages: list[Stage]) -> Case:
    """A case whose every stage is probed on TCP and UDP, 80 and 81, the tables from
    the reference reading of the API."""
    return with_every_probe(Case(name, stages), default_pod_ips(_extra(stages)))


def _extra(stages: Sequence[Stage]) -> list[str]:
    return [ref for stage in stages for ref in stage.extra_pods]


def action_cases() -> list[Case]:
    """Cyclonus' action cases (pkg/generator/actioncases.go) on the model, its base
    policy the typical ingress policy of generated_cases.py (x's pods a and b let pods
    b and c of y and z in on TCP 80), and pods created where policies already apply."""
    base = generated_cases._typical("ingress")
    udp_named = generated_cases._typical(
        "ingress", ports=[{"protocol": "UDP", "port": "serve-81-udp"}]
    )
    new_ns = generated_cases._typical(
        "ingress", peers=[{"namespaceSelector": match_labels(**{"new-ns": "qrs"})}]
    )
    new_label = generated_cases._typical(
        "ingress",
        peers=[
            {
                "podSelector": match_labels(**{"new-label": "abc"}),
                "namespaceSelector": expr("ns", "In", "y", "z"),
            }
        ],
    )
    y2 = {"y-2/a": {"pod": "a"}, "y-2/b": {"pod": "b"}}
    x_isolated_but_y = [
        netpol("deny-ingress", "x", {}, ingress=[]),
        netpol(
            "allow-from-y",
            "x",
            {},
            ingress=[{"from": [{"namespaceSelector": match_labels(**{NAMESPACE_LABEL_KEY: "y"})}]}],
        ),
        netpol(
            "z-only-to-pod-d",
            "z",
            {},
            egress=[
                {"to": [{"namespaceSelector": {}, "podSelector": match_labels(pod="d")}]},
                DNS_RULE,
            ],
        ),
    ]
    only_d_into_x = [
        netpol(
            "only-d-in",
            "x",
            {},
            ingress=[{"from": [{"namespaceSelector": {}, "podSelector": match_labels(pod="d")}]}],
        )
    ]
    return [
        _referenced(
            "ciliate: a pod deleted, another created with other labels and then relabelled:"
            " each let in by its own labels at the time",
            [
                Stage(only_d_into_x, [], extra_pods={"x/d": {"pod": "d"}}),
                Stage(only_d_into_x, []),
                Stage(only_d_into_x, [], extra_pods={"x/e": {"pod": "e"}}),
                Stage(only_d_into_x, [], extra_pods={"x/e": {"pod": "d"}}),
            ],
        ),
        _referenced(
            "cyclonus action: create/delete policy",
            [Stage([base], []), Stage([], [])],
        ),
        _referenced(
            "cyclonus action: create/update policy (ports to UDP serve-81-udp)",
            [Stage([base], []), Stage([udp_named], [])],
        ),
        _referenced(
            "cyclonus action: create/delete namespace (y-2, labelled ns=y, pods a and b)",
            [
                Stage([base], []),
                Stage([base], [], extra_namespaces={"y-2": {"ns": "y"}}, extra_pods=y2),
                Stage([base], []),
            ],
        ),
        _referenced(
            "cyclonus action: update namespace so that policy applies, then again so it no"
            " longer applies",
            [
                Stage([new_ns], []),
                Stage([new_ns], [], namespace_labels={"y": {"new-ns": "qrs"}}),
                Stage([new_ns], []),
            ],
        ),
        _referenced(
            "cyclonus action: create/delete pod (x/d)",
            [
                Stage([base], []),
                Stage([base], [], extra_pods={"x/d": {"pod": "d"}}),
                Stage([base], []),
            ],
        ),
        _referenced(
            "cyclonus action: update pod so that policy applies, then again so it no longer"
            " applies",
            [
                Stage([new_label], []),
                Stage([new_label], [], pod_labels={"y/b": {"pod": "b", "new-label": "abc"}}),
                Stage([new_label], []),
            ],
        ),
        _referenced(
            "ciliate: a pod created in a namespace policies select is isolated, and reachable"
            " where they allow, from its first packet",
            [
                Stage(x_isolated_but_y, []),
                Stage(x_isolated_but_y, [], extra_pods={"x/d": {"pod": "d"}}),
                Stage(
                    x_isolated_but_y,
                    [],
                    extra_namespaces={"w": {}},
                    extra_pods={"x/d": {"pod": "d"}, "w/d": {"pod": "d"}},
                ),
                Stage(x_isolated_but_y, []),
            ],
        ),
    ]


def reference_table(
    stage: Stage, pod_ips: Mapping[str, str], *, protocol: str, port: int
) -> Reachability:
    """The truth table of ``stage`` on one protocol and port, from the reference
    reading of the API (tests/policy/k8s_reference.py)."""
    objects = stage.objects(pod_ips)
    reference = Reference(objects)
    peers = {
        f"{o['metadata']['namespace']}/{o['metadata']['name']}": Reference.pod(o)
        for o in objects
        if o["kind"] == "Pod"
    }
    reach = Reachability(True, pods=stage.pods)
    for src in stage.pods:
        for dst in stage.pods:
            allowed = reference.allows(peers[src], peers[dst], protocol=protocol, port=port)
            reach.expect(src, dst, allowed)
    return reach


def with_every_probe(case: Case, pod_ips: Mapping[str, str]) -> Case:
    """``case`` with every stage probed on TCP and UDP, 80 and 81: upstream's probes
    kept, the others' tables from the reference reading."""
    stages = []
    for stage in case.stages:
        have = {(p.protocol, p.port) for p in stage.probes}
        probes = list(stage.probes) + [
            Probe(port, protocol, reference_table(stage, pod_ips, protocol=protocol, port=port))
            for protocol in ("TCP", "UDP")
            for port in PORTS
            if (protocol, port) not in have
        ]
        stages.append(replace(stage, probes=probes))
    return Case(case.name, stages)


def identity_sharing_cases(pod_ips: Mapping[str, str]) -> list[Case]:
    """Where ciliate parts from Kubernetes on purpose, and how: the datapath decides by
    identity, and pods with equal labels share one. An ipBlock holding one of two such
    pods lets neither in (Kubernetes lets the one it holds in; letting the identity in
    would let the other in too), and lets the pod in again once its labelmate is gone.
    Tables written here, not from the reference reading (which is Kubernetes')."""
    twin = {"x/twin": {"pod": "b"}}
    pods = (*R().pods, *twin)
    to_xb = netpol(
        "to-xb-by-address",
        "y",
        {},
        egress=[{"to": [{"ipBlock": {"cidr": _cidr(pod_ips["x/b"], 32)}}]}],
    )
    shared = R(pods).expect_peer(src_ns="y", connected=False)
    alone = (
        R()
        .expect_peer(src_ns="y", connected=False)
        .expect_peer(src_ns="y", dst_ns="x", dst_pod="b", connected=True)
    )
    every = [(port, protocol) for protocol in ("TCP", "UDP") for port in PORTS]
    return [
        Case(
            "ciliate: an ipBlock holding one of two pods with equal labels lets neither in,"
            " and the one it holds in once the other is deleted",
            [
                Stage([to_xb], [_probe(p, shared) for p in every], extra_pods=twin),
                Stage([to_xb], [_probe(p, alone) for p in every]),
            ],
        )
    ]
