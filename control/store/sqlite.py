"""SQLite implementation of the store: the node agent's embedded, crash-safe state file.

Layout: one table ``kv(key TEXT PRIMARY KEY, value BLOB NOT NULL, revision INTEGER)`` holds
the key space; ``revision`` is the store revision of the transaction that last wrote the
row (etcd's ``mod_revision``). A one-row-per-setting ``meta`` table holds the global
revision counter and the schema version, so they never show up in key listings.

Durability: ``journal_mode=WAL`` with ``synchronous=FULL`` by default, so a transaction
whose ``with`` block has returned is on disk: a SIGKILLed (or power-cut) agent never loses
a committed CNI ADD, and a transaction interrupted at any point leaves no trace. With
``synchronous="normal"`` a commit is not fsynced: it survives the process being killed
(the WAL is in the page cache) but not a power cut -- which the node agent accepts,
since a power cut also ends every pod it could have lost.

Concurrency: every thread gets its own pair of connections, created on first use: a
*writer* for transactions and a *reader* for ``Store.get``/``list``/``revision``.
Write transactions start with ``BEGIN IMMEDIATE``, i.e. they take SQLite's write lock
up front, so they serialise against each other -- across threads and across processes
(the agent and a CLI) with the same mechanism -- and never fail half-way with a lock
upgrade error; waiting for the lock is bounded by ``busy_timeout``, after which
:class:`StoreUnavailableError` says "retry". Readers never block writers or each other (WAL)
and, having their own connection, never see an open transaction's uncommitted writes.
A store object must not cross ``fork()``: open a new one in the child.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Literal

from .base import (
    KeyRevisions,
    KeyValues,
    Store,
    StoreClosedError,
    StoreDataError,
    StoreError,
    StoreUnavailableError,
    Txn,
    TxnFinishedError,
    check_key,
    check_prefix,
    check_value,
)

__all__ = ["SqliteStore", "SqliteTxn"]

SCHEMA_VERSION = 1

# Keys with their revisions, without the values the table holds inline: what
# list_revisions() and count() scan (a range of 10,000 keys in well under a
# millisecond, against ~10 ms through the table's pages). Stores made before it
# get it on first use of those two.
_REVISION_INDEX = "CREATE INDEX IF NOT EXISTS kv_key_revision ON kv (key, revision)"

_SCHEMA = (
    # WITHOUT ROWID: the key is the only lookup path, so store rows in the key's b-tree.
    "CREATE TABLE IF NOT EXISTS kv ("
    " key TEXT PRIMARY KEY, value BLOB NOT NULL, revision INTEGER NOT NULL"
    ") WITHOUT ROWID",
    _REVISION_INDEX,
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0)",
    f"INSERT OR IGNORE INTO meta (name, value) VALUES ('schema', {SCHEMA_VERSION})",
)

# SQLite primary result codes that mean "someone else holds the lock; try again later".
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6


def _translate(exc: sqlite3.Error, *, path: str, doing: str) -> StoreError:
    """Map a sqlite3 exception onto the store's error tree."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int) and code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return StoreUnavailableError(
            f"store {path} is locked by another writer ({doing}): {exc}; retry the transaction"
        )
    if isinstance(exc, sqlite3.ProgrammingError) and "closed" in str(exc):
        return StoreClosedError(f"store {path} was closed ({doing})")
    return StoreError(f"store {path}: {doing} failed: {exc}")


def _prefix_end(prefix: str) -> str | None:
    """The smallest string greater than every string starting with ``prefix``.

    SQLite compares TEXT with memcmp over UTF-8, which is code-point order, so
    ``prefix <= key < _prefix_end(prefix)`` is exactly "key starts with prefix" and can
    use the primary-key index. ``None`` means there is no upper bound.
    """
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        if last < 0x10FFFF:
            following = last + 1
            if 0xD800 <= following <= 0xDFFF:  # surrogates never occur in valid keys
                following = 0xE000
            return "".join(chars) + chr(following)
    return None


