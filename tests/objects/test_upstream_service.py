"""kubernetes/kubernetes pkg/apis/core/validation/validation_test.go,
``TestValidateServiceCreate`` and ``TestValidateServiceExternalTrafficPolicy``, ported
case by case from upstream's ``makeValidService`` and its tweaks, with upstream's
names. Each failing case names the field paths the API server names.

Where ciliate's answer differs from upstream's validation function, the case says
why, in one of three ways:

* ``DEFAULTED``: upstream validates the internal object after the v1 defaulting; a
  YAML manifest gets the default first (an empty ``protocol`` is TCP, an empty
  ``type`` ClusterIP, a missing ``internalTrafficPolicy`` Cluster, a missing
  namespace is kubectl's ``default``...), so the case is valid here;
* ``IN RANGE``: upstream's validation takes any NodePort number and the allocator
  then refuses one outside 30000-32767 (same path, same words); the cases use
  NodePorts inside the range so they test what they were written for;
* ``SINGLE STACK`` / ``NOT ENFORCED``: ciliate's cluster is IPv4 single-stack, and
  its datapath does not filter by source range: the API server of such a cluster
  refuses IPv6 and dual-stack Services at allocation, and ciliate refuses source
  ranges it would silently ignore.
"""

from __future__ import annotations

from typing import Any

import pytest

from ciliate.control.objects import validate

from .upstream import Tweak, build, error_paths, errors_text

BASE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "valid", "namespace": "valid", "labels": {}, "annotations": {}},
    "spec": {
        "selector": {"key": "val"},
        "sessionAffinity": "None",
        "type": "ClusterIP",
        "ports": [{"name": "p", "protocol": "TCP", "port": 8675, "targetPort": 8675}],
        "internalTrafficPolicy": "Cluster",
    },
}
SOURCE_RANGES = "service.beta.kubernetes.io/load-balancer-source-ranges"


def meta(**values: Any) -> Tweak:
    def tweak(d: dict[str, Any]) -> None:
        d["metadata"].update(values)

    return tweak


def drop_meta(key: str) -> Tweak:
    def tweak(d: dict[str, Any]) -> None:
        d["metadata"].pop(key, None)

    return tweak


def label(key: str, value: str) -> Tweak:
    def tweak(d: dict[str, Any]) -> None:
        d["metadata"]["labels"][key] = value

    return tweak


def annotation(key: str, value: str) -> Tweak:
    def tweak(d: dict[str, Any]) -> None:
        d["metadata"]["annotations"][key] = value

    return tweak


def spec(**values: Any) -> Tweak:
    def tweak(d: dict[str, Any]) -> None:
        d["spec"].update(values)

    return tweak


def drop(key: str) -> Tweak:
    def tweak(d: dict[str, Any]) -> None:
        d["spec"].pop(key, None)

    return tweak


def port0(**values: Any) -> Tweak:
    def tweak(d: dict[str, Any]) -> None:
        d["spec"]["ports"][0].update(values)

    return tweak


def add_port(
    name: str, number: int, protocol: str = "TCP", *, node_port: int = 0, target: int = 0
) -> Tweak:
    def tweak(d: dict[str, Any]) -> None:
        entry: dict[str, Any] = {
            "name": name,
            "port": number,
            "protocol": protocol,
            "targetPort": target or number,
        }
        if node_port:
            entry["nodePort"] = node_port
        d["spec"]["ports"].append(entry)

    return tweak


def status_ingress(*entries: dict[str, Any]) -> Tweak:
    def tweak(d: dict[str, Any]) -> None:
        d["status"] = {"loadBalancer": {"ingress": list(entries)}}

    return tweak


def selector(key: str, value: str) -> Tweak:
    def tweak(d: dict[str, Any]) -> None:
        d["spec"]["selector"][key] = value

    return tweak


LB = spec(type="LoadBalancer", externalTrafficPolicy="Cluster", allocateLoadBalancerNodePorts=True)
NODE_PORT = spec(type="NodePort", externalTrafficPolicy="Cluster")
HEADLESS = spec(clusterIP="None", clusterIPs=["None"])

