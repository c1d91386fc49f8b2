"""The node agent's persistent state: a transactional key-value store interface and its
SQLite implementation (one file per node). See :mod:`.base` for the contract."""

from .base import (
    Json,
    JsonIn,
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
    decode_json,
    encode_json,
)
from .sqlite import SqliteStore, SqliteTxn

__all__ = [
    "Json",
    "JsonIn",
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
    "decode_json",
    "encode_json",
]
