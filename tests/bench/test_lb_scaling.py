"""The services scaling benchmark runs end to end (tiny counts) and
reports every path at every size, leaving nothing behind."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ciliate.bench import lb_scaling
from ciliate.loader import cgroup2_root


@pytest.mark.skipif(cgroup2_root() is None, reason="no cgroup v2 hierarchy mounted")
def test_lb_scaling_reports_every_path_and_size(bpf_objects: str) -> None:
    stats = Path("/proc/sys/kernel/bpf_stats_enabled")
    before = stats.read_text()
    results = lb_scaling.run(rounds=1, packets=500, connects=20, sizes=(1, 50))
    assert {(r.path, r.services) for r in results} == {
        (path, n)
        for path in (
            "nodeport flow (from_netdev)",
            "not a service (from_netdev)",
            "connect() (socket LB)",
            "connect4 program per connect",
        )
        for n in (1, 50)
    }
    assert all(r.median > 0 and r.baseline > 0 for r in results)
    assert all(r.vs_one_service == 1.0 for r in results if r.services == 1)
    # The run time statistics were as before once the measurement ended.
    assert stats.read_text() == before
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "cbl" not in namespaces
