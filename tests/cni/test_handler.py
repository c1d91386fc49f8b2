"""The CNI protocol handler, against a fake endpoint service: results per
spec version (alone and after another plugin of a chain), DEL, CHECK against
the agent and a real pod namespace, GC, STATUS, VERSION, and every
validation error with its code and a message that says what to fix."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from ciliate.control.cni import handler
from ciliate.control.cni.service import (
    AddRequest,
    CheckFailedError,
    NotReadyError,
    PoolExhaustedError,
    ServiceError,
    TryAgainError,
    UnknownContainerError,
)

from .conftest import CONTAINER_ID, ConfiguredPod, cni_env, netconf
from .fakes import FakeService, add_result

VERSIONS = handler.SUPPORTED_VERSIONS


def call(
    env: Mapping[str, str], stdin: bytes | Mapping[str, Any], service: FakeService | None = None
) -> tuple[handler.CniResponse, Any]:
    if isinstance(stdin, Mapping):
        stdin = json.dumps(stdin).encode()
    response = handler.handle(env, stdin, service or FakeService())
    parsed = json.loads(response.stdout) if response.stdout else None
    return response, parsed


def assert_error(response: handler.CniResponse, parsed: Any, code: int, fragment: str) -> None:
    assert response.exit_code == 1, response
    assert parsed["code"] == code, parsed
    assert fragment in parsed["msg"] + parsed.get("details", ""), parsed


# -- ADD --------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_add_returns_the_result_in_the_format_of_each_version(version: str, pod_netns: str) -> None:
    response, result = call(cni_env("ADD", CNI_NETNS=pod_netns), netconf(version))

    assert response.exit_code == 0
    assert result["cniVersion"] == version
    host, pod = result["interfaces"]
    assert host == {"name": "lxc1a2b3c4d5e6f", "mac": "fe:54:00:12:34:56"} | (
        {"mtu": 1500} if version == "1.1.0" else {}
    )
    assert pod == {"name": "eth0", "mac": "0a:58:0a:f4:01:05", "sandbox": pod_netns} | (
        {"mtu": 1500} if version == "1.1.0" else {}
    )
    (ip,) = result["ips"]
    expected_ip = {"address": "10.244.1.5/32", "gateway": "10.244.1.1", "interface": 1}
    if version in ("0.3.0", "0.3.1", "0.4.0"):
        expected_ip["version"] = "4"
    assert ip == expected_ip
    assert result["routes"] == [
        {"dst": "10.244.1.1/32"},
        {"dst": "0.0.0.0/0", "gw": "10.244.1.1"},
    ]
    assert result["dns"] == {}


def test_add_asks_the_service_for_the_endpoint_with_labels_mtu_and_attributes(
    pod_netns: str,
) -> None:
    service = FakeService()
    cni_args = (
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;"
        "K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=1234-5678"
    )
    conf = netconf(mtu=1400, args={"cni": {"labels": {"app": "web", "k8s:tier": "front"}}})

    response, _ = call(cni_env("ADD", CNI_NETNS=pod_netns, CNI_ARGS=cni_args), conf, service)

    assert response.exit_code == 0
    [(name, request)] = service.calls
    assert name == "add"
    assert request == AddRequest(
        container_id=CONTAINER_ID,
        ifname="eth0",
        netns=pod_netns,
        labels={
            "k8s:io.kubernetes.pod.namespace": "shop",
            "k8s:io.kubernetes.pod.name": "web-0",
            "k8s:app": "web",
            "k8s:tier": "front",
        },
        mtu=1400,
        network="ciliate",
        attributes={
            "K8S_POD_NAMESPACE": "shop",
            "K8S_POD_NAME": "web-0",
            "K8S_POD_INFRA_CONTAINER_ID": "abc",
            "K8S_POD_UID": "1234-5678",
        },
    )


def test_add_takes_labels_in_the_conventions_list_form_too(pod_netns: str) -> None:
    """CONVENTIONS.md: ``args.cni.labels`` is a list of key/value objects."""
    service = FakeService()
    listed = [{"key": "app", "value": "web"}, {"key": "k8s:tier", "value": "front"}]
    conf = netconf(args={"cni": {"labels": listed}})
    response, _ = call(cni_env("ADD", CNI_NETNS=pod_netns), conf, service)
    assert response.exit_code == 0
    labels = service.calls[0][1].labels
    assert (labels["k8s:app"], labels["k8s:tier"]) == ("web", "front")


def test_add_without_cni_args_or_mtu_leaves_them_to_the_agent(pod_netns: str) -> None:
    service = FakeService()
    env = cni_env("ADD", CNI_NETNS=pod_netns)
    del env["CNI_ARGS"]

    response, _ = call(env, netconf(), service)

    assert response.exit_code == 0
    request = service.calls[0][1]
    assert (request.labels, request.mtu, request.attributes) == ({}, None, {})


def test_add_ignores_fields_it_does_not_know(pod_netns: str) -> None:
    conf = netconf(runtimeConfig={"portMappings": []}, agentSocket="/run/x.sock", ipam={})
    response, _ = call(cni_env("ADD", CNI_NETNS=pod_netns), conf)
    assert response.exit_code == 0


# What a plugin before ciliate in a chain returned (1.1.0 shape, an IPv6
# address, a route with 1.1-only fields, DNS).
EARLIER = {
    "cniVersion": "1.1.0",
    "interfaces": [{"name": "macvlan0", "mac": "02:00:00:00:00:01", "mtu": 9000}],
    "ips": [{"address": "fd00::5/64", "interface": 0}],
    "routes": [{"dst": "fd00::/8", "priority": 10}],
    "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]},
}


@pytest.mark.parametrize("version", VERSIONS)
def test_add_after_another_plugin_passes_its_result_on_with_ciliates_appended(
    version: str, pod_netns: str
) -> None:
    prev = {**EARLIER, "cniVersion": version}
    response, result = call(cni_env("ADD", CNI_NETNS=pod_netns), netconf(version, prevResult=prev))

    assert response.exit_code == 0, result
    assert result["cniVersion"] == version
    names = [i["name"] for i in result["interfaces"]]
    assert names == ["macvlan0", "lxc1a2b3c4d5e6f", "eth0"]
    # 1.1-only fields of the earlier result go in older versions.
    assert ("mtu" in result["interfaces"][0]) == (version == "1.1.0")
    assert ("priority" in result["routes"][0]) == (version == "1.1.0")
    old = version in ("0.3.0", "0.3.1", "0.4.0")
    theirs, ours = result["ips"]
    assert theirs == {"address": "fd00::5/64", "interface": 0} | ({"version": "6"} if old else {})
    assert ours["address"] == "10.244.1.5/32"
    assert ours["interface"] == 2, "the pod's interface, after the earlier ones"
    assert ("version" in ours) == old
    assert [r["dst"] for r in result["routes"]] == ["fd00::/8", "10.244.1.1/32", "0.0.0.0/0"]
    assert result["dns"] == EARLIER["dns"]


BAD_PREV_RESULTS = [
    ("a list", [], "prevResult must be a JSON object"),
    ("interfaces not a list", {"interfaces": {}}, "prevResult.interfaces must be a list"),
    ("an interface without a name", {"interfaces": [{"mac": "x"}]}, "interfaces[0].name"),
    ("an address without a prefix", {"ips": [{"address": "10.0.0.1"}]}, "ips[0].address"),
    (
        "an interface index past the list",
        {"interfaces": [], "ips": [{"address": "10.0.0.1/32", "interface": 0}]},
        "ips[0].interface",
    ),
    ("a route to nowhere", {"routes": [{"dst": "x"}]}, "routes[0].dst"),
    ("a route via nonsense", {"routes": [{"dst": "0.0.0.0/0", "gw": 5}]}, "routes[0].gw"),
    ("dns that is a list", {"dns": []}, "prevResult.dns"),
]


@pytest.mark.parametrize(
    ("reason", "prev", "fragment"), BAD_PREV_RESULTS, ids=[c[0] for c in BAD_PREV_RESULTS]
)
def test_add_after_a_plugin_with_a_malformed_result_changes_nothing(
    reason: str, prev: Any, fragment: str, pod_netns: str
) -> None:
    service = FakeService()
    response, parsed = call(cni_env("ADD", CNI_NETNS=pod_netns), netconf(prevResult=prev), service)
    assert_error(response, parsed, 7, fragment)
    assert service.calls == [], reason


def test_a_second_add_of_an_attachment_fails_and_changes_nothing(
    configured_pod: ConfiguredPod,
) -> None:
    """The spec: an ADD for an interface name the container has must fail -- here
    the agent has the endpoint of this attachment from an earlier ADD."""
    service = FakeService()
    response, parsed = call(cni_env("ADD", CNI_NETNS=configured_pod.netns), netconf(), service)
    assert_error(response, parsed, 100, "exists already")
    assert "CNI_IFNAME 'eth0'" in parsed["msg"]
    assert [name for name, _ in service.calls] == ["check"], "the agent was asked, not changed"


def test_a_second_add_fails_also_when_the_first_ones_endpoint_is_damaged(
    configured_pod: ConfiguredPod,
) -> None:
    service = FakeService(error=CheckFailedError("the veth is gone"))
    response, parsed = call(cni_env("ADD", CNI_NETNS=configured_pod.netns), netconf(), service)
    assert_error(response, parsed, 100, "exists already")
    assert [name for name, _ in service.calls] == ["check"]


def test_a_link_of_the_name_the_agent_has_no_endpoint_for_is_left_to_the_agent(
    configured_pod: ConfiguredPod,
) -> None:
    """The veth of an endpoint just DELeted (removed behind DEL's answer) or another
    plugin's link: the agent's ADD deals with it (removes its own, fails on another's)."""

    class Unknown(FakeService):
        def check(self, *, container_id: str, ifname: str, netns: str) -> Any:
            self.calls.append(("check", (container_id, ifname, netns)))
            raise UnknownContainerError("no endpoint")

    service = Unknown()
    response, _ = call(cni_env("ADD", CNI_NETNS=configured_pod.netns), netconf(), service)
    assert response.exit_code == 0
    assert [name for name, _ in service.calls] == ["check", "add"]


# -- DEL --------------------------------------------------------------------


def test_del_is_idempotent() -> None:
    service = FakeService()
    for _ in range(2):
        response, parsed = call(cni_env("DEL"), netconf(), service)
        assert (response.exit_code, parsed) == (0, None)
    assert service.calls == [("delete", (CONTAINER_ID, "eth0"))] * 2


@pytest.mark.parametrize(
    ("reason", "env", "fields"),
    [
        ("the netns is not given", {"CNI_NETNS": ""}, {}),
        ("the netns is gone", {"CNI_NETNS": "/run/netns/gone-long-ago"}, {}),
        ("it carries a prevResult", {}, {"prevResult": {"ips": "not even a list"}}),
        ("the mtu was since edited to nonsense", {}, {"mtu": "big"}),
        ("CNI_ARGS do not parse", {"CNI_ARGS": "garbage"}, {}),
    ],
)
def test_del_succeeds_when(reason: str, env: dict[str, str], fields: dict[str, Any]) -> None:
    response, _ = call(cni_env("DEL", **env), netconf(**fields))
    assert response.exit_code == 0, reason


def test_del_reports_a_real_failure_of_the_service() -> None:
    service = FakeService(error=ServiceError("store is read-only", details="disk full"))
    response, parsed = call(cni_env("DEL"), netconf(), service)
    assert_error(response, parsed, 999, "store is read-only")
    assert parsed["details"] == "disk full"


# -- CHECK ------------------------------------------------------------------


def prev_result_of(version: str, netns: str) -> dict[str, Any]:
    return handler.format_result(add_result(netns=netns), version)


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0", "1.1.0"])
def test_check_passes_when_the_endpoint_matches_prev_result(
    version: str, configured_pod: ConfiguredPod
) -> None:
    netns = configured_pod.netns
    service = FakeService(result=add_result(netns=netns))
    conf = netconf(version, prevResult=prev_result_of(version, netns))

    response, parsed = call(cni_env("CHECK", CNI_NETNS=netns), conf, service)

    assert (response.exit_code, parsed) == (0, None)
    assert service.calls == [("check", (CONTAINER_ID, "eth0", netns))]


def test_check_leaves_what_later_plugins_added_or_changed_to_them(
    configured_pod: ConfiguredPod,
) -> None:
    """The spec: CHECK must allow a later plugin of the chain to have modified
    resources (routes); its own entries in prevResult are not ciliate's to check."""
    netns = configured_pod.netns
    prev = prev_result_of("1.0.0", netns)
    prev["interfaces"].append({"name": "tap0", "sandbox": netns})
    prev["ips"].append({"address": "192.168.9.9/24", "interface": 2})
    prev["routes"].append({"dst": "192.168.0.0/16", "gw": "10.244.1.1"})
    configured_pod.ip("route", "add", "172.16.0.0/12", "via", "10.244.1.1", "dev", "eth0")
    service = FakeService(result=add_result(netns=netns))

    response, parsed = call(cni_env("CHECK", CNI_NETNS=netns), netconf(prevResult=prev), service)

    assert (response.exit_code, parsed) == (0, None)


@pytest.mark.parametrize(
    ("reason", "agent_has", "fragment"),
    [
        ("another IP", {"ip": "10.244.1.9/32"}, "the agent has 10.244.1.9/32"),
        ("another pod interface", {"pod_ifname": "net1"}, "pod interface 'net1'"),
        ("another node-side veth", {"host_ifname": "lxcffff"}, "node-side interface 'lxcffff'"),
        ("another node-side MAC", {"host_mac": "fe:54:00:00:00:99"}, "the agent has fe:54"),
    ],
)
def test_check_fails_when_the_agent_has(
    reason: str, agent_has: dict[str, Any], fragment: str, configured_pod: ConfiguredPod
) -> None:
    netns = configured_pod.netns
    if "ip" in agent_has:
        agent_has = {**agent_has, "ip": ipaddress.IPv4Interface(agent_has["ip"])}
    service = FakeService(result=dataclasses.replace(add_result(netns=netns), **agent_has))
    conf = netconf(prevResult=prev_result_of("1.0.0", netns))

    response, parsed = call(cni_env("CHECK", CNI_NETNS=netns), conf, service)

    assert_error(response, parsed, 999, fragment)
    assert "differs from prevResult" in parsed["msg"], reason


POD_DAMAGE = [
    # reason, `ip` commands in the pod, message fragment
    ("the interface is gone", [["link", "del", "eth0"]], "eth0 is gone from"),
    ("the interface is down", [["link", "set", "eth0", "down"]], "is down"),
    (
        "the MAC was changed",
        [["link", "set", "eth0", "address", "0a:58:00:00:00:01"]],
        "has the MAC 0a:58:00:00:00:01",
    ),
    (
        "the address was removed",
        [["address", "del", "10.244.1.5/32", "dev", "eth0"]],
        "lacks 10.244.1.5/32",
    ),
    ("the default route was removed", [["route", "del", "default"]], "route to 0.0.0.0/0 via"),
    (
        "the gateway's route was removed",
        [["route", "del", "default"], ["route", "del", "10.244.1.1/32"]],
        "route to 10.244.1.1/32 (prevResult.routes[0])",
    ),
]


@pytest.mark.parametrize(
    ("reason", "commands", "fragment"), POD_DAMAGE, ids=[c[0] for c in POD_DAMAGE]
)
def test_check_fails_naming_what_differs_in_the_pod_when(
    reason: str, commands: list[list[str]], fragment: str, configured_pod: ConfiguredPod
) -> None:
    netns = configured_pod.netns
    for command in commands:
        configured_pod.ip(*command)
    service = FakeService(result=add_result(netns=netns))
    conf = netconf(prevResult=prev_result_of("1.0.0", netns))

    response, parsed = call(cni_env("CHECK", CNI_NETNS=netns), conf, service)

    assert_error(response, parsed, 999, fragment)
    assert "differs from prevResult" in parsed["msg"], reason


PREV_RESULT_CHANGES = [
    # reason, change to the prevResult ADD returned, message fragment
    ("it lists another pod MAC", ("interfaces", 1, "mac", "0a:58:ff:ff:ff:ff"), "the MAC 0a:58:ff"),
    ("it puts eth0 elsewhere", ("interfaces", 1, "sandbox", "/run/netns/x"), "puts eth0 in"),
    ("it gives the IP to the veth", ("ips", 0, "interface", 0), "to interface 0"),
]


@pytest.mark.parametrize(
    ("reason", "change", "fragment"), PREV_RESULT_CHANGES, ids=[c[0] for c in PREV_RESULT_CHANGES]
)
def test_check_fails_when_prev_result(
    reason: str, change: tuple[str, int, str, Any], fragment: str, configured_pod: ConfiguredPod
) -> None:
    netns = configured_pod.netns
    prev = prev_result_of("1.0.0", netns)
    field, index, key, value = change
    prev[field][index][key] = value
    service = FakeService(result=add_result(netns=netns))

    response, parsed = call(cni_env("CHECK", CNI_NETNS=netns), netconf(prevResult=prev), service)

    assert_error(response, parsed, 999, fragment)
    assert "differs from prevResult" in parsed["msg"], reason


def test_check_of_an_unknown_container_reports_code_3(pod_netns: str) -> None:
    service = FakeService(error=UnknownContainerError("no endpoint for that container"))
    conf = netconf(prevResult=prev_result_of("1.0.0", pod_netns))
    response, parsed = call(cni_env("CHECK", CNI_NETNS=pod_netns), conf, service)
    assert_error(response, parsed, 3, "no endpoint")


# -- GC and STATUS ----------------------------------------------------------


def test_gc_passes_the_valid_attachments_to_the_service() -> None:
    service = FakeService()
    valid = [
        {"containerID": "aaa", "ifname": "eth0"},
        {"containerID": "bbb", "ifname": "net1"},
    ]
    response, parsed = call(
        cni_env("GC"), netconf("1.1.0", **{"cni.dev/valid-attachments": valid}), service
    )
    assert (response.exit_code, parsed) == (0, None)
    assert service.calls == [("gc", ("ciliate", {("aaa", "eth0"), ("bbb", "net1")}))]


def test_gc_reads_the_draft_name_of_the_attachment_list_too() -> None:
    service = FakeService()
    conf = netconf("1.1.0", **{"cni.dev/attachments": [{"containerID": "a", "ifname": "eth0"}]})
    response, _ = call(cni_env("GC"), conf, service)
    assert response.exit_code == 0
    assert service.calls == [("gc", ("ciliate", {("a", "eth0")}))]


def test_gc_with_an_empty_list_keeps_nothing() -> None:
    service = FakeService()
    response, _ = call(
        cni_env("GC"), netconf("1.1.0", **{"cni.dev/valid-attachments": []}), service
    )
    assert response.exit_code == 0
    assert service.calls == [("gc", ("ciliate", set()))]


def test_status_reports_ready() -> None:
    service = FakeService()
    response, parsed = call(cni_env("STATUS"), netconf("1.1.0"), service)
    assert (response.exit_code, parsed) == (0, None)
    assert service.calls == [("ready", None)]


def test_status_reports_not_ready_with_code_50() -> None:
    service = FakeService(error=NotReadyError("the datapath is not loaded yet"))
    response, parsed = call(cni_env("STATUS"), netconf("1.1.0"), service)
    assert_error(response, parsed, 50, "datapath is not loaded")


# -- VERSION ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("stdin", "answered_in"),
    [
        (b'{"cniVersion": "0.4.0"}', "0.4.0"),
        (b'{"cniVersion": "1.0.0"}', "1.0.0"),
        (b"", "1.1.0"),
        # The spec: "the value of cniVersion specified on input", known or not.
        (b'{"cniVersion": "0.2.0"}', "0.2.0"),
        (b'{"cniVersion": "2.0.0"}', "2.0.0"),
        (b'{"cniVersion": "<script>"}', "1.1.0"),
        (b'{"cniVersion": 1}', "1.1.0"),
        (b"not json", "1.1.0"),
    ],
)
def test_version_lists_the_supported_versions(stdin: bytes, answered_in: str) -> None:
    response, parsed = call({"CNI_COMMAND": "VERSION"}, stdin)
    assert response.exit_code == 0
    assert parsed == {
        "cniVersion": answered_in,
        "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"],
    }


