"""kubernetes/kubernetes pkg/apis/networking/validation/validation_test.go,
``TestValidateNetworkPolicy`` and ``TestValidateNetworkPolicyUpdate``, ported case by
case: the same base policy, the same tweaks, upstream's names. Upstream counts the
errors of each failing case; here each case also names the field paths the API
server names, so a refusal for the wrong reason fails too."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ciliate.control.objects import KINDS, ObjectStore
from ciliate.control.store import SqliteStore

from .upstream import Tweak, build, error_paths, errors_text

BASE: dict[str, Any] = {
    "apiVersion": "networking.k8s.io/v1",
    "kind": "NetworkPolicy",
    "metadata": {"name": "foo", "namespace": "bar"},
    "spec": {"podSelector": {"matchLabels": {"a": "b"}}},
}
INVALID_SELECTOR = {"NoUppercaseOrSpecialCharsLike=Equals": "b"}


def port(protocol: str | None, number: int | str, end_port: int = 0) -> dict[str, Any]:
    """upstream's makePort: a zero/empty port and a zero endPort are left out."""
    out: dict[str, Any] = {}
    if protocol is not None:
        out["protocol"] = protocol
    if number not in (0, "", "0"):
        out["port"] = number
    if end_port:
        out["endPort"] = end_port
    return out


