"""Policy with the agent's disk full (its state directory a 2 MB tmpfs filled to
the last byte), on a real node: a label change the node's store cannot commit.
(A policy applied on one node with its disk full is refused by the store, naming
it, and changes nothing: probed, not kept.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import test_faults
from .conftest import NodeLab
from .test_policy import apply, deny_ingress, endpoint, pod_object, settle

small_disk_lab = test_faults.small_disk_lab
disk_full = test_faults.disk_full
_BUSY_PODS = 6
_BUSY_PORTS = 4000


def busy_policy(*, ports: int) -> dict[str, Any]:
    """Many ports for app=busy pods: a pass over it takes a while (seconds here)."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "busy", "namespace": "default"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "busy"}},
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": {"app": "a"}}}],
                    "ports": [{"protocol": "TCP", "port": 1 + p} for p in range(ports)],
                }
            ],
        },
    }


def test_a_label_change_the_full_disk_refuses_keeps_no_other_endpoint_from_its_policy(
    small_disk_lab: tuple[NodeLab, Path],
) -> None:
    """Pod b relabelled and a policy isolating c, both committed; then the disk
    fills before the loop's pass over them (in a cluster the objects live in etcd
    and only the node's own disk is full: this is every pass there). b's move to a
    new identity cannot be committed and it keeps its identity; c must be isolated
    all the same, and the loop's status must say what is left undone. With room
    again, b moves at the next change."""
    node_lab, state_dir = small_disk_lab
    a, b, c = node_lab.pod("a"), node_lab.pod("b"), node_lab.pod("c")
    busy = [node_lab.pod(f"busy{i}") for i in range(_BUSY_PODS)]
    apply(
        node_lab,
        pod_object(a, app="a"),
        pod_object(b, app="b"),
        pod_object(c, app="c"),
        *(pod_object(p, app="busy", n=str(i)) for i, p in enumerate(busy)),
    )
    for pod in (a, b, c, *busy):
        node_lab.add(pod)
    assert b.ip and c.ip
    with node_lab.api as api:
        # A long pass runs; what follows is committed during it, read by the next.
        api.post("/v1/objects/apply", {"objects": [busy_policy(ports=_BUSY_PORTS)]})
        api.post(
            "/v1/objects/apply",
            {"objects": [pod_object(b, app="moved"), deny_ingress("deny-c", app="c")]},
        )
    with disk_full(state_dir):
        settle(node_lab, timeout=60)
        status = node_lab.get("/v1/policy")
        assert endpoint(node_lab, b)["labels"]["k8s:app"] == "b", status
        assert endpoint(node_lab, c)["policy"]["ingress_enforced"], status
        assert not node_lab.ping(a, c.ip), status
        error = str(status["last_error"])
        assert "default/b" in error and "full" in error, status
    apply(node_lab, pod_object(a, app="a", again="yes"))  # a change: the loop passes
    assert endpoint(node_lab, b)["labels"]["k8s:app"] == "moved"
    assert node_lab.get("/v1/policy")["last_error"] is None
    for pod in (a, b, c, *busy):
        node_lab.cni(pod, "DEL")
