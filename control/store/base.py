"""The node agent's state store interface: a transactional key-value store.

Everything the agent must keep across restarts (IPAM, endpoints, identities) goes through
this interface. It is deliberately shaped like etcd rather than like SQL tables: string keys
in a hierarchical namespace (``ipam/v4/10.0.0.5``), opaque byte values, prefix listing,
and all-or-nothing transactions. :class:`~ciliate.control.store.sqlite.SqliteStore`
implements it for one node; an etcd implementation (optimistic transactions, watches)
can implement it for the cluster without changing the callers.

Rules every implementation keeps:

* A transaction sees its own writes and a consistent view of everything else; it commits
  when its ``with`` block ends normally and leaves no trace when the block raises.
* ``Store.get`` / ``Store.list`` read committed data only, never another transaction's
  (nor the calling thread's own open transaction's) uncommitted writes.
* ``list`` returns ``(key, value)`` pairs sorted by key (code-point order).
* Keys are non-empty printable strings; values are bytes. The JSON helpers store
  compact, key-sorted UTF-8 JSON.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Protocol, TypeAlias

__all__ = [
    "Json",
    "JsonIn",
    "KeyRevisions",
    "KeyValues",
    "Reader",
    "Store",
    "StoreClosedError",
    "StoreConflictError",
    "StoreDataError",
    "StoreError",
    "StoreKeyError",
    "StoreUnavailableError",
    "Txn",
    "TxnFinishedError",
    "Values",
    "check_key",
    "check_prefix",
    "check_value",
    "decode_json",
    "encode_json",
]

# What the JSON helpers return (what json.loads produces) ...
Json: TypeAlias = dict[str, "Json"] | list["Json"] | str | int | float | bool | None
# ... and what they accept (read-only views suffice, so a Mapping[str, str] fits).
JsonIn: TypeAlias = Mapping[str, "JsonIn"] | Sequence["JsonIn"] | str | int | float | bool | None

# A module-level name because ``list`` is shadowed inside classes that define list().
KeyValues: TypeAlias = list[tuple[str, bytes]]
# (key, revision of its last write): what a store that can list revisions returns.
KeyRevisions: TypeAlias = list[tuple[str, int]]
Values: TypeAlias = list[bytes | None]


class StoreError(Exception):
    """Base class for every store error."""


class StoreUnavailableError(StoreError):
    """The store is temporarily unusable (locked by another writer past the timeout,
    etcd unreachable). Retrying the whole transaction later may succeed."""


class StoreConflictError(StoreError):
    """An optimistic transaction lost against a concurrent writer; retry it from the start.

    SqliteStore never raises it (its write transactions take the write lock up front);
    etcd-backed stores do.
    """


class StoreClosedError(StoreError):
    """The store was closed (or is used from a process it was not opened in)."""


class TxnFinishedError(StoreError):
    """A transaction object was used after its ``with`` block ended."""


class StoreKeyError(StoreError, ValueError):
    """A key or prefix is not acceptable (empty, not a string, not printable)."""


class StoreDataError(StoreError):
    """A stored value is not what its reader expects (not JSON, wrong shape)."""


def check_key(key: str) -> None:
    """Refuse a key every implementation could not keep: keys are non-empty printable
    strings (portable to etcd and to CLI output; no NUL or lone surrogates, which SQLite
    TEXT cannot hold faithfully)."""
    if not isinstance(key, str) or not key or not key.isprintable():
        raise StoreKeyError(f"store keys must be non-empty printable strings, not {key!r}")


def check_prefix(prefix: str, *, allow_empty: bool) -> None:
    """Refuse a prefix as :func:`check_key` does; the empty prefix (every key) only where
    ``allow_empty`` (listing, never deleting)."""
    if not isinstance(prefix, str) or not prefix.isprintable():
        raise StoreKeyError(f"key prefixes must be printable strings, not {prefix!r}")
    if not prefix and not allow_empty:
        raise StoreKeyError("an empty prefix would delete every key; name what to delete")


def check_value(value: bytes) -> bytes:
    """The value as ``bytes`` (bytearray and memoryview are copied); anything else is a
    caller's mistake."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"store values are bytes, not {type(value).__name__}")


def encode_json(value: JsonIn) -> bytes:
    """The canonical byte form the JSON helpers store: compact, key-sorted UTF-8."""
    # NaN/Infinity are not JSON; other languages reading the store would choke on them.
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def decode_json(key: str, raw: bytes | None) -> Json:
    """Decode a value written by :func:`encode_json`; ``None`` stays ``None``."""
    if raw is None:
        return None
    try:
        value: Json = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreDataError(f"value of {key!r} is not valid JSON: {exc}") from exc
    return value


class Reader(Protocol):
    """What both a store (committed data) and a transaction (its own view) can read."""

    def get(self, key: str) -> bytes | None:
        """The value of ``key``, or ``None`` if it does not exist."""
        ...

    def list(self, prefix: str) -> KeyValues:
        """Every ``(key, value)`` whose key starts with ``prefix``, sorted by key."""
        ...

    def get_json(self, key: str) -> Json:
        """The JSON value of ``key``, or ``None`` if it does not exist."""
        return decode_json(key, self.get(key))

    def get_many(self, keys: Sequence[str]) -> Values:
        """The values of ``keys`` (``None`` where absent), in order; a store may read them
        in one round trip (etcd does)."""
        return [self.get(key) for key in keys]


class Txn(Reader, Protocol):
    """One all-or-nothing unit of reads and writes, valid only inside its ``with`` block."""

    def put(self, key: str, value: bytes) -> None:
        """Create or replace ``key``."""
        ...

    def delete(self, key: str) -> bool:
        """Remove ``key``; ``True`` if it existed."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Remove every key starting with ``prefix`` (which must not be empty); how many."""
        ...

    def put_json(self, key: str, value: JsonIn) -> None:
        """Store ``value`` as canonical JSON under ``key``."""
        self.put(key, encode_json(value))


class Store(Reader, Protocol):
    """A durable transactional key-value store."""

    def transaction(self) -> AbstractContextManager[Txn]:
        """Open a transaction: ``with store.transaction() as txn: ...``.

        Commits when the block ends normally, rolls back when it raises. Transactions do
        not nest. May raise :class:`StoreUnavailableError` or :class:`StoreConflictError`
        (on entry or on commit); both mean "run the whole block again".
        """
        ...

    def revision(self) -> int:
        """The number of write transactions committed so far (0 for a new store).

        It increases by exactly one per committed transaction that changed something.
        """
        ...

    def close(self) -> None:
        """Release the store's resources; later use raises :class:`StoreClosedError`."""
        ...
