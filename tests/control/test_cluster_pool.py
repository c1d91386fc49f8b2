"""Behaviour of ciliate.control.ipam.ClusterPool, Cilium's cluster-pool IPAM."""

from __future__ import annotations

import ipaddress
import itertools
from typing import Any

import pytest

from ciliate.control.ipam import (
    CidrConflictError,
    CidrNotInPoolError,
    ClusterPool,
    InvalidCidrError,
    NodeCidrs,
    PoolConfigError,
    PoolError,
    PoolExhaustedError,
)


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def dual_stack(**overrides: Any) -> ClusterPool:
    config: dict[str, Any] = {
        "ipv4_cidrs": ["10.0.0.0/16"],
        "ipv4_mask": 24,
        "ipv6_cidrs": ["fd00::/104"],
        "ipv6_mask": 120,
    }
    config.update(overrides)
    return ClusterPool(**config)


def as_strings(cidrs: NodeCidrs) -> list[str]:
    return [str(c) for c in cidrs.cidrs]


class TestConfigValidation:
    @pytest.mark.parametrize(
        ("config", "message"),
        [
            pytest.param(
                {"ipv4_cidrs": ["10.0.0.0/16"], "ipv4_mask": 8},
                r"ipv4_mask 8 is shorter than the /16 prefix of cluster CIDR 10\.0\.0\.0/16",
                id="ipv4-mask-shorter-than-prefix",
            ),
            pytest.param(
                {"ipv4_cidrs": ["10.0.0.0/24", "10.1.0.0/16"], "ipv4_mask": 20},
                r"at least 24",
                id="mask-shorter-than-a-later-entry",
            ),
            pytest.param(
                {"ipv6_cidrs": ["fd00::/104"], "ipv6_mask": 96},
                r"ipv6_mask 96 is shorter than the /104 prefix",
                id="ipv6-mask-shorter-than-prefix",
            ),
            pytest.param(
                {"ipv4_cidrs": ["10.0.0.0/8", "10.1.0.0/16"], "ipv4_mask": 24},
                r"10\.0\.0\.0/8 and 10\.1\.0\.0/16 overlap",
                id="nested-ipv4",
            ),
            pytest.param(
                {"ipv4_cidrs": ["10.0.0.0/16", "10.0.0.0/16"], "ipv4_mask": 24},
                r"overlap",
                id="duplicate-ipv4",
            ),
            pytest.param(
                {"ipv4_cidrs": ["10.1.0.0/16", "172.16.0.0/12", "10.0.0.0/8"], "ipv4_mask": 24},
                r"10\.1\.0\.0/16 and 10\.0\.0\.0/8 overlap",
                id="overlap-across-non-adjacent-entries",
            ),
            pytest.param(
                {"ipv4_cidrs": ["10.0.0.0/16", "10.0.7.1/16"], "ipv4_mask": 24},
                r"overlap",
                id="same-cidr-after-masking-host-bits",
            ),
            pytest.param(
                {"ipv6_cidrs": ["fd00::/48", "fd00:0:0:1::/64"], "ipv6_mask": 64},
                r"fd00::/48 and fd00:0:0:1::/64 overlap",
                id="nested-ipv6",
            ),
            pytest.param(
                {"ipv4_mask": 24},
                r"ipv4_mask is set but ipv4_cidrs is empty",
                id="ipv4-mask-without-cidrs",
            ),
            pytest.param(
                {"ipv4_cidrs": ["10.0.0.0/8"], "ipv4_mask": 24, "ipv6_mask": 64},
                r"ipv6_mask is set but ipv6_cidrs is empty",
                id="ipv6-mask-without-cidrs",
            ),
            pytest.param(
                {"ipv4_cidrs": ["10.0.0.0/8"]},
                r"ipv4_cidrs is set but ipv4_mask is missing",
                id="ipv4-cidrs-without-mask",
            ),
            pytest.param(
                {"ipv6_cidrs": ["fd00::/104"]},
                r"ipv6_cidrs is set but ipv6_mask is missing",
                id="ipv6-cidrs-without-mask",
            ),
            pytest.param(
                {"ipv6_cidrs": ["fd00::/104"], "ipv6_mask": 121},
                r"17 bits longer than the /104 prefix.*at most 120",
                id="ipv6-mask-17-bits-longer",
            ),
            pytest.param(
                {"ipv6_cidrs": ["fd00::/48"], "ipv6_mask": 120},
                r"72 bits longer.*cluster CIDR of /104 or longer",
                id="ipv6-mask-72-bits-longer",
            ),
            pytest.param(
                {"ipv4_cidrs": ["10.0.0.0/8", "fd00::/104"], "ipv4_mask": 24},
                r"'fd00::/104' is an IPv6 CIDR; move it to ipv6_cidrs",
                id="ipv6-cidr-in-ipv4-list",
            ),
            pytest.param(
                {"ipv6_cidrs": ["10.0.0.0/8"], "ipv6_mask": 64},
                r"'10\.0\.0\.0/8' is an IPv4 CIDR; move it to ipv4_cidrs",
                id="ipv4-cidr-in-ipv6-list",
            ),
            pytest.param(
                {"ipv4_cidrs": ["not-a-cidr"], "ipv4_mask": 24},
                r"ipv4_cidrs entry 'not-a-cidr' is not a valid CIDR",
                id="garbage",
            ),
            pytest.param(
                {"ipv4_cidrs": ["10.0.0.0/33"], "ipv4_mask": 24},
                r"'10\.0\.0\.0/33' is not a valid CIDR",
                id="prefix-too-long",
            ),
            pytest.param(
                {"ipv4_cidrs": ["10.0.0/8"], "ipv4_mask": 24},
                r"not a valid CIDR",
                id="three-octets",
            ),
            pytest.param(
                {"ipv6_cidrs": ["fd00:::/64"], "ipv6_mask": 64},
                r"ipv6_cidrs entry 'fd00:::/64' is not a valid CIDR",
                id="bad-ipv6",
            ),
            pytest.param(
                {"ipv4_cidrs": [""], "ipv4_mask": 24},
                r"not a valid CIDR",
                id="empty-string",
            ),
            pytest.param(
                {"ipv4_cidrs": ["10.0.0.0/8"], "ipv4_mask": 33},
                r"ipv4_mask 33 is not a valid IPv4 prefix length",
                id="ipv4-mask-too-long",
            ),
            pytest.param(
                {"ipv6_cidrs": ["fd00::/120"], "ipv6_mask": 129},
                r"ipv6_mask 129 is not a valid IPv6 prefix length",
                id="ipv6-mask-too-long",
            ),
            pytest.param(
                {"ipv4_cidrs": ["10.0.0.0/8"], "ipv4_mask": -1},
                r"not a valid IPv4 prefix length",
                id="negative-mask",
            ),
            pytest.param(
                {"ipv4_cidrs": ["10.0.0.0/8"], "ipv4_mask": "24"},
                r"ipv4_mask must be an integer",
                id="mask-as-string",
            ),
            pytest.param(
                {"ipv4_cidrs": "10.0.0.0/8", "ipv4_mask": 24},
                r"must be a list of CIDR strings.*\['10\.0\.0\.0/8'\]",
                id="cidrs-as-single-string",
            ),
            pytest.param({}, r"no cluster CIDRs configured", id="nothing-configured"),
        ],
    )
    def test_a_bad_configuration_is_rejected_with_a_message_saying_what_to_fix(
        self, config: dict[str, Any], message: str
    ) -> None:
        with pytest.raises(PoolConfigError, match=message):
            ClusterPool(**config)

    def test_config_errors_are_value_errors(self) -> None:
        with pytest.raises(ValueError):
            ClusterPool(ipv4_mask=24)

    @pytest.mark.parametrize(
        "config",
        [
            {"ipv4_cidrs": ["10.0.0.0/24"], "ipv4_mask": 24},
            {"ipv6_cidrs": ["fd00::/48"], "ipv6_mask": 64},
            {"ipv6_cidrs": ["fd00::/112"], "ipv6_mask": 128},
            {"ipv4_cidrs": ["10.0.0.0/8"], "ipv4_mask": 32},
            {"ipv4_cidrs": ["10.0.0.0/16", "10.1.0.0/16"], "ipv4_mask": 24},
            {"ipv4_cidrs": (" 10.0.0.0/16 ",), "ipv4_mask": 24, "ipv6_mask": None},
        ],
    )
    def test_a_valid_configuration_at_the_limits_is_accepted(self, config: dict[str, Any]) -> None:
        ClusterPool(**config)

    def test_cluster_cidrs_are_normalised_and_kept_in_order(self) -> None:
        pool = ClusterPool(ipv4_cidrs=["10.1.2.3/16", "10.0.0.0/16"], ipv4_mask=24)
        assert pool.ipv4_cidrs == [net("10.1.0.0/16"), net("10.0.0.0/16")]
        assert pool.ipv6_cidrs == []


