"""The store on etcd: the cluster's shared state (nodes, pod CIDRs, identities, endpoints).

:class:`EtcdStore` implements the :class:`~ciliate.control.store.base.Store` protocol on an
etcd v3 cluster, synchronously: an asyncio event loop in a private background thread runs
the gRPC client (``aetcd``'s generated etcd v3 stubs on a ``grpc.aio`` channel), and every
public method hands its work to that loop and waits. Methods are thread-safe;
:meth:`EtcdStore.close` stops the loop and the thread. Keys given to the store are
relative; they live under ``prefix`` (``/ciliate/`` by default).

Transactions: optimistic software transactional memory
-------------------------------------------------------
``with store.transaction() as txn:`` reads from etcd at one fixed revision (taken by the
first read) and buffers its writes (reads see them). When the block ends, one etcd
transaction commits the writes *if* everything read is unchanged:

* every key read with ``get`` (or probed by ``delete``) is compared ``mod_revision ==
  <the mod_revision seen>`` -- 0 for a key that was absent, which etcd's compare also
  yields for a missing key, so a key created meanwhile fails the compare, and so does a key
  deleted meanwhile (its mod_revision is now 0) or deleted and re-created;
* every range read with ``list(prefix)`` (and ``delete_prefix``) is guarded twice: each key
  it returned is compared as above, which catches keys changed or *deleted* inside the
  range, and one range compare ``mod_revision < read_revision + 1`` over the whole
  ``[prefix, prefix_end)`` -- etcd applies a range compare to every key that exists in the
  range at commit time, so any key *added* (or changed) in the range after the read revision
  fails it. Together: the commit succeeds only if the range holds exactly the keys, at
  exactly the revisions, that the transaction listed (no phantoms, no lost deletes);
  counting keys is not needed and would not be atomic anyway.

So a committed transaction is serializable at its commit revision. When a compare fails
nothing is written and :class:`StoreConflictError` is raised; a ``with`` block cannot be
re-run, so :meth:`EtcdStore.run_transaction` re-runs a function on conflict with jittered
exponential backoff -- the way callers should use this store. A read-only transaction
writes nothing and needs no commit (its reads are one consistent snapshot).

etcd limits a transaction to ``--max-txn-ops`` compares and as many writes (128 by
default; nested transactions count against the same budget, so splitting does not help).
A transaction that read more keys (a ``list`` of a large prefix) or writes more is refused
with a :class:`StoreError` that says so: run etcd with a larger ``--max-txn-ops``
(:class:`~ciliate.control.lab.etcd_server.EtcdServer` starts it with 8192).

Connection failures (etcd down, no leader, timeouts) raise :class:`StoreUnavailableError`:
retry later. A commit that times out may or may not have been applied (etcd gives no
answer); it is reported as unavailable like any other failure.

Watches and leases
------------------
:meth:`EtcdStore.watch_prefix` streams PUT/DELETE events of a prefix from a revision on;
when the connection drops (etcd restart) it reconnects and resumes from the last revision
it delivered, so no event is lost or repeated; if that history was compacted meanwhile it
delivers one RESYNC event with the whole current content of the prefix instead.

:meth:`EtcdStore.lease` grants a lease and keeps it alive in the background; keys written
with ``txn.put(key, value, lease=lease)`` (or :meth:`EtcdStore.put_with_lease`) disappear
when the lease expires. If the lease is found gone (expired while etcd was unreachable,
revoked by someone else, data lost), a new one is granted and the keys written through
this store with the old one are put again, so a node's liveness key comes back by itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import itertools
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from aetcd import rpc  # type: ignore[import-untyped, import-not-found, unused-ignore]

from .base import (
    KeyRevisions,
    KeyValues,
    Store,
    StoreClosedError,
    StoreConflictError,
    StoreError,
    StoreKeyError,
    StoreUnavailableError,
    Txn,
    TxnFinishedError,
    Values,
    check_key,
    check_prefix,
    check_value,
)

__all__ = [
    "EtcdLease",
    "EtcdStore",
    "EtcdTxn",
    "EtcdWatch",
    "WatchEvent",
    "WatchEventType",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

_LEASE_CHUNK = 64  # keys re-put per transaction after a lease was re-granted
_PAGE = 1000  # keys per range request when listing
_MAX_MESSAGE = 64 << 20

# etcd v3 protobuf enum values (etcdserverpb.Compare).
_CMP_EQUAL = 0
_CMP_LESS = 2
_TARGET_MOD = 2
_EVENT_PUT = 0

# gRPC status codes after which retrying later may succeed.
_UNAVAILABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
_UNAVAILABLE_DETAILS = ("no leader", "leader changed", "timed out", "too many requests")


# -- keys --------------------------------------------------------------------------------


def _range_end(prefix: bytes) -> bytes:
    """etcd's range end for "every key starting with ``prefix``" (``\\0``: to the end)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def _parse_endpoint(endpoint: str) -> tuple[str, int]:
    text = endpoint.strip()
    if "://" in text:
        scheme, _, text = text.partition("://")
        if scheme != "http":
            raise ValueError(f"etcd endpoint {endpoint!r}: only http:// (plaintext) is supported")
    text = text.rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"etcd endpoint {endpoint!r} is not host:port or http://host:port")
    return host.strip("[]"), int(port)


