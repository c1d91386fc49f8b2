"""Prometheus metrics of the agent: endpoints, IPAM usage, API latency and
the datapath counters of ciliate_metrics, read when scraped. Every label
takes a bounded set of values, whatever clients send."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ciliate.datapath import tables

if TYPE_CHECKING:
    from ciliate.control.agent.node import NodeAgent

# Label values for requests outside the API: one series each, whatever the
# client sends (each distinct label value is a series kept for good).
UNMATCHED_PATH = "unmatched"
OTHER_METHOD = "other"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class _NodeCollector(Collector):
    def __init__(self, agent: NodeAgent) -> None:
        self._agent = agent

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        agent = self._agent
        endpoints = GaugeMetricFamily("ciliate_endpoints", "Endpoints on this node")
        endpoints.add_metric([], len(agent.endpoints.list()))
        yield endpoints
        used = GaugeMetricFamily("ciliate_ipam_used", "Pod IPs in use", labels=["cidr"])
        capacity = GaugeMetricFamily(
            "ciliate_ipam_capacity", "Pod IPs available in all", labels=["cidr"]
        )
        for pool in agent.ipam.usage():
            used.add_metric([str(pool.cidr)], pool.used)
            capacity.add_metric([str(pool.cidr)], pool.capacity)
        yield used
        yield capacity
        packets = CounterMetricFamily(
            "ciliate_datapath_packets",
            "Packets by datapath verdict reason and direction",
            labels=["reason", "direction"],
        )
        nbytes = CounterMetricFamily(
            "ciliate_datapath_bytes",
            "Bytes by datapath verdict reason and direction",
            labels=["reason", "direction"],
        )
        for row in agent.datapath.metrics.rows():
            labels = [tables.describe_reason(row.reason), row.direction.name.lower()]
            packets.add_metric(labels, row.packets)
            nbytes.add_metric(labels, row.bytes)
        yield packets
        yield nbytes


class AgentMetrics:
    """The agent's registry: the node collector (read when scraped) and the
    API latency histogram. One per app, so an app can be built twice in a
    process (tests) without clashing series."""

    def __init__(self, agent: NodeAgent) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_NodeCollector(agent))
        self.latency = Histogram(
            "ciliate_api_request_seconds",
            "Agent API latency by method, route template and status",
            ["method", "path", "status"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0),
        )

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class LatencyMiddleware:
    """API latency per method, route and status, as plain ASGI: Starlette's
    BaseHTTPMiddleware costs about a millisecond per request, and the CNI
    relay's requests are on kubelet's critical path."""

    def __init__(self, app: ASGIApp, *, histogram: Histogram) -> None:
        self._app = app
        self._histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, send_status)
        finally:
            # The route's template ("/v1/endpoints/{endpoint_id}"), never the
            # path sent: junk paths would each add a series for good.
            path = getattr(scope.get("route"), "path", UNMATCHED_PATH)
            method = scope.get("method", "")
            self._histogram.labels(
                method if method in _METHODS else OTHER_METHOD, path, str(status)
            ).observe(time.perf_counter() - started)
