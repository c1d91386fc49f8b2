"""PolicyEntry and what replace() writes: port blocks, deny resolution,
validation, and entries() reading a policy back."""

from __future__ import annotations

import re
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ciliate.datapath.policy import PolicyEntry, PolicyError, resolve
from ciliate.datapath.testbed import Testbed

TCP, UDP = 6, 17


def ports_of(entry: PolicyEntry) -> list[range]:
    out = []
    for value, length in entry.blocks():
        assert value >> 16 == entry.protocol
        first = value & 0xFFFF
        size = 1 << (24 - length)
        assert first % size == 0, "a block is aligned to its size"
        out.append(range(first, first + size))
    return out


@given(st.integers(1, 65535), st.integers(0, 65535))
def test_a_port_range_becomes_aligned_blocks_covering_exactly_it(first: int, span: int) -> None:
    last = min(65535, first + span)
    blocks = ports_of(PolicyEntry("ingress", 5, TCP, first, last if last > first else 0))
    covered = [port for block in blocks for port in block]
    assert covered == list(range(first, last + 1))
    assert len(blocks) <= 32  # at most two blocks per bit of the port


def test_any_port_and_any_protocol_are_one_short_prefix_each() -> None:
    assert list(PolicyEntry("egress", 5, TCP).blocks()) == [(TCP << 16, 8)]
    assert list(PolicyEntry("egress", 5, 0).blocks()) == [(0, 0)]
    assert list(PolicyEntry("egress", 5, UDP, 53).blocks()) == [(UDP << 16 | 53, 24)]


@pytest.mark.parametrize(
    ("kwargs", "complaint"),
    [
        ({"direction": "inbound"}, "direction 'inbound'"),
        ({"protocol": 0, "port": 80}, "needs a protocol"),
        ({"port": 0, "port_end": 90}, "needs a first port"),
        ({"port": 90, "port_end": 80}, "ends before it starts"),
        ({"port": 70000}, "outside 0..65535"),
        ({"identity": -1}, "outside 0..2^32-1"),
    ],
)
def test_an_entry_the_datapath_cannot_hold_is_refused(
    kwargs: dict[str, object], complaint: str
) -> None:
    fields: dict[str, object] = {"direction": "ingress", "identity": 5, "protocol": TCP, **kwargs}
    with pytest.raises(PolicyError, match=re.escape(complaint)):
        PolicyEntry(**fields)  # type: ignore[arg-type]


def test_resolution_drops_covered_allows_and_copies_any_peer_denies() -> None:
    table = resolve(
        [
            PolicyEntry("ingress", 5, TCP, 80),
            PolicyEntry("ingress", 5, TCP, 1, 1023, deny=True),  # covers the allow of 80
            PolicyEntry("ingress", 6, UDP, 53),
            PolicyEntry("ingress", 0, UDP, deny=True),  # any peer: copied to 5 and 6
        ]
    )
    assert ("ingress", 5, TCP << 16 | 80, 24) not in table
    assert table[("ingress", 6, UDP << 16, 8)] is True
    assert table[("ingress", 5, UDP << 16, 8)] is True
    assert ("ingress", 6, UDP << 16 | 53, 24) not in table  # under the copied deny


def test_entries_read_back_joined_into_ranges(tb: Testbed) -> None:
    written = [
        PolicyEntry("ingress", 1001, TCP, 8000, 8100),
        PolicyEntry("ingress", 1001, UDP),
        PolicyEntry("egress", 0, 0),
        PolicyEntry("egress", 1002, TCP, 22, deny=True),
    ]
    tb.datapath.policy.replace(2, written, ingress_enforced=True, egress_enforced=True)
    assert sorted(tb.datapath.policy.entries(2), key=repr) == sorted(written, key=repr)
    state = tb.datapath.policy.state(2)
    assert (state.ingress_enforced, state.egress_enforced) == (True, True)


def test_clear_removes_the_entries_and_the_enforcement(tb: Testbed) -> None:
    first = tb.datapath.policy.replace(
        2, [PolicyEntry("ingress", 1001, TCP)], ingress_enforced=True, egress_enforced=False
    )
    tb.datapath.policy.clear(2)
    state = tb.datapath.policy.state(2)
    assert not state.ingress_enforced and state.revision == first + 1
    assert tb.datapath.policy.entries(2) == []
    assert sum(1 for _ in tb.datapath.maps["ciliate_policy"]) == 0


def test_an_endpoint_id_outside_the_table_is_refused(tb: Testbed) -> None:
    with pytest.raises(PolicyError, match=r"sizes\.endpoint_slots"):
        tb.datapath.policy.replace(1 << 20, [], ingress_enforced=True, egress_enforced=False)


def test_enforcement_switches_without_rewriting_the_entries(tb: Testbed) -> None:
    tb.add_pods()
    first = tb.datapath.policy.replace(
        2, [PolicyEntry("ingress", 4242, TCP)], ingress_enforced=True, egress_enforced=False
    )
    keys = set(tb.datapath.maps["ciliate_policy"])
    second = tb.datapath.policy.set_enforcement(2, ingress_enforced=False, egress_enforced=False)
    assert second == first + 1 and not tb.datapath.policy.state(2).ingress_enforced
    assert set(tb.datapath.maps["ciliate_policy"]) == keys
    tb.datapath.policy.set_enforcement(2, ingress_enforced=True, egress_enforced=False)
    assert tb.datapath.policy.entries(2) == [PolicyEntry("ingress", 4242, TCP)]


def test_the_policy_can_be_read_while_it_is_replaced_from_another_thread(tb: Testbed) -> None:
    rules = [PolicyEntry("ingress", 5000 + i, TCP, 80) for i in range(200)]
    failures: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(20):
                tb.datapath.policy.replace(
                    2, rules[: 100 + i], ingress_enforced=True, egress_enforced=False
                )
        except BaseException as exc:  # reported by the test thread below
            failures.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    while thread.is_alive():
        assert 0 <= len(tb.datapath.policy.entries(2)) <= 200
    thread.join()
    assert not failures
    assert len(tb.datapath.policy.entries(2)) == 119
