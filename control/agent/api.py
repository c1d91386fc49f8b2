"""The agent's HTTP API (FastAPI), served on a UNIX socket.

FastAPI describes every route in the OpenAPI document it serves at
``/openapi.json``, the 4xx answers included, and answers an invalid request
with a 422 whose detail names the field. Request bodies are strict (see
``schema.py``). ``/v1/cni`` is what the ``ciliate-cni`` relay calls.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import Field

from ciliate.control.agent import metrics, objects_api
from ciliate.control.agent.endpoints import EndpointRecord
from ciliate.control.agent.node import NodeAgent
from ciliate.control.agent.schema import ApiModel, Text, errors, printable
from ciliate.control.store import StoreUnavailableError
from ciliate.datapath import tables


class CniRequest(ApiModel):
    env: dict[Text, Text] = Field(description="the CNI_* environment of the plugin call")
    stdin: Text = Field(description="the network configuration the runtime sent on stdin")


class CniResponse(ApiModel):
    exit_code: int
    stdout: str


class DatapathConfig(ApiModel):
    trace: bool = Field(description="send a trace event for every forwarded packet")


class TraceRequest(ApiModel):
    src: Text = Field(description="the source pod, NAMESPACE/NAME")
    dst: Text = Field(description="the destination pod, NAMESPACE/NAME")
    protocol: int = Field(ge=1, le=255, description="IP protocol number (6 TCP, 17 UDP)")
    port: int = Field(ge=1, le=65535, description="destination port")


_NOT_IN_CLUSTER = {404: "This agent is not in a cluster"}
_CLUSTER_ROUTE_ERRORS = {**_NOT_IN_CLUSTER, 503: "The cluster store (etcd) is unreachable"}


def _cluster_store_unavailable(exc: StoreUnavailableError) -> HTTPException:
    """A 503 (try again later) rather than a 500: etcd down is not the agent's bug."""
    return HTTPException(
        status_code=503,
        detail=f"the cluster store (etcd) is unreachable: {exc}; retry when it is back",
    )


