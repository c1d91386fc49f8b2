"""Labels as an unlucky operator changes them, on a real node: a Pod relabelled
many times in a row, a Namespace deleted with pods still running in it. The
identities taken are given back and the policy at the end is what the last
labels say."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any

from ciliate.control.lab import lab
from ciliate.loader import enter_netns

from .conftest import NodeLab
from .test_policy import apply, delete, pod_object, settle

_FLAPS = 20


def identities(node_lab: NodeLab) -> dict[int, dict[str, str]]:
    """The node's allocated (non-reserved) identities: id -> labels."""
    return {i["id"]: i["labels"] for i in node_lab.get("/v1/identities") if not i["reserved"]}


def admit_from(name: str, *, selector: dict[str, str], peer: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": selector}, "ingress": [{"from": [peer]}]},
    }


def test_a_pod_relabelled_twenty_times_in_a_row_leaks_no_identity_and_ends_as_labelled(
    node_lab: NodeLab,
) -> None:
    """The server admits pods labelled allowed=yes. The client's Pod is applied 20
    times with no pause, each time with labels no pod had (a new identity each), the
    last ones its first: once the loop has caught up, the identities are those of
    before, and the client is admitted; relabelled allowed=no, it is refused."""
    server, client = node_lab.pod(), node_lab.pod()
    policy = admit_from(
        "admit-allowed",
        selector={"app": "flap-server"},
        peer={"podSelector": {"matchLabels": {"allowed": "yes"}}},
    )
    apply(
        node_lab,
        pod_object(server, app="flap-server"),
        pod_object(client, app="flapper", allowed="yes"),
        policy,
    )
    node_lab.add(server)
    node_lab.add(client)
    assert server.ip
    try:
        settle(node_lab)
        before = identities(node_lab)
        assert node_lab.ping(client, server.ip)
        with node_lab.api as api:
            for i in range(_FLAPS):
                allowed = "no" if i % 2 == 0 else "yes"
                labels = {"app": "flapper", "allowed": allowed, "round": str(i)}
                api.post("/v1/objects/apply", {"objects": [pod_object(client, **labels)]})
            api.post(
                "/v1/objects/apply",
                {"objects": [pod_object(client, app="flapper", allowed="yes")]},
            )
        settle(node_lab)
        assert sorted(identities(node_lab).values(), key=str) == sorted(before.values(), key=str)
        assert node_lab.ping(client, server.ip)
        apply(node_lab, pod_object(client, app="flapper", allowed="no"))
        assert not node_lab.ping(client, server.ip)
    finally:
        for pod in (server, client):
            node_lab.cni(pod, "DEL")
        delete(node_lab, policy, pod_object(server), pod_object(client))


