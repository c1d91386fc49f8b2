"""``ciliate bench policy``: what network policy costs, and how fast it takes effect.

1. **apply -> enforced**: ``endpoints`` pods on a ciliate node; each round applies a
   NetworkPolicy selecting all of them (its port changes every round) through the
   agent's API and waits until every endpoint's datapath policy carries the new
   revision with ingress enforced. The figure is the time from the apply call to the
   last endpoint, p50 over the rounds.
2. **the peer, side by side**: two pods (client ``a``, server ``b``) on ``ptp`` with
   the policy written as iptables rules the way iptables-based policy engines write
   them (:mod:`ciliate.bench.policy_peer`), and on ciliate with the same policy as a
   NetworkPolicy: ``rules - 1`` ipBlock peers that never send, then the client's. For
   each rule count, and without any policy first, in the same run: UDP
   request/response p50 on one flow (``sockperf ping-pong``, every packet on an
   established flow), UDP request/response p50 with a new flow per request
   (:mod:`ciliate.bench.udp_rr`, the first-packet path) and one TCP stream
   (``iperf3``). The networks are measured back to back within each round and the
   ratios are paired round by round, as in ``ciliate bench traffic``.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ciliate.bench import podnet, policy_peer, reach, report, traffic, udp_rr
from ciliate.control.agent.client import AgentClient

NAMESPACE = "bench"
UDP_RR_PORT = 12000
UDP_RR_REQUESTS = 2000
ENFORCE_TIMEOUT_S = 30.0


class PolicyBenchError(RuntimeError):
    """The policy did not take effect, or a tool failed."""


# -- ciliate's side: objects through the agent's API ---------------------------------------


def agent_client(net: podnet.PodNetwork) -> AgentClient:
    """A client of the agent behind a ciliate network (its conflist names the socket)."""
    plugins = net.config.get("plugins", [net.config])
    return AgentClient(str(plugins[0]["agentSocket"]))


def namespace_and_pods(pods: Sequence[podnet.Pod]) -> list[dict[str, Any]]:
    """The Namespace and a Pod object per pod, labelled ``app: <pod name>``."""
    objects: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
    ]
    objects += [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": pod.name, "namespace": NAMESPACE, "labels": {"app": pod.name}},
            "spec": {"containers": [{"name": "main", "image": "busybox"}]},
        }
        for pod in pods
    ]
    return objects


def ingress_policy(
    *, name: str, selector: Mapping[str, str], peers: Sequence[str], port: int | None = None
) -> dict[str, Any]:
    """A NetworkPolicy: pods matching ``selector`` take ingress from ``peers`` (CIDRs)."""
    rule: dict[str, Any] = {"from": [{"ipBlock": {"cidr": cidr}} for cidr in peers]}
    if port is not None:
        rule["ports"] = [{"protocol": "TCP", "port": port}]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "podSelector": {"matchLabels": dict(selector)},
            "policyTypes": ["Ingress"],
            "ingress": [rule],
        },
    }


def apply(client: AgentClient, objects: Sequence[Mapping[str, Any]]) -> None:
    client.post("/v1/objects/apply", {"objects": list(objects)})


def delete(client: AgentClient, objects: Sequence[Mapping[str, Any]]) -> None:
    client.post("/v1/objects/delete", {"objects": list(objects), "ignore_missing": True})


def policy_states(client: AgentClient) -> dict[str, dict[str, Any]]:
    """Each endpoint's policy state as the agent reports it, by pod IP."""
    return {ep["ip"]: ep.get("policy") or {} for ep in client.get("/v1/endpoints")}


def wait_enforced(
    client: AgentClient, *, ips: Sequence[str], after: Mapping[str, int], timeout: float
) -> float:
    """Seconds until every endpoint of ``ips`` holds a revision past ``after`` with
    ingress enforced."""
    start = time.perf_counter()
    while True:
        states = policy_states(client)
        if all(
            states.get(ip, {}).get("ingress_enforced")
            and states[ip].get("revision", 0) > after.get(ip, 0)
            for ip in ips
        ):
            return time.perf_counter() - start
        if time.perf_counter() - start > timeout:
            missing = [ip for ip in ips if not states.get(ip, {}).get("ingress_enforced")]
            raise PolicyBenchError(
                f"policy not enforced on {len(missing)} of {len(ips)} endpoints "
                f"after {timeout:.0f}s (e.g. {missing[:3]})"
            )
        time.sleep(0.002)


