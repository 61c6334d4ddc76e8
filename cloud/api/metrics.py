"""Prometheus metrics of the API process, on a registry of its own (one per app): requests,
registry rows, and the fleet service's ingest backlog, drops and the broker's own counters."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloud.context import CloudContext
from cloud.registry.tables import Device, Model, ModelVersion

if TYPE_CHECKING:
    from cloud.fleet.service import FleetService

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


class _FleetCollector(Collector):
    """The fleet service's own view, read at scrape time: a backlog or drops are visible."""

    def __init__(self, fleet: FleetService) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[Metric]:
        ingest = self.fleet.ingest.snapshot()
        yield GaugeMetricFamily(
            "edgefleet_ingest_queue_depth", "Device messages waiting to be stored", ingest.depth
        )
        yield GaugeMetricFamily(
            "edgefleet_ingest_queue_capacity", "Size of the ingest queue", ingest.capacity
        )
        yield GaugeMetricFamily(
            "edgefleet_ingest_oldest_message_age_seconds",
            "Age of the oldest device message received and not yet stored",
            ingest.oldest_age_s,
        )
        stored = CounterMetricFamily(
            "edgefleet_ingest_stored", "Device messages stored (and acked)", labels=["kind"]
        )
        for kind, count in sorted(ingest.stored.items()):
            stored.add_metric([kind], count)
        yield stored
        dropped = CounterMetricFamily(
            "edgefleet_ingest_dropped",
            "Device messages that can never be stored, acked and dropped",
            labels=["reason"],
        )
        for reason, count in sorted(ingest.dropped.items()):
            dropped.add_metric([reason], count)
        yield dropped
        for name, help_text, value in (
            ("received", "Device messages received", ingest.received),
            ("batches", "Batches written", ingest.batches),
            ("retries", "Batch writes retried after a database error", ingest.retries),
            ("redis_errors", "Batches whose live view update failed", ingest.redis_errors),
            ("blocked", "Times the network thread waited for room in the queue", ingest.blocked),
            (
                "telemetry_windows_repeated",
                "Telemetry windows already summed into the history (by another replica)",
                ingest.windows_repeated,
            ),
            ("backlog_warnings", "Backlog warnings logged", self.fleet.ingest.backlog.warnings),
        ):
            yield CounterMetricFamily(f"edgefleet_ingest_{name}", help_text, value)
        yield GaugeMetricFamily(
            "edgefleet_mqtt_connected", "The fleet service's broker session is up",
            int(self.fleet.link.connected),
        )  # fmt: skip
        yield CounterMetricFamily(
            "edgefleet_chunk_broadcast_errors",
            "Errors the chunk broadcaster logged and went past",
            self.fleet.chunks.errors,
        )
        yield CounterMetricFamily(
            "edgefleet_chunk_requests_refused",
            "Chunk requests for an artifact outside the asking device's desired state",
            self.fleet.chunks.refused,
        )
        rollouts = self.fleet.rollouts
        yield CounterMetricFamily(
            "edgefleet_rollout_engine_errors",
            "Rounds of one rollout that raised (logged; the other rollouts went on)",
            rollouts.errors,
        )
        yield CounterMetricFamily(
            "edgefleet_rollout_devices_unmovable",
            "Rollout targets failed on their own: the device could not be moved",
            rollouts.unmovable,
        )
        chunks = self.fleet.chunks
        for name, help_text, value in (
            ("published", "Artifact chunks the carousel published", chunks.chunks_published),
            ("bytes_published", "Bytes of artifact chunks published", chunks.bytes_published),
            ("passes", "Carousel passes begun over an artifact", chunks.passes),
            ("wants_expired", "Chunk wants nobody repeated in time, dropped", chunks.expired),
        ):
            yield CounterMetricFamily(f"edgefleet_chunk_{name}", help_text, value)
        yield GaugeMetricFamily(
            "edgefleet_chunk_wanted", "Chunks some device still asks for", chunks.wanted
        )
        yield GaugeMetricFamily(
            "edgefleet_mqtt_in_flight", "Publishes the broker has not acknowledged yet",
            self.fleet.link.in_flight,
        )  # fmt: skip
        broker = self.fleet.broker
        yield CounterMetricFamily(
            "edgefleet_broker_drops_seen",
            "Messages the broker dropped while the fleet service watched ($SYS)",
            broker.dropped_seen,
        )
        values = GaugeMetricFamily(
            "edgefleet_broker_sys",
            "The broker's $SYS counters as last published (dropped: since the broker started)",
            labels=["stat"],
        )
        for stat, value in sorted(broker.values.items()):
            values.add_metric([stat], value)
        yield values


class ApiMetrics:
    def __init__(self, context: CloudContext, fleet: FleetService | None = None) -> None:
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
        if fleet is not None:
            self.registry.register(_FleetCollector(fleet))


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
