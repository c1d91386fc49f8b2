"""What each pod of the e2e NetworkPolicy model runs, inside its network namespace:
``python3 netpol_pod.py ADDRESS`` serves TCP and UDP on ports 80 and 81 (as the
upstream model's agnhost pods do), prints ``ready``, then answers probe commands on
stdin, one per line: ``probe TCP|UDP PORT TIMEOUT IP[,IP...]`` -> one JSON line
``{"IP": true|false, ...}``, every target probed at once. A TCP probe is a completed
connect; a UDP probe is a datagram answered by the target's echo."""

from __future__ import annotations

import functools
import json
import socket
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

PORTS = (80, 81)


def serve_tcp(address: str, port: int) -> None:
    server = socket.create_server((address, port), backlog=256)
    while True:
        conn, _ = server.accept()
        conn.close()


def serve_udp(address: str, port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, port))
    while True:
        data, peer = sock.recvfrom(2048)
        sock.sendto(data, peer)


def probe_tcp(ip: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=timeout):
            return True
    except OSError:
        return False


def probe_udp(ip: str, port: int, timeout: float) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(b"probe", (ip, port))
            return sock.recv(64) == b"probe"
        except OSError:
            return False


def _probe_one(
    probe: Callable[[str, int, float], bool], ip: str, *, port: int, timeout: float
) -> bool:
    return probe(ip, port, timeout)


def main() -> None:
    address = sys.argv[1]
    for port in PORTS:
        threading.Thread(target=serve_tcp, args=(address, port), daemon=True).start()
        threading.Thread(target=serve_udp, args=(address, port), daemon=True).start()
    print("ready", flush=True)
    with ThreadPoolExecutor(max_workers=16) as pool:
        for line in sys.stdin:
            _, protocol, port, timeout, targets = line.split()
            probe = probe_tcp if protocol == "TCP" else probe_udp
            ips = targets.split(",")
            results = pool.map(
                functools.partial(_probe_one, probe, port=int(port), timeout=float(timeout)), ips
            )
            print(json.dumps(dict(zip(ips, results, strict=True))), flush=True)


if __name__ == "__main__":
    main()
