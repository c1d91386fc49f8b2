"""The cluster's keys in the shared store (JSON values), and what removes a node.

Shared by the agents (:mod:`ciliate.control.cluster.member`) and the operator
(:mod:`ciliate.control.operator.reconciler`); nothing here touches a datapath.

* ``cluster/nodes/<name>``     the node's agent: ``{"name", "nodeIP"}`` (deleted = node gone)
* ``cluster/alive/<name>``     the node's agent, bound to its lease: the node is up
* ``cluster/ipam/<name>``      the operator: ``{"podCIDRs": [...], "status": {"error"}}``
* ``cluster/endpoints/<ip>``   the owning agent: ``{"identity", "nodeIP", "node"}``
* ``cluster/bgp/<name>``       the node's agent: its BGP sessions, for ``ciliate node list``
* ``cluster/operator/released/<name>``  the operator: the pod CIDRs a removed node
  held, handed back to it if it registers again while they are free
"""

from __future__ import annotations

import json
from typing import Protocol

from ciliate.control.store.base import KeyValues

NODES = "cluster/nodes/"
ALIVE = "cluster/alive/"
IPAM = "cluster/ipam/"
ENDPOINTS = "cluster/endpoints/"
BGP = "cluster/bgp/"
RELEASED = "cluster/operator/released/"


class NodeTxn(Protocol):
    """What removing a node needs of a store transaction."""

    def get(self, key: str) -> bytes | None: ...

    def list(self, prefix: str) -> KeyValues: ...

    def delete(self, key: str) -> bool: ...


def remove_node(txn: NodeTxn, name: str) -> int:
    """Delete what the node wrote (its object, liveness, BGP state, endpoints) in
    ``txn``; the operator then frees its pod CIDRs and every other agent drops its
    endpoints from the ipcache. Returns how many endpoints went."""
    txn.delete(f"{NODES}{name}")
    txn.delete(f"{ALIVE}{name}")
    txn.delete(f"{BGP}{name}")
    removed = 0
    for key, raw in txn.list(ENDPOINTS):
        if json.loads(raw).get("node") == name:
            txn.delete(key)
            removed += 1
    return removed