def _grpc_target(endpoints: Sequence[str]) -> str:
    if isinstance(endpoints, str):
        endpoints = [endpoints]
    parsed = [_parse_endpoint(e) for e in endpoints]
    if not parsed:
        raise ValueError("no etcd endpoint given")
    if len(parsed) == 1:
        host, port = parsed[0]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    # Several members: gRPC's static address list (pick_first fails over between them).
    if all(":" not in h and h.replace(".", "").isdigit() for h, _ in parsed):
        return "ipv4:" + ",".join(f"{h}:{p}" for h, p in parsed)
    if all(":" in h for h, _ in parsed):
        return "ipv6:" + ",".join(f"[{h}]:{p}" for h, p in parsed)
    raise ValueError(f"several etcd endpoints must all be IPv4 or all IPv6 literals: {endpoints}")


# -- errors ------------------------------------------------------------------------------


def _translate(exc: BaseException, doing: str) -> StoreError:
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, grpc.aio.AioRpcError):
        code = exc.code()
        details = str(exc.details() or "")
        if code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in details:
            return StoreConflictError(
                f"etcd: {doing}: the transaction's read revision was compacted; retry it"
            )
        if "future revision" in details:  # failed over to a member that lags behind
            return StoreConflictError(
                f"etcd: {doing}: this member has not reached the transaction's read "
                "revision yet; retry it"
            )
        if "too many operations" in details:
            return StoreError(
                f"etcd: {doing}: more operations than etcd's --max-txn-ops allows (a "
                "transaction compares every key it read); start etcd with a larger "
                "--max-txn-ops or read/write fewer keys per transaction"
            )
        if "lease not found" in details:
            return StoreUnavailableError(
                f"etcd: {doing}: the lease is gone (being re-granted); retry: {details}"
            )
        if code in _UNAVAILABLE_CODES or any(d in details for d in _UNAVAILABLE_DETAILS):
            return StoreUnavailableError(f"etcd unavailable ({doing}): {code.name}: {details}")
        return StoreError(f"etcd: {doing} failed: {code.name}: {details}")
    if isinstance(exc, TimeoutError | concurrent.futures.TimeoutError):
        return StoreUnavailableError(f"etcd did not answer in time ({doing}); retry later")
    if isinstance(exc, grpc.RpcError):
        return StoreUnavailableError(f"etcd unavailable ({doing}): {exc}")
    return StoreError(f"etcd: {doing} failed: {exc!r}")


# -- the event loop thread ---------------------------------------------------------------


class _LoopThread:
    """An asyncio loop running forever in a daemon thread."""

    _ids = itertools.count(1)

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self._main, name=f"etcd-store-{next(self._ids)}", daemon=True
        )
        self.thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        # Let cancelled tasks run their cleanup before the loop closes.
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self.thread

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        if not self.in_loop_thread():
            self.thread.join(10)


# -- watches -----------------------------------------------------------------------------


class WatchEventType(enum.StrEnum):
    PUT = "PUT"
    DELETE = "DELETE"
    RESYNC = "RESYNC"  # history was compacted: ``items`` is the prefix's whole content


@dataclass(frozen=True)
class WatchEvent:
    """One change under a watched prefix. ``key`` is relative to the store prefix.

    For RESYNC, ``key`` is the watched prefix, ``value`` is ``None``, ``items`` the whole
    current content of the prefix (sorted) and ``mod_revision`` the revision it was read at:
    the consumer drops what it knew and rebuilds from ``items``.
    """

    type: WatchEventType
    key: str
    value: bytes | None
    mod_revision: int
    items: tuple[tuple[str, bytes], ...] = ()


