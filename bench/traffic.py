"""``ciliate bench traffic``: pod-to-pod throughput and latency, per network.

For each network, two pods on one node (:mod:`ciliate.bench.podnet`), with
the MTU their plugin gives them; both must be up and ping each other before
anything is measured. Then, repeated and interleaved across the networks
(the order rotates every round, so drift of this shared machine hits all
alike):

- TCP throughput, one stream, pod A -> pod B: ``iperf3 -s`` in B's
  namespace, ``iperf3 -c … -t SECONDS -J`` in A's; the figure is the
  receiver's bits per second;
- UDP ping-pong latency: ``sockperf server`` in B, ``sockperf ping-pong
  --time 1`` in A, SECONDS times per round with the networks interleaved
  (:func:`latency_slices`), both pinned to the same CPU with ``taskset`` (not
  pinned, latency is bimodal from cross-CPU wake-ups and hides the
  datapath). sockperf's default figure is one-way latency, i.e. half the
  round trip; ``full_rtt=True`` reports round trips.

Figures are medians of the repeats with min and max. A ratio to ``bridge``
or ``ptp`` is paired: each round's figure over the reference's figure of
the same round (the two ran back to back), and the median of those; on a
machine whose speed drifts between modes, that is far steadier than a
ratio of medians.

With ``profile_dir``, one more run of each tool per network is sampled by
``perf`` (:mod:`ciliate.bench.cpuprofile`): the share of CPU time spent in
the pod network's path against copies, protocol stacks and scheduling, and
so the best ratio any datapath could reach on this machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from ciliate.bench import cpuprofile, podnet, report

IPERF_PORT = 5201
SOCKPERF_PORT = 11111
REFERENCES = ("bridge", "ptp")


class TrafficError(RuntimeError):
    """A traffic tool failed or printed something unexpected."""


# --- parsing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class IperfSample:
    gbps: float
    """Receiver's throughput, Gbit/s (10^9)."""
    sender_gbps: float
    retransmits: int | None
    seconds: float


