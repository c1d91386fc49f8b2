"""The agent goes away and comes back: pods keep forwarding, endpoints are
restored, and an ADD killed at any step leaves nothing behind."""

from __future__ import annotations

import subprocess
import time

import pytest

from ciliate.control.agent.endpoints import CRASH_STEPS
from ciliate.control.lab import lab

from .conftest import NodeLab, restart_agent


def _snapshot(node_lab: NodeLab) -> dict[str, object]:
    return {
        "links": node_lab.pod_links(),
        "allocations": node_lab.get("/v1/ipam")["allocations"],
        "bpf_endpoints": node_lab.get("/v1/bpf/endpoints"),
        "ipcache": node_lab.get("/v1/bpf/ipcache"),
        "endpoints": [e["container_id"] for e in node_lab.get("/v1/endpoints")],
        "identities": [i["id"] for i in node_lab.get("/v1/identities")],
    }


def test_pods_keep_forwarding_while_the_agent_restarts(fresh_lab: NodeLab) -> None:
    a, b = fresh_lab.pod("a"), fresh_lab.pod("b")
    fresh_lab.add(a)
    fresh_lab.add(b)
    before = _snapshot(fresh_lab)

    # 400 pings, 10 ms apart (4 s), across a SIGTERM and a restart of the agent.
    pinger = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            a.netns,
            "ping",
            "-q",
            "-i",
            "0.01",
            "-c",
            "400",
            "-W",
            "1",
            str(b.ip),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)
    restart_agent(fresh_lab)
    out, _ = pinger.communicate(timeout=30)

    assert " 400 received" in out and " 0% packet loss" in out, out
    status = fresh_lab.get("/v1/status")
    assert status["restored"]["restored"] == 2
    assert _snapshot(fresh_lab) == before  # same IPs, veths, map entries, identities
    assert fresh_lab.ping(a, str(b.ip)) and fresh_lab.ping(b, fresh_lab.router_ip)


def test_endpoints_whose_pod_is_gone_are_collected_at_start(fresh_lab: NodeLab) -> None:
    a, b = fresh_lab.pod("a"), fresh_lab.pod("b")
    fresh_lab.add(a)
    fresh_lab.add(b)
    lab.stop_agent(fresh_lab.node)
    lab._run("ip", "netns", "del", b.netns)  # the pod vanished while the agent was down
    restart_agent(fresh_lab)
    status = fresh_lab.get("/v1/status")
    assert status["restored"] == {
        "restored": 1,
        "collected": 1,
        "stale_veths": 0,
        "stale_map_entries": 0,
    }
    assert list(fresh_lab.get("/v1/ipam")["allocations"]) == [a.ip]
    assert [e["ip"] for e in fresh_lab.get("/v1/bpf/endpoints")] == [a.ip]


def test_a_del_sent_while_the_agent_is_down_is_queued_and_replayed(fresh_lab: NodeLab) -> None:
    a = fresh_lab.pod("a")
    fresh_lab.add(a)
    lab.stop_agent(fresh_lab.node)
    assert fresh_lab.cni(a, "DEL") == {}  # never fails: queued on disk
    restart_agent(fresh_lab)
    assert fresh_lab.get("/v1/endpoints") == []
    assert fresh_lab.get("/v1/ipam")["allocations"] == {}
    assert fresh_lab.wait_pod_links(0) == []


@pytest.mark.parametrize("step", CRASH_STEPS)
def test_an_add_killed_at_any_step_leaves_nothing_after_restart(
    fresh_lab: NodeLab, step: str
) -> None:
    survivor = fresh_lab.pod("survivor")
    fresh_lab.add(survivor)
    before = _snapshot(fresh_lab)

    restart_agent(fresh_lab, env={"CILIATE_CRASH_AT": step})
    victim = fresh_lab.pod("victim")
    with pytest.raises(lab.CniCallError):
        fresh_lab.add(victim)  # the agent SIGKILLs itself at `step`
    restart_agent(fresh_lab, kill=True)  # reap it, start a normal agent

    assert _snapshot(fresh_lab) == before
    assert fresh_lab.ping(survivor, fresh_lab.router_ip)
    # The runtime retries: the same pod now gets its network.
    fresh_lab.add(victim)
    assert fresh_lab.ping(victim, str(survivor.ip))
