"""Service translations seen by an operator, on a real agent: `ciliate
monitor` prints the socket load balancer's translation of a pod's connect to
a ClusterIP (service asked for, backend given), and the agent's /metrics
counts the translations by kind and direction."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import httpx

from ciliate.control.lab import lab
from ciliate.datapath import abi
from ciliate.loader import Map

from . import test_services
from .conftest import NodeLab
from .test_policy import apply, delete

pytestmark = test_services.pytestmark
web = test_services.web  # the fixture: a client pod and two backend pods
SOCKET_REASON = "service translated to a backend at the socket (connect, sendmsg)"


def _socket_translations(node_lab: NodeLab) -> float:
    """ciliate_datapath_packets{reason=<socket LB>, direction="egress"} from /metrics."""
    with httpx.Client(
        transport=httpx.HTTPTransport(uds=node_lab.node.socket), base_url="http://agent", timeout=30
    ) as http:
        text = http.get("/metrics").text
    for line in text.splitlines():
        if line.startswith("ciliate_datapath_packets_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line[: line.rindex("}")]))
            if labels == {"reason": SOCKET_REASON, "direction": "egress"}:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def _tracing(node_lab: NodeLab) -> bool:
    pins = Path(node_lab.get("/v1/status")["datapath"]["maps_pinned_at"])
    with Map.open_pinned(pins / "ciliate_config") as config:
        raw = config.lookup(bytes(4))
    assert isinstance(raw, bytes)
    flags = abi.unpack("ciliate_runtime_config", raw)["flags"]
    return bool(flags & abi.constant("CILIATE_CONFIG_F_TRACE"))


def test_the_monitor_shows_a_clusterip_connect_and_metrics_count_it(
    node_lab: NodeLab, web: dict[str, lab.PodState]
) -> None:
    apply(node_lab, test_services.service("web"))
    try:
        test_services.settle_services(node_lab)
        vip = test_services.cluster_ip(node_lab, "web")
        before = _socket_translations(node_lab)
        answers: list[str] = []
        done = threading.Event()

        def connect_until_done() -> None:
            # Until the monitor listens: it may take a while on a loaded machine.
            while not done.wait(0.3):
                answer, _ = test_services.tcp_ask(web["client"], vip, 80)
                answers.append(answer)

        client = threading.Thread(target=connect_until_done)
        client.start()
        try:
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "ciliate.control.cli.main",
                    "monitor",
                    "--socket",
                    node_lab.node.socket,
                    "-o",
                    "json",
                    "--count",
                    "40",
                    "--timeout",
                    "20",
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        finally:
            done.set()
            client.join()
        assert proc.returncode == 0, proc.stderr
        events = [json.loads(line) for line in proc.stdout.splitlines()]
        translations = [e["translation"] for e in events if e["type"] == "lb"]
        assert translations, [e["summary"] for e in events]
        backends = {f"{web['web1'].ip}:8080", f"{web['web2'].ip}:8080"}
        for t in translations:
            assert (t["kind"], t["protocol"]) == ("socket", "tcp")
            assert t["original"]["destination"] == f"{vip}:80"
            assert t["translated"]["destination"] in backends
        assert {f"{a}:8080" for a in answers} <= backends
        # The monitor switched tracing off again on its way out.
        assert not _tracing(node_lab)
        assert _socket_translations(node_lab) - before >= len(answers) > 0
    finally:
        delete(node_lab, test_services.service("web"))