# (upstream's name, tweaks, the paths ciliate names: [] for valid)
CREATE_CASES: list[tuple[str, tuple[Tweak, ...], list[str]]] = [
    ("missing namespace (DEFAULTED to default, as kubectl does)", (drop_meta("namespace"),), []),
    ("invalid namespace", (meta(namespace="-123"),), ["metadata.namespace"]),
    ("missing name", (meta(name=""),), ["metadata.name"]),
    ("invalid name", (meta(name="-123"),), ["metadata.name"]),
    ("too long name", (meta(name="a" * 64),), ["metadata.name"]),
    ("invalid generateName", (meta(generateName="-123"),), ["metadata.generateName"]),
    ("too long generateName", (meta(generateName="a" * 64),), ["metadata.generateName"]),
    ("invalid label", (label("NoUppercaseOrSpecialCharsLike=Equals", "bar"),), ["metadata.labels"]),
    (
        "invalid annotation",
        (annotation("NoSpecialCharsLike=Equals", "bar"),),
        ["metadata.annotations"],
    ),
    ("nil selector", (drop("selector"),), []),
    ("invalid selector", (selector("NoSpecialCharsLike=Equals", "bar"),), ["spec.selector"]),
    ("missing session affinity (DEFAULTED to None)", (spec(sessionAffinity=""),), []),
    ("missing type (DEFAULTED to ClusterIP)", (spec(type=""),), []),
    ("missing ports", (drop("ports"),), ["spec.ports"]),
    ("missing ports but headless", (drop("ports"), HEADLESS), []),
    ("empty port[0] name", (port0(name=""),), []),
    ("empty port[1] name", (add_port("", 12345),), ["spec.ports[1].name"]),
    (
        "empty multi-port port[0] name",
        (port0(name=""), add_port("p", 12345)),
        ["spec.ports[0].name"],
    ),
    ("invalid port name", (port0(name="INVALID"),), ["spec.ports[0].name"]),
    ("missing protocol (DEFAULTED to TCP)", (port0(protocol=""),), []),
    ("invalid protocol", (port0(protocol="INVALID"),), ["spec.ports[0].protocol"]),
    (
        "invalid cluster ip",
        (spec(clusterIP="invalid", clusterIPs=["invalid"]),),
        ["spec.clusterIPs[0]"],
    ),
    ("missing port", (port0(port=0),), ["spec.ports[0].port"]),
    ("invalid port", (port0(port=65536),), ["spec.ports[0].port"]),
    ("invalid TargetPort int", (port0(targetPort=65536),), ["spec.ports[0].targetPort"]),
    ("valid port headless", (port0(port=11722, targetPort=11722), HEADLESS), []),
    ("invalid port headless 1 (tolerated)", (port0(port=11722, targetPort=11721), HEADLESS), []),
    ("invalid port headless 2 (tolerated)", (port0(port=11722, targetPort="target"), HEADLESS), []),
    (
        "invalid publicIPs localhost",
        (spec(externalTrafficPolicy="Cluster", externalIPs=["127.0.0.1"]),),
        ["spec.externalIPs[0]"],
    ),
    (
        "invalid publicIPs unspecified",
        (spec(externalTrafficPolicy="Cluster", externalIPs=["0.0.0.0"]),),
        ["spec.externalIPs[0]"],
    ),
    (
        "invalid publicIPs host",
        (spec(externalTrafficPolicy="Cluster", externalIPs=["myhost.mydomain"]),),
        ["spec.externalIPs[0]"],
    ),
    ("valid publicIPs", (spec(externalTrafficPolicy="Cluster", externalIPs=["1.2.3.4"]),), []),
    ("dup port name", (port0(name="p"), add_port("p", 12345)), ["spec.ports[1].name"]),
    ("valid load balancer protocol UDP 1", (LB, port0(protocol="UDP")), []),
    (
        "valid load balancer protocol UDP 2",
        (LB, port0(name="q", port=12345, protocol="UDP", targetPort=12345)),
        [],
    ),
    ("load balancer with mix protocol", (LB, add_port("q", 12345, "UDP")), []),
    ("valid 1", (), []),
    ("valid 2", (port0(protocol="UDP", targetPort=12345),), []),
    ("valid 3", (port0(targetPort="http"),), []),
    ("valid cluster ip - none", (HEADLESS,), []),
    ("valid cluster ip - empty", (drop("clusterIPs"), port0(targetPort="http")), []),
    ("valid type - clusterIP", (spec(type="ClusterIP"),), []),
    ("valid type - loadbalancer", (LB,), []),
    (
        "valid type - loadbalancer with allocateLoadBalancerNodePorts=false",
        (LB, spec(allocateLoadBalancerNodePorts=False)),
        [],
    ),
    (
        "invalid type - missing AllocateLoadBalancerNodePorts (DEFAULTED to true)",
        (spec(type="LoadBalancer", externalTrafficPolicy="Cluster"),),
        [],
    ),
    ("valid type loadbalancer 2 ports", (LB, add_port("q", 12345)), []),
    (
        "duplicate nodeports (IN RANGE: 30001)",
        (NODE_PORT, add_port("q", 1, node_port=30001), add_port("r", 2, node_port=30001)),
        ["spec.ports[2].nodePort"],
    ),
    (
        "duplicate nodeports (different protocols)",
        (
            NODE_PORT,
            add_port("q", 1, "TCP", node_port=30001),
            add_port("r", 2, "UDP", node_port=30001),
            add_port("s", 3, "SCTP", node_port=30001),
        ),
        [],
    ),
    (
        "invalid duplicate ports (with same protocol)",
        (add_port("q", 12345, target=8080), add_port("r", 12345, target=80)),
        ["spec.ports[2]"],
    ),
    (
        "valid duplicate ports (with different protocols)",
        (
            add_port("q", 12345, "TCP", target=8080),
            add_port("r", 12345, "UDP", target=80),
            add_port("s", 12345, "SCTP", target=8088),
        ),
        [],
    ),
    ("valid type - nodeport", (NODE_PORT,), []),
    (
        "valid type loadbalancer with NodePort (IN RANGE: 31345)",
        (LB, add_port("q", 12345, node_port=31345)),
        [],
    ),
    (
        "valid type=NodePort service with NodePort (IN RANGE: 31345)",
        (NODE_PORT, add_port("q", 12345, node_port=31345)),
        [],
    ),
    ("valid type=NodePort service without NodePort", (NODE_PORT, add_port("q", 12345)), []),
    ("valid cluster service without NodePort", (add_port("q", 12345),), []),
    (
        "invalid cluster service with NodePort",
        (add_port("q", 12345, node_port=31345),),
        ["spec.ports[1].nodePort"],
    ),
    (
        "invalid public service with duplicate NodePort (IN RANGE: 30001)",
        (NODE_PORT, add_port("p1", 1, node_port=30001), add_port("p2", 2, node_port=30001)),
        ["spec.ports[2].nodePort"],
    ),
    ("valid port type=LoadBalancer", (LB, add_port("kubelet", 10250, target=12345)), []),
    (
        "valid LoadBalancer source range annotation (NOT ENFORCED: refused)",
        (LB, annotation(SOURCE_RANGES, "1.2.3.0/24,  5.6.0.0/16")),
        ["spec.loadBalancerSourceRanges"],
    ),
    ("valid empty LoadBalancer source range annotation", (LB, annotation(SOURCE_RANGES, "")), []),
    (
        "valid whitespace-only LoadBalancer source range annotation",
        (LB, annotation(SOURCE_RANGES, "  ")),
        [],
    ),
    (
        "invalid LoadBalancer source range annotation (hostname)",
        (LB, annotation(SOURCE_RANGES, "foo.bar")),
        [f"metadata.annotations[{SOURCE_RANGES}]"],
    ),
    (
        "invalid LoadBalancer source range annotation (invalid CIDR)",
        (LB, annotation(SOURCE_RANGES, "1.2.3.4/33")),
        [f"metadata.annotations[{SOURCE_RANGES}]"],
    ),
    (
        "invalid LoadBalancer source range annotation for non LoadBalancer type service",
        (annotation(SOURCE_RANGES, "1.2.3.0/24"),),
        [f"metadata.annotations[{SOURCE_RANGES}]"],
    ),
    (
        "invalid empty-but-set LoadBalancer source range annotation for non LoadBalancer",
        (annotation(SOURCE_RANGES, ""),),
        [f"metadata.annotations[{SOURCE_RANGES}]"],
    ),
    (
        "valid LoadBalancer source range (NOT ENFORCED: refused)",
        (LB, spec(loadBalancerSourceRanges=["1.2.3.0/24", "5.6.0.0/16"])),
        ["spec.loadBalancerSourceRanges"],
    ),
    (
        "invalid empty LoadBalancer source range",
        (LB, spec(loadBalancerSourceRanges=["   "])),
        ["spec.LoadBalancerSourceRanges[0]"],
    ),
    (
        "invalid LoadBalancer source range (hostname)",
        (LB, spec(loadBalancerSourceRanges=["foo.bar"])),
        ["spec.LoadBalancerSourceRanges[0]"],
    ),
    (
        "invalid LoadBalancer source range (invalid CIDR)",
        (LB, spec(loadBalancerSourceRanges=["1.2.3.4/33"])),
        ["spec.LoadBalancerSourceRanges[0]"],
    ),
    (
        "invalid source range for non LoadBalancer type service",
        (spec(loadBalancerSourceRanges=["1.2.3.0/24", "5.6.0.0/16"]),),
        ["spec.LoadBalancerSourceRanges"],
    ),
    (
        "invalid source range annotation ignored with valid source range field (NOT ENFORCED)",
        (
            LB,
            annotation(SOURCE_RANGES, "foo.bar"),
            spec(loadBalancerSourceRanges=["1.2.3.0/24", "5.6.0.0/16"]),
        ),
        ["spec.loadBalancerSourceRanges"],
    ),
    ("valid ExternalName", (spec(type="ExternalName", externalName="foo.bar.example.com"),), []),
    (
        "valid ExternalName (trailing dot)",
        (spec(type="ExternalName", externalName="foo.bar.example.com."),),
        [],
    ),
    (
        "invalid ExternalName clusterIP (valid IP)",
        (
            spec(
                type="ExternalName",
                clusterIP="1.2.3.4",
                clusterIPs=["1.2.3.4"],
                externalName="foo.bar.example.com",
            ),
        ),
        ["spec.clusterIPs"],
    ),
    (
        "invalid ExternalName clusterIP (None)",
        (
            spec(
                type="ExternalName",
                clusterIP="None",
                clusterIPs=["None"],
                externalName="foo.bar.example.com",
            ),
        ),
        ["spec.clusterIPs"],
    ),
    (
        "invalid ExternalName (not a DNS name)",
        (spec(type="ExternalName", externalName="-123"),),
        ["spec.externalName"],
    ),
    ("LoadBalancer type cannot have None ClusterIP", (HEADLESS, LB), ["spec.clusterIPs[0]"]),
    (
        "invalid node port with clusterIP None (IN RANGE: 30001)",
        (NODE_PORT, add_port("q", 1, node_port=30001), HEADLESS),
        ["spec.clusterIPs[0]"],
    ),
    (
        "invalid externalTraffic field",
        (LB, spec(externalTrafficPolicy="invalid")),
        ["spec.externalTrafficPolicy"],
    ),
    ("nil internalTraffic field (DEFAULTED to Cluster)", (drop("internalTrafficPolicy"),), []),
    (
        "internalTrafficPolicy field nil when type is ExternalName",
        (drop("internalTrafficPolicy"), spec(type="ExternalName", externalName="foo.bar.com")),
        [],
    ),
    (
        "internalTrafficPolicy field is set when type is ExternalName",
        (spec(type="ExternalName", externalName="foo.bar.com", internalTrafficPolicy="Cluster"),),
        [],
    ),
    (
        "invalid internalTraffic field",
        (spec(internalTrafficPolicy="invalid"),),
        ["spec.internalTrafficPolicy"],
    ),
    ("internalTrafficPolicy field set to Cluster", (spec(internalTrafficPolicy="Cluster"),), []),
    ("internalTrafficPolicy field set to Local", (spec(internalTrafficPolicy="Local"),), []),
    (
        "negative healthCheckNodePort field",
        (LB, spec(externalTrafficPolicy="Local", healthCheckNodePort=-1)),
        ["spec.healthCheckNodePort"],
    ),
    (
        "valid healthCheckNodePort field",
        (LB, spec(externalTrafficPolicy="Local", healthCheckNodePort=31100)),
        [],
    ),
    (
        "invalid timeoutSeconds field",
        (
            spec(
                sessionAffinity="ClientIP",
                sessionAffinityConfig={"clientIP": {"timeoutSeconds": -1}},
            ),
        ),
        ["spec.sessionAffinityConfig.clientIP.timeoutSeconds"],
    ),
    (
        "sessionAffinityConfig can't be set when session affinity is None",
        (
            LB,
            spec(
                sessionAffinity="None", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 90}}
            ),
        ),
        ["spec.sessionAffinityConfig"],
    ),
    (
        "invalid, service with invalid ipFamilies",
        (spec(ipFamilies=["not-a-valid-ip-family"]),),
        ["spec.ipFamilies[0]"],
    ),
    (
        "valid, IPFamilyPolicy(preferDualStack) is set for two families",
        (spec(ipFamilyPolicy="PreferDualStack", ipFamilies=["IPv4", "IPv6"]),),
        [],
    ),
    ("valid, nil service ipFamilies", (drop("ipFamilies"),), []),
    ("valid, service with valid ipFamilies (v4)", (spec(ipFamilies=["IPv4"]),), []),
    (
        "invalid, garbage single ip",
        (spec(clusterIP="garbage-ip", clusterIPs=["garbage-ip"]),),
        ["spec.clusterIPs[0]"],
    ),
    ("valid. no field set", (), []),
    (
        "valid, single ip",
        (spec(ipFamilyPolicy="SingleStack", clusterIP="10.0.0.1", clusterIPs=["10.0.0.1"]),),
        [],
    ),
    (
        "valid appProtocol",
        (
            spec(
                ports=[
                    {"port": 12345, "targetPort": 12345, "protocol": "TCP", "appProtocol": "HTTP"}
                ]
            ),
        ),
        [],
    ),
    (
        "valid custom appProtocol",
        (
            spec(
                ports=[
                    {
                        "port": 12345,
                        "targetPort": 12345,
                        "protocol": "TCP",
                        "appProtocol": "example.com/protocol",
                    }
                ]
            ),
        ),
        [],
    ),
    (
        "invalid appProtocol",
        (
            spec(
                ports=[
                    {
                        "port": 12345,
                        "targetPort": 12345,
                        "protocol": "TCP",
                        "appProtocol": "example.com/protocol_with{invalid}[characters]",
                    }
                ]
            ),
        ),
        ["spec.ports[0].appProtocol"],
    ),
    (
        "invalid cluster ip != clusterIP in single ip service",
        (spec(clusterIP="10.0.0.10", clusterIPs=["10.0.0.1"]),),
        ["spec.clusterIPs"],
    ),
    (
        "Use AllocateLoadBalancerNodePorts when type is not LoadBalancer",
        (spec(allocateLoadBalancerNodePorts=True),),
        ["spec.allocateLoadBalancerNodePorts"],
    ),
    (
        "valid LoadBalancerClass when type is LoadBalancer",
        (LB, spec(loadBalancerClass="test.com/test-load-balancer-class")),
        [],
    ),
    (
        "invalid LoadBalancerClass",
        (LB, spec(loadBalancerClass="Bad/LoadBalancerClass")),
        ["spec.loadBalancerClass"],
    ),
    (
        "invalid: set LoadBalancerClass when type is not LoadBalancer",
        (spec(type="ClusterIP", loadBalancerClass="test.com/test-load-balancer-class"),),
        ["spec.loadBalancerClass"],
    ),
    (
        "topology annotations are mismatched",
        (
            annotation("service.kubernetes.io/topology-aware-hints", "original"),
            annotation("service.kubernetes.io/topology-mode", "different"),
        ),
        ["metadata.annotations[service.kubernetes.io/topology-mode]"],
    ),
    (
        "valid: trafficDistribution field set to PreferClose",
        (spec(trafficDistribution="PreferClose"),),
        [],
    ),
    (
        "invalid: trafficDistribution field set to Random",
        (spec(trafficDistribution="Random"),),
        ["spec.trafficDistribution"],
    ),
]

