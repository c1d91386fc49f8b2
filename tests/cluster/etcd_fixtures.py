"""Fixtures for the tests that need a real etcd (imported by the test modules that use them).

etcd is Debian's ``etcd-server`` (``/usr/bin/etcd``); if it is missing and we are root,
it is installed with apt-get (as scripts/setup does for the other packages), otherwise
the tests are skipped with the reason. Every etcd runs on 127.0.0.1, on free ports, with a
private data directory under a temporary directory that is removed afterwards.

* ``etcd_server``: one etcd shared by a test module (tests isolate themselves by prefix);
* ``private_etcd``: an etcd of the test's own, for tests that stop/start/kill it;
* ``store_factory``: ``make(server=None, **kwargs) -> EtcdStore`` under a prefix unique to
  the test, all closed at teardown.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ciliate.control.lab.etcd_server import ETCD_BINARY, EtcdServer, etcd_available

__all__ = ["StoreFactory", "etcd_server", "private_etcd", "require_etcd", "store_factory"]

_install_error: list[str] = []


def _install_etcd() -> str | None:
    """Install etcd-server if missing; ``None`` on success, else why not."""
    if etcd_available():
        return None
    if _install_error:
        return _install_error[0]
    reason: str | None = None
    if os.geteuid() != 0:
        reason = f"{ETCD_BINARY} missing and not root (apt-get install etcd-server)"
    elif shutil.which("apt-get") is None:
        reason = f"{ETCD_BINARY} missing and no apt-get to install etcd-server"
    else:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "etcd-server"],
        ):
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if proc.returncode != 0 and cmd[1] == "install":
                reason = f"apt-get install etcd-server failed: {proc.stderr.strip()[-500:]}"
        if reason is None and not etcd_available():
            reason = f"apt-get installed etcd-server but {ETCD_BINARY} is still missing"
    if reason is not None:
        _install_error.append(reason)
    return reason


@pytest.fixture(scope="session")
def require_etcd() -> None:
    pytest.importorskip("aetcd", reason="aetcd is not installed (pip install aetcd)")
    reason = _install_etcd()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def etcd_server(require_etcd: None) -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


@pytest.fixture
def private_etcd(require_etcd: None) -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


StoreFactory = Callable[..., Any]


@pytest.fixture
def store_factory(etcd_server: EtcdServer) -> Iterator[StoreFactory]:
    from ciliate.control.store.etcd import EtcdStore

    prefix = f"/t-{secrets.token_hex(4)}/"
    stores: list[EtcdStore] = []

    def make(server: EtcdServer | None = None, **kwargs: Any) -> EtcdStore:
        kwargs.setdefault("prefix", prefix)
        kwargs.setdefault("timeout", 3.0)
        store = EtcdStore([(server or etcd_server).endpoint], **kwargs)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()
