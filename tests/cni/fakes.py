"""Small fakes for the CNI tests: an endpoint service behind the
``EndpointService`` Protocol, and an agent (HTTP over a UNIX socket, stdlib
only) for the shim to talk to."""

from __future__ import annotations

import dataclasses
import http.server
import ipaddress
import json
import socketserver
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ciliate.control.cni import handler
from ciliate.control.cni.service import AddRequest, AddResult, EndpointService

POD_IP = "10.244.1.5/32"
POD_MAC = "0a:58:0a:f4:01:05"
ROUTER_IP = "10.244.1.1"


def add_result(*, ip: str = POD_IP, netns: str = "/run/netns/pod", mtu: int = 1500) -> AddResult:
    return AddResult(
        ip=ipaddress.IPv4Interface(ip),
        gateway=ipaddress.IPv4Address(ROUTER_IP),
        routes=(
            (ipaddress.IPv4Network(f"{ROUTER_IP}/32"), None),
            (ipaddress.IPv4Network("0.0.0.0/0"), ipaddress.IPv4Address(ROUTER_IP)),
        ),
        pod_ifname="eth0",
        pod_mac=POD_MAC,
        host_ifname="lxc1a2b3c4d5e6f",
        host_mac="fe:54:00:12:34:56",
        netns=netns,
        mtu=mtu,
    )


@dataclass
class FakeService:
    """Records calls; returns ``result``; raises ``error`` when set."""

    result: AddResult = field(default_factory=add_result)
    error: Exception | None = None
    calls: list[tuple[str, Any]] = field(default_factory=list)
    removed: int = 0

    def _call(self, name: str, argument: Any) -> None:
        self.calls.append((name, argument))
        if self.error is not None:
            raise self.error

    def add(self, request: AddRequest) -> AddResult:
        self._call("add", request)
        return dataclasses.replace(self.result, netns=request.netns)

    def delete(self, *, container_id: str, ifname: str) -> None:
        self._call("delete", (container_id, ifname))

    def check(self, *, container_id: str, ifname: str, netns: str) -> AddResult:
        self._call("check", (container_id, ifname, netns))
        return self.result

    def gc(self, *, network: str, valid: set[tuple[str, str]]) -> int:
        self._call("gc", (network, valid))
        return self.removed

    def ready(self) -> None:
        self._call("ready", None)


@dataclass
class Recorded:
    """One request as the fake agent saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Canned:
    """The answer the fake agent gives: an HTTP status and a body, or a
    function of the request body; ``chunked`` sends the body in chunks;
    ``hang`` never answers; ``close`` hangs up without a word."""

    status: int = 200
    body: bytes = b'{"exit_code": 0, "stdout": ""}'
    respond: Callable[[bytes], tuple[int, bytes]] | None = None
    chunked: bool = False
    hang: bool = False
    close: bool = False


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False


class FakeAgent:
    """``POST /v1/cni`` on a UNIX socket: records each request and answers
    with ``self.canned``."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.requests: list[Recorded] = []
        self.canned = Canned()
        self._release = threading.Event()
        agent = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                agent.requests.append(
                    Recorded(
                        method=self.command,
                        path=self.path,
                        headers={k.lower(): v for k, v in self.headers.items()},
                        body=body,
                    )
                )
                canned = agent.canned
                if canned.hang:
                    agent._release.wait(30)
                    return
                if canned.close:
                    self.close_connection = True
                    return
                status, answer = (
                    canned.respond(body) if canned.respond else (canned.status, canned.body)
                )
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if canned.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(0, len(answer), 7):
                        piece = answer[i : i + 7]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = _Server(str(socket_path), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def answer_with(self, service: EndpointService) -> None:
        """Serve requests with the real handler over ``service``."""
        self.canned = Canned(respond=lambda body: serve_cni(body, service))

    def __enter__(self) -> FakeAgent:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def serve_cni(body: bytes, service: EndpointService) -> tuple[int, bytes]:
    """``POST /v1/cni`` as the agent's API serves it, without the web framework:
    the HTTP status and the JSON body."""
    try:
        env, stdin = handler.decode_request(body)
    except ValueError as exc:
        return 400, json.dumps({"error": str(exc)}).encode("utf-8")
    response = handler.handle(env, stdin, service)
    answer = {"exit_code": response.exit_code, "stdout": response.stdout}
    return 200, json.dumps(answer, ensure_ascii=False).encode("utf-8")
