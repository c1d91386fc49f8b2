"""A client for the socket LB tests, run as its own process inside the test's
cgroup and network namespace (the cgroup hooks see only its sockets).

``python sock_lb_client.py MODE HOST PORT [COUNT]`` prints one JSON object:

- ``tcp``: COUNT connections; each sends ``hi`` and reads the server's
  answer (its own address); reports what getpeername said and who answered;
- ``udp``: one unconnected socket, COUNT sendto/recvfrom rounds; reports
  each datagram's source address and who answered;
- ``udp-connected``: a connected UDP socket, one round, getpeername too;
- ``udp-reconnect``: a UDP socket connected to HOST:PORT, one round, then
  connected again straight to the address that answered; getpeername after
  each connect;
- ``refused``: one TCP connect; reports the errno;
- ``udp-refused``: one UDP sendto; reports the errno.
"""

from __future__ import annotations

import json
import socket
import sys


def main() -> None:
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    count = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    out: dict[str, object] = {}
    if mode == "tcp":
        rounds = []
        for _ in range(count):
            with socket.create_connection((host, port), timeout=5) as sock:
                sock.sendall(b"hi")
                rounds.append(
                    {"peer": list(sock.getpeername()), "served_by": sock.recv(64).decode()}
                )
        out["rounds"] = rounds
    elif mode in ("udp", "udp-connected"):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            rounds = []
            if mode == "udp-connected":
                sock.connect((host, port))
                out["peer"] = list(sock.getpeername())
            for _ in range(count):
                if mode == "udp-connected":
                    sock.send(b"hi")
                else:
                    sock.sendto(b"hi", (host, port))
                data, source = sock.recvfrom(64)
                rounds.append({"source": list(source), "served_by": data.decode()})
            out["rounds"] = rounds
    elif mode == "udp-reconnect":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.connect((host, port))
            out["peer"] = list(sock.getpeername())
            sock.send(b"hi")
            served_by = sock.recv(64).decode()
            address, _, served_port = served_by.partition(":")
            sock.connect((address, int(served_port)))
            out["served_by"] = served_by
            out["peer_after"] = list(sock.getpeername())
    elif mode == "refused":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(5)
            sock.connect((host, port))
            out["errno"] = 0
        except OSError as exc:
            out["errno"] = exc.errno
        finally:
            sock.close()
    elif mode == "udp-refused":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto(b"hi", (host, port))
                out["errno"] = 0
            except OSError as exc:
                out["errno"] = exc.errno
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
