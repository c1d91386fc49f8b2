"""Both ends of the kube-proxy tests, run inside a namespace.

``python3 kube_proxy_peer.py serve PORT``: answer TCP and UDP on PORT with
the address the server saw (``<ip>:<port> <what came>``); prints ``ready``
once listening on both.

``python3 kube_proxy_peer.py tcp|udp ADDRESS PORT``: send one line to
ADDRESS:PORT and print JSON: the peer as the client's socket saw it (TCP:
getpeername; UDP: the source of the answer, from an unconnected socket), and
the answer. Exits 1 with the error when no answer comes within 5 s."""

from __future__ import annotations

import json
import socket
import sys
import threading

TIMEOUT = 5.0


def serve_tcp(server: socket.socket) -> None:
    while True:
        conn, (ip, port) = server.accept()
        with conn:
            data = conn.recv(4096)
            conn.sendall(f"{ip}:{port} ".encode() + data)


def serve_udp(server: socket.socket) -> None:
    while True:
        data, (ip, port) = server.recvfrom(4096)
        server.sendto(f"{ip}:{port} ".encode() + data, (ip, port))


def serve(port: int) -> None:
    tcp = socket.create_server(("0.0.0.0", port))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", port))
    threading.Thread(target=serve_udp, args=(udp,), daemon=True).start()
    print("ready", flush=True)
    serve_tcp(tcp)


def client(protocol: str, address: str, port: int) -> dict[str, str]:
    message = b"hello"
    if protocol == "tcp":
        with socket.create_connection((address, port), timeout=TIMEOUT) as conn:
            conn.sendall(message)
            answer = conn.recv(4096)
            peer = conn.getpeername()
            local = conn.getsockname()
    else:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as conn:
            conn.settimeout(TIMEOUT)
            conn.sendto(message, (address, port))
            answer, peer = conn.recvfrom(4096)
            local = conn.getsockname()
    return {
        "peer": f"{peer[0]}:{peer[1]}",
        "local": f"{local[0]}:{local[1]}",
        "answer": answer.decode(),
    }


def main() -> int:
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
        return 0
    try:
        print(json.dumps(client(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
    except OSError as exc:
        print(f"{sys.argv[1]} to {sys.argv[2]}:{sys.argv[3]}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
