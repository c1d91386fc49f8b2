"""``ciliate service list``: the frontends a node serves and their backends, with
their state, as ``cilium service list`` shows them.

* ``--socket`` (one node): the agent's own table, with its service and backend ids
  (``GET /v1/services``);
* ``--etcd-endpoint`` (a cluster): computed here from the objects alone: the
  Services, the user's EndpointSlices, and for Services with a selector the slices
  the controller would write, from the Pods and the endpoints the agents
  published. Without ``--node`` NodePorts show on ``0.0.0.0`` (every node address)
  and traffic policies ``Local`` are not applied; with ``--node NAME`` the table is
  that node's.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from typing import Any

from ciliate.control.agent.client import AgentClient, AgentUnreachableError
from ciliate.control.cli.objects import target_options
from ciliate.control.cluster import keys
from ciliate.control.objects import KINDS, ObjectsError, ObjectStore
from ciliate.control.services.slices import (
    MANAGED_BY,
    MANAGED_BY_LABEL,
    PodAddress,
    desired_slices,
    pod_address_from_published,
)
from ciliate.control.services.table import frontends_json, service_table
from ciliate.control.store import Reader, StoreError

__all__ = ["register", "render", "table_from_objects"]

SERVICES_ROUTE = "/v1/services"
ANY_NODE_ADDRESS = ipaddress.IPv4Address("0.0.0.0")


class _Refused(Exception):
    """A message for the user, without a traceback."""


def table_from_objects(
    objects: ObjectStore, cluster: Reader, *, node: str | None
) -> list[dict[str, Any]]:
    """The service table of ``node`` (or of any node) from the objects and the
    endpoints the agents published in ``cluster``."""
    addresses: dict[str, PodAddress] = {}
    for key, raw in cluster.list(keys.ENDPOINTS):
        found = pod_address_from_published(key.removeprefix(keys.ENDPOINTS), json.loads(raw))
        if found is not None:
            addresses[found[0]] = found[1]
    services = objects.list(KINDS["Service"])
    user_slices = [
        s
        for s in objects.list(KINDS["EndpointSlice"])
        if (s["metadata"].get("labels") or {}).get(MANAGED_BY_LABEL) != MANAGED_BY
    ]
    slices = user_slices + desired_slices(
        services=services, pods=objects.list(KINDS["Pod"]), addresses=addresses
    )
    if node is None:
        # Any node's table: NodePorts on every address, and "Local" policies, which
        # mean "this node's backends", shown with all of them.
        services = [_without_local_policies(s) for s in services]
        node_ips = [ANY_NODE_ADDRESS]
    else:
        node_doc = cluster.get(f"{keys.NODES}{node}")
        if node_doc is None:
            raise _Refused(f"error: node {node!r} is not in the cluster (see ciliate node list)")
        node_ips = [ipaddress.IPv4Address(json.loads(node_doc)["nodeIP"])]
    table = service_table(services=services, slices=slices, node_name=node or "", node_ips=node_ips)
    return frontends_json(table)


def _without_local_policies(service: dict[str, Any]) -> dict[str, Any]:
    spec = dict(service["spec"])
    for field in ("internalTrafficPolicy", "externalTrafficPolicy"):
        if spec.get(field) == "Local":
            spec[field] = "Cluster"
    return {**service, "spec": spec}


def render(frontends: list[dict[str, Any]]) -> list[str]:
    """The table as lines: one per backend, the frontend's columns on its first."""
    header = ["ID", "FRONTEND", "TYPE", "SERVICE", "BACKENDS"]
    rows: list[list[str]] = []
    for frontend in frontends:
        notes = []
        if frontend["affinity_timeout"]:
            notes.append(f"affinity {frontend['affinity_timeout']}s")
        if frontend["local_only"]:
            notes.append("local backends only")
        first = [
            "" if frontend["id"] is None else str(frontend["id"]),
            frontend["frontend"],
            frontend["type"] + (f" ({', '.join(notes)})" if notes else ""),
            frontend["service"] + (f":{frontend['port_name']}" if frontend["port_name"] else ""),
        ]
        lines = []
        for backend in frontend["backends"]:
            number = "" if backend["id"] is None else f"{backend['id']} => "
            state = backend["state"]
            if state == "terminating" and backend["new_flows"]:
                state += ", takes new flows: nothing active left"
            where = f", {backend['node']}" if backend["node"] else ""
            lines.append(f"{number}{backend['address']} ({state}{where})")
        if frontend["refuses"]:
            lines = lines or ["<none>"]
            lines[0] += "  REFUSES new connections: no backend can take them"
        for i, line in enumerate(lines):
            rows.append((first if i == 0 else [""] * len(first)) + [line])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        "   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def _from_agent(socket: str) -> list[dict[str, Any]]:
    with AgentClient(socket) as client:
        try:
            answer = client.get(SERVICES_ROUTE)
        except AgentUnreachableError as exc:
            raise _Refused(f"error: {exc}") from exc
        except RuntimeError as exc:
            if ": 404 " in str(exc):
                raise _Refused(
                    f"error: the agent on {socket} does not serve {SERVICES_ROUTE} (older"
                    " agent); list from the objects with --etcd-endpoint"
                ) from exc
            raise _Refused(f"error: {exc}") from exc
    return list(answer["frontends"])


def _from_etcd(endpoint: str, node: str | None) -> list[dict[str, Any]]:
    from ciliate.control.store.etcd import EtcdStore

    try:
        with EtcdStore([endpoint]) as store:
            return table_from_objects(ObjectStore(store), store, node=node)
    except (StoreError, ObjectsError) as exc:
        raise _Refused(f"error: etcd at {endpoint}: {exc}") from exc


def service_list(args: argparse.Namespace) -> int:
    try:
        if args.etcd_endpoint:
            frontends = _from_etcd(args.etcd_endpoint, args.node)
        else:
            if args.node:
                raise _Refused("error: --node goes with --etcd-endpoint (an agent is its node)")
            frontends = _from_agent(args.socket)
    except _Refused as exc:
        print(str(exc), file=sys.stderr)
        return 1
    if args.output == "json":
        print(json.dumps({"frontends": frontends}, indent=2))
    elif not frontends:
        print("No services.", file=sys.stderr)
    else:
        print("\n".join(render(frontends)))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    service = sub.add_parser("service", help="service load balancing").add_subparsers(
        dest="service_command", required=True
    )
    p = target_options(service.add_parser("list", help="frontends, backends and their state"))
    p.add_argument("--node", help="with --etcd-endpoint: the table of this node")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.set_defaults(func=service_list)
