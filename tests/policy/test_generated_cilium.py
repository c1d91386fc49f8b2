"""Generated Cilium policy cases (tests/policy/generated_cilium.py) on the e2e model,
alone and mixed with generated NetworkPolicies:
the policy engine and the datapath's decision (the evaluator) against an independent
reading of Cilium's L3/L4 semantics (tests/policy/cilium_reference.py), every ordered
pod pair and every pod against this node, another node and outside addresses, TCP,
UDP and SCTP on 80 and 81; ``policy trace`` naming the deny or allow section that
decided, or exactly the rules that enforce a default deny."""

from __future__ import annotations

import pytest

from .cilium_reference import CiliumReference
from .engine_runner import observe_with_engine
from .generated_cases import GeneratedCase
from .generated_cilium import datapath_sample, generated_cilium_cases, mixed_sets
from .k8s_reference import Reference
from .model import check_case, default_pod_ips
from .reference_check import Checker, Combined

IPS = default_pod_ips()
CASES = generated_cilium_cases()
PROBES = [(protocol, port) for protocol in ("TCP", "UDP", "SCTP") for port in (80, 81)]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_generated_cilium_case_agrees_with_the_reference(case: GeneratedCase) -> None:
    objects = case.stage.objects(IPS)
    problems = Checker(objects, CiliumReference(objects)).run(PROBES)
    policies = "\n".join(str(p) for p in case.stage.policies)
    assert not problems, f"{case.name}\n{policies}\n" + "\n".join(problems[:20])


MIXED = list(mixed_sets(100))


@pytest.mark.parametrize("case", MIXED, ids=[c.name for c in MIXED])
def test_kubernetes_and_cilium_policies_together_agree_with_both_references(
    case: GeneratedCase,
) -> None:
    objects = case.stage.objects(IPS)
    judge = Combined(Reference(objects), CiliumReference(objects))
    problems = Checker(objects, judge).run(PROBES)
    policies = "\n".join(str(p) for p in case.stage.policies)
    assert not problems, f"{case.name}\n{policies}\n" + "\n".join(problems[:20])


def test_the_generated_cilium_set_is_large_and_distinct() -> None:
    assert len(CASES) >= 500
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", datapath_sample(), ids=lambda c: c.name)
def test_the_datapath_samples_truth_tables_hold_through_the_engine(case: GeneratedCase) -> None:
    # The tables tests/node/test_netpol_e2e.py checks the real datapath against.
    expected = case.expected(IPS, judge=CiliumReference)
    assert not check_case(expected, observe_with_engine(IPS))
