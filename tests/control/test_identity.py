"""Behaviour of ciliate.control.identity.allocator: label sets to numeric security identities."""

from __future__ import annotations

import random
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ciliate.control.identity import allocator as identity_module
from ciliate.control.identity.allocator import (
    MAX_ALLOCATED_ID,
    MIN_ALLOCATED_ID,
    CniArgsError,
    Identity,
    IdentityAllocator,
    IdentityError,
    IdentityExhaustedError,
    IdentityLabelsError,
    IdentityNotFoundError,
    Labels,
    canonical_labels,
)
from ciliate.control.identity.labels import labels_from_cni
from ciliate.control.store import SqliteStore, StoreDataError

WEB = {"k8s:io.kubernetes.pod.namespace": "default", "k8s:app": "web"}
DB = {"k8s:io.kubernetes.pod.namespace": "default", "k8s:app": "db"}


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "agent.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[SqliteStore]:
    with SqliteStore(db_path) as opened:
        yield opened


@pytest.fixture
def allocator(store: SqliteStore) -> IdentityAllocator:
    return IdentityAllocator(store)


def acquire(allocator: IdentityAllocator, store: SqliteStore, labels: Labels) -> Identity:
    with store.transaction() as txn:
        return allocator.acquire(txn, labels)


def release(allocator: IdentityAllocator, store: SqliteStore, identity_id: int) -> bool:
    with store.transaction() as txn:
        return allocator.release(txn, identity_id)


