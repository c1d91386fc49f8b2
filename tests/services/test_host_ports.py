"""hostPorts as frontends (pure): mappings parsed as CNI and Pod objects give
them, overlaps as the scheduler's NodePorts filter reads them (the same protocol
and port, hostIPs equal or either unspecified), the frontends a node serves, and
the node table holding them beside Services (a Service keeps a frontend both
claim)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from ciliate.control.objects import KINDS, object_key
from ciliate.control.services import hostports
from ciliate.control.services.changes import Changes
from ciliate.control.services.hostports import HostPort, HostPortError
from ciliate.control.services.node import NodeTable
from ciliate.control.services.table import FrontendKey, FrontendKind

NODE_IPS = [ipaddress.IPv4Address("192.168.50.10"), ipaddress.IPv4Address("10.244.1.1")]
POD_IP = ipaddress.IPv4Address("10.244.1.7")


def hp(port: int, protocol: str = "TCP", host_ip: str = "", container: int = 80) -> HostPort:
    return HostPort.parse(
        host_port=port, container_port=container, protocol=protocol, host_ip=host_ip
    )


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"protocol": "tcp", "host_ip": ""}, HostPort(8080, "TCP", 80)),
        ({"protocol": "UDP", "host_ip": "0.0.0.0"}, HostPort(8080, "UDP", 80)),
        ({"protocol": None, "host_ip": None}, HostPort(8080, "TCP", 80)),
        (
            {"protocol": "tcp", "host_ip": "192.168.50.10"},
            HostPort(8080, "TCP", 80, ipaddress.IPv4Address("192.168.50.10")),
        ),
    ],
)
def test_a_mapping_reads_as_cni_and_kubelet_write_it(
    fields: dict[str, Any], expected: HostPort
) -> None:
    assert HostPort.parse(host_port=8080, container_port=80, **fields) == expected
    assert HostPort.from_json(expected.to_json()) == expected


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"protocol": "sctp"}, "TCP and UDP"),
        ({"host_ip": "fd00::1"}, "not an IPv4 address"),
        ({"host_port": 0}, "hostPort 0 is outside"),
        ({"container_port": 70000}, "containerPort 70000 is outside"),
        ({"host_port": "8080"}, "hostPort must be an integer"),
    ],
)
def test_a_mapping_that_cannot_be_served_is_refused_naming_the_field(
    fields: dict[str, Any], fragment: str
) -> None:
    given = {"host_port": 8080, "container_port": 80, "protocol": "tcp", "host_ip": ""} | fields
    with pytest.raises(HostPortError, match=fragment):
        HostPort.parse(**given)


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        (hp(8080), hp(8080), True),
        (hp(8080), hp(8080, "UDP"), False),
        (hp(8080), hp(8081), False),
        (hp(8080, host_ip="192.168.50.10"), hp(8080), True),  # unspecified: every address
        (hp(8080, host_ip="192.168.50.10"), hp(8080, host_ip="10.244.1.1"), False),
        (hp(8080, host_ip="192.168.50.10"), hp(8080, host_ip="192.168.50.10"), True),
    ],
)
def test_two_mappings_overlap_as_the_scheduler_reads_host_ports(
    a: HostPort, b: HostPort, overlap: bool
) -> None:
    assert a.overlaps(b) is overlap and b.overlaps(a) is overlap


# The cases of the scheduler's TestHostPortInfo_Check (pkg/scheduler/framework):
# (protocol, hostIP, port) held by other pods, the one asked for, whether they
# clash. An empty protocol is TCP, an empty hostIP 0.0.0.0 (every address).
HELD_LOCAL_80 = [("TCP", "127.0.0.1", 80)]
UPSTREAM_CHECK_CASES = [
    ("empty check is 0.0.0.0 and TCP", HELD_LOCAL_80, ("", "", 81), False),
    ("empty check is 0.0.0.0 and TCP (conflicted)", HELD_LOCAL_80, ("", "", 80), True),
    ("0.0.0.0 checks every held IP", HELD_LOCAL_80, ("TCP", "0.0.0.0", 80), True),
    ("0.0.0.0, another protocol", [("UDP", "127.0.0.1", 80)], ("TCP", "0.0.0.0", 80), False),
    (
        "0.0.0.0, other ports",
        [("TCP", "127.0.0.1", 79), ("TCP", "127.0.0.1", 81), ("TCP", "127.0.0.1", 82)],
        ("TCP", "0.0.0.0", 80),
        False,
    ),
    ("an IP checks a held 0.0.0.0", [("TCP", "0.0.0.0", 80)], ("TCP", "127.0.0.1", 80), True),
    (
        "an IP, other ports or protocol of 0.0.0.0",
        [("TCP", "0.0.0.0", 79), ("UDP", "0.0.0.0", 80), ("TCP", "0.0.0.0", 81)],
        ("TCP", "127.0.0.1", 80),
        False,
    ),
    (
        "an IP, other ports or protocol of the same IP",
        [("TCP", "127.0.0.1", 79), ("UDP", "127.0.0.1", 80), ("TCP", "127.0.0.1", 81)],
        ("TCP", "127.0.0.1", 80),
        False,
    ),
]


@pytest.mark.parametrize(
    ("held", "asked", "clashes"),
    [
        pytest.param(held, asked, clashes, id=name)
        for name, held, asked, clashes in UPSTREAM_CHECK_CASES
    ],
)
def test_clashes_as_the_schedulers_host_port_check_finds_them(
    held: list[tuple[str, str, int]], asked: tuple[str, str, int], clashes: bool
) -> None:
    taken = [("other", [hp(port, protocol, host_ip) for protocol, host_ip, port in held])]
    protocol, host_ip, port = asked
    assert (hostports.clash([hp(port, protocol, host_ip)], taken) is not None) is clashes


def test_a_pods_host_ports_come_from_its_containers_and_sidecars() -> None:
    pod = {
        "spec": {
            "containers": [
                {"name": "web", "ports": [{"containerPort": 80, "hostPort": 8080}]},
                {"name": "dns", "ports": [{"containerPort": 53, "protocol": "UDP"}]},
                {"name": "zero", "ports": [{"containerPort": 54, "hostPort": 0}]},
            ],
            "initContainers": [
                {"name": "once", "ports": [{"containerPort": 9, "hostPort": 9009}]},
                {
                    "name": "proxy",
                    "restartPolicy": "Always",
                    "ports": [{"containerPort": 15001, "hostPort": 15001, "hostIP": "10.244.1.1"}],
                },
            ],
        }
    }
    assert hostports.from_pod(pod) == [
        HostPort(8080, "TCP", 80),
        HostPort(15001, "TCP", 15001, ipaddress.IPv4Address("10.244.1.1")),
    ]


def test_the_runtimes_and_the_pods_mappings_count_once_and_may_not_conflict() -> None:
    assert hostports.merged([hp(8080)], [hp(8080), hp(53, "UDP", container=53)]) == [
        hp(8080),
        hp(53, "UDP", container=53),
    ]
    with pytest.raises(HostPortError, match="overlap"):
        hostports.merged([hp(8080)], [hp(8080, container=81)])


def test_a_clash_names_the_pod_holding_the_port() -> None:
    taken = [("default/a", [hp(8080)]), ("default/b", [hp(9090, host_ip="10.244.1.1")])]
    assert hostports.clash([hp(8080, "UDP"), hp(9090, host_ip="192.168.50.10")], taken) is None
    assert hostports.clash([hp(9090)], taken) == (
        hp(9090),
        "default/b",
        hp(9090, host_ip="10.244.1.1"),
    )


def _pod(*mappings: HostPort, owner: str = "c1/eth0") -> hostports.PodHostPorts:
    return hostports.PodHostPorts(owner=owner, pod="default/web", ip=POD_IP, mappings=mappings)


def test_a_host_port_is_a_frontend_at_each_node_address_or_at_its_host_ip() -> None:
    table = hostports.frontends(
        [_pod(hp(8080), hp(5353, "UDP", host_ip="10.244.1.1", container=53))],
        node_name="node-a",
        node_ips=NODE_IPS,
    )
    [(owner, frontends)] = table.items()
    assert owner == hostports.owner_ref("c1/eth0")
    assert [str(f.key) for f in frontends] == [
        "10.244.1.1:8080/TCP",
        "192.168.50.10:8080/TCP",
        "10.244.1.1:5353/UDP",
    ]
    assert {f.kind for f in frontends} == {FrontendKind.HOST_PORT}
    assert [str(f.backends[0].key) for f in frontends] == [
        "10.244.1.7:80/TCP",
        "10.244.1.7:80/TCP",
        "10.244.1.7:53/UDP",
    ]
    assert all(f.backends[0].node == "node-a" and not f.refuses for f in frontends)
    assert hostports.frontends([_pod()], node_name="node-a", node_ips=NODE_IPS) == {}
    # A hostIP that is not the node's: not served (as portmap matches local addresses only).
    elsewhere = _pod(hp(8080, host_ip="192.0.2.1"))
    assert hostports.frontends([elsewhere], node_name="node-a", node_ips=NODE_IPS) == {}


def _kind(node: NodeTable, key: FrontendKey) -> FrontendKind:
    frontend = node.get(key)
    assert frontend is not None, key
    return frontend.kind


def _node_port_service(port: int) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "default", "name": "np"},
        "spec": {
            "type": "NodePort",
            "clusterIP": "10.96.0.20",
            "ports": [{"port": 80, "protocol": "TCP", "nodePort": port}],
        },
    }


def test_the_node_table_adds_and_removes_host_ports_and_a_service_keeps_a_shared_frontend() -> None:
    node = NodeTable(node_name="node-a", node_ips=NODE_IPS)
    extra = hostports.frontends([_pod(hp(30080))], node_name="node-a", node_ips=NODE_IPS)
    first = node.update(Changes(full=True), extra=extra)
    keys = {FrontendKey(ip, 30080, "TCP") for ip in NODE_IPS}
    assert set(first.changed) == keys
    [backend] = extra[hostports.owner_ref("c1/eth0")][0].backends
    assert first.new_backends == {backend.key}

    # A NodePort Service on the same port: the Service holds the frontends.
    key = object_key(KINDS["Service"], name="np", namespace="default")
    changes = Changes(changed={"Service": {key: _node_port_service(30080)}})
    delta = node.update(changes, extra=extra)
    assert set(delta.changed) >= keys
    assert {_kind(node, k) for k in keys} == {FrontendKind.NODE_PORT}

    # The Service gone, the hostPort is back; the pod gone, nothing is left.
    node.update(Changes(deleted={"Service": {key}}), extra=extra)
    assert {_kind(node, k) for k in keys} == {FrontendKind.HOST_PORT}
    gone = node.update(Changes(full=False), extra={})
    assert set(gone.changed) == keys and all(v is None for v in gone.changed.values())
    assert node.frontends() == [] and gone.released_backends