class TestAllocate:
    def test_nodes_get_consecutive_node_cidrs(self) -> None:
        pool = ClusterPool(ipv4_cidrs=["10.0.0.0/16"], ipv4_mask=24)
        assert pool.allocate("a") == NodeCidrs(ipv4=[ipaddress.IPv4Network("10.0.0.0/24")])
        assert as_strings(pool.allocate("b")) == ["10.0.1.0/24"]

    def test_allocating_twice_for_a_node_returns_its_cidrs_without_using_more(self) -> None:
        pool = dual_stack()
        first = pool.allocate("a")
        assert pool.allocate("a") == first
        assert as_strings(pool.allocate("b")) == ["10.0.1.0/24", "fd00::100/120"]

    def test_dual_stack_gives_one_cidr_of_each_family_ipv4_first(self) -> None:
        cidrs = dual_stack().allocate("a")
        assert [str(c) for c in cidrs.ipv4] == ["10.0.0.0/24"]
        assert [str(c) for c in cidrs.ipv6] == ["fd00::/120"]
        assert as_strings(cidrs) == ["10.0.0.0/24", "fd00::/120"]

    def test_ipv6_only_pool_gives_no_ipv4(self) -> None:
        cidrs = ClusterPool(ipv6_cidrs=["fd00::/48"], ipv6_mask=64).allocate("a")
        assert cidrs.ipv4 == []
        assert as_strings(cidrs) == ["fd00::/64"]

    @pytest.mark.parametrize(
        ("config", "expected"),
        [
            (
                {"ipv4_cidrs": ["10.0.0.0/30", "10.1.0.0/31"], "ipv4_mask": 31},
                ["10.0.0.0/31", "10.0.0.2/31", "10.1.0.0/31"],
            ),
            (
                {"ipv6_cidrs": ["fd00::/127", "fd01::/128"], "ipv6_mask": 128},
                ["fd00::/128", "fd00::1/128", "fd01::/128"],
            ),
        ],
        ids=["ipv4", "ipv6"],
    )
    def test_a_full_cluster_cidr_moves_allocation_on_to_the_next(
        self, config: dict[str, Any], expected: list[str]
    ) -> None:
        pool = ClusterPool(**config)
        got = [as_strings(pool.allocate(f"node-{i}"))[0] for i in range(len(expected))]
        assert got == expected

    def test_a_freed_block_in_an_earlier_cluster_cidr_is_used_before_later_ones(self) -> None:
        pool = ClusterPool(ipv4_cidrs=["10.0.0.0/31", "10.1.0.0/31"], ipv4_mask=32)
        for name in "abc":
            pool.allocate(name)
        pool.release("a")
        assert as_strings(pool.allocate("d")) == ["10.0.0.0/32"]

    @pytest.mark.parametrize(
        ("config", "family", "cidrs"),
        [
            (
                {"ipv4_cidrs": ["10.0.0.0/31", "10.9.0.0/32"], "ipv4_mask": 32},
                "IPv4",
                r"10\.0\.0\.0/31, 10\.9\.0\.0/32",
            ),
            ({"ipv6_cidrs": ["fd00::/127"], "ipv6_mask": 128}, "IPv6", r"fd00::/127"),
        ],
    )
    def test_when_every_cluster_cidr_is_full_the_error_names_family_and_cidrs(
        self, config: dict[str, Any], family: str, cidrs: str
    ) -> None:
        pool = ClusterPool(**config)
        with pytest.raises(PoolExhaustedError) as excinfo:
            for i in itertools.count():
                pool.allocate(f"node-{i}")
        assert excinfo.match(f"{family} pool exhausted")
        assert excinfo.match(cidrs)
        assert excinfo.match("node-3" if family == "IPv4" else "node-2")
        assert pool.node_cidrs("node-3" if family == "IPv4" else "node-2") is None

    def test_ipv6_exhaustion_gives_the_ipv4_cidr_back(self) -> None:
        pool = dual_stack(ipv4_cidrs=["10.0.0.0/29"], ipv4_mask=31, ipv6_cidrs=["fd00::/127"],
                          ipv6_mask=128)  # fmt: skip
        pool.allocate("a")
        pool.allocate("b")
        with pytest.raises(PoolExhaustedError, match="IPv6"):
            pool.allocate("c")
        assert pool.node_cidrs("c") is None
        assert set(pool.nodes()) == {"a", "b"}
        # 10.0.0.4/31 was taken for "c" and must be free again.
        pool.occupy("d", ["10.0.0.4/31"])
        pool.occupy("e", ["10.0.0.6/31"])

    def test_ipv4_exhaustion_takes_no_ipv6_cidr(self) -> None:
        pool = dual_stack(ipv4_cidrs=["10.0.0.0/32"], ipv4_mask=32)
        pool.allocate("a")
        with pytest.raises(PoolExhaustedError, match="IPv4"):
            pool.allocate("b")
        pool.occupy("c", ["fd00::100/120"])  # the next IPv6 block is still free

    def test_a_node_that_holds_only_one_family_gets_the_missing_one(self) -> None:
        pool = dual_stack()
        pool.occupy("a", ["10.0.9.0/24"])
        assert as_strings(pool.allocate("a")) == ["10.0.9.0/24", "fd00::/120"]

    def test_returned_lists_are_copies(self) -> None:
        pool = dual_stack()
        pool.allocate("a").ipv4.clear()
        mine = pool.node_cidrs("a")
        assert mine is not None
        mine.ipv6.clear()
        pool.nodes()["a"].ipv4.clear()
        assert as_strings(pool.allocate("a")) == ["10.0.0.0/24", "fd00::/120"]


