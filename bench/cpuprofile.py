"""Where the CPU goes during a benchmark: ``perf`` samples grouped by kind of work.

A ratio between two pod networks says *that* one is faster; this says *why*,
or why not. While a workload runs, ``perf record -a`` samples every CPU;
``perf report`` then gives each kernel and user symbol's share of the
samples (self time, so the shares add up to 100 %), and each symbol is put
in one bucket:

- ``copy``: moving payload between user and kernel memory;
- ``path``: the pod network itself: veth, backlog queues and softirq
  dispatch, tc and BPF programs, redirects, the bridge, netfilter and IP
  forwarding in the node;
- ``stack``: the sockets and the TCP/UDP/IP protocol work in the pods;
- ``sched``: syscalls, scheduling, wake-ups, locks, interrupts and softirq
  entry (on a VM, pending interrupts are paid where they are re-enabled);
- ``user``: the tools themselves;
- ``idle`` and ``other``.

Only ``path`` differs between networks by design; when ``copy`` dominates a
run, no datapath can move that figure much.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT_S = 15.0
BUCKETS = ("copy", "path", "stack", "sched", "user", "idle", "other")

# First match wins; patterns are anchored at the start of the symbol.
_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "idle",
        re.compile(
            r"(pv_native_safe_halt|default_idle|do_idle|cpuidle|intel_idle|poll_idle|.*_safe_halt)"
        ),
    ),
    (
        "copy",
        re.compile(
            r"(_copy_(from|to)_iter|copy_user|rep_movs|copy_page|__check_object_size|memcpy"
            r"|skb_copy_datagram|__virt_addr_valid|__check_heap_object|check_stack_object)"
        ),
    ),
    (
        "path",
        re.compile(
            r"(veth_|__netif_rx|netif_rx|enqueue_to_backlog|process_backlog|net_rx_action|__napi_poll"
            r"|napi_|gro_|dev_gro|__netif_receive_skb|netif_receive_skb|tc_run|tcx_|tcf_|__tcf_|cls_bpf"
            r"|bpf_prog_|bpf_|skb_do_redirect|__bpf_redirect|br_|nbp_|fdb_|__br_|nf_|ipt_|nft_|ip_forward"
            r"|__dev_forward_skb|dev_forward_skb|skb_scrub_packet|__dev_queue_xmit|dev_queue_xmit"
            r"|dev_hard_start_xmit|validate_xmit|netdev_core_pick|sch_handle_|eth_type_trans"
            r"|do_softirq|__local_bh_enable|neigh_|dev_get_by_index|netif_skb_features)"
        ),
    ),
    (
        "stack",
        re.compile(
            r"(tcp_|__tcp_|udp|__udp|ip_|__ip_|inet_|__inet_|ipv4_|raw_|sk_|__sk_|sock_|__sock_|skb_|__skb_"
            r"|kfree_skb|consume_skb|alloc_skb|__alloc_skb|fib_|__fib_|dst_|rt_|ip4_|icmp|release_sock"
            r"|lock_sock|__release_sock|__x64_sys_(send|recv|read|write)|__sys_(send|recv)|sock|move_addr"
            r"|security_sock|csum|bbr_|cubic|kmem_|kfree|kmalloc|__kmalloc|slab_|__slab|___slab"
            r"|build_detached|__build_skb|__copy_skb_header|__alloc_|alloc_pages|get_page_from"
            r"|__free_|free_|__memcg|__mod_timer)"
        ),
    ),
    (
        "sched",
        re.compile(
            r"(schedule|__schedule|finish_task_switch|pick_|enqueue_|dequeue_|update_|try_to_wake_up"
            r"|ttwu|wake_|__wake|select_task|set_next|put_prev|psi_|_raw_spin|__raw_|native_queued"
            r"|__pv_queued|queued_spin|entry_|do_syscall|syscall_|exit_to_user|__rseq|rseq|fdget|__fget"
            r"|rcu|__rcu|ktime|read_tsc|hrtimer|__hrtimer|irq|__irq|sysvec|asm_|native_|x86_|__x64_sys"
            r"|ep_|do_epoll|__do_sys|restore_|clear_bhb|switch_|__switch|prepare_|mutex|up_|down_"
            r"|handle_softirqs|_copy_from_user|_copy_to_user|__get_user|__put_user|x64_sys_call"
            r"|do_select|core_sys_select|poll_|__pollwait|vfs_|ksys_|finish_wait|_find_next_bit)"
        ),
    ),
)

_LINE = re.compile(r"^\s*([0-9.]+)%\s+\S+\s+\[(k|\.)\]\s+(\S+)")


class ProfileUnavailable(RuntimeError):
    """perf is missing or may not sample here; ``str()`` says why."""


def bucket_of(symbol: str, kernel: bool) -> str:
    """The bucket of one symbol (user-space symbols are ``user``)."""
    if not kernel:
        return "user"
    for name, pattern in _RULES:
        if pattern.match(symbol):
            return name
    return "other"


@dataclass
class CpuProfile:
    """Shares of the sampled CPU time, percent, by bucket; the top symbols of ``path``."""

    samples_file: str
    buckets: dict[str, float] = field(default_factory=dict)
    top_path: list[tuple[str, float]] = field(default_factory=list)

    def busy_share(self, bucket: str) -> float:
        """A bucket's share of the time the CPUs were not idle, percent."""
        busy = 100.0 - self.buckets.get("idle", 0.0)
        return 100.0 * self.buckets.get(bucket, 0.0) / busy if busy > 0 else 0.0


