"""``ciliate-operator``: the command line and process of the cluster-pool operator
(:mod:`ciliate.control.operator.reconciler` does the work). Exit status 2 on a
configuration error, with one line saying which flag is wrong."""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import cast

from ciliate.control.identity import gc as identity_gc
from ciliate.control.identity.allocator import DEFAULT_QUARANTINE
from ciliate.control.ipam import ClusterPool, PoolConfigError
from ciliate.control.operator.endpointslices import EndpointSliceController
from ciliate.control.operator.reconciler import Operator, OperatorStore
from ciliate.control.store.base import Store, StoreError

log = logging.getLogger("ciliate.operator")

# Node loss: an agent restart (seconds) must never look like a lost node; a dead node's
# CIDR is back in the pool a minute later.
DEFAULT_NODE_GRACE_PERIOD = 60.0

# ClusterPool names its options as Python keywords; the command line has flags.
_FLAG_NAMES = {
    "ipv4_cidrs": "--cluster-pool-ipv4-cidr",
    "ipv4_mask": "--cluster-pool-ipv4-mask-size",
    "ipv6_cidrs": "--cluster-pool-ipv6-cidr",
    "ipv6_mask": "--cluster-pool-ipv6-mask-size",
}
_FLAG_RE = re.compile(r"\b(" + "|".join(_FLAG_NAMES) + r")\b")


def _as_flags(message: str) -> str:
    return _FLAG_RE.sub(lambda m: _FLAG_NAMES[m.group(1)], message)


def _split(values: Sequence[str] | None) -> list[str]:
    """Repeated flags and comma-separated lists (as Cilium's string slices) alike."""
    return [part.strip() for value in values or () for part in value.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ciliate-operator",
        description="Cluster-pool IPAM: hands each node its pod CIDRs from the cluster CIDRs.",
    )
    pool = parser.add_argument_group("cluster pool")
    pool.add_argument(
        "--cluster-pool-ipv4-cidr",
        action="append",
        metavar="CIDR",
        help="IPv4 cluster CIDR to carve node CIDRs from (repeatable, or comma-separated)",
    )
    pool.add_argument(
        "--cluster-pool-ipv4-mask-size", type=int, metavar="BITS", help="IPv4 node CIDR prefix"
    )
    pool.add_argument(
        "--cluster-pool-ipv6-cidr",
        action="append",
        metavar="CIDR",
        help="IPv6 cluster CIDR to carve node CIDRs from (repeatable, or comma-separated)",
    )
    pool.add_argument(
        "--cluster-pool-ipv6-mask-size", type=int, metavar="BITS", help="IPv6 node CIDR prefix"
    )
    kv = parser.add_argument_group("cluster store")
    kv.add_argument("--kvstore", choices=("etcd", "sqlite"), default="etcd")
    kv.add_argument(
        "--etcd-endpoint",
        action="append",
        metavar="URL",
        help="etcd endpoint (repeatable; default http://127.0.0.1:2379)",
    )
    kv.add_argument(
        "--kvstore-path", type=Path, metavar="FILE", help="SQLite file (--kvstore sqlite)"
    )
    parser.add_argument(
        "--resync-interval", type=float, default=30.0, metavar="S", help="full resync period"
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=1.0,
        metavar="S",
        help="how often to poll a store that cannot watch (sqlite)",
    )
    parser.add_argument(
        "--node-grace-period",
        type=float,
        default=DEFAULT_NODE_GRACE_PERIOD,
        metavar="S",
        help="remove a node (and free its pod CIDRs) once its liveness lease has been gone "
        f"this long (default {DEFAULT_NODE_GRACE_PERIOD:.0f}; a negative value: never; "
        "etcd only: SQLite has no leases)",
    )
    ids = parser.add_argument_group("identity garbage collection")
    ids.add_argument(
        "--identity-gc-grace-period",
        type=float,
        default=identity_gc.DEFAULT_GRACE,
        metavar="S",
        help="remove an identity no node has held for this long "
        f"(default {identity_gc.DEFAULT_GRACE:.0f}; a negative value: never)",
    )
    ids.add_argument(
        "--identity-quarantine",
        type=float,
        default=DEFAULT_QUARANTINE,
        metavar="S",
        help="keep a removed identity's number out of allocation this long "
        f"(default {DEFAULT_QUARANTINE:.0f})",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0)
    return parser


def _error(message: str) -> int:
    print(f"ciliate-operator: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def _open_store(args: argparse.Namespace) -> OperatorStore:
    if args.kvstore == "sqlite":
        from ciliate.control.store.sqlite import SqliteStore

        return SqliteStore(args.kvstore_path)
    from ciliate.control.store.etcd import EtcdStore

    endpoints = _split(args.etcd_endpoint) or ["http://127.0.0.1:2379"]
    store: OperatorStore = EtcdStore(endpoints)
    return store


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        pool = ClusterPool(
            ipv4_cidrs=_split(args.cluster_pool_ipv4_cidr),
            ipv4_mask=args.cluster_pool_ipv4_mask_size,
            ipv6_cidrs=_split(args.cluster_pool_ipv6_cidr),
            ipv6_mask=args.cluster_pool_ipv6_mask_size,
        )
    except PoolConfigError as exc:
        return _error(_as_flags(str(exc)))
    if args.resync_interval <= 0 or args.poll_interval <= 0:
        return _error("--resync-interval and --poll-interval must be positive")
    if args.identity_quarantine < 0:
        return _error("--identity-quarantine must not be negative")
    if args.kvstore == "sqlite" and args.kvstore_path is None:
        return _error("--kvstore sqlite needs --kvstore-path FILE")
    if args.kvstore == "etcd" and args.kvstore_path is not None:
        return _error("--kvstore-path is for --kvstore sqlite; etcd takes --etcd-endpoint")
    try:
        store = _open_store(args)
    except ImportError as exc:
        return _error(f"the etcd kvstore is not available ({exc}); use --kvstore sqlite")
    except StoreError as exc:
        print(f"ciliate-operator: cannot open the cluster store: {exc}", file=sys.stderr)
        return 1

    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    operator = Operator(
        store,
        pool,
        resync_interval=args.resync_interval,
        poll_interval=args.poll_interval,
        node_grace_period=(
            args.node_grace_period
            if args.node_grace_period >= 0 and args.kvstore == "etcd"
            else None
        ),
    )
    v4 = ", ".join(map(str, pool.ipv4_cidrs)) or "-"
    v6 = ", ".join(map(str, pool.ipv6_cidrs)) or "-"
    log.info(
        "cluster pool: IPv4 %s (/%s), IPv6 %s (/%s); kvstore %s",
        v4,
        args.cluster_pool_ipv4_mask_size,
        v6,
        args.cluster_pool_ipv6_mask_size,
        args.kvstore,
    )
    if args.identity_gc_grace_period >= 0:
        identity_gc.IdentityGc(
            cast(Store, store),  # EtcdStore or SqliteStore: a whole Store
            grace=args.identity_gc_grace_period,
            quarantine=args.identity_quarantine,
        ).start(stop)
    slice_controller = EndpointSliceController(cast(Store, store))
    slice_controller.start()
    try:
        operator.run(stop)
    finally:
        slice_controller.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        close: Callable[[], None] | None = getattr(store, "close", None)
        if close is not None:
            close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
