"""``ciliate bench cni``: latency of CNI ADD and DEL, per network, as a runtime sees it.

For each network a node namespace is set up (:mod:`ciliate.bench.podnet`),
then ``pods`` pods are added one after another and deleted one after another;
each ADD and DEL is the wall-clock time of the plugin exec(s), as kubelet's
runtime would wait for it. The networks live side by side (one node
namespace each) and are interleaved pod by pod, in an order that rotates
every pod, so drift of this shared, noisy machine hits them alike; every
figure is also given as a ratio to ``bridge`` (the reference plugin)
measured in the same run. One warm-up pod per network (page cache, first
exec of each binary) is added and deleted before the measured ones and not
counted.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ciliate.bench import podnet, report

BASELINE = "bridge"


@dataclass(frozen=True)
class OpStats:
    """Latency of one operation over ``n`` samples, in milliseconds."""

    n: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float

    @classmethod
    def from_ns(cls, samples: Sequence[int]) -> OpStats:
        if not samples:
            raise ValueError("no samples")
        ms = sorted(s / 1e6 for s in samples)
        return cls(
            n=len(ms),
            p50_ms=statistics.median(ms),
            p99_ms=percentile(ms, 99.0),
            mean_ms=statistics.fmean(ms),
            min_ms=ms[0],
            max_ms=ms[-1],
        )


def percentile(values: Sequence[float], pct: float) -> float:
    """Linear-interpolation percentile (numpy's default), ``pct`` in 0..100."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100.0
    lo = int(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


@dataclass
class NetworkResult:
    network: str
    description: str
    add: OpStats
    delete: OpStats
    add_ns: list[int]
    del_ns: list[int]
    vs_baseline: dict[str, float] | None = None
    """add_p50, add_p99, del_p50, del_p99 as ratios to the baseline network (same run)."""


@dataclass
class CniResults:
    pods: int
    warmup: int
    baseline: str
    networks: list[NetworkResult]
    skipped: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> NetworkResult | None:
        return next((r for r in self.networks if r.network == name), None)


def _ratios(r: NetworkResult, base: NetworkResult) -> dict[str, float]:
    return {
        "add_p50": r.add.p50_ms / base.add.p50_ms,
        "add_p99": r.add.p99_ms / base.add.p99_ms,
        "del_p50": r.delete.p50_ms / base.delete.p50_ms,
        "del_p99": r.delete.p99_ms / base.delete.p99_ms,
    }


def run(
    *,
    pods: int = 50,
    networks: Sequence[str | podnet.NetworkDef] = ("bridge", "ciliate"),
    warmup: int = 1,
    progress: Callable[[str], None] | None = report.progress_to_stderr,
    ciliate_setup: podnet.CiliateSetup | None = None,
) -> CniResults:
    """ADD ``pods`` pods one after another on each network, then DEL them.

    ``ciliate_setup`` overrides :func:`ciliate.bench.podnet.lab_ciliate_setup`
    for this run. Networks that
    are not available (no plugin, hook not implemented) are skipped and
    listed in ``skipped``."""
    if pods < 1:
        raise ValueError("pods must be >= 1")
    specs = podnet.with_ciliate_setup(networks, ciliate_setup)
    skipped: dict[str, str] = {}

    def on_skip(name: str, reason: str) -> None:
        skipped[name] = reason
        if progress:
            progress(f"cni: skipping {name}: {reason}")

    add_ns: dict[str, list[int]] = {}
    del_ns: dict[str, list[int]] = {}
    descriptions: dict[str, str] = {}
    with podnet.pod_networks(specs, on_skip=on_skip) as nets:
        names = list(nets)
        for name in names:
            add_ns[name], del_ns[name] = [], []
            descriptions[name] = nets[name].network.description
            for w in range(warmup):
                nets[name].del_pod(nets[name].add_pod(f"w{w}"))

        def rotated(i: int) -> list[str]:
            k = i % len(names) if names else 0
            return names[k:] + names[:k]

        added: dict[str, list[podnet.Pod]] = {name: [] for name in names}
        for i in range(pods):
            for name in rotated(i):
                pod = nets[name].add_pod(f"p{i:04d}")
                added[name].append(pod)
                add_ns[name].append(pod.add_ns)
            if progress and names and ((i + 1) % 10 == 0 or i + 1 == pods):
                progress(f"cni: {i + 1}/{pods} pods added  " + _last(add_ns, "ADD"))
        for i in range(pods):
            for name in rotated(i):
                del_ns[name].append(nets[name].del_pod(added[name][i]))
            if progress and names and ((i + 1) % 10 == 0 or i + 1 == pods):
                progress(f"cni: {i + 1}/{pods} pods deleted  " + _last(del_ns, "DEL"))

    results = [
        NetworkResult(
            network=name,
            description=descriptions[name],
            add=OpStats.from_ns(add_ns[name]),
            delete=OpStats.from_ns(del_ns[name]),
            add_ns=add_ns[name],
            del_ns=del_ns[name],
        )
        for name in add_ns
    ]
    out = CniResults(pods=pods, warmup=warmup, baseline=BASELINE, networks=results, skipped=skipped)
    base = out.get(BASELINE)
    if base is not None:
        for r in results:
            r.vs_baseline = _ratios(r, base)
    return out


def _last(samples: dict[str, list[int]], op: str) -> str:
    parts = []
    for name, values in samples.items():
        recent = values[-10:]
        if recent:
            parts.append(f"{name} {op} p50 {statistics.median(recent) / 1e6:.1f} ms")
    return ", ".join(parts)


def print_table(results: CniResults) -> None:
    from rich.table import Table

    b = results.baseline
    table = Table(title=f"cni: ADD/DEL per pod, ms, {results.pods} pods (x {b}: ratio, same run)")
    columns = ["network", "ADD p50", "ADD p99", "DEL p50", "DEL p99", f"ADD x {b}", f"DEL x {b}"]
    for column in columns:
        table.add_column(column, justify="left" if column == "network" else "right")

    def ratio(r: NetworkResult, key: str) -> str:
        if not r.vs_baseline:
            return "-"
        return f"{r.vs_baseline[key]:.2f}"

    for r in results.networks:
        table.add_row(
            r.network,
            f"{r.add.p50_ms:.1f}",
            f"{r.add.p99_ms:.1f}",
            f"{r.delete.p50_ms:.1f}",
            f"{r.delete.p99_ms:.1f}",
            ratio(r, "add_p50") + " / " + ratio(r, "add_p99"),
            ratio(r, "del_p50") + " / " + ratio(r, "del_p99"),
        )
    notes = [f"ratios are p50 / p99; warm-up pods per network: {results.warmup}"]
    report.add_skipped(table, results.skipped, notes)
    table.caption = "\n".join(notes)
    report.print_wide(table)


def to_dict(results: CniResults) -> dict[str, object]:
    return {
        "benchmark": "cni",
        "unit": "ms per operation (samples in ns)",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kernel": os.uname().release,
        "pods": results.pods,
        "warmup": results.warmup,
        "baseline": results.baseline,
        "results": [
            {
                "network": r.network,
                "description": r.description,
                "add": asdict(r.add),
                "del": asdict(r.delete),
                "vs_baseline": r.vs_baseline,
                "add_ns": r.add_ns,
                "del_ns": r.del_ns,
            }
            for r in results.networks
        ],
        "skipped": results.skipped,
    }


def write_json(results: CniResults, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_dict(results), indent=2) + "\n")