def _range_clause(prefix: str) -> tuple[str, tuple[str, ...]]:
    end = _prefix_end(prefix)
    if end is None:
        return "key >= ?", (prefix,)
    return "key >= ? AND key < ?", (prefix, end)


def _as_bytes(value: object) -> bytes:
    # Rows written by hand (sqlite3 CLI) may hold TEXT; callers are promised bytes.
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    raise StoreDataError(f"stored value has unexpected SQLite type {type(value).__name__}")


def _get(conn: sqlite3.Connection, key: str) -> bytes | None:
    check_key(key)
    row = conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
    return None if row is None else _as_bytes(row[0])


def _list(conn: sqlite3.Connection, prefix: str) -> KeyValues:
    check_prefix(prefix, allow_empty=True)
    where, args = _range_clause(prefix)
    rows = conn.execute(f"SELECT key, value FROM kv WHERE {where} ORDER BY key", args)
    return [(key, _as_bytes(value)) for key, value in rows]


class _ThreadConnections:
    """One thread's connections; closed when the thread's locals are dropped."""

    __slots__ = ("__weakref__", "pid", "reader", "writer")

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.reader: sqlite3.Connection | None = None
        self.writer: sqlite3.Connection | None = None

    def close(self) -> None:
        if os.getpid() != self.pid:
            return  # inherited across fork: closing here could disturb the parent's file
        for conn in (self.reader, self.writer):
            if conn is not None:
                with suppress(sqlite3.Error):
                    conn.close()
        self.reader = self.writer = None

    def __del__(self) -> None:
        # Runs when the owning thread exits (threading.local drops it), so short-lived
        # threads do not leak file descriptors until close().
        self.close()


class SqliteTxn(Txn):
    """A write transaction on one connection; valid only inside its ``with`` block."""

    def __init__(self, conn: sqlite3.Connection, *, path: str) -> None:
        self._conn = conn
        self._path = path
        self._open = True
        self._failed = False
        self._revision: int | None = None  # assigned on the first write

    def get(self, key: str) -> bytes | None:
        self._check_open()
        try:
            return _get(self._conn, key)
        except sqlite3.Error as exc:
            raise self._fail(exc, doing=f"get {key!r}") from exc

    def list(self, prefix: str) -> KeyValues:
        self._check_open()
        try:
            return _list(self._conn, prefix)
        except sqlite3.Error as exc:
            raise self._fail(exc, doing=f"list {prefix!r}") from exc

    def put(self, key: str, value: bytes) -> None:
        self._check_open()
        check_key(key)
        data = check_value(value)
        try:
            self._conn.execute(
                "INSERT INTO kv (key, value, revision) VALUES (?, ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value,"
                " revision = excluded.revision",
                (key, data, self._write_revision()),
            )
        except sqlite3.Error as exc:
            raise self._fail(exc, doing=f"put {key!r}") from exc

    def delete(self, key: str) -> bool:
        self._check_open()
        check_key(key)
        try:
            deleted = self._conn.execute("DELETE FROM kv WHERE key = ?", (key,)).rowcount
            if deleted:
                self._write_revision()
        except sqlite3.Error as exc:
            raise self._fail(exc, doing=f"delete {key!r}") from exc
        return deleted > 0

    def delete_prefix(self, prefix: str) -> int:
        self._check_open()
        check_prefix(prefix, allow_empty=False)
        where, args = _range_clause(prefix)
        try:
            deleted: int = self._conn.execute(f"DELETE FROM kv WHERE {where}", args).rowcount
            if deleted:
                self._write_revision()
        except sqlite3.Error as exc:
            raise self._fail(exc, doing=f"delete prefix {prefix!r}") from exc
        return deleted

    def _write_revision(self) -> int:
        # The first write of a transaction claims the next store revision; the write
        # lock (BEGIN IMMEDIATE) makes the read-increment race-free across processes.
        if self._revision is None:
            self._conn.execute("UPDATE meta SET value = value + 1 WHERE name = 'revision'")
            row = self._conn.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
            self._revision = int(row[0])
        return self._revision

    def _check_open(self) -> None:
        if not self._open:
            raise TxnFinishedError("transaction used after its `with` block ended")

    def _fail(self, exc: sqlite3.Error, *, doing: str) -> StoreError:
        # A failed statement may have undone part of the transaction; never commit it,
        # even if the caller catches the error and carries on.
        self._failed = True
        return _translate(exc, path=self._path, doing=doing)


