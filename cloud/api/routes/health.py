"""Liveness, readiness (registry, Redis, broker) and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cloud.api.deps import ContextDep
from cloud.embedded.processes import port_open
from cloud.embedded.services import mqtt_address

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "a dependency is down"}})
def readyz(context: ContextDep) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        context.database.ping()
        checks["database"] = "ok"
    except Exception as exc:  # any driver error means not ready
        checks["database"] = f"down: {type(exc).__name__}"
    try:
        context.redis.ping()
        checks["redis"] = "ok"
    except Exception as exc:  # redis raises several connection error types
        checks["redis"] = f"down: {type(exc).__name__}"
    host, port = mqtt_address(context.urls.mqtt_url)
    checks["mqtt"] = "ok" if port_open(host, port, timeout=1.0) else "down: not reachable"
    failed = sorted(k for k, v in checks.items() if v != "ok")
    if failed:
        return JSONResponse(
            {"error": f"not ready: {', '.join(failed)} down", "checks": checks}, status_code=503
        )
    return JSONResponse({"status": "ready", "checks": checks})


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
