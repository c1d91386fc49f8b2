"""``ciliate bench datapath``: ns/packet of each datapath path.

Each case is a scapy packet run through the real loaded program with
BPF_PROG_TEST_RUN and a repeat count; the kernel reports the mean time per
run, measured around its own loop (no syscall in the figure). The baseline
is an empty tc program run the same way, at the same repeat count, in the
same session, and every figure is also given as a ratio to it: this machine
is noisy, ratios travel.

Test-run reuses one skb for all repeats, so a program that rewrites the
packet sees its own output on the next run. Every call checks the verdict
of its last run, so a figure never silently measures another path:

- local delivery rewrites the MACs; the benchmark's peer endpoint is given
  the sender's MACs (node side = the sender's eth0), which makes the
  rewritten frame again a valid frame from the sender: every repeat does
  the full work (lookups, both MAC stores, TTL and checksum update). TTL
  255 allows 250 repeats;
- an ARP request turns into a reply, so it runs once per call, against an
  empty program also run once per call;
- events are drained after each call so the ring buffer never fills;
- policy cases run with N rules in force on the receiver's ingress and
  the sender's egress (one of them allowing the flow, the others for
  other identities and ports). An established flow has its conntrack
  entry made before the measurement; a first packet runs once per call
  and its conntrack entry is deleted after each call, so every packet
  opens a new connection. Two more paths of a known connection: an ICMP
  error RELATED to it (A's port unreachable for B's reply, into B, whose
  ingress lets only A's UDP 5000 in) and a later fragment of one of its
  datagrams (its ports from the fragment map), each after the packets
  that make the connection (and record the first fragment) ran once.
  Each policy case is also given as a ratio to the no-policy path at
  the same repeat count, and the 10,000-rule cases to the 10-rule ones,
  paired round by round (rounds interleave every case, so drift hits all
  alike).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ciliate.datapath import objects
from ciliate.datapath.conntrack import Way
from ciliate.datapath.maps import Endpoint
from ciliate.datapath.policy import PolicyEntry
from ciliate.datapath.testbed import REMOTE_POD_CIDR, ROUTER_IP, Testbed
from ciliate.loader import BpfObject, Program

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    program: str
    repeat: int
    expect: int
    packet: Callable[[Testbed], bytes]
    trace: bool = False
    policy_rules: int = 0  # rules in force on each end (0: no policy)
    first_packet: bool = False  # every packet opens a new connection
    compare: tuple[str, ...] = ()  # other cases this one is a ratio to
    # Packets run once before a policy case is measured (after the flow's own).
    setup: Callable[[Testbed], list[bytes]] | None = None


def _from_a(tb: Testbed, dst: object, **ip: object) -> bytes:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    return bytes(
        Ether(src=tb.pod_a.eth0.mac, dst=tb.pod_a.lxc.mac)
        / IP(src=str(ip.pop("src", tb.pod_a.ip)), dst=str(dst), ttl=255)
        / UDP(sport=4000, dport=5000)
        / (b"x" * 18)
    )


def _frame_from_a(tb: Testbed, ip_packet: object) -> bytes:
    from scapy.layers.l2 import Ether

    return bytes(Ether(src=tb.pod_a.eth0.mac, dst=tb.pod_a.lxc.mac) / ip_packet)


def _related_icmp(tb: Testbed) -> bytes:
    """A's port unreachable for B's reply to the benchmark flow, to B."""
    from scapy.layers.inet import ICMP, IP, UDP

    quoted = IP(src=str(tb.pod_b.ip), dst=str(tb.pod_a.ip), ttl=64) / UDP(sport=5000, dport=4000)
    return _frame_from_a(
        tb,
        IP(src=str(tb.pod_a.ip), dst=str(tb.pod_b.ip), ttl=255)
        / ICMP(type=3, code=3)
        / bytes(quoted / (b"x" * 18))[:28],
    )


def _fragments(tb: Testbed) -> list[bytes]:
    """A UDP datagram of the benchmark flow in two fragments."""
    from scapy.layers.inet import IP, UDP, fragment

    datagram = (
        IP(src=str(tb.pod_a.ip), dst=str(tb.pod_b.ip), ttl=255, id=0x4242)
        / UDP(sport=4000, dport=5000)
        / (b"x" * 40)
    )
    first, later = fragment(datagram, fragsize=24)  # type: ignore[no-untyped-call]
    return [_frame_from_a(tb, first), _frame_from_a(tb, later)]


def _arp(tb: Testbed) -> bytes:
    from scapy.layers.l2 import ARP, Ether

    a = tb.pod_a
    return bytes(
        Ether(src=a.eth0.mac, dst="ff:ff:ff:ff:ff:ff")
        / ARP(op=1, hwsrc=a.eth0.mac, psrc=str(a.ip), pdst=str(ROUTER_IP))
    )


CASES = [
    Case(
        "arp_reply",
        "ARP request for the gateway, answered",
        "from_container",
        1,
        TC_ACT_REDIRECT,
        _arp,
    ),
    Case(
        "local_delivery",
        "pod -> local pod (redirect_peer)",
        "from_container",
        250,
        TC_ACT_REDIRECT,
        lambda tb: _from_a(tb, tb.pod_b.ip),
    ),
    Case(
        "to_host",
        "pod -> router IP (to the stack)",
        "from_container",
        250,
        TC_ACT_OK,
        lambda tb: _from_a(tb, ROUTER_IP),
    ),
    Case(
        "to_remote_node",
        "pod -> pod on another node (ipcache)",
        "from_container",
        250,
        TC_ACT_OK,
        lambda tb: _from_a(tb, REMOTE_POD_CIDR[9]),
    ),
    Case(
        "spoofed_drop",
        "spoofed source IP, dropped + event",
        "from_container",
        250,
        TC_ACT_SHOT,
        lambda tb: _from_a(tb, tb.pod_b.ip, src="10.244.1.200"),
    ),
    Case(
        "local_delivery_traced",
        "pod -> local pod with tracing on",
        "from_container",
        250,
        TC_ACT_REDIRECT,
        lambda tb: _from_a(tb, tb.pod_b.ip),
        trace=True,
    ),
    Case(
        "local_delivery_1",
        "pod -> local pod, one packet per run (first-packet baseline)",
        "from_container",
        1,
        TC_ACT_REDIRECT,
        lambda tb: _from_a(tb, tb.pod_b.ip),
        first_packet=True,
    ),
    *(
        Case(
            f"policy_{kind}_{rules}",
            f"pod -> local pod, {rules:,} rules, {what}",
            "from_container",
            1 if kind == "first" else 250,
            TC_ACT_REDIRECT,
            lambda tb: _from_a(tb, tb.pod_b.ip),
            policy_rules=rules,
            first_packet=kind == "first",
            compare=(
                "local_delivery_1" if kind == "first" else "local_delivery",
                *((f"policy_{kind}_10",) if rules > 10 else ()),
            ),
        )
        for kind, what in (
            ("established", "established flow"),
            ("first", "first packet of a flow"),
        )
        for rules in (10, 10_000)
    ),
    Case(
        "policy_related_icmp_10",
        "ICMP error related to a known flow, 10 rules",
        "from_container",
        250,
        TC_ACT_REDIRECT,
        _related_icmp,
        policy_rules=10,
        compare=("local_delivery",),
    ),
    Case(
        "policy_fragment_10",
        "later fragment of a known flow's datagram, 10 rules",
        "from_container",
        250,
        TC_ACT_REDIRECT,
        lambda tb: _fragments(tb)[1],
        policy_rules=10,
        compare=("local_delivery",),
        setup=lambda tb: _fragments(tb)[:1],
    ),
]

# The benchmark flow's ends: pod A (endpoint 1, identity 1001) sends UDP
# 4000 -> 5000 to pod B (endpoint 2, identity 1002).
_A_EP, _A_ID, _B_EP, _B_ID = 1, 1001, 2, 1002
_UDP, _TCP = 17, 6


def write_policy(tb: Testbed, rules: int) -> None:
    """`rules` entries on B's ingress and on A's egress, one of each allowing
    the benchmark flow; 0 removes every policy."""
    tb.datapath.conntrack.flush()
    if rules == 0:
        tb.datapath.policy.clear(_A_EP)
        tb.datapath.policy.clear(_B_EP)
        return

    def others(direction: str) -> list[PolicyEntry]:
        return [
            PolicyEntry(direction, 100_000 + i, _TCP, 80 + i % 7)  # type: ignore[arg-type]
            for i in range(rules - 1)
        ]

    tb.datapath.policy.replace(
        _B_EP,
        [*others("ingress"), PolicyEntry("ingress", _A_ID, _UDP, 5000)],
        ingress_enforced=True,
        egress_enforced=False,
    )
    tb.datapath.policy.replace(
        _A_EP,
        [*others("egress"), PolicyEntry("egress", _B_ID, _UDP, 5000)],
        ingress_enforced=False,
        egress_enforced=True,
    )


def add_bench_pods(tb: Testbed) -> None:
    """Both pods, with pod B's MACs chosen so a rewritten A->B frame is again
    a valid frame from A (see the module docstring)."""
    tb.add_pods()
    a, b = tb.pod_a, tb.pod_b
    tb.datapath.endpoints.upsert(
        Endpoint(
            ipv4=b.ip,
            ifindex=b.lxc.ifindex,
            mac=a.lxc.mac,
            node_mac=a.eth0.mac,
            identity=1002,
            endpoint_id=2,
        )
    )


@dataclass
class Result:
    name: str
    description: str
    repeat: int
    ns_median: float
    ns_min: float
    ns_max: float
    empty_ns_median: float
    ratio: float  # to the empty program
    vs: dict[str, float] = field(default_factory=dict)  # to other cases of the run


def _measure(
    tb: Testbed,
    prog: Program,
    packet: bytes,
    *,
    ifindex: int,
    repeat: int,
    expect: int,
    packets: int,
    after_call: Callable[[], None] | None = None,
) -> float:
    """ns/packet over about `packets` packets, sent in calls of `repeat`
    (:func:`_clean_mean` of the calls)."""
    calls = max(1, packets // repeat)
    return _clean_mean(
        [
            _timed_call(
                tb,
                prog,
                packet,
                ifindex=ifindex,
                repeat=repeat,
                expect=expect,
                after_call=after_call,
            )
            for _ in range(calls)
        ]
    )


def _timed_call(
    tb: Testbed,
    prog: Program,
    packet: bytes,
    *,
    ifindex: int,
    repeat: int,
    expect: int,
    after_call: Callable[[], None] | None,
) -> float:
    """One call of `repeat` packets: ns/packet, the verdict checked."""
    result = tb.run(prog, packet, ifindex=ifindex, repeat=repeat)
    if result.retval != expect:
        raise RuntimeError(
            f"{prog.name}: verdict {result.retval}, expected {expect}: "
            "the packet left the path under test"
        )
    tb.events()
    if after_call is not None:
        after_call()
    return float(result.duration_ns)


def _measure_paired(
    tb: Testbed,
    prog: Program,
    packet: bytes,
    *,
    ifindex: int,
    repeat: int,
    expect: int,
    packets: int,
    after_call: Callable[[], None] | None,
    first_on: bool,
) -> tuple[float, float]:
    """:func:`_measure` of a policy case with enforcement on and off: (on, off). An
    established flow's are taken call by call in turn (which goes first
    alternates); switching enforcement moves the policy revision, so with it on
    the flow is judged again by one packet sent before the timed call, as an
    established flow is between changes. A first packet is one packet a call, and
    the switch's map writes right before it would be timed with it: there each
    side is taken in a block of calls, the blocks in turn."""
    if repeat == 1:
        blocks: dict[bool, float] = {}
        for on in (first_on, not first_on):
            _enforce(tb, on=on)
            blocks[on] = _measure(
                tb,
                prog,
                packet,
                ifindex=ifindex,
                repeat=repeat,
                expect=expect,
                packets=packets,
                after_call=after_call,
            )
        _enforce(tb, on=True)
        return blocks[True], blocks[False]
    calls = max(1, packets // repeat)
    figures: dict[bool, list[float]] = {True: [], False: []}
    for call in range(calls):
        for on in (first_on, not first_on) if call % 2 == 0 else (not first_on, first_on):
            _enforce(tb, on=on)
            tb.run(prog, packet, ifindex=ifindex)
            figures[on].append(
                _timed_call(
                    tb,
                    prog,
                    packet,
                    ifindex=ifindex,
                    repeat=repeat,
                    expect=expect,
                    after_call=after_call,
                )
            )
    _enforce(tb, on=True)
    return _clean_mean(figures[True]), _clean_mean(figures[False])


def _clean_mean(per_call: list[float]) -> float:
    """The mean of the calls' figures up to their 75th percentile. A call the
    machine interrupts (another guest, an IRQ) reads several times its true cost,
    and a mean over all calls let a few of them move a round's figure by 10-50%
    here; interruptions only ever add, so the faster calls are the clean ones.
    (Not their median: the kernel reports a call's mean in whole ns, too coarse
    for ~25 ns paths.)"""
    clean = sorted(per_call)[: max(1, len(per_call) * 3 // 4)]
    return statistics.fmean(clean)


def prepare(tb: Testbed, case: Case, packet: bytes) -> Callable[[], None] | None:
    """Put the datapath in the case's state (tracing; for an established
    flow, its conntrack entry); the hook to run after each call (a first
    packet: delete the entry it made), if any. The no-policy baseline of
    first packets runs the same clean-up (on a way no flow uses), so both
    run between calls the same syscalls and start equally warm."""
    tb.datapath.config.set_trace(case.trace)
    conntrack = tb.datapath.conntrack
    way = Way(set_index=0, way=0)
    if case.policy_rules:
        conntrack.flush()
        # The flow itself, then what the case needs besides (if anything),
        # then the case's packet: one connection in the tracker.
        for setup_packet in [_from_a(tb, tb.pod_b.ip), *(case.setup(tb) if case.setup else [])]:
            tb.run(case.program, setup_packet, ifindex=tb.pod_a.lxc.ifindex)
        tb.run(case.program, packet, ifindex=tb.pod_a.lxc.ifindex)
        tb.events()
        ((way, _, _),) = list(conntrack.entries())
    if not case.first_packet:
        return None

    def forget_connection() -> None:
        conntrack.delete(way)

    forget_connection()
    return forget_connection


def run(
    *,
    rounds: int = 7,
    packets_per_round: int = 100_000,
    progress: Callable[[str], None] | None = None,
) -> list[Result]:
    figures: dict[str, list[float]] = {case.name: [] for case in CASES}
    # Policy cases: the same flow measured beside them with enforcement off.
    unenforced: dict[str, list[float]] = {case.name: [] for case in CASES}
    empty_figures: dict[int, list[float]] = {case.repeat: [] for case in CASES}
    with Testbed(prefix="cbb") as tb, BpfObject.open(objects.object_path("empty")) as empty_obj:
        empty_obj.load()
        empty = empty_obj.program("empty")
        add_bench_pods(tb)
        ifindex = tb.pod_a.lxc.ifindex
        # Rounds outermost: every case and baseline is measured once per
        # round, so a drift of the machine shows in all of them alike.
        for round_no in range(1, rounds + 1):
            for rules in sorted({case.policy_rules for case in CASES}):
                write_policy(tb, rules)
                for case in (c for c in CASES if c.policy_rules == rules):
                    if progress:
                        progress(f"round {round_no}/{rounds}: {case.name}")
                    packet = case.packet(tb)
                    if case.policy_rules:
                        _enforce(tb, on=True)
                    after_call = prepare(tb, case, packet)

                    program = tb.datapath.program(case.program)
                    if not case.policy_rules:
                        figures[case.name].append(
                            _measure(
                                tb,
                                program,
                                packet,
                                ifindex=ifindex,
                                repeat=case.repeat,
                                expect=case.expect,
                                packets=packets_per_round,
                                after_call=after_call,
                            )
                        )
                        continue
                    # The same flow with no policy in force, right beside it (a
                    # drift of the machine lasts longer than two calls).
                    enforced, open_ = _measure_paired(
                        tb,
                        program,
                        packet,
                        ifindex=ifindex,
                        repeat=case.repeat,
                        expect=case.expect,
                        packets=packets_per_round,
                        after_call=after_call,
                        first_on=bool(round_no % 2),
                    )
                    figures[case.name].append(enforced)
                    unenforced[case.name].append(open_)
            tb.datapath.config.set_trace(False)
            for repeat, per_round in empty_figures.items():
                per_round.append(
                    _measure(
                        tb,
                        empty,
                        _from_a(tb, tb.pod_b.ip),
                        ifindex=ifindex,
                        repeat=repeat,
                        expect=TC_ACT_OK,
                        packets=packets_per_round,
                    )
                )
        write_policy(tb, 0)
    results = []
    for case in CASES:
        mine = figures[case.name]
        results.append(
            Result(
                name=case.name,
                description=case.description,
                repeat=case.repeat,
                ns_median=statistics.median(mine),
                ns_min=min(mine),
                ns_max=max(mine),
                empty_ns_median=statistics.median(empty_figures[case.repeat]),
                ratio=_paired_ratio(mine, empty_figures[case.repeat]),
                vs={
                    **(
                        {"no policy (beside)": _paired_ratio(mine, unenforced[case.name])}
                        if case.policy_rules
                        else {}
                    ),
                    **{other: _paired_ratio(mine, figures[other]) for other in case.compare},
                },
            )
        )
    return results


def _enforce(tb: Testbed, *, on: bool) -> None:
    """Enforcement of the benchmark flow's policies on or off (entries kept)."""
    tb.datapath.policy.set_enforcement(_B_EP, ingress_enforced=on, egress_enforced=False)
    tb.datapath.policy.set_enforcement(_A_EP, ingress_enforced=False, egress_enforced=on)


def _paired_ratio(figures: list[float], baseline: list[float]) -> float:
    """Median of the round-by-round ratios."""
    return statistics.median(a / b for a, b in zip(figures, baseline, strict=True))


_NUMERIC = frozenset({"repeat", "median", "min", "max", "empty", "x empty"})


def print_table(results: list[Result]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="datapath: ns/packet through BPF_PROG_TEST_RUN (median of rounds)")
    for column in ("path", "what", "repeat", "median", "min", "max", "empty", "x empty", "x other"):
        table.add_column(column, justify="right" if column in _NUMERIC else "left")
    for r in results:
        table.add_row(
            r.name,
            r.description,
            str(r.repeat),
            f"{r.ns_median:.1f}",
            f"{r.ns_min:.1f}",
            f"{r.ns_max:.1f}",
            f"{r.empty_ns_median:.1f}",
            f"{r.ratio:.2f}",
            "\n".join(f"{ratio:.2f} x {other}" for other, ratio in r.vs.items()),
        )
    Console().print(table)


def write_json(results: list[Result], path: Path) -> None:
    doc = {
        "benchmark": "datapath",
        "unit": "ns/packet",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": [asdict(r) for r in results],
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