# -- validation -------------------------------------------------------------

INVALID = [
    # reason, command, env changes, netconf (or raw stdin), code, message fragment
    ("no CNI_COMMAND", "ADD", {"CNI_COMMAND": ""}, netconf(), 4, "CNI_COMMAND is not set"),
    ("an unknown command", "ADD", {"CNI_COMMAND": "ATTACH"}, netconf(), 4, "'ATTACH'"),
    (
        "ADD without CNI_CONTAINERID",
        "ADD",
        {"CNI_CONTAINERID": ""},
        netconf(),
        4,
        "CNI_CONTAINERID",
    ),
    ("ADD without CNI_NETNS", "ADD", {"CNI_NETNS": ""}, netconf(), 4, "CNI_NETNS"),
    ("ADD without CNI_IFNAME", "ADD", {"CNI_IFNAME": ""}, netconf(), 4, "CNI_IFNAME"),
    ("CHECK without CNI_NETNS", "CHECK", {"CNI_NETNS": ""}, netconf(), 4, "CNI_NETNS"),
    ("CHECK without CNI_PATH", "CHECK", {"CNI_PATH": ""}, netconf(), 4, "CNI_PATH"),
    ("GC without CNI_PATH", "GC", {"CNI_PATH": ""}, netconf("1.1.0"), 4, "CNI_PATH"),
    (
        "a missing variable before a bad stdin",
        "ADD",
        {"CNI_IFNAME": ""},
        b"not json",
        4,
        "CNI_IFNAME",
    ),
    (
        "DEL without CNI_CONTAINERID",
        "DEL",
        {"CNI_CONTAINERID": ""},
        netconf(),
        4,
        "CNI_CONTAINERID",
    ),
    ("DEL without CNI_IFNAME", "DEL", {"CNI_IFNAME": ""}, netconf(), 4, "CNI_IFNAME"),
    ("a container ID with a slash", "ADD", {"CNI_CONTAINERID": "../etc"}, netconf(), 4, "invalid"),
    ("a container ID starting with -", "DEL", {"CNI_CONTAINERID": "-abc"}, netconf(), 4, "letter"),
    ("a long interface name", "ADD", {"CNI_IFNAME": "a" * 16}, netconf(), 4, "at most 15"),
    ("an interface name '..'", "ADD", {"CNI_IFNAME": ".."}, netconf(), 4, "'..'"),
    ("an interface name with /", "DEL", {"CNI_IFNAME": "eth/0"}, netconf(), 4, "'/'"),
    ("an interface name with :", "ADD", {"CNI_IFNAME": "eth0:1"}, netconf(), 4, "':'"),
    ("an interface name with a blank", "ADD", {"CNI_IFNAME": "eth 0"}, netconf(), 4, "whitespace"),
    ("a netns that does not exist", "ADD", {"CNI_NETNS": "/run/netns/nope"}, netconf(), 4, "nope"),
    ("a netns that is a plain file", "ADD", {"CNI_NETNS": "/etc/hostname"}, netconf(), 4, "not a"),
    ("a mount namespace", "ADD", {"CNI_NETNS": "/proc/self/ns/mnt"}, netconf(), 4, "not a network"),
    ("the agent's own netns", "CHECK", {"CNI_NETNS": "/proc/self/ns/net"}, netconf(), 4, "own"),
    ("CNI_ARGS that do not parse", "ADD", {"CNI_ARGS": "K8S_POD_NAME"}, netconf(), 4, "CNI_ARGS"),
    (
        "CNI_ARGS with a namespace only",
        "ADD",
        {"CNI_ARGS": "K8S_POD_NAMESPACE=x"},
        netconf(),
        4,
        "both",
    ),
    ("stdin that is not JSON", "ADD", {}, b'{"cniVersion": ', 6, "not valid JSON"),
    ("stdin that is not UTF-8", "ADD", {}, b'{"name": "\xff"}', 6, "not UTF-8"),
    ("stdin that is a JSON list", "DEL", {}, b"[]", 6, "JSON object"),
    ("no cniVersion", "ADD", {}, {"name": "n", "type": "ciliate-cni"}, 1, "no cniVersion"),
    ("cniVersion 0.2.0", "ADD", {}, netconf("0.2.0"), 1, '"0.2.0"'),
    ("cniVersion 2.0.0", "DEL", {}, netconf("2.0.0"), 1, "incompatible CNI version"),
    ("a numeric cniVersion", "ADD", {}, {**netconf(), "cniVersion": 1}, 6, "must be a string"),
    ("an empty cniVersion", "DEL", {}, netconf(""), 1, "no cniVersion"),
    ("cniVersion 0.3.2", "ADD", {}, netconf("0.3.2"), 1, "supports 0.3.0, 0.3.1"),
    ("CHECK in 0.3.1", "CHECK", {}, netconf("0.3.1"), 1, "does not have CHECK"),
    ("GC in 1.0.0", "GC", {}, netconf("1.0.0"), 1, "does not have GC"),
    ("STATUS in 0.4.0", "STATUS", {}, netconf("0.4.0"), 1, "does not have STATUS"),
    ("STATUS in 1.0.0", "STATUS", {}, netconf("1.0.0"), 1, "does not have STATUS"),
    ("CHECK in 0.3.0", "CHECK", {}, netconf("0.3.0"), 1, "does not have CHECK"),
    ("no network name", "ADD", {}, netconf(name=None), 7, "'name'"),
    ("an empty network name", "DEL", {}, netconf(name=""), 7, "'name'"),
    ("a network name with a blank", "ADD", {}, netconf(name="my net"), 7, '"my net"'),
    ("no plugin type", "ADD", {}, netconf(type=None), 7, "'type'"),
    ("an mtu that is a string", "ADD", {}, netconf(mtu="1500"), 7, "mtu"),
    ("an mtu below 68", "ADD", {}, netconf(mtu=67), 7, "from 68 to 65535"),
    ("an mtu above 65535", "ADD", {}, netconf(mtu=65536), 7, "from 68 to 65535"),
    ("an mtu that is a boolean", "ADD", {}, netconf(mtu=True), 7, "mtu"),
    ("an mtu that is a float", "ADD", {}, netconf(mtu=1500.0), 7, "mtu"),
    ("args that are a list", "ADD", {}, netconf(args=[]), 7, "args must be"),
    ("args.cni that is a string", "ADD", {}, netconf(args={"cni": "x"}), 7, "args.cni must"),
    ("labels that are a string", "ADD", {}, netconf(args={"cni": {"labels": "a"}}), 7, "labels"),
    (
        "a listed label without a value",
        "ADD",
        {},
        netconf(args={"cni": {"labels": [{"key": "app"}]}}),
        7,
        "args.cni.labels[0]",
    ),
    (
        "a listed label given twice",
        "ADD",
        {},
        netconf(args={"cni": {"labels": [{"key": "a", "value": "1"}, {"key": "a", "value": "2"}]}}),
        7,
        "given twice",
    ),
    ("a label with a number", "ADD", {}, netconf(args={"cni": {"labels": {"a": 1}}}), 7, "labels"),
    (
        "a reserved label",
        "ADD",
        {},
        netconf(args={"cni": {"labels": {"reserved:host": ""}}}),
        7,
        "args.cni.labels",
    ),
    ("an agentSocket that is a number", "ADD", {}, netconf(agentSocket=5), 7, "agentSocket"),
    ("CHECK without prevResult", "CHECK", {}, netconf(), 7, "prevResult"),
    ("CHECK with a list prevResult", "CHECK", {}, netconf(prevResult=[]), 7, "prevResult"),
    (
        "CHECK with a bad prevResult address",
        "CHECK",
        {},
        netconf(prevResult={"ips": [{"address": "ten"}]}),
        7,
        "prevResult.ips[0].address",
    ),
    ("GC without valid attachments", "GC", {}, netconf("1.1.0"), 7, "cni.dev/valid-attachments"),
    (
        "GC with an attachment lacking ifname",
        "GC",
        {},
        netconf("1.1.0", **{"cni.dev/valid-attachments": [{"containerID": "a"}]}),
        7,
        "[0]",
    ),
]


