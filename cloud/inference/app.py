"""The inference service's ASGI application, alone (role ``inference``) or in front of the
control-plane API in one process (role ``all``)."""

from __future__ import annotations

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Receive, Scope, Send

from cloud.api.errors import JsonErrorBodies, install_error_handlers
from cloud.api.limits import BodySizeLimit, HeadSizeLimit
from cloud.api.routes import budget
from cloud.context import CloudContext
from cloud.inference import rest
from cloud.inference.service import InferenceService

__all__ = ["WithInference", "create_inference_app"]


def create_inference_app(context: CloudContext, service: InferenceService) -> FastAPI:
    app = FastAPI(
        title="EdgeFleet inference",
        version="0.1.0",
        description="Cloud fallback inference: KServe v2 REST (JSON and binary tensors).",
    )
    app.state.context = context
    app.state.inference = service
    install_error_handlers(app)
    app.include_router(rest.router)
    app.include_router(budget.router)  # the budget this replica takes part in

    @app.get("/metrics", response_class=Response, tags=["inference"])
    def metrics(request: Request) -> Response:
        registry = request.app.state.inference.metrics.registry
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(JsonErrorBodies, scrub=app.state.scrub_paths)
    limit = context.settings.inference_max_request_bytes
    app.add_middleware(BodySizeLimit, default=limit, uploads=limit)
    app.add_middleware(HeadSizeLimit)
    return app


class WithInference:
    """``/v2…`` to the inference app, everything else to the API; ``/metrics`` shows both
    (role ``all``: one port, as a device's single cloud URL expects)."""

    def __init__(self, api: FastAPI, inference: FastAPI) -> None:
        self.api = api
        self.inference = inference
        api.state.metrics.registry.register(inference.state.inference.metrics.registry)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        target: ASGIApp = self.api
        if scope["type"] == "http" and (path == "/v2" or path.startswith("/v2/")):
            target = self.inference
        await target(scope, receive, send)
