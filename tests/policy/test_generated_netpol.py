"""Generated NetworkPolicy cases (tests/policy/generated_cases.py, cyclonus-style) on
the e2e model: for every case, every ordered pod pair, TCP, UDP and SCTP on 80 and 81, plus
ingress from and egress to addresses that are not pods (this node, another node,
addresses outside the cluster and inside the pod CIDR but unused), the policy engine
and the datapath's decision (the evaluator) must agree with an independent reading of
the Kubernetes API reference (tests/policy/k8s_reference.py). And ``policy trace``
must name a rule that does allow the connection, or, for a default deny, exactly the
policies that isolate the pod."""

from __future__ import annotations

import copy

import pytest

from .engine_runner import observe_with_engine
from .generated_cases import GeneratedCase, datapath_sample, generated_cases, random_walk
from .k8s_reference import Reference
from .model import check_case, default_pod_ips
from .reference_check import Checker

IPS = default_pod_ips()
CASES = generated_cases()
# SCTP too: no pod serves it, but the policies name it and the decision is defined.
PROBES = [(protocol, port) for protocol in ("TCP", "UDP", "SCTP") for port in (80, 81)]


def checker(case: GeneratedCase) -> Checker:
    objects = case.stage.objects(IPS)
    return Checker(objects, Reference(objects))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_generated_case_agrees_with_the_reference(case: GeneratedCase) -> None:
    problems = checker(case).run(PROBES)
    policies = "\n".join(str(p) for p in case.stage.policies)
    assert not problems, f"{case.name}\n{policies}\n" + "\n".join(problems[:20])


def test_the_generated_set_is_large_and_distinct() -> None:
    assert len(CASES) >= 500
    assert len({c.name for c in CASES}) == len(CASES)


def test_the_reference_sees_a_wrong_answer() -> None:
    # The checker would catch an engine that ignores ports: a policy allowing TCP 80
    # only, checked against a reference told the policy allows every port.
    case = next(c for c in CASES if c.name == "ingress: port TCP 81")
    objects = case.stage.objects(IPS)
    told = Reference(copy.deepcopy(objects))
    told.policies[0]["spec"]["ingress"][0].pop("ports")
    problems = Checker(objects, told).run([("TCP", 80)])
    assert problems
    assert all("engine denies, the reference allows" in p or "trace" in p for p in problems)


@pytest.mark.parametrize("case", datapath_sample(), ids=lambda c: c.name)
def test_the_datapath_samples_truth_tables_hold_through_the_engine(case: GeneratedCase) -> None:
    # The tables tests/node/test_netpol_e2e.py checks the real datapath against.
    assert not check_case(case.expected(IPS), observe_with_engine(IPS))


@pytest.mark.parametrize("case", random_walk(12), ids=lambda c: c.name)
def test_the_random_walks_states_agree_with_the_reference(case: GeneratedCase) -> None:
    # The states tests/node/test_netpol_e2e.py puts in force one after the other.
    problems = checker(case).run(PROBES)
    assert not problems, f"{case.name}\n" + "\n".join(problems[:20])
