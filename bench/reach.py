"""Does a packet from one pod get through to another? Small probes run inside a
pod's namespace, for benchmarks that must prove a policy is enforced before they
measure it: a UDP probe counts the datagrams an echo server answered, a TCP probe
says whether a connection was established.

A refused probe waits its whole timeout, so refused ones are slow by design
(about ``attempts * timeout`` seconds); an answered one returns at once.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

from ciliate.bench import podnet

_PROBE = """
import json, socket, sys
proto, host, port, attempts, timeout = sys.argv[1:6]
port, attempts, timeout = int(port), int(attempts), float(timeout)
answered = 0
for _ in range(attempts):
    kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as s:
        s.settimeout(timeout)
        try:
            if proto == "udp":
                s.sendto(b"probe", (host, port))
                s.recv(2048)
            else:
                s.connect((host, port))
            answered += 1
        except OSError:
            pass
print(json.dumps({"answered": answered, "attempts": attempts}))
"""


class ReachError(RuntimeError):
    """The probe itself failed (not: the peer did not answer)."""


@dataclass(frozen=True)
class Reach:
    proto: str
    src: str
    dst: str
    port: int
    answered: int
    attempts: int

    def __str__(self) -> str:
        return (
            f"{self.proto} {self.src} -> {self.dst}:{self.port}: "
            f"{self.answered}/{self.attempts} answered"
        )


def probe(
    src: podnet.Pod,
    dst_ip: str,
    *,
    proto: str,
    port: int,
    attempts: int = 3,
    timeout: float = 0.3,
) -> Reach:
    """Send ``attempts`` UDP datagrams to an echo server (or open ``attempts`` TCP
    connections) from ``src``'s namespace and count those answered."""
    if proto not in ("udp", "tcp"):
        raise ValueError(f"proto must be udp or tcp, not {proto!r}")
    cmd = podnet.netns_exec(
        src.netns,
        sys.executable,
        "-S",
        "-c",
        _PROBE,
        proto,
        dst_ip,
        str(port),
        str(attempts),
        str(timeout),
    )
    what = f"{proto} probe {src.ip} -> {dst_ip}:{port}"
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, check=False, timeout=attempts * timeout + 30
        )
    except subprocess.TimeoutExpired as exc:
        raise ReachError(f"{what}: no answer from the probe itself") from exc
    try:
        doc = json.loads(proc.stdout.strip().splitlines()[-1])
        return Reach(
            proto=proto,
            src=src.ip,
            dst=dst_ip,
            port=port,
            answered=int(doc["answered"]),
            attempts=int(doc["attempts"]),
        )
    except (IndexError, ValueError, KeyError) as exc:
        raise ReachError(
            f"{what}: exit {proc.returncode}, no result: {proc.stderr.strip()[-500:]}"
        ) from exc
