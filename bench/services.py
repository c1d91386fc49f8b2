"""``ciliate bench services``: what a ClusterIP costs, against kube-proxy's iptables
mode, with 1, 1,000 and 10,000 services of 3 backends each.

On each network a client pod and three backend pods (answering each TCP
connection with a few bytes, then closing); for each service count, in the same
run:

1. **ClusterIP against the pod IP, on ciliate**: TCP connect + request + close
   latency p50 through a ClusterIP (the socket load balancer picks one of the
   three backends at random at connect) against the same to the backends' pod
   IPs, drawn at random too (the same three pods and the same spread); one
   client process alternates the two connection by connection (the order
   flipped every other pair), so both see the same interpreter, CPU, caches
   and load;
2. **the peer**: the same through a ClusterIP on ``ptp`` with kube-proxy's
   iptables rules, written as kube-proxy writes them (``KUBE-SERVICES`` with one
   rule per service, jumping to ``KUBE-SVC-*`` whose rules pick a ``KUBE-SEP-*``
   with ``statistic`` probabilities, which DNATs); the service measured sits in
   the middle of ``KUBE-SERVICES`` (the average walk);
3. **apply -> first connect**: a new Service applied through the agent with the
   others in place, the time until a connect to its ClusterIP succeeds, p50.

The client is a small Python program (:data:`_CLIENT`) run in the client pod,
the same on both networks; client and servers are pinned to one CPU (unpinned,
latency is bimodal with cross-CPU wake-ups and hides the datapath). Only ratios
taken in the same run mean anything.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ciliate.bench import podnet, policy, report, traffic
from ciliate.control.agent.client import AgentClient

PORT = 80
TARGET_PORT = 8080
REQUESTS = 1500
APPLY_BATCH = 500
SERVICE_CIDR = ipaddress.IPv4Network("10.96.0.0/12")

_SERVER = """
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])), backlog=512)
print("ready", flush=True)
while True:
    conn, _ = server.accept()
    with conn:
        conn.recv(64)
        conn.sendall(b"ok")
"""

# argv: service host and port, backend hosts (comma-separated) and port, count.
# Connection i goes to the service and to a backend drawn at random, as the
# socket LB draws one (a fixed rotation would always move to another server,
# colder than a random draw that sometimes repeats one), in an order that
# flips every other i; prints the latencies (ns) of each.
_CLIENT = """
import json, random, socket, sys, time
host, port, backends, bport, count = (
    sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), int(sys.argv[4]), int(sys.argv[5]))
draw = random.Random(9)
samples = {"service": [], "direct": []}
for i in range(count):
    pair = (("service", host, port), ("direct", draw.choice(backends), bport))
    for name, h, p in pair[:: 1 if i % 2 else -1]:
        t0 = time.perf_counter_ns()
        with socket.create_connection((h, p), timeout=2) as s:
            s.sendall(b"hi")
            s.recv(64)
        samples[name].append(time.perf_counter_ns() - t0)
print(json.dumps(samples))
"""

_FIRST_CONNECT = """
import socket, sys, time
host, port, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + 60
t0 = time.perf_counter()
while time.monotonic() < deadline:
    try:
        with socket.create_connection((host, port), timeout=0.2) as s:
            s.sendall(b"hi")
            if s.recv(64):
                break
    except OSError:
        time.sleep(0.001)
