"""The ``ciliate bench datapath`` cases as pytest-benchmark tests.

Run with ``.venv/bin/pytest bench --benchmark-enable``. pytest-benchmark
times each test-run call from Python (syscall included); the kernel's own
ns/packet figure is recorded in ``extra_info`` for the same calls.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ciliate.bench.datapath import CASES, TC_ACT_OK, Case, add_bench_pods, prepare, write_policy
from ciliate.datapath import objects
from ciliate.datapath.testbed import Testbed
from ciliate.loader import BpfObject, Program


@pytest.fixture(scope="module")
def testbed() -> Iterator[Testbed]:
    if objects.source_root() is not None:
        objects.build()
    with Testbed(prefix="cbp") as tb:
        add_bench_pods(tb)
        yield tb


@pytest.fixture(scope="module")
def empty() -> Iterator[Program]:
    with BpfObject.open(objects.object_path("empty")) as obj:
        obj.load()
        yield obj.program("empty")


def _bench(
    benchmark: pytest.FixtureRequest, tb: Testbed, prog: Program, case: Case, expect: int
) -> None:
    packet = case.packet(tb)
    write_policy(tb, case.policy_rules)
    after_call = prepare(tb, case, packet)
    durations: list[int] = []

    def once() -> None:
        result = tb.run(prog, packet, ifindex=tb.pod_a.lxc.ifindex, repeat=case.repeat)
        assert result.retval == expect
        durations.append(result.duration_ns)
        tb.events()
        if after_call is not None:
            after_call()

    benchmark.pedantic(once, rounds=200, iterations=1, warmup_rounds=5)  # type: ignore[attr-defined]
    durations.sort()
    benchmark.extra_info["kernel_ns_per_packet_median"] = durations[len(durations) // 2]  # type: ignore[attr-defined]
    benchmark.extra_info["repeat"] = case.repeat  # type: ignore[attr-defined]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_path(benchmark: pytest.FixtureRequest, testbed: Testbed, case: Case) -> None:
    _bench(benchmark, testbed, testbed.datapath.program(case.program), case, case.expect)


@pytest.mark.parametrize("repeat", sorted({c.repeat for c in CASES}))
def test_empty_baseline(
    benchmark: pytest.FixtureRequest, testbed: Testbed, empty: Program, repeat: int
) -> None:
    case = Case("empty", "empty tc program", "empty", repeat, TC_ACT_OK, CASES[1].packet)
    _bench(benchmark, testbed, empty, case, TC_ACT_OK)
