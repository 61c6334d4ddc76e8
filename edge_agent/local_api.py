"""The local inference API on localhost: KServe v2 shape over HTTP, stdlib only (a device
installs no web framework). Every answer carries source, confidence, version, latency."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from shared.errors import EdgeFleetError
from shared.tensors import HEADER_LENGTH, InferResponse, decode_request, encode_response

if TYPE_CHECKING:
    from edge_agent.agent import Agent

__all__ = ["LocalApi"]

_LOGGER = logging.getLogger(__name__)
MAX_BODY = 64 * 1024 * 1024


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    # One buffered write per response and no Nagle: small keep-alive responses written
    # piecewise otherwise wait ~40 ms on the client's delayed ACK.
    wbufsize = 1 << 16

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        _LOGGER.debug(format, *args)

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        headers = headers or {"Content-Type": "application/json"}
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: Any) -> None:
        self._send(status, json.dumps(payload).encode())

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _guarded(self, handle: Callable[[], None]) -> None:
        """Whatever goes wrong inside, the client gets a JSON 500 (the details stay in the
        log) instead of a reset connection, and the server goes on."""
        try:
            handle()
        except Exception:
            _LOGGER.exception("local API: %s %s failed", self.command, self.path)
            self.close_connection = True  # the response may be half written
            with contextlib.suppress(OSError):  # the client may be gone already
                self._error(500, "internal error")

    def do_GET(self) -> None:
        self._guarded(self._get)

    def do_POST(self) -> None:
        self._guarded(self._post)

    def _get(self) -> None:
        agent = self.server.agent
        path = self.path.split("?", 1)[0]
        if path in ("/healthz", "/v2/health/live"):
            self._json(200, {"status": "ok"})
        elif path == "/v2/health/ready":
            ready = bool(agent.runtime.models())
            self._json(200 if ready else 503, {"ready": ready})
        elif path == "/metrics":
            self._send(
                200, agent.prometheus().encode(), {"Content-Type": "text/plain; version=0.0.4"}
            )
        elif path.startswith("/v2/models/"):
            name = path.removeprefix("/v2/models/").removesuffix("/ready")
            try:
                loaded = agent.runtime.get(name)
            except EdgeFleetError as exc:
                self._error(exc.status_code, exc.message)
                return
            if path.endswith("/ready"):
                self._json(200, {"ready": True})
                return
            manifest = loaded.manifest
            self._json(
                200,
                {
                    "name": name,
                    "versions": [str(manifest.version)],
                    "platform": "onnxruntime_onnx",
                    "inputs": [s.model_dump(exclude={"schema_version"}) for s in manifest.inputs],
                    "outputs": [s.model_dump(exclude={"schema_version"}) for s in manifest.outputs],
                },
            )
        else:
            self._error(404, f"no route {path}")

    def _post(self) -> None:
        path = self.path.split("?", 1)[0]
        if not (path.startswith("/v2/models/") and path.endswith("/infer")):
            self._error(404, f"no route {path}")
            return
        model = path.removeprefix("/v2/models/").removesuffix("/infer").split("/versions/")[0]
        try:
            length = int(self.headers.get("Content-Length", "-1"))
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY:
            self._error(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE if length > MAX_BODY else 411,
                "bad Content-Length",
            )
            return
        body = self.rfile.read(length)
        try:
            header = self.headers.get(HEADER_LENGTH)
            request = decode_request(body, int(header) if header else None)
            answer = self.server.agent.infer(model, request.inputs)
        except ValueError as exc:
            self._error(400, f"bad {HEADER_LENGTH}: {exc}")
            return
        except EdgeFleetError as exc:
            self._error(exc.status_code, exc.message)
            return
        wanted = [o.name for o in request.outputs] or list(answer.outputs)
        unknown = [n for n in wanted if n not in answer.outputs]
        if unknown:
            self._error(400, f"unknown outputs {unknown}")
            return
        binary = {o.name for o in request.outputs if o.binary} or request.binary_output
        response = InferResponse(
            model_name=model,
            model_version=str(answer.version),
            id=request.id,
            outputs={n: answer.outputs[n] for n in wanted},
            parameters={
                "source": answer.source,
                "confidence": answer.confidence,
                "latency_ms": round(answer.latency_ms, 3),
                "degraded": answer.degraded,
                **({"reason": answer.reason} if answer.reason else {}),
            },
        )
        payload, headers = encode_response(response, binary=binary)
        self._send(200, payload, headers)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    agent: Agent


class LocalApi:
    def __init__(self, agent: Agent, host: str, port: int) -> None:
        self._server = _Server((host, port), _Handler)
        self._server.agent = agent
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="local-api", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
