"""The iptables peer of ``ciliate bench policy``: a NetworkPolicy written as the
iptables rules an iptables-based policy engine generates, on a routed (``ptp``)
node.

The shape is kube-router's filter table (``pkg/controllers/netpol``): FORWARD
jumps to the engine's forward chain, which jumps to one firewall chain per
isolated pod (matched by its address); that chain first accepts packets of
tracked connections (``ctstate RELATED,ESTABLISHED``), then jumps to one chain
per policy selecting the pod, whose rules are walked in order; what no rule
accepted is dropped. Here the policy chain holds one ``-s <peer>/32 -j ACCEPT``
rule per allowed peer, the client's last: one rule per peer is how an engine
renders a policy whose peers are separate rules (Calico's iptables dataplane
renders every peer of a Kubernetes policy as its own rule, and marks and
returns where this accepts, so it walks more). kube-router itself puts the
ipBlocks of *one* ingress rule into a ``hash:net`` ipset and matches the set
with one rule; that variant is not measured here (no ``ipset`` tool on this
machine kind), so at 10,000 peers this peer is the worst case of an iptables
engine, not every engine's.

So a packet of an established flow costs one conntrack match whatever the rule
count, and the first packet of a new flow a walk of the policy chain.

Everything is loaded with one ``iptables-restore --noflush`` inside the node's
network namespace (never the root namespace's firewall), removed by
:func:`remove` (only this module's chains and jump) and with the namespace.
"""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Iterator

from ciliate.bench import podnet

FORWARD_CHAIN = "KUBE-ROUTER-FORWARD"
POD_CHAIN = "KUBE-POD-FW-BENCH"
POLICY_CHAIN = "KUBE-NWPLCY-BENCH"
CHAINS = (FORWARD_CHAIN, POD_CHAIN, POLICY_CHAIN)
# Peers that are never the client: addresses of the benchmarking range (RFC 2544),
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
        *(f":{chain} - [0:0]" for chain in CHAINS),
        f"-A FORWARD -j {FORWARD_CHAIN}",
        f"-A {FORWARD_CHAIN} -d {server_ip}/32 -j {POD_CHAIN}",
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
    """Take the rule set out again: FORWARD's jumps into it, then its chains. Other
    rules of FORWARD stay (the plugin may have its own)."""
    saved = _iptables(net, "-S", "FORWARD")
    jumps = [
        line.replace("-A FORWARD", "-D FORWARD", 1)
        for line in saved.splitlines()
        if line.startswith("-A FORWARD") and line.endswith(f"-j {FORWARD_CHAIN}")
    ]
    existing = [chain for chain in CHAINS if _iptables(net, "-S", chain, check=False)]
    if not jumps and not existing:
        return
    _restore(
        net,
        "\n".join(
            [
                "*filter",
                *jumps,
                *(f"-F {chain}" for chain in existing),
                *(f"-X {chain}" for chain in existing),
                "COMMIT",
                "",
            ]
        ),
    )


def _iptables(net: podnet.PodNetwork, *args: str, check: bool = True) -> str:
    """``iptables ARGS`` in the node namespace; its output ("" if it failed and not
    ``check``)."""
    proc = subprocess.run(
        ["ip", "netns", "exec", net.node_netns, "iptables", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if proc.returncode != 0:
        if check:
            raise podnet.PodNetError(
                f"iptables {' '.join(args)} in {net.node_netns}: {proc.stderr.strip()}"
            )
        return ""
    return proc.stdout


def rule_count(net: podnet.PodNetwork) -> int:
    """Rules in the policy chain now (to check what was loaded)."""
    out = _iptables(net, "-S", POLICY_CHAIN, check=False)
    return sum(line.startswith(f"-A {POLICY_CHAIN} ") for line in out.splitlines())
