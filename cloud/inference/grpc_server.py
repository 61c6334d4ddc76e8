"""KServe v2 gRPC (``inference.GRPCInferenceService``) on the stubs tritonclient ships:
ServerLive/Ready/Metadata, ModelReady, ModelMetadata, ModelInfer, behind the same service
(and batcher) as REST."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from concurrent import futures
from typing import Any, NoReturn, TypeVar

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from cloud.inference.auth import Caller
from cloud.inference.grpc_codec import decode_infer_request, encode_infer_response
from cloud.inference.rest import EXTENSIONS, SERVER_NAME, SERVER_VERSION
from cloud.inference.service import InferenceService
from shared.errors import EdgeFleetError, InferenceFailed, ServiceUnavailable
from shared.tensors import InferRequest

__all__ = ["GrpcServer", "InferenceServicer", "grpc_status"]

_LOGGER = logging.getLogger(__name__)
T = TypeVar("T")

_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


def grpc_status(http_status: int) -> grpc.StatusCode:
    return _CODES.get(http_status, grpc.StatusCode.INTERNAL)


def _abort(context: grpc.ServicerContext, exc: EdgeFleetError) -> NoReturn:
    if exc.retry_after_s is not None:
        context.set_trailing_metadata((("retry-after", str(max(1, math.ceil(exc.retry_after_s)))),))
    context.abort(grpc_status(exc.status_code), exc.message)
    raise AssertionError("context.abort returned")  # it raises; this keeps mypy informed


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, service: InferenceService) -> None:
        self.service = service

    def _answer(self, context: grpc.ServicerContext, work: Callable[[], T]) -> T:
        try:
            return work()
        except EdgeFleetError as exc:
            _abort(context, exc)
        except Exception:
            _LOGGER.exception("unhandled error in a gRPC call")
            _abort(context, EdgeFleetError("internal error"))

    def _caller(self, context: grpc.ServicerContext) -> Caller:
        metadata = dict(context.invocation_metadata() or ())
        value = metadata.get("authorization")
        return self.service.authenticate(value if isinstance(value, str) else None)

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        return service_pb2.ServerReadyResponse(ready=self.service.ready())

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return service_pb2.ServerMetadataResponse(
            name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS
        )

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        def work() -> Any:
            self._caller(context)
            info = self.service.resolve(request.name, request.version or None)
            try:
                self.service.model_ready(info)
            except InferenceFailed:
                return service_pb2.ModelReadyResponse(ready=False)
            return service_pb2.ModelReadyResponse(ready=True)

        return self._answer(context, work)

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        def work() -> Any:
            self._caller(context)
            meta = self.service.metadata(
                self.service.resolve(request.name, request.version or None)
            )
            tensor = service_pb2.ModelMetadataResponse.TensorMetadata
            return service_pb2.ModelMetadataResponse(
                name=meta["name"],
                versions=meta["versions"],
                platform=meta["platform"],
                inputs=[tensor(**t) for t in meta["inputs"]],
                outputs=[tensor(**t) for t in meta["outputs"]],
            )

        return self._answer(context, work)

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        settings = self.service.settings

        def decode() -> InferRequest:
            return decode_infer_request(
                request,
                max_elements=settings.inference_max_request_bytes,
                max_rows=settings.inference_max_request_rows,
            )

        def work() -> Any:
            self.service.admit(self._caller(context))
            info = self.service.resolve(request.model_name, request.model_version or None)
            return encode_infer_response(self.service.infer(info, decode))

        return self._answer(context, work)


class GrpcServer:
    """The gRPC server on its own thread pool; ``start`` gives the port it bound."""

    def __init__(self, service: InferenceService, *, host: str, port: int) -> None:
        settings = service.settings
        limit = settings.inference_max_request_bytes
        self.host = host
        self.requested_port = port
        self.port = 0
        self._server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=settings.grpc_workers, thread_name_prefix="grpc"
            ),
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ],
        )
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(service), self._server
        )

    def start(self) -> int:
        address = f"{self.host}:{self.requested_port}"
        try:
            self.port = self._server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ServiceUnavailable(f"gRPC could not listen on {address}: {exc}") from exc
        if not self.port:
            raise ServiceUnavailable(f"gRPC could not listen on {address}")
        self._server.start()
        _LOGGER.info("KServe v2 gRPC on %s:%d", self.host, self.port)
        return self.port

    def stop(self, grace_s: float = 2.0) -> None:
        self._server.stop(grace_s).wait(grace_s + 1)