def parse_report(text: str, *, top: int = 8) -> CpuProfile:
    """``perf report --no-children --sort dso,sym`` output (``--stdio``) into buckets."""
    buckets = dict.fromkeys(BUCKETS, 0.0)
    path: dict[str, float] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m is None:
            continue
        share, kind, symbol = float(m.group(1)), m.group(2), m.group(3)
        name = bucket_of(symbol, kind == "k")
        buckets[name] += share
        if name == "path":
            path[symbol] = path.get(symbol, 0.0) + share
    ranked = sorted(path.items(), key=lambda kv: kv[1], reverse=True)[:top]
    return CpuProfile(samples_file="", buckets=buckets, top_path=ranked)


def _perf() -> str:
    perf = shutil.which("perf")
    if perf is None:
        raise ProfileUnavailable("perf is not installed (apt-get install linux-perf)")
    return perf


def _command(proc: subprocess.Popen[bytes], ctl: Path, ack: Path, command: str) -> None:
    """Send perf one control command and wait for its ack (perf opens its fifos
    when it is ready; until then, and if it dies, this must not hang)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            fd = os.open(ctl, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as e:
            if e.errno != errno.ENXIO:  # no reader yet
                raise
        if proc.poll() is not None or time.monotonic() > deadline:
            raise ProfileUnavailable("perf record did not start (see perf's own message)")
        time.sleep(0.01)
    try:
        os.write(fd, f"{command}\n".encode())
    finally:
        os.close(fd)
    with open(ack, "rb", buffering=0) as answer:
        if not answer.read(4).startswith(b"ack"):
            raise ProfileUnavailable(f"perf did not acknowledge {command!r}")


def check_available() -> None:
    """Raise :class:`ProfileUnavailable` unless ``perf`` can sample here."""
    _perf()


def path_free_bound(profile: CpuProfile, *, throughput: bool) -> float:
    """The best factor a datapath costing nothing could give over this run,
    if the run is CPU-bound: throughput x 1/(1 - path share), latency x (1 - path
    share), the share being of the busy (not idle) CPU time."""
    rest = 1.0 - profile.busy_share("path") / 100.0
    return 1.0 / rest if throughput else rest


@contextlib.contextmanager
def sampling(
    out_dir: Path, name: str, *, cpus: str | None = None, frequency: int = 2999
) -> Iterator[list[CpuProfile]]:
    """Sample ``cpus`` (a perf CPU list; default all) for the duration of the
    ``with`` block; the profile is appended to the yielded list on the way out
    (the samples stay in ``out_dir/name.perf.data``)."""
    perf = _perf()
    out_dir.mkdir(parents=True, exist_ok=True)
    data = out_dir / f"{name}.perf.data"
    result: list[CpuProfile] = []
    with (
        tempfile.TemporaryDirectory(prefix="ciliate-perf-") as fifo_dir,
        tempfile.TemporaryFile() as log,
    ):
        ctl, ack = Path(fifo_dir) / "ctl", Path(fifo_dir) / "ack"
        os.mkfifo(ctl)
        os.mkfifo(ack)
        # Started paused (-D -1) and enabled through its control fifo, with an
        # acknowledgement: sampling is on when the block starts (perf itself
        # takes a good part of a second to get going).
        where = ["-a", *(["-C", cpus] if cpus else [])]
        control = ["-D", "-1", "--control", f"fifo:{ctl},{ack}"]
        proc = subprocess.Popen(
            [perf, "record", *where, "-F", str(frequency), *control, "-o", str(data)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            _command(proc, ctl, ack, "enable")
            yield result
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.returncode not in (0, -signal.SIGINT) or not data.exists():
            log.seek(0)
            said = log.read().decode(errors="replace").strip().splitlines()[-3:]
            raise ProfileUnavailable(f"perf record failed: {' '.join(said)}")
    report = subprocess.run(
        [
            perf,
            "report",
            "-i",
            str(data),
            "--stdio",
            "--no-children",
            "--sort",
            "dso,sym",
            "--percent-limit",
            "0",
            "-g",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if report.returncode != 0:
        raise ProfileUnavailable(f"perf report failed: {report.stderr.strip()[-300:]}")
    profile = parse_report(report.stdout)
    profile.samples_file = str(data)
    result.append(profile)