class EtcdWatch:
    """Events of one prefix, delivered from the store's loop into a thread-safe queue.

    Iterate it (blocks; ends when closed) or poll with :meth:`get`. Survives etcd restarts:
    it reconnects and resumes after the last revision it delivered.
    """

    def __init__(self, store: EtcdStore, prefix: str, start_revision: int) -> None:
        self._store = store
        self.prefix = prefix
        self._next_revision = start_revision
        self._queue: queue.Queue[WatchEvent | None] = queue.Queue()
        self._closed = threading.Event()
        self._task: asyncio.Task[None] | None = None
        self.reconnects = 0
        self.resyncs = 0

    @property
    def revision(self) -> int:
        """The last revision delivered (every event up to it has been queued)."""
        return self._next_revision - 1

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def get(self, timeout: float | None = None) -> WatchEvent | None:
        """The next event; ``None`` if none came within ``timeout`` or the watch is closed."""
        if self._closed.is_set() and self._queue.empty():
            return None
        try:
            event = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if event is None:
            self._queue.put(None)  # keep the end marker for other readers
        return event

    def __iter__(self) -> Iterator[WatchEvent]:
        while True:
            event = self._queue.get()
            if event is None:
                self._queue.put(None)
                return
            yield event

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        task = self._task
        if task is not None:
            with contextlib.suppress(RuntimeError):
                self._store._loop.loop.call_soon_threadsafe(task.cancel)
        self._queue.put(None)
        self._store._forget_watch(self)

    def __enter__(self) -> EtcdWatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- runs on the loop --------------------------------------------------------------

    def _start(self) -> None:
        self._task = self._store._loop.loop.create_task(self._run())

    async def _run(self) -> None:
        store = self._store
        key = store._full(self.prefix)
        end = _range_end(key)
        key = key or b"\0"
        backoff = 0.05
        try:
            while not self._closed.is_set():
                call = None
                try:
                    call = store._watch_stub.Watch(metadata=None)
                    await call.write(
                        rpc.WatchRequest(
                            create_request=rpc.WatchCreateRequest(
                                key=key,
                                range_end=end,
                                start_revision=self._next_revision,
                                progress_notify=True,
                            )
                        )
                    )
                    while True:
                        response = await call.read()
                        if response is grpc.aio.EOF:
                            break
                        backoff = 0.05
                        if response.compact_revision:
                            await self._resync(key, end)
                            break
                        if response.canceled:
                            raise StoreError(f"etcd cancelled the watch: {response.cancel_reason}")
                        self._deliver(response)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if self._closed.is_set():
                        break
                    log.debug("watch %r: %r; reconnecting in %.2fs", self.prefix, exc, backoff)
                finally:
                    if call is not None:
                        call.cancel()
                if self._closed.is_set():
                    break
                self.reconnects += 1
                await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, 1.0)
        except asyncio.CancelledError:
            pass
        finally:
            self._queue.put(None)

    def _deliver(self, response: Any) -> None:
        if not response.events:
            if not response.created and response.header.revision:
                # A progress notification: every event up to this revision was sent.
                self._next_revision = max(self._next_revision, int(response.header.revision) + 1)
            return
        strip = len(self._store._prefix_bytes)
        last = self._next_revision - 1
        for event in response.events:
            kv = event.kv
            revision = int(kv.mod_revision)
            put = event.type == _EVENT_PUT
            self._queue.put(
                WatchEvent(
                    type=WatchEventType.PUT if put else WatchEventType.DELETE,
                    key=bytes(kv.key)[strip:].decode(errors="replace"),
                    value=bytes(kv.value) if put else None,
                    mod_revision=revision,
                )
            )
            last = max(last, revision)
        self._next_revision = last + 1

    async def _resync(self, key: bytes, end: bytes) -> None:
        items, revision = await self._store._a_range(key, end, None)
        strip = len(self._store._prefix_bytes)
        self.resyncs += 1
        self._queue.put(
            WatchEvent(
                type=WatchEventType.RESYNC,
                key=self.prefix,
                value=None,
                mod_revision=revision,
                items=tuple((k[strip:].decode(errors="replace"), v) for k, v, _ in items),
            )
        )
        self._next_revision = revision + 1


# -- leases ------------------------------------------------------------------------------


