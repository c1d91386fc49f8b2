"""cpuprofile: perf samples grouped by kind of work; one real sampling run."""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest

from ciliate.bench import cpuprofile, traffic

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize(
    ("symbol", "kernel", "bucket"),
    [
        ("_copy_from_iter", True, "copy"),
        ("_copy_to_iter", True, "copy"),
        ("veth_xmit", True, "path"),
        ("process_backlog", True, "path"),
        ("bpf_prog_6cab83ff3cdab910_from_container", True, "path"),
        ("br_handle_frame", True, "path"),
        ("tcp_sendmsg_locked", True, "stack"),
        ("__udp_enqueue_schedule_skb", True, "stack"),
        ("fib_table_lookup", True, "stack"),
        ("finish_task_switch.isra.0", True, "sched"),
        ("_raw_spin_unlock_irqrestore", True, "sched"),
        ("handle_softirqs", True, "sched"),
        ("pv_native_safe_halt", True, "idle"),
        ("__libc_sendto", False, "user"),
        ("some_driver_thing", True, "other"),
    ],
)
def test_bucket_of(symbol: str, kernel: bool, bucket: str) -> None:
    assert cpuprofile.bucket_of(symbol, kernel) == bucket


def test_parse_recorded_report() -> None:
    """A real report (sockperf ping-pong through ciliate): every sample in one bucket."""
    profile = cpuprofile.parse_report((DATA / "perf-report-sockperf.txt").read_text())
    assert set(profile.buckets) == set(cpuprofile.BUCKETS)
    assert math.isclose(sum(profile.buckets.values()), 100.0, abs_tol=1.0)
    # Ping-pong of small datagrams: scheduling and the stacks dominate, copies are small.
    assert profile.buckets["sched"] > profile.buckets["copy"]
    assert profile.buckets["other"] < 5.0
    top = dict(profile.top_path)
    assert "bpf_prog_6cab83ff3cdab910_from_container" in top
    assert profile.top_path == sorted(profile.top_path, key=lambda kv: kv[1], reverse=True)


def test_busy_share_and_bound() -> None:
    profile = cpuprofile.CpuProfile(
        samples_file="",
        buckets={
            **dict.fromkeys(cpuprofile.BUCKETS, 0.0),
            "path": 10.0,
            "idle": 50.0,
            "copy": 40.0,
        },
    )
    assert profile.busy_share("path") == pytest.approx(20.0)
    assert cpuprofile.path_free_bound(profile, throughput=True) == pytest.approx(1.25)
    assert cpuprofile.path_free_bound(profile, throughput=False) == pytest.approx(0.8)


def test_paired_ratio() -> None:
    ratio = traffic.paired_ratio([2.0, 6.0, 3.0], [1.0, 4.0, 3.0])
    assert (ratio.median, ratio.min, ratio.max) == (1.5, 1.0, 2.0)
    with pytest.raises(ValueError, match="one figure per round"):
        traffic.paired_ratio([1.0], [1.0, 2.0])


def test_sampling_a_real_workload(tmp_path: Path) -> None:
    """perf samples a copy-heavy process: the copy bucket shows it."""
    if shutil.which("perf") is None:
        pytest.skip("perf is not installed (apt-get install linux-perf)")
    with cpuprofile.sampling(tmp_path, "dd", cpus="0", frequency=999) as out:
        subprocess.run(
            ["taskset", "-c", "0", "dd", "if=/dev/zero", "of=/dev/null", "bs=1M", "count=3000"],
            check=True,
            capture_output=True,
        )
    (profile,) = out
    assert Path(profile.samples_file).is_file()
    assert profile.busy_share("copy") + profile.busy_share("other") > 20.0
