"""NodePort flows through real TCP stacks: connections from the ToR to one node,
to its local and remote backends, each opened and closed by real kernels (FIN
both ways, the last ACK). The node keeps every flow closing with the short
lifetime; the flows freed from user space leave no reply entry behind, and
new connections go on as before."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from ciliate.control.agent.client import AgentClient
from ciliate.control.lab import lab
from ciliate.datapath import abi, conntrack
from ciliate.datapath import maps as dpmaps
from ciliate.datapath.lb import LoadBalancer
from ciliate.loader import Map

from . import test_services_cluster as services

pytestmark = services.pytestmark
cluster = services.cluster  # the fixture: 3 nodes, a backend and a client pod on each
CT_CLOSE = abi.constant("CILIATE_CT_LIFETIME_CLOSE")


@contextlib.contextmanager
def pinned_lb(node: lab.NodeState) -> Iterator[tuple[LoadBalancer, Map]]:
    """The node's service maps as its agent pinned them; and its reply map."""
    with AgentClient(node.socket) as client:
        pins = Path(client.get("/v1/status")["datapath"]["maps_pinned_at"])
    names = {
        "services": dpmaps.LB_SERVICE,
        "backends": dpmaps.LB_BACKEND,
        "revnat": dpmaps.LB_REVNAT,
        "affinity": dpmaps.LB_AFFINITY,
        "sock_revnat": dpmaps.LB_SOCK_REVNAT,
        "maglev": dpmaps.LB_MAGLEV,
        "nat_fwd": dpmaps.LB_NAT_FWD,
        "nat_rev": dpmaps.LB_NAT_REV,
        "netns": dpmaps.LB_NETNS,
    }
    with contextlib.ExitStack() as stack:
        raw = {
            arg: stack.enter_context(Map.open_pinned(pins / name)) for arg, name in names.items()
        }
        yield LoadBalancer(**raw), raw["nat_rev"]


def test_closed_nodeport_connections_are_closing_flows_and_are_freed(
    cluster: services.Cluster,
) -> None:
    cluster.apply(services.service("web-flows", type="NodePort"))
    try:
        svc = services.stored(cluster, "web-flows")
        node_port = svc["spec"]["ports"][0]["nodePort"]
        backends = {str(p.ip) for p in cluster.web.values()}
        cluster.backends_everywhere(svc["spec"]["clusterIP"], backends)
        node = cluster.state.nodes[0]
        assert node.node_ip is not None
        local = {str(p.ip) for p in cluster.web.values() if p.node == node.name}
        seen = set(services.tor_ask(cluster, node.node_ip, node_port, 30))
        assert local <= seen and seen - local  # both kinds of flow were made
        with pinned_lb(node) as (lb, nat_rev):
            # (The last FIN may still be on its way when the client exits.)
            deadline = time.monotonic() + 5
            while True:
                flows = [f for f in lb.flows() if f.frontend.port == node_port]
                if all(f.closing for f in flows) or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert len(flows) == 30
            assert {f.snat_port is None for f in flows} == {True, False}
            now, hz = conntrack.now(), conntrack.hz()
            for flow in flows:
                assert flow.answered and flow.closing, flow
                assert flow.expires - now <= CT_CLOSE * hz
            # Freed from user space once over: the flows and their reply entries.
            freed = lb.expire_flows(now=now + (CT_CLOSE + 1) * hz)
            assert freed >= 30
            assert [f for f in lb.flows() if f.frontend.port == node_port] == []
            assert list(nat_rev.keys()) == []
        # New connections after all that still reach both kinds of backend.
        seen = set(services.tor_ask(cluster, node.node_ip, node_port, 30))
        assert local <= seen and seen - local
    finally:
        cluster.delete(services.service("web-flows"))
