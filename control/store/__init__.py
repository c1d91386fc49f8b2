"""The node agent's persistent state: a transactional key-value store interface and its
SQLite implementation (one file per node). See :mod:`.base` for the contract.

The etcd implementation (:mod:`.etcd`: EtcdStore and its transactions, watches and
leases) is exported lazily: importing it loads gRPC, which a node that never uses etcd
(and the CNI plugin) should not pay for."""

from typing import TYPE_CHECKING

from .base import (
    Json,
    JsonIn,
    KeyRevisions,
    KeyValues,
    Reader,
    Store,
    StoreClosedError,
    StoreConflictError,
    StoreDataError,
    StoreError,
    StoreKeyError,
    StoreUnavailableError,
    Txn,
    TxnFinishedError,
    Values,
    decode_json,
    encode_json,
)
from .sqlite import SqliteStore, SqliteTxn

if TYPE_CHECKING:
    from .etcd import EtcdLease, EtcdStore, EtcdTxn, EtcdWatch, WatchEvent, WatchEventType

_ETCD_EXPORTS = frozenset(
    {"EtcdLease", "EtcdStore", "EtcdTxn", "EtcdWatch", "WatchEvent", "WatchEventType"}
)


def __getattr__(name: str) -> object:
    if name in _ETCD_EXPORTS:
        from . import etcd

        return getattr(etcd, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EtcdLease",
    "EtcdStore",
    "EtcdTxn",
    "EtcdWatch",
    "Json",
    "JsonIn",
    "KeyRevisions",
    "KeyValues",
    "Reader",
    "SqliteStore",
    "SqliteTxn",
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
    "WatchEvent",
    "WatchEventType",
    "decode_json",
    "encode_json",
]
