"""``cni.run`` end to end on the reference bridge plugin and on ciliate (sanity, no
timing assertions); a network whose set-up is unavailable is skipped, not fatal."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from ciliate.bench import cni, podnet

from .conftest import need


def _unavailable(
    node_netns_path: str, workdir: Path, agent_args: Sequence[str]
) -> tuple[Path, podnet.Json, Callable[[], None]]:
    raise NotImplementedError("not on this machine")


def test_run_three_pods_on_bridge_and_ciliate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    need(plugins=("bridge", "host-local"))
    lines: list[str] = []
    before = set(podnet.netns_list("cbn-"))
    unavailable = podnet.ciliate(name="ciliate-elsewhere", setup=_unavailable)
    results = cni.run(pods=3, networks=("bridge", "ciliate", unavailable), progress=lines.append)
    assert [r.network for r in results.networks] == ["bridge", "ciliate"]
    assert "not on this machine" in results.skipped["ciliate-elsewhere"]
    for r in results.networks:
        for op in (r.add, r.delete):
            assert op.n == 3
            assert 0 < op.min_ms <= op.p50_ms <= op.p99_ms <= op.max_ms
            assert op.min_ms <= op.mean_ms <= op.max_ms
        assert len(r.add_ns) == len(r.del_ns) == 3
    assert results.networks[0].vs_baseline == {
        "add_p50": 1.0,
        "add_p99": 1.0,
        "del_p50": 1.0,
        "del_p99": 1.0,
    }
    assert any("3/3 pods added" in line for line in lines)
    assert any("3/3 pods deleted" in line for line in lines)
    assert set(podnet.netns_list("cbn-")) <= before

    cni.print_table(results)
    out = capsys.readouterr().out
    assert "bridge" in out and "skipped" in out
    path = tmp_path / "cni.json"
    cni.write_json(results, path)
    doc = json.loads(path.read_text())
    assert doc["benchmark"] == "cni"
    assert doc["results"][0]["add"]["n"] == 3
    assert doc["skipped"].keys() == {"ciliate-elsewhere"}