class EtcdLease:
    """A lease kept alive by the store's loop; see the module documentation.

    ``id`` changes when the lease had to be re-granted. :meth:`close` stops the keepalive
    (the keys expire after ``ttl``); :meth:`revoke` deletes the lease and its keys now.
    """

    def __init__(self, store: EtcdStore, lease_id: int, ttl: int) -> None:
        self._store = store
        self._id = lease_id
        self.ttl = ttl
        self.regrants = 0
        self._keys: dict[bytes, bytes] = {}  # full key -> value last put with this lease
        self._closed = threading.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = threading.Lock()

    @property
    def id(self) -> int:
        return self._id

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def keys(self) -> list[str]:
        """The keys put through this store with this lease (relative)."""
        strip = len(self._store._prefix_bytes)
        with self._lock:
            return sorted(k[strip:].decode(errors="replace") for k in self._keys)

    def close(self) -> None:
        """Stop keeping the lease alive; its keys expire after ``ttl`` seconds."""
        if self._closed.is_set():
            return
        self._closed.set()
        task = self._task
        if task is not None:
            with contextlib.suppress(RuntimeError):
                self._store._loop.loop.call_soon_threadsafe(task.cancel)
        self._store._forget_lease(self)

    def revoke(self) -> None:
        """Revoke the lease now: etcd deletes every key attached to it."""
        self.close()
        self._store._run(self._store._a_revoke(self._id), doing=f"revoke lease {self._id:x}")
        with self._lock:
            self._keys.clear()

    def __enter__(self) -> EtcdLease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _attach(self, key: bytes, value: bytes) -> None:
        with self._lock:
            self._keys[key] = value

    def _detach(self, key: bytes) -> None:
        with self._lock:
            self._keys.pop(key, None)

    # -- runs on the loop --------------------------------------------------------------

    def _start(self) -> None:
        self._task = self._store._loop.loop.create_task(self._keepalive())

    async def _keepalive(self) -> None:
        store = self._store
        interval = max(self.ttl / 3.0, 0.2)
        backoff = 0.05
        while not self._closed.is_set():
            call = None
            try:
                call = store._lease_stub.LeaseKeepAlive()
                while not self._closed.is_set():
                    await call.write(rpc.LeaseKeepAliveRequest(ID=self._id))
                    response = await asyncio.wait_for(call.read(), store._timeout)
                    if response is grpc.aio.EOF:
                        raise ConnectionError("keepalive stream ended")
                    if int(response.TTL) <= 0:
                        await self._regrant()
                    backoff = 0.05
                    await asyncio.sleep(interval)
            except asyncio.CancelledError:
                break
            except Exception as exc:
                log.debug("lease %x keepalive: %r; retrying in %.2fs", self._id, exc, backoff)
            finally:
                if call is not None:
                    call.cancel()
            if self._closed.is_set():
                break
            try:
                await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
            except asyncio.CancelledError:
                break
            backoff = min(backoff * 2, 1.0)

    async def _regrant(self) -> None:
        """The lease is gone: grant a new one and put its keys again with it."""
        store = self._store
        response = await store._lease_stub.LeaseGrant(
            rpc.LeaseGrantRequest(TTL=self.ttl), timeout=store._timeout
        )
        old, self._id = self._id, int(response.ID)
        self.regrants += 1
        with self._lock:
            keys = dict(self._keys)
        ops = [
            rpc.RequestOp(request_put=rpc.PutRequest(key=k, value=v, lease=self._id))
            for k, v in keys.items()
        ]
        for chunk in _chunks(ops, _LEASE_CHUNK):
            await store._kv_stub.Txn(rpc.TxnRequest(success=chunk), timeout=store._timeout)
        log.info("lease %x was gone; re-granted as %x and put %d key(s)", old, self._id, len(ops))


def _chunks(items: Sequence[_T], size: int) -> list[list[_T]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)] or [[]]


# -- transactions ------------------------------------------------------------------------


