"""UDP request/response where every request is a new flow (a fresh socket, so a
new source port), as DNS lookups are: each transaction pays the first-packet
path of the network (policy lookup, conntrack entry) instead of the
established one that ``sockperf ping-pong`` measures on its one socket.

The client and the echo server are small Python programs run with ``python3 -S``
inside the pods' namespaces; their own cost is the same on every network, so
only ratios between networks measured in the same run mean anything.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass

_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(data, peer)
"""

_CLIENT = """
import json, socket, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
samples, lost = [], 0
for i in range(count):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1.0)
    t0 = time.perf_counter_ns()
    s.sendto(b"x" * 32, (host, port))
    try:
        s.recv(2048)
        samples.append(time.perf_counter_ns() - t0)
    except OSError:
        lost += 1
    s.close()
print(json.dumps({"ns": samples, "lost": lost}))
"""


class UdpRrError(RuntimeError):
    """The client printed nothing usable, or every request was lost."""


@dataclass(frozen=True)
class UdpRrSample:
    p50_us: float
    p99_us: float
    transactions: int
    lost: int


def server_command(ip: str, port: int) -> list[str]:
    return [sys.executable, "-S", "-c", _SERVER, ip, str(port)]


def client_command(ip: str, port: int, count: int) -> list[str]:
    return [sys.executable, "-S", "-c", _CLIENT, ip, str(port), str(count)]


def parse(output: str) -> UdpRrSample:
    """The client's JSON line as a sample (round trips, in microseconds)."""
    try:
        doc = json.loads(output.strip().splitlines()[-1])
        samples: Sequence[int] = doc["ns"]
        lost = int(doc["lost"])
    except (IndexError, ValueError, KeyError, TypeError) as exc:
        raise UdpRrError(f"no UDP request/response figures in {output!r}") from exc
    if not samples:
        raise UdpRrError(f"every one of {lost} requests was lost")
    ordered = sorted(samples)
    return UdpRrSample(
        p50_us=statistics.median(ordered) / 1000,
        p99_us=ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1000,
        transactions=len(ordered),
        lost=lost,
    )