class TestRelease:
    def test_a_released_node_no_longer_holds_anything(self) -> None:
        pool = dual_stack()
        pool.allocate("a")
        pool.allocate("b")
        pool.release("a")
        assert pool.node_cidrs("a") is None
        assert list(pool.nodes()) == ["b"]

    @pytest.mark.parametrize(
        "config",
        [
            {"ipv4_cidrs": ["10.0.0.0/24"], "ipv4_mask": 24},
            {"ipv6_cidrs": ["fd00::/64"], "ipv6_mask": 64},
            {"ipv4_cidrs": ["10.0.0.0/24"], "ipv4_mask": 24, "ipv6_cidrs": ["fd00::/64"],
             "ipv6_mask": 64},
        ],
        ids=["ipv4", "ipv6", "dual"],
    )  # fmt: skip
    def test_releasing_a_node_makes_its_cidrs_available_to_the_next_node(
        self, config: dict[str, Any]
    ) -> None:
        pool = ClusterPool(**config)
        first = pool.allocate("a")
        with pytest.raises(PoolExhaustedError):
            pool.allocate("b")
        pool.release("a")
        assert pool.allocate("b") == first

    def test_releasing_an_occupied_larger_cidr_frees_all_its_blocks(self) -> None:
        pool = ClusterPool(ipv4_cidrs=["10.0.0.0/23"], ipv4_mask=24)
        pool.occupy("a", ["10.0.0.0/23"])
        with pytest.raises(PoolExhaustedError):
            pool.allocate("b")
        pool.release("a")
        assert as_strings(pool.allocate("b")) == ["10.0.0.0/24"]
        assert as_strings(pool.allocate("c")) == ["10.0.1.0/24"]

    def test_releasing_an_unknown_node_does_nothing(self) -> None:
        pool = dual_stack()
        pool.allocate("a")
        pool.release("ghost")
        assert list(pool.nodes()) == ["a"]


