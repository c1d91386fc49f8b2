"""The Kubernetes e2e NetworkPolicy model (namespaces x, y, z; pods a, b, c; TCP and
UDP on 80 and 81; every ordered pair probed) with the upstream cases' policies and
truth tables, through the real datapath of one node: real pods, the agent's policy
loop, the BPF programs deciding. The same cases run through the engine alone in
tests/policy and across three nodes in tests/cluster; so does a sample of the
generated cases (tests/policy/generated_cases.py), whose tables come from the
reference evaluator. So do the earlier upstream spellings of the cases and the
runtime changes cyclonus makes (tests/policy/upstream_variants.py): pods and a
namespace created and deleted mid-case, labels set and removed, policies updated
and deleted. Every case that changes something at runtime is probed on TCP and UDP,
80 and 81, in every stage."""

from __future__ import annotations

import secrets
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import pytest
from rich.console import Console

from ciliate.control.agent.client import AgentClient
from ciliate.control.lab import lab
from ciliate.loader import cgroup2_root
from tests.policy import generated_cilium
from tests.policy.cilium_reference import CiliumReference
from tests.policy.datapath_runner import (
    Cluster,
    ModelPods,
    model_services,
    observer,
    pod_objects,
)
from tests.policy.generated_cases import DATAPATH_SAMPLE, datapath_sample, random_walk
from tests.policy.model import PODS, Case, check_case, default_pod_ips, upstream_cases
from tests.policy.upstream_variants import (
    action_cases,
    historical_cases,
    identity_sharing_cases,
    with_every_probe,
)

# The SCTP context needs SCTP sockets in the pods; this kernel's datapath handles
# SCTP ports like TCP's, but the e2e pods here serve TCP and UDP only.
CASE_NAMES = [c.name for c in upstream_cases(default_pod_ips()) if "SCTP" not in c.protocols]
HISTORICAL_NAMES = [
    c.name for c in historical_cases(default_pod_ips()) if "SCTP" not in c.protocols
]
ACTION_NAMES = [c.name for c in action_cases()]


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

        def add_pod(ref: str) -> lab.PodState:
            namespace, pod_name = ref.split("/")
            pod = lab.add_pod_netns(state, node, pod_name, namespace=namespace)
            result = lab.cni_call(state, node, pod, "ADD")
            pod.ip = result["ips"][0]["address"].split("/")[0]
            state.save()
            return pod

        def remove_pod(pod: lab.PodState) -> None:
            lab.cni_call(state, node, pod, "DEL")
            subprocess.run(["ip", "netns", "del", pod.netns], check=True)
            state.pods.remove(pod)
            state.save()

        cluster = Cluster(
            apply=apply,
            delete=delete,
            settled=settled,
            add_pod=add_pod,
            remove_pod=remove_pod,
            get=client.get,
        )
        apply(pod_objects(model_pods.ips))
        model_pods.start()
        try:
            yield model_pods, observer(model_pods, cluster)
        finally:
            model_pods.close()
            client.close()
    finally:
        lab.down(name=name, console=Console(quiet=True))


def _probed(case: Case, pods: ModelPods) -> Case:
    """A case that changes something at runtime is probed on both protocols and both
    ports in every stage (the tables upstream has no probe for from the reference
    reading); the others with upstream's probes."""
    if len(case.stages) == 1:
        return case
    ips = {**default_pod_ips([r for s in case.stages for r in s.extra_pods]), **pods.ips}
    return with_every_probe(case, ips)


def _case(pods: ModelPods, name: str) -> Case:
    return _probed(next(c for c in upstream_cases(pods.ips) if c.name == name), pods)


@pytest.mark.parametrize("name", CASE_NAMES, ids=CASE_NAMES)
def test_upstream_case_through_the_datapath(model: tuple[ModelPods, Any], name: str) -> None:
    pods, observe = model
    observe.reset()
    failures = check_case(_case(pods, name), observe)
    assert not failures, f"{name}:\n" + "\n\n".join(failures)


