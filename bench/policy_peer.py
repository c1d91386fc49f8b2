"""The iptables peer of ``ciliate bench policy``: a NetworkPolicy written as the
iptables rules an iptables-based policy engine generates, on a routed (``ptp``)
node.

The shape is kube-router's filter table (``pkg/controllers/netpol``): FORWARD
jumps to the engine's forward chain, which jumps to one firewall chain per
isolated pod (matched by its address); that chain first accepts packets of
tracked connections (``ctstate RELATED,ESTABLISHED``), then jumps to one chain
per policy selecting the pod, whose rules are walked in order; what no rule
accepted is dropped.

In the ``rules`` style the policy chain holds one ``-s <peer>/32 -j ACCEPT`` rule
per allowed peer, the client's last: how an engine renders a policy whose peers
become separate rules (Calico's iptables dataplane renders every peer of a
Kubernetes policy as its own rule, and marks and returns where this accepts, so
it walks more). kube-router itself puts the ipBlocks of *one* ingress rule into a
``hash:net`` ipset and matches the set with one rule: the ``ipset`` style
(:data:`STYLES`), whose first packet costs one set lookup whatever the number of
peers.

So a packet of an established flow costs one conntrack match whatever the rule
count, and the first packet of a new flow a walk of the policy chain (``rules``
style) or one ipset lookup (``ipset`` style).

Everything is loaded with ``ipset restore`` and one ``iptables-restore --noflush``
inside the node's network namespace (never the root namespace's firewall),
removed by :func:`remove` (only this module's set, chains and jump) and with the
namespace.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from collections.abc import Iterator

from ciliate.bench import podnet

FORWARD_CHAIN = "KUBE-ROUTER-FORWARD"
POD_CHAIN = "KUBE-POD-FW-BENCH"
POLICY_CHAIN = "KUBE-NWPLCY-BENCH"
CHAINS = (FORWARD_CHAIN, POD_CHAIN, POLICY_CHAIN)
PEER_SET = "KUBE-SRC-BENCH"
STYLES = ("rules", "ipset")
"""``rules``: one ``-s <peer>/32`` rule per peer; ``ipset``: one rule matching a
``hash:net`` set of the peers (kube-router's rendering of one rule's ipBlocks)."""
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


def ruleset(*, server_ip: str, client_ip: str, rules: int, style: str = "rules") -> str:
    """The ``iptables-restore`` input: ``rules`` peers (the client's last) for traffic
    forwarded to ``server_ip``, as rules or as one rule matching :data:`PEER_SET`."""
    if rules < 1:
        raise ValueError("rules must be at least 1 (the client's)")
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}, not {style!r}")
    lines = [
        "*filter",
        *(f":{chain} - [0:0]" for chain in CHAINS),
        f"-A FORWARD -j {FORWARD_CHAIN}",
        f"-A {FORWARD_CHAIN} -d {server_ip}/32 -j {POD_CHAIN}",
        f"-A {POD_CHAIN} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        f"-A {POD_CHAIN} -j {POLICY_CHAIN}",
        f"-A {POD_CHAIN} -j DROP",
    ]
    if style == "ipset":
        lines.append(f"-A {POLICY_CHAIN} -m set --match-set {PEER_SET} src -j ACCEPT")
    else:
        lines += [f"-A {POLICY_CHAIN} -s {peer}/32 -j ACCEPT" for peer in filler_peers(rules - 1)]
        lines.append(f"-A {POLICY_CHAIN} -s {client_ip}/32 -j ACCEPT")
    return "\n".join([*lines, "COMMIT", ""])


def peer_set(*, client_ip: str, rules: int) -> str:
    """The ``ipset restore`` input of the ``ipset`` style: ``rules`` peers, the client's
    last."""
    lines = [f"create {PEER_SET} hash:net family inet maxelem {max(65536, rules)}"]
    lines += [f"add {PEER_SET} {peer}/32" for peer in filler_peers(rules - 1)]
    lines += [f"add {PEER_SET} {client_ip}/32", ""]
    return "\n".join(lines)


def install(
    net: podnet.PodNetwork, *, server_ip: str, client_ip: str, rules: int, style: str = "rules"
) -> None:
    """Load the rule set into the node namespace of ``net`` (a routed network)."""
    text = ruleset(server_ip=server_ip, client_ip=client_ip, rules=rules, style=style)
    if style == "ipset":
        _run(net, ["ipset", "restore"], peer_set(client_ip=client_ip, rules=rules))
    _restore(net, text)


def _restore(net: podnet.PodNetwork, text: str) -> None:
    _run(net, ["iptables-restore", "--noflush"], text)


def _run(net: podnet.PodNetwork, cmd: list[str], text: str) -> None:
    proc = subprocess.run(
        ["ip", "netns", "exec", net.node_netns, *cmd],
        input=text,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if proc.returncode != 0:
        raise podnet.PodNetError(
            f"{' '.join(cmd)} in {net.node_netns} failed: {proc.stderr.strip()}"
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
    if jumps or existing:
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
    # The set after the rules that use it (the kernel refuses to destroy a set in use).
    if shutil.which("ipset") and _has_set(net):
        _run(net, ["ipset", "destroy", PEER_SET], "")


def _has_set(net: podnet.PodNetwork) -> bool:
    proc = subprocess.run(
        ["ip", "netns", "exec", net.node_netns, "ipset", "list", "-n"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return PEER_SET in proc.stdout.split()


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


def set_size(net: podnet.PodNetwork) -> int:
    """Peers in the ``ipset`` style's set now (0 without the set)."""
    if not _has_set(net):
        return 0
    proc = subprocess.run(
        ["ip", "netns", "exec", net.node_netns, "ipset", "list", PEER_SET, "-t"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("Number of entries:"):
            return int(line.split(":", 1)[1])
    raise podnet.PodNetError(f"ipset list {PEER_SET}: no entry count in {proc.stdout!r}")
