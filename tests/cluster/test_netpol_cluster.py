"""The Kubernetes e2e NetworkPolicy model across a 3-node cluster lab: the nine pods
spread over the nodes (every namespace on every node), the objects in etcd (applied
through one agent's API, read by all), each agent enforcing for its own pods with the
peers' identities from the ipcache. Includes upstream's label-change cases and an
etcd restart in the middle."""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from rich.console import Console

from ciliate.control.agent.client import AgentClient
from ciliate.control.lab import lab
from tests.policy.datapath_runner import Cluster, ModelPods, observer, pod_objects
from tests.policy.model import PODS, Case, check_case, default_pod_ips, upstream_cases

CASE_NAMES = [c.name for c in upstream_cases(default_pod_ips()) if "SCTP" not in c.protocols]
LABEL_CHANGE_CASES = [
    c.name
    for c in upstream_cases(default_pod_ips())
    if any(s.pod_labels or s.namespace_labels for s in c.stages) and "SCTP" not in c.protocols
]


def _calm(call: Any) -> Any:
    """An agent API call, retried while etcd comes back (the cluster calls answer
    500 meanwhile)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return call()
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture(scope="module")
def cluster_model(bpf_objects: str) -> Iterator[tuple[lab.LabState, ModelPods, Any]]:
    name = f"t{secrets.token_hex(3)}"
    try:
        state = lab.create_cluster(name=name, nodes=3, console=Console(quiet=True))
        clients = [AgentClient(node.socket) for node in state.nodes]
        pods = {}
        for i, ref in enumerate(PODS):
            namespace, pod_name = ref.split("/")
            node = state.nodes[i % 3]
            pod = lab.add_pod_netns(state, node, pod_name, namespace=namespace)
            result = lab.cni_call(state, node, pod, "ADD")
            pod.ip = result["ips"][0]["address"].split("/")[0]
            pods[ref] = pod
        state.save()
        model_pods = ModelPods(pods)

        def apply(objects: Sequence[dict[str, Any]]) -> None:
            _calm(lambda: clients[0].post("/v1/objects/apply", {"objects": list(objects)}))

        def delete(objects: Sequence[dict[str, Any]]) -> None:
            body = {"objects": list(objects), "ignore_missing": True}
            _calm(lambda: clients[0].post("/v1/objects/delete", body))

        def settled() -> bool:
            """Every agent's policy loop has caught up, and every agent's ipcache
            holds every pod's current identity (a relabelled pod's new identity
            reaches the other nodes through their etcd watches)."""
            try:
                if not all(c.get("/v1/policy")["pending"] is False for c in clients):
                    return False
                identities = {
                    f"{e['ip']}/32": e["identity"] for c in clients for e in c.get("/v1/endpoints")
                }
                for client in clients:
                    ipcache = {e["prefix"]: e["identity"] for e in client.get("/v1/bpf/ipcache")}
                    if any(ipcache.get(p) != i for p, i in identities.items()):
                        return False
            except RuntimeError:  # etcd coming back: the cluster calls answer 500
                return False
            return True

        apply(pod_objects(model_pods.ips))
        model_pods.start()
        try:
            yield state, model_pods, observer(model_pods, Cluster(apply, delete, settled))
        finally:
            model_pods.close()
            for client in clients:
                client.close()
    finally:
        lab.down(name=name, console=Console(quiet=True))


def _case(pods: ModelPods, name: str) -> Case:
    return next(c for c in upstream_cases(pods.ips) if c.name == name)


def test_the_pods_are_spread_over_three_nodes(
    cluster_model: tuple[lab.LabState, ModelPods, Any],
) -> None:
    _, pods, _ = cluster_model
    assert len({pod.node for pod in pods.pods.values()}) == 3
    for namespace in ("x", "y", "z"):
        assert len({p.node for ref, p in pods.pods.items() if ref.startswith(namespace)}) == 3


@pytest.mark.parametrize("name", CASE_NAMES)
def test_upstream_case_across_nodes(
    cluster_model: tuple[lab.LabState, ModelPods, Any], name: str
) -> None:
    _, pods, observe = cluster_model
    observe.reset()
    failures = check_case(_case(pods, name), observe)
    assert not failures, f"{name}:\n" + "\n\n".join(failures)


def test_policy_holds_across_an_etcd_restart_and_follows_changes_after_it(
    cluster_model: tuple[lab.LabState, ModelPods, Any],
) -> None:
    state, pods, observe = cluster_model
    assert state.fabric_pid is not None and LABEL_CHANGE_CASES
    case = _case(pods, LABEL_CHANGE_CASES[0])
    observe.reset()
    stage = case.stages[0]
    probe = stage.probes[0]
    before = observe(stage, probe)
    assert not probe.reachability.mismatches(before)
    os.kill(state.fabric_pid, signal.SIGHUP)  # the fabric restarts etcd
    # While etcd is away, and after: the policy in force keeps being enforced.
    during = pods.probe(probe.protocol, probe.port)
    assert not probe.reachability.mismatches(during)
    # And the next changes (this case's label changes among them) apply once it is back.
    failures = check_case(case, observe)
    assert not failures, "\n\n".join(failures)
