"""The lab's fabric process: what lives in the top-of-rack namespace (etcd,
the operator, bird as the ToR router), held by one process that
``ciliate lab up`` starts in the background and ``ciliate lab down`` stops
with SIGTERM. etcd and bird die with it (they are started with a parent
death signal), so one PID owns the whole fabric.

Signals that put the cluster store in trouble, for tests and demos: SIGHUP
restarts etcd (same data), SIGUSR1 stops it until SIGUSR2 starts it again.
After each, ``<workdir>/etcd-state`` says ``running`` or ``stopped`` once it is
so (``lab.stop_etcd`` / ``lab.start_etcd`` wait for it).

    python -m ciliate.control.lab.fabric --netns NS --workdir DIR --tor-ip IP \\
        --node NAME=IP:ASN ... --cluster-cidr CIDR --mask-size N [--node-grace-period S]
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from ciliate.control.process import ChildProcess

log = logging.getLogger("ciliate.fabric")

ETCD_PORT = 2379
TOR_AS = 65000


def _node(text: str) -> tuple[str, ipaddress.IPv4Address, int]:
    name, _, rest = text.partition("=")
    address, _, asn = rest.partition(":")
    return name, ipaddress.IPv4Address(address), int(asn)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ciliate-fabric", description=__doc__.splitlines()[0])
    p.add_argument("--netns", required=True)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--tor-ip", type=ipaddress.IPv4Address, required=True)
    p.add_argument("--node", action="append", default=[], type=_node)
    p.add_argument("--cluster-cidr", action="append", required=True)
    p.add_argument("--mask-size", type=int, default=24)
    p.add_argument("--node-grace-period", type=float, help="the operator's (default: its own)")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    from ciliate.control.lab.etcd_server import EtcdServer
    from ciliate.control.lab.tor import Neighbor, TorRouter

    stop = threading.Event()
    restart_etcd = threading.Event()
    stop_etcd = threading.Event()
    start_etcd = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # SIGHUP restarts etcd (same data): the lab's way to test that agents
    # and the operator ride out a restart of the cluster store.
    signal.signal(signal.SIGHUP, lambda *_: restart_etcd.set())
    # SIGUSR1 stops etcd until SIGUSR2: the lab's way to show what works without
    # the cluster store and that everything reconciles when it returns.
    signal.signal(signal.SIGUSR1, lambda *_: stop_etcd.set())
    signal.signal(signal.SIGUSR2, lambda *_: start_etcd.set())
    args.workdir.mkdir(parents=True, exist_ok=True)
    endpoint = f"http://{args.tor_ip}:{ETCD_PORT}"
    with contextlib.ExitStack() as stack:
        etcd = stack.enter_context(
            EtcdServer(
                host=str(args.tor_ip),
                client_port=ETCD_PORT,
                peer_port=ETCD_PORT + 1,
                workdir=args.workdir / "etcd",
                netns=args.netns,
                name="lab",
            )
        )
        log.info("etcd on %s", endpoint)
        operator = ChildProcess(
            name="operator",
            argv=[
                sys.executable,
                "-m",
                "ciliate.control.operator.main",
                "--etcd-endpoint",
                endpoint,
                *[a for c in args.cluster_cidr for a in ("--cluster-pool-ipv4-cidr", c)],
                "--cluster-pool-ipv4-mask-size",
                str(args.mask_size),
                *(
                    ["--node-grace-period", str(args.node_grace_period)]
                    if args.node_grace_period is not None
                    else []
                ),
            ],
            log_path=args.workdir / "operator.log",
            netns=args.netns,
            die_with_parent=True,  # however the fabric ends
        )
        operator.start()
        stack.callback(operator.stop, timeout=10)
        log.info("operator pid %s", operator.pid)
        tor = stack.enter_context(
            TorRouter(
                netns=args.netns,
                router_id=args.tor_ip,
                local_as=TOR_AS,
                neighbors=[Neighbor(address=ip, asn=asn, name=name) for name, ip, asn in args.node],
                workdir=args.workdir / "bird",
            )
        )
        log.info("bird up, pid %s", tor.pid)
        etcd_state = args.workdir / "etcd-state"
        etcd_state.write_text("running")
        (args.workdir / "ready").write_text(str(os.getpid()))
        while not stop.wait(0.1):
            if restart_etcd.is_set():
                restart_etcd.clear()
                log.info("restarting etcd")
                etcd.stop()
                etcd.start()
                etcd_state.write_text("running")
                log.info("etcd is back")
            if stop_etcd.is_set():
                stop_etcd.clear()
                log.info("stopping etcd (SIGUSR1) until SIGUSR2")
                etcd.stop()
                etcd_state.write_text("stopped")
            if start_etcd.is_set():
                start_etcd.clear()
                if not etcd.running:
                    log.info("starting etcd again (SIGUSR2)")
                    etcd.start()
                etcd_state.write_text("running")
            if not operator.running:
                log.error("the operator exited (%s)", operator.returncode)
                return 1
    log.info("fabric stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
