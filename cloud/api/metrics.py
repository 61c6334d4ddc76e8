"""Prometheus metrics of the API process, on a registry of its own (one per app)."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloud.context import CloudContext
from cloud.registry.tables import Device, Model, ModelVersion

__all__ = ["ApiMetrics", "MetricsMiddleware"]


class _RegistryCollector(Collector):
    """Counts read from the registry at scrape time."""

    def __init__(self, context: CloudContext) -> None:
        self.context = context

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily(
            "edgefleet_registry_rows", "Rows in the registry", labels=["kind"]
        )
        try:
            with self.context.database.session() as session:
                for kind, table in (
                    ("models", Model),
                    ("versions", ModelVersion),
                    ("devices", Device),
                ):
                    gauge.add_metric(
                        [kind], session.scalar(select(func.count()).select_from(table)) or 0
                    )
        except Exception:  # noqa: S110 - a scrape must not fail because the DB is down
            pass
        yield gauge


class ApiMetrics:
    def __init__(self, context: CloudContext) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "edgefleet_http_requests_total",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "edgefleet_http_request_seconds",
            "HTTP request latency by route",
            ["method", "route"],
            registry=self.registry,
        )
        self.registry.register(_RegistryCollector(context))


class MetricsMiddleware:
    """Labels by route template (not raw path) so label cardinality stays bounded."""

    def __init__(self, app: ASGIApp, *, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    @staticmethod
    def _route(scope: Scope) -> str:
        # The router leaves the matched route in the scope (shared dict) once it matched.
        route = scope.get("route")
        return str(getattr(route, "path", "unmatched"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        recorded = False

        def record() -> None:
            nonlocal recorded
            if recorded:
                return
            recorded = True
            route, method = self._route(scope), scope.get("method", "")
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - start)

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                # Count before the last byte leaves, so a client that reads /metrics
                # right after its request already sees it.
                record()
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            record()
