"""What changed among some kinds of object since the last look: the service
controllers' input, so that a pass costs what changed rather than what exists.

:class:`ObjectChanges` remembers, per object key, what it last saw. Each
:meth:`~ObjectChanges.poll` lists the keys of its kinds written since the last
poll began (``SqliteStore.list_revisions(after=...)``: keys and revisions, no
values), counts the keys (``SqliteStore.count``) to tell whether one was deleted
(only then are all the keys listed), reads the values of the keys written, and
reports those and the keys that went: a poll with nothing new costs two range
scans inside SQLite per kind, whatever the number of objects. A store that cannot
list revisions (etcd today) is listed whole and compared by value (slower, same
answer). The first poll, and the first after :meth:`~ObjectChanges.reset`, lists
everything and says so (``full``): a controller rebuilds its caches from it.

Listing revisions before reading values keeps the feed from missing a write: a write
landing in between leaves a value newer than the revision remembered, so the next
poll reads the key again (a harmless repeat), never the reverse.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ciliate.control.objects import Kind, parse_key
from ciliate.control.objects.store import PREFIX
from ciliate.control.store import Store, StoreDataError, decode_json

__all__ = ["Changes", "KeyChanges", "ObjectChanges"]


@runtime_checkable
class _ListsRevisions(Protocol):
    def list_revisions(self, prefix: str, *, after: int = 0) -> list[tuple[str, int]]: ...

    def count(self, prefix: str) -> int: ...


@dataclass
class Changes:
    """Objects written (key -> the object as stored now) and keys deleted since the
    last poll, for each kind polled (by kind name). ``full``: ``changed`` holds every
    object there is, and the caller must forget whatever it knew."""

    full: bool = False
    changed: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    deleted: dict[str, set[str]] = field(default_factory=dict)

    def of(self, kind: str) -> dict[str, dict[str, Any]]:
        return self.changed.get(kind, {})

    def gone(self, kind: str) -> set[str]:
        return self.deleted.get(kind, set())

    @property
    def empty(self) -> bool:
        return not self.full and not any(self.changed.values()) and not any(self.deleted.values())


class KeyChanges:
    """The keys written and deleted under some prefixes of ``store``, poll after
    poll, as raw values (one reader: not thread-safe). ``accept`` drops keys that
    are not the caller's (checked once, when a key is first seen)."""

    def __init__(
        self,
        store: Store,
        prefixes: Sequence[str],
        *,
        accept: Callable[[str], bool] = lambda _key: True,
    ) -> None:
        self._store = store
        self._prefixes = list(prefixes)
        self._accept = accept
        # prefix -> key -> what identifies the version seen: its revision, or its bytes.
        self._seen: dict[str, dict[str, object]] = {}
        self._polled_at = 0  # the store's revision when the last poll began
        self._full = True
        self._relist = False

    def reset(self) -> None:
        """The next poll lists everything (after a store error, or to heal a cache)."""
        self._full = True

    def relist(self) -> None:
        """The next poll compares every key's revision with the one seen, rather
        than trusting the count (cheap: keys and revisions only, no values)."""
        self._relist = True

    def forget(self, keys: Iterable[str]) -> None:
        """Keys the caller deleted itself: not reported as deletions again, and the
        next poll need not list every key to find them."""
        for seen in self._seen.values():
            for key in keys:
                seen.pop(key, None)

    def poll_raw(self) -> tuple[bool, dict[str, dict[str, bytes]], dict[str, set[str]]]:
        """``(full, written, deleted)``: by prefix, the values written since the last
        poll (every value when ``full``) and the keys deleted."""
        full = self._full
        seen: dict[str, dict[str, object]] = {}
        written: dict[str, dict[str, bytes]] = {}
        deleted: dict[str, set[str]] = {}
        by_revision = isinstance(self._store, _ListsRevisions)
        # Read before the listings: a write landing during them is listed again next time.
        polled_at = self._store.revision() if by_revision else 0
        if polled_at < self._polled_at:
            full = True  # the store went back (restored from a copy): start over
        for prefix in self._prefixes:
            before = {} if full else self._seen.get(prefix, {})
            if by_revision:
                now, values = self._by_revision(prefix, before, full=full)
            else:
                now, values = self._by_value(prefix, before)
            written[prefix] = {}
            for key, raw in values.items():
                if raw is None:  # deleted between the listing and the read
                    now.pop(key, None)
                else:
                    written[prefix][key] = raw
            deleted[prefix] = {key for key in before if key not in now}
            seen[prefix] = now
        # Remembered only once every prefix was read: a failed poll is repeated whole.
        self._seen, self._polled_at, self._full, self._relist = seen, polled_at, False, False
        return full, written, deleted

    def _by_revision(
        self, prefix: str, before: dict[str, object], *, full: bool
    ) -> tuple[dict[str, object], dict[str, bytes | None]]:
        assert isinstance(self._store, _ListsRevisions)
        if full:
            now: dict[str, object] = {
                key: revision
                for key, revision in self._store.list_revisions(prefix)
                if self._accept(key)
            }
            # A first listing reads the values in one range, not key by key.
            values: dict[str, bytes | None] = {
                key: raw for key, raw in self._store.list(prefix) if key in now
            }
            return now, {key: values.get(key) for key in now}
        # Written since the last poll, and how many there are: if the count is the
        # one expected from what was known plus what is new, nothing was deleted and
        # the unchanged keys need not be listed at all. (A write racing the two
        # queries can hide a deletion from this count; it shows at the next poll,
        # which the write itself causes.)
        written = self._store.list_revisions(prefix, after=self._polled_at)
        count = self._store.count(prefix)
        fresh = {key for key, _ in written if key not in before}
        if count == len(before) + len(fresh) and not self._relist:
            now = dict(before)
            now.update(written)
            changed = [key for key, _ in written]
        else:
            listed = self._store.list_revisions(prefix)
            now = dict(listed)
            fresh = now.keys() - before.keys()
            # Every revision compared, not only the recent ones: a write missed
            # before shows here (and one since the query above has a newer revision).
            changed = [key for key, revision in listed if before.get(key) != revision]
        for key in fresh:
            if not self._accept(key):
                del now[key]
        stale = [key for key in changed if key in now and now[key] != before.get(key)]
        return now, dict(zip(stale, self._store.get_many(stale), strict=True))

    def _by_value(
        self, prefix: str, before: dict[str, object]
    ) -> tuple[dict[str, object], dict[str, bytes | None]]:
        now: dict[str, object] = {}
        values: dict[str, bytes | None] = {}
        for key, raw in self._store.list(prefix):
            if key not in before and not self._accept(key):
                continue
            now[key] = raw
            if before.get(key) != raw:
                values[key] = raw
        return now, values


