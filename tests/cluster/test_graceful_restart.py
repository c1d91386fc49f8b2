"""An agent restarted in place, in a 3-node lab (`ciliate lab up --nodes 3`), as an
upgrade (SIGTERM) or a crash (SIGKILL): pods on different nodes keep pinging each
other without a loss, and the ToR's route to the node's pod CIDR never leaves, in
the kernel (``ip monitor route`` sees no deletion) nor in bird (``birdc show
route`` polled every 50 ms): BGP graceful restart keeps it while the node's new
speaker comes back and re-announces it before its End-of-RIB."""

from __future__ import annotations

import argparse
import secrets
import time
from collections.abc import Iterator

import pytest
from rich.console import Console

from ciliate.control.agent.client import AgentClient
from ciliate.control.lab import lab


@pytest.fixture(scope="module")
def cluster(bpf_objects: str) -> Iterator[lab.LabState]:
    name = f"t{secrets.token_hex(3)}"
    try:
        yield lab.up(name=name, pods=1, nodes=3, console=Console(quiet=True))
    finally:
        lab.down(name=name, console=Console(quiet=True))


def _wait_more_probes(pingers: list[lab.Pinger], count: int, *, at_least: int = 40) -> None:
    """Let ``count`` more probes go out after the restart, so a path that broke at
    the very end is caught too, and ``at_least`` in all (a quick restart)."""
    targets = [max(p.sent + count, at_least) for p in pingers]
    deadline = time.monotonic() + 10
    while any(p.sent < t for p, t in zip(pingers, targets, strict=True)):
        assert time.monotonic() < deadline, "ping stopped sending"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", ["TERM", "KILL"])
def test_an_agent_restart_loses_no_ping_across_nodes_and_keeps_the_tor_route(
    cluster: lab.LabState, sig: str
) -> None:
    restarted = cluster.nodes[1]
    pair = lab.ping_pair(cluster, restarted.name)
    assert pair is not None
    there, here = pair
    old_pid = restarted.agent_pid
    with (
        lab.Pinger(there.netns, str(here.ip)) as inbound,
        lab.Pinger(here.netns, str(there.ip)) as outbound,
    ):
        report = lab.restart_agent(cluster, restarted.name, sig=sig)
        _wait_more_probes([inbound, outbound], 10)
    print(
        f"SIG{sig}: agent back in {report.agent_back_s:.2f} s, BGP restart over in "
        f"{report.bgp_back_s:.2f} s; {inbound.sent}+{outbound.sent} probes, "
        f"{report.bird_polls} birdc polls"
    )
    assert report.kernel_deletions == []
    assert report.bird_polls >= 10 and report.bird_missing == 0
    # At 50 ms a probe, a gap of more than ~3 would show up as losses.
    assert inbound.sent >= 40 and outbound.sent >= 40
    assert inbound.lost == [] and outbound.lost == []
    assert restarted.agent_pid not in (None, old_pid)
    with AgentClient(restarted.socket) as client:
        assert client.get("/v1/status")["pod_cidrs"] == [restarted.pod_cidr]
    routes = " ".join(lab.tor_routes(cluster))
    for node in cluster.nodes:
        assert f"{node.pod_cidr} via {node.node_ip} " in routes


def test_the_restart_agent_command_reports_the_route_kept_and_no_ping_lost(
    cluster: lab.LabState, capsys: pytest.CaptureFixture[str]
) -> None:
    args = argparse.Namespace(name=cluster.name, node=cluster.nodes[0].name, signal="TERM")
    assert lab._cmd_restart_agent(args) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"ToR route {cluster.nodes[0].pod_cidr}: kept throughout" in out
    assert ", 0 lost" in out


def test_every_pair_still_connects_after_the_restarts(cluster: lab.LabState) -> None:
    results = lab.connectivity(cluster)
    assert all(results.values()), {pair: ok for pair, ok in results.items() if not ok}