def _namespace(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def test_a_namespace_deleted_with_pods_running_in_it_takes_its_policies_and_labels_along(
    node_lab: NodeLab,
) -> None:
    """Namespace ``doomed`` (team=blue) holds a server isolated by a policy of its
    own (admitting only pods of blue namespaces) and a member the default server
    admits for being blue. The Namespace is deleted while both pods run (their CNI
    DEL comes later, as kubelet's does after the grace period): its objects go with
    it, so the member is no longer blue (refused by the default server) and the
    doomed server no longer isolated. Recreated red with the same pods, the member
    stays refused; after the DELs no identity is left behind."""
    home = node_lab.pod()
    doomed_server = lab.add_pod_netns(node_lab.state, node_lab.node, "ds", namespace="doomed")
    member = lab.add_pod_netns(node_lab.state, node_lab.node, "dm", namespace="doomed")
    outsider = node_lab.pod()
    from_blue = {"namespaceSelector": {"matchLabels": {"team": "blue"}}}
    home_policy = admit_from("home-from-blue", selector={"app": "home"}, peer=from_blue)
    doomed_policy = admit_from("own-from-blue", selector={"app": "ds"}, peer=from_blue)
    doomed_policy["metadata"]["namespace"] = "doomed"

    def in_doomed(pod: lab.PodState, **labels: str) -> dict[str, Any]:
        obj = pod_object(pod, **labels)
        obj["metadata"]["namespace"] = "doomed"
        return obj

    apply(node_lab, pod_object(home, app="home"), pod_object(outsider, app="outsider"), home_policy)
    apply(
        node_lab,
        _namespace("doomed", team="blue"),
        in_doomed(doomed_server, app="ds"),
        in_doomed(member, app="dm"),
        doomed_policy,
    )
    pods = (home, doomed_server, member, outsider)
    before = identities(node_lab)
    for pod in pods:
        node_lab.add(pod)
    assert home.ip and doomed_server.ip
    try:
        settle(node_lab)
        assert node_lab.ping(member, home.ip)
        assert not node_lab.ping(outsider, doomed_server.ip)
        delete(node_lab, _namespace("doomed"))
        assert node_lab.get("/v1/policy")["last_error"] is None
        assert not node_lab.ping(member, home.ip)
        assert node_lab.ping(outsider, doomed_server.ip)
        apply(node_lab, _namespace("doomed", team="red"))
        apply(node_lab, in_doomed(doomed_server, app="ds"), in_doomed(member, app="dm"))
        assert not node_lab.ping(member, home.ip)
        assert node_lab.ping(outsider, doomed_server.ip)
    finally:
        for pod in pods:
            node_lab.cni(pod, "DEL")
        delete(node_lab, home_policy, pod_object(home), pod_object(outsider), _namespace("doomed"))
    assert identities(node_lab) == before


def policy_drops(node_lab: NodeLab) -> int:
    return sum(
        m["packets"] for m in node_lab.get("/v1/bpf/metrics") if m["description"] == "policy denied"
    )


def test_a_pod_relabelled_within_what_a_policy_admits_loses_no_packet(
    node_lab: NodeLab,
) -> None:
    """The server admits app=steady pods, whatever their other labels. The client
    gets a new label eight times (a new identity each time) while it sends the
    server a datagram every millisecond: the server's policy must know each new
    identity before the client's packets carry it (else they are dropped until the
    loop's pass has written the server's policy), so policy drops none."""
    server, client = node_lab.pod(), node_lab.pod()
    policy = admit_from(
        "admit-steady",
        selector={"app": "steady-server"},
        peer={"podSelector": {"matchLabels": {"app": "steady"}}},
    )
    apply(
        node_lab,
        pod_object(server, app="steady-server"),
        pod_object(client, app="steady", round="start"),
        policy,
    )
    node_lab.add(server)
    node_lab.add(client)
    assert server.ip
    stop = threading.Event()

    def keep_sending() -> None:
        with enter_netns(f"/run/netns/{client.netns}"):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            while not stop.is_set():
                with contextlib.suppress(OSError):  # the server's port unreachable
                    sock.sendto(b"steady", (str(server.ip), 9))
                time.sleep(0.001)

    sender = threading.Thread(target=keep_sending)
    try:
        before = policy_drops(node_lab)
        sender.start()
        for i in range(8):
            apply(node_lab, pod_object(client, app="steady", round=str(i)))
            time.sleep(0.05)
        stop.set()
        sender.join()
        assert policy_drops(node_lab) == before
    finally:
        stop.set()
        if sender.is_alive():
            sender.join()
        for pod in (server, client):
            node_lab.cni(pod, "DEL")
        delete(node_lab, policy, pod_object(server), pod_object(client))


def test_the_identity_of_a_deleted_pod_leaves_the_policies_that_named_it(
    node_lab: NodeLab,
) -> None:
    """The server admits app=ghost. The only app=ghost pod is deleted (its Pod object
    stays, as when a runtime removes a pod before the API does): its identity is
    released, and the server's policy keeps no entry for it (an id freed may be
    given to other labels later). A new app=ghost pod is admitted again."""
    server, ghost = node_lab.pod(), node_lab.pod()
    policy = admit_from(
        "admit-ghost",
        selector={"app": "ghost-server"},
        peer={"podSelector": {"matchLabels": {"app": "ghost"}}},
    )
    apply(node_lab, pod_object(server, app="ghost-server"), pod_object(ghost, app="ghost"), policy)
    node_lab.add(server)
    node_lab.add(ghost)
    assert server.ip
    ids = {e["ip"]: e for e in node_lab.get("/v1/endpoints")}
    server_id, ghost_identity = ids[server.ip]["endpoint_id"], ids[ghost.ip]["identity"]
    try:
        settle(node_lab)
        entries = node_lab.get(f"/v1/bpf/policy/{server_id}")["entries"]
        assert any(e["identity"] == ghost_identity for e in entries), entries
        node_lab.cni(ghost, "DEL")
        settle(node_lab)
        assert ghost_identity not in identities(node_lab)
        entries = node_lab.get(f"/v1/bpf/policy/{server_id}")["entries"]
        assert all(e["identity"] != ghost_identity for e in entries), entries
        node_lab.add(ghost)
        assert node_lab.ping(ghost, server.ip)
    finally:
        for pod in (server, ghost):
            node_lab.cni(pod, "DEL")
        delete(node_lab, policy, pod_object(server), pod_object(ghost))