def parse_iperf3(doc: str | Mapping[str, Any]) -> IperfSample:
    """The summary of ``iperf3 -c … -J`` output (TCP)."""
    data: Mapping[str, Any] = json.loads(doc) if isinstance(doc, str) else doc
    if data.get("error"):
        raise TrafficError(f"iperf3: {data['error']}")
    try:
        end = data["end"]
        received = end["sum_received"]
        sent = end["sum_sent"]
        retransmits = sent.get("retransmits")
        return IperfSample(
            gbps=float(received["bits_per_second"]) / 1e9,
            sender_gbps=float(sent["bits_per_second"]) / 1e9,
            retransmits=int(retransmits) if retransmits is not None else None,
            seconds=float(received["seconds"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise TrafficError(f"iperf3: unexpected JSON (no {e})") from e


@dataclass(frozen=True)
class SockperfSample:
    """Latency figures of one ``sockperf ping-pong`` run, microseconds."""

    avg_us: float
    p50_us: float
    p99_us: float
    min_us: float
    max_us: float
    observations: int
    full_rtt: bool


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_AVG = re.compile(r"avg-(latency|rtt)\s*=\s*([0-9.]+)")
_PCT = re.compile(r"--->\s+percentile\s+([0-9.]+)\s*=\s*([0-9.]+)")
_MINMAX = re.compile(r"--->\s+<(MIN|MAX)>\s+observation\s*=\s*([0-9.]+)")
_OBS = re.compile(r"Total\s+(\d+)\s+observations")


def parse_sockperf(text: str) -> SockperfSample:
    """avg, p50, p99, min, max from ``sockperf ping-pong`` output (stdout + stderr)."""
    clean = _ANSI.sub("", text)
    avg = _AVG.search(clean)
    pcts = {float(p): float(v) for p, v in _PCT.findall(clean)}
    minmax = dict(_MINMAX.findall(clean))
    obs = _OBS.search(clean)
    if avg is None or 50.0 not in pcts or 99.0 not in pcts:
        tail = "\n".join(clean.strip().splitlines()[-5:])
        raise TrafficError(f"sockperf: no latency summary in its output:\n{tail}")
    return SockperfSample(
        avg_us=float(avg.group(2)),
        p50_us=pcts[50.0],
        p99_us=pcts[99.0],
        min_us=float(minmax.get("MIN", "nan")),
        max_us=float(minmax.get("MAX", "nan")),
        observations=int(obs.group(1)) if obs else 0,
        full_rtt=avg.group(1) == "rtt",
    )


# --- results --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    median: float
    min: float
    max: float
    samples: list[float]

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("no samples")
        return cls(statistics.median(values), min(values), max(values), list(values))


@dataclass
class NetworkTraffic:
    network: str
    description: str
    mtu: int
    pod_ips: tuple[str, str]
    throughput_gbps: Spread
    retransmits: Spread
    latency_p50_us: Spread
    latency_p99_us: Spread
    latency_avg_us: Spread
    vs: dict[str, dict[str, float]] = field(default_factory=dict)
    """Paired ratios to each reference network of the run, the median over the
    rounds and its range: {"bridge": {"throughput": …, "throughput_min": …,
    "throughput_max": …, "latency_p50": …, "latency_p50_min": …, …}}."""
    cpu: dict[str, cpuprofile.CpuProfile] = field(default_factory=dict)
    """Where the CPU went during one extra sampled run per tool: {"tcp": …, "udp": …}."""


@dataclass
class TrafficResults:
    seconds: float
    repeats: int
    cpu: int
    latency: str
    """What the latency figures are: "one-way (RTT/2)" or "round trip"."""
    networks: list[NetworkTraffic]
    skipped: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> NetworkTraffic | None:
        return next((r for r in self.networks if r.network == name), None)


# --- running --------------------------------------------------------------------------------


def default_cpu() -> int:
    return max(os.sched_getaffinity(0))


def run_tool(cmd: list[str], timeout: float, what: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise TrafficError(f"{what}: no answer within {timeout:.0f}s") from e


@dataclass
class BackgroundServer:
    proc: subprocess.Popen[bytes]
    log: IO[bytes]

    def failure(self) -> str | None:
        """What the server said if it has exited, else None."""
        if self.proc.poll() is None:
            return None
        self.log.seek(0)
        return self.log.read().decode(errors="replace").strip() or f"exit {self.proc.returncode}"


@contextlib.contextmanager
def background_server(cmd: list[str]) -> Iterator[BackgroundServer]:
    """A background server (output to a temporary file), stopped by its PID on the way out."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield BackgroundServer(proc, log)
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)


def wait_listening(pod: podnet.Pod, proto: str, port: int, server: BackgroundServer) -> None:
    flag = "-Hltn" if proto == "tcp" else "-Hlun"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        failure = server.failure()
        if failure is not None:
            raise TrafficError(f"{proto} server in {pod.netns} exited: {failure}")
        out = subprocess.run(
            podnet.netns_exec(pod.netns, "ss", flag, f"sport = :{port}"),
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        ).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise TrafficError(f"no {proto} server listening on {pod.ip}:{port} in {pod.netns}")


@dataclass
class PodPair:
    net: podnet.PodNetwork
    a: podnet.Pod
    b: podnet.Pod
    mtu: int
    iperf: list[IperfSample] = field(default_factory=list)
    sockperf: list[SockperfSample] = field(default_factory=list)


def iperf3_stream(pair: PodPair, seconds: float, *, cpu: int | None = None) -> IperfSample:
    """One TCP stream from ``pair.a`` to ``pair.b``; with ``cpu``, the client and (for
    this test) the server are pinned to it (iperf3's ``-A n,m``)."""
    cmd = podnet.netns_exec(
        pair.a.netns,
        "iperf3",
        "-c",
        pair.b.ip,
        "-p",
        str(IPERF_PORT),
        "-t",
        f"{seconds:g}",
        "-J",
        *([] if cpu is None else ["-A", f"{cpu},{cpu}"]),
    )
    proc = run_tool(cmd, seconds + 30, f"iperf3 in {pair.a.netns}")
    try:
        return parse_iperf3(proc.stdout)
    except (TrafficError, ValueError) as e:
        raise TrafficError(
            f"{pair.net.network.name}: iperf3 {pair.a.ip} -> {pair.b.ip} (exit"
            f" {proc.returncode}): {e} {proc.stderr.strip()}"
        ) from e


def sockperf_pingpong(pair: PodPair, seconds: float, cpu: int, full_rtt: bool) -> SockperfSample:
    cmd = podnet.netns_exec(
        pair.a.netns,
        "taskset",
        "-c",
        str(cpu),
        "sockperf",
        "ping-pong",
        "-i",
        pair.b.ip,
        "-p",
        str(SOCKPERF_PORT),
        "--time",
        f"{max(1, round(seconds))}",
        *(["--full-rtt"] if full_rtt else []),
    )
    proc = run_tool(cmd, seconds + 30, f"sockperf in {pair.a.netns}")
    try:
        return parse_sockperf(proc.stdout + proc.stderr)
    except TrafficError as e:
        raise TrafficError(
            f"{pair.net.network.name}: sockperf {pair.a.ip} -> {pair.b.ip} (exit"
            f" {proc.returncode}): {e}"
        ) from e


def set_up_pair(net: podnet.PodNetwork, stack: contextlib.ExitStack, cpu: int) -> PodPair:
    a, b = net.add_pod("a"), net.add_pod("b")
    net.wait_reachable(a, b)
    mtu_a, mtu_b = int(net.link(a)["mtu"]), int(net.link(b)["mtu"])
    if mtu_a != mtu_b:
        raise TrafficError(f"{net.network.name}: pods got different MTUs ({mtu_a}, {mtu_b})")
    start_servers(b, stack, cpu)
    return PodPair(net=net, a=a, b=b, mtu=mtu_a)


def start_servers(pod: podnet.Pod, stack: contextlib.ExitStack, cpu: int) -> None:
    """``iperf3 -s`` and ``sockperf server`` (pinned to ``cpu``) in ``pod``, stopped
    when ``stack`` closes; returns once both listen."""
    iperf = stack.enter_context(
        background_server(
            podnet.netns_exec(pod.netns, "iperf3", "-s", "-B", pod.ip, "-p", str(IPERF_PORT))
        )
    )
    sockperf = stack.enter_context(
        background_server(
            podnet.netns_exec(
                pod.netns,
                "taskset",
                "-c",
                str(cpu),
                "sockperf",
                "server",
                "-i",
                pod.ip,
                "-p",
                str(SOCKPERF_PORT),
            )
        )
    )
    wait_listening(pod, "tcp", IPERF_PORT, iperf)
    wait_listening(pod, "udp", SOCKPERF_PORT, sockperf)


def run(
    *,
    networks: Sequence[str | podnet.NetworkDef] = ("bridge", "ptp", "ciliate"),
    seconds: float = 5,
    repeats: int = 3,
    cpu: int | None = None,
    full_rtt: bool = False,
    progress: Callable[[str], None] | None = report.progress_to_stderr,
    ciliate_setup: podnet.CiliateSetup | None = None,
    profile_dir: Path | None = None,
) -> TrafficResults:
    """Throughput and latency between two pods of each network, ``repeats`` rounds.

    A run takes about ``len(networks) * repeats * 2 * seconds`` plus set-up.
    ``cpu`` is where the sockperf client and server are pinned (default: the
    last CPU this process may use)."""
    if repeats < 1 or seconds <= 0:
        raise ValueError("repeats must be >= 1 and seconds > 0")
    cpu = default_cpu() if cpu is None else cpu
    if profile_dir is not None:
        cpuprofile.check_available()
    specs = podnet.with_ciliate_setup(networks, ciliate_setup)
    skipped: dict[str, str] = {}

    def on_skip(name: str, reason: str) -> None:
        skipped[name] = reason
        if progress:
            progress(f"traffic: skipping {name}: {reason}")

    with contextlib.ExitStack() as stack:
        nets = stack.enter_context(podnet.pod_networks(specs, on_skip=on_skip))
        pairs: dict[str, PodPair] = {}
        for name, net in nets.items():
            pairs[name] = set_up_pair(net, stack, cpu)
            if progress:
                p = pairs[name]
                progress(
                    f"traffic: {name}: pods {p.a.ip} and {p.b.ip} ping each other, MTU {p.mtu}"
                )
        names = list(pairs)
        for r in range(repeats):
            k = r % len(names) if names else 0
            order = names[k:] + names[:k]
            # One tool at a time across the networks: the figures a ratio pairs
            # are then taken seconds apart, not a whole round.
            for name in order:
                pair = pairs[name]
                pair.iperf.append(iperf3_stream(pair, seconds))
                if progress:
                    i = pair.iperf[-1]
                    progress(
                        f"traffic: round {r + 1}/{repeats} {name}: {i.gbps:.2f} Gbit/s"
                        f" ({i.retransmits} retr)"
                    )
            slices = latency_slices(pairs, order, seconds, cpu, full_rtt)
            for name in order:
                pair = pairs[name]
                pair.sockperf.append(merge_sockperf(slices[name]))
                if progress:
                    s = pair.sockperf[-1]
                    progress(
                        f"traffic: round {r + 1}/{repeats} {name}: p50 {s.p50_us:.2f} us,"
                        f" p99 {s.p99_us:.2f} us"
                    )
        profiles = _profile(pairs, seconds, cpu, full_rtt, profile_dir, progress)

    results = [
        NetworkTraffic(
            network=name,
            description=pair.net.network.description,
            mtu=pair.mtu,
            pod_ips=(pair.a.ip, pair.b.ip),
            throughput_gbps=Spread.of([s.gbps for s in pair.iperf]),
            retransmits=Spread.of([float(s.retransmits or 0) for s in pair.iperf]),
            latency_p50_us=Spread.of([s.p50_us for s in pair.sockperf]),
            latency_p99_us=Spread.of([s.p99_us for s in pair.sockperf]),
            latency_avg_us=Spread.of([s.avg_us for s in pair.sockperf]),
            cpu=profiles.get(name, {}),
        )
        for name, pair in pairs.items()
    ]
    out = TrafficResults(
        seconds=seconds,
        repeats=repeats,
        cpu=cpu,
        latency="round trip" if full_rtt else "one-way (RTT/2)",
        networks=results,
        skipped=skipped,
    )
    for ref_name in REFERENCES:
        ref = out.get(ref_name)
        if ref is None:
            continue
        for res in results:
            res.vs[ref_name] = {}
            for key, spread, ref_spread in (
                ("throughput", res.throughput_gbps, ref.throughput_gbps),
                ("latency_p50", res.latency_p50_us, ref.latency_p50_us),
                ("latency_p99", res.latency_p99_us, ref.latency_p99_us),
            ):
                ratio = paired_ratio(spread.samples, ref_spread.samples)
                res.vs[ref_name].update(
                    {key: ratio.median, f"{key}_min": ratio.min, f"{key}_max": ratio.max}
                )
    return out


def latency_slices(
    pairs: Mapping[str, PodPair], order: Sequence[str], seconds: float, cpu: int, full_rtt: bool
) -> dict[str, list[SockperfSample]]:
    """One round's latency as 1 s runs, the networks interleaved (:func:`interleaved`)."""
    return interleaved(
        order, round(seconds), lambda name: sockperf_pingpong(pairs[name], 1, cpu, full_rtt)
    )


_Sample = TypeVar("_Sample")


def interleaved(
    order: Sequence[str], slices: int, run_one: Callable[[str], _Sample]
) -> dict[str, list[_Sample]]:
    """``slices`` short runs of each of ``order``, interleaved A B C, C B A, ...: on a
    machine that switches between speed modes every few seconds, the figures one
    ratio pairs are then taken within a second or two of each other, and the
    mirrored order cancels a steady drift."""
    samples: dict[str, list[_Sample]] = {name: [] for name in order}
    for i in range(max(1, slices)):
        for name in order if i % 2 == 0 else list(reversed(order)):
            samples[name].append(run_one(name))
    return samples


def merge_sockperf(samples: Sequence[SockperfSample]) -> SockperfSample:
    """Several runs of one network as one: the median of each percentile and
    of the average, the extremes of min and max, all observations."""
    if not samples:
        raise ValueError("no sockperf samples")
    return SockperfSample(
        avg_us=statistics.median(s.avg_us for s in samples),
        p50_us=statistics.median(s.p50_us for s in samples),
        p99_us=statistics.median(s.p99_us for s in samples),
        min_us=min(s.min_us for s in samples),
        max_us=max(s.max_us for s in samples),
        observations=sum(s.observations for s in samples),
        full_rtt=samples[0].full_rtt,
    )


def paired_ratio(values: Sequence[float], reference: Sequence[float]) -> Spread:
    """Round-by-round ratios of two series measured back to back, as a spread."""
    if len(values) != len(reference):
        raise ValueError("paired series must have one figure per round each")
    return Spread.of([v / r for v, r in zip(values, reference, strict=True)])


def _profile(
    pairs: Mapping[str, PodPair],
    seconds: float,
    cpu: int,
    full_rtt: bool,
    profile_dir: Path | None,
    progress: Callable[[str], None] | None,
) -> dict[str, dict[str, cpuprofile.CpuProfile]]:
    """One more iperf3 and sockperf run per network, each sampled by perf."""
    if profile_dir is None:
        return {}
    out: dict[str, dict[str, cpuprofile.CpuProfile]] = {}
    for name, pair in pairs.items():
        with cpuprofile.sampling(profile_dir, f"{name}-tcp") as tcp:
            iperf3_stream(pair, seconds)
        with cpuprofile.sampling(profile_dir, f"{name}-udp", cpus=str(cpu)) as udp:
            sockperf_pingpong(pair, seconds, cpu, full_rtt)
        out[name] = {"tcp": tcp[0], "udp": udp[0]}
        if progress:
            progress(
                f"traffic: {name}: sampled; path {tcp[0].busy_share('path'):.1f}% of busy CPU"
                f" (TCP), {udp[0].busy_share('path'):.1f}% (UDP)"
            )
    return out


# --- output ---------------------------------------------------------------------------------


def print_table(results: TrafficResults) -> None:
    from rich.table import Table

    refs = [r for r in REFERENCES if results.get(r) is not None]
    table = Table(
        title=f"traffic: pod -> pod on one node, median of {results.repeats} x"
        f" {results.seconds:g}s [min-max]"
    )
    columns = ["network", "MTU", "TCP Gbit/s", "retr", "UDP p50 us", "p99 us", "avg us"]
    columns += [f"x {r} (thr / p50)" for r in refs]
    for column in columns:
        table.add_column(column, justify="left" if column == "network" else "right")
    for r in results.networks:
        t, p50 = r.throughput_gbps, r.latency_p50_us
        row = [
            r.network,
            str(r.mtu),
            f"{t.median:.2f} [{t.min:.2f}-{t.max:.2f}]",
            f"{r.retransmits.median:.0f}",
            f"{p50.median:.2f} [{p50.min:.2f}-{p50.max:.2f}]",
            f"{r.latency_p99_us.median:.2f}",
            f"{r.latency_avg_us.median:.2f}",
        ]
        for ref in refs:
            v = r.vs.get(ref)
            row.append(_ratio_cell(v) if v else "-")
        table.add_row(*row)
    notes = [
        f"latency: sockperf UDP ping-pong, {results.latency}, client and server pinned"
        f" to CPU {results.cpu}; throughput: iperf3, one TCP stream, receiver side;"
        " ratios: median \\[range] of round-by-round ratios"
    ]
    report.add_skipped(table, results.skipped, notes)
    table.caption = "\n".join(notes)
    report.print_wide(table)
    if any(r.cpu for r in results.networks):
        print_cpu_table(results)


def _ratio_cell(v: Mapping[str, float]) -> str:
    def one(key: str) -> str:
        low, high = v.get(f"{key}_min"), v.get(f"{key}_max")
        span = f" [{low:.2f}-{high:.2f}]" if low is not None and high is not None else ""
        return f"{v[key]:.2f}{span}"

    return f"{one('throughput')} / {one('latency_p50')}"


def print_cpu_table(results: TrafficResults) -> None:
    """Where the CPU went in the sampled runs, and the path-free bound of each."""
    from rich.table import Table

    table = Table(title="traffic: share of busy CPU time, % (perf samples, self time)")
    columns = ["network", "tool", *cpuprofile.BUCKETS, "path-free bound", "top of path"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("network", "tool") else "right")
    for r in results.networks:
        for tool, profile in r.cpu.items():
            bound = cpuprofile.path_free_bound(profile, throughput=tool == "tcp")
            top = ", ".join(f"{sym} {share:.1f}" for sym, share in profile.top_path[:3])
            table.add_row(
                r.network,
                "iperf3" if tool == "tcp" else "sockperf",
                *(
                    f"{profile.buckets.get(b, 0.0) if b == 'idle' else profile.busy_share(b):.1f}"
                    for b in cpuprofile.BUCKETS
                ),
                f"x{bound:.2f}",
                top,
            )
    table.caption = (
        "path: veth, backlog and softirq dispatch, tc/BPF, redirects, bridge, netfilter,"
        " forwarding; idle: % of all samples (sockperf: its CPU only); path-free bound:"
        " the throughput factor (iperf3) or latency factor (sockperf) this network would"
        " get if its path cost nothing"
    )
    report.print_wide(table)


def to_dict(results: TrafficResults) -> dict[str, object]:
    return {
        "benchmark": "traffic",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kernel": os.uname().release,
        "seconds": results.seconds,
        "repeats": results.repeats,
        "cpu": results.cpu,
        "units": {"throughput": "Gbit/s", "latency": f"us, {results.latency}"},
        "results": [asdict(r) for r in results.networks],
        "skipped": results.skipped,
    }


def write_json(results: TrafficResults, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_dict(results), indent=2) + "\n")


def plot(results: TrafficResults, png_path: Path) -> None:
    """TCP throughput and UDP latency p50 (bars, min/max whiskers); with a
    ``bridge`` in the run, a third panel of the paired ratios to it."""
    import matplotlib  # type: ignore[import-not-found, unused-ignore]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]

    names = [r.network for r in results.networks]
    xs = list(range(len(names)))
    colors = [f"C{i}" for i in xs]
    ref = "bridge" if results.get("bridge") is not None else None
    fig, axes = plt.subplots(1, 3 if ref else 2, figsize=(15 if ref else 10, 4.2))
    ax_t, ax_l = axes[0], axes[1]
    panels = (
        (
            ax_t,
            [r.throughput_gbps for r in results.networks],
            "TCP throughput, one stream",
            "Gbit/s",
            "{:.1f}",
        ),
        (
            ax_l,
            [r.latency_p50_us for r in results.networks],
            f"UDP ping-pong latency p50, {results.latency}",
            "\u00b5s",
            "{:.2f}",
        ),
    )
    for ax, spreads, label, unit, fmt in panels:
        medians = [s.median for s in spreads]
        err = [
            [s.median - s.min for s in spreads],
            [s.max - s.median for s in spreads],
        ]
        bars = ax.bar(xs, medians, yerr=err, capsize=6, color=colors)
        ax.bar_label(bars, labels=[fmt.format(m) for m in medians], label_type="center")
        ax.set_xticks(xs, names)
        ax.set_ylabel(unit)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.15)
    if ref:
        _plot_ratios(axes[2], results, ref)
    fig.suptitle(
        f"pod -> pod on one node: median of {results.repeats} x {results.seconds:g}s,"
        " whiskers min/max"
    )
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def _plot_ratios(ax: Any, results: TrafficResults, ref: str) -> None:
    """Paired ratios to ``ref``, throughput and latency side by side per network."""
    others = [r for r in results.networks if r.network != ref]
    xs = list(range(len(others)))
    width = 0.38
    for offset, key, label, color in (
        (-width / 2, "throughput", "throughput (higher is better)", "C2"),
        (width / 2, "latency_p50", "latency p50 (lower is better)", "C3"),
    ):
        values = [r.vs[ref][key] for r in others]
        err = [
            [v - r.vs[ref][f"{key}_min"] for v, r in zip(values, others, strict=True)],
            [r.vs[ref][f"{key}_max"] - v for v, r in zip(values, others, strict=True)],
        ]
        bars = ax.bar(
            [x + offset for x in xs], values, width, yerr=err, capsize=4, color=color, label=label
        )
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], label_type="center")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(xs, [r.network for r in others])
    ax.set_ylabel(f"x {ref}")
    ax.set_title(f"paired ratio to {ref} (median of rounds)")
    ax.legend(loc="upper left", fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    ax.margins(y=0.2)