class SqliteStore(Store):
    """A :class:`~ciliate.control.store.base.Store` in one SQLite file.

    ``path`` is created if missing (file mode 0600, leaf directory 0700). ``busy_timeout``
    bounds how long a transaction waits for another writer before raising
    :class:`StoreUnavailableError`. Safe to share between threads; see the module docs.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 5.0,
        synchronous: Literal["full", "normal"] = "full",
    ) -> None:
        if synchronous not in ("full", "normal"):
            raise ValueError(f"synchronous must be 'full' or 'normal', not {synchronous!r}")
        self._synchronous = synchronous.upper()
        self._path = os.fspath(path)
        self._busy_timeout = busy_timeout
        self._pid = os.getpid()
        self._closed = False
        self._local = threading.local()
        self._registry_lock = threading.Lock()
        self._registry: weakref.WeakSet[_ThreadConnections] = weakref.WeakSet()
        self._revision_index = False
        _create_file(self._path)
        try:
            self._init_schema()
        except BaseException:
            self.close()
            raise

    @property
    def path(self) -> str:
        return self._path

    def __repr__(self) -> str:
        return f"SqliteStore({self._path!r})"

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- reads of committed data -------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        conn = self._connection(writer=False)
        try:
            return _get(conn, key)
        except sqlite3.Error as exc:
            raise _translate(exc, path=self._path, doing=f"get {key!r}") from exc

    def list(self, prefix: str) -> KeyValues:
        conn = self._connection(writer=False)
        try:
            return _list(conn, prefix)
        except sqlite3.Error as exc:
            raise _translate(exc, path=self._path, doing=f"list {prefix!r}") from exc

    def _ensure_revision_index(self) -> None:
        if self._revision_index:
            return
        conn = self._connection(writer=False)
        try:
            found = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'kv_key_revision'"
            ).fetchone()
        except sqlite3.Error as exc:
            raise _translate(exc, path=self._path, doing="look for the revision index") from exc
        if found is None:
            with self.transaction() as txn:
                try:
                    txn._conn.execute(_REVISION_INDEX)
                except sqlite3.Error as exc:
                    raise _translate(exc, path=self._path, doing="index revisions") from exc
        self._revision_index = True

    def list_revisions(self, prefix: str, *, after: int = 0) -> KeyRevisions:
        """``(key, revision of its last write)`` of every key under ``prefix`` written
        after revision ``after``, sorted, without the values: what a controller compares
        with what it saw last to read only the keys that changed (etcd's keys-only range
        with ``min_mod_revision``). With :meth:`count` it also tells a deletion."""
        check_prefix(prefix, allow_empty=True)
        self._ensure_revision_index()
        where, args = _range_clause(prefix)
        conn = self._connection(writer=False)
        try:
            return conn.execute(
                f"SELECT key, revision FROM kv WHERE {where} AND revision > ? ORDER BY key",
                (*args, after),
            ).fetchall()
        except sqlite3.Error as exc:
            raise _translate(exc, path=self._path, doing=f"list revisions {prefix!r}") from exc

    def count(self, prefix: str) -> int:
        """How many keys there are under ``prefix``."""
        check_prefix(prefix, allow_empty=True)
        self._ensure_revision_index()
        where, args = _range_clause(prefix)
        conn = self._connection(writer=False)
        try:
            return int(conn.execute(f"SELECT count(*) FROM kv WHERE {where}", args).fetchone()[0])
        except sqlite3.Error as exc:
            raise _translate(exc, path=self._path, doing=f"count {prefix!r}") from exc

    def revision(self) -> int:
        conn = self._connection(writer=False)
        try:
            row = conn.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
        except sqlite3.Error as exc:
            raise _translate(exc, path=self._path, doing="read revision") from exc
        return int(row[0])

    # -- transactions --------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[SqliteTxn]:
        conn = self._connection(writer=True)
        if conn.in_transaction:
            raise StoreError(
                "a transaction is already open on this thread; transactions do not nest"
            )
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _translate(exc, path=self._path, doing="begin transaction") from exc
        txn = SqliteTxn(conn, path=self._path)
        try:
            yield txn
        except BaseException:
            txn._open = False
            _rollback(conn)
            raise
        txn._open = False
        if txn._failed:
            _rollback(conn)
            raise StoreError(
                "an operation inside the transaction failed; the transaction was rolled back"
            )
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(conn)
            raise _translate(exc, path=self._path, doing="commit") from exc

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Close every thread's connections. Do not call while another thread still
        uses the store; afterwards every call raises :class:`StoreClosedError`."""
        with self._registry_lock:
            self._closed = True
            pairs = list(self._registry)
            self._registry.clear()
        for pair in pairs:
            pair.close()

    def _connection(self, *, writer: bool) -> sqlite3.Connection:
        if self._closed:
            raise StoreClosedError(f"store {self._path} is closed")
        if os.getpid() != self._pid:
            # SQLite connections (and their POSIX locks) do not survive fork().
            raise StoreClosedError(
                f"store {self._path} was opened in process {self._pid}, not in this one "
                f"({os.getpid()}); open a new SqliteStore after fork()"
            )
        pair: _ThreadConnections | None = getattr(self._local, "connections", None)
        if pair is None:
            pair = _ThreadConnections()
            with self._registry_lock:
                if self._closed:
                    raise StoreClosedError(f"store {self._path} is closed")
                self._registry.add(pair)
            self._local.connections = pair
        conn = pair.writer if writer else pair.reader
        if conn is None:
            conn = self._connect()
            if writer:
                pair.writer = conn
            else:
                pair.reader = conn
        return conn

    def _connect(self) -> sqlite3.Connection:
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves. check_same_thread
            # is off only so close() (and a dying thread's cleanup) may close it.
            conn = sqlite3.connect(
                self._path,
                timeout=self._busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise _translate(exc, path=self._path, doing="open") from exc
        try:
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        except sqlite3.Error as exc:
            conn.close()
            raise _translate(exc, path=self._path, doing="configure connection") from exc
        return conn

    def _init_schema(self) -> None:
        conn = self._connection(writer=True)
        try:
            # WAL is a property of the file: set once, every later connection uses it.
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.Error as exc:
            raise _translate(exc, path=self._path, doing="enable WAL") from exc
        if str(mode).lower() != "wal":
            raise StoreError(
                f"store {self._path}: SQLite refused WAL mode (got {mode!r}); "
                "put the store on a local filesystem"
            )
        # An existing store is only read here: opening it (a CLI next to a busy agent)
        # must not wait for the write lock.
        version = self._schema_version(conn)
        if version is None:
            with self.transaction():
                try:
                    for statement in _SCHEMA:
                        conn.execute(statement)
                except sqlite3.Error as exc:
                    raise _translate(exc, path=self._path, doing="create schema") from exc
                version = self._schema_version(conn)
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"store {self._path} has schema version {version}, this ciliate "
                f"understands {SCHEMA_VERSION}; upgrade ciliate or move the file away"
            )

    def _schema_version(self, conn: sqlite3.Connection) -> int | None:
        try:
            exists = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
            ).fetchone()
            if exists is None:
                return None
            row = conn.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
        except sqlite3.Error as exc:
            raise _translate(exc, path=self._path, doing="read schema version") from exc
        return None if row is None else int(row[0])


def _rollback(conn: sqlite3.Connection) -> None:
    # A failed COMMIT or statement may already have ended the transaction.
    if conn.in_transaction:
        with suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _create_file(path: str) -> None:
    """Create the store file (0600) and its directory (0700) if missing."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StoreError(f"cannot create store {path}: {exc.strerror}") from exc
    os.close(fd)
