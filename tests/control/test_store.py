"""Behaviour of ciliate.control.store: the transactional key-value store and SqliteStore."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

from ciliate.control.store import (
    SqliteStore,
    Store,
    StoreClosedError,
    StoreDataError,
    StoreError,
    StoreKeyError,
    StoreUnavailableError,
    TxnFinishedError,
)

# fork, not spawn: the children run functions of this module, and fork needs no pickling.
# Children leave with os._exit (multiprocessing does so), so inherited stores are untouched.
MP = multiprocessing.get_context("fork")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "agent.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[SqliteStore]:
    with SqliteStore(db_path) as opened:
        yield opened


def put(store: Store, key: str, value: bytes) -> None:
    with store.transaction() as txn:
        txn.put(key, value)


def increment(store: Store, key: str) -> None:
    with store.transaction() as txn:
        raw = txn.get(key)
        txn.put(key, str(int(raw or b"0") + 1).encode())


class TestReadsAndWrites:
    def test_a_put_value_can_be_read_back_inside_and_after_the_transaction(
        self, store: SqliteStore
    ) -> None:
        with store.transaction() as txn:
            txn.put("endpoints/abc", b"\x00binary\xff")
            assert txn.get("endpoints/abc") == b"\x00binary\xff"
        assert store.get("endpoints/abc") == b"\x00binary\xff"

    def test_a_missing_key_reads_as_none(self, store: SqliteStore) -> None:
        assert store.get("nothing/here") is None
        with store.transaction() as txn:
            assert txn.get("nothing/here") is None

    def test_put_replaces_the_previous_value(self, store: SqliteStore) -> None:
        put(store, "k", b"one")
        put(store, "k", b"two")
        assert store.get("k") == b"two"

    def test_list_returns_exactly_the_keys_under_the_prefix_sorted(
        self, store: SqliteStore
    ) -> None:
        with store.transaction() as txn:
            for key in ["a/b", "a/a", "a", "a0", "a/\u00e9", "b/a", "a/z/deep", "A/x"]:
                txn.put(key, key.encode())
        assert [k for k, _ in store.list("a/")] == ["a/a", "a/b", "a/z/deep", "a/\u00e9"]
        assert store.list("a/b") == [("a/b", b"a/b")]
        assert store.list("zz") == []

    def test_list_with_an_empty_prefix_returns_everything(self, store: SqliteStore) -> None:
        put(store, "y", b"1")
        put(store, "x", b"2")
        assert store.list("") == [("x", b"2"), ("y", b"1")]

    def test_get_many_reads_several_keys_in_order(self, store: SqliteStore) -> None:
        with store.transaction() as txn:
            txn.put("b", b"2")
            txn.put("a", b"1")
            assert txn.get_many(["b", "missing", "a"]) == [b"2", None, b"1"]
        assert store.get_many(["a", "b", "missing"]) == [b"1", b"2", None]

    def test_delete_reports_whether_the_key_existed(self, store: SqliteStore) -> None:
        put(store, "k", b"v")
        with store.transaction() as txn:
            assert txn.delete("k") is True
            assert txn.delete("k") is False
            assert txn.get("k") is None
        assert store.get("k") is None

    def test_delete_prefix_removes_only_that_subtree_and_counts_it(
        self, store: SqliteStore
    ) -> None:
        with store.transaction() as txn:
            for key in ["ep/1", "ep/2", "ep/3/x", "ep0", "ipam/1"]:
                txn.put(key, b"v")
        with store.transaction() as txn:
            assert txn.delete_prefix("ep/") == 3
            assert txn.delete_prefix("ep/") == 0
        assert [k for k, _ in store.list("")] == ["ep0", "ipam/1"]

    def test_a_transaction_sees_its_own_deletes_and_puts_in_list(self, store: SqliteStore) -> None:
        put(store, "p/1", b"old")
        with store.transaction() as txn:
            txn.delete("p/1")
            txn.put("p/2", b"new")
            assert txn.list("p/") == [("p/2", b"new")]

    def test_json_helpers_round_trip_canonical_json(self, store: SqliteStore) -> None:
        with store.transaction() as txn:
            txn.put_json("j", {"b": [1, 2.5, None, True], "a": "\u00fc"})
            assert txn.get_json("j") == {"a": "\u00fc", "b": [1, 2.5, None, True]}
        assert store.get("j") == '{"a":"\u00fc","b":[1,2.5,null,true]}'.encode()
        assert store.get_json("j") == {"a": "\u00fc", "b": [1, 2.5, None, True]}
        assert store.get_json("missing") is None

    def test_json_helpers_reject_a_value_that_is_not_json(self, store: SqliteStore) -> None:
        put(store, "raw", b"\xffnot json")
        with pytest.raises(StoreDataError, match="'raw' is not valid JSON"):
            store.get_json("raw")

    @pytest.mark.parametrize("key", ["", "tab\tkey", "nul\x00key", "line\nkey", "\ud800"])
    def test_unprintable_or_empty_keys_are_rejected(self, store: SqliteStore, key: str) -> None:
        with store.transaction() as txn, pytest.raises(StoreKeyError):
            txn.put(key, b"v")
        with pytest.raises(StoreKeyError):
            store.get(key)

    def test_delete_prefix_refuses_the_empty_prefix(self, store: SqliteStore) -> None:
        with store.transaction() as txn, pytest.raises(StoreKeyError, match="every key"):
            txn.delete_prefix("")

    def test_values_must_be_bytes(self, store: SqliteStore) -> None:
        with store.transaction() as txn:
            with pytest.raises(TypeError, match="bytes, not str"):
                txn.put("k", "text")  # type: ignore[arg-type]
            txn.put("k", bytearray(b"ok"))  # type: ignore[arg-type]
        assert store.get("k") == b"ok"


class TestTransactions:
    def test_a_transaction_that_raises_leaves_nothing_behind(self, store: SqliteStore) -> None:
        put(store, "kept", b"before")
        with pytest.raises(RuntimeError, match="boom"), store.transaction() as txn:
            txn.put("kept", b"changed")
            txn.put("new", b"v")
            txn.delete_prefix("kept")
            raise RuntimeError("boom")
        assert store.list("") == [("kept", b"before")]

    def test_uncommitted_writes_are_invisible_to_store_reads_even_on_the_same_thread(
        self, store: SqliteStore
    ) -> None:
        with store.transaction() as txn:
            txn.put("k", b"pending")
            assert store.get("k") is None
            assert store.list("") == []
        assert store.get("k") == b"pending"

    def test_transactions_do_not_nest(self, store: SqliteStore) -> None:
        with (
            store.transaction(),
            pytest.raises(StoreError, match="do not nest"),
            store.transaction(),
        ):
            pass

    def test_a_transaction_object_cannot_be_used_after_its_block(self, store: SqliteStore) -> None:
        with store.transaction() as txn:
            txn.put("k", b"v")
        with pytest.raises(TxnFinishedError):
            txn.get("k")
        with pytest.raises(TxnFinishedError):
            txn.put("k", b"w")
        assert store.get("k") == b"v"

    def test_a_failed_operation_rolls_the_transaction_back_even_if_the_caller_carries_on(
        self, store: SqliteStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        with pytest.raises(StoreError, match="rolled back"), store.transaction() as txn:
            txn.put("first", b"v")
            real_conn = txn._conn
            broken = sqlite3.connect(":memory:")
            broken.close()
            txn._conn = broken  # any statement on a closed connection fails
            with pytest.raises(StoreError):
                txn.put("second", b"v")
            txn._conn = real_conn
        assert store.get("first") is None

    def test_the_revision_counts_committed_write_transactions(self, store: SqliteStore) -> None:
        assert store.revision() == 0
        with store.transaction() as txn:
            txn.put("a", b"1")
            txn.put("b", b"2")
        assert store.revision() == 1
        with store.transaction() as txn:
            txn.get("a")
            txn.delete("missing")
        assert store.revision() == 1, "a transaction that changed nothing is not a revision"
        with pytest.raises(ValueError), store.transaction() as txn:
            txn.put("c", b"3")
            raise ValueError
        assert store.revision() == 1, "a rolled-back transaction is not a revision"
        with store.transaction() as txn:
            txn.delete("a")
        assert store.revision() == 2

    def test_each_row_records_the_revision_that_last_wrote_it(
        self, store: SqliteStore, db_path: Path
    ) -> None:
        put(store, "a", b"1")
        put(store, "b", b"1")
        put(store, "a", b"2")
        with sqlite3.connect(db_path) as raw:
            rows = dict(raw.execute("SELECT key, revision FROM kv").fetchall())
        assert rows == {"a": 3, "b": 2}


class TestConcurrency:
    def test_threads_incrementing_one_counter_lose_no_update(self, store: SqliteStore) -> None:
        threads, rounds = 8, 50
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for _ in range(rounds):
                    increment(store, "counter")
            except BaseException as exc:  # surfaced below; a thread would swallow it
                errors.append(exc)

        workers = [threading.Thread(target=work) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert errors == []
        assert store.get("counter") == str(threads * rounds).encode()
        assert store.revision() == threads * rounds

    def test_processes_incrementing_one_counter_lose_no_update(
        self, store: SqliteStore, db_path: Path
    ) -> None:
        rounds = 100
        children = [MP.Process(target=_increment_in_child, args=(db_path, rounds)) for _ in "ab"]
        for child in children:
            child.start()
        for _ in range(rounds):  # the parent competes too
            increment(store, "counter")
        for child in children:
            child.join(timeout=60)
            assert child.exitcode == 0
        assert store.get("counter") == str(3 * rounds).encode()

    def test_a_writer_waiting_past_the_busy_timeout_gets_a_retryable_error(
        self, store: SqliteStore, db_path: Path
    ) -> None:
        impatient = SqliteStore(db_path, busy_timeout=0.05)
        holding, release = threading.Event(), threading.Event()

        def hold_the_write_lock() -> None:
            with store.transaction() as txn:
                txn.put("k", b"v")
                holding.set()
                release.wait(10)

        holder = threading.Thread(target=hold_the_write_lock)
        holder.start()
        try:
            holding.wait(10)
            with pytest.raises(StoreUnavailableError, match="retry"), impatient.transaction():
                pass
            assert impatient.get("k") is None, "readers are not blocked by the writer"
        finally:
            release.set()
            holder.join()
            impatient.close()
        assert store.get("k") == b"v"

    def test_another_process_reads_committed_data_while_a_write_is_open(
        self, store: SqliteStore, db_path: Path
    ) -> None:
        put(store, "k", b"committed")
        parent_end, child_end = MP.Pipe()
        with store.transaction() as txn:
            txn.put("k", b"uncommitted")
            child = MP.Process(target=_read_in_child, args=(db_path, "k", child_end))
            child.start()
            assert parent_end.poll(30), "the reader was blocked by the open write"
            assert parent_end.recv() == b"committed"
            child.join(30)

    def test_a_store_object_refuses_to_be_used_after_fork(self, store: SqliteStore) -> None:
        put(store, "k", b"v")
        parent_end, child_end = MP.Pipe()
        child = MP.Process(target=_use_inherited_store, args=(store, child_end))
        child.start()
        assert parent_end.poll(30)
        assert "open a new SqliteStore after fork" in parent_end.recv()
        child.join(30)
        assert store.get("k") == b"v", "the parent's store still works"


def _increment_in_child(path: Path, rounds: int) -> None:
    with SqliteStore(path) as store:
        for _ in range(rounds):
            increment(store, "counter")


def _read_in_child(path: Path, key: str, conn: Connection) -> None:
    with SqliteStore(path) as store:
        conn.send(store.get(key))


def _use_inherited_store(store: SqliteStore, conn: Connection) -> None:
    try:
        store.get("k")
        conn.send("no error")
    except StoreClosedError as exc:
        conn.send(str(exc))


class TestDurability:
    def test_committed_data_survives_close_and_reopen(self, db_path: Path) -> None:
        with SqliteStore(db_path) as store:
            put(store, "ipam/v4/10.0.0.2", b"owner")
            revision = store.revision()
        with SqliteStore(db_path) as reopened:
            assert reopened.get("ipam/v4/10.0.0.2") == b"owner"
            assert reopened.revision() == revision

    def test_the_store_uses_wal_with_full_sync(self, store: SqliteStore, db_path: Path) -> None:
        with sqlite3.connect(db_path) as raw:
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn = store._connection(writer=True)
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL

    def test_the_file_and_its_new_directory_are_private(self, db_path: Path) -> None:
        with SqliteStore(db_path):
            pass
        assert stat.S_IMODE(db_path.stat().st_mode) & 0o077 == 0
        assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700 & ~_umask()

    def test_a_file_that_is_not_a_store_is_refused_clearly(self, tmp_path: Path) -> None:
        bogus = tmp_path / "bogus.db"
        bogus.write_bytes(b"definitely not sqlite" * 100)
        with pytest.raises(StoreError, match=r"bogus\.db"):
            SqliteStore(bogus)

    def test_a_closed_store_raises_store_closed(self, db_path: Path) -> None:
        store = SqliteStore(db_path)
        store.close()
        with pytest.raises(StoreClosedError):
            store.get("k")
        with pytest.raises(StoreClosedError), store.transaction():
            pass


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


KEYS = 2000
BIG = 4096  # 2000 x 4 KiB overflows SQLite's 2 MiB page cache, so pages spill to the WAL


class TestCrashSafety:
    def test_sigkill_in_the_middle_of_a_big_transaction_leaves_the_store_as_before(
        self, store: SqliteStore, db_path: Path
    ) -> None:
        with store.transaction() as txn:
            for i in range(KEYS):
                txn.put(f"data/{i:05}", b"0" * BIG)
        parent_end, child_end = MP.Pipe()
        child = MP.Process(target=_big_transaction_then_hang, args=(db_path, child_end))
        child.start()
        assert parent_end.poll(60), "the child never got half-way"
        assert parent_end.recv() == "half-way"
        wal = db_path.with_name(db_path.name + "-wal")
        assert wal.stat().st_size > 1 << 20, "uncommitted pages should have reached the WAL"
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
        assert child.exitcode == -signal.SIGKILL

        with SqliteStore(db_path) as reopened:
            values = {value for _, value in reopened.list("data/")}
            assert values == {b"0" * BIG}
            assert len(reopened.list("data/")) == KEYS
            assert reopened.get("extra") is None
        _assert_integrity(db_path)

    def test_sigkill_at_a_random_moment_never_leaves_half_a_transaction_or_loses_a_commit(
        self, db_path: Path
    ) -> None:
        with SqliteStore(db_path) as store, store.transaction() as txn:
            for i in range(200):
                txn.put(f"gen/{i:03}", b"0")
        for delay in (0.05, 0.13, 0.31):
            parent_end, child_end = MP.Pipe()
            child = MP.Process(target=_rewrite_generations, args=(db_path, child_end))
            child.start()
            time.sleep(delay)
            assert child.pid is not None
            os.kill(child.pid, signal.SIGKILL)
            child.join(30)
            reported = 0
            while parent_end.poll():
                reported = parent_end.recv()
            with SqliteStore(db_path) as store:
                generations = {int(value) for _, value in store.list("gen/")}
            assert len(generations) == 1, f"half a transaction survived: {generations}"
            (survivor,) = generations
            assert survivor >= reported, "a commit the child saw return was lost"
        _assert_integrity(db_path)


def _big_transaction_then_hang(path: Path, conn: Connection) -> None:
    store = SqliteStore(path)
    with store.transaction() as txn:
        txn.put("extra", b"x")
        for i in range(KEYS):
            txn.put(f"data/{i:05}", b"1" * BIG)
        conn.send("half-way")
        time.sleep(120)  # killed before commit


def _rewrite_generations(path: Path, conn: Connection) -> None:
    store = SqliteStore(path)
    generation = int(store.get("gen/000") or b"0")
    while True:
        generation += 1
        with store.transaction() as txn:
            for i in range(200):
                txn.put(f"gen/{i:03}", str(generation).encode())
        conn.send(generation)


def _assert_integrity(path: Path) -> None:
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