# Upstream's dual-stack cases, answered as the API server of an IPv4 single-stack
# cluster answers them (at allocation upstream, at validation here): refused, naming
# the field that asks for IPv6.
SINGLE_STACK_CASES: list[tuple[str, tuple[Tweak, ...], str]] = [
    (
        "IPFamilyPolicy(singleStack) is set for two families",
        (spec(ipFamilyPolicy="SingleStack", ipFamilies=["IPv4", "IPv6"]),),
        "spec.ipFamilies[1]",
    ),
    (
        "valid, service with valid ipFamilies (v6)",
        (spec(ipFamilies=["IPv6"]),),
        "spec.ipFamilies[0]",
    ),
    (
        "valid, service with valid ipFamilies(v4,v6)",
        (spec(ipFamilyPolicy="RequireDualStack", ipFamilies=["IPv4", "IPv6"]),),
        "spec.ipFamilyPolicy",
    ),
    (
        "valid, service preferred dual stack with single family",
        (spec(ipFamilyPolicy="PreferDualStack", ipFamilies=["IPv6"]),),
        "spec.ipFamilies[0]",
    ),
    (
        "invalid, service with same ip families",
        (spec(ipFamilyPolicy="RequireDualStack", ipFamilies=["IPv6", "IPv6"]),),
        "spec.ipFamilies[1]",
    ),
    (
        "invalid, service with 2+ ipFamilies",
        (spec(ipFamilyPolicy="RequireDualStack", ipFamilies=["IPv4", "IPv6", "IPv4"]),),
        "spec.ipFamilies",
    ),
    (
        "valid, single ip + single family",
        (spec(ipFamilyPolicy="SingleStack", clusterIP="2001::1", clusterIPs=["2001::1"]),),
        "spec.clusterIPs[0]",
    ),
    (
        "valid, multi ips, multi ipfamilies (4,6)",
        (
            spec(
                ipFamilyPolicy="RequireDualStack",
                clusterIP="10.0.0.1",
                clusterIPs=["10.0.0.1", "2001::1"],
                ipFamilies=["IPv4", "IPv6"],
            ),
        ),
        "spec.clusterIPs[1]",
    ),
    (
        "invalid, more than two ips",
        (
            spec(
                ipFamilyPolicy="RequireDualStack",
                clusterIP="10.0.0.1",
                clusterIPs=["10.0.0.1", "2001::1", "10.0.0.10"],
            ),
        ),
        "spec.clusterIPs",
    ),
    ("valid, dual stack", (spec(ipFamilyPolicy="RequireDualStack"),), "spec.ipFamilyPolicy"),
]

