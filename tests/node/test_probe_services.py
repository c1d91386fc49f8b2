"""Services probed as an unlucky operator meets them, on a real node: ClientIP
affinity to a pod that has left the Service but still backs another one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ciliate.control.lab import lab
from ciliate.loader import cgroup2_root

from .conftest import NodeLab
from .test_policy import apply, delete, pod_object
from .test_services import cluster_ip, service, settle_services, tcp_ask, whoami

pytestmark = pytest.mark.skipif(cgroup2_root() is None, reason="no cgroup v2 hierarchy mounted")


@pytest.fixture
def shared(node_lab: NodeLab) -> Iterator[dict[str, lab.PodState]]:
    """Two web pods that back both Service ``sticky`` (app=web) and ``all``
    (role=shared), and a client."""
    pods = {name: node_lab.pod() for name in ("client", "web1", "web2")}
    apply(
        node_lab,
        pod_object(pods["client"], app="client"),
        pod_object(pods["web1"], app="web", role="shared"),
        pod_object(pods["web2"], app="web", role="shared"),
    )
    for pod in pods.values():
        node_lab.add(pod)
    with whoami(pods["web1"]), whoami(pods["web2"]):
        yield pods
    for pod in pods.values():
        node_lab.cni(pod, "DEL")
    delete(node_lab, *(pod_object(pod) for pod in pods.values()))


def test_client_ip_affinity_ends_when_the_backend_leaves_the_service(
    node_lab: NodeLab, shared: dict[str, lab.PodState]
) -> None:
    """The client sticks to one backend of ``sticky``; that pod's labels change so
    it leaves ``sticky`` while still backing ``all`` (its backend stays in the maps,
    active). The client's next connections to ``sticky`` must go to the backend the
    Service has now, as kube-proxy's affinity (per endpoint chain) and Cilium's
    (the affinity match map) do, not to the pod that left for the rest of the
    three-hour timeout."""
    sticky = service("sticky", sessionAffinity="ClientIP")
    everyone = service("all", selector={"role": "shared"})
    apply(node_lab, sticky, everyone)
    try:
        settle_services(node_lab)
        vip = cluster_ip(node_lab, "sticky")
        kept = {tcp_ask(shared["client"], vip, 80)[0] for _ in range(5)}
        assert len(kept) == 1
        leaver = next(p for p in ("web1", "web2") if str(shared[p].ip) in kept)
        stayer = "web2" if leaver == "web1" else "web1"
        apply(node_lab, pod_object(shared[leaver], app="retired", role="shared"))
        settle_services(node_lab)
        answers = {tcp_ask(shared["client"], vip, 80)[0] for _ in range(5)}
        assert answers == {str(shared[stayer].ip)}
        # Still a backend of `all`: the pod itself is up and reachable there.
        all_vip = cluster_ip(node_lab, "all")
        assert str(shared[leaver].ip) in {
            tcp_ask(shared["client"], all_vip, 80)[0] for _ in range(30)
        }
    finally:
        delete(node_lab, sticky, everyone)
