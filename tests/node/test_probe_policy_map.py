"""A policy too big for the policy map, beside small ones, on a real node: the
endpoint it selects keeps what it had, the error names the map to raise, every
other endpoint gets the policies applied with it."""

from __future__ import annotations

import time
from typing import Any

from .conftest import NodeLab
from .test_policy import apply, delete, deny_ingress, pod_object

# Ports in one rule x CIDR peers: entries of one endpoint beyond what the policy
# map (262,144, bpf/datapath.toml) holds, twice over while a replace holds both
# generations.
_PORTS = 2200
_CIDRS = 128


def oversized_policy(name: str, *, selector: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "podSelector": {"matchLabels": selector},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [
                        {"ipBlock": {"cidr": f"172.{16 + i // 256}.{i % 256}.0/24"}}
                        for i in range(_CIDRS)
                    ],
                    "ports": [{"protocol": "TCP", "port": 1 + 2 * p} for p in range(_PORTS)],
                }
            ],
        },
    }


def wait_policy_pass(node_lab: NodeLab, timeout: float = 60.0) -> dict[str, Any]:
    """The policy loop's status once it has passed over what was just applied
    (succeeded or not)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status: dict[str, Any] = node_lab.get("/v1/policy")
        if status["pending"] is False:
            return status
        time.sleep(0.1)
    raise AssertionError(f"no policy pass ran: {status}")


def test_a_policy_too_big_for_the_map_leaves_every_other_endpoint_enforced(
    fresh_lab: NodeLab,
) -> None:
    """One endpoint's policy overflows the policy map: that endpoint keeps what it
    had, the error names the map to raise, and the other endpoints still get the
    policies applied with it (a deny for another pod is enforced at once)."""
    node_lab = fresh_lab
    big, victim, client = node_lab.pod("big"), node_lab.pod("victim"), node_lab.pod("client")
    apply(
        node_lab,
        pod_object(big, app="big"),
        pod_object(victim, app="victim"),
        pod_object(client, app="client"),
    )
    for pod in (big, victim, client):
        node_lab.add(pod)
    assert big.ip and victim.ip
    assert node_lab.ping(client, victim.ip) and node_lab.ping(client, big.ip)
    with node_lab.api as api:
        api.post(
            "/v1/objects/apply",
            {
                "objects": [
                    oversized_policy("too-big", selector={"app": "big"}),
                    deny_ingress("deny-victim", app="victim"),
                ]
            },
        )
    status = wait_policy_pass(node_lab)
    assert not node_lab.ping(client, victim.ip), status  # enforced despite the failure
    assert node_lab.ping(client, big.ip)  # big keeps what it had: nothing half-written
    error = str(status["last_error"])
    assert "default/big" in error and "maps.ciliate_policy" in error, error
    assert "max_entries" in error and "datapath.toml" in error, error
    # Not written again and again at every poll (each pass computes for seconds).
    passes = status["passes"]
    time.sleep(1.0)
    assert node_lab.get("/v1/policy")["passes"] == passes
    delete(node_lab, oversized_policy("too-big", selector={}))  # settles: the pass succeeds
    assert node_lab.get("/v1/policy")["last_error"] is None
    assert not node_lab.ping(client, victim.ip)
    assert node_lab.ping(client, big.ip)
    for pod in (big, victim, client):
        node_lab.cni(pod, "DEL")


# ipBlock peers, one /32 each: more CIDR identities than the ipcache (16,384
# prefixes, bpf/datapath.toml) holds beside the node's own entries.
_CIDR_PEERS = 17000


def cidr_flood_policy(name: str, *, selector: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "podSelector": {"matchLabels": selector},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [
                        {
                            "ipBlock": {
                                "cidr": f"172.{16 + i // 65536}.{i // 256 % 256}.{i % 256}/32"
                            }
                        }
                        for i in range(_CIDR_PEERS)
                    ]
                }
            ],
        },
    }


def test_policy_cidrs_beyond_the_ipcache_leave_every_other_endpoint_enforced(
    fresh_lab: NodeLab,
) -> None:
    """A policy naming more CIDRs than the ipcache holds: the endpoint it selects
    keeps what it had, nothing of it is left in the ipcache (a CIDR identity there
    would change how every other endpoint's kept policy sees those senders), the
    error names the map to raise, and a deny applied with it is enforced."""
    node_lab = fresh_lab
    big, victim, client = node_lab.pod("big"), node_lab.pod("victim"), node_lab.pod("client")
    apply(
        node_lab,
        pod_object(big, app="big"),
        pod_object(victim, app="victim"),
        pod_object(client, app="client"),
    )
    for pod in (big, victim, client):
        node_lab.add(pod)
    assert big.ip and victim.ip
    ipcache_before = len(node_lab.get("/v1/bpf/ipcache"))
    with node_lab.api as api:
        api.post(
            "/v1/objects/apply",
            {
                "objects": [
                    cidr_flood_policy("cidr-flood", selector={"app": "big"}),
                    deny_ingress("deny-victim", app="victim"),
                ]
            },
        )
    status = wait_policy_pass(node_lab, timeout=120)
    assert not node_lab.ping(client, victim.ip), status
    assert node_lab.ping(client, big.ip)
    error = str(status["last_error"])
    assert "default/big" in error and "maps.ciliate_ipcache" in error, error
    assert len(node_lab.get("/v1/bpf/ipcache")) == ipcache_before
    delete(node_lab, cidr_flood_policy("cidr-flood", selector={}))
    assert node_lab.get("/v1/policy")["last_error"] is None
    for pod in (big, victim, client):
        node_lab.cni(pod, "DEL")