# TestValidateServiceExternalTrafficPolicy (on the whole object here).
EXTERNAL_TRAFFIC_CASES: list[tuple[str, tuple[Tweak, ...], list[str]]] = [
    (
        "valid loadBalancer service with externalTrafficPolicy and healthCheckNodePort set"
        " (IN RANGE: 31567)",
        (LB, spec(externalTrafficPolicy="Local", healthCheckNodePort=31567)),
        [],
    ),
    (
        "valid nodePort service with externalTrafficPolicy set",
        (spec(type="NodePort", externalTrafficPolicy="Local"),),
        [],
    ),
    ("valid clusterIP service with none of externalTrafficPolicy and healthCheckNodePort", (), []),
    (
        "cannot set healthCheckNodePort field on loadBalancer service with"
        " externalTrafficPolicy!=Local",
        (LB, spec(healthCheckNodePort=31567)),
        ["spec.healthCheckNodePort"],
    ),
    (
        "cannot set healthCheckNodePort field on nodePort service",
        (spec(type="NodePort", externalTrafficPolicy="Local", healthCheckNodePort=31567),),
        ["spec.healthCheckNodePort"],
    ),
    (
        "cannot set externalTrafficPolicy or healthCheckNodePort fields on clusterIP service",
        (spec(externalTrafficPolicy="Local", healthCheckNodePort=31567),),
        ["spec.externalTrafficPolicy", "spec.healthCheckNodePort"],
    ),
    (
        "cannot set externalTrafficPolicy field on ExternalName service",
        (spec(type="ExternalName", externalName="foo.bar.com", externalTrafficPolicy="Local"),),
        ["spec.externalTrafficPolicy"],
    ),
    (
        "externalTrafficPolicy is required on NodePort service (DEFAULTED)",
        (spec(type="NodePort"),),
        [],
    ),
    (
        "externalTrafficPolicy is required on LoadBalancer service (DEFAULTED)",
        (spec(type="LoadBalancer"),),
        [],
    ),
    (
        "externalTrafficPolicy is required on ClusterIP service with externalIPs (DEFAULTED;"
        " the address itself is invalid)",
        (spec(externalIPs=["1.2.3,4"]),),
        ["spec.externalIPs[0]"],
    ),
]