class EtcdTxn(Txn):
    """An optimistic transaction; valid only inside its ``with`` block (see module docs)."""

    def __init__(self, store: EtcdStore) -> None:
        self._store = store
        self._open = True
        self._failed = False
        self.read_revision: int | None = None
        self._mods: dict[str, int] = {}  # every key read -> mod_revision seen (0: absent)
        self._values: dict[str, bytes | None] = {}  # snapshot values read
        self._ranges: dict[str, list[str]] = {}  # listed prefix -> keys in the snapshot
        self._writes: dict[str, bytes | None] = {}  # buffered: value, or None = delete
        self._leases: dict[str, EtcdLease] = {}

    # -- reads -------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        self._check_open()
        check_key(key)
        if key in self._writes:
            return self._writes[key]
        if key in self._values:
            return self._values[key]
        value, mod, revision = self._guarded(
            self._store._a_get(self._store._full(key), self.read_revision), f"get {key!r}"
        )
        self._note_revision(revision)
        self._values[key] = value
        self._mods[key] = mod
        return value

    def get_many(self, keys: Sequence[str]) -> Values:
        """Several keys in one round trip: one etcd Txn of range reads at the
        transaction's read revision (each key is then compared at commit, as by ``get``)."""
        self._check_open()
        for key in keys:
            check_key(key)
        unknown = [
            k for k in dict.fromkeys(keys) if k not in self._writes and k not in self._values
        ]
        if len(unknown) > 1:
            store = self._store
            found, revision = self._guarded(
                store._a_get_many([store._full(k) for k in unknown], self.read_revision),
                f"get {len(unknown)} keys",
            )
            self._note_revision(revision)
            for key, (value, mod) in zip(unknown, found, strict=True):
                self._values[key] = value
                self._mods[key] = mod
        return [self.get(key) for key in keys]

    def list(self, prefix: str) -> KeyValues:
        self._check_open()
        check_prefix(prefix, allow_empty=True)
        if prefix not in self._ranges:
            full = self._store._full(prefix)
            items, revision = self._guarded(
                self._store._a_range(full, _range_end(full), self.read_revision),
                f"list {prefix!r}",
            )
            self._note_revision(revision)
            strip = len(self._store._prefix_bytes)
            keys = []
            for raw_key, value, mod in items:
                key = raw_key[strip:].decode(errors="replace")
                keys.append(key)
                self._values[key] = value
                self._mods[key] = mod
            self._ranges[prefix] = keys
        merged: dict[str, bytes] = {}
        for key in self._ranges[prefix]:
            snapshot = self._values[key]
            if snapshot is not None:
                merged[key] = snapshot
        for key, written in self._writes.items():
            if key.startswith(prefix):
                if written is None:
                    merged.pop(key, None)
                else:
                    merged[key] = written
        return sorted(merged.items())

    # -- writes ------------------------------------------------------------------------

    def put(self, key: str, value: bytes, *, lease: EtcdLease | None = None) -> None:
        """Create or replace ``key``; with ``lease`` it is deleted when the lease ends."""
        self._check_open()
        check_key(key)
        data = check_value(value)
        if lease is not None and lease._store is not self._store:
            raise StoreError("a lease can only be used with the store that granted it")
        self._writes[key] = data
        if lease is None:
            self._leases.pop(key, None)
        else:
            self._leases[key] = lease

    def delete(self, key: str) -> bool:
        existed = self.get(key) is not None
        self._writes[key] = None
        self._leases.pop(key, None)
        return existed

    def delete_prefix(self, prefix: str) -> int:
        self._check_open()
        check_prefix(prefix, allow_empty=False)
        items = self.list(prefix)
        for key, _ in items:
            self._writes[key] = None
            self._leases.pop(key, None)
        return len(items)

    # -- internals ---------------------------------------------------------------------

    def _check_open(self) -> None:
        if not self._open:
            raise TxnFinishedError("transaction used after its `with` block ended")

    def _guarded(self, coro: Coroutine[Any, Any, _T], doing: str) -> _T:
        try:
            return self._store._run(coro, doing=doing)
        except StoreError:
            # The caller may catch this and carry on; the view is incomplete, so the
            # transaction must never commit.
            self._failed = True
            raise

    def _note_revision(self, revision: int) -> None:
        if self.read_revision is None:
            self.read_revision = revision

    def _commit(self) -> None:
        if self._failed:
            raise StoreError(
                "an operation inside the transaction failed; the transaction was rolled back"
            )
        if not self._writes:
            return  # read-only: one consistent snapshot, nothing to validate
        store = self._store
        compares = [
            rpc.Compare(
                key=store._full(key), target=_TARGET_MOD, result=_CMP_EQUAL, mod_revision=mod
            )
            for key, mod in self._mods.items()
        ]
        if self.read_revision is not None:
            for prefix in self._ranges:
                full = store._full(prefix)
                compares.append(
                    rpc.Compare(
                        key=full or b"\0",
                        range_end=_range_end(full),
                        target=_TARGET_MOD,
                        result=_CMP_LESS,
                        mod_revision=self.read_revision + 1,
                    )
                )
        ops = []
        for key, value in self._writes.items():
            full = store._full(key)
            if value is None:
                ops.append(rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=full)))
            else:
                lease = self._leases.get(key)
                ops.append(
                    rpc.RequestOp(
                        request_put=rpc.PutRequest(
                            key=full, value=value, lease=lease.id if lease else 0
                        )
                    )
                )
        request = rpc.TxnRequest(compare=compares, success=ops)
        succeeded = store._run(
            store._a_txn(request), doing=f"commit ({len(compares)} compares, {len(ops)} writes)"
        )
        if not succeeded:
            store._conflicts += 1
            raise StoreConflictError(
                "a key this transaction read was changed by another writer since revision "
                f"{self.read_revision}; run the transaction again"
            )
        store._commits += 1
        store._note_written(
            {store._full(k): v for k, v in self._writes.items()},
            {store._full(k): lease for k, lease in self._leases.items()},
        )


# -- the store ---------------------------------------------------------------------------