print(time.perf_counter() - t0)
"""


class ServicesBenchError(RuntimeError):
    """A connection failed or a service never became reachable."""


def _run_client(
    pod: podnet.Pod, *, service: str, backends: Sequence[str], cpu: int
) -> tuple[float, float]:
    """p50 (us) of connections to ``service`` (port PORT) and, interleaved, to
    ``backends`` drawn at random (port TARGET_PORT)."""
    proc = traffic.run_tool(
        podnet.netns_exec(
            pod.netns,
            "taskset",
            "-c",
            str(cpu),
            sys.executable,
            "-S",
            "-c",
            _CLIENT,
            service,
            str(PORT),
            ",".join(backends),
            str(TARGET_PORT),
            str(REQUESTS),
        ),
        240,
        f"client in {pod.netns}",
    )
    if proc.returncode != 0:
        raise ServicesBenchError(f"client to {service}: {proc.stderr.strip()}")
    samples: dict[str, list[int]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return (
        statistics.median(samples["service"]) / 1000,
        statistics.median(samples["direct"]) / 1000,
    )


# -- kube-proxy's iptables rules -----------------------------------------------------


def kube_proxy_rules(*, vips: Sequence[str], backends: Sequence[str]) -> str:
    """``iptables-restore`` input for the nat table as kube-proxy's iptables mode
    writes it: every service to the same ``backends``."""
    lines = ["*nat", ":KUBE-SERVICES - [0:0]"]
    body = []
    for i, vip in enumerate(vips):
        svc = f"KUBE-SVC-{i:06d}"
        lines.append(f":{svc} - [0:0]")
        body.append(f"-A KUBE-SERVICES -d {vip}/32 -p tcp -m tcp --dport {PORT} -j {svc}")
        for j, backend in enumerate(backends):
            sep = f"KUBE-SEP-{i:06d}-{j}"
            lines.append(f":{sep} - [0:0]")
            left = len(backends) - j
            pick = f"-m statistic --mode random --probability {1 / left:.11f} " if left > 1 else ""
            body.append(f"-A {svc} {pick}-j {sep}")
            body.append(f"-A {sep} -p tcp -m tcp -j DNAT --to-destination {backend}:{TARGET_PORT}")
    body += ["-A PREROUTING -j KUBE-SERVICES", "-A OUTPUT -j KUBE-SERVICES"]
    return "\n".join([*lines, *body, "COMMIT", ""])


def _install_kube_proxy(
    net: podnet.PodNetwork, vips: Sequence[str], backends: Sequence[str]
) -> None:
    for flush in (["iptables", "-t", "nat", "-F"], ["iptables", "-t", "nat", "-X"]):
        subprocess.run(podnet.netns_exec(net.node_netns, *flush), check=True, timeout=120)
    proc = subprocess.run(
        podnet.netns_exec(net.node_netns, "iptables-restore", "--noflush"),
        input=kube_proxy_rules(vips=vips, backends=backends),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        raise ServicesBenchError(f"iptables-restore: {proc.stderr.strip()}")


# -- ciliate's services ---------------------------------------------------------------


def _service(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"svc-{i:05d}", "namespace": policy.NAMESPACE},
        "spec": {
            "selector": {"app": "backend"},
            "ports": [{"protocol": "TCP", "port": PORT, "targetPort": TARGET_PORT}],
        },
    }


def _wait_services(client: AgentClient, count: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get("/v1/services/status")
        if status["pending"] is False:
            table = client.get("/v1/services")["frontends"]
            if sum(1 for f in table if f["backends"]) >= count:
                return
        time.sleep(0.2)
    raise ServicesBenchError(f"{count} services never all had backends")


def _vips(client: AgentClient) -> list[str]:
    items = client.get(f"/v1/objects/services?namespace={policy.NAMESPACE}")["items"]
    return sorted(str(s["spec"]["clusterIP"]) for s in items)


# -- the run ---------------------------------------------------------------------------


@dataclass
class CountFigures:
    services: int
    ciliate_vip_us: list[float] = field(default_factory=list)
    ciliate_pod_us: list[float] = field(default_factory=list)
    iptables_vip_us: list[float] = field(default_factory=list)
    apply_to_connect_s: list[float] = field(default_factory=list)

    def paired(self, mine: str, theirs: str) -> float:
        a, b = getattr(self, mine), getattr(self, theirs)
        return float(statistics.median(x / y for x, y in zip(a, b, strict=True)))


@dataclass
class ServicesResults:
    rounds: int
    requests: int
    counts: list[CountFigures]


def run(
    *,
    service_counts: Sequence[int] = (1, 1000, 10000),
    rounds: int = 3,
    apply_rounds: int = 5,
    progress: Callable[[str], None] | None = report.progress_to_stderr,
) -> ServicesResults:
    cpu = traffic.default_cpu()
    say = progress or (lambda _line: None)
    results = []
    with contextlib.ExitStack() as stack:
        nets = {
            name: stack.enter_context(podnet.PodNetwork(name, k8s_namespace=policy.NAMESPACE))
            for name in ("ptp", "ciliate")
        }
        pods: dict[str, dict[str, podnet.Pod]] = {}
        for name, net in nets.items():
            pods[name] = {p: net.add_pod(p) for p in ("client", "b1", "b2", "b3")}
            for backend in ("b1", "b2", "b3"):
                pod = pods[name][backend]
                server = stack.enter_context(
                    traffic.background_server(
                        podnet.netns_exec(
                            pod.netns,
                            "taskset",
                            "-c",
                            str(cpu),
                            sys.executable,
                            "-S",
                            "-c",
                            _SERVER,
                            pod.ip,
                            str(TARGET_PORT),
                        )
                    )
                )
                traffic.wait_listening(pod, "tcp", TARGET_PORT, server)
        client = stack.enter_context(contextlib.closing(policy.agent_client(nets["ciliate"])))
        cpods = pods["ciliate"]
        policy.apply(client, policy.namespace_and_pods([]))
        policy.apply(
            client,
            [
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        "name": cpods[b].name,
                        "namespace": policy.NAMESPACE,
                        "labels": {"app": "backend"},
                    },
                    "spec": {"containers": [{"name": "main", "image": "busybox"}]},
                }
                for b in ("b1", "b2", "b3")
            ],
        )
        have = 0
        backends_ptp = [pods["ptp"][b].ip for b in ("b1", "b2", "b3")]
        backends_ciliate = [cpods[b].ip for b in ("b1", "b2", "b3")]
        for count in sorted(service_counts):
            say(f"services: {count} services: applying")
            for start in range(have, count, APPLY_BATCH):
                policy.apply(
                    client, [_service(i) for i in range(start, min(count, start + APPLY_BATCH))]
                )
            have = max(have, count)
            _wait_services(client, count)
            vips = _vips(client)
            middle = vips[len(vips) // 2]
            fake_vips = [str(SERVICE_CIDR[1 + i]) for i in range(count)]
            _install_kube_proxy(nets["ptp"], fake_vips, backends_ptp)
            ptp_vip = fake_vips[len(fake_vips) // 2]
            figures = CountFigures(services=count)
            for r in range(rounds):
                say(f"services: {count} services, round {r + 1}/{rounds}")
                vip_us, pod_us = _run_client(
                    cpods["client"], service=middle, backends=backends_ciliate, cpu=cpu
                )
                figures.ciliate_vip_us.append(vip_us)
                figures.ciliate_pod_us.append(pod_us)
                iptables_us, _ = _run_client(
                    pods["ptp"]["client"], service=ptp_vip, backends=backends_ptp, cpu=cpu
                )
                figures.iptables_vip_us.append(iptables_us)
            for r in range(apply_rounds):
                name = f"new-{count}-{r}"
                new = _service(0)
                new["metadata"]["name"] = name
                policy.apply(client, [new])
                vip = str(
                    client.get(f"/v1/objects/services/{name}?namespace={policy.NAMESPACE}")["spec"][
                        "clusterIP"
                    ]
                )
                proc = traffic.run_tool(
                    podnet.netns_exec(
                        cpods["client"].netns,
                        sys.executable,
                        "-S",
                        "-c",
                        _FIRST_CONNECT,
                        vip,
                        str(PORT),
                    ),
                    120,
                    "first connect",
                )
                figures.apply_to_connect_s.append(float(proc.stdout.strip()))
                policy.delete(client, [new])
            results.append(figures)
    return ServicesResults(rounds=rounds, requests=REQUESTS, counts=results)


def print_table(results: ServicesResults) -> None:
    from rich.table import Table

    table = Table(
        title=f"services: TCP connect + request + close, p50 of {results.requests}, "
        f"median of {results.rounds} rounds"
    )
    for column in (
        "services",
        "ciliate ClusterIP us",
        "ciliate pod IP us",
        "kube-proxy iptables ClusterIP us",
        "ClusterIP x pod IP",
        "ciliate x iptables",
        "apply -> first connect p50 ms",
    ):
        table.add_column(column, justify="right")
    for f in results.counts:
        table.add_row(
            str(f.services),
            f"{statistics.median(f.ciliate_vip_us):.1f}",
            f"{statistics.median(f.ciliate_pod_us):.1f}",
            f"{statistics.median(f.iptables_vip_us):.1f}",
            f"{f.paired('ciliate_vip_us', 'ciliate_pod_us'):.3f}",
            f"{f.paired('ciliate_vip_us', 'iptables_vip_us'):.2f}",
            f"{statistics.median(f.apply_to_connect_s) * 1000:.0f}",
        )
    table.caption = (
        "ciliate: socket LB (the backend chosen at connect), paired connection by connection "
        "with the pod IPs of the same 3 backends drawn at random; kube-proxy: iptables mode on ptp "
        "(KUBE-SERVICES -> KUBE-SVC-* statistic -> KUBE-SEP-* DNAT), the service measured in "
        "the middle of KUBE-SERVICES; ratios paired round by round"
    )
    report.print_wide(table)


def write_json(results: ServicesResults, path: Path) -> None:
    path.write_text(json.dumps({"benchmark": "services", **asdict(results)}, indent=2) + "\n")