class TestAllocation:
    def test_ids_are_drawn_from_256_to_65535(
        self, allocator: IdentityAllocator, store: SqliteStore
    ) -> None:
        web = acquire(allocator, store, WEB)
        assert web == Identity(id=web.id, labels=WEB, refcount=1, reserved=False)
        assert (MIN_ALLOCATED_ID, MAX_ALLOCATED_ID) == (256, 65535)
        assert MIN_ALLOCATED_ID <= web.id <= MAX_ALLOCATED_ID

    def test_ids_are_drawn_at_random_not_in_sequence(self, store: SqliteStore) -> None:
        # A cursor would make every allocation in the cluster touch one key.
        allocator = IdentityAllocator(store, rng=random.Random(7))
        ids = [acquire(allocator, store, {"k8s:app": f"a{i}"}).id for i in range(8)]
        assert ids != sorted(ids)
        assert store.list("identities/cursor") == []

    def test_a_crowded_range_still_finds_the_last_free_id(
        self, allocator: IdentityAllocator, store: SqliteStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(identity_module, "MAX_ALLOCATED_ID", 263)
        ids = {acquire(allocator, store, {"k8s:app": f"a{i}"}).id for i in range(8)}
        assert ids == set(range(256, 264))

    def test_the_same_labels_get_the_same_id_whatever_their_order(
        self, allocator: IdentityAllocator, store: SqliteStore
    ) -> None:
        first = acquire(allocator, store, WEB)
        again = acquire(allocator, store, dict(reversed(list(WEB.items()))))
        assert again.id == first.id

    def test_different_labels_get_different_ids_of_at_least_256(
        self, allocator: IdentityAllocator, store: SqliteStore
    ) -> None:
        ids = {acquire(allocator, store, {"k8s:app": f"a{i}"}).id for i in range(20)}
        assert len(ids) == 20
        assert min(ids) >= 256

    def test_labels_that_differ_only_in_separator_placement_do_not_collide(
        self, allocator: IdentityAllocator, store: SqliteStore
    ) -> None:
        glued = acquire(allocator, store, {"k8s:a": "b;k8s:c=d"})
        split = acquire(allocator, store, {"k8s:a": "b", "k8s:c": "d"})
        assert glued.id != split.id
        assert canonical_labels({"k8s:a": "b;k8s:c=d"}) == "k8s:a=b%3Bk8s:c%3Dd"

    def test_the_same_labels_keep_their_id_across_restarts(self, db_path: Path) -> None:
        with SqliteStore(db_path) as store:
            web = acquire(IdentityAllocator(store), store, WEB)
            acquire(IdentityAllocator(store), store, DB)
        with SqliteStore(db_path) as store:
            allocator = IdentityAllocator(store)
            assert allocator.lookup(WEB) == web
            again = acquire(allocator, store, WEB)
            assert (again.id, again.refcount) == (web.id, 2)

    def test_a_rolled_back_acquire_leaves_nothing(
        self, allocator: IdentityAllocator, store: SqliteStore
    ) -> None:
        with pytest.raises(RuntimeError), store.transaction() as txn:
            allocator.acquire(txn, WEB)
            raise RuntimeError
        assert allocator.lookup(WEB) is None
        assert store.list("identities/") == []

    def test_an_empty_label_set_is_refused_in_favour_of_the_init_identity(
        self, allocator: IdentityAllocator, store: SqliteStore
    ) -> None:
        with (
            store.transaction() as txn,
            pytest.raises(IdentityLabelsError, match=r"init identity \(5\)"),
        ):
            allocator.acquire(txn, {})

    def test_labels_must_map_strings_to_strings(
        self, allocator: IdentityAllocator, store: SqliteStore
    ) -> None:
        with store.transaction() as txn, pytest.raises(IdentityLabelsError):
            allocator.acquire(txn, {"k8s:app": 3})  # type: ignore[dict-item]

    def test_running_out_of_ids_says_so(
        self, allocator: IdentityAllocator, store: SqliteStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(identity_module, "MAX_ALLOCATED_ID", 258)
        for i in range(3):
            acquire(allocator, store, {"k8s:app": f"a{i}"})
        with pytest.raises(IdentityExhaustedError, match=r"256\.\.258"):
            acquire(allocator, store, {"k8s:app": "one-too-many"})
        assert issubclass(IdentityExhaustedError, IdentityError)


class TestReferenceCounting:
    def test_each_acquire_takes_a_reference(
        self, allocator: IdentityAllocator, store: SqliteStore
    ) -> None:
        acquire(allocator, store, WEB)
        assert acquire(allocator, store, WEB).refcount == 2
        assert acquire(allocator, store, WEB).refcount == 3

    def test_release_drops_one_reference_and_frees_the_id_at_zero(
        self, allocator: IdentityAllocator, store: SqliteStore
    ) -> None:
        web = acquire(allocator, store, WEB)
        acquire(allocator, store, WEB)
        assert release(allocator, store, web.id) is False
        still = allocator.get(web.id)
        assert still is not None and still.refcount == 1
        assert release(allocator, store, web.id) is True
        assert allocator.get(web.id) is None
        assert allocator.lookup(WEB) is None
        assert [i for i in allocator.list() if not i.reserved] == []
        assert store.list("identities/labels/") == []
        assert store.list("identities/refs/") == []

    def test_a_freed_id_stays_quarantined_then_comes_back(
        self, store: SqliteStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(identity_module, "MAX_ALLOCATED_ID", 257)  # two ids
        now = [1000.0]
        allocator = IdentityAllocator(store, quarantine=60.0, clock=lambda: now[0])
        web = acquire(allocator, store, WEB)
        assert release(allocator, store, web.id) is True
        assert store.get_json(f"identities/id/{web.id}") == {"labels": WEB, "until": 1060.0}
        db = acquire(allocator, store, DB)
        assert db.id != web.id, "a removed id is not handed out during its quarantine"
        with pytest.raises(IdentityExhaustedError, match="quarantined"):
            acquire(allocator, store, {"k8s:app": "third"})
        now[0] = 1060.0
        assert acquire(allocator, store, {"k8s:app": "third"}).id == web.id

    def test_each_node_holds_its_own_references(self, store: SqliteStore) -> None:
        node_a = IdentityAllocator(store, node="a")
        node_b = IdentityAllocator(store, node="b")
        web = acquire(node_a, store, WEB)
        assert acquire(node_b, store, WEB).id == web.id
        assert acquire(node_b, store, WEB).refcount == 2  # node b's own count
        assert store.get_json(f"identities/refs/{web.id}/a") == {"refcount": 1}
        assert store.get_json(f"identities/refs/{web.id}/b") == {"refcount": 2}
        current = node_a.get(web.id)
        assert current is not None and current.refcount == 3
        assert release(node_a, store, web.id) is False, "node b still holds it"
        assert release(node_b, store, web.id) is False
        assert release(node_b, store, web.id) is True
        assert node_a.lookup(WEB) is None

    def test_a_store_from_before_per_node_references_keeps_its_counts(
        self, allocator: IdentityAllocator, store: SqliteStore
    ) -> None:
        canonical = canonical_labels(WEB)
        with store.transaction() as txn:  # the old layout: the count in the record
            txn.put_json("identities/id/300", {"labels": WEB, "refcount": 2})
            txn.put_json(f"identities/labels/{canonical}", {"id": 300})
            txn.put_json("identities/cursor", {"id": 300})
        assert acquire(allocator, store, WEB).refcount == 3
        assert store.get_json("identities/id/300") == {"labels": WEB}
        assert [release(allocator, store, 300) for _ in range(3)] == [False, False, True]
        assert allocator.lookup(WEB) is None

    def test_node_names_cannot_break_the_key_layout(self, store: SqliteStore) -> None:
        for bad in ("", "a/b", "tab\t"):
            with pytest.raises(ValueError, match="node names"):
                IdentityAllocator(store, node=bad)

    def test_releasing_an_id_that_is_not_allocated_is_an_error(
        self, allocator: IdentityAllocator, store: SqliteStore
    ) -> None:
        with store.transaction() as txn, pytest.raises(IdentityNotFoundError, match=r"4242.*local"):
            allocator.release(txn, 4242)

    def test_a_rolled_back_release_keeps_the_reference(
        self, allocator: IdentityAllocator, store: SqliteStore
    ) -> None:
        web = acquire(allocator, store, WEB)
        with pytest.raises(RuntimeError), store.transaction() as txn:
            assert allocator.release(txn, web.id) is True
            raise RuntimeError
        assert allocator.get(web.id) == web


class TestReservedIdentities:
    def test_reserved_identities_use_ciliums_numbering_and_are_listed_marked(
        self, allocator: IdentityAllocator
    ) -> None:
        reserved = {i.id: i.labels for i in allocator.list() if i.reserved}
        assert reserved[1] == {"reserved:host": ""}
        assert reserved[2] == {"reserved:world": ""}
        assert reserved[3] == {"reserved:unmanaged": ""}
        assert reserved[4] == {"reserved:health": ""}
        assert reserved[5] == {"reserved:init": ""}
        assert reserved[6] == {"reserved:remote-node": ""}
        assert reserved[7] == {"reserved:kube-apiserver": ""}
        assert all(i < 256 for i in reserved)

    def test_list_puts_reserved_first_then_allocated_by_id(
        self, allocator: IdentityAllocator, store: SqliteStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(identity_module, "MAX_ALLOCATED_ID", 267)
        for i in range(12):  # ids 256..267: "267" sorts before "30" as text, not as numbers
            acquire(allocator, store, {"k8s:app": f"a{i}"})
        listed = allocator.list()
        assert [i.id for i in listed] == [*range(1, 11), *range(256, 268)]
        assert [i.reserved for i in listed] == [True] * 10 + [False] * 12

    def test_the_labels_of_a_reserved_identity_get_it_without_refcounting(
        self, allocator: IdentityAllocator, store: SqliteStore
    ) -> None:
        host = acquire(allocator, store, {"reserved:host": ""})
        assert (host.id, host.reserved, host.refcount) == (1, True, 0)
        assert release(allocator, store, 1) is False
        assert store.list("identities/") == []
        assert allocator.get(1) == host

    def test_workload_labels_may_not_include_reserved_ones(
        self, allocator: IdentityAllocator, store: SqliteStore
    ) -> None:
        with store.transaction() as txn, pytest.raises(IdentityLabelsError, match="reserved"):
            allocator.acquire(txn, {"reserved:host": "", "k8s:app": "web"})


class TestStoreLayout:
    def test_identities_are_stored_by_id_and_indexed_by_labels(
        self, allocator: IdentityAllocator, store: SqliteStore
    ) -> None:
        web = acquire(allocator, store, WEB)
        assert store.get_json(f"identities/id/{web.id}") == {"labels": WEB}
        canonical = "k8s:app=web;k8s:io.kubernetes.pod.namespace=default"
        assert store.get_json(f"identities/labels/{canonical}") == {"id": web.id}
        assert store.get_json(f"identities/refs/{web.id}/local") == {"refcount": 1}

    def test_a_damaged_index_is_reported_not_papered_over(
        self, allocator: IdentityAllocator, store: SqliteStore
    ) -> None:
        web = acquire(allocator, store, WEB)
        with store.transaction() as txn:
            txn.put_json(f"identities/id/{web.id}", {"labels": DB})
        with (
            store.transaction() as txn,
            pytest.raises(StoreDataError, match=f"points at id {web.id}"),
        ):
            allocator.acquire(txn, WEB)

    def test_identities_are_hashable_values(self) -> None:
        a = Identity(id=256, labels={"k8s:a": "b"}, refcount=1)
        assert {a, Identity(id=256, labels={"k8s:a": "b"}, refcount=1)} == {a}


label_sets = st.sampled_from(
    [{"k8s:app": "web"}, {"k8s:app": "db"}, {"k8s:app": "web", "k8s:tier": "1"}, {"k8s:x": ""}]
)


class TestInvariants:
    @settings(
        max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(
        ops=st.lists(
            st.one_of(
                st.tuples(st.just("acquire"), label_sets),
                st.tuples(st.just("release"), label_sets),
                st.tuples(st.just("restart"), st.none()),
            ),
            max_size=40,
        )
    )
    def test_random_acquire_and_release_keep_label_sets_and_live_ids_one_to_one(
        self, tmp_path: Path, ops: list[tuple[str, dict[str, str] | None]]
    ) -> None:
        refs: dict[str, int] = {}  # canonical labels -> live references
        ids: dict[str, int] = {}  # canonical labels -> the id they have while live
        used: set[int] = set()  # every id handed out (all still in quarantine)
        with tempfile.TemporaryDirectory(dir=tmp_path) as scratch:
            path = Path(scratch) / "agent.db"
            store = SqliteStore(path)
            allocator = IdentityAllocator(store)
            try:
                for op, labels in ops:
                    if op == "restart":
                        store.close()
                        store = SqliteStore(path)
                        allocator = IdentityAllocator(store)
                        continue
                    assert labels is not None
                    key = canonical_labels(labels)
                    if op == "acquire":
                        got = acquire(allocator, store, labels)
                        if key in ids:
                            assert got.id == ids[key]
                        else:
                            assert got.id not in used, "a freed id came back at once"
                            used.add(got.id)
                            ids[key] = got.id
                        refs[key] = refs.get(key, 0) + 1
                        assert got.refcount == refs[key]
                    elif key in ids:
                        freed = release(allocator, store, ids[key])
                        refs[key] -= 1
                        assert freed == (refs[key] == 0)
                        if freed:
                            del ids[key], refs[key]
                    _check_one_to_one(allocator, store, ids, refs)
            finally:
                store.close()


def _check_one_to_one(
    allocator: IdentityAllocator,
    store: SqliteStore,
    ids: dict[str, int],
    refs: dict[str, int],
) -> None:
    live = [i for i in allocator.list() if not i.reserved]
    assert {canonical_labels(i.labels): i.id for i in live} == ids
    assert {canonical_labels(i.labels): i.refcount for i in live} == refs
    assert len({i.id for i in live}) == len(live), "one id with two label sets"
    index = store.list("identities/labels/")
    assert len(index) == len(live), "one label set with two live ids, or a stale index"


class TestLabelsFromCni:
    def test_namespace_and_pod_name_come_from_cni_args(self) -> None:
        args = (
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-7d4b9-xk2p1;"
            "K8S_POD_INFRA_CONTAINER_ID=0123abcd;K8S_POD_UID=8c4b1f3e-0000"
        )
        assert labels_from_cni(cni_args=args, netconf_labels=None) == {
            "k8s:io.kubernetes.pod.namespace": "default",
            "k8s:io.kubernetes.pod.name": "web-7d4b9-xk2p1",
        }

    def test_netconf_labels_are_added_with_the_k8s_source_prefix(self) -> None:
        labels = labels_from_cni(
            cni_args="K8S_POD_NAMESPACE=prod;K8S_POD_NAME=db-0",
            netconf_labels={"app": "db", "k8s:tier": "backend"},
        )
        assert labels == {
            "k8s:io.kubernetes.pod.namespace": "prod",
            "k8s:io.kubernetes.pod.name": "db-0",
            "k8s:app": "db",
            "k8s:tier": "backend",
        }

    def test_without_kubernetes_args_only_the_netconf_labels_remain(self) -> None:
        assert labels_from_cni(cni_args="", netconf_labels={"app": "x"}) == {"k8s:app": "x"}
        assert labels_from_cni(cni_args="IgnoreUnknown=1;", netconf_labels=None) == {}

    def test_a_trailing_semicolon_is_tolerated(self) -> None:
        labels = labels_from_cni(cni_args="K8S_POD_NAMESPACE=a;K8S_POD_NAME=b;", netconf_labels={})
        assert labels["k8s:io.kubernetes.pod.name"] == "b"

    def test_a_pod_name_without_namespace_is_enough_as_podman_sends_it(self) -> None:
        labels = labels_from_cni(cni_args="IgnoreUnknown=1;K8S_POD_NAME=web", netconf_labels=None)
        assert labels == {"k8s:io.kubernetes.pod.name": "web"}

    @pytest.mark.parametrize(
        ("cni_args", "message"),
        [
            ("K8S_POD_NAMESPACE", r"pair 1 \('K8S_POD_NAMESPACE'\) is not KEY=VALUE"),
            ("IgnoreUnknown=1;K8S_POD_NAME==x", r"pair 2 .* is not KEY=VALUE"),
            ("=default", "is not KEY=VALUE"),
            ("K8S_POD_NAMESPACE=a;K8S_POD_NAMESPACE=b;K8S_POD_NAME=p", "twice"),
            ("K8S_POD_NAMESPACE=default", "no K8S_POD_NAME; give both"),
            ("K8S_POD_NAMESPACE=Default;K8S_POD_NAME=web", "not a Kubernetes namespace"),
            ("K8S_POD_NAMESPACE=default;K8S_POD_NAME=web_1", "not a Kubernetes pod name"),
            ("K8S_POD_NAMESPACE=default;K8S_POD_NAME=", "not a Kubernetes pod name"),
        ],
    )
    def test_malformed_cni_args_are_rejected_clearly(self, cni_args: str, message: str) -> None:
        with pytest.raises(CniArgsError, match=message):
            labels_from_cni(cni_args=cni_args, netconf_labels=None)

    @pytest.mark.parametrize(
        ("netconf_labels", "message"),
        [
            ({"reserved:host": ""}, "reserved source"),
            ({"": "x"}, "non-empty strings"),
            ({"app": 1}, "non-empty strings"),
            ({"k8s:": "x"}, "no name"),
            ({"io.kubernetes.pod.namespace": "other"}, "contradicts CNI_ARGS"),
        ],
    )
    def test_bad_netconf_labels_are_rejected_clearly(
        self, netconf_labels: dict[str, object], message: str
    ) -> None:
        with pytest.raises(CniArgsError, match=message):
            labels_from_cni(
                cni_args="K8S_POD_NAMESPACE=default;K8S_POD_NAME=web",
                netconf_labels=netconf_labels,  # type: ignore[arg-type]
            )

    def test_cni_args_errors_are_identity_label_errors_and_value_errors(self) -> None:
        assert issubclass(CniArgsError, IdentityLabelsError)
        assert issubclass(CniArgsError, ValueError)

    def test_the_labels_from_cni_give_the_pod_an_identity(
        self, allocator: IdentityAllocator, store: SqliteStore
    ) -> None:
        labels = labels_from_cni(
            cni_args="K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0", netconf_labels={"app": "web"}
        )
        assert acquire(allocator, store, labels).labels == labels
