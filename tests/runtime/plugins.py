"""The CNI plugin sets the runtime tests run on, and the hook that adds ciliate.

A plugin set is what a runtime needs to give pods a network in a node netns:
plugin directories (searched in order), a conf dir whose first conflist is the
network, and what to look at afterwards to see that nothing leaked.

``reference``: Debian's ``bridge`` + ``host-local`` (containernetworking-plugins,
/usr/lib/cni) on 10.88.7.0/24, leases kept under the test's tmp dir.

``ciliate``: filled by ``ciliate_node`` below. Until it is set the ciliate
parameters skip, saying so.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from ciliate.control.lab.runtime.common import (
    REFERENCE_PLUGIN_DIR,
    network_name,
    reference_conflist,
)

REFERENCE_SUBNET = "10.88.7.0/24"
REFERENCE_BRIDGE = "crt0"
REFERENCE_NETWORK = "crtnet"

# The hook for ciliate. Called as ``ciliate_node(node_netns_path, tmp_path)``
# inside a fresh node netns (lo up, nothing else), it must make the node ready
# and return ``(bin_dir, conf_dir)``:
#   bin_dir  holds ``ciliate-cni`` (the C shim) -- /usr/lib/cni is searched
#            after it, so ``loopback`` (run by containerd) comes from there;
#   conf_dir holds ``05-ciliate.conflist`` (its "name" is the network podman
#            attaches to; its plugin "type" is "ciliate-cni");
#   and the agent is already running in that netns, answering the shim.
# It may instead return a context manager yielding that pair, whose exit stops
# the agent and removes what the node set up (it runs after the runtime lab is
# closed). Everything must live in ``tmp_path`` or the node netns. Example:
#
#   @contextlib.contextmanager
#   def _ciliate_node(netns: str, tmp: Path) -> Iterator[tuple[Path, Path]]:
#       agent = start_agent(netns=netns, state_dir=tmp / "agent")   # nsenter --net=netns
#       try:
#           yield agent.cni_bin_dir, agent.cni_conf_dir
#       finally:
#           agent.stop()
#
#   ciliate_node = _ciliate_node
CiliateNode = Callable[[str, Path], "tuple[Path, Path] | AbstractContextManager[tuple[Path, Path]]"]


@contextlib.contextmanager
def _ciliate_node(netns: str, tmp: Path) -> Iterator[tuple[Path, Path]]:
    from ciliate.control.lab import lab

    with lab.agent_in(netns, tmp / "ciliate", pod_cidr="10.244.60.0/24") as (_, bin_dir, conf):
        yield bin_dir, conf


ciliate_node: CiliateNode | None = _ciliate_node

CILIATE_SKIP = (
    "ciliate: the ciliate_node hook in tests/runtime/plugins.py is not filled yet "
    "(it must start the agent in the node netns and return the bin dir with ciliate-cni "
    "and the conf dir with 05-ciliate.conflist)"
)
CILIATE_CONFLIST = "05-ciliate.conflist"


@dataclass
class PluginSet:
    name: str
    plugin_dirs: list[Path]
    conf_dir: Path
    network: str
    subnet: ipaddress.IPv4Network | None = None  # where pod IPs must come from, when known
    lease_dir: Path | None = None  # host-local's dataDir/<network>, when host-local is used
    bridge: str | None = None
    extra_leftovers: Callable[[], list[str]] = field(default=lambda: [])

    def leases(self) -> list[str]:
        """IPs host-local still holds (its files named after an address)."""
        if self.lease_dir is None or not self.lease_dir.is_dir():
            return []
        held = []
        for path in sorted(self.lease_dir.iterdir()):
            with contextlib.suppress(ValueError):
                held.append(str(ipaddress.ip_address(path.name)))
        return held

    def leftovers(self) -> list[str]:
        return [f"lease {ip}" for ip in self.leases()] + self.extra_leftovers()


def reference(node_netns: str, tmp_path: Path) -> PluginSet:
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    data_dir = tmp_path / "host-local"
    conflist = reference_conflist(
        name=REFERENCE_NETWORK, subnet=REFERENCE_SUBNET, bridge=REFERENCE_BRIDGE, data_dir=data_dir
    )
    (conf_dir / "10-crt.conflist").write_text(json.dumps(conflist, indent=2))
    return PluginSet(
        name="reference",
        plugin_dirs=[REFERENCE_PLUGIN_DIR],
        conf_dir=conf_dir,
        network=REFERENCE_NETWORK,
        subnet=ipaddress.IPv4Network(REFERENCE_SUBNET),
        lease_dir=data_dir / REFERENCE_NETWORK,
        bridge=REFERENCE_BRIDGE,
    )


@contextlib.contextmanager
def ciliate(node_netns: str, tmp_path: Path, hook: CiliateNode) -> Iterator[PluginSet]:
    got = hook(node_netns, tmp_path)
    with contextlib.ExitStack() as stack:
        if isinstance(got, tuple):
            bin_dir, conf_dir = got
        else:
            bin_dir, conf_dir = stack.enter_context(got)
        bin_dir, conf_dir = Path(bin_dir), Path(conf_dir)
        assert (bin_dir / "ciliate-cni").is_file(), f"no ciliate-cni in {bin_dir}"
        assert (conf_dir / CILIATE_CONFLIST).is_file(), f"no {CILIATE_CONFLIST} in {conf_dir}"
        yield PluginSet(
            name="ciliate",
            plugin_dirs=[bin_dir, REFERENCE_PLUGIN_DIR],
            conf_dir=conf_dir,
            network=network_name(conf_dir),
            extra_leftovers=lambda: _agent_leftovers(conf_dir),
        )


def _agent_leftovers(conf_dir: Path) -> list[str]:
    """What the agent still holds: endpoints, IPs, endpoint map entries."""
    from ciliate.control.agent.client import AgentClient

    plugin = json.loads((conf_dir / CILIATE_CONFLIST).read_text())["plugins"][0]
    with AgentClient(plugin["agentSocket"]) as agent:
        held = [f"endpoint {e['container_id'][:12]}" for e in agent.get("/v1/endpoints")]
        held += [f"IP {ip}" for ip in agent.get("/v1/ipam")["allocations"]]
        held += [f"map entry {e['ip']}" for e in agent.get("/v1/bpf/endpoints")]
    return held