def spec(document: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = document["spec"]
    return result


def ingress_empty_first(d: dict[str, Any]) -> None:
    spec(d)["ingress"] = [{}]


def ingress_from_empty_first(d: dict[str, Any]) -> None:
    if "ingress" not in spec(d):
        ingress_empty_first(d)
    spec(d)["ingress"][0]["from"] = [{}]


def _ingress_from_if_empty(d: dict[str, Any]) -> None:
    if "ingress" not in spec(d):
        ingress_empty_first(d)
    if "from" not in spec(d)["ingress"][0]:
        ingress_from_empty_first(d)


def ingress_empty_ports(d: dict[str, Any]) -> None:
    spec(d)["ingress"] = [{"ports": [{}]}]


def ingress_ports(*ports: dict[str, Any]) -> Tweak:
    def tweak(d: dict[str, Any]) -> None:
        if "ingress" not in spec(d):
            ingress_empty_first(d)
        spec(d)["ingress"][0]["ports"] = list(ports)

    return tweak


def ingress_from_pod_selector(key: str, value: str) -> Tweak:
    def tweak(d: dict[str, Any]) -> None:
        _ingress_from_if_empty(d)
        spec(d)["ingress"][0]["from"][0]["podSelector"] = {"matchLabels": {key: value}}

    return tweak


def ingress_from_namespace_selector(d: dict[str, Any]) -> None:
    _ingress_from_if_empty(d)
    spec(d)["ingress"][0]["from"][0]["namespaceSelector"] = {"matchLabels": {"c": "d"}}


IPV4_BLOCK = {"cidr": "192.168.0.0/16", "except": ["192.168.3.0/24", "192.168.4.0/24"]}
IPV6_BLOCK = {"cidr": "fd00:192:168::/48", "except": ["fd00:192:168:3::/64", "fd00:192:168:4::/64"]}


def ingress_from_ip_block(block: dict[str, Any]) -> Tweak:
    def tweak(d: dict[str, Any]) -> None:
        _ingress_from_if_empty(d)
        spec(d)["ingress"][0]["from"][0]["ipBlock"] = dict(block)

    return tweak


def egress_empty_first(d: dict[str, Any]) -> None:
    spec(d)["egress"] = [{}]


def egress_to_empty_first(d: dict[str, Any]) -> None:
    if "egress" not in spec(d):
        egress_empty_first(d)
    spec(d)["egress"][0]["to"] = [{}]


def _egress_to_if_empty(d: dict[str, Any]) -> None:
    if "egress" not in spec(d):
        egress_empty_first(d)
    if "to" not in spec(d)["egress"][0]:
        egress_to_empty_first(d)


def egress_to_namespace_selector(d: dict[str, Any]) -> None:
    _egress_to_if_empty(d)
    spec(d)["egress"][0]["to"][0]["namespaceSelector"] = {"matchLabels": {"c": "d"}}


def egress_to_pod_selector(d: dict[str, Any]) -> None:
    _egress_to_if_empty(d)
    spec(d)["egress"][0]["to"][0]["podSelector"] = {"matchLabels": {"c": "d"}}


def egress_to_ip_block(block: dict[str, Any]) -> Tweak:
    def tweak(d: dict[str, Any]) -> None:
        _egress_to_if_empty(d)
        spec(d)["egress"][0]["to"][0]["ipBlock"] = dict(block)

    return tweak


def egress_ports(*ports: dict[str, Any]) -> Tweak:
    def tweak(d: dict[str, Any]) -> None:
        if "egress" not in spec(d):
            egress_empty_first(d)
        spec(d)["egress"][0]["ports"] = list(ports)

    return tweak


def policy_types(*types: str) -> Tweak:
    def tweak(d: dict[str, Any]) -> None:
        spec(d)["policyTypes"] = list(types)

    return tweak


def set_field(*path: str | int, value: Any) -> Tweak:
    def tweak(d: dict[str, Any]) -> None:
        target: Any = d
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value

    return tweak


MIXED_PORTS = (
    port(None, 80),
    port("TCP", 0),
    port("TCP", 443),
    port("UDP", "dns"),
    port("SCTP", 7777),
)

SUCCESS_CASES: list[tuple[Tweak, ...]] = [
    (ingress_empty_first,),
    (ingress_from_empty_first, ingress_empty_ports),
    (ingress_ports(*MIXED_PORTS),),
    (ingress_from_pod_selector("c", "d"),),
    (ingress_from_namespace_selector,),
    (ingress_from_pod_selector("e", "f"), ingress_from_namespace_selector),
    (egress_to_namespace_selector, ingress_from_ip_block(IPV4_BLOCK)),
    (ingress_from_ip_block(IPV4_BLOCK),),
    (egress_to_ip_block(IPV4_BLOCK), policy_types("Egress")),
    (egress_to_ip_block(IPV4_BLOCK), policy_types("Ingress", "Egress")),
    (egress_ports(*MIXED_PORTS),),
    (egress_to_namespace_selector, ingress_from_ip_block(IPV6_BLOCK)),
    (ingress_from_ip_block(IPV6_BLOCK),),
    (egress_to_ip_block(IPV6_BLOCK), policy_types("Egress")),
    (egress_to_ip_block(IPV6_BLOCK), policy_types("Ingress", "Egress")),
    (egress_ports(port(None, 32000, 32768), port("UDP", "dns")),),
    (
        egress_to_namespace_selector,
        egress_ports(port(None, 30000, 32768), port(None, 32000, 32768)),
        ingress_from_pod_selector("e", "f"),
        ingress_ports(port("TCP", 32768, 32768)),
    ),
]


@pytest.mark.parametrize("tweaks", SUCCESS_CASES, ids=[str(i) for i in range(len(SUCCESS_CASES))])
def test_upstream_success_cases_are_accepted(tweaks: tuple[Tweak, ...]) -> None:
    assert error_paths(build(BASE, *tweaks)) == []


def replace_spec_with_invalid_pod_selector(d: dict[str, Any]) -> None:
    d["spec"] = {"podSelector": {"matchLabels": dict(INVALID_SELECTOR)}}


FROM0 = "spec.ingress[0].from[0]"
TO0 = "spec.egress[0].to[0]"
IN_PORT0 = "spec.ingress[0].ports[0]"
EG_PORTS = "spec.egress[0].ports"

# name -> (tweaks, the field paths the API server names)
ERROR_CASES: dict[str, tuple[tuple[Tweak, ...], list[str]]] = {
    "namespaceSelector and ipBlock": (
        (ingress_from_namespace_selector, ingress_from_ip_block(IPV4_BLOCK)),
        [FROM0],
    ),
    "podSelector and ipBlock": ((egress_to_pod_selector, egress_to_ip_block(IPV4_BLOCK)), [TO0]),
    "missing from and to type": ((ingress_from_empty_first, egress_to_empty_first), [TO0, FROM0]),
    "invalid spec.podSelector": (
        (ingress_from_namespace_selector, replace_spec_with_invalid_pod_selector),
        ["spec.podSelector.matchLabels"],
    ),
    "invalid ingress.ports.protocol": (
        (ingress_ports(port("ICMP", 80)),),
        [f"{IN_PORT0}.protocol"],
    ),
    "invalid ingress.ports.port (int)": (
        (ingress_ports(port("TCP", 123456789)),),
        [f"{IN_PORT0}.port"],
    ),
    # IsValidPortName gives two messages for "!@#$" (charset, no letter): two errors.
    "invalid ingress.ports.port (str)": (
        (ingress_ports(port("TCP", "!@#$")),),
        [f"{IN_PORT0}.port", f"{IN_PORT0}.port"],
    ),
    "invalid ingress.from.podSelector": (
        (
            ingress_from_empty_first,
            set_field(
                "spec",
                "ingress",
                0,
                "from",
                0,
                "podSelector",
                value={"matchLabels": INVALID_SELECTOR},
            ),
        ),
        [f"{FROM0}.podSelector.matchLabels"],
    ),
    "invalid egress.to.podSelector": (
        (
            egress_to_empty_first,
            set_field(
                "spec", "egress", 0, "to", 0, "podSelector", value={"matchLabels": INVALID_SELECTOR}
            ),
        ),
        [f"{TO0}.podSelector.matchLabels"],
    ),
    "invalid egress.ports.protocol": (
        (egress_ports(port("ICMP", 80)),),
        [f"{EG_PORTS}[0].protocol"],
    ),
    "invalid egress.ports.port (int)": (
        (egress_ports(port("TCP", 123456789)),),
        [f"{EG_PORTS}[0].port"],
    ),
    "invalid egress.ports.port (str)": (
        (egress_ports(port("TCP", "!@#$")),),
        [f"{EG_PORTS}[0].port", f"{EG_PORTS}[0].port"],
    ),
    "invalid ingress.from.namespaceSelector": (
        (
            ingress_from_empty_first,
            set_field(
                "spec",
                "ingress",
                0,
                "from",
                0,
                "namespaceSelector",
                value={"matchLabels": INVALID_SELECTOR},
            ),
        ),
        [f"{FROM0}.namespaceSelector.matchLabels"],
    ),
    "missing cidr field": (
        (
            ingress_from_ip_block(IPV4_BLOCK),
            set_field("spec", "ingress", 0, "from", 0, "ipBlock", "cidr", value=""),
        ),
        [f"{FROM0}.ipBlock.cidr"],
    ),
    "invalid cidr format": (
        (
            ingress_from_ip_block(IPV4_BLOCK),
            set_field("spec", "ingress", 0, "from", 0, "ipBlock", "cidr", value="192.168.5.6"),
        ),
        [f"{FROM0}.ipBlock.cidr"],
    ),
    "invalid ipv6 cidr format": (
        (
            ingress_from_ip_block(IPV6_BLOCK),
            set_field("spec", "ingress", 0, "from", 0, "ipBlock", "cidr", value="fd00:192:168::"),
        ),
        [f"{FROM0}.ipBlock.cidr"],
    ),
    "except field is an empty string": (
        (
            ingress_from_ip_block(IPV4_BLOCK),
            set_field("spec", "ingress", 0, "from", 0, "ipBlock", "except", value=[""]),
        ),
        [f"{FROM0}.ipBlock.except[0]"],
    ),
    "except field is an space string": (
        (
            ingress_from_ip_block(IPV4_BLOCK),
            set_field("spec", "ingress", 0, "from", 0, "ipBlock", "except", value=[" "]),
        ),
        [f"{FROM0}.ipBlock.except[0]"],
    ),
    "except field is an invalid ip": (
        (
            ingress_from_ip_block(IPV4_BLOCK),
            set_field(
                "spec", "ingress", 0, "from", 0, "ipBlock", "except", value=["300.300.300.300"]
            ),
        ),
        [f"{FROM0}.ipBlock.except[0]"],
    ),
    "except IP is outside of CIDR range": (
        (ingress_from_ip_block({"cidr": "192.168.8.0/24", "except": ["192.168.9.1/32"]}),),
        [f"{FROM0}.ipBlock.except[0]"],
    ),
    "except IP is not strictly within CIDR range": (
        (ingress_from_ip_block({"cidr": "192.168.0.0/24", "except": ["192.168.0.0/24"]}),),
        [f"{FROM0}.ipBlock.except[0]"],
    ),
    "except IPv6 is outside of CIDR range": (
        (
            ingress_from_ip_block(
                {"cidr": "fd00:192:168:1::/64", "except": ["fd00:192:168:2::/64"]}
            ),
        ),
        [f"{FROM0}.ipBlock.except[0]"],
    ),
    "invalid policyTypes": (
        (egress_to_ip_block(IPV4_BLOCK), policy_types("foo", "bar")),
        ["spec.policyTypes[0]", "spec.policyTypes[1]"],
    ),
    "too many policyTypes": (
        (egress_to_ip_block(IPV4_BLOCK), policy_types("foo", "bar", "baz")),
        ["spec.policyTypes"],
    ),
    "multiple ports defined, one port range is invalid": (
        (
            egress_to_namespace_selector,
            egress_ports(port("UDP", 35000, 32768), port(None, 32000, 32768)),
        ),
        [f"{EG_PORTS}[0].endPort"],
    ),
    "endPort defined with named/string port": (
        (
            egress_to_namespace_selector,
            egress_ports(port("UDP", "dns", 32768), port(None, 32000, 32768)),
        ),
        [f"{EG_PORTS}[0].endPort"],
    ),
    "endPort defined without port defined": (
        (egress_to_namespace_selector, egress_ports(port("TCP", 0, 32768))),
        [f"{EG_PORTS}[0].endPort"],
    ),
    "port is greater than endPort": (
        (egress_to_namespace_selector, egress_ports(port("SCTP", 35000, 32768))),
        [f"{EG_PORTS}[0].endPort"],
    ),
    "multiple invalid port ranges defined": (
        (
            egress_to_namespace_selector,
            egress_ports(
                port("UDP", 35000, 32768), port("TCP", 0, 32768), port("TCP", "https", 32768)
            ),
        ),
        [f"{EG_PORTS}[0].endPort", f"{EG_PORTS}[1].endPort", f"{EG_PORTS}[2].endPort"],
    ),
    "invalid endport range defined": (
        (egress_to_namespace_selector, egress_ports(port("TCP", 30000, 65537))),
        [f"{EG_PORTS}[0].endPort"],
    ),
}


@pytest.mark.parametrize(("name"), list(ERROR_CASES))
def test_upstream_error_cases_name_the_same_fields(name: str) -> None:
    tweaks, paths = ERROR_CASES[name]
    assert error_paths(build(BASE, *tweaks)) == sorted(paths)


@pytest.mark.parametrize(
    ("tweaks", "expected"),
    [
        (
            (egress_ports(port("TCP", 30000, 65537)),),
            "spec.egress[0].ports[0].endPort: Invalid value: 65537: must be between 1 and 65535,"
            " inclusive",
        ),
        (
            (egress_ports(port("TCP", 0, 32768)),),
            "spec.egress[0].ports[0].endPort: Invalid value: 32768: may not be specified when"
            " `port` is not specified",
        ),
        (
            (policy_types("foo", "bar", "baz"),),
            'spec.policyTypes: Invalid value: ["foo", "bar", "baz"]: may not specify more than two'
            " policyTypes",
        ),
        (
            (ingress_from_ip_block({"cidr": "", "except": []}),),
            "spec.ingress[0].from[0].ipBlock.cidr: Required value",
        ),
        (
            (replace_spec_with_invalid_pod_selector,),
            'spec.podSelector.matchLabels: Invalid value: "NoUppercaseOrSpecialCharsLike=Equals":'
            " name part must consist of alphanumeric characters",
        ),
    ],
)
def test_the_messages_are_the_api_servers(tweaks: tuple[Tweak, ...], expected: str) -> None:
    assert any(e.startswith(expected) for e in errors_text(build(BASE, *tweaks)))


def test_a_repeated_policy_type_is_accepted_as_upstream_accepts_it() -> None:
    stored = build(BASE, policy_types("Ingress", "Ingress"))
    assert error_paths(stored) == []


def test_selector_values_and_operators_are_checked_as_label_selectors() -> None:
    expression = {"key": "k", "operator": "In", "values": ["-bad-"]}
    bad_value = build(
        BASE, set_field("spec", "podSelector", value={"matchExpressions": [expression]})
    )
    assert error_paths(bad_value) == ["spec.podSelector.matchExpressions[0].values[0]"]
    exists = {"key": "k", "operator": "Exists", "values": ["v"]}
    with_values = build(
        BASE, set_field("spec", "podSelector", value={"matchExpressions": [exists]})
    )
    assert error_paths(with_values) == ["spec.podSelector.matchExpressions[0].values"]


# -- TestValidateNetworkPolicyUpdate, through the store (an apply of a stored object) --


@pytest.fixture
def objects(tmp_path: Path) -> Iterator[ObjectStore]:
    with SqliteStore(tmp_path / "state.db") as store:
        namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bar"}}
        ObjectStore(store).apply([namespace])
        yield ObjectStore(store)


def test_update_no_change_is_unchanged(objects: ObjectStore) -> None:
    policy = build(BASE, set_field("spec", "ingress", value=[]))
    assert [r.action for r in objects.apply([policy])] == ["created"]
    assert [r.action for r in objects.apply([policy])] == ["unchanged"]


def test_update_change_spec_is_configured_and_bumps_generation(objects: ObjectStore) -> None:
    objects.apply([build(BASE, set_field("spec", "podSelector", value={}))])
    assert [r.action for r in objects.apply([build(BASE)])] == ["configured"]
    stored = objects.get(KINDS["NetworkPolicy"], name="foo", namespace="bar")
    assert stored["metadata"]["generation"] == 2
    assert stored["spec"]["podSelector"] == {"matchLabels": {"a": "b"}}


def test_update_change_name_is_another_object(objects: ObjectStore) -> None:
    # Upstream refuses an update that renames; a manifest with another name is a create.
    objects.apply([build(BASE)])
    objects.apply([build(BASE, set_field("metadata", "name", value="baz"))])
    names = [p["metadata"]["name"] for p in objects.list(KINDS["NetworkPolicy"], namespace="bar")]
    assert names == ["baz", "foo"]
