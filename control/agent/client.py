"""A client of the agent's API on its UNIX socket (httpx), for the CLI and
the lab."""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from ciliate.control.cni.defaults import DEFAULT_AGENT_SOCKET

# CILIATE_SOCKET points the CLI at an agent elsewhere (a lab node).
DEFAULT_SOCKET = Path(os.environ.get("CILIATE_SOCKET", DEFAULT_AGENT_SOCKET))


class AgentUnreachableError(RuntimeError):
    """No agent answers on the socket."""


class AgentClient:
    def __init__(self, socket: Path | str = DEFAULT_SOCKET, *, timeout: float = 30.0) -> None:
        self.socket = Path(socket)
        self._http = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)),
            base_url="http://agent",
            timeout=timeout,
        )

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except (httpx.ConnectError, FileNotFoundError) as exc:
            raise AgentUnreachableError(
                f"no agent answers on {self.socket}: is ciliate-agent running? ({exc})"
            ) from exc
        if response.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text}")
        return response.json()

    def get(self, path: str) -> Any:
        return self._call("GET", path)

    def put(self, path: str, body: Any) -> Any:
        return self._call("PUT", path, json=body)

    def post(self, path: str, body: Any) -> Any:
        return self._call("POST", path, json=body)

    def healthy(self) -> bool:
        try:
            return bool(self.get("/v1/healthz").get("status") == "ok")
        except (AgentUnreachableError, RuntimeError, httpx.HTTPError):
            return False

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