# -- 1. apply -> enforced ------------------------------------------------------------------


@dataclass
class EnforceResult:
    endpoints: int
    rounds: int
    seconds: list[float]

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.seconds) * 1000

    @property
    def max_ms(self) -> float:
        return max(self.seconds) * 1000


def run_enforce(
    *,
    endpoints: int = 100,
    rounds: int = 10,
    progress: Callable[[str], None] | None = report.progress_to_stderr,
) -> EnforceResult:
    with podnet.PodNetwork("ciliate", k8s_namespace=NAMESPACE) as net:
        pods = []
        for i in range(endpoints):
            pods.append(net.add_pod(f"p{i:03d}"))
            if progress and (i + 1) % 25 == 0:
                progress(f"policy: {i + 1}/{endpoints} pods added")
        with contextlib.closing(agent_client(net)) as client:
            apply(client, namespace_and_pods([]))
            ips = [pod.ip for pod in pods]
            seconds = []
            for r in range(rounds):
                before = {ip: s.get("revision", 0) for ip, s in policy_states(client).items()}
                policy = ingress_policy(
                    name="all", selector={}, peers=["192.0.2.0/24"], port=1000 + r
                )
                start = time.perf_counter()
                apply(client, [policy])
                wait_enforced(client, ips=ips, after=before, timeout=ENFORCE_TIMEOUT_S)
                seconds.append(time.perf_counter() - start)
                if progress:
                    progress(
                        f"policy: round {r + 1}/{rounds}: enforced on {endpoints} endpoints"
                        f" in {seconds[-1] * 1000:.0f} ms"
                    )
    return EnforceResult(endpoints=endpoints, rounds=rounds, seconds=seconds)


# -- 2. the peer ----------------------------------------------------------------------------

TARGETS = ("policed", "open")
"""The two servers of every side, both answering the client ``a``: ``b``, which the
policy selects, and ``c``, which no policy selects (and which is also the outsider the
policy must refuse). Measured back to back in every round, they give the paired cost
of the policy on one network."""

TARGET_LABELS = {"policed": "b policy", "open": "c none"}
TOOLS = ("sockperf", "udp_rr", "iperf3")
PEER = "ptp"
IPSET_PEER = "ptp-ipset"
GOAL_RULES = 10000
LATENCY_GOAL = 0.5  # ciliate / the iptables peer, UDP request/response p50
THROUGHPUT_GOAL = 0.97  # ciliate with policy / without, one TCP stream
WARM_UP_REQUESTS = 200


@dataclass(frozen=True)
class SideSpec:
    network: str
    tools: tuple[str, ...]
    peer_style: str | None = None
    """For an iptables peer (on ``ptp``): how it writes the peers
    (:data:`policy_peer.STYLES`); None for ciliate."""

    def network_def(self) -> podnet.NetworkDef:
        if self.peer_style is None:
            return podnet.ciliate_variant(self.network)
        # Each peer its own node and subnet, so the two never share a rule or a route.
        subnet = "10.98.0.0/24" if self.network == PEER else "10.98.1.0/24"
        return podnet.ptp(name=self.network, subnet=subnet)


SIDES = (
    SideSpec(PEER, TOOLS, peer_style="rules"),
    SideSpec("ciliate", TOOLS),
    # Socket forwarding carries ciliate's TCP stream past the packet path (and so past
    # the per-packet policy); this side shows the stream on the packet path. Its UDP is
    # ciliate's, so only TCP is measured.
    SideSpec("ciliate-packet", ("iperf3",)),
    # kube-router's own rendering of this policy: its established path and its TCP
    # stream are the rules peer's (conntrack first), so only new flows are measured.
    SideSpec(IPSET_PEER, ("udp_rr",), peer_style="ipset"),
)


@dataclass
class Figures:
    sockperf_p50_us: list[float] = field(default_factory=list)
    new_flow_p50_us: list[float] = field(default_factory=list)
    new_flow_lost: list[int] = field(default_factory=list)
    tcp_gbps: list[float] = field(default_factory=list)
    tcp_runs_gbps: list[float] = field(default_factory=list)
    """Every 1 s iperf3 run, in order: run i of the policed server and of the open one
    of a network were taken back to back, so "with / without policy" pairs them run
    by run (a stream's figure drifts too much on a shared machine to pair rounds)."""


