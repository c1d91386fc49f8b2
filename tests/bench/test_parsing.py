"""Parsing of the traffic tools' output, from small recorded samples (no tools run)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ciliate.bench import cni, podnet, traffic

DATA = Path(__file__).parent / "data"


def test_iperf3_json_gives_receiver_throughput_and_retransmits() -> None:
    sample = traffic.parse_iperf3((DATA / "iperf3-tcp-1s.json").read_text())
    assert sample.gbps == pytest.approx(32.854642681, rel=1e-9)
    assert sample.sender_gbps == pytest.approx(32.856613425, rel=1e-9)
    assert sample.retransmits == 267
    assert sample.seconds == pytest.approx(1.000331)


def test_iperf3_error_is_reported() -> None:
    # iperf3 3.12 exits 0 with -J when it cannot connect: the JSON says so.
    with pytest.raises(traffic.TrafficError, match="Connection refused"):
        traffic.parse_iperf3((DATA / "iperf3-refused.json").read_text())


def test_iperf3_truncated_json_is_an_error() -> None:
    with pytest.raises(traffic.TrafficError, match="unexpected JSON"):
        traffic.parse_iperf3(json.dumps({"start": {}, "end": {}}))


def test_sockperf_latency_output() -> None:
    sample = traffic.parse_sockperf((DATA / "sockperf-pingpong.txt").read_text())
    assert sample == traffic.SockperfSample(
        avg_us=4.721,
        p50_us=4.078,
        p99_us=9.034,
        min_us=3.726,
        max_us=45.386,
        observations=57936,
        full_rtt=False,
    )


def test_sockperf_full_rtt_output() -> None:
    sample = traffic.parse_sockperf((DATA / "sockperf-pingpong-full-rtt.txt").read_text())
    assert sample.full_rtt
    assert (sample.avg_us, sample.p50_us, sample.p99_us) == (12.655, 12.359, 25.726)


def test_sockperf_without_summary_is_an_error() -> None:
    text = "sockperf: ERROR: Message received was larger than expected\n"
    with pytest.raises(traffic.TrafficError, match="no latency summary"):
        traffic.parse_sockperf(text)


def test_percentile_interpolates_like_numpy() -> None:
    values = [float(v) for v in range(1, 101)]
    assert cni.percentile(values, 50) == pytest.approx(50.5)
    assert cni.percentile(values, 99) == pytest.approx(99.01)
    assert cni.percentile([3.0], 99) == 3.0


def test_op_stats_from_ns() -> None:
    stats = cni.OpStats.from_ns([3_000_000, 1_000_000, 2_000_000])
    assert (stats.n, stats.p50_ms, stats.mean_ms) == (3, 2.0, 2.0)
    assert (stats.min_ms, stats.max_ms) == (1.0, 3.0)
    assert 2.0 < stats.p99_ms < 3.0


def test_cni_result_parsing() -> None:
    result = {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "cbr0"}, {"name": "eth0", "sandbox": "/run/netns/x"}],
        "ips": [
            {"address": "fd00::2/64", "interface": 1},
            {"address": "10.99.0.7/24", "gateway": "10.99.0.1", "interface": 1},
        ],
    }
    assert podnet.parse_result(result) == ("10.99.0.7", 24, "10.99.0.1")
    with pytest.raises(podnet.PodNetError):
        podnet.parse_result({"cniVersion": "1.0.0", "ips": []})


def test_spread() -> None:
    s = traffic.Spread.of([3.0, 1.0, 2.0])
    assert (s.median, s.min, s.max) == (2.0, 1.0, 3.0)
    assert not math.isnan(s.median)
