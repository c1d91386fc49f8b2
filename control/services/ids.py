"""Stable numeric ids for the datapath: a service id per frontend (also its
reverse-NAT index, 16 bits as in Cilium) and a backend id per backend address
(32 bits), shared by every frontend that sends to it.

An id stays with its frontend or backend for as long as it is in the table, across
recomputation and across agent restarts: the ids live in the node's store (as
Cilium keeps them in its state), next to the last one handed out. New ids are
handed out *after* the last one, wrapping at the maximum, so a freed id comes back
as late as possible: connections tracked under an old service id must not be
reverse-translated as another service's.

::

    services/ids/frontend/<ip>:<port>/<proto>   {"id": n}
    services/ids/backend/<ip>:<port>/<proto>    {"id": n}
    services/ids/last/frontend | backend        {"id": n}
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from ciliate.control.services.table import BackendKey, Frontend, FrontendKey
from ciliate.control.store import Store, StoreDataError, Txn, decode_json

__all__ = [
    "BACKEND_ID_MAX",
    "PREFIX",
    "SERVICE_ID_MAX",
    "IdsExhaustedError",
    "LbIds",
    "LoadBalancerIds",
    "assign_ids",
]

PREFIX = "services/ids/"
SERVICE_ID_MAX = 0xFFFF
BACKEND_ID_MAX = 0xFFFF_FFFF

_K = TypeVar("_K")


class IdsExhaustedError(RuntimeError):
    """Every id of a pool is in use (65,535 frontends on one node)."""


def _next_free(last: int, used: Collection[int], maximum: int) -> int:
    candidate = last
    for _ in range(maximum):
        candidate = candidate % maximum + 1
        if candidate not in used:
            return candidate
    raise IdsExhaustedError(f"all {maximum} ids are in use")


def assign_ids(
    keys: Iterable[_K], *, current: Mapping[_K, int], last: int, maximum: int
) -> tuple[dict[_K, int], int]:
    """Ids for ``keys``: the ones they have in ``current``, new ones after ``last``
    (1..maximum, wrapping, skipping ids in use). Returns the ids and the new last."""
    wanted = sorted(set(keys), key=str)
    ids = {key: current[key] for key in wanted if key in current}
    used = set(ids.values())
    candidate = last
    for key in wanted:
        if key in ids:
            continue
        candidate = _next_free(candidate, used, maximum)
        ids[key] = candidate
        used.add(candidate)
    return ids, candidate


@dataclass(frozen=True)
class LoadBalancerIds:
    frontend: dict[FrontendKey, int]
    backend: dict[BackendKey, int]
    released_frontends: list[int] = field(default_factory=list)
    released_backends: list[int] = field(default_factory=list)


def _parse_key(text: str) -> tuple[ipaddress.IPv4Address, int, str]:
    address, _, protocol = text.rpartition("/")
    ip, _, port = address.rpartition(":")
    return ipaddress.IPv4Address(ip), int(port), protocol


@dataclass
class _Pool:
    ids: dict[str, int]  # key text -> id
    used: set[int]
    last: int


class LbIds:
    """The ids of a node, kept in its store, and in memory between passes: a pass
    that adds one frontend reads and writes that frontend's id alone
    (:meth:`update`); :meth:`sync` compares the whole table with the store (the
    first pass, a resync). After a failed write, :meth:`forget` makes the next use
    read the store again."""

    def __init__(self, store: Store, *, prefix: str = PREFIX) -> None:
        self._store = store
        self._prefix = prefix
        self._pools: dict[str, _Pool] | None = None

    def forget(self) -> None:
        self._pools = None

    def _read(self, txn: Txn, pool: str) -> tuple[dict[str, int], int]:
        current = {}
        for key, raw in txn.list(f"{self._prefix}{pool}/"):
            doc = decode_json(key, raw)
            value = doc.get("id") if isinstance(doc, dict) else None
            if not isinstance(value, int):
                raise StoreDataError(f"{key} holds {doc!r}, not an id")
            current[key.removeprefix(f"{self._prefix}{pool}/")] = value
        last_doc = txn.get_json(f"{self._prefix}last/{pool}")
        last = last_doc.get("id") if isinstance(last_doc, dict) else 0
        return current, last if isinstance(last, int) else 0

    def _sync_pool(
        self, txn: Txn, pool: str, keys: Sequence[str], maximum: int
    ) -> tuple[dict[str, int], list[int], int]:
        current, last = self._read(txn, pool)
        ids, new_last = assign_ids(keys, current=current, last=last, maximum=maximum)
        for key, value in ids.items():
            if current.get(key) != value:
                txn.put_json(f"{self._prefix}{pool}/{key}", {"id": value})
        released = []
        for key, value in current.items():
            if key not in ids:
                txn.delete(f"{self._prefix}{pool}/{key}")
                released.append(value)
        if new_last != last:
            txn.put_json(f"{self._prefix}last/{pool}", {"id": new_last})
        return ids, sorted(released), new_last

    def sync(self, frontends: Sequence[Frontend]) -> LoadBalancerIds:
        """Ids for the table's frontends and backends (kept, or new), in one
        transaction; the ids of those no longer in the table are freed."""
        backend_keys = {
            b.key for f in frontends for b in (*f.backends, *(f.internal_backends or ()))
        }
        self._pools = None
        with self._store.transaction() as txn:
            frontend_ids, released_frontends, frontend_last = self._sync_pool(
                txn, "frontend", [str(f.key) for f in frontends], SERVICE_ID_MAX
            )
            backend_ids, released_backends, backend_last = self._sync_pool(
                txn, "backend", [str(k) for k in backend_keys], BACKEND_ID_MAX
            )
        self._pools = {
            "frontend": _Pool(frontend_ids, set(frontend_ids.values()), frontend_last),
            "backend": _Pool(backend_ids, set(backend_ids.values()), backend_last),
        }
        return LoadBalancerIds(
            frontend={FrontendKey(*_parse_key(k)): v for k, v in frontend_ids.items()},
            backend={BackendKey(*_parse_key(k)): v for k, v in backend_ids.items()},
            released_frontends=released_frontends,
            released_backends=released_backends,
        )

    def update(
        self,
        *,
        frontends: Iterable[FrontendKey] = (),
        backends: Iterable[BackendKey] = (),
        released_frontends: Iterable[FrontendKey] = (),
        released_backends: Iterable[BackendKey] = (),
    ) -> None:
        """Ids for new frontends and backends (those that have one keep it), and the
        released ones' freed, in one transaction that writes only those."""
        if self._pools is None:
            with self._store.transaction() as txn:
                pools = {}
                for name in ("frontend", "backend"):
                    ids, last = self._read(txn, name)
                    pools[name] = _Pool(ids, set(ids.values()), last)
            self._pools = pools
        plan = {
            "frontend": (sorted(map(str, frontends)), sorted(map(str, released_frontends))),
            "backend": (sorted(map(str, backends)), sorted(map(str, released_backends))),
        }
        if not any(new or gone for new, gone in plan.values()):
            return
        pools = self._pools
        assigned: dict[str, list[tuple[str, int]]] = {name: [] for name in plan}
        lasts = {name: pool.last for name, pool in pools.items()}
        try:
            with self._store.transaction() as txn:
                for name, (new, gone) in plan.items():
                    pool = pools[name]
                    for key in gone:
                        if key in pool.ids:
                            txn.delete(f"{self._prefix}{name}/{key}")
                    maximum = SERVICE_ID_MAX if name == "frontend" else BACKEND_ID_MAX
                    for key in new:
                        if key in pool.ids:
                            continue
                        # Freed ids count as used until the next pass: handed out late.
                        lasts[name] = _next_free(lasts[name], pool.used, maximum)
                        pool.used.add(lasts[name])
                        assigned[name].append((key, lasts[name]))
                        txn.put_json(f"{self._prefix}{name}/{key}", {"id": lasts[name]})
                    if lasts[name] != pool.last:
                        txn.put_json(f"{self._prefix}last/{name}", {"id": lasts[name]})
        except BaseException:
            for name, pairs in assigned.items():
                pools[name].used.difference_update(value for _, value in pairs)
            raise
        # Committed: the memory follows the store.
        for name, (_, gone) in plan.items():
            pool = pools[name]
            for key in gone:
                value = pool.ids.pop(key, None)
                if value is not None:
                    pool.used.discard(value)
            pool.ids.update(assigned[name])
            pool.last = lasts[name]

    def frontend_id(self, key: FrontendKey) -> int | None:
        return self._pools["frontend"].ids.get(_text(key)) if self._pools else None

    def backend_id(self, key: BackendKey) -> int | None:
        return self._pools["backend"].ids.get(_text(key)) if self._pools else None


@functools.lru_cache(maxsize=1 << 17)
def _text(key: FrontendKey | BackendKey) -> str:
    """A key as the store names it; formatting an address is slow and the same keys
    are looked up pass after pass."""
    return str(key)