FIGURE_OF_TOOL = {
    "sockperf": "sockperf_p50_us",
    "udp_rr": "new_flow_p50_us",
    "iperf3": "tcp_gbps",
}


@dataclass(frozen=True)
class Goal:
    what: str
    rules: int
    ratio: traffic.Spread
    limit: float
    at_most: bool
    note: str = ""

    @property
    def met(self) -> bool:
        return self.ratio.median <= self.limit if self.at_most else self.ratio.median >= self.limit


@dataclass
class PeerResults:
    rule_counts: list[int]
    rounds: int
    seconds: float
    cpu: int
    sides: dict[str, list[str]]
    """network -> the tools measured on it"""
    figures: dict[str, dict[int, dict[str, Figures]]]
    """network -> rule count -> target -> figures of each round"""
    enforcement: dict[str, dict[int, list[reach.Reach]]]
    """network -> rule count -> the probes that showed the policy enforced"""
    load: list[str] = field(default_factory=list)
    """/proc/loadavg before and after"""

    def measured(self, network: str, what: str) -> bool:
        tools = self.sides.get(network, [])
        return any(FIGURE_OF_TOOL[tool] == what for tool in tools)

    def median(self, network: str, rules: int, target: str, what: str) -> float:
        return float(statistics.median(getattr(self.figures[network][rules][target], what)))

    def paired(
        self, network: str, rules: int, what: str, *, ref: str, ref_target: str, target: str
    ) -> traffic.Spread:
        """Round-by-round ratios of ``network``'s ``target`` to ``ref``'s ``ref_target``."""
        return traffic.paired_ratio(
            getattr(self.figures[network][rules][target], what),
            getattr(self.figures[ref][rules][ref_target], what),
        )

    def vs_peer(self, network: str, rules: int, what: str, *, peer: str = PEER) -> traffic.Spread:
        """The policed server's figure over the iptables peer's, round by round."""
        return self.paired(network, rules, what, ref=peer, ref_target="policed", target="policed")

    def vs_no_policy(self, network: str, rules: int, what: str) -> traffic.Spread:
        """The policed server's figure over the open one's on the same network (paired
        round by round, or run by run for ``tcp_runs_gbps``)."""
        return self.paired(network, rules, what, ref=network, ref_target="open", target="policed")

    @property
    def goal_rules(self) -> int:
        """The rule count the goals are judged at: the issue's, or the largest run."""
        return GOAL_RULES if GOAL_RULES in self.rule_counts else max(self.rule_counts)

    def goals(self) -> list[Goal]:
        rules = self.goal_rules
        out = [
            Goal(
                what="new-flow UDP request/response p50, ciliate / iptables peer",
                rules=rules,
                ratio=self.vs_peer("ciliate", rules, "new_flow_p50_us"),
                limit=LATENCY_GOAL,
                at_most=True,
            ),
            Goal(
                what="established-flow UDP request/response p50, ciliate / iptables peer",
                rules=rules,
                ratio=self.vs_peer("ciliate", rules, "sockperf_p50_us"),
                limit=LATENCY_GOAL,
                at_most=True,
                note="the peer accepts an established packet at its first rule (conntrack), "
                "whatever the rule count: both sides pay no rule walk there, so this is "
                "the two datapaths' base cost",
            ),
        ]
        if self.measured(IPSET_PEER, "new_flow_p50_us"):
            out.append(
                Goal(
                    what="new-flow UDP request/response p50, ciliate / kube-router ipset peer",
                    rules=rules,
                    ratio=self.vs_peer("ciliate", rules, "new_flow_p50_us", peer=IPSET_PEER),
                    limit=LATENCY_GOAL,
                    at_most=True,
                    note="the issue's peer is the rules one; this is kube-router's own"
                    " rendering of the same policy (one hash:net set lookup per new flow)",
                )
            )
        for network in ("ciliate", "ciliate-packet"):
            if self.measured(network, "tcp_gbps"):
                out.append(
                    Goal(
                        what=f"one TCP stream, {network} with policy / without",
                        rules=rules,
                        ratio=self.vs_no_policy(network, rules, "tcp_runs_gbps"),
                        limit=THROUGHPUT_GOAL,
                        at_most=False,
                    )
                )
        return out


