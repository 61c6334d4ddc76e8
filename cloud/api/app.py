"""The FastAPI application factory."""

from __future__ import annotations

from fastapi import FastAPI

from cloud.api.errors import JsonErrorBodies, install_error_handlers
from cloud.api.limits import BodySizeLimit, HeadSizeLimit
from cloud.api.metrics import ApiMetrics, MetricsMiddleware
from cloud.api.routes import (
    artifacts,
    audit,
    budget,
    devices,
    federated,
    fleet_state,
    health,
    history,
    models,
    pipeline,
    rollouts,
)
from cloud.api.routes import compress as compress_routes
from cloud.api.routes import device_batch as device_batch_routes
from cloud.api.routes import fleet as fleet_routes
from cloud.context import CloudContext
from cloud.fleet.service import FleetService

__all__ = ["create_app", "create_health_app"]


def create_app(context: CloudContext, fleet: FleetService | None = None) -> FastAPI:
    app = FastAPI(
        title="EdgeFleet cloud API",
        version="0.1.0",
        description="Model registry, device enrollment and artifacts for the EdgeFleet fleet.",
    )
    app.state.context = context
    app.state.fleet = fleet
    app.state.metrics = ApiMetrics(context, fleet)
    install_error_handlers(app)
    for module in (
        health, models, pipeline, devices, fleet_routes, rollouts, artifacts, audit, budget,
        fleet_state, history, compress_routes, federated,
    ):  # fmt: skip
        app.include_router(module.router)
    app.include_router(device_batch_routes.router)
    # Innermost: what routes answer in another media type (Range errors) becomes JSON.
    app.add_middleware(JsonErrorBodies, scrub=app.state.scrub_paths)
    app.add_middleware(
        BodySizeLimit,
        default=context.settings.max_request_bytes,
        uploads=context.settings.max_upload_bytes + 1024 * 1024,
    )
    app.add_middleware(HeadSizeLimit)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    return app


def create_health_app(context: CloudContext, fleet: FleetService) -> FastAPI:
    """Role ``fleet``: the fleet service's liveness, readiness and metrics, nothing else."""
    app = FastAPI(title="EdgeFleet fleet service", version="0.1.0")
    app.state.context = context
    app.state.fleet = fleet
    app.state.metrics = ApiMetrics(context, fleet)
    install_error_handlers(app)
    app.include_router(health.router)
    app.add_middleware(JsonErrorBodies, scrub=app.state.scrub_paths)
    app.add_middleware(HeadSizeLimit)
    return app
