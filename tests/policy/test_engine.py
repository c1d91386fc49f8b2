"""The entries the engine hands the datapath, in the datapath's terms: which
directions are enforced, the host's standing allow, named ports resolved per peer,
ipBlocks as CIDR identities and pod identities, stable CIDR identities, and pods
with equal labels sharing an identity."""

from __future__ import annotations

import ipaddress
from typing import Any

from ciliate.control.policy.cidr import CidrIdentities
from ciliate.control.policy.engine import HOST_DEFAULT, compute
from ciliate.control.policy.inputs import input_from_objects
from ciliate.control.policy.model import CIDR_IDENTITY_BASE, PolicyEntry

from .engine_runner import by_kind
from .model import Stage, default_pod_ips, match_labels, netpol, pod_object

IPS = default_pod_ips()
TCP, UDP = 6, 17


def compute_stage(*policies: dict[str, Any], extra: list[dict[str, Any]] | None = None) -> Any:
    objects = Stage(list(policies), []).objects(IPS) + (extra or [])
    inp = input_from_objects(by_kind(objects))
    return inp, compute(inp)


def identity(inp: Any, ref: str) -> int:
    return int(next(p.identity for p in inp.pods if p.ref == ref))


def test_only_selected_directions_are_enforced_and_the_host_is_always_let_in() -> None:
    _, result = compute_stage(netpol("deny", "x", match_labels(pod="a"), ingress=[]))
    xa = result.endpoints["x/a"]
    assert (xa.ingress_enforced, xa.egress_enforced) == (True, False)
    assert xa.entries == (PolicyEntry("ingress", 1, 0),)
    assert xa.origins[PolicyEntry("ingress", 1, 0)] == (HOST_DEFAULT,)
    assert xa.isolated_by == {"ingress": ("NetworkPolicy x/deny",)}
    xb = result.endpoints["x/b"]
    assert (xb.ingress_enforced, xb.egress_enforced, xb.entries) == (False, False, ())


def test_peers_become_identities_and_ports_become_entries() -> None:
    policy = netpol(
        "web",
        "x",
        match_labels(pod="a"),
        ingress=[
            {
                "from": [{"podSelector": match_labels(pod="b")}],
                "ports": [{"port": 80}, {"protocol": "UDP", "port": 81, "endPort": 90}],
            }
        ],
    )
    inp, result = compute_stage(policy)
    xb = identity(inp, "x/b")
    assert set(result.endpoints["x/a"].entries) == {
        PolicyEntry("ingress", 1, 0),
        PolicyEntry("ingress", xb, TCP, 80),
        PolicyEntry("ingress", xb, UDP, 81, 90),
    }


def test_named_egress_ports_resolve_against_each_destination() -> None:
    # y/b serves its "serve-80-tcp" on 8080: the egress entry for it says 8080.
    moved = pod_object("y/b", ip=IPS["y/b"])
    moved["spec"]["containers"][0]["ports"][0]["containerPort"] = 8080
    objects = [
        o
        for o in Stage([], []).objects(IPS)
        if o["metadata"].get("name") != "b" or o["metadata"].get("namespace") != "y"
    ]
    policy = netpol(
        "named", "x", match_labels(pod="a"), egress=[{"ports": [{"port": "serve-80-tcp"}]}]
    )
    inp = input_from_objects(by_kind([*objects, moved, policy]))
    result = compute(inp)
    entries = set(result.endpoints["x/a"].entries)
    assert PolicyEntry("egress", identity(inp, "y/b"), TCP, 8080) in entries
    assert PolicyEntry("egress", identity(inp, "y/a"), TCP, 80) in entries
    assert not any(e.identity == 0 for e in entries)


def test_ip_blocks_take_cidr_identities_and_pods_inside() -> None:
    policy = netpol(
        "cidr",
        "x",
        match_labels(pod="a"),
        egress=[
            {
                "to": [
                    {
                        "ipBlock": {
                            "cidr": "10.244.1.0/24",
                            "except": ["10.244.1.11/32", "10.244.1.128/25"],
                        }
                    }
                ]
            }
        ],
    )
    inp, result = compute_stage(policy)
    # 10.244.1.11 is y/b's address: it keeps its pod identity, no CIDR identity for it.
    assert set(result.cidr_identities) == {
        ipaddress.IPv4Network("10.244.1.0/24"),
        ipaddress.IPv4Network("10.244.1.128/25"),
    }
    allowed = {e.identity for e in result.endpoints["x/a"].entries if e.direction == "egress"}
    assert allowed == {
        result.cidr_identities[ipaddress.IPv4Network("10.244.1.0/24")],
        identity(inp, "y/a"),
        identity(inp, "y/c"),
    }


def test_cidr_identities_stay_put_while_their_prefix_is_named() -> None:
    allocator = CidrIdentities()

    def ids(*cidrs: str) -> dict[str, int]:
        policy = netpol("c", "x", {}, egress=[{"to": [{"ipBlock": {"cidr": c}} for c in cidrs]}])
        objects = Stage([policy], []).objects(IPS)
        result = compute(input_from_objects(by_kind(objects)), cidr_identities=allocator)
        return {str(k): v for k, v in result.cidr_identities.items()}

    first = ids("192.0.2.0/24", "198.51.100.0/24")
    assert sorted(first.values()) == [CIDR_IDENTITY_BASE, CIDR_IDENTITY_BASE + 1]
    second = ids("198.51.100.0/24", "203.0.113.0/24")
    assert second["198.51.100.0/24"] == first["198.51.100.0/24"]
    assert second["203.0.113.0/24"] == first["192.0.2.0/24"]  # the freed id is reused


