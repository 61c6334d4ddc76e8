"""The local inference API on localhost: KServe v2 shape over HTTP, stdlib only (a device
installs no web framework). Every answer carries source, confidence, version, latency."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from edge_agent.http_server import (
    HttpServer,
    Limits,
    Request,
    Response,
    error_response,
    json_response,
)
from shared.errors import Conflict, EdgeFleetError, TensorError
from shared.tensors import HEADER_LENGTH, InferResponse, decode_request, encode_response

if TYPE_CHECKING:
    from edge_agent.agent import Agent

__all__ = ["LocalApi"]

_LOGGER = logging.getLogger(__name__)
_INFER_SUFFIX = "/infer"
_FEEDBACK = "/v1/feedback"  # labelled inputs for federated learning (edge_agent.learning)


def _header_length(request: Request) -> int | None:
    raw = request.headers.get(HEADER_LENGTH.lower())
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > len(str(len(request.body))):
        raise TensorError(f"{HEADER_LENGTH} must be a byte count within the body, got {raw[:40]!r}")
    return int(raw)


class _Routes:
    def __init__(self, agent: Agent, max_rows: int) -> None:
        self.agent = agent
        self.max_rows = max_rows

    def __call__(self, request: Request) -> Response:
        try:
            if request.method in ("GET", "HEAD"):
                return self._get(request.path)
            if request.method == "POST":
                return self._post(request)
        except EdgeFleetError as exc:
            return error_response(exc.status_code, exc.message)
        response = error_response(405, f"method {request.method} not allowed")
        response.headers["Allow"] = "GET, HEAD, POST"
        return response

    def _get(self, path: str) -> Response:
        agent = self.agent
        if path in ("/healthz", "/v2/health/live"):
            return json_response(200, {"status": "ok"})
        if path == "/v2/health/ready":
            ready = bool(agent.runtime.models())
            return json_response(200 if ready else 503, {"ready": ready})
        if path == "/metrics":
            return Response(
                200, agent.prometheus().encode(), {"Content-Type": "text/plain; version=0.0.4"}
            )
        if path.startswith("/v2/models/"):
            name = path.removeprefix("/v2/models/").removesuffix("/ready")
            loaded = agent.runtime.get(name)
            if path.endswith("/ready"):
                return json_response(200, {"ready": True})
            manifest = loaded.manifest
            return json_response(
                200,
                {
                    "name": name,
                    "versions": [str(manifest.version)],
                    "platform": "onnxruntime_onnx",
                    "inputs": [s.model_dump(exclude={"schema_version"}) for s in manifest.inputs],
                    "outputs": [s.model_dump(exclude={"schema_version"}) for s in manifest.outputs],
                },
            )
        return error_response(404, f"no route {path}")

    def _post(self, request: Request) -> Response:
        path = request.path
        if path == _FEEDBACK:
            return self._feedback(request)
        if not (path.startswith("/v2/models/") and path.endswith(_INFER_SUFFIX)):
            return error_response(404, f"no route {path}")
        model = path.removeprefix("/v2/models/").removesuffix(_INFER_SUFFIX)
        model = model.split("/versions/")[0]
        decoded = decode_request(request.body, _header_length(request), max_rows=self.max_rows)
        for name, array in decoded.inputs.items():
            if array.size == 0:
                raise TensorError(
                    f"empty batch: input {name!r} has shape {list(array.shape)}; "
                    "send at least one row"
                )
        answer = self.agent.infer(model, decoded.inputs)
        wanted = [o.name for o in decoded.outputs] or list(answer.outputs)
        unknown = [n for n in wanted if n not in answer.outputs]
        if unknown:
            return error_response(400, f"unknown outputs {unknown}")
        binary = {o.name for o in decoded.outputs if o.binary} or decoded.binary_output
        response = InferResponse(
            model_name=model,
            model_version=str(answer.version),
            id=decoded.id,
            outputs={n: answer.outputs[n] for n in wanted},
            parameters={
                "source": answer.source,
                "confidence": answer.confidence,
                "latency_ms": round(answer.latency_ms, 3),
                "degraded": answer.degraded,
                **({"reason": answer.reason} if answer.reason else {}),
                **(
                    {"routing_fallback": answer.routing_fallback} if answer.routing_fallback else {}
                ),
                "offloaded": answer.hard_rows,
                "rows": [
                    {
                        "source": r.source,
                        "model": r.model,
                        "version": r.version,
                        "confidence": r.confidence,
                        "latency_ms": round(r.latency_ms, 3),
                        "degraded": r.degraded,
                    }
                    for r in answer.rows
                ],
            },
        )
        payload, headers = encode_response(response, binary=binary)
        return Response(200, payload, headers)

    def _feedback(self, request: Request) -> Response:
        learning = self.agent.learning
        if learning is None:
            raise Conflict("learning is off on this device (federated is false): nothing kept")
        stored = learning.feedback(request.body, _header_length(request), self.max_rows)
        return json_response(200, stored)


class LocalApi:
    """The agent's HTTP API; its limits come from the agent's settings (``api_*``)."""

    def __init__(self, agent: Agent, host: str, port: int) -> None:
        settings = agent.settings
        limits = Limits(
            workers=settings.api_workers,
            max_connections=settings.api_max_connections,
            max_request_bytes=settings.api_max_request_bytes,
            read_timeout_s=settings.api_read_timeout_s,
        )
        self._server = HttpServer(host, port, _Routes(agent, settings.api_max_batch_rows), limits)

    @property
    def url(self) -> str:
        host, port = self._server.address
        return f"http://{host}:{port}"

    def start(self) -> None:
        self._server.start()
        _LOGGER.debug("local API on %s", self.url)

    def stop(self) -> None:
        self._server.stop()