def create_app(agent: NodeAgent) -> FastAPI:
    app = FastAPI(
        title="ciliate agent",
        version="0.1.0",
        description="Node agent: endpoints, IPAM, identities and the BPF datapath of one node.",
    )
    registry = metrics.AgentMetrics(agent)
    app.add_middleware(metrics.LatencyMiddleware, histogram=registry.latency)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer, with text it could not encode made printable
        # (the refused value is echoed back, lone surrogate and all).
        return JSONResponse(
            status_code=422, content={"detail": printable(jsonable_encoder(exc.errors()))}
        )

    @app.post("/v1/cni", response_model=CniResponse, tags=["cni"])
    def cni(body: CniRequest) -> CniResponse:
        """One CNI plugin invocation, relayed by ``ciliate-cni``."""
        from ciliate.control.cni import handler

        result = handler.handle(body.env, body.stdin.encode(), agent.endpoints)
        return CniResponse(exit_code=result.exit_code, stdout=result.stdout)

    @app.get("/v1/healthz", tags=["node"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/status", tags=["node"])
    def status() -> dict[str, Any]:
        return {
            "node": agent.config.node_name,
            "pod_cidrs": [str(c) for c in agent.pod_cidrs],
            "cluster": agent.cluster is not None,
            "router_ip": str(agent.router_ip),
            "node_ip": str(agent.node_ip),
            "endpoints": len(agent.endpoints.list()),
            "ipam": _ipam(agent),
            "uptime_s": round(time.time() - agent.started, 1),
            "restored": agent.restore_counts,
            "store_revision": agent.store.revision(),
            "datapath": {
                "trace": agent.datapath.config.trace_enabled(),
                "maps_pinned_at": str(agent.config.maps_dir),
            },
        }

    def with_policy(record: EndpointRecord) -> dict[str, Any]:
        """The record, plus what the datapath enforces for it."""
        doc = record.to_json()
        if agent.datapath.has_policy:
            state = agent.datapath.policy.state(record.endpoint_id)
            doc["policy"] = {
                "ingress_enforced": state.ingress_enforced,
                "egress_enforced": state.egress_enforced,
                "revision": state.revision,
            }
        return doc

    @app.get("/v1/endpoints", tags=["endpoints"])
    def endpoints() -> list[dict[str, Any]]:
        return [with_policy(r) for r in agent.endpoints.list()]

    @app.get(
        "/v1/endpoints/{endpoint_id}",
        tags=["endpoints"],
        responses=errors({404: "No endpoint with that id"}),
    )
    def endpoint(endpoint_id: int) -> dict[str, Any]:
        record = agent.endpoints.get(endpoint_id)
        if record is None:
            raise HTTPException(status_code=404, detail=f"no endpoint with id {endpoint_id}")
        return with_policy(record)

    @app.get(
        "/v1/bpf/policy/{endpoint_id}",
        tags=["bpf"],
        responses=errors({404: "No endpoint with that id, or no policy in this datapath"}),
    )
    def bpf_policy(endpoint_id: int) -> dict[str, Any]:
        if not agent.datapath.has_policy:
            raise HTTPException(status_code=404, detail="the datapath was built without policy")
        if agent.endpoints.get(endpoint_id) is None:
            raise HTTPException(status_code=404, detail=f"no endpoint with id {endpoint_id}")
        state = agent.datapath.policy.state(endpoint_id)
        origins = agent.policy.origins(endpoint_id)
        return {
            "endpoint_id": endpoint_id,
            "ingress_enforced": state.ingress_enforced,
            "egress_enforced": state.egress_enforced,
            "revision": state.revision,
            "entries": [
                {**asdict(e), "origin": origins.get(e, [])}
                for e in agent.datapath.policy.entries(endpoint_id)
            ],
        }

    @app.get(
        "/v1/bpf/ct",
        tags=["bpf"],
        responses=errors({404: "No connection tracker in this datapath"}),
    )
    def bpf_ct() -> list[dict[str, Any]]:
        if not agent.datapath.has_policy:
            raise HTTPException(status_code=404, detail="the datapath was built without policy")
        return [
            {
                "protocol": c.protocol,
                "src": f"{c.src[0]}:{c.src[1]}",
                "dst": f"{c.dst[0]}:{c.dst[1]}",
                "expires_in": round(c.expires_in, 1),
                "seen_reply": c.seen_reply,
                "closing": c.closing,
                "revisions": [c.orig_revision, c.reply_revision],
            }
            for c in agent.datapath.conntrack.list()
            if not c.expired
        ]

    @app.post(
        "/v1/policy/trace",
        tags=["policy"],
        responses=errors({404: "A pod with no endpoint"}),
    )
    def policy_trace(body: TraceRequest) -> dict[str, Any]:
        """Allowed or denied, source egress then destination ingress, and why."""
        try:
            outcome = agent.policy.trace(
                src=body.src, dst=body.dst, protocol=body.protocol, port=body.port
            )
        except LookupError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from exc
        return {
            "allowed": outcome.allowed,
            "verdicts": [
                {
                    "direction": v.direction,
                    "endpoint": v.endpoint,
                    "allowed": v.allowed,
                    "peer_identity": v.peer_identity,
                    "because": v.because,
                }
                for v in outcome.verdicts
            ],
            "lines": outcome.lines(),
        }

    @app.get("/v1/services", tags=["services"])
    def services() -> dict[str, Any]:
        """The node's service table: frontends, their backends and states, with ids."""
        if agent.services is None:
            return {"frontends": [], "load_balancing": False}
        return {**agent.services.table(), "load_balancing": True}

    @app.get("/v1/services/status", tags=["services"])
    def services_status() -> dict[str, Any]:
        """The service loop: whether it has caught up with the objects."""
        if agent.services is None:
            return {"pending": False, "load_balancing": False}
        return agent.services.status()

    @app.get("/v1/bpf/lb", tags=["bpf"])
    def bpf_lb() -> list[dict[str, Any]]:
        """The services in the datapath's maps, as the programs see them."""
        if not agent.datapath.has_services:
            return []
        return [
            {
                "frontend": str(svc.frontend),
                "service_id": svc.service_id,
                "affinity_timeout": svc.affinity_timeout,
                "external": svc.external,
                "backends": [
                    {
                        "id": b.id,
                        "address": f"{b.address}:{b.port}",
                        "state": b.state.name.lower(),
                        "local": b.local,
                    }
                    for b in svc.backends
                ],
            }
            for svc in agent.datapath.lb.list()
        ]

    @app.get("/v1/policy", tags=["policy"])
    def policy_status() -> dict[str, Any]:
        """The policy loop: whether it has caught up with the objects and endpoints."""
        return agent.policy.loop.status()

    @app.get("/v1/identities", tags=["identities"])
    def identities() -> list[dict[str, Any]]:
        return [
            {"id": i.id, "labels": i.labels, "refcount": i.refcount, "reserved": i.reserved}
            for i in agent.identities.list()
        ]

    @app.get("/v1/ipam", tags=["ipam"])
    def ipam() -> dict[str, Any]:
        return {
            "router_ip": str(agent.router_ip),
            "pools": _ipam(agent),
            "allocations": {str(ip): owner for ip, owner in agent.ipam.allocations().items()},
        }

    @app.get("/v1/bpf/ipcache", tags=["bpf"])
    def bpf_ipcache() -> list[dict[str, Any]]:
        return [
            {
                "prefix": str(e.prefix),
                "identity": e.identity,
                "node_ip": str(e.node_ip) if e.node_ip else None,
                "flags": e.flags,
            }
            for e in agent.datapath.ipcache.list()
        ]

    @app.get("/v1/bpf/endpoints", tags=["bpf"])
    def bpf_endpoints() -> list[dict[str, Any]]:
        return [
            {
                "ip": str(e.ipv4),
                "ifindex": e.ifindex,
                "mac": e.mac,
                "node_mac": e.node_mac,
                "identity": e.identity,
                "endpoint_id": e.endpoint_id,
            }
            for e in agent.datapath.endpoints.list()
        ]

    @app.get("/v1/bpf/sockets", tags=["bpf"])
    def bpf_sockets() -> list[dict[str, Any]]:
        return [
            {"local": f"{s.local[0]}:{s.local[1]}", "remote": f"{s.remote[0]}:{s.remote[1]}"}
            for s in agent.datapath.sockets.list()
        ]

    @app.get("/v1/bpf/metrics", tags=["bpf"])
    def bpf_metrics() -> list[dict[str, Any]]:
        return [
            {
                "reason": r.reason,
                "description": tables.describe_reason(r.reason),
                "direction": r.direction.name.lower(),
                "packets": r.packets,
                "bytes": r.bytes,
            }
            for r in agent.datapath.metrics.rows()
        ]

    @app.get("/v1/cluster/nodes", tags=["cluster"], responses=errors(_CLUSTER_ROUTE_ERRORS))
    def cluster_nodes() -> list[dict[str, Any]]:
        if agent.cluster is None:
            raise HTTPException(status_code=404, detail="this agent is not in a cluster")
        from ciliate.control.cluster.member import list_nodes

        try:
            return list_nodes(agent.cluster.store)
        except StoreUnavailableError as exc:
            raise _cluster_store_unavailable(exc) from exc

    @app.delete(
        "/v1/cluster/nodes/{name}", tags=["cluster"], responses=errors(_CLUSTER_ROUTE_ERRORS)
    )
    def cluster_node_delete(name: str) -> dict[str, str]:
        if agent.cluster is None:
            raise HTTPException(status_code=404, detail="this agent is not in a cluster")
        from ciliate.control.cluster.member import delete_node

        try:
            delete_node(agent.cluster.store, name)
        except StoreUnavailableError as exc:
            raise _cluster_store_unavailable(exc) from exc
        return {"deleted": name}

    @app.put("/v1/datapath/config", tags=["bpf"])
    def datapath_config(body: DatapathConfig) -> DatapathConfig:
        agent.datapath.config.set_trace(body.trace)
        return body

    @app.get("/metrics", tags=["node"], response_class=Response)
    def prometheus() -> Response:
        body, content_type = registry.render()
        return Response(content=body, media_type=content_type)

    app.include_router(
        objects_api.create_router(agent.objects_store, changed=agent.objects_changed)
    )
    return app


def _ipam(agent: NodeAgent) -> list[dict[str, Any]]:
    return [
        {"cidr": str(u.cidr), "used": u.used, "capacity": u.capacity} for u in agent.ipam.usage()
    ]