@pytest.mark.parametrize(
    ("reason", "command", "env", "stdin", "code", "fragment"),
    INVALID,
    ids=[case[0] for case in INVALID],
)
def test_invalid_input_is_refused_with_its_code(
    reason: str,
    command: str,
    env: dict[str, str],
    stdin: bytes | dict[str, Any],
    code: int,
    fragment: str,
    pod_netns: str,
) -> None:
    if isinstance(stdin, dict):
        stdin = {k: v for k, v in stdin.items() if v is not None}
    base = (
        cni_env(command, CNI_NETNS=pod_netns) if command in ("ADD", "CHECK") else cni_env(command)
    )
    service = FakeService(result=add_result(netns=pod_netns))

    response, parsed = call({**base, **env}, stdin, service)

    assert_error(response, parsed, code, fragment)
    assert not [c for c in service.calls if c[0] != "check"], f"{reason}: service was called"


def test_errors_carry_the_netconf_version() -> None:
    _, parsed = call(cni_env("DEL", CNI_IFNAME=""), netconf("0.4.0"))
    assert parsed["cniVersion"] == "0.4.0"


@pytest.mark.parametrize(
    ("given", "answered"),
    [("9.9.9", "9.9.9"), ("0.2.0", "0.2.0"), (None, "1.1.0"), (1, "1.1.0"), ("x y", "1.1.0")],
)
def test_errors_of_an_unknown_version_name_it(given: Any, answered: str) -> None:
    """The spec: an error's cniVersion is "the same value as provided by the
    configuration"; the latest when there is none to repeat."""
    conf = {k: v for k, v in netconf().items() if k != "cniVersion"}
    if given is not None:
        conf["cniVersion"] = given
    response, parsed = call(cni_env("DEL"), conf)
    assert response.exit_code == 1
    assert parsed["cniVersion"] == answered


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (TryAgainError("the store is busy"), 11),
        (PoolExhaustedError("no address left in 10.244.1.0/24"), 11),
        (NotReadyError("restoring endpoints"), 50),
        (ServiceError("veth creation failed"), 999),
    ],
)
def test_service_errors_keep_their_code_and_message(
    error: ServiceError, code: int, pod_netns: str
) -> None:
    response, parsed = call(
        cni_env("ADD", CNI_NETNS=pod_netns), netconf(), FakeService(error=error)
    )
    assert_error(response, parsed, code, error.message)


