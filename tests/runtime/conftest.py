"""Real-runtime fixtures: a fresh node netns per test, a CNI plugin set
(``reference`` now, ``ciliate`` once its hook is filled), and podman or
containerd running privately inside that netns.

Every test here is marked ``runtime`` (``pytest -m runtime`` selects them,
``-m "not runtime"`` leaves them out). They skip, with the reason, when not
root or when a runtime cannot be installed or started here.

Nothing leaves the lab: the node netns is ``crt-<random>``, the runtimes run
under ``nsenter --net`` into it, their state lives in tmp dirs, and teardown
removes all of it.
"""

from __future__ import annotations

import os
import secrets
import statistics
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ciliate.control.lab.runtime import RuntimeUnavailable
from ciliate.control.lab.runtime.containerd import ContainerdLab
from ciliate.control.lab.runtime.podman import PodmanLab

from . import plugins

PLUGIN_SETS = ("reference", "ciliate")
TIMINGS: dict[str, list[float]] = {}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "runtime: end-to-end tests with real container runtimes (podman, containerd)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.runtime)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TIMINGS:
        return
    terminalreporter.section("runtime timings (seconds)")
    for key, values in sorted(TIMINGS.items()):
        terminalreporter.write_line(
            f"{key}: median {statistics.median(values):.3f}  min {min(values):.3f}  "
            f"max {max(values):.3f}  (n={len(values)})"
        )


@pytest.fixture
def timings() -> dict[str, list[float]]:
    """Record durations: ``timings.setdefault(key, []).append(seconds)``; printed at the end."""
    return TIMINGS


@pytest.fixture(autouse=True)
def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("runtime tests need root (network namespaces, podman, containerd)")


@pytest.fixture
def node_netns() -> Iterator[str]:
    """A fresh node network namespace (only ``lo``, up); yields its path."""
    name = "crt-" + secrets.token_hex(4)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture(params=PLUGIN_SETS)
def cni(
    request: pytest.FixtureRequest, node_netns: str, tmp_path: Path
) -> Iterator[plugins.PluginSet]:
    """The CNI plugin set under test, ready in ``node_netns``."""
    if request.param == "reference":
        yield plugins.reference(node_netns, tmp_path)
        return
    hook = plugins.ciliate_node
    if hook is None:
        pytest.skip(plugins.CILIATE_SKIP)
    with plugins.ciliate(node_netns, tmp_path, hook) as plugin_set:
        yield plugin_set


@pytest.fixture
def podman_lab(node_netns: str, cni: plugins.PluginSet) -> Iterator[PodmanLab]:
    """Private podman in the node netns, on the plugin set's network."""
    try:
        lab = PodmanLab(
            node_netns=node_netns,
            cni_conf_dir=cni.conf_dir,
            cni_plugin_dirs=cni.plugin_dirs,
            network=cni.network,
        )
    except RuntimeUnavailable as exc:
        pytest.skip(f"podman cannot run here: {exc}")
    with lab:
        yield lab


@pytest.fixture
def containerd_lab(node_netns: str, cni: plugins.PluginSet) -> Iterator[ContainerdLab]:
    """Private containerd + CRI in the node netns, with the plugin set's network."""
    try:
        lab = ContainerdLab(
            node_netns=node_netns, cni_conf_dir=cni.conf_dir, cni_plugin_dirs=cni.plugin_dirs
        )
    except RuntimeUnavailable as exc:
        pytest.skip(f"containerd cannot run here: {exc}")
    with lab:
        yield lab
