"""A pod deleted (CNI DEL) while the policy pass that writes its policy runs, on a
real node: nothing of its policy is left in the maps once the loop has caught up
(the slot waits, enforced and full of entries, for the next pod of its address)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ciliate.datapath import abi
from ciliate.datapath.policy import Policy
from ciliate.loader import Map

from .conftest import NodeLab
from .test_policy import apply, delete, pod_object, settle

_PODS = 6
_PORTS = 4000  # a pass computes for a while: the DEL lands during it


def busy_policy(*, ports: int) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "race", "namespace": "default"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "race"}},
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": {"app": "race-client"}}}],
                    "ports": [{"protocol": "TCP", "port": 1 + p} for p in range(ports)],
                }
            ],
        },
    }


def policy_left(node_lab: NodeLab, endpoint_id: int) -> tuple[int, int]:
    """(entries, enforcement flags) the pinned policy maps hold for ``endpoint_id``."""
    maps = Path(node_lab.node.bpffs_root) / "maps"
    with Map.open_pinned(maps / "ciliate_policy") as entries:
        count = sum(1 for key in entries if Policy._decode(key)[0] == endpoint_id)
    with Map.open_pinned(maps / "ciliate_policy_state") as states:
        state = states.lookup(endpoint_id.to_bytes(4, "little"))
    assert isinstance(state, bytes)
    return count, int(abi.unpack("ciliate_policy_state", state)["flags"])


def test_a_pod_deleted_while_the_pass_writing_its_policy_runs_leaves_none_of_it(
    node_lab: NodeLab,
) -> None:
    pods = [node_lab.pod() for _ in range(_PODS)]
    apply(node_lab, *(pod_object(p, app="race", n=str(i)) for i, p in enumerate(pods)))
    for pod in pods:
        node_lab.add(pod)
    ids = {e["ip"]: e["endpoint_id"] for e in node_lab.get("/v1/endpoints")}
    victim = pods[-1]
    victim_id = ids[victim.ip]
    try:
        with node_lab.api as api:
            api.post("/v1/objects/apply", {"objects": [busy_policy(ports=_PORTS)]})
        node_lab.cni(victim, "DEL")  # while the pass computes
        settle(node_lab, timeout=30)
        apply(node_lab, pod_object(pods[0], app="race", n="0", again="yes"))  # one more pass
        assert policy_left(node_lab, victim_id) == (0, 0)
    finally:
        for pod in pods:
            node_lab.cni(pod, "DEL")
        delete(node_lab, busy_policy(ports=1), *(pod_object(p) for p in pods))
