"""Behaviour of ciliate.control.ipam.HostIpam: pod IPs from the node's pod CIDRs, in the store."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ciliate.control.ipam import (
    HostIpam,
    IpamConfigError,
    IpamError,
    IpamExhaustedError,
    IpamOwnerError,
    PoolUsage,
)
from ciliate.control.store import SqliteStore, StoreDataError


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "agent.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[SqliteStore]:
    with SqliteStore(db_path) as opened:
        yield opened


def ip(text: str) -> IPv4Address:
    return IPv4Address(text)


def allocate(ipam: HostIpam, store: SqliteStore, owner: str) -> IPv4Address:
    with store.transaction() as txn:
        return ipam.allocate(txn, owner=owner)


def release(ipam: HostIpam, store: SqliteStore, owner: str) -> IPv4Address | None:
    with store.transaction() as txn:
        return ipam.release(txn, owner=owner)


def fill(ipam: HostIpam, store: SqliteStore, count: int, prefix: str = "c") -> list[IPv4Address]:
    with store.transaction() as txn:
        return [ipam.allocate(txn, owner=f"{prefix}{i}/eth0") for i in range(count)]


class TestReservedAddresses:
    def test_the_router_ip_is_the_first_usable_address_of_the_first_cidr(
        self, store: SqliteStore
    ) -> None:
        ipam = HostIpam(store, ["10.0.5.0/24", "10.0.9.0/24"])
        assert ipam.router_ip == ip("10.0.5.1")

    def test_network_broadcast_and_router_addresses_are_never_handed_out(
        self, store: SqliteStore
    ) -> None:
        ipam = HostIpam(store, ["10.0.0.0/29"])
        handed_out = fill(ipam, store, 5)
        assert handed_out == [ip(f"10.0.0.{i}") for i in range(2, 7)]
        with pytest.raises(IpamExhaustedError):
            allocate(ipam, store, "one-more/eth0")

    def test_only_the_first_cidr_gives_up_an_address_for_the_router(
        self, store: SqliteStore
    ) -> None:
        ipam = HostIpam(store, ["10.0.0.0/30", "10.0.1.0/30"])
        assert fill(ipam, store, 3) == [ip("10.0.0.2"), ip("10.0.1.1"), ip("10.0.1.2")]
        assert ipam.capacity == 3

    def test_a_slash_31_has_no_network_or_broadcast_address(self, store: SqliteStore) -> None:
        ipam = HostIpam(store, ["10.0.0.0/31", "10.0.1.0/31"])
        assert ipam.router_ip == ip("10.0.0.0")
        assert fill(ipam, store, 3) == [ip("10.0.0.1"), ip("10.0.1.0"), ip("10.0.1.1")]

    def test_a_slash_32_after_the_first_cidr_is_one_pod_address(self, store: SqliteStore) -> None:
        ipam = HostIpam(store, ["10.0.0.0/30", "10.0.1.7/32"])
        assert fill(ipam, store, 2) == [ip("10.0.0.2"), ip("10.0.1.7")]

    def test_a_first_cidr_too_small_for_router_and_pods_alone_is_rejected(
        self, store: SqliteStore
    ) -> None:
        with pytest.raises(IpamConfigError, match=r"only the router IP 10\.0\.0\.9"):
            HostIpam(store, ["10.0.0.9/32"])
        ipam = HostIpam(store, ["10.0.0.9/32", "10.0.1.0/30"])  # the others can carry pods
        assert allocate(ipam, store, "a/eth0") == ip("10.0.1.1")


class TestConfiguration:
    @pytest.mark.parametrize(
        ("cidrs", "message"),
        [
            ([], "at least one"),
            (["fd00::/64"], "IPv4 only"),
            (["10.0.0.1/24"], "not a valid CIDR"),
            (["banana"], "not a valid CIDR"),
            (["10.0.0.0/24", "10.0.0.128/25"], "overlap"),
            (["10.0.0.0/24", "10.0.0.0/24"], "overlap"),
        ],
    )
    def test_unusable_pod_cidrs_are_rejected_with_a_reason(
        self, store: SqliteStore, cidrs: list[str], message: str
    ) -> None:
        with pytest.raises(IpamConfigError, match=message):
            HostIpam(store, cidrs)

    def test_config_errors_are_ipam_errors_and_value_errors(self) -> None:
        assert issubclass(IpamConfigError, IpamError)
        assert issubclass(IpamConfigError, ValueError)

    def test_cidrs_may_be_given_as_network_objects(self, store: SqliteStore) -> None:
        ipam = HostIpam(store, [IPv4Network("10.1.0.0/30")])
        assert ipam.pod_cidrs == (IPv4Network("10.1.0.0/30"),)


class TestAllocationOrder:
    def test_addresses_fill_the_first_cidr_in_order_then_the_next(self, store: SqliteStore) -> None:
        ipam = HostIpam(store, ["10.0.0.0/29", "10.0.1.0/29"])
        handed_out = fill(ipam, store, 11)
        assert handed_out == [ip(f"10.0.0.{i}") for i in range(2, 7)] + [
            ip(f"10.0.1.{i}") for i in range(1, 7)
        ]

    def test_a_released_address_is_not_handed_out_again_at_once(self, store: SqliteStore) -> None:
        ipam = HostIpam(store, ["10.0.0.0/24"])
        first, second = fill(ipam, store, 2)
        assert release(ipam, store, "c0/eth0") == first
        assert allocate(ipam, store, "new/eth0") == ip("10.0.0.4")
        assert first != ip("10.0.0.4") and second == ip("10.0.0.3")

    def test_a_released_address_comes_back_only_after_the_ring_goes_round(
        self, store: SqliteStore
    ) -> None:
        ipam = HostIpam(store, ["10.0.0.0/29", "10.0.1.0/30"])  # 5 + 2 pod addresses
        fill(ipam, store, 3)  # 10.0.0.2 .. 10.0.0.4
        release(ipam, store, "c0/eth0")  # frees 10.0.0.2
        later = [allocate(ipam, store, f"n{i}/eth0") for i in range(5)]
        assert later == [
            ip("10.0.0.5"),
            ip("10.0.0.6"),
            ip("10.0.1.1"),
            ip("10.0.1.2"),
            ip("10.0.0.2"),  # wrapped round: now it may be reused
        ]

    def test_after_wrapping_the_search_skips_addresses_still_in_use(
        self, store: SqliteStore
    ) -> None:
        ipam = HostIpam(store, ["10.0.0.0/29"])
        fill(ipam, store, 5)
        release(ipam, store, "c3/eth0")  # 10.0.0.5
        assert allocate(ipam, store, "x/eth0") == ip("10.0.0.5")


class TestExhaustion:
    def test_the_exhaustion_error_names_each_cidr_its_size_and_what_to_do(
        self, store: SqliteStore
    ) -> None:
        ipam = HostIpam(store, ["10.0.0.0/30", "10.0.1.0/30"])
        fill(ipam, store, 3)
        with pytest.raises(IpamExhaustedError) as caught:
            allocate(ipam, store, "late/eth0")
        message = str(caught.value)
        assert "late/eth0" in message
        assert "10.0.0.0/30 has 1 addresses for pods, 1 in use" in message
        assert "10.0.1.0/30 has 2 addresses for pods, 2 in use" in message
        assert "Add a pod CIDR to this node or delete pods" in message

    def test_exhaustion_is_an_ipam_error_and_leaves_existing_allocations_alone(
        self, store: SqliteStore
    ) -> None:
        ipam = HostIpam(store, ["10.0.0.0/30"])
        fill(ipam, store, 1)
        with pytest.raises(IpamError):
            allocate(ipam, store, "late/eth0")
        assert ipam.allocations() == {ip("10.0.0.2"): "c0/eth0"}


class TestOwners:
    def test_allocating_twice_for_one_owner_returns_the_same_address(
        self, store: SqliteStore
    ) -> None:
        ipam = HostIpam(store, ["10.0.0.0/24"])
        with store.transaction() as txn:
            first = ipam.allocate(txn, owner="abc/eth0")
            assert ipam.allocate(txn, owner="abc/eth0") == first
        assert allocate(ipam, store, "abc/eth0") == first
        assert ipam.allocations() == {first: "abc/eth0"}

    def test_each_interface_of_a_container_is_an_owner_of_its_own(self, store: SqliteStore) -> None:
        ipam = HostIpam(store, ["10.0.0.0/24"])
        eth0 = allocate(ipam, store, "abc/eth0")
        net1 = allocate(ipam, store, "abc/net1")
        assert eth0 != net1
        assert ipam.ip_of("abc/net1") == net1

    def test_release_returns_the_freed_address_and_none_when_repeated(
        self, store: SqliteStore
    ) -> None:
        ipam = HostIpam(store, ["10.0.0.0/24"])
        address = allocate(ipam, store, "abc/eth0")
        assert release(ipam, store, "abc/eth0") == address
        assert release(ipam, store, "abc/eth0") is None
        assert release(ipam, store, "never-seen/eth0") is None
        assert ipam.owner_of(address) is None
        assert ipam.allocations() == {}

    def test_owner_of_and_ip_of_look_up_both_directions(self, store: SqliteStore) -> None:
        ipam = HostIpam(store, ["10.0.0.0/24"])
        address = allocate(ipam, store, "abc/eth0")
        assert ipam.owner_of(address) == "abc/eth0"
        assert ipam.owner_of(str(address)) == "abc/eth0"
        assert ipam.ip_of("abc/eth0") == address
        assert ipam.owner_of("10.0.0.99") is None
        assert ipam.ip_of("zzz/eth0") is None

    @pytest.mark.parametrize("owner", ["", "abc", "abc/", "/eth0", "a/b/c", "a b/eth0", "a\n/x"])
    def test_owners_not_shaped_like_container_slash_ifname_are_rejected(
        self, store: SqliteStore, owner: str
    ) -> None:
        ipam = HostIpam(store, ["10.0.0.0/24"])
        with store.transaction() as txn, pytest.raises(IpamOwnerError, match="<container_id>"):
            ipam.allocate(txn, owner=owner)


class TestTransactions:
    def test_a_rolled_back_allocation_leaves_the_address_free_and_the_view_consistent(
        self, store: SqliteStore
    ) -> None:
        ipam = HostIpam(store, ["10.0.0.0/24"])
        with pytest.raises(RuntimeError), store.transaction() as txn:
            doomed = ipam.allocate(txn, owner="doomed/eth0")
            assert ipam.owner_of(doomed, txn=txn) == "doomed/eth0"
            assert ipam.owner_of(doomed) is None, "committed view has not changed yet"
            raise RuntimeError("endpoint creation failed")
        assert ipam.allocations() == {}
        assert ipam.ip_of("doomed/eth0") is None
        assert ipam.usage()[0].used == 0
        # The cursor rolled back too, so the same address is next; nothing leaked.
        assert allocate(ipam, store, "next/eth0") == doomed

    def test_a_rolled_back_release_keeps_the_allocation(self, store: SqliteStore) -> None:
        ipam = HostIpam(store, ["10.0.0.0/24"])
        address = allocate(ipam, store, "abc/eth0")
        with pytest.raises(RuntimeError), store.transaction() as txn:
            ipam.release(txn, owner="abc/eth0")
            raise RuntimeError
        assert ipam.owner_of(address) == "abc/eth0"
        assert allocate(ipam, store, "abc/eth0") == address

    def test_allocation_and_other_agent_state_commit_as_one_unit(self, store: SqliteStore) -> None:
        ipam = HostIpam(store, ["10.0.0.0/24"])
        with store.transaction() as txn:
            address = ipam.allocate(txn, owner="abc/eth0")
            txn.put_json("endpoints/abc/eth0", {"ip": str(address)})
        assert store.get_json("endpoints/abc/eth0") == {"ip": str(address)}
        assert ipam.owner_of(address) == "abc/eth0"


class TestRestart:
    def test_a_new_hostipam_over_the_reopened_store_sees_existing_allocations(
        self, db_path: Path
    ) -> None:
        with SqliteStore(db_path) as store:
            ipam = HostIpam(store, ["10.0.0.0/24"])
            before = fill(ipam, store, 3)
        with SqliteStore(db_path) as store:
            ipam = HostIpam(store, ["10.0.0.0/24"])
            assert ipam.allocations() == {a: f"c{i}/eth0" for i, a in enumerate(before)}
            assert allocate(ipam, store, "c1/eth0") == before[1]
            assert allocate(ipam, store, "new/eth0") == ip("10.0.0.5"), "cursor persisted"

    def test_a_removed_cidr_keeps_its_allocations_listed_flagged_and_never_reused(
        self, store: SqliteStore
    ) -> None:
        old = HostIpam(store, ["10.0.0.0/30", "10.0.1.0/29"])
        fill(old, store, 3)  # 10.0.0.2, 10.0.1.1, 10.0.1.2
        release(old, store, "c2/eth0")  # 10.0.1.2 is free again

        new = HostIpam(store, ["10.0.0.0/30", "10.0.2.0/30"])
        stale = {ip("10.0.1.1"): "c1/eth0"}
        assert new.allocations() == {ip("10.0.0.2"): "c0/eth0", **stale}
        assert new.stale_allocations() == stale
        assert new.usage() == [
            PoolUsage(IPv4Network("10.0.0.0/30"), used=1, capacity=1),
            PoolUsage(IPv4Network("10.0.2.0/30"), used=0, capacity=2),
            PoolUsage(IPv4Network("10.0.1.0/29"), used=1, capacity=0, removed=True),
        ]
        handed_out = fill(new, store, 2, prefix="n")
        assert handed_out == [ip("10.0.2.1"), ip("10.0.2.2")]
        with pytest.raises(IpamExhaustedError):
            allocate(new, store, "more/eth0")
        assert allocate(new, store, "c1/eth0") == ip("10.0.1.1"), "its owner keeps it"
        assert release(new, store, "c1/eth0") == ip("10.0.1.1")
        assert new.stale_allocations() == {}
        assert [u.cidr for u in new.usage() if u.removed] == []

    def test_an_allocation_on_an_address_that_became_the_router_ip_is_flagged(
        self, store: SqliteStore
    ) -> None:
        old = HostIpam(store, ["10.0.0.0/30", "10.0.1.0/30"])
        fill(old, store, 2)  # 10.0.0.2 and 10.0.1.1
        reordered = HostIpam(store, ["10.0.1.0/30", "10.0.0.0/30"])
        assert reordered.router_ip == ip("10.0.1.1")
        assert reordered.stale_allocations() == {ip("10.0.1.1"): "c1/eth0"}
        assert allocate(reordered, store, "new/eth0") == ip("10.0.1.2")


class TestUsage:
    def test_usage_counts_used_and_allocatable_addresses_per_cidr(self, store: SqliteStore) -> None:
        ipam = HostIpam(store, ["10.0.0.0/24", "10.0.1.0/25"])
        fill(ipam, store, 5)
        assert ipam.usage() == [
            PoolUsage(IPv4Network("10.0.0.0/24"), used=5, capacity=253),
            PoolUsage(IPv4Network("10.0.1.0/25"), used=0, capacity=126),
        ]
        assert ipam.capacity == 379

    def test_damaged_records_are_reported_not_guessed_at(self, store: SqliteStore) -> None:
        ipam = HostIpam(store, ["10.0.0.0/24"])
        with store.transaction() as txn:
            txn.put_json("ipam/v4/10.0.0.7", {"no-owner": True})
        with pytest.raises(StoreDataError, match=r"10\.0\.0\.7"):
            ipam.allocations()


class TestInvariants:
    @settings(
        max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(
        ops=st.lists(
            st.tuples(st.sampled_from(["allocate", "release"]), st.integers(0, 9)), max_size=60
        )
    )
    def test_random_allocate_and_release_keep_owners_and_addresses_one_to_one(
        self, tmp_path: Path, ops: list[tuple[str, int]]
    ) -> None:
        # One fresh store per example; tmp_path is shared by all of them.
        with (
            tempfile.TemporaryDirectory(dir=tmp_path) as scratch,
            SqliteStore(Path(scratch) / "agent.db") as store,
        ):
            ipam = HostIpam(store, ["10.0.0.0/29", "10.0.1.0/31"])  # 5 + 2 addresses
            model: dict[str, IPv4Address] = {}
            with store.transaction() as txn:
                for op, n in ops:
                    owner = f"c{n}/eth0"
                    if op == "release":
                        assert ipam.release(txn, owner=owner) == model.pop(owner, None)
                        continue
                    try:
                        got = ipam.allocate(txn, owner=owner)
                    except IpamExhaustedError:
                        assert len(model) == ipam.capacity and owner not in model
                        continue
                    assert model.setdefault(owner, got) == got
            assert ipam.allocations() == {a: o for o, a in model.items()}
            assert len(set(model.values())) == len(model)
            assert ipam.router_ip not in model.values()
            assert store.list("ipam/owner/") == [
                (f"ipam/owner/{o}", f'{{"ip":"{a}"}}'.encode()) for o, a in sorted(model.items())
            ]


class TestSpeed:
    def test_allocating_in_a_crowded_slash_24_is_fast(
        self, store: SqliteStore, benchmark: Any
    ) -> None:
        ipam = HostIpam(store, ["10.0.0.0/24"])
        fill(ipam, store, 253)
        release(ipam, store, "c0/eth0")

        with store.transaction() as txn:

            def allocate_in_full_ring() -> IPv4Address:
                # Worst case: the one free address sits right behind the cursor, so the
                # whole ring is searched. Reset afterwards so every round is the same.
                address = ipam.allocate(txn, owner="churn/eth0")
                ipam.release(txn, owner="churn/eth0")
                txn.put_json("ipam/cursor/v4", {"ip": str(address)})
                return address

            assert benchmark(allocate_in_full_ring) == ip("10.0.0.2")