@pytest.mark.parametrize("name", HISTORICAL_NAMES, ids=HISTORICAL_NAMES)
def test_earlier_upstream_spelling_through_the_datapath(
    model: tuple[ModelPods, Any], name: str
) -> None:
    pods, observe = model
    observe.reset()
    case = next(c for c in historical_cases(pods.ips) if c.name == name)
    failures = check_case(_probed(case, pods), observe)
    assert not failures, f"{name}:\n" + "\n\n".join(failures)


@pytest.mark.parametrize("name", ACTION_NAMES, ids=ACTION_NAMES)
def test_action_case_through_the_datapath(model: tuple[ModelPods, Any], name: str) -> None:
    # Pods and a namespace created (CNI ADD) and deleted (CNI DEL) between stages,
    # labels set and removed, policies updated and deleted; every stage on TCP and
    # UDP, 80 and 81, the tables from the reference reading for the real addresses.
    pods, observe = model
    observe.reset()
    case = next(c for c in action_cases() if c.name == name)
    stages = [replace(stage, probes=[]) for stage in case.stages]
    failures = check_case(_probed(Case(name, stages), pods), observe)
    assert not failures, f"{name}:\n" + "\n\n".join(failures)
    # The pods the case added and then deleted are gone (CNI DEL).
    assert set(pods.pods) == set(PODS) | set(case.stages[-1].extra_pods)


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


@pytest.mark.parametrize("name", [c.name for c in identity_sharing_cases(default_pod_ips())])
def test_pods_sharing_an_identity_through_the_datapath(
    model: tuple[ModelPods, Any], name: str
) -> None:
    # x/twin is created with x/b's labels (CNI ADD) and deleted (CNI DEL) mid-case;
    # every stage carries its own tables on both protocols and ports.
    pods, observe = model
    observe.reset()
    case = next(c for c in identity_sharing_cases(pods.ips) if c.name == name)
    failures = check_case(case, observe)
    assert not failures, f"{name}:\n" + "\n\n".join(failures)


@pytest.fixture(scope="module")
def cluster_ips(model: tuple[ModelPods, Any]) -> Iterator[dict[str, str]]:
    """Each pod's Service (as upstream creates them), its ClusterIP by pod."""
    _, observe = model
    cluster = observe.cluster
    services = model_services()
    cluster.apply(services)
    try:
        deadline = time.monotonic() + 20
        while cluster.get("/v1/services/status")["pending"] is not False:
            assert time.monotonic() < deadline, "the service loop did not catch up"
            time.sleep(0.02)
        yield {
            f"{svc['metadata']['namespace']}/{svc['metadata']['name'].split('-')[-1]}": str(
                cluster.get(
                    f"/v1/objects/services/{svc['metadata']['name']}"
                    f"?namespace={svc['metadata']['namespace']}"
                )["spec"]["clusterIP"]
            )
            for svc in services
        }
    finally:
        cluster.delete(services)


@pytest.mark.skipif(cgroup2_root() is None, reason="no cgroup v2 hierarchy: no socket LB")
@pytest.mark.parametrize("name", CASE_NAMES, ids=CASE_NAMES)
def test_upstream_case_through_each_pods_service(
    model: tuple[ModelPods, Any], cluster_ips: dict[str, str], name: str
) -> None:
    # As upstream probes today: to each pod's Service ClusterIP (the socket load
    # balancer turns it into the pod's address); the policy applies to the backend.
    pods, observe = model
    observe.reset()
    pods.targets = dict(cluster_ips)
    try:
        case = next(c for c in upstream_cases(pods.ips) if c.name == name)
        failures = check_case(case, observe)
    finally:
        pods.targets = {}
    assert not failures, f"{name} (through Services):\n" + "\n\n".join(failures)


def test_a_random_walk_of_states_is_enforced_from_wherever_the_last_left_off(
    model: tuple[ModelPods, Any],
) -> None:
    # Twelve random states (policy sets, pods relabelled, namespace labels added) put
    # in force one after the other with no reset between, each probed on TCP and UDP,
    # 80 and 81 against the reference reading: what the agent keeps from one pass to
    # the next (identities, the ipcache, policy entries) never shows.
    pods, observe = model
    observe.reset()
    for state in random_walk(12):
        failures = check_case(state.expected(pods.ips), observe)
        policies = "\n".join(str(p) for p in state.stage.policies)
        assert not failures, f"{state.name}\n{policies}\n" + "\n\n".join(failures)