@pytest.mark.parametrize(
    ("tweaks", "paths"),
    [(t, p) for _, t, p in CREATE_CASES],
    ids=[name for name, _, _ in CREATE_CASES],
)
def test_validate_service_create(tweaks: tuple[Tweak, ...], paths: list[str]) -> None:
    assert error_paths(build(BASE, *tweaks)) == sorted(paths)


@pytest.mark.parametrize(
    ("tweaks", "path"),
    [(t, p) for _, t, p in SINGLE_STACK_CASES],
    ids=[name for name, _, _ in SINGLE_STACK_CASES],
)
def test_dual_stack_is_refused_as_a_single_stack_cluster_refuses_it(
    tweaks: tuple[Tweak, ...], path: str
) -> None:
    assert path in error_paths(build(BASE, *tweaks))


@pytest.mark.parametrize(
    ("tweaks", "paths"),
    [(t, p) for _, t, p in EXTERNAL_TRAFFIC_CASES],
    ids=[name for name, _, _ in EXTERNAL_TRAFFIC_CASES],
)
def test_validate_service_external_traffic_policy(
    tweaks: tuple[Tweak, ...], paths: list[str]
) -> None:
    assert error_paths(build(BASE, *tweaks)) == sorted(paths)


@pytest.mark.parametrize(
    ("tweaks", "expected"),
    [
        (
            (meta(name="1abc"),),
            'metadata.name: Invalid value: "1abc": a DNS-1035 label must consist of lower case'
            " alphanumeric characters or '-', start with an alphabetic character",
        ),
        ((drop("ports"),), "spec.ports: Required value"),
        (
            (port0(port=0),),
            "spec.ports[0].port: Invalid value: 0: must be between 1 and 65535, inclusive",
        ),
        (
            (spec(clusterIP="invalid"),),
            'spec.clusterIPs[0]: Invalid value: "invalid": must be a valid IP address, (e.g.'
            " 10.9.8.7 or 2001:db8::ffff)",
        ),
        (
            (spec(type="Magic"),),
            'spec.type: Unsupported value: "Magic": supported values: "ClusterIP",'
            ' "ExternalName", "LoadBalancer", "NodePort"',
        ),
        (
            (spec(type="ExternalName", clusterIP="1.2.3.4", externalName="a.example.com"),),
            "spec.clusterIPs: Forbidden: may not be set for ExternalName services",
        ),
        (
            (spec(externalIPs=["169.254.1.1"]),),
            'spec.externalIPs[0]: Invalid value: "169.254.1.1": may not be in the link-local range',
        ),
        (
            (spec(sessionAffinityConfig={"clientIP": {"timeoutSeconds": 90}}),),
            "spec.sessionAffinityConfig: Forbidden: must not be set when session affinity is None",
        ),
        (
            (port0(name="p"), add_port("p", 12345)),
            'spec.ports[1].name: Duplicate value: "p"',
        ),
        (
            (spec(loadBalancerSourceRanges=["1.2.3.0/24"]),),
            # upstream's own spelling of the path, capital L included
            "spec.LoadBalancerSourceRanges: Forbidden: may only be used when `type` is"
            " 'LoadBalancer'",
        ),
    ],
)
def test_the_messages_are_the_api_servers(tweaks: tuple[Tweak, ...], expected: str) -> None:
    texts = errors_text(build(BASE, *tweaks))
    assert any(e.startswith(expected) for e in texts), texts


