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
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ciliate.bench import podnet, policy_peer, report, traffic, udp_rr
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


@dataclass
class Figures:
    sockperf_p50_us: list[float] = field(default_factory=list)
    new_flow_p50_us: list[float] = field(default_factory=list)
    tcp_gbps: list[float] = field(default_factory=list)


@dataclass
class PeerResults:
    rule_counts: list[int]
    rounds: int
    seconds: float
    # (network, rule count or 0 for no policy) -> figures of each round
    figures: dict[str, dict[int, Figures]]

    def median(self, network: str, rules: int, what: str) -> float:
        return float(statistics.median(getattr(self.figures[network][rules], what)))

    def paired(self, network: str, rules: int, ref: str, ref_rules: int, what: str) -> float:
        mine = getattr(self.figures[network][rules], what)
        theirs = getattr(self.figures[ref][ref_rules], what)
        return float(statistics.median(a / b for a, b in zip(mine, theirs, strict=True)))


@dataclass
class _Side:
    pair: traffic.PodPair
    install: Callable[[int], None]  # rules (0: no policy)


def _ptp_side(net: podnet.PodNetwork, pair: traffic.PodPair) -> _Side:
    def install(rules: int) -> None:
        policy_peer.remove(net)
        if rules:
            policy_peer.install(net, server_ip=pair.b.ip, client_ip=pair.a.ip, rules=rules)

    return _Side(pair, install)


def _ciliate_side(net: podnet.PodNetwork, pair: traffic.PodPair) -> _Side:
    client = agent_client(net)
    apply(client, namespace_and_pods([pair.a, pair.b]))
    ips = [pair.b.ip]

    def install(rules: int) -> None:
        before = {ip: s.get("revision", 0) for ip, s in policy_states(client).items()}
        if rules == 0:
            delete(client, [ingress_policy(name="peer", selector={}, peers=[])])
            return
        fillers = [f"{peer}/32" for peer in policy_peer.filler_peers(rules - 1)]
        policy = ingress_policy(
            name="peer", selector={"app": pair.b.name}, peers=[*fillers, f"{pair.a.ip}/32"]
        )
        apply(client, [policy])
        wait_enforced(client, ips=ips, after=before, timeout=120)

    return _Side(pair, install)


def _measure(side: _Side, figures: Figures, *, seconds: float, cpu: int) -> None:
    pair = side.pair
    figures.sockperf_p50_us.append(traffic.sockperf_pingpong(pair, seconds, cpu, False).p50_us)
    proc = traffic.run_tool(
        podnet.netns_exec(
            pair.a.netns,
            "taskset",
            "-c",
            str(cpu),
            *udp_rr.client_command(pair.b.ip, UDP_RR_PORT, UDP_RR_REQUESTS),
        ),
        120,
        f"udp_rr in {pair.a.netns}",
    )
    figures.new_flow_p50_us.append(udp_rr.parse(proc.stdout).p50_us)
    figures.tcp_gbps.append(traffic.iperf3_stream(pair, seconds).gbps)


def run_peer(
    *,
    rule_counts: Sequence[int] = (10, 1000, 10000),
    rounds: int = 3,
    seconds: float = 3,
    progress: Callable[[str], None] | None = report.progress_to_stderr,
) -> PeerResults:
    if rounds < 1 or seconds <= 0 or any(n < 1 for n in rule_counts):
        raise ValueError("rounds >= 1, seconds > 0 and rule counts >= 1")
    cpu = traffic.default_cpu()
    counts = [0, *rule_counts]
    figures: dict[str, dict[int, Figures]] = {
        name: {n: Figures() for n in counts} for name in ("ptp", "ciliate")
    }
    with contextlib.ExitStack() as stack:
        sides: dict[str, _Side] = {}
        for name, make in (("ptp", _ptp_side), ("ciliate", _ciliate_side)):
            net = stack.enter_context(podnet.PodNetwork(name, k8s_namespace=NAMESPACE))
            pair = traffic.set_up_pair(net, stack, cpu)
            echo = stack.enter_context(
                traffic.background_server(
                    podnet.netns_exec(
                        pair.b.netns,
                        "taskset",
                        "-c",
                        str(cpu),
                        *udp_rr.server_command(pair.b.ip, UDP_RR_PORT),
                    )
                )
            )
            traffic.wait_listening(pair.b, "udp", UDP_RR_PORT, echo)
            sides[name] = make(net, pair)
        for rules in counts:
            for side in sides.values():
                side.install(rules)
            for r in range(rounds):
                order = list(sides) if r % 2 == 0 else list(reversed(sides))
                for name in order:
                    if progress:
                        progress(f"policy: {name}, {rules or 'no'} rules, round {r + 1}/{rounds}")
                    _measure(sides[name], figures[name][rules], seconds=seconds, cpu=cpu)
    return PeerResults(
        rule_counts=list(rule_counts), rounds=rounds, seconds=seconds, figures=figures
    )


