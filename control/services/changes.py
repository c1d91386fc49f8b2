"""What changed among some kinds of object since the last look: the service
controllers' input, so that a pass costs what changed rather than what exists.

:class:`ObjectChanges` remembers, per object key, what it last saw. Each
:meth:`~ObjectChanges.poll` lists the keys of its kinds with the revision of their
last write (``SqliteStore.list_revisions``: keys only, no values), reads the values
of the keys whose revision moved, and reports those and the keys that went. A store
that cannot list revisions is listed whole and compared by value (slower, same
answer). The first poll, and the first after :meth:`~ObjectChanges.reset`, lists
everything and says so (``full``): a controller rebuilds its caches from it.

Listing revisions before reading values keeps the feed from missing a write: a write
landing in between leaves a value newer than the revision remembered, so the next
poll reads the key again (a harmless repeat), never the reverse.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ciliate.control.objects import Kind, parse_key
from ciliate.control.objects.store import PREFIX
from ciliate.control.store import Store, StoreDataError, decode_json

__all__ = ["Changes", "ObjectChanges"]


@runtime_checkable
class _ListsRevisions(Protocol):
    def list_revisions(self, prefix: str) -> list[tuple[str, int]]: ...


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


class ObjectChanges:
    """The changes of ``kinds`` in ``store``, poll after poll (one reader: not
    thread-safe)."""

    def __init__(self, store: Store, kinds: Sequence[Kind]) -> None:
        self._store = store
        self._kinds = list(kinds)
        # key -> what identifies the version seen: its revision, or its bytes.
        self._seen: dict[str, dict[str, object]] = {}
        self._full = True

    def reset(self) -> None:
        """The next poll lists everything (after a store error, or to heal a cache)."""
        self._full = True

    def poll(self) -> Changes:
        full = self._full
        changes = Changes(full=full)
        seen: dict[str, dict[str, object]] = {}
        for kind in self._kinds:
            prefix = f"{PREFIX}{kind.key}/"
            before = {} if full else self._seen.get(kind.name, {})
            if isinstance(self._store, _ListsRevisions):
                now, values = self._by_revision(prefix, before)
            else:
                now, values = self._by_value(prefix, before)
            objects: dict[str, dict[str, Any]] = {}
            for key, raw in values.items():
                if raw is None:  # deleted between the listing and the read
                    now.pop(key, None)
                    continue
                doc = decode_json(key, raw)
                if not isinstance(doc, dict):
                    raise StoreDataError(f"object {key!r} is not a JSON object")
                objects[key] = doc
            changes.changed[kind.name] = objects
            changes.deleted[kind.name] = {key for key in before if key not in now}
            seen[kind.name] = now
        # Remembered only once every kind was read: a failed poll is repeated whole.
        self._seen, self._full = seen, False
        return changes

    def _by_revision(
        self, prefix: str, before: dict[str, object]
    ) -> tuple[dict[str, object], dict[str, bytes | None]]:
        assert isinstance(self._store, _ListsRevisions)
        now: dict[str, object] = dict(self._store.list_revisions(prefix))
        # Keys that are not objects (none are written there, but the store is shared)
        # are dropped once, when first seen.
        for key in [key for key in now if key not in before and parse_key(key) is None]:
            del now[key]
        if not before:
            # A first listing reads the values in one range, not key by key.
            values: dict[str, bytes | None] = {
                key: raw for key, raw in self._store.list(prefix) if key in now
            }
            return now, {key: values.get(key) for key in now}
        stale = [key for key, revision in now.items() if before.get(key) != revision]
        return now, dict(zip(stale, self._store.get_many(stale), strict=True))

    def _by_value(
        self, prefix: str, before: dict[str, object]
    ) -> tuple[dict[str, object], dict[str, bytes | None]]:
        now: dict[str, object] = {}
        values: dict[str, bytes | None] = {}
        for key, raw in self._store.list(prefix):
            if parse_key(key) is None:
                continue
            now[key] = raw
            if before.get(key) != raw:
                values[key] = raw
        return now, values