def test_defaults_are_the_api_servers_and_show_in_the_stored_object() -> None:
    stored = validate(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web"},
            "spec": {"ports": [{"port": 80}], "sessionAffinity": "ClientIP"},
        }
    )
    assert stored["metadata"]["namespace"] == "default"
    assert stored["spec"]["type"] == "ClusterIP"
    assert stored["spec"]["ports"] == [{"protocol": "TCP", "port": 80, "targetPort": 80}]
    assert stored["spec"]["sessionAffinityConfig"] == {"clientIP": {"timeoutSeconds": 10800}}
    assert stored["spec"]["internalTrafficPolicy"] == "Cluster"
    assert stored["spec"]["ipFamilies"] == ["IPv4"]
    assert stored["spec"]["ipFamilyPolicy"] == "SingleStack"
    assert "externalTrafficPolicy" not in stored["spec"]
    node_port = validate(build(BASE, spec(type="NodePort")))["spec"]
    assert node_port["externalTrafficPolicy"] == "Cluster"
    balancer = validate(build(BASE, spec(type="LoadBalancer")))["spec"]
    assert balancer["allocateLoadBalancerNodePorts"] is True


def test_an_external_name_service_gets_no_cluster_ip_nor_ip_families() -> None:
    stored = validate(build(BASE, spec(type="ExternalName", externalName="db.example.com")))
    assert stored["spec"]["clusterIP"] == "" and stored["spec"]["clusterIPs"] == []
    assert stored["spec"]["externalName"] == "db.example.com"