# -- output -------------------------------------------------------------------------------


def print_tables(enforce: EnforceResult | None, peer: PeerResults | None) -> None:
    from rich.table import Table

    if enforce is not None:
        table = Table(title=f"apply -> enforced on {enforce.endpoints} endpoints")
        for column in ("rounds", "p50 ms", "max ms"):
            table.add_column(column, justify="right")
        table.add_row(str(enforce.rounds), f"{enforce.p50_ms:.1f}", f"{enforce.max_ms:.1f}")
        report.print_wide(table)
    if peer is None:
        return
    table = Table(
        title=f"policy: ciliate against ptp + iptables rules, median of {peer.rounds} x "
        f"{peer.seconds:g}s"
    )
    columns = [
        "rules",
        "network",
        "UDP p50 us",
        "new-flow p50 us",
        "TCP Gbit/s",
        "p50 x iptables",
        "new-flow x iptables",
        "TCP x no policy",
    ]
    for column in columns:
        table.add_column(column, justify="left" if column == "network" else "right")
    for rules in [0, *peer.rule_counts]:
        for name in ("ptp", "ciliate"):
            row = [
                str(rules) if rules else "none",
                name if name == "ciliate" else ("ptp + iptables" if rules else "ptp"),
                f"{peer.median(name, rules, 'sockperf_p50_us'):.2f}",
                f"{peer.median(name, rules, 'new_flow_p50_us'):.1f}",
                f"{peer.median(name, rules, 'tcp_gbps'):.2f}",
            ]
            if name == "ciliate":
                row += [
                    f"{peer.paired(name, rules, 'ptp', rules, 'sockperf_p50_us'):.2f}",
                    f"{peer.paired(name, rules, 'ptp', rules, 'new_flow_p50_us'):.2f}",
                    f"{peer.paired(name, rules, name, 0, 'tcp_gbps'):.2f}",
                ]
            else:
                row += ["", "", f"{peer.paired(name, rules, name, 0, 'tcp_gbps'):.2f}"]
            table.add_row(*row)
    table.caption = (
        "UDP p50: sockperf ping-pong one-way latency on one flow; new-flow p50: round trip of "
        f"{UDP_RR_REQUESTS} UDP requests each from a new socket (Python client and echo "
        "server, the same on both networks); TCP: iperf3, one stream; ratios paired round by "
        "round"
    )
    report.print_wide(table)


def to_dict(enforce: EnforceResult | None, peer: PeerResults | None) -> dict[str, object]:
    return {
        "benchmark": "policy",
        "enforce": None
        if enforce is None
        else {**asdict(enforce), "p50_ms": enforce.p50_ms, "max_ms": enforce.max_ms},
        "peer": None
        if peer is None
        else {
            "rule_counts": peer.rule_counts,
            "rounds": peer.rounds,
            "seconds": peer.seconds,
            "figures": {
                name: {str(n): asdict(f) for n, f in by_count.items()}
                for name, by_count in peer.figures.items()
            },
        },
    }


def write_json(data: Mapping[str, object], path: Path) -> None:
    import json

    path.write_text(json.dumps(data, indent=2) + "\n")
