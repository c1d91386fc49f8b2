"""The upstream Kubernetes e2e NetworkPolicy cases (x, y, z; a, b, c; TCP and UDP on
80 and 81; every ordered pair) hold through the policy engine and the reference
evaluator: the same truth tables as upstream, stage by stage."""

from __future__ import annotations

import pytest

from .engine_runner import observe_with_engine
from .model import (
    PODS,
    Case,
    Probe,
    R,
    Stage,
    check_case,
    default_pod_ips,
    netpol,
    upstream_cases,
)
from .upstream_variants import (
    action_cases,
    historical_cases,
    identity_sharing_cases,
    reference_table,
    with_every_probe,
)

IPS = default_pod_ips()
CASES = upstream_cases(IPS)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_upstream_case_holds(case: Case) -> None:
    failures = check_case(case, observe_with_engine(IPS))
    assert not failures, "\n\n".join(failures)


def test_the_model_is_the_upstream_one() -> None:
    assert len(PODS) == 9
    assert len(CASES) == 48  # 42 in the TCP context, 3 UDP, 3 SCTP
    assert len({c.name for c in CASES}) == len(CASES)


def test_a_wrong_expectation_is_caught() -> None:
    # The checker compares every pair: flip one cell of a passing case and it fails.
    case = CASES[0]
    stage = case.stages[0]
    wrong = stage.probes[0].reachability
    original = wrong.expected[("y/a", "x/a")]
    wrong.expect("y/a", "x/a", not original)
    try:
        failures = check_case(case, observe_with_engine(IPS))
    finally:
        wrong.expect("y/a", "x/a", original)
    assert len(failures) == 1 and "*" in failures[0]


def test_end_port_ranges_cover_both_ports() -> None:
    # Not an upstream case (their endPort tests need a feature gate): 80-81 opens both.
    policy = netpol("range", "x", {}, ingress=[{"ports": [{"port": 80, "endPort": 81}]}])
    narrow = netpol("narrow", "y", {}, ingress=[{"ports": [{"port": 79, "endPort": 80}]}])
    case = Case(
        "ciliate: endPort",
        [
            Stage(
                [policy, narrow],
                [
                    Probe(80, "TCP", R()),
                    Probe(81, "TCP", R().expect_peer(dst_ns="y", connected=False)),
                    Probe(
                        81,
                        "UDP",
                        R()
                        .expect_peer(dst_ns="x", connected=False)
                        .expect_peer(dst_ns="y", connected=False),
                    ),
                ],
            )
        ],
    )
    assert not check_case(case, observe_with_engine(IPS))


# -- beyond today's file: earlier versions' spellings, runtime changes undone, actions --

HISTORICAL = historical_cases(IPS)
ACTIONS = action_cases()


@pytest.mark.parametrize("case", HISTORICAL, ids=[c.name for c in HISTORICAL])
def test_earlier_upstream_spelling_holds(case: Case) -> None:
    failures = check_case(case, observe_with_engine(IPS))
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize("case", ACTIONS, ids=[c.name for c in ACTIONS])
def test_action_case_holds(case: Case) -> None:
    failures = check_case(case, observe_with_engine(IPS))
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize("case", CASES + HISTORICAL, ids=[c.name for c in CASES + HISTORICAL])
def test_the_reference_reading_gives_upstreams_tables(case: Case) -> None:
    # The probes upstream does not make (the real node makes them) take their tables
    # from the reference reading: for the probes upstream does make, it must give
    # upstream's own tables.
    for number, stage in enumerate(case.stages, start=1):
        for probe in stage.probes:
            table = reference_table(stage, IPS, protocol=probe.protocol, port=probe.port)
            wrong = probe.reachability.mismatches(table.expected)
            assert not wrong, f"stage {number}, {probe.protocol}/{probe.port}: {wrong}"


def test_every_stage_is_probed_on_both_protocols_and_ports() -> None:
    case = with_every_probe(CASES[0], IPS)
    probes = {(p.protocol, p.port) for stage in case.stages for p in stage.probes}
    assert probes == {(protocol, port) for protocol in ("TCP", "UDP") for port in (80, 81)}
    assert case.stages[0].probes[0] is CASES[0].stages[0].probes[0]  # upstream's kept


@pytest.mark.parametrize("case", identity_sharing_cases(IPS), ids=lambda c: c.name)
def test_pods_sharing_an_identity_are_let_in_together_or_not_at_all(case: Case) -> None:
    failures = check_case(case, observe_with_engine(IPS))
    assert not failures, "\n\n".join(failures)