class TestOccupy:
    def test_an_occupied_cidr_is_never_allocated_to_another_node(self) -> None:
        pool = ClusterPool(ipv4_cidrs=["10.0.0.0/22"], ipv4_mask=24)
        pool.occupy("a", ["10.0.0.0/24"])
        pool.occupy("b", ["10.0.2.0/24"])
        assert as_strings(pool.allocate("c")) == ["10.0.1.0/24"]
        assert as_strings(pool.allocate("d")) == ["10.0.3.0/24"]
        with pytest.raises(PoolExhaustedError):
            pool.allocate("e")

    def test_a_node_keeps_its_occupied_cidrs_when_allocate_is_called(self) -> None:
        pool = dual_stack()
        pool.occupy("a", ["10.0.200.0/24", "fd00::4200/120"])
        assert as_strings(pool.allocate("a")) == ["10.0.200.0/24", "fd00::4200/120"]

    def test_occupying_the_same_cidrs_again_for_the_same_node_is_harmless(self) -> None:
        pool = dual_stack()
        pool.occupy("a", ["10.0.5.0/24"])
        pool.occupy("a", ["10.0.5.0/24", "10.0.5.0/24"])
        assert as_strings(pool.node_cidrs("a") or NodeCidrs()) == ["10.0.5.0/24"]

    def test_host_bits_in_an_occupied_cidr_are_masked_off(self) -> None:
        pool = dual_stack()
        pool.occupy("a", ["10.0.5.9/24"])
        assert as_strings(pool.node_cidrs("a") or NodeCidrs()) == ["10.0.5.0/24"]

    @pytest.mark.parametrize(
        ("held", "wanted"),
        [
            ("10.0.5.0/24", "10.0.5.0/24"),
            ("10.0.5.0/24", "10.0.4.0/23"),  # larger, covering the held one
            ("10.0.4.0/23", "10.0.5.0/24"),  # inside a larger held one
            ("10.0.5.0/25", "10.0.5.128/25"),  # different halves of the same node block
            ("fd00::100/120", "fd00::100/120"),
        ],
    )
    def test_a_cidr_held_by_another_node_is_a_conflict_naming_the_holder(
        self, held: str, wanted: str
    ) -> None:
        pool = dual_stack()
        pool.occupy("a", [held])
        with pytest.raises(CidrConflictError, match=rf"node 'b': {wanted}.*held by node 'a'"):
            pool.occupy("b", [wanted])
        assert pool.node_cidrs("b") is None

    def test_a_cidr_allocated_to_another_node_is_a_conflict(self) -> None:
        pool = dual_stack()
        got = pool.allocate("a")
        with pytest.raises(CidrConflictError, match="held by node 'a'"):
            pool.occupy("b", [str(got.ipv6[0])])

    def test_two_overlapping_cidrs_in_one_call_are_a_conflict(self) -> None:
        with pytest.raises(CidrConflictError, match="overlap each other"):
            dual_stack().occupy("a", ["10.0.4.0/23", "10.0.5.0/24"])

    @pytest.mark.parametrize(
        ("config", "cidr", "message"),
        [
            ({}, "192.168.0.0/24", r"outside every IPv4 cluster CIDR \(10\.0\.0\.0/16\)"),
            ({}, "10.1.0.0/24", r"outside every IPv4 cluster CIDR"),
            ({}, "10.0.0.0/15", r"outside every IPv4 cluster CIDR"),  # larger than the pool
            ({}, "fd01::/120", r"outside every IPv6 cluster CIDR \(fd00::/104\)"),
            (
                {"ipv4_cidrs": ["10.0.0.0/16", "10.1.0.0/16"]},
                "10.0.0.0/15",  # spans two cluster CIDRs
                r"outside every IPv4 cluster CIDR \(10\.0\.0\.0/16, 10\.1\.0\.0/16\)",
            ),
            (
                {"ipv6_cidrs": [], "ipv6_mask": None},
                "fd00::/120",
                r"IPv6 CIDR but the pool has no IPv6 cluster CIDRs",
            ),
        ],
    )
    def test_a_cidr_outside_every_cluster_cidr_is_rejected(
        self, config: dict[str, Any], cidr: str, message: str
    ) -> None:
        pool = dual_stack(**config)
        with pytest.raises(CidrNotInPoolError, match=message):
            pool.occupy("a", [cidr])
        assert pool.node_cidrs("a") is None

    @pytest.mark.parametrize("cidr", ["nonsense", "10.0.0.0/40", ""])
    def test_an_unparsable_cidr_is_rejected(self, cidr: str) -> None:
        with pytest.raises(InvalidCidrError, match="not a valid CIDR"):
            dual_stack().occupy("a", [cidr])

    def test_a_single_string_instead_of_a_list_is_a_type_error(self) -> None:
        with pytest.raises(TypeError, match="sequence of CIDR strings"):
            dual_stack().occupy("a", "10.0.0.0/24")

    def test_occupy_is_all_or_nothing(self) -> None:
        pool = dual_stack()
        with pytest.raises(CidrNotInPoolError):
            pool.occupy("a", ["10.0.0.0/24", "fd00::/120", "192.168.0.0/24"])
        assert pool.nodes() == {}
        assert as_strings(pool.allocate("b")) == ["10.0.0.0/24", "fd00::/120"]

    def test_occupy_errors_are_pool_errors(self) -> None:
        for error in (CidrConflictError, CidrNotInPoolError, InvalidCidrError, PoolExhaustedError):
            assert issubclass(error, PoolError)


