"""The Kubernetes e2e NetworkPolicy model (namespaces x, y, z; pods a, b, c; TCP and
UDP on 80 and 81; every ordered pair probed) with the upstream cases' policies and
truth tables, through the real datapath of one node: real pods, the agent's policy
loop, the BPF programs deciding. The same cases run through the engine alone in
tests/policy and across three nodes in tests/cluster; so does a sample of the
generated cases (tests/policy/generated_cases.py), whose tables come from the
reference evaluator."""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from rich.console import Console

from ciliate.control.agent.client import AgentClient
from ciliate.control.lab import lab
from tests.policy import generated_cilium
from tests.policy.cilium_reference import CiliumReference
from tests.policy.datapath_runner import Cluster, ModelPods, observer, pod_objects
from tests.policy.generated_cases import DATAPATH_SAMPLE, datapath_sample
from tests.policy.model import PODS, Case, check_case, default_pod_ips, upstream_cases

# The SCTP context needs SCTP sockets in the pods; this kernel's datapath handles
# SCTP ports like TCP's, but the e2e pods here serve TCP and UDP only.
CASE_NAMES = [c.name for c in upstream_cases(default_pod_ips()) if "SCTP" not in c.protocols]


@pytest.fixture(scope="module")
def model(bpf_objects: str) -> Iterator[tuple[ModelPods, Any]]:
    name = f"t{secrets.token_hex(3)}"
    try:
        state, node = lab.create(name=name)
        client = AgentClient(node.socket)
        pods = {}
        for ref in PODS:
            namespace, pod_name = ref.split("/")
            pods[ref] = lab.add_pod_netns(state, node, pod_name, namespace=namespace)
        # The objects first for some pods, after the ADD for others: the endpoint
        # finds its Pod object either way.
        client.post("/v1/objects/apply", {"objects": pod_objects({})[:6]})
        for pod in pods.values():
            result = lab.cni_call(state, node, pod, "ADD")
            pod.ip = result["ips"][0]["address"].split("/")[0]
        model_pods = ModelPods(pods)

        def apply(objects: Sequence[dict[str, Any]]) -> None:
            client.post("/v1/objects/apply", {"objects": list(objects)})

        def delete(objects: Sequence[dict[str, Any]]) -> None:
            client.post("/v1/objects/delete", {"objects": list(objects), "ignore_missing": True})

        def settled() -> bool:
            return client.get("/v1/policy")["pending"] is False

        cluster = Cluster(apply=apply, delete=delete, settled=settled)
        apply(pod_objects(model_pods.ips))
        model_pods.start()
        try:
            yield model_pods, observer(model_pods, cluster)
        finally:
            model_pods.close()
            client.close()
    finally:
        lab.down(name=name, console=Console(quiet=True))


def _case(pods: ModelPods, name: str) -> Case:
    return next(c for c in upstream_cases(pods.ips) if c.name == name)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_upstream_case_through_the_datapath(model: tuple[ModelPods, Any], name: str) -> None:
    pods, observe = model
    observe.reset()
    failures = check_case(_case(pods, name), observe)
    assert not failures, f"{name}:\n" + "\n\n".join(failures)


def test_without_policy_every_pod_reaches_every_pod(model: tuple[ModelPods, Any]) -> None:
    pods, observe = model
    observe.reset()
    for protocol in ("TCP", "UDP"):
        observed = pods.probe(protocol, 80)
        assert all(observed[(s, d)] for s in PODS for d in PODS if s != d)


@pytest.mark.parametrize("name", DATAPATH_SAMPLE)
def test_generated_case_through_the_datapath(model: tuple[ModelPods, Any], name: str) -> None:
    # A sample of the generated (cyclonus-style) cases, truth tables from the
    # reference evaluator of tests/policy/k8s_reference.py, on the real pods.
    pods, observe = model
    observe.reset()
    case = next(c for c in datapath_sample() if c.name == name).expected(pods.ips)
    failures = check_case(case, observe)
    assert not failures, f"{name}:\n" + "\n\n".join(failures)


@pytest.mark.parametrize("name", generated_cilium.DATAPATH_SAMPLE)
def test_generated_cilium_case_through_the_datapath(
    model: tuple[ModelPods, Any], name: str
) -> None:
    # Generated Cilium cases on the same pods, tables from the Cilium reference
    # evaluator (tests/policy/cilium_reference.py).
    pods, observe = model
    observe.reset()
    generated = next(c for c in generated_cilium.datapath_sample() if c.name == name)
    case = generated.expected(pods.ips, judge=CiliumReference)
    failures = check_case(case, observe)
    assert not failures, f"{name}:\n" + "\n\n".join(failures)
