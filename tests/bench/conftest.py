"""Fixtures for the bench harness tests: real CNI plugins in namespaces, as root.

Everything is created under a per-test ``cbn-<hex>`` prefix and removed
afterwards; each test checks that nothing with its prefix is left."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from ciliate.bench import podnet


def missing(*tools: str, plugins: tuple[str, ...] = ()) -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "ping", *tools):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    for plugin in plugins:
        if not (podnet.REFERENCE_PLUGIN_DIR / plugin).is_file():
            return f"CNI plugin {plugin} missing (apt-get install containernetworking-plugins)"
    return None


def need(*tools: str, plugins: tuple[str, ...] = ("bridge", "ptp", "host-local")) -> None:
    reason = missing(*tools, plugins=plugins)
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def prefix() -> Iterator[str]:
    """A fresh run prefix; fails the test if a namespace with it outlives the test."""
    p = podnet.run_prefix()
    yield p
    left = podnet.netns_list(p)
    for name in left:
        podnet.netns_del(name)
    assert not left, f"namespaces left behind: {left}"
