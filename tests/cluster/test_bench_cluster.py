"""``ciliate bench cluster``, small: 3 simulated agents (the real ClusterMember and
EtcdStore) in 2 worker processes against a real etcd; every published endpoint reaches
every other agent, and the figures are filled in. Also the in-memory ipcache the
simulated agents mirror into."""

from __future__ import annotations

import ipaddress
import json
import math
import threading
from pathlib import Path

import pytest

from ciliate.bench import cluster
from ciliate.control.cli.main import main as cli_main
from ciliate.control.lab.etcd_server import EtcdServer
from ciliate.datapath.maps import IpcacheEntry

from . import etcd_fixtures

require_etcd = etcd_fixtures.require_etcd
etcd_server = etcd_fixtures.etcd_server


def test_the_memory_ipcache_keeps_entries_and_when_each_first_arrived() -> None:
    cache = cluster.MemoryIpcache(threading.Condition())
    prefix = ipaddress.IPv4Network("10.1.2.3/32")
    cache.upsert(IpcacheEntry(prefix, 300, ipaddress.IPv4Address("172.16.0.2")))
    first = cache.arrived[prefix]
    cache.upsert(IpcacheEntry(prefix, 301, ipaddress.IPv4Address("172.16.0.2")))
    assert cache.arrived[prefix] == first  # first arrival, not the last write
    assert [e.identity for e in cache.list()] == [301]
    assert cache.delete(prefix) and not cache.delete(prefix)
    assert cache.list() == [] and prefix not in cache.arrived


def test_every_endpoint_reaches_every_other_agent(etcd_server: EtcdServer) -> None:
    result = cluster.run(
        nodes=3,
        endpoints=8,
        agents_per_process=2,  # two processes: the figures cross process boundaries
        etcd_endpoint=etcd_server.endpoint,
        progress=None,
    )
    assert (result["nodes"], result["processes"], result["endpoints"]) == (3, 2, 8)
    assert result["missing"] == 0
    assert 0 < result["per_agent_p50_ms"] <= result["reach_all_p99_ms"]
    # Each publish is the owner's write; the other agents apply the watch event as it
    # comes, without reading the cluster again (a full re-read is three ranges per
    # agent and endpoint: 72 here).
    requests = result["etcd_requests_by_method"]
    assert requests.get("Txn", 0) >= 8
    assert requests.get("Range", 0) < 8 * 2
    assert result["rss_per_agent_kib"] > 0 and result["threads_per_process"] > 1
    assert result["agent_warnings"] == 0
    assert math.isnan(result["etcd_cpu_s"])  # not our etcd: its CPU is not ours to read


def test_the_cli_prints_a_row_per_node_count_and_writes_json(
    require_etcd: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cluster.json"
    argv = ["bench", "cluster", "--nodes", "2", "3", "--endpoints", "2", "--burst", "5"]
    assert cli_main([*argv, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["nodes"], r["endpoints"], r["missing"]) for r in rows] == [(2, 2, 0), (3, 2, 0)]
    # The burst: 5 endpoints at once, each in every other agent's ipcache.
    assert all(r["burst"] == 5 and r["burst_s"] > 0 for r in rows)
    assert "reach all" in capsys.readouterr().out