class ObjectChanges(KeyChanges):
    """The changes of ``kinds`` of object, decoded (:class:`Changes`)."""

    def __init__(self, store: Store, kinds: Sequence[Kind]) -> None:
        self._kinds = {f"{PREFIX}{kind.key}/": kind.name for kind in kinds}
        # Keys that are not objects (none are written there, but the store is shared).
        super().__init__(store, list(self._kinds), accept=lambda key: parse_key(key) is not None)

    def poll(self) -> Changes:
        full, written, deleted = self.poll_raw()
        changes = Changes(full=full)
        for prefix, kind in self._kinds.items():
            objects: dict[str, dict[str, Any]] = {}
            for key, raw in written[prefix].items():
                doc = decode_json(key, raw)
                if not isinstance(doc, dict):
                    raise StoreDataError(f"object {key!r} is not a JSON object")
                objects[key] = doc
            changes.changed[kind] = objects
            changes.deleted[kind] = deleted[prefix]
        return changes


class ResyncSchedule:
    """When a controller's feeds relist (every key's revision compared, keys only)
    or start over from a full listing; a pass asks :meth:`before_poll` first and
    says :meth:`started_over` once a poll came back full."""

    def __init__(self, *, relist_interval: float, full_interval: float) -> None:
        self._relist_interval = relist_interval
        self._full_interval = full_interval
        self._last_full = self._last_relist = time.monotonic()

    def before_poll(self, *feeds: KeyChanges) -> None:
        now = time.monotonic()
        if now - self._last_full >= self._full_interval:
            for feed in feeds:
                feed.reset()
        elif now - self._last_relist >= self._relist_interval:
            for feed in feeds:
                feed.relist()
            self._last_relist = now

    def started_over(self) -> None:
        self._last_full = time.monotonic()
