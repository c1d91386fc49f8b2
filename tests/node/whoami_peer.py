"""A backend of the service tests, run inside a pod namespace:
``python3 whoami_peer.py ADDRESS PORT`` answers every TCP connection and every UDP
datagram on PORT with its own ADDRESS (so a client learns which backend it
reached); prints ``ready`` once listening (both sockets bound before: a client
that connects at once is never refused)."""

from __future__ import annotations

import socket
import sys
import threading


def serve_tcp(server: socket.socket, address: str) -> None:
    while True:
        conn, _ = server.accept()
        with conn:
            conn.sendall(address.encode())


def serve_udp(sock: socket.socket, address: str) -> None:
    while True:
        _, peer = sock.recvfrom(2048)
        sock.sendto(address.encode(), peer)


def main() -> None:
    address, port = sys.argv[1], int(sys.argv[2])
    server = socket.create_server((address, port), backlog=128)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((address, port))
    threading.Thread(target=serve_udp, args=(udp, address), daemon=True).start()
    tcp = threading.Thread(target=serve_tcp, args=(server, address), daemon=True)
    tcp.start()
    print("ready", flush=True)
    tcp.join()


if __name__ == "__main__":
    main()