@dataclass
class _Side:
    network: str
    tools: tuple[str, ...]
    client: podnet.Pod
    policed: podnet.Pod
    open: podnet.Pod
    pairs: dict[str, traffic.PodPair]
    """target -> client and that server"""
    install: Callable[[int], None]
    """rules -> the policy in force (returns once it is)"""


def _set_up_side(
    spec: SideSpec, net: podnet.PodNetwork, stack: contextlib.ExitStack, cpu: int
) -> _Side:
    client, policed, open_ = (net.add_pod(name) for name in ("a", "b", "c"))
    for server in (policed, open_):
        net.wait_reachable(client, server)
        traffic.start_servers(server, stack, cpu)
        echo = stack.enter_context(
            traffic.background_server(
                podnet.netns_exec(
                    server.netns,
                    "taskset",
                    "-c",
                    str(cpu),
                    *udp_rr.server_command(server.ip, UDP_RR_PORT),
                )
            )
        )
        traffic.wait_listening(server, "udp", UDP_RR_PORT, echo)
    mtu = int(net.link(client)["mtu"])
    pairs = {
        "policed": traffic.PodPair(net=net, a=client, b=policed, mtu=mtu),
        "open": traffic.PodPair(net=net, a=client, b=open_, mtu=mtu),
    }
    if spec.peer_style is None:
        install = _ciliate_install(net, client=client, server=policed)
    else:
        install = _peer_install(net, client=client, server=policed, style=spec.peer_style)
    return _Side(
        network=spec.network,
        tools=spec.tools,
        client=client,
        policed=policed,
        open=open_,
        pairs=pairs,
        install=install,
    )


def _peer_install(
    net: podnet.PodNetwork, *, client: podnet.Pod, server: podnet.Pod, style: str
) -> Callable[[int], None]:
    def install(rules: int) -> None:
        policy_peer.remove(net)
        policy_peer.install(net, server_ip=server.ip, client_ip=client.ip, rules=rules, style=style)
        loaded = policy_peer.set_size(net) if style == "ipset" else policy_peer.rule_count(net)
        if loaded != rules:
            raise PolicyBenchError(f"{net.node_netns}: {loaded} peers loaded, not {rules}")

    return install


def _ciliate_install(
    net: podnet.PodNetwork, *, client: podnet.Pod, server: podnet.Pod
) -> Callable[[int], None]:
    agent = agent_client(net)
    apply(agent, namespace_and_pods([client, server]))

    def install(rules: int) -> None:
        before = {ip: s.get("revision", 0) for ip, s in policy_states(agent).items()}
        # The same policy as the peer's: rules - 1 ipBlock peers that never send, then
        # the client's, in one ingress rule of a policy selecting the server only.
        fillers = [f"{peer}/32" for peer in policy_peer.filler_peers(rules - 1)]
        policy = ingress_policy(
            name="peer", selector={"app": server.name}, peers=[*fillers, f"{client.ip}/32"]
        )
        apply(agent, [policy])
        wait_enforced(agent, ips=[server.ip], after=before, timeout=120)

    return install


def _verify_enforced(side: _Side) -> list[reach.Reach]:
    """Probes that the policy is in force: the client reaches the policed server and
    the open one; the outsider ``c`` reaches the policed server neither by UDP nor by
    TCP. PolicyBenchError if any says otherwise."""
    allowed = [
        reach.probe(side.client, side.policed.ip, proto="udp", port=UDP_RR_PORT, timeout=2),
        reach.probe(side.client, side.open.ip, proto="udp", port=UDP_RR_PORT, timeout=2),
    ]
    refused = [
        reach.probe(side.open, side.policed.ip, proto="udp", port=UDP_RR_PORT),
        reach.probe(side.open, side.policed.ip, proto="tcp", port=traffic.IPERF_PORT),
    ]
    for probe in allowed:
        if probe.answered != probe.attempts:
            raise PolicyBenchError(f"{side.network}: an allowed flow is refused: {probe}")
    for probe in refused:
        if probe.answered:
            raise PolicyBenchError(
                f"{side.network}: the policy is not enforced, the outsider got through: {probe}"
            )
    return allowed + refused


