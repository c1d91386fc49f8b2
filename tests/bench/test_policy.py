"""bench policy, the peer side by side: the iptables rule set, the goals and the
output from known figures, and short real runs that prove the policy is in force
on both networks before anything is measured."""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

import pytest

from ciliate.bench import podnet, policy, policy_peer, reach, traffic

from .conftest import need

# -- the peer's rule set ---------------------------------------------------------------


def test_ruleset_is_a_per_pod_chain_with_conntrack_first_and_the_client_last() -> None:
    text = policy_peer.ruleset(server_ip="10.1.0.3", client_ip="10.1.0.2", rules=50)
    lines = text.splitlines()
    assert lines[0] == "*filter" and lines[-1] == "COMMIT"
    appended = [line for line in lines if line.startswith("-A ")]
    assert appended[:5] == [
        f"-A FORWARD -j {policy_peer.FORWARD_CHAIN}",
        f"-A {policy_peer.FORWARD_CHAIN} -d 10.1.0.3/32 -j {policy_peer.POD_CHAIN}",
        f"-A {policy_peer.POD_CHAIN} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        f"-A {policy_peer.POD_CHAIN} -j {policy_peer.POLICY_CHAIN}",
        f"-A {policy_peer.POD_CHAIN} -j DROP",
    ]
    peers = [line for line in appended if line.startswith(f"-A {policy_peer.POLICY_CHAIN} ")]
    assert len(peers) == 50
    assert peers[-1] == f"-A {policy_peer.POLICY_CHAIN} -s 10.1.0.2/32 -j ACCEPT"
    sources = [line.split()[3] for line in peers]
    assert len(set(sources)) == 50 and "10.1.0.2/32" not in sources[:-1]


def test_ruleset_needs_the_clients_rule() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        policy_peer.ruleset(server_ip="10.1.0.3", client_ip="10.1.0.2", rules=0)


# -- goals and output from known figures ----------------------------------------------------


def _figures(p50: list[float], new_flow: list[float], gbps: list[float]) -> policy.Figures:
    return policy.Figures(
        sockperf_p50_us=p50,
        new_flow_p50_us=new_flow,
        new_flow_lost=[0] * len(p50),
        tcp_gbps=gbps,
        tcp_runs_gbps=[x for x in gbps for _ in range(2)],
    )


def _streams(gbps: list[float]) -> policy.Figures:
    return policy.Figures(tcp_gbps=gbps, tcp_runs_gbps=[x for x in gbps for _ in range(2)])


def _results() -> policy.PeerResults:
    """Two rule counts, three rounds. At 10,000 rules ciliate's new-flow latency is
    0.2x the peer's, its established latency 0.8x (both paired round by round), its
    stream 0.99x without policy, and ciliate-packet's stream 0.9x."""
    figures = {
        "ptp": {
            n: {
                "policed": _figures([4.0, 4.0, 4.0], [50.0, 60.0, 100.0], [20.0, 20.0, 20.0]),
                "open": _figures([3.5, 3.5, 3.5], [12.0, 12.0, 12.0], [21.0, 21.0, 21.0]),
            }
            for n in (10, 10000)
        },
        "ciliate": {
            n: {
                "policed": _figures([3.2, 3.2, 3.2], [10.0, 12.0, 20.0], [19.8, 29.7, 9.9]),
                "open": _figures([3.1, 3.1, 3.1], [9.0, 9.0, 9.0], [20.0, 30.0, 10.0]),
            }
            for n in (10, 10000)
        },
        "ciliate-packet": {
            n: {
                "policed": _streams([18.0, 9.0, 27.0]),
                "open": _streams([20.0, 10.0, 30.0]),
            }
            for n in (10, 10000)
        },
    }
    probe = reach.Reach(
        proto="udp", src="10.1.0.4", dst="10.1.0.3", port=12000, answered=0, attempts=3
    )
    return policy.PeerResults(
        rule_counts=[10, 10000],
        rounds=3,
        seconds=1,
        cpu=1,
        sides={
            "ptp": list(policy.TOOLS),
            "ciliate": list(policy.TOOLS),
            "ciliate-packet": ["iperf3"],
        },
        figures=figures,
        enforcement={name: {10: [probe], 10000: [probe]} for name in figures},
        load=["0.50 0.40 0.30", "0.60 0.50 0.40"],
    )


def test_goals_are_judged_at_10000_rules_on_paired_ratios() -> None:
    goals = {g.what: g for g in _results().goals()}
    assert {g.rules for g in goals.values()} == {10000}
    new_flow = goals["new-flow UDP request/response p50, ciliate / iptables peer"]
    assert new_flow.ratio.median == pytest.approx(0.2) and new_flow.met
    established = goals["established-flow UDP request/response p50, ciliate / iptables peer"]
    assert established.ratio.median == pytest.approx(0.8) and not established.met
    assert "first rule (conntrack)" in established.note
    stream = goals["one TCP stream, ciliate with policy / without"]
    assert stream.ratio.median == pytest.approx(0.99) and stream.met
    packet = goals["one TCP stream, ciliate-packet with policy / without"]
    assert packet.ratio.median == pytest.approx(0.9) and not packet.met