def test_an_unexpected_exception_is_code_999_with_its_text_and_no_traceback(
    pod_netns: str, caplog: pytest.LogCaptureFixture
) -> None:
    service = FakeService(error=KeyError("ifindex"))
    response, parsed = call(cni_env("ADD", CNI_NETNS=pod_netns), netconf(), service)
    assert_error(response, parsed, 999, "KeyError: 'ifindex'")
    assert "Traceback" not in response.stdout
    assert "Traceback" in caplog.text  # the agent's log has it


# -- the DEL queue ----------------------------------------------------------


def queue_file(directory: Path, name: str, body: Any, mtime: float) -> Path:
    path = directory / name
    path.write_text(json.dumps(body) if not isinstance(body, str) else body)
    os.utime(path, (mtime, mtime))
    return path


def test_del_queue_is_read_oldest_first(tmp_path: Path) -> None:
    now = time.time()
    env = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "b", "CNI_IFNAME": "eth0"}
    newer = queue_file(tmp_path, "b-eth0.json", {"env": env, "stdin": "{}"}, now)
    older = queue_file(
        tmp_path, "a-eth0.json", {"env": {**env, "CNI_CONTAINERID": "a"}, "stdin": "{}"}, now - 60
    )

    queued = handler.read_del_queue(tmp_path)

    assert [q["path"] for q in queued] == [str(older), str(newer)]
    assert queued[1] == {"path": str(newer), "env": env, "stdin": "{}"}


def test_del_queue_skips_temporary_and_broken_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = time.time()
    queue_file(tmp_path, ".a-eth0.json.123.tmp", "{half", now)
    broken = queue_file(tmp_path, "b-eth0.json", "{half", now)
    queue_file(tmp_path, "c-eth0.json", {"env": {}, "stdin": ""}, now)

    queued = handler.read_del_queue(tmp_path)

    assert [Path(q["path"]).name for q in queued] == ["c-eth0.json"]
    assert broken.exists()
    assert "b-eth0.json" in caplog.text


def test_a_missing_del_queue_is_empty(tmp_path: Path) -> None:
    assert handler.read_del_queue(tmp_path / "cni-del-queue") == []


def test_removing_from_the_queue_twice_is_fine(tmp_path: Path) -> None:
    path = queue_file(tmp_path, "a-eth0.json", {"env": {}, "stdin": ""}, time.time())
    handler.remove_from_queue(path)
    handler.remove_from_queue(path)
    assert not path.exists()