def _measure_round(
    sides: Sequence[_Side],
    sink: Callable[[str, str], Figures],
    *,
    mirrored: bool,
    seconds: float,
    requests: int,
    cpu: int,
) -> None:
    """Each tool in turn over every (network, target) that measures it, back to back,
    in one order or its mirror; sockperf and iperf3 as ``seconds`` runs of 1 s each,
    interleaved (:func:`traffic.interleaved`), a round's figure the median of its
    runs: the figures a ratio pairs are taken a second or two apart."""
    for tool in TOOLS:
        keys = [(s, t) for s in sides if tool in s.tools for t in TARGETS]
        if mirrored:
            keys.reverse()
        pairs = {f"{s.network}/{t}": s.pairs[t] for s, t in keys}
        order = list(pairs)
        slices = max(1, round(seconds))
        if tool == "sockperf":
            latency = traffic.interleaved(
                order,
                slices,
                functools.partial(_sockperf_1s, pairs, cpu),
            )
            for s, t in keys:
                merged = traffic.merge_sockperf(latency[f"{s.network}/{t}"])
                sink(s.network, t).sockperf_p50_us.append(merged.p50_us)
        elif tool == "udp_rr":
            for s, t in keys:
                rr = _udp_rr(s.pairs[t], requests=requests, cpu=cpu)
                figures = sink(s.network, t)
                figures.new_flow_p50_us.append(rr.p50_us)
                figures.new_flow_lost.append(rr.lost)
        else:
            streams = traffic.interleaved(
                order,
                slices,
                functools.partial(_iperf3_1s, pairs, cpu),
            )
            for s, t in keys:
                gbps = [stream.gbps for stream in streams[f"{s.network}/{t}"]]
                figures = sink(s.network, t)
                figures.tcp_gbps.append(statistics.median(gbps))
                figures.tcp_runs_gbps.extend(gbps)


def _sockperf_1s(
    pairs: Mapping[str, traffic.PodPair], cpu: int, key: str
) -> traffic.SockperfSample:
    return traffic.sockperf_pingpong(pairs[key], 1, cpu, False)


def _iperf3_1s(pairs: Mapping[str, traffic.PodPair], cpu: int, key: str) -> traffic.IperfSample:
    return traffic.iperf3_stream(pairs[key], 1, cpu=cpu)


def _udp_rr(pair: traffic.PodPair, *, requests: int, cpu: int) -> udp_rr.UdpRrSample:
    proc = traffic.run_tool(
        podnet.netns_exec(
            pair.a.netns,
            "taskset",
            "-c",
            str(cpu),
            *udp_rr.client_command(pair.b.ip, UDP_RR_PORT, requests),
        ),
        120,
        f"udp_rr in {pair.a.netns}",
    )
    return udp_rr.parse(proc.stdout)