def test_goals_fall_back_to_the_largest_rule_count_run() -> None:
    results = _results()
    results.rule_counts = [10]
    assert {g.rules for g in results.goals()} == {10}


def test_tables_say_met_or_not_per_goal(capsys: pytest.CaptureFixture[str]) -> None:
    policy.print_tables(None, _results())
    out = capsys.readouterr().out
    assert "ptp+iptables" in out and "ciliate-packet" in out
    assert "0.20 [0.20-0.20]" in out  # new flow, x the peer
    assert "0.99 [0.99-0.99]" in out  # TCP, x no policy
    assert out.count("NOT MET") == 2 and out.count(" met ") == 2
    assert "0.50 0.40 0.30" in out  # the load the figures were taken under


def test_json_has_every_figure_ratio_probe_and_goal(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    policy.write_json(policy.to_dict(None, _results()), path)
    peer = json.loads(path.read_text())["peer"]
    for network in ("ptp", "ciliate", "ciliate-packet"):
        for rules in ("10", "10000"):
            for target in policy.TARGETS:
                assert peer["figures"][network][rules][target]["tcp_gbps"]
            assert peer["enforcement"][network][rules][0]["answered"] == 0
    assert peer["ratios"]["ciliate"]["10000"]["new_flow_p50_us_x_peer"]["median"] == (
        pytest.approx(0.2)
    )
    assert set(peer["ratios"]["ciliate-packet"]["10"]) == {"tcp_gbps_x_no_policy"}
    assert [g["met"] for g in peer["goals"]] == [True, False, True, False]
    assert peer["load"][0] == "0.50 0.40 0.30"


# -- real runs -----------------------------------------------------------------------------


def _need_peer_tools() -> None:
    need("iperf3", "sockperf", "taskset", "ss", "iptables-restore", plugins=("ptp", "host-local"))


@pytest.mark.usefixtures("bpf_objects")
@pytest.mark.parametrize("spec", policy.SIDES, ids=lambda spec: spec.network)
def test_the_probes_catch_a_policy_not_in_force(spec: policy.SideSpec, prefix: str) -> None:
    _need_peer_tools()
    if spec.peer_style == "ipset":
        need("ipset", plugins=("ptp", "host-local"))
    cpu = traffic.default_cpu()
    with contextlib.ExitStack() as stack:
        net = stack.enter_context(
            podnet.PodNetwork(spec.network_def(), prefix=prefix, k8s_namespace=policy.NAMESPACE)
        )
        side = policy._set_up_side(spec, net, stack, cpu)
        with pytest.raises(policy.PolicyBenchError, match="the outsider got through"):
            policy._verify_enforced(side)
        side.install(3)
        probes = policy._verify_enforced(side)
        assert [p.answered for p in probes] == [3, 3, 0, 0]
        assert [(p.proto, p.src, p.dst) for p in probes[2:]] == [
            ("udp", side.open.ip, side.policed.ip),
            ("tcp", side.open.ip, side.policed.ip),
        ]


def test_the_peer_is_removed_without_touching_other_forward_rules(prefix: str) -> None:
    _need_peer_tools()
    with podnet.PodNetwork("ptp", prefix=prefix) as net:
        a, b = net.add_pod("a"), net.add_pod("b")
        foreign = ["-A", "FORWARD", "-s", "192.0.2.1/32", "-j", "ACCEPT"]
        subprocess.run(["ip", "netns", "exec", net.node_netns, "iptables", *foreign], check=True)
        policy_peer.install(net, server_ip=b.ip, client_ip=a.ip, rules=20)
        assert policy_peer.rule_count(net) == 20
        policy_peer.remove(net)
        policy_peer.remove(net)  # nothing left to remove is not an error
        saved = subprocess.run(
            ["ip", "netns", "exec", net.node_netns, "iptables", "-S"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert " ".join(foreign) in saved
        assert not any(chain in saved for chain in policy_peer.CHAINS)


@pytest.mark.usefixtures("bpf_objects")
def test_short_run_measures_both_networks_with_the_policy_enforced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _need_peer_tools()
    results = policy.run_peer(
        rule_counts=(5,), rounds=1, seconds=1, sides=policy.SIDES[:2], progress=None
    )
    for network in ("ptp", "ciliate"):
        probes = results.enforcement[network][5]
        assert len(results.figures[network][5]["policed"].tcp_runs_gbps) == 1
        client, open_, outsider_udp, outsider_tcp = probes
        assert client.answered == client.attempts and open_.answered == open_.attempts
        assert outsider_udp.answered == 0 and outsider_tcp.answered == 0
        for target in policy.TARGETS:
            figures = results.figures[network][5][target]
            assert len(figures.sockperf_p50_us) == len(figures.tcp_gbps) == 1
            assert figures.new_flow_p50_us[0] > 0 and figures.tcp_gbps[0] > 0
    path = tmp_path / "policy.json"
    policy.write_json(policy.to_dict(None, results), path)
    peer = json.loads(path.read_text())["peer"]
    assert {g["rules"] for g in peer["goals"]} == {5} and len(peer["goals"]) == 3
    policy.print_tables(None, results)
    out = capsys.readouterr().out
    assert "ptp+iptables" in out and "the issue's goals, at 5 rules" in out
