"""Behaviour of ciliate.control.ipam.CidrSet, after Kubernetes' nodeipam cidrset semantics."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ciliate.control.ipam import (
    CidrMaskError,
    CidrOutOfRangeError,
    CidrSet,
    CidrSetError,
    CidrSetFullError,
)

Network = IPv4Network | IPv6Network


def net(text: str) -> Network:
    return ipaddress.ip_network(text, strict=False)


def block(cluster: str, node_mask: int, index: int) -> Network:
    """The node block at ``index`` of ``cluster``, computed independently of CidrSet."""
    c = net(cluster)
    address = int(c.network_address) + (index << (c.max_prefixlen - node_mask))
    return ipaddress.ip_network((address, node_mask))


def allocate_all(cidrs: CidrSet) -> list[Network]:
    return [cidrs.allocate_next() for _ in range(cidrs.free_count)]


class TestConstruction:
    @pytest.mark.parametrize(
        ("cluster", "node_mask", "max_cidrs"),
        [
            ("10.0.0.0/16", 24, 256),
            ("10.0.0.0/8", 24, 65536),
            ("10.0.0.0/8", 32, 1 << 24),
            ("192.168.0.0/28", 30, 4),
            ("127.123.234.0/30", 30, 1),
            ("2001:db8::/48", 64, 65536),
            ("2001:db8:1234:ff00::/56", 72, 65536),
            ("2001:beef:1234:369b::/60", 64, 16),
            ("beef:1234::/30", 30, 1),
        ],
    )
    def test_max_cidrs_is_two_to_the_mask_difference(
        self, cluster: str, node_mask: int, max_cidrs: int
    ) -> None:
        cidrs = CidrSet(cluster, node_mask)
        assert cidrs.max_cidrs == max_cidrs
        assert cidrs.allocated_count == 0
        assert cidrs.free_count == max_cidrs
        assert cidrs.node_mask == node_mask

    @pytest.mark.parametrize(
        ("given", "normalised"),
        [
            ("127.123.3.0/16", "127.123.0.0/16"),
            ("192.168.5.219/28", "192.168.5.208/28"),
            ("2001:0db8:1234:3::/48", "2001:db8:1234::/48"),
            ("2001:0db8:85a3::8a2e:0370:7334/50", "2001:db8:85a3::/50"),
        ],
    )
    def test_cluster_cidr_host_bits_are_masked_off(self, given: str, normalised: str) -> None:
        assert CidrSet(given, net(given).prefixlen).cluster_cidr == net(normalised)

    def test_accepts_a_network_object(self) -> None:
        assert CidrSet(IPv4Network("10.0.0.0/16"), 24).allocate_next() == net("10.0.0.0/24")


class TestBadMasks:
    @pytest.mark.parametrize(
        ("cluster", "node_mask", "message"),
        [
            ("10.0.0.0/16", 8, "shorter than the /16 prefix"),
            ("10.0.0.0/16", 15, "at least 16"),
            ("fd00::/48", 47, "shorter than the /48 prefix"),
            ("10.0.0.0/16", 33, "longer than an IPv4 address"),
            ("fd00::/120", 129, "longer than an IPv6 address"),
            ("10.0.0.0/16", -1, "shorter"),
        ],
    )
    def test_a_node_mask_outside_cluster_prefix_and_address_bits_is_rejected(
        self, cluster: str, node_mask: int, message: str
    ) -> None:
        with pytest.raises(CidrMaskError, match=message):
            CidrSet(cluster, node_mask)

    @pytest.mark.parametrize("node_mask", ["24", 24.0, True, None])
    def test_a_node_mask_that_is_not_an_int_is_rejected(self, node_mask: object) -> None:
        with pytest.raises(CidrMaskError, match="integer"):
            CidrSet("10.0.0.0/16", node_mask)  # type: ignore[arg-type]

    def test_mask_errors_are_value_errors_and_cidrset_errors(self) -> None:
        with pytest.raises(ValueError):
            CidrSet("10.0.0.0/16", 8)
        with pytest.raises(CidrSetError):
            CidrSet("10.0.0.0/16", 8)


class TestIPv6SixteenBitRule:
    @pytest.mark.parametrize(
        ("cluster", "node_mask"),
        [("beef:1234::/32", 49), ("2001:db8::/48", 65), ("fd00::/104", 121), ("::/0", 17)],
    )
    def test_an_ipv6_node_mask_more_than_16_bits_longer_is_rejected(
        self, cluster: str, node_mask: int
    ) -> None:
        with pytest.raises(CidrMaskError, match="at most 16"):
            CidrSet(cluster, node_mask)

    @pytest.mark.parametrize(
        ("cluster", "node_mask"),
        [("beef:1234::/32", 48), ("2001:db8::/48", 64), ("fd00::/112", 128), ("::/0", 16)],
    )
    def test_an_ipv6_node_mask_exactly_16_bits_longer_is_accepted(
        self, cluster: str, node_mask: int
    ) -> None:
        assert CidrSet(cluster, node_mask).max_cidrs == 1 << 16

    @pytest.mark.parametrize(("cluster", "node_mask"), [("10.0.0.0/8", 32), ("10.0.0.0/7", 26)])
    def test_ipv4_has_no_such_limit(self, cluster: str, node_mask: int) -> None:
        cidrs = CidrSet(cluster, node_mask)
        assert cidrs.max_cidrs == 1 << (node_mask - net(cluster).prefixlen)


class TestAllocationSequence:
    @pytest.mark.parametrize(
        ("cluster", "node_mask", "first", "second"),
        [
            ("10.0.0.0/16", 24, "10.0.0.0/24", "10.0.1.0/24"),
            ("127.0.0.0/8", 32, "127.0.0.0/32", "127.0.0.1/32"),
            ("192.168.5.219/28", 32, "192.168.5.208/32", "192.168.5.209/32"),
            ("10.0.0.0/8", 16, "10.0.0.0/16", "10.1.0.0/16"),
            (
                "2001:beef:1234:369b::/60",
                64,
                "2001:beef:1234:3690::/64",
                "2001:beef:1234:3691::/64",
            ),
            ("2001:db8::/32", 48, "2001:db8::/48", "2001:db8:1::/48"),
            (
                "2001:db8:1234:ff00::/56",
                72,
                "2001:db8:1234:ff00::/72",
                "2001:db8:1234:ff00:100::/72",
            ),
            (
                "2001:db8:1234:0:1234::/80",
                96,
                "2001:db8:1234:0:1234::/96",
                "2001:db8:1234:0:1234:1::/96",
            ),
        ],
    )
    def test_blocks_are_handed_out_in_address_order_from_the_start(
        self, cluster: str, node_mask: int, first: str, second: str
    ) -> None:
        cidrs = CidrSet(cluster, node_mask)
        assert cidrs.allocate_next() == net(first)
        assert cidrs.allocate_next() == net(second)
        assert cidrs.allocated_count == 2

    @pytest.mark.parametrize(
        ("cluster", "node_mask", "index", "expected"),
        [
            ("127.123.0.0/16", 24, 15, "127.123.15.0/24"),
            ("192.168.5.219/28", 32, 5, "192.168.5.213/32"),
            ("2001:db8:1234::/48", 64, 15, "2001:db8:1234:f::/64"),
            ("2001:db8:85a3::8a2e:370:7334/50", 63, 6425, "2001:db8:85a3:3232::/63"),
            ("2001:db8:85a3::8a2e:370:7334/32", 48, 6425, "2001:db8:1919::/48"),
            ("2001:db8:1234:ff00::370:7334/56", 72, 6425, "2001:db8:1234:ff19:1900::/72"),
            ("2001:db8:1234:ff00::370:7334/80", 96, 6425, "2001:db8:1234:ff00:0:1919::/96"),
        ],
    )
    def test_the_nth_allocation_is_the_nth_block(
        self, cluster: str, node_mask: int, index: int, expected: str
    ) -> None:
        cidrs = CidrSet(cluster, node_mask)
        for _ in range(index):
            cidrs.allocate_next()
        assert cidrs.allocate_next() == net(expected)

    @pytest.mark.parametrize(
        ("cluster", "node_mask"),
        [("192.168.0.0/28", 30), ("10.0.0.0/29", 32), ("fd00::/62", 64), ("fd00::/124", 128)],
    )
    def test_a_small_set_hands_out_every_block_once_then_is_full(
        self, cluster: str, node_mask: int
    ) -> None:
        cidrs = CidrSet(cluster, node_mask)
        got = allocate_all(cidrs)
        assert got == [block(cluster, node_mask, i) for i in range(cidrs.max_cidrs)]
        assert cidrs.is_full
        with pytest.raises(CidrSetFullError):
            cidrs.allocate_next()

    @pytest.mark.parametrize("cluster", ["127.123.234.0/16", "beef:1234::/16"])
    def test_releasing_everything_and_reallocating_gives_the_same_blocks_in_order(
        self, cluster: str
    ) -> None:
        cidrs = CidrSet(cluster, 24)
        first = allocate_all(cidrs)
        assert len(first) == 256
        for cidr in first:
            cidrs.release(cidr)
        assert cidrs.allocated_count == 0
        assert allocate_all(cidrs) == first


class TestFull:
    @pytest.mark.parametrize(("cluster", "node_mask"), [("10.0.0.0/16", 24), ("fd00::/56", 64)])
    def test_allocating_from_a_full_set_raises_and_names_the_cluster_cidr(
        self, cluster: str, node_mask: int
    ) -> None:
        cidrs = CidrSet(cluster, node_mask)
        allocate_all(cidrs)
        with pytest.raises(CidrSetFullError, match=str(net(cluster))):
            cidrs.allocate_next()
        assert cidrs.allocated_count == cidrs.max_cidrs

    def test_a_full_set_becomes_usable_again_after_a_release(self) -> None:
        cidrs = CidrSet("10.0.0.0/16", 24)
        allocate_all(cidrs)
        cidrs.release("10.0.77.0/24")
        assert cidrs.allocate_next() == net("10.0.77.0/24")

    @pytest.mark.parametrize("cluster", ["127.123.234.0/30", "beef:1234::/30"])
    def test_a_node_mask_equal_to_the_cluster_prefix_is_a_single_block(self, cluster: str) -> None:
        prefix = net(cluster).prefixlen
        cidrs = CidrSet(cluster, prefix)
        assert cidrs.max_cidrs == 1
        assert cidrs.allocate_next() == net(cluster)
        with pytest.raises(CidrSetFullError):
            cidrs.allocate_next()
        cidrs.release(cidrs.cluster_cidr)
        assert cidrs.allocate_next() == net(cluster)
        with pytest.raises(CidrSetFullError):
            cidrs.allocate_next()


class TestRotation:
    def test_a_released_block_is_not_handed_out_again_immediately(self) -> None:
        cidrs = CidrSet("10.0.0.0/16", 24)
        for _ in range(3):
            cidrs.allocate_next()
        cidrs.release("10.0.1.0/24")
        assert cidrs.allocate_next() == net("10.0.3.0/24")

    @pytest.mark.parametrize("cluster", ["10.0.0.0/22", "fd00::/62"])
    def test_a_released_block_comes_back_only_after_wrap_around(self, cluster: str) -> None:
        mask = 24 if "." in cluster else 64
        cidrs = CidrSet(cluster, mask)
        b = [block(cluster, mask, i) for i in range(4)]
        assert cidrs.allocate_next() == b[0]
        assert cidrs.allocate_next() == b[1]
        cidrs.release(b[0])
        assert [cidrs.allocate_next(), cidrs.allocate_next()] == [b[2], b[3]]
        assert cidrs.allocate_next() == b[0]  # wrapped
        assert cidrs.is_full

    def test_when_full_a_single_released_block_is_found_whatever_the_candidate(self) -> None:
        cidrs = CidrSet("10.0.0.0/22", 24)
        allocate_all(cidrs)  # candidate has wrapped back to block 0
        cidrs.release("10.0.2.0/24")
        assert cidrs.allocate_next() == net("10.0.2.0/24")
        cidrs.release("10.0.1.0/24")  # behind the candidate (now 3): found after wrap-around
        assert cidrs.allocate_next() == net("10.0.1.0/24")

    def test_occupy_does_not_move_the_candidate(self) -> None:
        cidrs = CidrSet("10.0.0.0/16", 24)
        cidrs.occupy("10.0.0.0/17")
        assert cidrs.allocated_count == 128
        assert cidrs.allocate_next() == net("10.0.128.0/24")

    def test_occupied_blocks_ahead_of_the_candidate_are_skipped(self) -> None:
        cidrs = CidrSet("10.0.0.0/16", 24)
        cidrs.allocate_next()
        cidrs.occupy("10.0.1.0/24")
        cidrs.occupy("10.0.2.0/24")
        assert cidrs.allocate_next() == net("10.0.3.0/24")

    def test_release_does_not_move_the_candidate(self) -> None:
        cidrs = CidrSet("10.0.0.0/16", 24)
        for _ in range(5):
            cidrs.allocate_next()
        cidrs.release("10.0.0.0/21")
        assert cidrs.allocated_count == 0
        assert cidrs.allocate_next() == net("10.0.5.0/24")

    def test_the_candidate_skips_over_a_long_occupied_run_in_one_search(self) -> None:
        cidrs = CidrSet("10.0.0.0/8", 32)
        cidrs.occupy("10.0.0.0/9")
        cidrs.occupy("10.128.0.0/10")
        assert cidrs.allocate_next() == net("10.192.0.0/32")


# Each step: operation, CIDR, allocated count afterwards (the k8s double occupy/release test).
DOUBLE_OCCUPY_RELEASE_V4 = [
    ("occupy", "10.42.5.0/24", 1),
    ("occupy", "10.42.9.0/24", 2),
    ("occupy", "10.42.8.0/22", 5),  # four blocks, one already used: +3
    ("occupy", "10.42.9.0/24", 5),  # already used: no change
    ("release", "10.42.9.0/24", 4),
    ("release", "10.42.9.0/24", 4),  # already free: no change
    ("release", "10.42.4.0/22", 3),  # four blocks, only one used: -1
]
DOUBLE_OCCUPY_RELEASE_V6 = [
    ("occupy", "fd00:42:0:500::/56", 1),
    ("occupy", "fd00:42:0:900::/56", 2),
    ("occupy", "fd00:42:0:800::/54", 5),
    ("occupy", "fd00:42:0:900::/56", 5),
    ("release", "fd00:42:0:900::/56", 4),
    ("release", "fd00:42:0:900::/56", 4),
    ("release", "fd00:42:0:400::/54", 3),
]


class TestOccupyAndRelease:
    @pytest.mark.parametrize(
        ("cluster", "node_mask", "steps"),
        [
            ("10.42.0.0/16", 24, DOUBLE_OCCUPY_RELEASE_V4),
            ("fd00:42::/48", 56, DOUBLE_OCCUPY_RELEASE_V6),
        ],
        ids=["ipv4", "ipv6"],
    )
    def test_counts_change_only_by_blocks_whose_state_changed(
        self, cluster: str, node_mask: int, steps: list[tuple[str, str, int]]
    ) -> None:
        cidrs = CidrSet(cluster, node_mask)
        for op, cidr, expected in steps:
            getattr(cidrs, op)(cidr)
            assert cidrs.allocated_count == expected, (op, cidr)
        # Exactly the remaining blocks can still be allocated, and none of the occupied ones.
        rest = allocate_all(cidrs)
        assert len(rest) == 256 - 3
        assert len(set(rest)) == len(rest)
        with pytest.raises(CidrSetFullError):
            cidrs.allocate_next()

    @pytest.mark.parametrize(
        ("cluster", "node_mask", "cidr", "first", "last"),
        [
            ("127.0.0.0/8", 16, "127.0.0.0/8", 0, 255),
            ("2001:beef:1200::/40", 48, "2001:beef:1200::/40", 0, 255),
            ("127.0.0.0/8", 16, "127.0.0.0/2", 0, 255),
            ("2001:beef:1200::/40", 48, "2001:beef:1234::/34", 0, 255),
            ("127.0.0.0/8", 16, "127.0.0.0/16", 0, 0),
            ("2001:beef:1200::/40", 48, "2001:beef:1200::/48", 0, 0),
            ("127.0.0.0/8", 32, "127.0.0.0/16", 0, 65535),
            ("2001:beef:1200::/48", 64, "2001:beef:1200::/48", 0, 65535),
            ("127.0.0.0/7", 16, "127.0.0.0/15", 256, 257),
            ("2001:beef:7f00::/39", 48, "2001:beef:7f00::/47", 256, 257),
            ("127.0.0.0/7", 15, "127.0.0.0/15", 128, 128),
            ("2001:beef:7f00::/39", 47, "2001:beef:7f00::/47", 128, 128),
            ("127.0.0.0/7", 18, "127.0.0.0/15", 1024, 1031),
            ("2001:beef:7f00::/39", 50, "2001:beef:7f00::/47", 1024, 1031),
            ("10.0.0.0/16", 24, "10.0.5.128/25", 5, 5),
            ("10.0.0.0/16", 24, "10.0.5.7/32", 5, 5),
            ("2001:db8::/48", 64, "2001:db8:0:7::1/128", 7, 7),
        ],
    )
    def test_occupy_marks_exactly_the_node_blocks_the_cidr_overlaps(
        self, cluster: str, node_mask: int, cidr: str, first: int, last: int
    ) -> None:
        cidrs = CidrSet(cluster, node_mask)
        cidrs.occupy(cidr)
        assert cidrs.allocated_count == last - first + 1
        assert cidrs.allocated_in(block(cluster, node_mask, first)) == 1
        assert cidrs.allocated_in(block(cluster, node_mask, last)) == 1
        if first > 0:
            assert cidrs.allocated_in(block(cluster, node_mask, first - 1)) == 0
        if last < cidrs.max_cidrs - 1:
            assert cidrs.allocated_in(block(cluster, node_mask, last + 1)) == 0
        cidrs.release(cidr)
        assert cidrs.allocated_count == 0

    @pytest.mark.parametrize(
        ("cluster", "node_mask"),
        [("10.0.0.0/16", 24), ("10.0.0.0/8", 32), ("fd00::/48", 64), ("10.0.0.0/29", 32)],
    )
    def test_occupying_the_cluster_cidr_fills_the_set_and_releasing_it_empties_it(
        self, cluster: str, node_mask: int
    ) -> None:
        cidrs = CidrSet(cluster, node_mask)
        cidrs.allocate_next()
        cidrs.occupy(cluster)
        assert cidrs.allocated_count == cidrs.max_cidrs
        with pytest.raises(CidrSetFullError):
            cidrs.allocate_next()
        cidrs.release(cluster)
        assert cidrs.allocated_count == 0
        cidrs.release(cluster)
        assert cidrs.allocated_count == 0

    def test_releasing_a_cidr_smaller_than_a_block_frees_its_whole_block(self) -> None:
        cidrs = CidrSet("10.0.0.0/16", 24)
        cidrs.occupy("10.0.5.0/24")
        cidrs.release("10.0.5.128/25")
        assert cidrs.allocated_count == 0
        assert cidrs.allocated_in("10.0.5.0/24") == 0

    def test_allocated_in_counts_used_blocks_under_a_larger_cidr(self) -> None:
        cidrs = CidrSet("10.0.0.0/16", 24)
        cidrs.occupy("10.0.1.0/24")
        cidrs.occupy("10.0.3.0/24")
        assert cidrs.allocated_in("10.0.0.0/22") == 2
        assert cidrs.allocated_in("10.0.0.0/8") == 2
        assert cidrs.allocated_in("10.0.4.0/22") == 0

    def test_an_allocated_block_can_be_occupied_again_without_double_counting(self) -> None:
        cidrs = CidrSet("fd00::/48", 64)
        got = cidrs.allocate_next()
        cidrs.occupy(got)
        assert cidrs.allocated_count == 1


class TestOutOfRange:
    @pytest.mark.parametrize(
        ("cluster", "node_mask", "cidr"),
        [
            ("192.168.0.0/16", 24, "127.168.224.0/24"),
            ("10.0.0.0/16", 24, "10.1.0.0/24"),
            ("10.0.0.0/16", 24, "9.255.255.255/32"),
            ("10.0.0.0/16", 24, "10.1.0.0/16"),
            ("beef::/16", 24, "2001:db00::/24"),
            ("fd00::/48", 64, "fd00:0:1::/64"),
        ],
    )
    @pytest.mark.parametrize("op", ["occupy", "release", "allocated_in"])
    def test_a_cidr_outside_the_cluster_cidr_is_rejected(
        self, cluster: str, node_mask: int, cidr: str, op: str
    ) -> None:
        cidrs = CidrSet(cluster, node_mask)
        with pytest.raises(CidrOutOfRangeError, match="outside cluster CIDR"):
            getattr(cidrs, op)(cidr)
        assert cidrs.allocated_count == 0

    @pytest.mark.parametrize(
        ("cluster", "node_mask", "cidr"),
        [
            ("10.0.0.0/8", 24, "fd00::/64"),
            ("fd00::/48", 64, "10.0.0.0/24"),
            ("::/0", 16, "0.0.0.0/0"),
        ],
    )
    @pytest.mark.parametrize("op", ["occupy", "release"])
    def test_a_cidr_of_the_other_family_is_rejected(
        self, cluster: str, node_mask: int, cidr: str, op: str
    ) -> None:
        with pytest.raises(CidrOutOfRangeError, match="IPv"):
            getattr(CidrSet(cluster, node_mask), op)(cidr)

    def test_out_of_range_errors_are_value_errors(self) -> None:
        with pytest.raises(ValueError):
            CidrSet("10.0.0.0/16", 24).occupy("11.0.0.0/24")


@dataclass
class ReferenceCidrSet:
    """A slow, obviously-correct model of the k8s cidrset: a set of used indices."""

    base: int
    cluster_prefix: int
    node_mask: int
    bits: int
    used: set[int] = field(default_factory=set)
    next: int = 0

    @property
    def max(self) -> int:
        return 1 << (self.node_mask - self.cluster_prefix)

    def allocate(self) -> int | None:
        for step in range(self.max):
            index = (self.next + step) % self.max
            if index not in self.used:
                self.used.add(index)
                self.next = (index + 1) % self.max
                return index
        return None

    def indices(self, cidr: Network) -> range:
        if cidr.prefixlen <= self.cluster_prefix:
            return range(self.max)
        shift = self.bits - self.node_mask
        first = (int(cidr.network_address) - self.base) >> shift
        last = (int(cidr.broadcast_address) - self.base) >> shift
        return range(first, last + 1)


CLUSTERS = [("10.0.0.0/26", 30), ("10.0.0.0/30", 32), ("fd00::/60", 64), ("fd00::/125", 128)]


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[str, int, list[tuple[str, int, int]]]:
    cluster, node_mask = draw(st.sampled_from(CLUSTERS))
    c = net(cluster)
    ops = st.tuples(
        st.sampled_from(["allocate", "allocate", "occupy", "release"]),
        st.integers(0, c.num_addresses - 1),  # an address inside the cluster CIDR
        st.integers(c.prefixlen - 2, min(node_mask + 2, c.max_prefixlen)),  # op prefix
    )
    return cluster, node_mask, draw(st.lists(ops, max_size=60))


class TestAgainstAReferenceModel:
    @settings(max_examples=200, deadline=None)
    @given(scenarios())
    def test_random_operations_match_the_model_and_never_hand_out_a_live_block(
        self, scenario: tuple[str, int, list[tuple[str, int, int]]]
    ) -> None:
        cluster, node_mask, ops = scenario
        c = net(cluster)
        cidrs = CidrSet(cluster, node_mask)
        model = ReferenceCidrSet(int(c.network_address), c.prefixlen, node_mask, c.max_prefixlen)
        for op, offset, prefix in ops:
            if op == "allocate":
                expected = model.allocate()
                if expected is None:
                    with pytest.raises(CidrSetFullError):
                        cidrs.allocate_next()
                else:
                    got = cidrs.allocate_next()
                    assert got == block(cluster, node_mask, expected)
            else:
                target = ipaddress.ip_network(
                    (int(c.network_address) + offset, prefix), strict=False
                )
                getattr(cidrs, op)(target)
                if op == "occupy":
                    model.used.update(model.indices(target))
                else:
                    model.used.difference_update(model.indices(target))
            assert cidrs.allocated_count == len(model.used)
        # Every block the set still considers used is one the model has live, and vice versa.
        live = {block(cluster, node_mask, i) for i in model.used}
        blocks = [block(cluster, node_mask, i) for i in range(cidrs.max_cidrs)]
        assert {b for b in blocks if cidrs.allocated_in(b)} == live
        # What is left to allocate is exactly the free blocks, each once.
        rest = allocate_all(cidrs)
        assert len(set(rest)) == len(rest)
        assert live.isdisjoint(rest)


class TestScale:
    @pytest.mark.parametrize(
        ("cluster", "node_mask", "last"),
        [("10.0.0.0/8", 24, "10.39.15.0/24"), ("2001:db8::/48", 64, "2001:db8:0:270f::/64")],
    )
    def test_ten_thousand_allocations_are_distinct_and_in_order(
        self, cluster: str, node_mask: int, last: str
    ) -> None:
        cidrs = CidrSet(cluster, node_mask)
        got = [cidrs.allocate_next() for _ in range(10_000)]
        assert len(set(got)) == 10_000
        assert got[-1] == net(last)
        assert cidrs.allocated_count == 10_000