class EtcdStore(Store):
    """A :class:`~ciliate.control.store.base.Store` on etcd; see the module documentation.

    ``endpoints``: ``"127.0.0.1:2379"`` or ``"http://127.0.0.1:2379"`` (several members:
    all IPv4 or all IPv6 literals). ``timeout`` bounds every etcd request. Connecting is
    lazy: a store can be created while etcd is down; calls then raise
    :class:`StoreUnavailableError` until it is back.
    """

    def __init__(
        self,
        endpoints: Sequence[str] | str,
        *,
        prefix: str = "/ciliate/",
        timeout: float = 5.0,
    ) -> None:
        if not isinstance(prefix, str) or not prefix.isprintable():
            raise StoreKeyError(f"the store prefix must be a printable string, not {prefix!r}")
        self._target = _grpc_target(endpoints)
        self.endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        self.prefix = prefix
        self._prefix_bytes = prefix.encode()
        self._timeout = timeout
        self._pid = os.getpid()
        self._closed = False
        self._state_lock = threading.Lock()
        self._local = threading.local()
        self._watches: set[EtcdWatch] = set()
        self._leases: set[EtcdLease] = set()
        self._commits = 0
        self._conflicts = 0
        self._loop = _LoopThread()
        try:
            self._loop.submit(self._a_open()).result(timeout)
        except BaseException:
            self._loop.stop()
            raise

    async def _a_open(self) -> None:
        options = [
            ("grpc.enable_http_proxy", 0),  # never route the store through a proxy
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
            ("grpc.max_send_message_length", _MAX_MESSAGE),
        ]
        self._channel = grpc.aio.insecure_channel(self._target, options=options)
        self._kv_stub = rpc.KVStub(self._channel)
        self._watch_stub = rpc.WatchStub(self._channel)
        self._lease_stub = rpc.LeaseStub(self._channel)

    def __repr__(self) -> str:
        return f"EtcdStore({self._target!r}, prefix={self.prefix!r})"

    def __enter__(self) -> EtcdStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def stats(self) -> dict[str, int]:
        """Commits and conflicts (failed commits) of this store object so far."""
        return {"commits": self._commits, "conflicts": self._conflicts}

    # -- plumbing ----------------------------------------------------------------------

    def _full(self, key: str) -> bytes:
        return self._prefix_bytes + key.encode()

    def _check_usable(self) -> None:
        if self._closed:
            raise StoreClosedError(f"{self!r} is closed")
        if os.getpid() != self._pid:
            raise StoreClosedError(
                f"{self!r} was opened in process {self._pid}, not in this one "
                f"({os.getpid()}); open a new EtcdStore after fork()"
            )
        if self._loop.in_loop_thread():
            raise StoreError("EtcdStore's blocking methods cannot run on its own event loop")

    def _run(self, coro: Coroutine[Any, Any, _T], *, doing: str) -> _T:
        """Run ``coro`` on the loop and wait. Every gRPC call object must be created on the
        loop, i.e. inside a coroutine, never in the calling thread."""
        try:
            self._check_usable()
        except BaseException:
            coro.close()
            raise
        future = self._loop.submit(coro)
        try:
            return future.result(self._timeout * 2 + 2.0)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise _translate(exc, doing) from exc
        except concurrent.futures.CancelledError as exc:
            raise StoreClosedError(f"{self!r} was closed ({doing})") from exc
        except (grpc.RpcError, OSError, StoreError) as exc:
            raise _translate(exc, doing) from exc

    async def _a_get(self, key: bytes, revision: int | None) -> tuple[bytes | None, int, int]:
        """(value or None, mod_revision or 0, header revision) of one key."""
        response = await self._kv_stub.Range(
            # At a fixed revision the data is immutable: a serializable read (no ReadIndex
            # round through raft) is enough. The commit's compares catch anything stale.
            rpc.RangeRequest(key=key, revision=revision or 0, serializable=revision is not None),
            timeout=self._timeout,
        )
        header = int(response.header.revision)
        if not response.kvs:
            return None, 0, header
        kv = response.kvs[0]
        return bytes(kv.value), int(kv.mod_revision), header

    async def _a_get_many(
        self, keys: Sequence[bytes], revision: int | None
    ) -> tuple[list[tuple[bytes | None, int]], int]:
        """(value or None, mod_revision or 0) of each key, read in one Txn at ``revision``
        (None: latest), and the revision read at."""
        at = revision or 0
        response = await self._kv_stub.Txn(
            rpc.TxnRequest(
                success=[
                    rpc.RequestOp(request_range=rpc.RangeRequest(key=key, revision=at))
                    for key in keys
                ]
            ),
            timeout=self._timeout,
        )
        found: list[tuple[bytes | None, int]] = []
        for op in response.responses:
            kvs = op.response_range.kvs
            found.append((bytes(kvs[0].value), int(kvs[0].mod_revision)) if kvs else (None, 0))
        return found, at or int(response.header.revision)

    async def _a_range(
        self, key: bytes, end: bytes, revision: int | None
    ) -> tuple[list[tuple[bytes, bytes, int]], int]:
        """Every (key, value, mod_revision) in [key, end) at ``revision`` (None: latest),
        sorted by key, and the revision read at; paged, every page at one revision."""
        items: list[tuple[bytes, bytes, int]] = []
        start = key or b"\0"  # etcd needs a non-empty key; b"\0" is the first one
        at = revision or 0
        while True:
            response = await self._kv_stub.Range(
                rpc.RangeRequest(
                    key=start, range_end=end, revision=at, limit=_PAGE, serializable=bool(at)
                ),
                timeout=self._timeout,
            )
            if not at:
                at = int(response.header.revision)
            for kv in response.kvs:
                items.append((bytes(kv.key), bytes(kv.value), int(kv.mod_revision)))
            if not response.more or not response.kvs:
                break
            start = items[-1][0] + b"\0"
        items.sort(key=lambda item: item[0])
        return items, at

    async def _a_range_revisions(
        self, key: bytes, end: bytes, min_mod_revision: int
    ) -> list[tuple[bytes, int]]:
        """(key, mod_revision) of every key in [key, end) written at or after
        ``min_mod_revision``, without the values; paged, every page at one revision."""
        items: list[tuple[bytes, int]] = []
        start, at = key or b"\0", 0
        while True:
            response = await self._kv_stub.Range(
                rpc.RangeRequest(
                    key=start,
                    range_end=end,
                    revision=at,
                    limit=_PAGE,
                    keys_only=True,
                    min_mod_revision=min_mod_revision,
                    serializable=bool(at),
                ),
                timeout=self._timeout,
            )
            if not at:
                at = int(response.header.revision)
            for kv in response.kvs:
                items.append((bytes(kv.key), int(kv.mod_revision)))
            if not response.more or not response.kvs:
                break
            start = items[-1][0] + b"\0"
        items.sort(key=lambda item: item[0])
        return items

    async def _a_count(self, key: bytes, end: bytes) -> int:
        response = await self._kv_stub.Range(
            rpc.RangeRequest(key=key or b"\0", range_end=end, count_only=True),
            timeout=self._timeout,
        )
        return int(response.count)

    async def _a_txn(self, request: Any) -> bool:
        response = await self._kv_stub.Txn(request, timeout=self._timeout)
        return bool(response.succeeded)

    async def _a_grant(self, ttl: int) -> tuple[int, int]:
        response = await self._lease_stub.LeaseGrant(
            rpc.LeaseGrantRequest(TTL=ttl), timeout=self._timeout
        )
        return int(response.ID), int(response.TTL)

    async def _a_revoke(self, lease_id: int) -> None:
        await self._lease_stub.LeaseRevoke(
            rpc.LeaseRevokeRequest(ID=lease_id), timeout=self._timeout
        )

    async def _a_close_channel(self) -> None:
        await self._channel.close()

    async def _a_revision(self) -> int:
        response = await self._kv_stub.Range(
            rpc.RangeRequest(key=self._prefix_bytes or b"\0", count_only=True),
            timeout=self._timeout,
        )
        return int(response.header.revision)

    def _note_written(
        self, writes: dict[bytes, bytes | None], leases: dict[bytes, EtcdLease]
    ) -> None:
        with self._state_lock:
            mine = list(self._leases)
        for key, value in writes.items():
            lease = leases.get(key)
            for other in mine:
                if other is not lease:
                    other._detach(key)
            if lease is not None and value is not None:
                lease._attach(key, value)

    def _forget_watch(self, watch: EtcdWatch) -> None:
        with self._state_lock:
            self._watches.discard(watch)

    def _forget_lease(self, lease: EtcdLease) -> None:
        with self._state_lock:
            self._leases.discard(lease)

    # -- reads of committed data -------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        check_key(key)
        value, _, _ = self._run(self._a_get(self._full(key), None), doing=f"get {key!r}")
        return value

    def list(self, prefix: str) -> KeyValues:
        check_prefix(prefix, allow_empty=True)
        full = self._full(prefix)
        items, _ = self._run(self._a_range(full, _range_end(full), None), doing=f"list {prefix!r}")
        strip = len(self._prefix_bytes)
        return [(k[strip:].decode(errors="replace"), v) for k, v, _ in items]

    def list_revisions(self, prefix: str, *, after: int = 0) -> KeyRevisions:
        """``(key, mod_revision)`` of every key under ``prefix`` written after revision
        ``after``, sorted, without the values (a keys-only range with
        ``min_mod_revision``): with :meth:`count`, what a controller needs to read only
        the keys that changed since it last looked."""
        check_prefix(prefix, allow_empty=True)
        full = self._full(prefix)
        items = self._run(
            self._a_range_revisions(full, _range_end(full), after + 1 if after else 0),
            doing=f"list revisions {prefix!r}",
        )
        strip = len(self._prefix_bytes)
        return [(k[strip:].decode(errors="replace"), r) for k, r in items]

    def count(self, prefix: str) -> int:
        """How many keys there are under ``prefix``."""
        check_prefix(prefix, allow_empty=True)
        full = self._full(prefix)
        return self._run(self._a_count(full, _range_end(full)), doing=f"count {prefix!r}")

    def revision(self) -> int:
        """etcd's current revision (the header revision; it counts every write to the
        etcd cluster, not only this prefix's)."""
        return self._run(self._a_revision(), doing="read revision")

    # -- transactions ------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[EtcdTxn]:
        self._check_usable()
        if getattr(self._local, "txn", None) is not None:
            raise StoreError(
                "a transaction is already open on this thread; transactions do not nest"
            )
        txn = EtcdTxn(self)
        self._local.txn = txn
        try:
            yield txn
        finally:
            txn._open = False
            self._local.txn = None
        # Reached only when the block ended normally (an exception skips this).
        txn._commit()

    def run_transaction(
        self,
        fn: Callable[[EtcdTxn], _T],
        *,
        retries: int = 10,
        backoff: float = 0.01,
        max_backoff: float = 0.25,
    ) -> _T:
        """Run ``fn`` in a transaction and commit it, re-running it on conflict.

        Up to ``retries`` re-runs, sleeping a random time up to ``backoff * 2**attempt``
        (at most ``max_backoff``) before each. ``fn`` may run several times: it must have
        no side effects outside the transaction. :class:`StoreUnavailableError` and every
        other error propagate at once.
        """
        attempt = 0
        while True:
            try:
                with self.transaction() as txn:
                    result = fn(txn)
                return result
            except StoreConflictError:
                if attempt >= retries:
                    raise
            time.sleep(random.uniform(0, min(max_backoff, backoff * (2**attempt))))
            attempt += 1

    def put_with_lease(self, key: str, value: bytes, lease: EtcdLease) -> None:
        """Put ``key`` attached to ``lease`` (unconditionally, in its own transaction)."""
        with self.transaction() as txn:
            txn.put(key, value, lease=lease)

    def create(
        self,
        writes: Mapping[str, bytes],
        *,
        absent: Sequence[str],
        leases: Mapping[str, EtcdLease] | None = None,
    ) -> bool:
        """Put ``writes`` in one round trip if every key in ``absent`` is absent (Cilium's
        create-only keys); ``False``, and nothing written, if one exists. ``leases`` binds
        some of the written keys to a lease. Cheaper than a transaction that reads first
        when the caller expects the keys to be free; on ``False`` it reads and decides."""
        bound = dict(leases or {})
        for key in (*writes, *absent):
            check_key(key)
        values = {key: check_value(value) for key, value in writes.items()}
        for lease in bound.values():
            if lease._store is not self:
                raise StoreError("a lease can only be used with the store that granted it")
        request = rpc.TxnRequest(
            compare=[
                rpc.Compare(
                    key=self._full(key), target=_TARGET_MOD, result=_CMP_EQUAL, mod_revision=0
                )
                for key in absent
            ],
            success=[
                rpc.RequestOp(
                    request_put=rpc.PutRequest(
                        key=self._full(key),
                        value=value,
                        lease=bound[key].id if key in bound else 0,
                    )
                )
                for key, value in values.items()
            ],
        )
        created = self._run(self._a_txn(request), doing=f"create {len(values)} keys")
        if not created:
            self._conflicts += 1
            return False
        self._commits += 1
        self._note_written(
            {self._full(k): v for k, v in values.items()},
            {self._full(k): lease for k, lease in bound.items()},
        )
        return True

    # -- watches and leases ------------------------------------------------------------

    def watch_prefix(self, prefix: str, *, start_revision: int | None = None) -> EtcdWatch:
        """Watch every key under ``prefix`` (relative) from ``start_revision`` on
        (inclusive); by default from the first revision after now."""
        check_prefix(prefix, allow_empty=True)
        if start_revision is None:
            start_revision = self.revision() + 1
        watch = EtcdWatch(self, prefix, start_revision)
        with self._state_lock:
            self._watches.add(watch)
        self._run(_call_soon(watch._start), doing="start watch")
        return watch

    def lease(self, ttl: int) -> EtcdLease:
        """Grant a lease of ``ttl`` seconds (etcd raises very short TTLs to its minimum)
        and keep it alive in the background until it is closed or revoked."""
        if ttl < 1:
            raise ValueError("lease TTL must be at least 1 second")
        lease_id, granted = self._run(self._a_grant(ttl), doing=f"grant a {ttl}s lease")
        lease = EtcdLease(self, lease_id, granted or ttl)
        with self._state_lock:
            self._leases.add(lease)
        self._run(_call_soon(lease._start), doing="start lease keepalive")
        return lease

    # -- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Stop every watch and lease keepalive (leases are not revoked: their keys expire
        after their TTL), close the connection and the loop thread."""
        with self._state_lock:
            if self._closed:
                return
            watches, leases = list(self._watches), list(self._leases)
        for watch in watches:
            watch.close()
        for lease in leases:
            lease.close()
        if os.getpid() == self._pid and not self._loop.in_loop_thread():
            with contextlib.suppress(Exception):
                self._loop.submit(self._a_close_channel()).result(self._timeout)
        with self._state_lock:
            self._closed = True
        self._loop.stop()


async def _call_soon(fn: Callable[[], None]) -> None:
    fn()