def test_pods_with_equal_labels_share_an_identity_and_an_except_protects_both() -> None:
    twin = pod_object("x/twin", ip="10.244.0.99", labels={"pod": "b"})
    policy = netpol(
        "cidr",
        "x",
        match_labels(pod="a"),
        egress=[{"to": [{"ipBlock": {"cidr": "10.244.0.0/24", "except": ["10.244.0.99/32"]}}]}],
    )
    inp, result = compute_stage(policy, extra=[twin])
    assert identity(inp, "x/twin") == identity(inp, "x/b")
    allowed = {e.identity for e in result.endpoints["x/a"].entries}
    assert identity(inp, "x/b") not in allowed  # its twin is excepted
    assert identity(inp, "x/c") in allowed


def test_an_ip_block_lets_a_shared_identity_in_only_if_it_holds_all_its_pods() -> None:
    # x/twin has x/b's labels (one identity) but an address outside the block: letting
    # the identity in would let x/twin in too, which Kubernetes does not (the block
    # does not hold its address). The datapath cannot tell them apart, so neither is
    # (as an except already did not let a labelmate in). It used to let both in.
    twin = pod_object("x/twin", ip="10.244.5.99", labels={"pod": "b"})
    policy = netpol(
        "cidr",
        "y",
        match_labels(pod="a"),
        egress=[{"to": [{"ipBlock": {"cidr": "10.244.0.0/24"}}]}],
    )
    inp, result = compute_stage(policy, extra=[twin])
    assert identity(inp, "x/twin") == identity(inp, "x/b")
    allowed = {e.identity for e in result.endpoints["y/a"].entries}
    assert identity(inp, "x/b") not in allowed
    assert {identity(inp, "x/a"), identity(inp, "x/c")} <= allowed


def test_a_named_ingress_port_resolves_per_endpoint_even_under_one_policy() -> None:
    moved = pod_object("x/b", ip=IPS["x/b"])
    moved["spec"]["containers"][0]["ports"][0]["containerPort"] = 8080
    objects = [o for o in Stage([], []).objects(IPS) if not _is(o, "x", "b")]
    policy = netpol("named", "x", {}, ingress=[{"ports": [{"port": "serve-80-tcp"}]}])
    result = compute(input_from_objects(by_kind([*objects, moved, policy])))
    assert PolicyEntry("ingress", 0, TCP, 80) in result.endpoints["x/a"].entries
    assert PolicyEntry("ingress", 0, TCP, 8080) in result.endpoints["x/b"].entries
    assert PolicyEntry("ingress", 0, TCP, 80) not in result.endpoints["x/b"].entries
    # Pods whose ports agree share one computed policy.
    assert result.endpoints["x/a"] is result.endpoints["x/c"]


def _is(obj: dict[str, Any], namespace: str, name: str) -> bool:
    meta = obj["metadata"]
    return bool(meta.get("namespace") == namespace and meta.get("name") == name)


def test_pods_sharing_an_identity_that_number_a_name_differently_get_nothing_on_it() -> None:
    # The datapath decides by identity. Two pods with equal labels give serve-80-tcp
    # different numbers (80, 8080): an egress rule on the name must not open 8080 to
    # the pod serving 80 on it nor 80 to the other (Kubernetes resolves the name on
    # each destination pod), so it opens neither, as Cilium's GetNamedPorts skips an
    # identity with more than one port for a name. (It used to open both to both.)
    # Where the pods agree (serve-80-udp), the number is opened; a pod of the identity
    # that does not name the port at all does not stop the others (Cilium's choice too).
    twin = pod_object("y/twin", ip="10.244.1.99", labels={"pod": "b"})
    twin["spec"]["containers"][0]["ports"][0]["containerPort"] = 8080  # serve-80-tcp
    portless = pod_object("y/portless", ip="10.244.1.98", labels={"pod": "c"})
    portless["spec"]["containers"] = [{"name": "c"}]
    policy = netpol(
        "named",
        "x",
        match_labels(pod="a"),
        egress=[{"ports": [{"port": "serve-80-tcp"}, {"protocol": "UDP", "port": "serve-80-udp"}]}],
    )
    inp, result = compute_stage(policy, extra=[twin, portless])
    b, c = identity(inp, "y/b"), identity(inp, "y/c")
    assert identity(inp, "y/twin") == b and identity(inp, "y/portless") == c
    entries = set(result.endpoints["x/a"].entries)
    to_b = {(e.protocol, e.port) for e in entries if e.identity == b}
    assert to_b == {(UDP, 80)}
    assert {(TCP, 80), (UDP, 80)} <= {(e.protocol, e.port) for e in entries if e.identity == c}


def test_an_ip_block_matches_pods_a_cilium_cidr_does_not() -> None:
    # Kubernetes leaves it to the implementation. ciliate lets a NetworkPolicy ipBlock
    # match pod (and node) addresses inside it: the upstream e2e cases "should allow
    # egress access to server in CIDR block" and the two except cases need it (Cilium
    # itself does not, cilium/cilium#9209, #19601, and fails them). Cilium's CIDR rules
    # keep Cilium's default: they never select pods or nodes.
    block = netpol(
        "np", "x", match_labels(pod="a"), egress=[{"to": [{"ipBlock": {"cidr": "10.244.1.0/24"}}]}]
    )
    cilium = {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "cnp", "namespace": "x"},
        "spec": {
            "endpointSelector": match_labels(pod="b"),
            "egress": [{"toCIDR": ["10.244.1.0/24"]}],
        },
    }
    inp, result = compute_stage(block, cilium)
    y_pods = {identity(inp, f"y/{p}") for p in "abc"}
    assert y_pods <= {e.identity for e in result.endpoints["x/a"].entries}
    assert not y_pods & {e.identity for e in result.endpoints["x/b"].entries}