def _loadavg() -> str:
    """The 1, 5 and 15 minute load averages, as ``uptime`` prints them."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run_peer(
    *,
    rule_counts: Sequence[int] = (10, 1000, 10000),
    rounds: int = 5,
    seconds: float = 3,
    sides: Sequence[SideSpec] = SIDES,
    progress: Callable[[str], None] | None = report.progress_to_stderr,
) -> PeerResults:
    """The peer side by side: for each rule count, the policy put in force on every
    side and proved (:func:`_verify_enforced`), one warm-up round thrown away, then
    ``rounds`` rounds of every tool; client and servers pinned to one CPU."""
    if rounds < 1 or seconds <= 0 or any(n < 1 for n in rule_counts):
        raise ValueError("rounds >= 1, seconds > 0 and rule counts >= 1")
    if not rule_counts:
        raise ValueError("at least one rule count")
    if [s.network for s in sides][:2] != [PEER, "ciliate"]:
        raise ValueError(f"the sides start with {PEER} and ciliate")
    if any(s.peer_style == "ipset" for s in sides) and shutil.which("ipset") is None:
        if progress:
            progress(f"policy: no ipset tool here, {IPSET_PEER} left out (apt-get install ipset)")
        sides = [s for s in sides if s.peer_style != "ipset"]
    cpu = traffic.default_cpu()
    counts = list(rule_counts)
    figures = {s.network: {n: {t: Figures() for t in TARGETS} for n in counts} for s in sides}
    enforcement: dict[str, dict[int, list[reach.Reach]]] = {s.network: {} for s in sides}
    load = [_loadavg()]
    with contextlib.ExitStack() as stack:
        ready: list[_Side] = []
        for spec in sides:
            net = stack.enter_context(
                podnet.PodNetwork(spec.network_def(), k8s_namespace=NAMESPACE)
            )
            ready.append(_set_up_side(spec, net, stack, cpu))
        for rules in counts:
            for side in ready:
                if progress:
                    progress(f"policy: {side.network}: putting {rules} rules in force")
                side.install(rules)
                enforcement[side.network][rules] = _verify_enforced(side)
            _measure_round(
                ready,
                lambda network, target: Figures(),
                mirrored=False,
                seconds=1,
                requests=WARM_UP_REQUESTS,
                cpu=cpu,
            )
            for r in range(rounds):
                if progress:
                    progress(f"policy: {rules} rules, round {r + 1}/{rounds}")
                _measure_round(
                    ready,
                    lambda network, target: figures[network][rules][target],  # noqa: B023
                    mirrored=r % 2 == 1,
                    seconds=seconds,
                    requests=UDP_RR_REQUESTS,
                    cpu=cpu,
                )
    load.append(_loadavg())
    return PeerResults(
        rule_counts=counts,
        rounds=rounds,
        seconds=seconds,
        cpu=cpu,
        sides={s.network: list(s.tools) for s in sides},
        figures=figures,
        enforcement=enforcement,
        load=load,
    )


# -- output -------------------------------------------------------------------------------


def _spread(s: traffic.Spread) -> str:
    return f"{s.median:.2f} [{s.min:.2f}-{s.max:.2f}]"


def print_tables(enforce: EnforceResult | None, peer: PeerResults | None) -> None:
    from rich.table import Table

    if enforce is not None:
        table = Table(title=f"apply -> enforced on {enforce.endpoints} endpoints")
        for column in ("rounds", "p50 ms", "max ms", "goal p50 <= 100 ms"):
            table.add_column(column, justify="right")
        table.add_row(
            str(enforce.rounds),
            f"{enforce.p50_ms:.1f}",
            f"{enforce.max_ms:.1f}",
            "met" if enforce.p50_ms <= 100 else "NOT MET",
        )
        report.print_wide(table)
    if peer is None:
        return
    print_peer_table(peer)
    print_goals_table(peer)


def print_peer_table(peer: PeerResults) -> None:
    from rich.table import Table

    table = Table(
        title=f"policy: ciliate against ptp + iptables rules, median of {peer.rounds} rounds"
        f" x {peer.seconds:g}s"
    )
    columns = [
        "rules",
        "network",
        "server",
        "UDP p50 us",
        "new-flow p50 us",
        "lost",
        "TCP Gbit/s",
        "UDP p50 x peer",
        "new-flow x peer",
        "TCP x no policy",
    ]
    for column in columns:
        table.add_column(
            column,
            justify="left" if column in ("network", "server") else "right",
            no_wrap=" x " in column or column == "network",
        )

    def cell(network: str, rules: int, target: str, what: str, fmt: str) -> str:
        if not peer.measured(network, what):
            return "-"
        return fmt.format(peer.median(network, rules, target, what))

    for rules in peer.rule_counts:
        for network in peer.sides:
            for target in TARGETS:
                policed = target == "policed"
                lost = (
                    str(sum(peer.figures[network][rules][target].new_flow_lost))
                    if peer.measured(network, "new_flow_p50_us")
                    else "-"
                )
                row = [
                    f"{rules:,}",
                    _network_label(network, policed=policed),
                    TARGET_LABELS[target],
                    cell(network, rules, target, "sockperf_p50_us", "{:.2f}"),
                    cell(network, rules, target, "new_flow_p50_us", "{:.1f}"),
                    lost,
                    cell(network, rules, target, "tcp_gbps", "{:.2f}"),
                ]
                # ciliate against the peer; the ipset peer's own ratio is in the goals.
                vs_peer = policed and network not in (PEER, IPSET_PEER)
                for what in ("sockperf_p50_us", "new_flow_p50_us"):
                    row.append(
                        _spread(peer.vs_peer(network, rules, what))
                        if vs_peer and peer.measured(network, what)
                        else ""
                    )
                row.append(
                    _spread(peer.vs_no_policy(network, rules, "tcp_runs_gbps"))
                    if policed and peer.measured(network, "tcp_gbps")
                    else ""
                )
                table.add_row(*row)
        table.add_section()
    table.caption = (
        "peer: ptp + iptables rules, server b (ptp+ipset: the same policy as kube-router"
        " writes it, one hash:net set; new flows only). b: the server the policy selects"
        " (rules - 1 ipBlock peers that never send, the client's last); c: a server no"
        " policy selects, and the outsider the policy must refuse (probed before measuring,"
        " UDP and TCP, on every network). UDP p50: sockperf ping-pong on one established"
        f" flow, one-way; new-flow p50: round trip of {UDP_RR_REQUESTS} UDP requests each"
        " from a new socket (lost: timed out, all rounds); TCP: iperf3, one stream. sockperf"
        " and iperf3 run 1 s at a time, every network and server interleaved; clients and"
        f" servers pinned to CPU {peer.cpu}; the order mirrored every round; ratios: median"
        " \\[range] of round-by-round ratios (TCP x no policy: of run-by-run ratios). Load"
        " average before:"
        f" {peer.load[0] if peer.load else '?'}, after: {peer.load[-1] if peer.load else '?'}"
    )
    report.print_wide(table)


def _network_label(network: str, *, policed: bool) -> str:
    if policed and network == PEER:
        return "ptp+iptables"
    if policed and network == IPSET_PEER:
        return "ptp+ipset"
    return network


def print_goals_table(peer: PeerResults) -> None:
    from rich.table import Table

    table = Table(title=f"policy: the issue's goals, at {peer.goal_rules:,} rules")
    for column in ("goal", "limit", "measured \\[range]", "verdict"):
        table.add_column(column, justify="left" if column == "goal" else "right")
    notes: list[str] = []
    for goal in peer.goals():
        table.add_row(
            goal.what + (f" ({len(notes) + 1})" if goal.note else ""),
            f"{'<=' if goal.at_most else '>='} {goal.limit:g}x",
            _spread(goal.ratio),
            "met" if goal.met else "NOT MET",
        )
        if goal.note:
            notes.append(f"({len(notes) + 1}) {goal.note}")
    table.caption = "\n".join(notes) or None
    report.print_wide(table)


def to_dict(enforce: EnforceResult | None, peer: PeerResults | None) -> dict[str, object]:
    return {
        "benchmark": "policy",
        "enforce": None
        if enforce is None
        else {**asdict(enforce), "p50_ms": enforce.p50_ms, "max_ms": enforce.max_ms},
        "peer": None if peer is None else _peer_dict(peer),
    }


def _peer_dict(peer: PeerResults) -> dict[str, object]:
    ratios: dict[str, dict[str, dict[str, object]]] = {}
    for network in peer.sides:
        for rules in peer.rule_counts:
            by_figure: dict[str, object] = {}
            for what in ("sockperf_p50_us", "new_flow_p50_us"):
                if network != PEER and peer.measured(network, what):
                    by_figure[f"{what}_x_peer"] = asdict(peer.vs_peer(network, rules, what))
            if peer.measured(network, "tcp_gbps"):
                by_figure["tcp_gbps_x_no_policy"] = asdict(
                    peer.vs_no_policy(network, rules, "tcp_runs_gbps")
                )
            ratios.setdefault(network, {})[str(rules)] = by_figure
    return {
        "rule_counts": peer.rule_counts,
        "rounds": peer.rounds,
        "seconds": peer.seconds,
        "cpu": peer.cpu,
        "load": peer.load,
        "sides": peer.sides,
        "figures": {
            network: {
                str(n): {t: asdict(f) for t, f in by_target.items()}
                for n, by_target in by_count.items()
            }
            for network, by_count in peer.figures.items()
        },
        "ratios": ratios,
        "enforcement": {
            network: {str(n): [asdict(p) for p in probes] for n, probes in by_count.items()}
            for network, by_count in peer.enforcement.items()
        },
        "goals": [
            {
                "what": g.what,
                "rules": g.rules,
                "ratio": asdict(g.ratio),
                "limit": g.limit,
                "at_most": g.at_most,
                "met": g.met,
                "note": g.note,
            }
            for g in peer.goals()
        ],
    }


def write_json(data: Mapping[str, object], path: Path) -> None:
    import json

    path.write_text(json.dumps(data, indent=2) + "\n")