def test_prefer_dual_stack_keeps_its_policy_and_only_the_ipv4_family() -> None:
    stored = validate(
        build(BASE, spec(ipFamilyPolicy="PreferDualStack", ipFamilies=["IPv4", "IPv6"]))
    )
    assert stored["spec"]["ipFamilyPolicy"] == "PreferDualStack"
    assert stored["spec"]["ipFamilies"] == ["IPv4"]


@pytest.mark.parametrize(
    ("tweaks", "paths"),
    [
        # ValidateLoadBalancerStatus, as a status update would be checked.
        ((LB, status_ingress({"ip": "192.0.2.10"})), []),
        ((LB, status_ingress({"ip": "192.0.2.10", "ipMode": "Proxy"})), []),
        ((LB, status_ingress({"hostname": "lb.example.com"})), []),
        ((status_ingress({"ip": "192.0.2.10"}),), ["status.loadBalancer.ingress"]),
        (
            (LB, status_ingress({"hostname": "192.0.2.10"})),
            ["status.loadBalancer.ingress[0].hostname"],
        ),
        (
            (LB, status_ingress({"hostname": "x", "ipMode": "VIP"})),
            ["status.loadBalancer.ingress[0].ipMode"],
        ),
        (
            (LB, status_ingress({"ip": "192.0.2.10", "ipMode": "Magic"})),
            ["status.loadBalancer.ingress[0].ipMode"],
        ),
        ((LB, status_ingress({"ip": "nope"})), ["status.loadBalancer.ingress[0].ip"]),
    ],
)
def test_load_balancer_status(tweaks: tuple[Tweak, ...], paths: list[str]) -> None:
    assert error_paths(build(BASE, *tweaks)) == sorted(paths)


def test_an_ingress_ip_gets_the_vip_mode_by_default() -> None:
    stored = validate(build(BASE, LB, status_ingress({"ip": "192.0.2.10"})))
    assert stored["status"]["loadBalancer"]["ingress"] == [{"ip": "192.0.2.10", "ipMode": "VIP"}]
