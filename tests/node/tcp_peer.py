"""The far end of the socket-forwarding tests, run inside a pod namespace:
``python3 tcp_peer.py sink|echo ADDRESS PORT``; prints ``ready`` once listening.

sink: for each connection, read everything (slowly at first, so the sender
meets a full receive queue), then answer the SHA-256 of what came and close.
echo: for each connection, send back every byte as it comes."""

from __future__ import annotations

import hashlib
import socket
import sys
import time


def sink(conn: socket.socket) -> None:
    digest = hashlib.sha256()
    slow_until = time.monotonic() + 0.3
    while chunk := conn.recv(4096 if time.monotonic() < slow_until else 1 << 20):
        digest.update(chunk)
        if time.monotonic() < slow_until:
            time.sleep(0.001)
    conn.sendall(digest.hexdigest().encode())


def echo(conn: socket.socket) -> None:
    while chunk := conn.recv(65536):
        conn.sendall(chunk)


def main() -> None:
    mode, address, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    handler = {"sink": sink, "echo": echo}[mode]
    server = socket.create_server((address, port))
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        with conn:
            handler(conn)


if __name__ == "__main__":
    main()