class TestRestart:
    def test_a_new_pool_that_reoccupies_existing_nodes_never_hands_out_a_duplicate(self) -> None:
        config: dict[str, Any] = {
            "ipv4_cidrs": ["10.0.0.0/22", "10.1.0.0/22"],
            "ipv4_mask": 28,
            "ipv6_cidrs": ["fd00::/112", "fd01::/112"],
            "ipv6_mask": 118,
        }
        before = ClusterPool(**config)
        for i in range(40):
            before.allocate(f"old-{i}")
        for i in range(0, 40, 3):  # some nodes went away: holes in the bitmaps
            before.release(f"old-{i}")
        existing = before.nodes()

        after = ClusterPool(**config)
        for name, cidrs in existing.items():
            after.occupy(name, as_strings(cidrs))
        assert after.nodes() == existing
        for name, cidrs in existing.items():
            assert after.allocate(name) == cidrs  # idempotent for existing nodes

        # 128 blocks per family: fill every one that is left.
        new = [after.allocate(f"new-{i}") for i in range(128 - len(existing))]
        with pytest.raises(PoolExhaustedError):
            after.allocate("one-too-many")

        handed_out = [c for cidrs in [*existing.values(), *new] for c in cidrs.cidrs]
        assert len(set(handed_out)) == len(handed_out) == 2 * 128
        v4 = sorted(c for c in handed_out if c.version == 4)
        assert all(not a.overlaps(b) for a, b in itertools.pairwise(v4))

    def test_restart_with_cidrs_of_a_different_size_than_the_mask(self) -> None:
        pool = ClusterPool(ipv4_cidrs=["10.0.0.0/22"], ipv4_mask=24)
        pool.occupy("big", ["10.0.0.0/23"])  # an older, larger node CIDR: two blocks
        pool.occupy("small", ["10.0.2.0/25"])  # smaller: takes its whole block
        assert as_strings(pool.allocate("new")) == ["10.0.3.0/24"]
        with pytest.raises(PoolExhaustedError):
            pool.allocate("newer")


class TestScale:
    def test_ten_thousand_dual_stack_nodes_get_distinct_cidrs(self) -> None:
        pool = ClusterPool(ipv4_cidrs=["10.0.0.0/8"], ipv4_mask=24, ipv6_cidrs=["fd00::/48"],
                           ipv6_mask=64)  # fmt: skip
        got = [pool.allocate(f"node-{i}") for i in range(10_000)]
        flat = [c for cidrs in got for c in cidrs.cidrs]
        assert len(set(flat)) == 20_000
        assert len(pool.nodes()) == 10_000
