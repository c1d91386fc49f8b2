"""traffic: table, JSON and plot from synthetic results; one short real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ciliate.bench import traffic

from .conftest import need


def _results() -> traffic.TrafficResults:
    def net(name: str, gbps: list[float], p50: list[float]) -> traffic.NetworkTraffic:
        return traffic.NetworkTraffic(
            network=name,
            description=name,
            mtu=1500,
            pod_ips=("10.0.0.2", "10.0.0.3"),
            throughput_gbps=traffic.Spread.of(gbps),
            retransmits=traffic.Spread.of([0.0, 1.0, 2.0]),
            latency_p50_us=traffic.Spread.of(p50),
            latency_p99_us=traffic.Spread.of([x * 2 for x in p50]),
            latency_avg_us=traffic.Spread.of(p50),
            vs={"bridge": {"throughput": 1.0, "latency_p50": 1.0, "latency_p99": 1.0}},
        )

    return traffic.TrafficResults(
        seconds=5,
        repeats=3,
        cpu=1,
        latency="one-way (RTT/2)",
        networks=[net("bridge", [18.0, 19.0, 20.0], [6.0, 6.1, 6.5])],
        skipped={"ciliate": "not yet"},
    )


def test_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = _results()
    traffic.print_table(results)
    out = capsys.readouterr().out
    assert "bridge" in out and "19.00" in out and "ciliate" in out
    path = tmp_path / "t.json"
    traffic.write_json(results, path)
    doc = json.loads(path.read_text())
    assert doc["results"][0]["throughput_gbps"]["median"] == 19.0
    assert doc["skipped"] == {"ciliate": "not yet"}


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "traffic.png"
    traffic.plot(_results(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_short_run_on_bridge() -> None:
    need("iperf3", "sockperf", "taskset", "ss", plugins=("bridge", "host-local"))
    results = traffic.run(networks=("bridge",), seconds=1, repeats=1, progress=None)
    (r,) = results.networks
    assert r.mtu >= 1280
    assert r.throughput_gbps.median > 0
    assert 0 < r.latency_p50_us.median <= r.latency_p99_us.median
    assert r.vs["bridge"]["throughput"] == 1.0


def test_plot_with_a_reference_adds_the_ratio_panel(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    results = _results()
    ciliate = traffic.NetworkTraffic(
        network="ciliate",
        description="ciliate",
        mtu=1500,
        pod_ips=("10.0.0.2", "10.0.0.3"),
        throughput_gbps=traffic.Spread.of([22.0, 23.0, 24.0]),
        retransmits=traffic.Spread.of([0.0, 0.0, 0.0]),
        latency_p50_us=traffic.Spread.of([5.0, 5.1, 5.2]),
        latency_p99_us=traffic.Spread.of([9.0, 9.1, 9.2]),
        latency_avg_us=traffic.Spread.of([5.0, 5.1, 5.2]),
        vs={
            "bridge": {
                "throughput": 1.2,
                "throughput_min": 1.1,
                "throughput_max": 1.3,
                "latency_p50": 0.8,
                "latency_p50_min": 0.7,
                "latency_p50_max": 0.9,
                "latency_p99": 0.9,
            }
        },
    )
    without_bridge = traffic.TrafficResults(
        seconds=5, repeats=3, cpu=1, latency="one-way (RTT/2)", networks=[ciliate]
    )
    results.networks.append(ciliate)
    narrow, wide = tmp_path / "one.png", tmp_path / "two.png"
    traffic.plot(without_bridge, narrow)
    traffic.plot(results, wide)
    # A PNG's width is the big-endian u32 at offset 16: the ratio panel widens the figure.
    width = lambda p: int.from_bytes(p.read_bytes()[16:20], "big")  # noqa: E731
    assert width(wide) > width(narrow)


def test_latency_slices_merge_into_one_figure() -> None:
    def sample(p50: float, lo: float, hi: float) -> traffic.SockperfSample:
        return traffic.SockperfSample(
            avg_us=p50,
            p50_us=p50,
            p99_us=2 * p50,
            min_us=lo,
            max_us=hi,
            observations=10,
            full_rtt=False,
        )

    merged = traffic.merge_sockperf(
        [sample(3.0, 1.0, 9.0), sample(5.0, 2.0, 20.0), sample(4.0, 1.5, 8.0)]
    )
    assert (merged.p50_us, merged.p99_us, merged.avg_us) == (4.0, 8.0, 4.0)
    assert (merged.min_us, merged.max_us, merged.observations) == (1.0, 20.0, 30)
    with pytest.raises(ValueError, match="no sockperf samples"):
        traffic.merge_sockperf([])
