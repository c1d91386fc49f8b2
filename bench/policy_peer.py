"""The iptables peer of ``ciliate bench policy``: a NetworkPolicy written as the
iptables rules an iptables-based policy engine generates, on a routed (``ptp``)
node.

The shape follows kube-router's and the first Calico releases' filter tables:
traffic forwarded to a pod jumps to that pod's firewall chain; the chain first
accepts packets of tracked connections (``ctstate RELATED,ESTABLISHED``), then
jumps to one chain per policy selecting the pod, whose rules are walked in
order, one ``-s <peer>/32`` rule per allowed peer; what no rule accepted is
dropped. So a packet of an established flow costs one conntrack match, and the
first packet of a new flow costs a walk of the policy chain: with ``rules``
rules and the allowed client written last (the order an engine has no reason to
prefer), the worst case an engine meets with many peers.

Everything is loaded with one ``iptables-restore --noflush`` inside the node's
network namespace (never the root namespace's firewall) and removed with the
namespace.
"""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Iterator

from ciliate.bench import podnet

POD_CHAIN = "KUBE-POD-FW-BENCH"
POLICY_CHAIN = "KUBE-NWPLCY-BENCH"
# Peers that are never the client: addresses of a documentation range (TEST-NET-2),
# far from every pod CIDR the benchmarks use.
FILLER_RANGE = ipaddress.IPv4Network("198.18.0.0/15")


def filler_peers(count: int) -> Iterator[ipaddress.IPv4Address]:
    """``count`` distinct /32 peers that no pod has."""
    if count > FILLER_RANGE.num_addresses - 2:
        raise ValueError(f"at most {FILLER_RANGE.num_addresses - 2} filler peers")
    hosts = FILLER_RANGE.hosts()
    for _ in range(count):
        yield next(hosts)


def ruleset(*, server_ip: str, client_ip: str, rules: int) -> str:
    """The ``iptables-restore`` input: ``rules`` peer rules in the policy chain,
    the client's last, for traffic forwarded to ``server_ip``."""
    if rules < 1:
        raise ValueError("rules must be at least 1 (the client's)")
    lines = [
        "*filter",
        f":{POD_CHAIN} - [0:0]",
        f":{POLICY_CHAIN} - [0:0]",
        f"-A FORWARD -d {server_ip}/32 -j {POD_CHAIN}",
        f"-A {POD_CHAIN} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        f"-A {POD_CHAIN} -j {POLICY_CHAIN}",
        f"-A {POD_CHAIN} -j DROP",
    ]
    lines += [f"-A {POLICY_CHAIN} -s {peer}/32 -j ACCEPT" for peer in filler_peers(rules - 1)]
    lines += [f"-A {POLICY_CHAIN} -s {client_ip}/32 -j ACCEPT", "COMMIT", ""]
    return "\n".join(lines)


def install(net: podnet.PodNetwork, *, server_ip: str, client_ip: str, rules: int) -> None:
    """Load the rule set into the node namespace of ``net`` (a routed network)."""
    _restore(net, ruleset(server_ip=server_ip, client_ip=client_ip, rules=rules))


def _restore(net: podnet.PodNetwork, text: str) -> None:
    proc = subprocess.run(
        ["ip", "netns", "exec", net.node_netns, "iptables-restore", "--noflush"],
        input=text,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if proc.returncode != 0:
        raise podnet.PodNetError(
            f"iptables-restore in {net.node_netns} failed: {proc.stderr.strip()}"
        )


def remove(net: podnet.PodNetwork) -> None:
    """Take the rule set out again (the FORWARD jump first, then the chains)."""
    restore = "\n".join(
        [
            "*filter",
            f":{POD_CHAIN} - [0:0]",
            f":{POLICY_CHAIN} - [0:0]",
            "-F FORWARD",
            f"-F {POD_CHAIN}",
            f"-F {POLICY_CHAIN}",
            f"-X {POD_CHAIN}",
            f"-X {POLICY_CHAIN}",
            "COMMIT",
            "",
        ]
    )
    _restore(net, restore)


def rule_count(net: podnet.PodNetwork) -> int:
    """Rules in the policy chain now (to check what was loaded)."""
    out = subprocess.run(
        ["ip", "netns", "exec", net.node_netns, "iptables", "-S", POLICY_CHAIN],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return sum(line.startswith(f"-A {POLICY_CHAIN} ") for line in out.splitlines())
